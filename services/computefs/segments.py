"""One relation segment file of a lazy compute: blocks from the page server until written, then local.

A `Segment` is a relation segment file (`base/5/16384.1`) that existed at the
compute's start LSN. Its blocks come from three places:

- a block the compute wrote (bit set in `written`) is read from the segment's
  local sparse file under the overlay directory;
- else a block below `remote_blocks` is the page server's page at the start LSN;
- else (an extension not written yet, or beyond a truncation) it is zeroes.

`remote_blocks` starts as the segment's size at the start LSN and only goes
down (a truncation); writes, extensions and truncations never reach the page
server. The bitmap is written beside the sparse file (`<file>.map`, temp file,
fsync, rename) whenever the segment is fsynced, after the sparse file itself.
The page server never serves a block the compute wrote: stock heap WAL does not
carry t_cid, so the compute must never read its own changes back from there.

All methods do local I/O only; fetching from the page server is the caller's
(fs.py), which hands the pages in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pgformat.constants import BLCKSZ
from pgformat.datadir import RELSEG_SIZE

ZERO_BLOCK: Final = bytes(BLCKSZ)


@dataclass(frozen=True, slots=True)
class RemoteFork:
    """Where a segment's blocks come from on the page server: the fork to read (an unlogged
    relation's main fork reads its init fork, as a clean start after a crash would reset it)."""

    spc: int
    db: int
    rel: int
    fork: int


@dataclass
class Segment:
    path: str  # relative to the filesystem root, e.g. base/5/16384_vm
    source: RemoteFork
    segno: int
    remote_blocks: int  # blocks [0, remote_blocks) not written locally come from the page server
    size: int  # bytes
    local_path: Path  # the sparse file (created on first write)
    mtime_ns: int = 0
    written: bytearray = field(default_factory=lambda: bytearray(RELSEG_SIZE // 8))
    _fd: int | None = None
    _dirty_map: bool = False

    # -- the block map --------------------------------------------------------------------

    def is_written(self, blk: int) -> bool:
        return bool(self.written[blk >> 3] & (1 << (blk & 7)))

    def _mark(self, blk: int) -> None:
        self.written[blk >> 3] |= 1 << (blk & 7)
        self._dirty_map = True

    def _unmark_from(self, blk: int) -> None:
        for b in range(blk, min(RELSEG_SIZE, -(-self.size // BLCKSZ) + 1)):
            self.written[b >> 3] &= ~(1 << (b & 7)) & 0xFF
        self._dirty_map = True

    def first_blkno(self) -> int:
        """The relation block number of this segment's block 0 (what the page server and checksums use)."""
        return self.segno * RELSEG_SIZE

    # -- reads ----------------------------------------------------------------------------

    def blocks_to_fetch(self, off: int, size: int) -> list[int]:
        """Blocks of [off, off + size) (clipped to the file) that only the page server has."""
        end = min(off + size, self.size)
        if end <= off:
            return []
        return [b for b in range(off // BLCKSZ, -(-end // BLCKSZ))
                if b < self.remote_blocks and not self.is_written(b)]

    def read(self, off: int, size: int, fetched: dict[int, bytes]) -> bytes:
        """Bytes [off, off + size) clipped to the file, with the page server's pages in `fetched`.

        A block written since the fetch began is read locally: the local copy always wins."""
        end = min(off + size, self.size)
        if end <= off:
            return b""
        first, last = off // BLCKSZ, -(-end // BLCKSZ)
        parts = []
        for b in range(first, last):
            if self.is_written(b):
                parts.append(self._read_local(b))
            elif b < self.remote_blocks:
                parts.append(fetched[b])
            else:
                parts.append(ZERO_BLOCK)
        data = b"".join(parts)
        start = off - first * BLCKSZ
        return data[start:start + (end - off)]

    def _read_local(self, blk: int) -> bytes:
        data = os.pread(self._open(), BLCKSZ, blk * BLCKSZ)
        return data + bytes(BLCKSZ - len(data)) if len(data) < BLCKSZ else data

    # -- writes ---------------------------------------------------------------------------

    def partial_blocks(self, off: int, size: int) -> list[int]:
        """Blocks a write of [off, off + size) covers only partly whose other bytes are the page
        server's: they must be fetched first (read-modify-write)."""
        out = []
        for b in {off // BLCKSZ, (off + size - 1) // BLCKSZ} if size else set():
            covered = off <= b * BLCKSZ and off + size >= (b + 1) * BLCKSZ
            if not covered and b < self.remote_blocks and not self.is_written(b):
                out.append(b)
        return sorted(out)

    def write(self, off: int, data: bytes, fetched: dict[int, bytes], now_ns: int) -> int:
        """Write `data` at `off` into the sparse file; `fetched` has the blocks partial_blocks named."""
        fd = self._open()
        for b, page in fetched.items():
            if not self.is_written(b):
                os.pwrite(fd, page, b * BLCKSZ)
                self._mark(b)
        # A block beyond remote_blocks that is not written yet is a hole of the sparse file (a
        # truncation cuts the file too), so the bytes this write leaves of it stay zeroes.
        end = off + len(data)
        for b in range(off // BLCKSZ, -(-end // BLCKSZ)):
            self._mark(b)
        written = os.pwrite(fd, data, off)
        self.size = max(self.size, end)
        self.mtime_ns = now_ns
        return written

    def truncate(self, size: int, fetched: dict[int, bytes], now_ns: int) -> None:
        """Cut or extend to `size` bytes; `fetched` has the partial last block if the page server held it."""
        if size % BLCKSZ:
            for b, page in fetched.items():
                os.pwrite(self._open(), page, b * BLCKSZ)
                self._mark(b)
        keep = -(-size // BLCKSZ)
        self._unmark_from(keep)
        self.remote_blocks = min(self.remote_blocks, size // BLCKSZ)
        if self._fd is not None:
            os.ftruncate(self._fd, size)
        self.size = size
        self.mtime_ns = now_ns

    # -- durability -----------------------------------------------------------------------

    def fsync(self) -> None:
        """The sparse file, then the block map (written whole, renamed into place)."""
        if self._fd is None:
            return
        os.fsync(self._fd)
        if self._dirty_map:
            map_path = self.local_path.with_name(self.local_path.name + ".map")
            tmp = map_path.with_name(map_path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, self.remote_blocks.to_bytes(4, "little") + bytes(self.written))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, map_path)
            dfd = os.open(self.local_path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._dirty_map = False

    def remove(self) -> None:
        """The segment was unlinked: drop its local files."""
        self.close()
        for p in (self.local_path, self.local_path.with_name(self.local_path.name + ".map")):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def local_bytes(self) -> int:
        """Disk the sparse file takes."""
        try:
            return os.stat(self.local_path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def _open(self) -> int:
        if self._fd is None:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.local_path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd
