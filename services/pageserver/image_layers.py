"""Image layers: every relation page of a timeline as of one LSN, in one compressed file.

Neon's pageserver answers most reads from image layers (pageserver/src/tenant/
storage_layer/image_layer.rs) made in the background; ours serve base backups,
which read every page of every relation. Without them a compute start reads
each page from SQLite and redoes every page that exists only as WAL.

Layout: one file per layer, `layers/<timeline id>-<LSN>.layer`, a run of LZ4
frames, each holding CHUNK_PAGES consecutive pages of one relation fork (the
last chunk of a fork may be shorter). LZ4 frames because concatenated frames
decode to the concatenated pages, so a base backup passes a stored frame on to
a client that asked for an LZ4 stream without decompressing it (the frame
format is what Postgres's own server-side `lz4` backup compression sends:
src/backend/backup/basebackup_lz4.c). CHUNK_PAGES divides RELSEG_SIZE, so no
chunk crosses a segment file.

The index (which chunk of which fork lies where) is in the repository's SQLite
database, written in the same transaction that makes the layer visible, after
the file is fsync'd: a crash leaves either a complete layer or an orphan file
that the next start removes. A layer holds pages with data checksums set or
not, as the cluster had them at its LSN (`checksums`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import lz4.frame

from pgformat.constants import BLCKSZ
from pgformat.datadir import RELSEG_SIZE

from .keys import RelTag

CHUNK_PAGES: Final = 128
assert RELSEG_SIZE % CHUNK_PAGES == 0, "a chunk must never cross a segment file"
LAYER_DIR: Final = "layers"
LAYER_SUFFIX: Final = ".layer"


class ImageLayerError(Exception):
    """A layer file that does not hold what its index says (DATA_LOSS: the file was damaged)."""


def compress_frame(pages: bytes) -> bytes:
    """One LZ4 frame (fastest level: a layer is written once, read at every compute start), with a
    content checksum: a damaged layer fails to decompress, here or at the client it travels to."""
    return lz4.frame.compress(pages, compression_level=0, store_size=True, content_checksum=True)


def decompress_pages(frame: bytes, npages: int) -> bytes:
    try:
        data = lz4.frame.decompress(frame)
    except RuntimeError as e:  # python-lz4's answer to a corrupt frame
        raise ImageLayerError(f"a layer chunk is not a valid LZ4 frame: {e}") from None
    if len(data) != npages * BLCKSZ:
        raise ImageLayerError(f"a layer chunk holds {len(data)} bytes, its index says {npages} pages")
    return data


@dataclass(frozen=True, slots=True)
class ImageLayer:
    """One layer's row: whose pages, as of which LSN, where."""

    id: int
    tl_id: int
    lsn: int
    path: Path
    checksums: bool
    nbytes: int


@dataclass(frozen=True, slots=True)
class PageChunk:
    """Pages first_blk.. of a fork, ready for an archive: a stored LZ4 frame, or the bytes themselves."""

    first_blk: int
    npages: int
    frame: bytes | None = None
    data: bytes | None = None

    def pages(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.frame is not None
        return decompress_pages(self.frame, self.npages)


@dataclass(frozen=True, slots=True)
class LayerChunk:
    """CHUNK_PAGES (or fewer) pages of a fork starting at `first_blk`: `length` bytes at `offset`."""

    first_blk: int
    npages: int
    offset: int
    length: int


def layer_file_name(tl_id: int, lsn: int) -> str:
    return f"{tl_id}-{lsn:016X}{LAYER_SUFFIX}"


@dataclass
class LayerFileWriter:
    """Appends frames to a new layer file (under a temporary name until `finish`)."""

    path: Path
    chunks: list[tuple[RelTag, LayerChunk]] = field(default_factory=list)
    _offset: int = 0

    def __post_init__(self) -> None:
        self._tmp = self.path.with_suffix(".tmp")
        self._f = open(self._tmp, "wb")

    def add(self, rel: RelTag, first_blk: int, npages: int, frame: bytes) -> None:
        self._f.write(frame)
        self.chunks.append((rel, LayerChunk(first_blk, npages, self._offset, len(frame))))
        self._offset += len(frame)

    @property
    def nbytes(self) -> int:
        return self._offset

    def finish(self) -> None:
        """Durable under its final name; the caller then commits the index."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def abandon(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


class LayerReader:
    """An open layer file; reads chunks by position. Open before the layer may be removed: an open
    file stays readable after its name is gone."""

    def __init__(self, layer: ImageLayer) -> None:
        self.layer = layer
        self._fd = os.open(layer.path, os.O_RDONLY)

    def frame(self, chunk: LayerChunk) -> bytes:
        data = os.pread(self._fd, chunk.length, chunk.offset)
        if len(data) != chunk.length:
            raise ImageLayerError(f"{self.layer.path} is shorter than its index ({chunk.offset}+{chunk.length})")
        return data

    def pages(self, chunk: LayerChunk) -> bytes:
        return decompress_pages(self.frame(chunk), chunk.npages)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
