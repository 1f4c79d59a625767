"""Unpack a base backup stream into a data directory, as it arrives.

The page server sends a tar archive, plain or as LZ4 frames
(BasebackupRequest.compression). Parsing it here and writing each file
directly costs one pass over the bytes in this process; piping it to the
system `tar` costs a second process and a pipe copy of every byte. Only what
a base backup holds is accepted: directories and regular files, every name
inside the data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from pgformat.lz4stream import Lz4FrameStream, Lz4StreamError
from pgformat.tarstream import ArchiveEnd, MemberData, MemberEnd, MemberStart, TarFormatError, TarStreamParser


class ExtractError(Exception):
    """The stream is not a data directory we can unpack."""


class DataDirectoryWriter:
    """Feed the stream's chunks; `close` checks it ended where the archive ends."""

    def __init__(self, root: Path, *, lz4: bool = False) -> None:
        self.root = root
        self._frames = Lz4FrameStream() if lz4 else None
        self._tar = TarStreamParser()
        self._fd = -1
        self._name = ""
        self._ended = False
        self.files = 0
        self.bytes = 0

    def feed(self, chunk: bytes) -> None:
        try:
            pieces = self._frames.feed(chunk) if self._frames is not None else [chunk]
        except Lz4StreamError as e:
            raise ExtractError(f"the base backup stream is corrupt: {e}") from None
        for piece in pieces:
            try:
                events = self._tar.feed(piece)
            except TarFormatError as e:
                raise ExtractError(f"the base backup is not a valid tar archive: {e}") from None
            for ev in events:
                if isinstance(ev, MemberData):
                    self._write(ev.data)
                elif isinstance(ev, MemberStart):
                    self._start(ev)
                elif isinstance(ev, MemberEnd):
                    self._end()
                elif isinstance(ev, ArchiveEnd):
                    self._ended = True

    def close(self) -> None:
        try:
            if self._frames is not None:
                self._frames.close()
            self._tar.close()
        except (Lz4StreamError, TarFormatError) as e:
            raise ExtractError(f"the base backup stream stopped early: {e}") from None
        if self._fd >= 0:  # pragma: no cover - the parser reports the truncation first
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ExtractError(f"the base backup names {name!r}, which is not a path inside the data directory")
        return self.root.joinpath(*parts)

    def _start(self, member: MemberStart) -> None:
        path = self._path(member.name)
        if member.kind == "dir":
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            return
        if member.kind != "file":
            raise ExtractError(f"the base backup holds a {member.kind} ({member.name!r}); only files and directories")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._name = member.name
        self.files += 1

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.bytes += len(data)

    def _end(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
