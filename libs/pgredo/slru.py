"""SLRU redo: pg_xact, pg_multixact/offsets, pg_multixact/members and pg_commit_ts pages from WAL.

SLRU pages are plain 8 KB arrays without a page header or LSN; no record
registers them as block references. Which pages a record changes, and how,
follows the rmgr redo routines of PostgreSQL 15:

- Transaction (xact_redo in src/backend/access/transam/xact.c): COMMIT,
  COMMIT_PREPARED, ABORT and ABORT_PREPARED set the clog status of the
  transaction and its subtransactions (TransactionIdSetTreeStatus in clog.c:
  the final state of every xid of the tree is COMMITTED, or ABORTED); commits
  also set commit timestamps when the commit_ts module is active
  (TransactionTreeSetCommitTsData in commit_ts.c). The records are parsed as
  ParseCommitRecord / ParseAbortRecord in src/backend/access/rmgrdesc/xactdesc.c
  do. PREPARE, ASSIGNMENT and INVALIDATIONS change no SLRU page.
- CLOG (clog_redo in clog.c): ZEROPAGE, TRUNCATE.
- MultiXact (multixact_redo / RecordNewMultiXact in multixact.c):
  ZERO_OFF_PAGE, ZERO_MEM_PAGE, CREATE_ID, TRUNCATE_ID. As in the recent
  PostgreSQL 15 minor releases (the 15.18 we test with does it), CREATE_ID
  also stores the next multixact's starting offset (offset + nmembers,
  skipping 0), which can be on the next offsets page.
- CommitTs (commit_ts_redo in commit_ts.c): ZEROPAGE, TRUNCATE.

Truncation removes whole segment files and changes no page: see
:func:`slru_truncations` and :func:`slru_segments_to_delete`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pgformat.constants import BLCKSZ
from pgformat.rmgr import (
    CLOG_TRUNCATE,
    CLOG_ZEROPAGE,
    COMMIT_TS_TRUNCATE,
    COMMIT_TS_ZEROPAGE,
    RM_CLOG_ID,
    RM_COMMIT_TS_ID,
    RM_MULTIXACT_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    XLOG_MULTIXACT_CREATE_ID,
    XLOG_MULTIXACT_TRUNCATE_ID,
    XLOG_MULTIXACT_ZERO_MEM_PAGE,
    XLOG_MULTIXACT_ZERO_OFF_PAGE,
    XLOG_PARAMETER_CHANGE,
    XLOG_XACT_ABORT,
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_HAS_INFO,
    XLOG_XACT_OPMASK,
)
from pgformat.xlogrecord import DecodedRecord, RelFileNode

from .errors import RedoFailedError, UnsupportedRecordError

# --- slru.h / the SLRU directories --------------------------------------------------

SLRU_PAGES_PER_SEGMENT: Final = 32


class SlruKind(enum.IntEnum):
    """The WAL-logged SLRUs (pg_subtrans and pg_serial are not WAL-logged)."""

    CLOG = 0
    MULTIXACT_OFFSETS = 1
    MULTIXACT_MEMBERS = 2
    COMMIT_TS = 3

    @property
    def dirname(self) -> str:
        """The directory under the data directory that holds its segment files."""
        return _SLRU_DIRS[self]


_SLRU_DIRS: Final = {
    SlruKind.CLOG: "pg_xact",
    SlruKind.MULTIXACT_OFFSETS: "pg_multixact/offsets",
    SlruKind.MULTIXACT_MEMBERS: "pg_multixact/members",
    SlruKind.COMMIT_TS: "pg_commit_ts",
}


def slru_segment_filename(kind: SlruKind, segno: int) -> str:
    """Path of a segment file relative to the data directory (SlruFileName: %04X)."""
    return f"{kind.dirname}/{segno:04X}"


@dataclass(frozen=True, slots=True, order=True)
class SlruPageTag:
    """One SLRU page: `segno` is the segment file, `pageno` the page inside it (0..31)."""

    kind: SlruKind
    segno: int
    pageno: int

    @classmethod
    def for_page(cls, kind: SlruKind, abs_pageno: int) -> SlruPageTag:
        """The tag of absolute page number `abs_pageno` (the C code's `pageno`)."""
        segno, pageno = divmod(abs_pageno, SLRU_PAGES_PER_SEGMENT)
        return cls(kind, segno, pageno)

    @property
    def abs_pageno(self) -> int:
        return self.segno * SLRU_PAGES_PER_SEGMENT + self.pageno

    @property
    def path(self) -> str:
        return slru_segment_filename(self.kind, self.segno)

    @property
    def file_offset(self) -> int:
        """Byte offset of the page inside its segment file."""
        return self.pageno * BLCKSZ

    def __str__(self) -> str:
        return f"{self.path} page {self.pageno}"


# --- clog.c ------------------------------------------------------------------------

CLOG_BITS_PER_XACT: Final = 2
CLOG_XACTS_PER_BYTE: Final = 4
CLOG_XACTS_PER_PAGE: Final = BLCKSZ * CLOG_XACTS_PER_BYTE
CLOG_XACT_BITMASK: Final = (1 << CLOG_BITS_PER_XACT) - 1

# clog.h: XidStatus values.
TRANSACTION_STATUS_IN_PROGRESS: Final = 0x00
TRANSACTION_STATUS_COMMITTED: Final = 0x01
TRANSACTION_STATUS_ABORTED: Final = 0x02
TRANSACTION_STATUS_SUB_COMMITTED: Final = 0x03

# --- commit_ts.c ---------------------------------------------------------------------

# CommitTimestampEntry {TimestampTz time; RepOriginId nodeid}, packed to 8 + 2 bytes.
SIZE_OF_COMMIT_TIMESTAMP_ENTRY: Final = 10
COMMIT_TS_XACTS_PER_PAGE: Final = BLCKSZ // SIZE_OF_COMMIT_TIMESTAMP_ENTRY
INVALID_REP_ORIGIN_ID: Final = 0

# --- multixact.c ---------------------------------------------------------------------

FIRST_MULTIXACT_ID: Final = 1
MAX_MULTIXACT_ID: Final = 0xFFFFFFFF
MAX_MULTIXACT_OFFSET: Final = 0xFFFFFFFF
MULTIXACT_OFFSETS_PER_PAGE: Final = BLCKSZ // 4
MXACT_MEMBER_BITS_PER_XACT: Final = 8
MULTIXACT_FLAGBYTES_PER_GROUP: Final = 4
MULTIXACT_MEMBERS_PER_MEMBERGROUP: Final = MULTIXACT_FLAGBYTES_PER_GROUP
MULTIXACT_MEMBERGROUP_SIZE: Final = 4 * MULTIXACT_MEMBERS_PER_MEMBERGROUP + MULTIXACT_FLAGBYTES_PER_GROUP
MULTIXACT_MEMBERGROUPS_PER_PAGE: Final = BLCKSZ // MULTIXACT_MEMBERGROUP_SIZE
MULTIXACT_MEMBERS_PER_PAGE: Final = MULTIXACT_MEMBERGROUPS_PER_PAGE * MULTIXACT_MEMBERS_PER_MEMBERGROUP
# multixact.h: MultiXactStatusUpdate, the largest member status.
MAX_MULTIXACT_STATUS: Final = 0x05

# transam.h
FIRST_NORMAL_TRANSACTION_ID: Final = 3

# --- xact.h ----------------------------------------------------------------------------

XACT_XINFO_HAS_DBINFO: Final = 1 << 0
XACT_XINFO_HAS_SUBXACTS: Final = 1 << 1
XACT_XINFO_HAS_RELFILENODES: Final = 1 << 2
XACT_XINFO_HAS_INVALS: Final = 1 << 3
XACT_XINFO_HAS_TWOPHASE: Final = 1 << 4
XACT_XINFO_HAS_ORIGIN: Final = 1 << 5
XACT_XINFO_HAS_AE_LOCKS: Final = 1 << 6
XACT_XINFO_HAS_GID: Final = 1 << 7
XACT_XINFO_HAS_DROPPED_STATS: Final = 1 << 8

_SIZE_OF_RELFILENODE: Final = 12
_SIZE_OF_STATS_ITEM: Final = 12  # xl_xact_stats_item {int kind; Oid dboid; Oid objoid}
_SIZE_OF_INVAL_MESSAGE: Final = 16  # SharedInvalidationMessage

_XLR_RMGR_INFO_MASK: Final = 0xF0

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_DBINFO = struct.Struct("<II")
_ORIGIN = struct.Struct("<Qq")  # xl_xact_origin {XLogRecPtr origin_lsn; TimestampTz origin_timestamp}
_COMMIT_TS_ENTRY = struct.Struct("<qH")
_CLOG_TRUNCATE = struct.Struct("<iII")  # xl_clog_truncate {int pageno; TransactionId oldestXact; Oid oldestXactDb}
_COMMIT_TS_TRUNCATE = struct.Struct("<iI")  # xl_commit_ts_truncate {int pageno; TransactionId oldestXid}
_MULTIXACT_CREATE = struct.Struct("<IIi")  # xl_multixact_create {mid, moff, nmembers}
_MULTIXACT_MEMBER = struct.Struct("<II")  # MultiXactMember {TransactionId xid; MultiXactStatus status}
_MULTIXACT_TRUNCATE = struct.Struct("<IIIII")  # oldestMultiDB, start/endTruncOff, start/endTruncMemb
# xlog_internal.h: xl_parameter_change, six ints then wal_log_hints, track_commit_timestamp.
_PARAM_TRACK_COMMIT_TS_OFFSET: Final = 25


# --- page locations ----------------------------------------------------------------


def clog_page_for_xid(xid: int) -> tuple[int, int]:
    """(segno, page in segment) of the clog page holding `xid`'s status."""
    return divmod(xid // CLOG_XACTS_PER_PAGE, SLRU_PAGES_PER_SEGMENT)


def commit_ts_page_for_xid(xid: int) -> tuple[int, int]:
    """(segno, page in segment) of the commit_ts page holding `xid`'s entry."""
    return divmod(xid // COMMIT_TS_XACTS_PER_PAGE, SLRU_PAGES_PER_SEGMENT)


def multixact_offsets_page_for_multi(multi: int) -> tuple[int, int]:
    """(segno, page in segment) of the offsets page holding `multi`'s starting offset."""
    return divmod(multi // MULTIXACT_OFFSETS_PER_PAGE, SLRU_PAGES_PER_SEGMENT)


def multixact_members_page_for_offset(offset: int) -> tuple[int, int]:
    """(segno, page in segment) of the members page holding member `offset`."""
    return divmod(offset // MULTIXACT_MEMBERS_PER_PAGE, SLRU_PAGES_PER_SEGMENT)


def _clog_abs_page(xid: int) -> int:
    return xid // CLOG_XACTS_PER_PAGE


def _commit_ts_abs_page(xid: int) -> int:
    return xid // COMMIT_TS_XACTS_PER_PAGE


def _members_abs_page(offset: int) -> int:
    return offset // MULTIXACT_MEMBERS_PER_PAGE


def clog_get_status(page: bytes | bytearray, xid: int) -> int:
    """The 2-bit status of `xid` on its clog page (TransactionIdGetStatus)."""
    idx = xid % CLOG_XACTS_PER_PAGE
    return (page[idx // CLOG_XACTS_PER_BYTE] >> ((idx % CLOG_XACTS_PER_BYTE) * CLOG_BITS_PER_XACT)) & CLOG_XACT_BITMASK


def commit_ts_get_entry(page: bytes | bytearray, xid: int) -> tuple[int, int]:
    """(timestamp, nodeid) of `xid` on its commit_ts page."""
    t, nodeid = _COMMIT_TS_ENTRY.unpack_from(page, (xid % COMMIT_TS_XACTS_PER_PAGE) * SIZE_OF_COMMIT_TIMESTAMP_ENTRY)
    return int(t), int(nodeid)


def multixact_get_offset(page: bytes | bytearray, multi: int) -> int:
    """The starting member offset stored for `multi` on its offsets page."""
    return int(_U32.unpack_from(page, (multi % MULTIXACT_OFFSETS_PER_PAGE) * 4)[0])


def multixact_get_member(page: bytes | bytearray, offset: int) -> tuple[int, int]:
    """(xid, status) of member `offset` on its members page."""
    flagsoff = _members_flags_offset(offset)
    sub = offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP
    xid = _U32.unpack_from(page, flagsoff + MULTIXACT_FLAGBYTES_PER_GROUP + 4 * sub)[0]
    return int(xid), page[flagsoff + sub]


def _members_flags_offset(offset: int) -> int:
    """MXOffsetToFlagsOffset: byte offset of the member's group on its page."""
    return ((offset // MULTIXACT_MEMBERS_PER_MEMBERGROUP) % MULTIXACT_MEMBERGROUPS_PER_PAGE) * MULTIXACT_MEMBERGROUP_SIZE


# --- xact record parsing (xactdesc.c) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedXact:
    """xl_xact_parsed_commit / xl_xact_parsed_abort (xact.h)."""

    xact_time: int
    xinfo: int
    db_id: int
    ts_id: int
    subxacts: tuple[int, ...]
    rels: tuple[RelFileNode, ...]
    nstats: int
    nmsgs: int
    twophase_xid: int
    twophase_gid: str
    origin_lsn: int
    origin_timestamp: int


class _Truncated(Exception):
    pass


def _parse_xact(info: int, data: bytes, is_commit: bool) -> ParsedXact:
    """ParseCommitRecord / ParseAbortRecord: the optional parts follow in xact.h order."""
    end = len(data)

    def need(pos: int, n: int) -> None:
        if pos + n > end:
            raise _Truncated(f"needs {pos + n} bytes, record main data has {end}")

    need(0, 8)
    xact_time = _I64.unpack_from(data, 0)[0]
    pos = 8
    xinfo = 0
    if info & XLOG_XACT_HAS_INFO:
        need(pos, 4)
        xinfo = _U32.unpack_from(data, pos)[0]
        pos += 4
    db_id = ts_id = 0
    if xinfo & XACT_XINFO_HAS_DBINFO:
        need(pos, 8)
        db_id, ts_id = _DBINFO.unpack_from(data, pos)
        pos += 8
    subxacts: tuple[int, ...] = ()
    if xinfo & XACT_XINFO_HAS_SUBXACTS:
        need(pos, 4)
        n = _I32.unpack_from(data, pos)[0]
        pos += 4
        need(pos, 4 * n)
        subxacts = struct.unpack_from(f"<{n}I", data, pos) if n > 0 else ()
        pos += 4 * n
    rels: tuple[RelFileNode, ...] = ()
    if xinfo & XACT_XINFO_HAS_RELFILENODES:
        need(pos, 4)
        n = _I32.unpack_from(data, pos)[0]
        pos += 4
        need(pos, _SIZE_OF_RELFILENODE * n)
        flat = struct.unpack_from(f"<{3 * n}I", data, pos) if n > 0 else ()
        rels = tuple(RelFileNode(*flat[i : i + 3]) for i in range(0, len(flat), 3))
        pos += _SIZE_OF_RELFILENODE * n
    nstats = 0
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS:
        need(pos, 4)
        nstats = _I32.unpack_from(data, pos)[0]
        pos += 4 + _SIZE_OF_STATS_ITEM * nstats
    nmsgs = 0
    if is_commit and xinfo & XACT_XINFO_HAS_INVALS:
        need(pos, 4)
        nmsgs = _I32.unpack_from(data, pos)[0]
        pos += 4 + _SIZE_OF_INVAL_MESSAGE * nmsgs
    twophase_xid = 0
    gid = ""
    if xinfo & XACT_XINFO_HAS_TWOPHASE:
        need(pos, 4)
        twophase_xid = _U32.unpack_from(data, pos)[0]
        pos += 4
        if xinfo & XACT_XINFO_HAS_GID:
            nul = data.find(b"\0", pos)
            if nul < 0:
                raise _Truncated("unterminated two-phase GID")
            gid = data[pos:nul].decode("utf-8", "replace")
            pos = nul + 1
    origin_lsn = origin_timestamp = 0
    if xinfo & XACT_XINFO_HAS_ORIGIN:
        need(pos, _ORIGIN.size)  # stored unaligned
        origin_lsn, origin_timestamp = _ORIGIN.unpack_from(data, pos)
        pos += _ORIGIN.size
    return ParsedXact(xact_time, xinfo, db_id, ts_id, tuple(subxacts), rels, nstats, nmsgs,
                      twophase_xid, gid, origin_lsn, origin_timestamp)


def parse_commit_record(rec: DecodedRecord) -> ParsedXact:
    """ParseCommitRecord (xactdesc.c) over a COMMIT or COMMIT_PREPARED record."""
    try:
        return _parse_xact(rec.info, rec.main_data, True)
    except _Truncated as e:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"xl_xact_commit truncated: {e}") from None


def parse_abort_record(rec: DecodedRecord) -> ParsedXact:
    """ParseAbortRecord (xactdesc.c) over an ABORT or ABORT_PREPARED record."""
    try:
        return _parse_xact(rec.info, rec.main_data, False)
    except _Truncated as e:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"xl_xact_abort truncated: {e}") from None


@dataclass(frozen=True, slots=True)
class XactCompletion:
    """What a commit or abort record does to the SLRUs: the xid tree, its outcome, its commit time."""

    xid: int
    subxacts: tuple[int, ...]
    committed: bool
    commit_time: int  # TimestampTz (microseconds since 2000-01-01); 0 for aborts
    nodeid: int  # replication origin (RepOriginId) of the record

    @property
    def xids(self) -> tuple[int, ...]:
        return (self.xid, *self.subxacts)

    @property
    def status(self) -> int:
        return TRANSACTION_STATUS_COMMITTED if self.committed else TRANSACTION_STATUS_ABORTED


def xact_completion(rec: DecodedRecord) -> XactCompletion | None:
    """The transaction tree a Transaction record completes, or None for other record types.

    As xact_redo: the main xid is the record's xl_xid, or the two-phase xid
    for COMMIT_PREPARED / ABORT_PREPARED; the commit time is the origin's
    timestamp when the record carries one (xact_redo_commit).
    """
    if rec.rmid != RM_XACT_ID:
        return None
    op = rec.info & XLOG_XACT_OPMASK
    if op == XLOG_XACT_COMMIT or op == XLOG_XACT_COMMIT_PREPARED:
        parsed = parse_commit_record(rec)
        committed = True
    elif op == XLOG_XACT_ABORT or op == XLOG_XACT_ABORT_PREPARED:
        parsed = parse_abort_record(rec)
        committed = False
    else:
        return None
    xid = parsed.twophase_xid if op in (XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED) else rec.xid
    if xid == 0:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, "transaction completion record without a valid xid")
    if committed:
        commit_time = parsed.origin_timestamp if parsed.xinfo & XACT_XINFO_HAS_ORIGIN else parsed.xact_time
    else:
        commit_time = 0
    nodeid = rec.origin if rec.origin is not None else INVALID_REP_ORIGIN_ID
    return XactCompletion(xid, parsed.subxacts, committed, commit_time, nodeid)


# --- multixact records ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MultiXactCreate:
    """xl_multixact_create: a multixact, its first member offset and its members (xid, status)."""

    mid: int
    moff: int
    members: tuple[tuple[int, int], ...]

    @property
    def next_multi(self) -> int:
        """The multixact after this one, skipping InvalidMultiXactId on wraparound."""
        nxt = (self.mid + 1) & MAX_MULTIXACT_ID
        return FIRST_MULTIXACT_ID if nxt < FIRST_MULTIXACT_ID else nxt

    @property
    def next_offset(self) -> int:
        """The next multixact's starting offset; offset 0 is skipped, as in GetNewMultiXactId."""
        nxt = (self.moff + len(self.members)) & MAX_MULTIXACT_OFFSET
        return 1 if nxt == 0 else nxt

    def member_offsets(self) -> list[int]:
        return [(self.moff + i) & MAX_MULTIXACT_OFFSET for i in range(len(self.members))]


def parse_multixact_create(rec: DecodedRecord) -> MultiXactCreate:
    data = rec.main_data
    if len(data) < _MULTIXACT_CREATE.size:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"xl_multixact_create truncated: {len(data)} bytes")
    mid, moff, n = _MULTIXACT_CREATE.unpack_from(data, 0)
    if n < 0 or len(data) < _MULTIXACT_CREATE.size + n * _MULTIXACT_MEMBER.size:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"xl_multixact_create with {n} members is {len(data)} bytes")
    flat = struct.unpack_from(f"<{2 * n}I", data, _MULTIXACT_CREATE.size)
    members = tuple(zip(flat[0::2], flat[1::2]))
    for xid, status in members:
        if status > MAX_MULTIXACT_STATUS:
            raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"member {xid} has invalid status {status}")
    return MultiXactCreate(mid, moff, members)


def _record_pageno(rec: DecodedRecord, what: str) -> int:
    if len(rec.main_data) < 4:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"{what} record without a page number")
    pageno = _I32.unpack_from(rec.main_data, 0)[0]
    if pageno < 0:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"{what} record with negative page number {pageno}")
    return int(pageno)


def _zeropage_tag(rec: DecodedRecord) -> SlruPageTag | None:
    """The page a ZEROPAGE-style record initializes, or None."""
    info = rec.info & _XLR_RMGR_INFO_MASK
    if rec.rmid == RM_CLOG_ID and info == CLOG_ZEROPAGE:
        return SlruPageTag.for_page(SlruKind.CLOG, _record_pageno(rec, "CLOG ZEROPAGE"))
    if rec.rmid == RM_COMMIT_TS_ID and info == COMMIT_TS_ZEROPAGE:
        return SlruPageTag.for_page(SlruKind.COMMIT_TS, _record_pageno(rec, "CommitTs ZEROPAGE"))
    if rec.rmid == RM_MULTIXACT_ID and info == XLOG_MULTIXACT_ZERO_OFF_PAGE:
        return SlruPageTag.for_page(SlruKind.MULTIXACT_OFFSETS, _record_pageno(rec, "ZERO_OFF_PAGE"))
    if rec.rmid == RM_MULTIXACT_ID and info == XLOG_MULTIXACT_ZERO_MEM_PAGE:
        return SlruPageTag.for_page(SlruKind.MULTIXACT_MEMBERS, _record_pageno(rec, "ZERO_MEM_PAGE"))
    return None


# --- which pages a record changes ------------------------------------------------------


def _unique_tags(kind: SlruKind, abs_pages: Iterable[int]) -> list[SlruPageTag]:
    return [SlruPageTag.for_page(kind, p) for p in dict.fromkeys(abs_pages)]


def slru_tags_for_record(rec: DecodedRecord, track_commit_ts: bool = True) -> list[SlruPageTag]:
    """The SLRU pages `rec` changes, in the order Postgres changes them.

    `track_commit_ts` says whether the commit_ts module is active at this
    record (track_commit_timestamp of the last XLOG_PARAMETER_CHANGE, or of
    pg_control before any; see :func:`track_commit_timestamp_change`): commit
    records write commit timestamps only then.

    Truncation records change no page (they remove segments); records of
    other rmgrs, and the Transaction records that are no commit or abort,
    return an empty list.
    """
    rmid = rec.rmid
    if rmid == RM_XACT_ID:
        done = xact_completion(rec)
        if done is None:
            return []
        xids = done.xids
        tags = _unique_tags(SlruKind.CLOG, map(_clog_abs_page, xids))
        if done.committed and track_commit_ts:
            tags += _unique_tags(SlruKind.COMMIT_TS, map(_commit_ts_abs_page, xids))
        return tags
    if rmid == RM_MULTIXACT_ID:
        info = rec.info & _XLR_RMGR_INFO_MASK
        if info == XLOG_MULTIXACT_CREATE_ID:
            create = parse_multixact_create(rec)
            offsets = _unique_tags(
                SlruKind.MULTIXACT_OFFSETS,
                (create.mid // MULTIXACT_OFFSETS_PER_PAGE, create.next_multi // MULTIXACT_OFFSETS_PER_PAGE),
            )
            return offsets + _unique_tags(SlruKind.MULTIXACT_MEMBERS, map(_members_abs_page, create.member_offsets()))
        if info == XLOG_MULTIXACT_TRUNCATE_ID:
            return []
    elif rmid not in (RM_CLOG_ID, RM_COMMIT_TS_ID):
        return []
    tag = _zeropage_tag(rec)
    if tag is not None:
        return [tag]
    info = rec.info & _XLR_RMGR_INFO_MASK
    if (rmid == RM_CLOG_ID and info == CLOG_TRUNCATE) or (rmid == RM_COMMIT_TS_ID and info == COMMIT_TS_TRUNCATE):
        return []
    raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)


def slru_record_will_init(tag: SlruPageTag, rec: DecodedRecord) -> bool:
    """True when `rec` rebuilds `tag` from zeroes (a ZEROPAGE record): older history is not needed."""
    return _zeropage_tag(rec) == tag


# --- redo -----------------------------------------------------------------------------


def _not_touched(tag: SlruPageTag, rec: DecodedRecord) -> RedoFailedError:
    return RedoFailedError(rec.lsn, rec.rmid, rec.info, f"record does not change SLRU page {tag}")


def _no_base(tag: SlruPageTag, rec: DecodedRecord) -> RedoFailedError:
    return RedoFailedError(rec.lsn, rec.rmid, rec.info, f"no base page for {tag} and the record does not zero it")


def clog_set_status(page: bytearray, xids: Iterable[int], status: int) -> None:
    """TransactionIdSetStatusBit for each xid (all on this page)."""
    for xid in xids:
        idx = xid % CLOG_XACTS_PER_PAGE
        byteno = idx // CLOG_XACTS_PER_BYTE
        shift = (idx % CLOG_XACTS_PER_BYTE) * CLOG_BITS_PER_XACT
        page[byteno] = (page[byteno] & ~(CLOG_XACT_BITMASK << shift) & 0xFF) | (status << shift)


def commit_ts_set(page: bytearray, xids: Iterable[int], timestamp: int, nodeid: int) -> None:
    """TransactionIdSetCommitTs for each xid (all on this page)."""
    entry = _COMMIT_TS_ENTRY.pack(timestamp, nodeid)
    for xid in xids:
        off = (xid % COMMIT_TS_XACTS_PER_PAGE) * SIZE_OF_COMMIT_TIMESTAMP_ENTRY
        page[off : off + SIZE_OF_COMMIT_TIMESTAMP_ENTRY] = entry


def _xact_redo(tag: SlruPageTag, page: bytearray | None, rec: DecodedRecord) -> bytearray:
    done = xact_completion(rec)
    if done is None:
        raise _not_touched(tag, rec)
    abs_page = tag.abs_pageno
    if tag.kind == SlruKind.CLOG:
        on_page = [x for x in done.xids if x // CLOG_XACTS_PER_PAGE == abs_page]
        if not on_page:
            raise _not_touched(tag, rec)
        if page is None:
            raise _no_base(tag, rec)
        # TransactionIdSetTreeStatus marks subtransactions SUB_COMMITTED, then
        # the parent, then the subtransactions COMMITTED: only the end state
        # is ever written out.
        clog_set_status(page, on_page, done.status)
        return page
    if tag.kind == SlruKind.COMMIT_TS and done.committed:
        on_page = [x for x in done.xids if x // COMMIT_TS_XACTS_PER_PAGE == abs_page]
        if not on_page:
            raise _not_touched(tag, rec)
        if page is None:
            # ActivateCommitTs creates the page of nextXid without WAL when
            # the module is switched on; recovery does the same.
            page = bytearray(BLCKSZ)
        commit_ts_set(page, on_page, done.commit_time, done.nodeid)
        return page
    raise _not_touched(tag, rec)


def _multixact_create_redo(tag: SlruPageTag, page: bytearray | None, rec: DecodedRecord) -> bytearray:
    """RecordNewMultiXact (multixact.c) restricted to one page."""
    create = parse_multixact_create(rec)
    abs_page = tag.abs_pageno
    if tag.kind == SlruKind.MULTIXACT_OFFSETS:
        own = create.mid // MULTIXACT_OFFSETS_PER_PAGE == abs_page
        nxt = create.next_multi // MULTIXACT_OFFSETS_PER_PAGE == abs_page
        if not (own or nxt):
            raise _not_touched(tag, rec)
        if page is None:
            if own:
                raise _no_base(tag, rec)
            # WAL of older minor releases did not zero the next page ahead of
            # time; recovery then initializes it here.
            page = bytearray(BLCKSZ)
        if own:
            _U32.pack_into(page, (create.mid % MULTIXACT_OFFSETS_PER_PAGE) * 4, create.moff)
        if nxt:
            _U32.pack_into(page, (create.next_multi % MULTIXACT_OFFSETS_PER_PAGE) * 4, create.next_offset)
        return page
    if tag.kind == SlruKind.MULTIXACT_MEMBERS:
        touched = False
        for offset, (xid, status) in zip(create.member_offsets(), create.members):
            if offset // MULTIXACT_MEMBERS_PER_PAGE != abs_page:
                continue
            if page is None:
                raise _no_base(tag, rec)
            touched = True
            flagsoff = _members_flags_offset(offset)
            sub = offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP
            _U32.pack_into(page, flagsoff + MULTIXACT_FLAGBYTES_PER_GROUP + 4 * sub, xid)
            # The flag word is little-endian with 8 bits per member: member
            # `sub`'s flags are byte `sub` of the word.
            page[flagsoff + sub] = status
        if not touched or page is None:
            raise _not_touched(tag, rec)
        return page
    raise _not_touched(tag, rec)


def slru_redo(tag: SlruPageTag, page: bytearray | None, rec: DecodedRecord) -> bytearray:
    """Apply `rec`'s change to SLRU page `tag`; `page` (None: no page yet) is changed in place and returned.

    Raises RedoFailedError when the record does not change this page, or
    needs a base page that is missing; UnsupportedRecordError for a record
    type of an SLRU rmgr this module does not know.
    """
    if page is not None and len(page) != BLCKSZ:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"SLRU page {tag} is {len(page)} bytes")
    rmid = rec.rmid
    if rmid == RM_XACT_ID:
        return _xact_redo(tag, page, rec)
    if rmid in (RM_CLOG_ID, RM_COMMIT_TS_ID, RM_MULTIXACT_ID):
        zero = _zeropage_tag(rec)
        if zero is not None:
            if zero != tag:
                raise _not_touched(tag, rec)
            if page is None:
                return bytearray(BLCKSZ)
            page[:] = bytes(BLCKSZ)
            return page
        info = rec.info & _XLR_RMGR_INFO_MASK
        if rmid == RM_MULTIXACT_ID and info == XLOG_MULTIXACT_CREATE_ID:
            return _multixact_create_redo(tag, page, rec)
        if (
            (rmid == RM_CLOG_ID and info == CLOG_TRUNCATE)
            or (rmid == RM_COMMIT_TS_ID and info == COMMIT_TS_TRUNCATE)
            or (rmid == RM_MULTIXACT_ID and info == XLOG_MULTIXACT_TRUNCATE_ID)
        ):
            raise _not_touched(tag, rec)
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    raise _not_touched(tag, rec)


def slru_redo_page(tag: SlruPageTag, base: bytes | None, records: Iterable[DecodedRecord]) -> bytearray:
    """The page after applying `records` (each must change it) in order to `base`."""
    page = bytearray(base) if base is not None else None
    for rec in records:
        page = slru_redo(tag, page, rec)
    if page is None:
        raise RedoFailedError(0, 0, 0, f"no records and no base image for {tag}")
    return page


# --- commit_ts activation ----------------------------------------------------------------


def track_commit_timestamp_change(rec: DecodedRecord) -> bool | None:
    """track_commit_timestamp as an XLOG_PARAMETER_CHANGE record sets it; None for other records.

    Recovery activates or deactivates the commit_ts module on this record
    (CommitTsParameterChange in commit_ts.c). Deactivation also removes every
    pg_commit_ts segment.
    """
    if rec.rmid != RM_XLOG_ID or rec.info & _XLR_RMGR_INFO_MASK != XLOG_PARAMETER_CHANGE:
        return None
    if len(rec.main_data) <= _PARAM_TRACK_COMMIT_TS_OFFSET:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, "xl_parameter_change truncated")
    return bool(rec.main_data[_PARAM_TRACK_COMMIT_TS_OFFSET])


# --- truncation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlruTruncation:
    """Segments a truncation record removes.

    For CLOG, COMMIT_TS and MULTIXACT_OFFSETS: SimpleLruTruncate(cutoff_page),
    which removes every segment all of whose pages precede the cutoff. For
    MULTIXACT_MEMBERS: PerformMembersTruncation, which removes the segments
    from that of `start_offset` up to, not including, that of `end_offset`.
    """

    kind: SlruKind
    cutoff_page: int = 0
    start_offset: int = 0
    end_offset: int = 0


def slru_truncations(rec: DecodedRecord) -> list[SlruTruncation]:
    """The truncations `rec` performs (CLOG / CommitTs TRUNCATE, MultiXact TRUNCATE_ID)."""
    info = rec.info & _XLR_RMGR_INFO_MASK
    data = rec.main_data
    if rec.rmid == RM_CLOG_ID and info == CLOG_TRUNCATE:
        if len(data) < _CLOG_TRUNCATE.size:
            raise RedoFailedError(rec.lsn, rec.rmid, rec.info, "xl_clog_truncate truncated")
        return [SlruTruncation(SlruKind.CLOG, cutoff_page=_CLOG_TRUNCATE.unpack_from(data, 0)[0])]
    if rec.rmid == RM_COMMIT_TS_ID and info == COMMIT_TS_TRUNCATE:
        if len(data) < _COMMIT_TS_TRUNCATE.size:
            raise RedoFailedError(rec.lsn, rec.rmid, rec.info, "xl_commit_ts_truncate truncated")
        return [SlruTruncation(SlruKind.COMMIT_TS, cutoff_page=_COMMIT_TS_TRUNCATE.unpack_from(data, 0)[0])]
    if rec.rmid == RM_MULTIXACT_ID and info == XLOG_MULTIXACT_TRUNCATE_ID:
        if len(data) < _MULTIXACT_TRUNCATE.size:
            raise RedoFailedError(rec.lsn, rec.rmid, rec.info, "xl_multixact_truncate truncated")
        _db, _start_off, end_off, start_memb, end_memb = _MULTIXACT_TRUNCATE.unpack_from(data, 0)
        # PerformOffsetsTruncation steps back one multixact (PreviousMultiXactId).
        prev = MAX_MULTIXACT_ID if end_off == FIRST_MULTIXACT_ID else (end_off - 1) & MAX_MULTIXACT_ID
        return [
            SlruTruncation(SlruKind.MULTIXACT_MEMBERS, start_offset=start_memb, end_offset=end_memb),
            SlruTruncation(SlruKind.MULTIXACT_OFFSETS, cutoff_page=prev // MULTIXACT_OFFSETS_PER_PAGE),
        ]
    return []


def _xid_precedes(id1: int, id2: int) -> bool:
    """TransactionIdPrecedes (transam.c): modulo-2^32 unless a special xid is involved."""
    if id1 < FIRST_NORMAL_TRANSACTION_ID or id2 < FIRST_NORMAL_TRANSACTION_ID:
        return id1 < id2
    return ((id1 - id2) & 0xFFFFFFFF) >= 0x80000000


def _int32_precedes(a: int, b: int) -> bool:
    """MultiXactIdPrecedes / MultiXactOffsetPrecedes: (int32) (a - b) < 0."""
    return ((a - b) & 0xFFFFFFFF) >= 0x80000000


def slru_page_precedes(kind: SlruKind, page1: int, page2: int) -> bool:
    """The SLRU's PagePrecedes callback (CLOGPagePrecedes, CommitTsPagePrecedes, ...)."""
    if kind == SlruKind.CLOG or kind == SlruKind.COMMIT_TS:
        per_page = CLOG_XACTS_PER_PAGE if kind == SlruKind.CLOG else COMMIT_TS_XACTS_PER_PAGE
        xid1 = (page1 * per_page + FIRST_NORMAL_TRANSACTION_ID + 1) & 0xFFFFFFFF
        xid2 = (page2 * per_page + FIRST_NORMAL_TRANSACTION_ID + 1) & 0xFFFFFFFF
        return _xid_precedes(xid1, xid2) and _xid_precedes(xid1, (xid2 + per_page - 1) & 0xFFFFFFFF)
    if kind == SlruKind.MULTIXACT_OFFSETS:
        m1 = (page1 * MULTIXACT_OFFSETS_PER_PAGE + FIRST_MULTIXACT_ID + 1) & 0xFFFFFFFF
        m2 = (page2 * MULTIXACT_OFFSETS_PER_PAGE + FIRST_MULTIXACT_ID + 1) & 0xFFFFFFFF
        return _int32_precedes(m1, m2) and _int32_precedes(m1, (m2 + MULTIXACT_OFFSETS_PER_PAGE - 1) & 0xFFFFFFFF)
    o1 = (page1 * MULTIXACT_MEMBERS_PER_PAGE) & 0xFFFFFFFF
    o2 = (page2 * MULTIXACT_MEMBERS_PER_PAGE) & 0xFFFFFFFF
    return _int32_precedes(o1, o2) and _int32_precedes(o1, (o2 + MULTIXACT_MEMBERS_PER_PAGE - 1) & 0xFFFFFFFF)


def slru_segments_to_delete(trunc: SlruTruncation, existing: Iterable[int]) -> list[int]:
    """Which of the `existing` segment numbers the truncation removes."""
    present = sorted(set(existing))
    if trunc.kind == SlruKind.MULTIXACT_MEMBERS:
        max_segment = (MAX_MULTIXACT_OFFSET // MULTIXACT_MEMBERS_PER_PAGE) // SLRU_PAGES_PER_SEGMENT
        start = (trunc.start_offset // MULTIXACT_MEMBERS_PER_PAGE) // SLRU_PAGES_PER_SEGMENT
        end = (trunc.end_offset // MULTIXACT_MEMBERS_PER_PAGE) // SLRU_PAGES_PER_SEGMENT
        doomed: set[int] = set()
        seg = start
        while seg != end:
            doomed.add(seg)
            seg = 0 if seg == max_segment else seg + 1
        return [s for s in present if s in doomed]
    cutoff = trunc.cutoff_page
    return [
        s for s in present
        if slru_page_precedes(trunc.kind, s * SLRU_PAGES_PER_SEGMENT, cutoff)
        and slru_page_precedes(trunc.kind, s * SLRU_PAGES_PER_SEGMENT + SLRU_PAGES_PER_SEGMENT - 1, cutoff)
    ]


__all__ = [
    "CLOG_XACTS_PER_PAGE",
    "COMMIT_TS_XACTS_PER_PAGE",
    "MULTIXACT_MEMBERGROUP_SIZE",
    "MULTIXACT_MEMBERS_PER_PAGE",
    "MULTIXACT_OFFSETS_PER_PAGE",
    "SIZE_OF_COMMIT_TIMESTAMP_ENTRY",
    "SLRU_PAGES_PER_SEGMENT",
    "TRANSACTION_STATUS_ABORTED",
    "TRANSACTION_STATUS_COMMITTED",
    "TRANSACTION_STATUS_IN_PROGRESS",
    "TRANSACTION_STATUS_SUB_COMMITTED",
    "MultiXactCreate",
    "ParsedXact",
    "SlruKind",
    "SlruPageTag",
    "SlruTruncation",
    "XactCompletion",
    "clog_get_status",
    "clog_page_for_xid",
    "clog_set_status",
    "commit_ts_get_entry",
    "commit_ts_page_for_xid",
    "commit_ts_set",
    "multixact_get_member",
    "multixact_get_offset",
    "multixact_members_page_for_offset",
    "multixact_offsets_page_for_multi",
    "parse_abort_record",
    "parse_commit_record",
    "parse_multixact_create",
    "slru_page_precedes",
    "slru_record_will_init",
    "slru_redo",
    "slru_redo_page",
    "slru_segment_filename",
    "slru_segments_to_delete",
    "slru_tags_for_record",
    "slru_truncations",
    "track_commit_timestamp_change",
    "xact_completion",
]
