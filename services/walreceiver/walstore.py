"""The walreceiver's durable copy of a timeline's WAL: segment files laid out as in `pg_wal`.

One directory per (tenant, timeline) holds `wal.json` (segment size, the
primary's timeline ID and system identifier) and segment files named as
Postgres names them (XLogFileName), each `seg_size` bytes, written at their
LSN's offset. So `pg_waldump -p DIR` reads them as it reads a pg_wal
directory.

The primary-side thread `write`s what streams in and `sync`s it (fdatasync
of every segment written since the last sync, and the directory when a
segment file was created); only then is the WAL durable. The feeder reads
back with `read`. Segments the page server has made durable are removed
with `remove_before`. After a crash, `valid_end` finds where the WAL that
survived ends: the end of the last complete, CRC-valid record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pgformat.constants import XLOG_BLCKSZ
from pgformat.errors import FormatError, WalEndOfData
from pgformat.lsn import format_lsn
from pgformat.xlogreader import (
    RawRecord,
    WalStreamReader,
    is_segment_file_name,
    parse_segment_file_name,
    segment_file_name,
)

log = logging.getLogger("zenith.walreceiver")

META_FILE: Final = "wal.json"
_READ_CHUNK: Final = 1 << 20


class WalStoreError(Exception):
    """The local WAL cannot be written, read or trusted; the message names the file."""


@dataclass(frozen=True)
class WalMeta:
    """What names and checks the segments of one timeline."""

    seg_size: int
    tli: int
    system_id: int
    origin_lsn: int = 0  # where the WAL kept here began: a record boundary
    origin_prev: int = 0  # start of the record before it (0: unknown)


class TimelineWal:
    """Segment files of one timeline under `path`; not thread-safe for writers (one primary thread)."""

    def __init__(self, path: Path, meta: WalMeta) -> None:
        self.path = Path(path)
        self.meta = meta
        self._fds: dict[int, int] = {}  # segment number -> fd open for writing
        self._dirty: set[int] = set()
        self._new_files = False

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> TimelineWal | None:
        """The timeline's WAL kept at `path`, or None when there is none yet."""
        try:
            doc = json.loads((Path(path) / META_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise WalStoreError(f"cannot read {Path(path) / META_FILE}: {e}") from None
        try:
            meta = WalMeta(int(doc["seg_size"]), int(doc["tli"]), int(doc["system_id"]), int(doc["origin_lsn"]),
                           int(doc["origin_prev"]))
        except (KeyError, TypeError, ValueError) as e:
            raise WalStoreError(f"{Path(path) / META_FILE}: bad contents ({e})") from None
        return cls(path, meta)

    @classmethod
    def create(cls, path: Path, meta: WalMeta) -> TimelineWal:
        """A new, empty WAL directory (any old one is replaced)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():
            if is_segment_file_name(f.name):
                f.unlink()
        tmp = path / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps({"seg_size": meta.seg_size, "tli": meta.tli, "system_id": meta.system_id,
                                   "origin_lsn": meta.origin_lsn, "origin_prev": meta.origin_prev}))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path / META_FILE)
        _fsync_dir(path)
        return cls(path, meta)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- segments -------------------------------------------------------------------------

    def segment_path(self, segno: int) -> Path:
        return self.path / segment_file_name(self.meta.tli, segno * self.meta.seg_size, self.meta.seg_size)

    def segments(self) -> list[int]:
        """Numbers of the segment files present, ascending."""
        out = []
        for f in self.path.iterdir():
            if is_segment_file_name(f.name):
                tli, start = parse_segment_file_name(f.name, self.meta.seg_size)
                if tli == self.meta.tli:
                    out.append(start // self.meta.seg_size)
        return sorted(out)

    def _fd(self, segno: int) -> int:
        fd = self._fds.get(segno)
        if fd is None:
            p = self.segment_path(segno)
            created = not p.exists()
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
            if created or os.fstat(fd).st_size < self.meta.seg_size:
                os.ftruncate(fd, self.meta.seg_size)  # full size, zeros (sparse): as pg_wal's files
                self._new_files = True
            # Writers only move forward: the files of older segments are done.
            for old in [s for s in self._fds if s < segno - 1]:
                if old not in self._dirty:
                    os.close(self._fds.pop(old))
            self._fds[segno] = fd
        return fd

    # -- writing ----------------------------------------------------------------------------

    def write(self, lsn: int, data: bytes | memoryview) -> None:
        """Put `data` at `lsn` (not durable until sync)."""
        seg_size = self.meta.seg_size
        view = memoryview(data)
        try:
            while view:
                segno, off = divmod(lsn, seg_size)
                n = min(len(view), seg_size - off)
                fd = self._fd(segno)
                written = os.pwrite(fd, view[:n], off)
                self._dirty.add(segno)
                view = view[written:]
                lsn += written
        except OSError as e:
            raise WalStoreError(f"cannot write WAL at {format_lsn(lsn)} to {self.path}: {e}") from None

    def sync(self) -> None:
        """Make everything written so far durable."""
        try:
            for segno in sorted(self._dirty):
                os.fdatasync(self._fds[segno])
            self._dirty.clear()
            if self._new_files:
                _fsync_dir(self.path)
                self._new_files = False
        except OSError as e:
            raise WalStoreError(f"cannot fsync WAL in {self.path}: {e}") from None

    def remove_before(self, lsn: int) -> int:
        """Delete the segments that end at or before the start of `lsn`'s segment; how many."""
        keep_from = lsn // self.meta.seg_size
        removed = 0
        for segno in self.segments():
            if segno >= keep_from:
                break
            fd = self._fds.pop(segno, None)
            if fd is not None:
                os.close(fd)
            self._dirty.discard(segno)
            self.segment_path(segno).unlink(missing_ok=True)
            removed += 1
        return removed

    # -- reading -----------------------------------------------------------------------------

    def read(self, lsn: int, n: int) -> bytes:
        """Up to `n` bytes from `lsn`, within one segment (fewer at its end); WalStoreError if missing."""
        segno, off = divmod(lsn, self.meta.seg_size)
        n = min(n, self.meta.seg_size - off)
        p = self.segment_path(segno)
        try:
            with open(p, "rb") as f:
                f.seek(off)
                return f.read(n)
        except FileNotFoundError:
            raise WalStoreError(f"WAL at {format_lsn(lsn)} is no longer kept ({p.name} was removed)") from None
        except OSError as e:
            raise WalStoreError(f"cannot read {p}: {e}") from None

    def has_header(self, seg_start: int) -> bool:
        """Whether the segment starting at `seg_start` begins with a written page header."""
        try:
            return any(self.read(seg_start, 4))
        except WalStoreError:
            return False

    def first_lsn(self) -> int | None:
        """Start of the oldest segment kept, or None if there is none."""
        segs = self.segments()
        return segs[0] * self.meta.seg_size if segs else None

    def scan_start(self) -> tuple[int, int]:
        """Where reading the WAL kept here can begin, and the start of the record before (0: unknown):
        the origin, or the first segment kept once older ones were removed."""
        first = self.first_lsn()
        if first is None or first <= self.meta.origin_lsn:
            return self.meta.origin_lsn, self.meta.origin_prev
        return first, 0

    def records(self, start: int, prev: int = 0) -> Iterator[RawRecord]:
        """The complete, CRC-valid records from `start` (a record boundary, or a page boundary) on,
        the first linking back to `prev` when known, up to where the valid WAL ends."""
        reader = WalStreamReader(start, self.meta.seg_size, expect_sysid=self.meta.system_id,
                                 prev_lsn=prev or None)
        pos = start
        try:
            while chunk := self.read(pos, _READ_CHUNK):
                pos += len(chunk)
                reader.feed(chunk)
                yield from reader.records()
        except (WalEndOfData, FormatError, WalStoreError):
            return  # the valid WAL ends here: what follows was never completely written

    def valid_end(self, start: int, prev: int = 0) -> tuple[int, int]:
        """(end, start of the last record) of `records(start, prev)`; (start, prev) when there is none."""
        end, last_start = start, prev
        for rec in self.records(start, prev):
            end, last_start = rec.end_lsn, rec.lsn
        return end, last_start


def page_start(lsn: int) -> int:
    return lsn - lsn % XLOG_BLCKSZ


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
