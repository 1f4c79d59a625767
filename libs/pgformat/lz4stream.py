"""A run of LZ4 frames, decoded as it arrives.

Postgres 15's server-side `lz4` backup compression (src/backend/backup/
basebackup_lz4.c) sends a tar stream as LZ4 frames (the LZ4 frame format,
https://github.com/lz4/lz4/blob/dev/doc/lz4_Frame_format.md); the page server's
compressed base backups are the same: frames one after another, decompressing
to the archive in order, each split across transport chunks anywhere.
"""

from __future__ import annotations

import lz4.frame

from .errors import FormatError


class Lz4StreamError(FormatError):
    """Bytes that are not LZ4 frames, or a stream that stops inside a frame."""


class Lz4FrameStream:
    """Feed compressed bytes in pieces of any size; get the decompressed bytes back."""

    def __init__(self) -> None:
        self._frame = lz4.frame.LZ4FrameDecompressor()
        self._inside = False  # some of the current frame was fed
        self.frames = 0

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        while data:
            try:
                piece = self._frame.decompress(data)
            except RuntimeError as e:  # python-lz4 reports corrupt input this way
                raise Lz4StreamError(f"not an LZ4 frame stream (frame {self.frames + 1}): {e}") from None
            if piece:
                out.append(piece)
            if self._frame.eof:
                data = self._frame.unused_data
                self._frame = lz4.frame.LZ4FrameDecompressor()
                self._inside = False
                self.frames += 1
            else:
                self._inside = True
                data = b""
        return out

    def close(self) -> None:
        """The stream ended: it must not end inside a frame."""
        if self._inside:
            raise Lz4StreamError(f"the stream ends inside LZ4 frame {self.frames + 1}")
