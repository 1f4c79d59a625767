"""Unpack a base backup stream into a data directory, as it arrives.

The page server sends a tar archive, plain or as LZ4 frames
(BasebackupRequest.compression). Parsing it here and writing each file
directly costs one pass over the bytes in this process; piping it to the
system `tar` costs a second process and a pipe copy of every byte. The
writes themselves (the kernel finding page-cache memory for a gigabyte) run
on a thread of their own, beside the decompressing and parsing. Only what a
base backup holds is accepted: directories and regular files, every name
inside the data directory.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Final

from pgformat.lz4stream import Lz4FrameStream, Lz4StreamError
from pgformat.tarstream import MemberData, MemberEnd, MemberStart, TarFormatError, TarStreamParser


class ExtractError(Exception):
    """The stream is not a data directory we can unpack."""


# Pieces (of up to a megabyte or so) waiting for the writer thread: bounds memory.
WRITE_QUEUE_DEPTH: Final = 32


class _WriterThread:
    """Writes and closes files in order, off the thread that parses; the first error is kept and
    raised to that thread at its next call."""

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[int, bytes | None] | None] = queue.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="unpack-writer", daemon=True)
        self._thread.start()

    def write(self, fd: int, data: bytes) -> None:
        self._check()
        self._q.put((fd, data))

    def close_file(self, fd: int) -> None:
        self._check()
        self._q.put((fd, None))

    def finish(self) -> None:
        """Wait until everything queued is written (or failed)."""
        self._q.put(None)
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            fd, data = item
            try:
                if data is None:
                    os.close(fd)
                elif self._error is None:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
            except OSError as e:
                self._error = self._error or e


class DataDirectoryWriter:
    """Feed the stream's chunks; `close` checks it ended where the archive ends."""

    def __init__(self, root: Path, *, lz4: bool = False) -> None:
        self.root = root
        self._frames = Lz4FrameStream() if lz4 else None
        self._tar = TarStreamParser()
        self._fd = -1
        self._writer = _WriterThread()
        self._done = False
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

    def close(self) -> None:
        try:
            if self._frames is not None:
                self._frames.close()
            self._tar.close()
        except (Lz4StreamError, TarFormatError) as e:
            raise ExtractError(f"the base backup stream stopped early: {e}") from None
        self._done = True
        self._writer.finish()

    def abort(self) -> None:
        """After an error: close what is open (a no-op after a successful close)."""
        if self._done:
            return
        self._done = True
        self._end()
        try:
            self._writer.finish()
        except OSError:
            pass  # the error that mattered was raised already

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
        self.files += 1

    def _write(self, data: bytes) -> None:
        self._writer.write(self._fd, data)
        self.bytes += len(data)

    def _end(self) -> None:
        if self._fd >= 0:
            self._writer.close_file(self._fd)
            self._fd = -1
