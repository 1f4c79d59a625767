"""Runs of consecutive pages of one relation fork: how base backups read and ship relation files.

CHUNK_PAGES divides RELSEG_SIZE, so no chunk crosses a segment file. A base
backup asked for an LZ4 stream sends LZ4 frames (the frame format is what
Postgres's own server-side `lz4` backup compression sends:
src/backend/backup/basebackup_lz4.c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import lz4.frame

from pgformat.datadir import RELSEG_SIZE

CHUNK_PAGES: Final = 128
assert RELSEG_SIZE % CHUNK_PAGES == 0, "a chunk must never cross a segment file"


@dataclass(frozen=True, slots=True)
class PageChunk:
    """Pages first_blk .. first_blk + npages - 1 of a fork, ready for an archive."""

    first_blk: int
    npages: int
    data: bytes

    def pages(self) -> bytes:
        return self.data


def compress_frame(pages: bytes) -> bytes:
    """One LZ4 frame (fastest level), with a content checksum: damage fails to decompress."""
    return lz4.frame.compress(pages, compression_level=0, store_size=True, content_checksum=True)
