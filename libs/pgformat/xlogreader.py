"""Reassemble WAL records from a byte stream (replication messages or segment files).

Page and segment layout from src/include/access/xlog_internal.h; the walk
(page headers, continuation records, XLOG_SWITCH, overwritten contrecords)
follows XLogReadRecord / XLogReaderValidatePageHeader in
src/backend/access/transam/xlogreader.c.

`WalStreamReader` takes bytes in chunks of any size, starting at any LSN
(a page boundary or a record start), and yields complete, CRC-checked raw
records. A record split across chunks, pages or segments is held back until
its last byte arrives: a truncated stream yields no partial record and picks
up when more bytes come.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import google_crc32c

from .constants import DEFAULT_WAL_SEG_SIZE, XLOG_BLCKSZ, XLOG_PAGE_MAGIC
from .errors import WalEndOfData, WalPageHeaderError, WalRecordError
from .lsn import format_lsn
from .xlogrecord import (
    SIZE_OF_XLOG_RECORD,
    DecodedRecord,
    XLogRecordHeader,
    check_record_crc,
    decode_record,
    parse_record_header,
)

# xlp_info bits
XLP_FIRST_IS_CONTRECORD: Final = 0x0001
XLP_LONG_HEADER: Final = 0x0002
XLP_BKP_REMOVABLE: Final = 0x0004
XLP_FIRST_IS_OVERWRITE_CONTRECORD: Final = 0x0008
XLP_ALL_FLAGS: Final = 0x000F

SIZE_OF_XLOG_SHORT_PHD: Final = 24  # MAXALIGN(sizeof(XLogPageHeaderData))
SIZE_OF_XLOG_LONG_PHD: Final = 40  # MAXALIGN(sizeof(XLogLongPageHeaderData))

RM_XLOG_ID: Final = 0
XLOG_SWITCH: Final = 0x40

_SHORT_PHD = struct.Struct("<HHIQI")
_U32 = struct.Struct("<I")
_unpack_header = struct.Struct("<IIQBBxxI").unpack_from
_make_header = XLogRecordHeader._make
_crc_value = google_crc32c.value
_crc_extend = google_crc32c.extend
_LONG_PHD_TAIL = struct.Struct("<QII")


@dataclass(frozen=True, slots=True)
class WalPageHeader:
    """XLogPageHeaderData, plus the XLogLongPageHeaderData fields on a segment's first page."""

    magic: int
    info: int
    tli: int
    pageaddr: int
    rem_len: int
    sysid: int | None = None
    seg_size: int | None = None
    xlog_blcksz: int | None = None

    @property
    def size(self) -> int:
        return SIZE_OF_XLOG_LONG_PHD if self.info & XLP_LONG_HEADER else SIZE_OF_XLOG_SHORT_PHD


def parse_page_header(buf: bytes | memoryview, offset: int = 0, lsn: int = 0) -> WalPageHeader:
    """Read a page header at `offset` (the long form when XLP_LONG_HEADER is set)."""
    if len(buf) - offset < SIZE_OF_XLOG_SHORT_PHD:
        raise WalPageHeaderError(lsn, "page header truncated")
    magic, info, tli, pageaddr, rem_len = _SHORT_PHD.unpack_from(buf, offset)
    if info & XLP_LONG_HEADER:
        if len(buf) - offset < SIZE_OF_XLOG_LONG_PHD:
            raise WalPageHeaderError(lsn, "long page header truncated")
        sysid, seg_size, blcksz = _LONG_PHD_TAIL.unpack_from(buf, offset + 24)
        return WalPageHeader(magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz)
    return WalPageHeader(magic, info, tli, pageaddr, rem_len)


def next_record_starts(end_lsn: int) -> tuple[int, ...]:
    """Where the record after one ending at `end_lsn` (its EndRecPtr) can start.

    Records follow each other MAXALIGNed in the page; a record that ends on a
    page boundary (or an XLOG_SWITCH, whose end is its segment's end) is
    followed by a page header: short, or long on a segment's first page
    (xlogreader.c XLogDecodeNextRecord). Without the segment size both
    header sizes are possible there.
    """
    if end_lsn % XLOG_BLCKSZ:
        return (end_lsn,)
    return (end_lsn + SIZE_OF_XLOG_SHORT_PHD, end_lsn + SIZE_OF_XLOG_LONG_PHD)


@dataclass(slots=True)
class RawRecord:
    """A complete, CRC-checked record: its bytes and where it starts and ends.

    `end_lsn` is Postgres's EndRecPtr: the MAXALIGNed end of the record (what
    becomes the LSN of the pages it changes), or for XLOG_SWITCH the end of
    its segment.
    """

    lsn: int
    end_lsn: int
    data: bytes
    header: XLogRecordHeader | None = None

    def decode(self) -> DecodedRecord:
        return decode_record(self.data, self.lsn, self.end_lsn, verify_crc=False, header=self.header)


class WalStreamReader:
    """Incremental WAL reader: `feed()` bytes, then iterate `records()`.

    `start_lsn` is the LSN of the first byte fed. Starting in the middle of a
    page is allowed only at a record start; starting at a page boundary that
    begins with the tail of an earlier record skips that tail.
    """

    def __init__(
        self,
        start_lsn: int,
        seg_size: int = DEFAULT_WAL_SEG_SIZE,
        verify_crc: bool = True,
        expect_sysid: int | None = None,
        prev_lsn: int | None = None,
    ) -> None:
        """`prev_lsn`: the start of the record before `start_lsn`, when known: the first record's
        xl_prev must point there (a gap or a fork of the WAL is an error)."""
        if seg_size <= 0 or seg_size & (seg_size - 1) or seg_size % XLOG_BLCKSZ:
            raise ValueError(f"invalid WAL segment size {seg_size}")
        self.seg_size = seg_size
        self.verify_crc = verify_crc
        self.sysid = expect_sysid
        self.tli: int | None = None
        self._buf = bytearray()
        self._off = 0  # index in _buf of the byte at LSN _pos
        self._pos = start_lsn  # LSN of the next unconsumed byte
        # At a page boundary we may be handed the tail of a record that began earlier.
        self._skip_contrecord = start_lsn % XLOG_BLCKSZ == 0
        self._rec: bytearray | None = None  # partial record being assembled
        self._rec_lsn = 0
        self._rec_len = 0
        self._prev_lsn: int | None = prev_lsn  # start of the previous record, for xl_prev checks
        self._after_switch = False
        self._error: Exception | None = None
        self._owed = 0  # bytes already skipped (e.g. padding) that were not fed yet

    @property
    def position(self) -> int:
        """LSN of the next byte the reader expects to be fed."""
        return self._pos - self._owed + (len(self._buf) - self._off)

    @property
    def next_record_lsn(self) -> int:
        """Where the next record to be yielded starts (or its first byte once fed)."""
        return self._rec_lsn if self._rec is not None else self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._off > 1 << 20:
            del self._buf[: self._off]
            self._off = 0
        if self._owed:
            drop = min(self._owed, len(data))
            self._owed -= drop
            data = memoryview(data)[drop:]
        self._buf += data

    def records(self) -> Iterator[RawRecord]:
        """Yield every record completed by the bytes fed so far.

        A reader that raised stays broken: bad WAL is never skipped silently.
        """
        if self._error is not None:
            raise self._error
        try:
            yield from self._records()
        except (WalRecordError, WalPageHeaderError) as e:
            self._error = e
            raise

    def _records(self) -> Iterator[RawRecord]:
        buf = self._buf
        blcksz = XLOG_BLCKSZ
        while True:
            avail = len(buf) - self._off
            pos = self._pos
            in_page = pos % blcksz
            if in_page == 0:
                if self._after_switch and pos % self.seg_size != 0:
                    # The rest of a segment after XLOG_SWITCH is unused.
                    skip = min(avail, self.seg_size - pos % self.seg_size)
                    if skip == 0:
                        return
                    self._consume(skip)
                    continue
                if not self._read_page_header(avail):
                    return
                continue
            if self._after_switch:
                skip = min(avail, blcksz - in_page)
                if skip == 0:
                    return
                self._consume(skip)
                continue
            page_left = blcksz - in_page
            if self._rec is None:
                # At a record start: records are MAXALIGNed, so xl_tot_len is on this page.
                if avail < 4:
                    return
                start = self._off
                tot_len = _U32.unpack_from(buf, start)[0]
                if tot_len == 0:
                    raise WalEndOfData(pos, "invalid record length: wanted 24, got 0")
                if tot_len < SIZE_OF_XLOG_RECORD:
                    raise WalRecordError(pos, f"invalid record length: wanted 24, got {tot_len}")
                if tot_len <= page_left:
                    # Fast path: the whole record lies on this page. Inlined
                    # (no _finish/_consume calls): this runs once per record.
                    if avail < tot_len:
                        return
                    raw = bytes(buf[start : start + tot_len])
                    header = _make_header(_unpack_header(raw))
                    rmid = header[4]
                    if 21 < rmid < 128:
                        raise WalRecordError(pos, f"invalid resource manager ID {rmid}")
                    if self._prev_lsn is not None and header[2] != self._prev_lsn:
                        raise WalRecordError(
                            pos,
                            f"record with incorrect prev-link {format_lsn(header[2])}, "
                            f"expected {format_lsn(self._prev_lsn)}",
                        )
                    if self.verify_crc and _crc_extend(_crc_value(raw[24:]), raw[:20]) != header[5]:
                        check_record_crc(raw, pos)  # raises with the full message
                    self._prev_lsn = pos
                    # Padding to the next MAXALIGNed start never crosses a page.
                    step = (tot_len + 7) & ~7
                    end = pos + step
                    if step <= avail:
                        self._off = start + step
                        self._pos = end
                    else:
                        self._off = start + tot_len
                        self._pos = pos + tot_len
                        self._skip(step - tot_len)
                    if rmid == RM_XLOG_ID and (header[3] & 0xF0) == XLOG_SWITCH:
                        self._after_switch = True
                        end = self._segment_end(pos)
                    yield RawRecord(pos, end, raw, header)
                    continue
                self._rec = bytearray()
                self._rec_lsn = pos
                self._rec_len = tot_len
            # Continue the partial record with what this page holds.
            rec = self._rec
            want = self._rec_len - len(rec)
            take = min(want, page_left, avail)
            if take == 0:
                return
            rec += buf[self._off : self._off + take]
            self._consume(take)
            if len(rec) >= SIZE_OF_XLOG_RECORD and len(rec) - take < SIZE_OF_XLOG_RECORD:
                # The header is complete now: validate it before gathering more pages.
                parse_record_header(rec, self._rec_lsn)
            if len(rec) == self._rec_len:
                self._rec = None
                yield self._finish(self._rec_lsn, bytes(rec))

    def _consume(self, n: int) -> None:
        self._off += n
        self._pos += n

    def _finish(self, lsn: int, raw: bytes) -> RawRecord:
        """Validate a complete record, advance past its alignment padding, return it."""
        end = self._pos
        header = parse_record_header(raw, lsn)
        if self._prev_lsn is not None and header.prev != self._prev_lsn:
            raise WalRecordError(
                lsn, f"record with incorrect prev-link {format_lsn(header.prev)}, expected {format_lsn(self._prev_lsn)}"
            )
        if self.verify_crc:
            check_record_crc(raw, lsn)
        self._prev_lsn = lsn
        # The next record starts MAXALIGNed; padding never crosses a page.
        pad = (-end) & 7
        if pad:
            self._skip(pad)
        end += pad
        if header.rmid == RM_XLOG_ID and (header.info & 0xF0) == XLOG_SWITCH:
            self._after_switch = True
            end = self._segment_end(lsn)
        return RawRecord(lsn, end, raw, header)

    def _segment_end(self, lsn: int) -> int:
        return (lsn // self.seg_size + 1) * self.seg_size

    def _skip(self, n: int) -> None:
        """Skip n bytes of the stream, including bytes not fed yet (dropped on arrival)."""
        avail = len(self._buf) - self._off
        if n <= avail:
            self._consume(n)
            return
        self._consume(avail)
        self._pos += n - avail
        self._owed += n - avail

    def _read_page_header(self, avail: int) -> bool:
        """Validate and consume the page header at the current page boundary."""
        pos = self._pos
        seg_start = pos % self.seg_size == 0
        need = SIZE_OF_XLOG_LONG_PHD if seg_start else SIZE_OF_XLOG_SHORT_PHD
        if avail < need:
            return False
        hdr = parse_page_header(self._buf, self._off, pos)
        if hdr.magic != XLOG_PAGE_MAGIC:
            raise WalPageHeaderError(pos, f"invalid magic number {hdr.magic:04X} (expected {XLOG_PAGE_MAGIC:04X})")
        if hdr.info & ~XLP_ALL_FLAGS:
            raise WalPageHeaderError(pos, f"invalid info bits {hdr.info:04X}")
        if seg_start != bool(hdr.info & XLP_LONG_HEADER):
            raise WalPageHeaderError(
                pos, "long page header expected at segment start" if seg_start else "unexpected long page header"
            )
        if hdr.pageaddr != pos:
            raise WalPageHeaderError(pos, f"unexpected pageaddr {format_lsn(hdr.pageaddr)}")
        if seg_start:
            if hdr.seg_size != self.seg_size:
                raise WalPageHeaderError(pos, f"WAL segment size {hdr.seg_size} in page header, expected {self.seg_size}")
            if hdr.xlog_blcksz != XLOG_BLCKSZ:
                raise WalPageHeaderError(pos, f"XLOG_BLCKSZ {hdr.xlog_blcksz} in page header, expected {XLOG_BLCKSZ}")
            if self.sysid is None:
                self.sysid = hdr.sysid
            elif hdr.sysid != self.sysid:
                raise WalPageHeaderError(pos, f"WAL file is from a different database system: {hdr.sysid}")
        if self.tli is not None and hdr.tli < self.tli:
            raise WalPageHeaderError(pos, f"out-of-sequence timeline ID {hdr.tli} (after {self.tli})")
        self.tli = hdr.tli
        self._consume(need)
        self._after_switch = False

        if self._rec is not None:
            if hdr.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD and not hdr.info & XLP_FIRST_IS_CONTRECORD:
                # The primary crashed mid-record and wrote XLOG_OVERWRITE_CONTRECORD
                # here: the partial record is abandoned, a new one starts.
                self._rec = None
                self._prev_lsn = None
                return True
            if not hdr.info & XLP_FIRST_IS_CONTRECORD:
                raise WalPageHeaderError(pos, f"there is no contrecord flag for the record at {format_lsn(self._rec_lsn)}")
            left = self._rec_len - len(self._rec)
            if hdr.rem_len != left:
                raise WalPageHeaderError(
                    pos, f"invalid contrecord length {hdr.rem_len} (expected {left}) for the record at {format_lsn(self._rec_lsn)}"
                )
        elif hdr.info & XLP_FIRST_IS_CONTRECORD:
            if not self._skip_contrecord:
                raise WalPageHeaderError(pos, "unexpected contrecord flag between records")
            # We started in the middle of a record: skip its tail on this page
            # (and on later pages, while they still carry it).
            tail = hdr.rem_len
            page_room = XLOG_BLCKSZ - need
            if tail >= page_room:
                self._skip(page_room)
                return True
            self._skip((tail + 7) & ~7)
            self._skip_contrecord = False
            return True
        self._skip_contrecord = False
        return True


_SEGMENT_NAME = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")


def parse_segment_file_name(name: str, seg_size: int = DEFAULT_WAL_SEG_SIZE) -> tuple[int, int]:
    """XLogFromFileName: 'TTTTTTTTXXXXXXXXYYYYYYYY' -> (timeline, segment start LSN)."""
    m = _SEGMENT_NAME.match(os.path.basename(name))
    if not m:
        raise ValueError(f"{name!r} is not a WAL segment file name")
    tli, log, seg = (int(g, 16) for g in m.groups()[:3])
    segs_per_xlogid = 0x100000000 // seg_size
    if seg >= segs_per_xlogid:
        raise ValueError(f"{name!r}: segment number {seg:X} out of range for {seg_size}-byte segments")
    return tli, (log * segs_per_xlogid + seg) * seg_size


def segment_file_name(tli: int, lsn: int, seg_size: int = DEFAULT_WAL_SEG_SIZE) -> str:
    """XLogFileName for the segment holding `lsn`."""
    segno = lsn // seg_size
    segs_per_xlogid = 0x100000000 // seg_size
    return f"{tli:08X}{segno // segs_per_xlogid:08X}{segno % segs_per_xlogid:08X}"


def is_segment_file_name(name: str) -> bool:
    return _SEGMENT_NAME.match(os.path.basename(name)) is not None


def iter_segment_records(
    segments: Iterable[tuple[int, bytes]],
    seg_size: int = DEFAULT_WAL_SEG_SIZE,
    verify_crc: bool = True,
) -> Iterator[RawRecord]:
    """Records from consecutive whole segments given as (start LSN, bytes).

    Stops quietly at the end of written WAL (zeroes, or a recycled page from an
    older segment); any other bad WAL raises. A gap between segments ends
    the run of records, as it would for pg_waldump.
    """
    reader: WalStreamReader | None = None
    for start, data in segments:
        if reader is None:
            reader = WalStreamReader(start, seg_size, verify_crc)
        elif reader.position != start:
            return
        reader.feed(data)
        try:
            yield from reader.records()
        except WalEndOfData:
            return
        except WalPageHeaderError as e:
            if e.reason.startswith("unexpected pageaddr") or e.reason.startswith("invalid magic number 0000"):
                return  # a recycled or zeroed page: the end of what was written
            raise
