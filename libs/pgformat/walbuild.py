"""Write WAL: a checkpoint record and the segment images that hold it (no I/O).

This is what pg_resetwal's WriteEmptyXLOG does (src/bin/pg_resetwal/pg_resetwal.c),
generalized to any LSN: a base backup at LSN L gets a shutdown checkpoint record
at L, and pg_control points at it, so a stock postgres starts as after a clean
shutdown and appends its own WAL right after the record.

Record layout from src/include/access/xlogrecord.h (header, then
XLR_BLOCK_ID_DATA_SHORT and the main data length, then the main data; CRC-32C
over the body then the header up to xl_crc). Page layout from
src/include/access/xlog_internal.h: every page starts with a header (the long
form on a segment's first page); a record continues across pages, each
continuation page flagged XLP_FIRST_IS_CONTRECORD with xlp_rem_len = the bytes
of the record still to come. Where the insert position of a new record falls
on a page boundary, the record starts after that page's header, as
ReserveXLogInsertLocation / CreateCheckPoint place it.

Bytes of the first page before the first record written here are WAL we do
not reproduce (earlier records): that page is flagged XLP_FIRST_IS_CONTRECORD
with xlp_rem_len covering them, so a reader that starts at the page boundary
(pg_waldump, XLogFindNextRecord, our WalStreamReader) skips to our record.
Postgres itself reads the checkpoint record by its LSN and never looks there.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .constants import DEFAULT_WAL_SEG_SIZE, XLOG_BLCKSZ, XLOG_PAGE_MAGIC, maxalign
from .controlfile import CheckPoint, write_checkpoint
from .errors import FormatError
from .rmgr import RM_XLOG_ID, XLOG_CHECKPOINT_ONLINE, XLOG_CHECKPOINT_SHUTDOWN
from .xlogreader import (
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_SHORT_PHD,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
)
from .xlogrecord import SIZE_OF_XLOG_RECORD, XLR_BLOCK_ID_DATA_LONG, XLR_BLOCK_ID_DATA_SHORT, record_crc

_RECORD_HEADER = struct.Struct("<IIQBBxxI")  # xl_tot_len, xl_xid, xl_prev, xl_info, xl_rmid, xl_crc
_SHORT_PHD = struct.Struct("<HHIQI")  # xlp_magic, xlp_info, xlp_tli, xlp_pageaddr, xlp_rem_len
_LONG_PHD_TAIL = struct.Struct("<QII")  # xlp_sysid, xlp_seg_size, xlp_xlog_blcksz


class WalBuildError(FormatError):
    """Inputs from which no valid WAL can be written."""


def build_record(rmid: int, info: int, main_data: bytes, xl_prev: int, xid: int = 0) -> bytes:
    """A record with main data only (no block references), CRC filled in.

    Main data under 256 bytes uses XLR_BLOCK_ID_DATA_SHORT, longer data
    XLR_BLOCK_ID_DATA_LONG, as XLogRecordAssemble chooses.
    """
    n = len(main_data)
    if n < 256:
        data_header = bytes((XLR_BLOCK_ID_DATA_SHORT, n))
    else:
        data_header = bytes((XLR_BLOCK_ID_DATA_LONG,)) + struct.pack("<I", n)
    tot_len = SIZE_OF_XLOG_RECORD + len(data_header) + n
    if not 0 <= xl_prev < 1 << 64:
        raise WalBuildError(f"xl_prev {xl_prev} out of range")
    raw = bytearray(_RECORD_HEADER.pack(tot_len, xid, xl_prev, info, rmid, 0))
    raw += data_header
    raw += main_data
    _RECORD_HEADER.pack_into(raw, 0, tot_len, xid, xl_prev, info, rmid, record_crc(raw))
    return bytes(raw)


def build_checkpoint_record(ckpt: CheckPoint, xl_prev: int, shutdown: bool = True) -> bytes:
    """An XLOG_CHECKPOINT_SHUTDOWN (or _ONLINE) record carrying `ckpt` (114 bytes)."""
    info = XLOG_CHECKPOINT_SHUTDOWN if shutdown else XLOG_CHECKPOINT_ONLINE
    return build_record(RM_XLOG_ID, info, write_checkpoint(ckpt), xl_prev)


def page_header_size(lsn: int, seg_size: int = DEFAULT_WAL_SEG_SIZE) -> int:
    """Size of the header of the page starting at `lsn` (XLogPageHeaderSize)."""
    return SIZE_OF_XLOG_LONG_PHD if lsn % seg_size == 0 else SIZE_OF_XLOG_SHORT_PHD


def record_start_for(insert_lsn: int, seg_size: int = DEFAULT_WAL_SEG_SIZE) -> int:
    """Where a record inserted at `insert_lsn` starts: after the page header when on a page boundary."""
    if insert_lsn % 8:
        raise WalBuildError(f"insert position {insert_lsn:X} is not MAXALIGNed")
    if insert_lsn % XLOG_BLCKSZ == 0:
        return insert_lsn + page_header_size(insert_lsn, seg_size)
    return insert_lsn


@dataclass(frozen=True, slots=True)
class WalSegmentImage:
    """A whole segment file: `start_lsn` is the LSN of its first byte."""

    start_lsn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WrittenWal:
    """Segments written, the LSN of each record placed, and where the next record goes."""

    segments: list[WalSegmentImage]
    record_lsns: list[int]
    end_lsn: int  # MAXALIGNed end of the last record (EndRecPtr)


def build_wal_segments(
    start_lsn: int,
    records: Sequence[bytes],
    timeline_id: int,
    system_identifier: int,
    seg_size: int = DEFAULT_WAL_SEG_SIZE,
) -> WrittenWal:
    """Lay `records` out consecutively (MAXALIGNed) from `start_lsn` into zero-filled segments.

    `start_lsn` is an insert position: on a page boundary the first record
    goes after the page header. Every page the records touch gets a valid
    header; the first page of each segment gets the long header even when no
    record byte lands on it, since Postgres validates it before reading
    anywhere in the segment (ReadPageInternal).
    """
    if seg_size <= 0 or seg_size & (seg_size - 1) or seg_size % XLOG_BLCKSZ:
        raise WalBuildError(f"invalid WAL segment size {seg_size}")
    if not records:
        raise WalBuildError("no records to write")
    if start_lsn % 8:
        raise WalBuildError(f"insert position {start_lsn:X} is not MAXALIGNed")
    images: dict[int, bytearray] = {}

    def put_header(page_lsn: int, info: int, rem_len: int) -> int:
        """Write the header of the page at `page_lsn`; return its size."""
        seg_start = page_lsn - page_lsn % seg_size
        img = images.get(seg_start)
        if img is None:
            img = images[seg_start] = bytearray(seg_size)
            _put_page_header(img, seg_start, seg_start, 0, 0, timeline_id, system_identifier, seg_size)
        return _put_page_header(img, seg_start, page_lsn, info, rem_len, timeline_id, system_identifier, seg_size)

    pos = start_lsn
    page = pos - pos % XLOG_BLCKSZ
    if pos != page:
        # Mid-page: what lies between the page header and `pos` is earlier WAL we do not write.
        tail = pos - page - page_header_size(page, seg_size)
        if tail < 0:
            raise WalBuildError(f"insert position {start_lsn:X} is inside a page header")
        put_header(page, XLP_FIRST_IS_CONTRECORD if tail else 0, tail)

    record_lsns: list[int] = []
    for raw in records:
        if len(raw) < SIZE_OF_XLOG_RECORD or _RECORD_HEADER.unpack_from(raw, 0)[0] != len(raw):
            raise WalBuildError("record bytes do not match their xl_tot_len")
        if pos % XLOG_BLCKSZ == 0:
            pos += put_header(pos, 0, 0)
        record_lsns.append(pos)
        done = 0
        while True:
            take = min(len(raw) - done, XLOG_BLCKSZ - pos % XLOG_BLCKSZ)
            img = images[pos - pos % seg_size]
            off = pos % seg_size
            img[off : off + take] = raw[done : done + take]
            done += take
            pos += take
            if done == len(raw):
                break
            pos += put_header(pos, XLP_FIRST_IS_CONTRECORD, len(raw) - done)
        pos = maxalign(pos)  # alignment padding never crosses a page: pages are multiples of 8
    segments = [WalSegmentImage(start, bytes(images[start])) for start in sorted(images)]
    return WrittenWal(segments, record_lsns, pos)


def _put_page_header(
    img: bytearray, seg_start: int, page_lsn: int, info: int, rem_len: int, tli: int, sysid: int, seg_size: int
) -> int:
    off = page_lsn - seg_start
    if page_lsn % seg_size == 0:
        info |= XLP_LONG_HEADER
    _SHORT_PHD.pack_into(img, off, XLOG_PAGE_MAGIC, info, tli, page_lsn, rem_len)
    if info & XLP_LONG_HEADER:
        _LONG_PHD_TAIL.pack_into(img, off + 24, sysid, seg_size, XLOG_BLCKSZ)
        return SIZE_OF_XLOG_LONG_PHD
    return SIZE_OF_XLOG_SHORT_PHD


