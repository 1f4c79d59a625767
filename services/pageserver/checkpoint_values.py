"""The checkpoint a base backup at LSN L writes: the counters as they stand at L.

A compute booted from the base backup starts from the shutdown checkpoint we
put at L, as after a clean shutdown: no WAL replay. So that checkpoint must
carry what replay of the WAL from the last real checkpoint up to L would have
left in shared memory. `running_checkpoint` computes that from the last
checkpoint at or before L and the records from that checkpoint's redo
point up to L, following Postgres's redo:

- nextXid: AdvanceNextFullTransactionIdPastXid (varsup.c) for every record's
  xl_xid (ApplyWalRecord in xlogrecovery.c), the top-level xid of a record,
  the subtransactions of commit / abort / assignment / prepare records
  (xact_redo_commit, xact_redo_abort, ProcessTwoPhaseBuffer), the members of
  a new multixact (multixact_redo), and the nextXid a RUNNING_XACTS record
  saw; a checkpoint record's nextXid is a minimum (xlog_redo).
- nextOid: each XLOG_NEXTOID record sets it, as does a shutdown checkpoint
  record; online checkpoints are ignored (xlog_redo explains why).
- nextMulti / nextMultiOffset: MultiXactAdvanceNextMXact for each CREATE_ID
  and checkpoint record.
- oldestXid / oldestMulti / oldestCommitTsXid only move forward, from later
  checkpoint records and the CLOG / MultiXact / CommitTs truncation records
  (vac_truncate_clog sets the xid limit right after the CLOG truncation).
- newestCommitTsXid moves with commits while commit timestamps are tracked
  (TransactionTreeSetCommitTsData).

Comparisons are modulo 2^32 as in transam.c and multixact.c; the xid epoch
is carried as AdvanceNextFullTransactionIdPastXid does.

Performance: the caller scans every record since the last checkpoint's redo
point; with checkpoint_timeout at its default that is up to five minutes of
WAL, decoded in Python. Acceptable for now; the page server could keep the
running values per LSN if base backups become frequent.
"""

from __future__ import annotations

import dataclasses
import struct
import time as _time
from collections.abc import Iterable
from typing import Final

from pgformat.constants import maxalign
from pgformat.controlfile import CheckPoint, parse_checkpoint
from pgformat.rmgr import (
    CLOG_TRUNCATE,
    COMMIT_TS_TRUNCATE,
    RM_CLOG_ID,
    RM_COMMIT_TS_ID,
    RM_MULTIXACT_ID,
    RM_STANDBY_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    XLOG_CHECKPOINT_ONLINE,
    XLOG_CHECKPOINT_SHUTDOWN,
    XLOG_MULTIXACT_CREATE_ID,
    XLOG_MULTIXACT_TRUNCATE_ID,
    XLOG_NEXTOID,
    XLOG_RUNNING_XACTS,
    XLOG_XACT_ABORT,
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_ASSIGNMENT,
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
    XLOG_XACT_PREPARE,
)
from pgformat.xlogrecord import DecodedRecord
from pgredo.slru import parse_abort_record, parse_commit_record, parse_multixact_create

from .repository import RepositoryError

FIRST_NORMAL_TRANSACTION_ID: Final = 3
_XID_MASK: Final = 0xFFFFFFFF
_XLR_RMGR_INFO_MASK: Final = 0xF0

_U32 = struct.Struct("<I")
_ASSIGNMENT = struct.Struct("<Ii")  # xl_xact_assignment {xtop, nsubxacts}, then xsub[]
# xl_xact_prepare (xact.h): xid @8, nsubxacts @28, gidlen (uint16) @54; sizeof 72. The GID
# follows the header and the subxact xids follow the GID, each MAXALIGNed (twophase.c).
_PREPARE_SIZE: Final = 72
_RUNNING_XACTS_NEXT_XID: Final = 12  # xl_running_xacts.nextXid (standbydefs.h)
_CLOG_TRUNCATE = struct.Struct("<iII")  # xl_clog_truncate {pageno, oldestXact, oldestXactDb}
_COMMIT_TS_TRUNCATE = struct.Struct("<iI")  # xl_commit_ts_truncate {pageno, oldestXid}
_MULTIXACT_TRUNCATE = struct.Struct("<III")  # oldestMultiDB, startTruncOff, endTruncOff, ...


class CheckpointValuesError(RepositoryError):
    """A record whose contents the checkpoint computation cannot read."""


# -- transam.c / multixact.c comparisons -------------------------------------------


def transaction_id_is_normal(xid: int) -> bool:
    return xid >= FIRST_NORMAL_TRANSACTION_ID


def transaction_id_precedes(id1: int, id2: int) -> bool:
    """TransactionIdPrecedes: modulo-2^32 unless either is a permanent xid."""
    if not transaction_id_is_normal(id1) or not transaction_id_is_normal(id2):
        return id1 < id2
    return _int32(id1 - id2) < 0


def transaction_id_follows_or_equals(id1: int, id2: int) -> bool:
    """TransactionIdFollowsOrEquals."""
    if not transaction_id_is_normal(id1) or not transaction_id_is_normal(id2):
        return id1 >= id2
    return _int32(id1 - id2) >= 0


def multixact_id_precedes(multi1: int, multi2: int) -> bool:
    """MultiXactIdPrecedes (also MultiXactOffsetPrecedes: the same modulo-2^32 test)."""
    return _int32(multi1 - multi2) < 0


def _int32(v: int) -> int:
    v &= _XID_MASK
    return v - (1 << 32) if v & 0x80000000 else v


def advance_next_full_xid_past(next_full_xid: int, xid: int) -> int:
    """AdvanceNextFullTransactionIdPastXid: the FullTransactionId after `xid`, if that is later."""
    next_xid = next_full_xid & _XID_MASK
    if not transaction_id_follows_or_equals(xid, next_xid):
        return next_full_xid
    xid = (xid + 1) & _XID_MASK  # TransactionIdAdvance skips the permanent xids
    if xid < FIRST_NORMAL_TRANSACTION_ID:
        xid = FIRST_NORMAL_TRANSACTION_ID
    epoch = next_full_xid >> 32
    if xid < next_xid:
        epoch += 1
    return (epoch << 32) | xid


# -- the running values ---------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Running:
    next_xid: int
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int

    def saw_xid(self, xid: int) -> None:
        self.next_xid = advance_next_full_xid_past(self.next_xid, xid)

    def saw_multi(self, next_multi: int, next_offset: int) -> None:
        """MultiXactAdvanceNextMXact."""
        if multixact_id_precedes(self.next_multi, next_multi):
            self.next_multi = next_multi
        if multixact_id_precedes(self.next_multi_offset, next_offset):
            self.next_multi_offset = next_offset

    def saw_oldest_xid(self, xid: int, db: int) -> None:
        if transaction_id_precedes(self.oldest_xid, xid):
            self.oldest_xid, self.oldest_xid_db = xid, db

    def saw_oldest_multi(self, multi: int, db: int) -> None:
        if multixact_id_precedes(self.oldest_multi, multi):
            self.oldest_multi, self.oldest_multi_db = multi, db

    def saw_commit(self, xids: Iterable[int]) -> None:
        if not transaction_id_is_normal(self.newest_commit_ts_xid):
            return  # commit timestamps not tracked
        for xid in xids:
            if transaction_id_precedes(self.newest_commit_ts_xid, xid):
                self.newest_commit_ts_xid = xid

    def saw_checkpoint(self, ckpt: CheckPoint, shutdown: bool) -> None:
        if ckpt.next_xid > self.next_xid:  # FullTransactionIdPrecedes: plain 64-bit compare
            self.next_xid = ckpt.next_xid
        if shutdown:
            self.next_oid = ckpt.next_oid
        self.saw_multi(ckpt.next_multi, ckpt.next_multi_offset)
        self.saw_oldest_xid(ckpt.oldest_xid, ckpt.oldest_xid_db)
        self.saw_oldest_multi(ckpt.oldest_multi, ckpt.oldest_multi_db)
        if transaction_id_precedes(self.oldest_commit_ts_xid, ckpt.oldest_commit_ts_xid):
            self.oldest_commit_ts_xid = ckpt.oldest_commit_ts_xid
        self.saw_commit((ckpt.newest_commit_ts_xid,))


def running_checkpoint(
    base: CheckPoint,
    records: Iterable[DecodedRecord],
    redo: int,
    *,
    timeline_id: int = 1,
    now: int | None = None,
) -> CheckPoint:
    """The shutdown checkpoint to write at `redo`, given the last checkpoint and the records after it.

    `records` are the records from `base.redo` up to the checkpoint's
    position, in LSN order (base's own checkpoint record may be among them).
    """
    r = _Running(base.next_xid, base.next_oid, base.next_multi, base.next_multi_offset,
                 base.oldest_xid, base.oldest_xid_db, base.oldest_multi, base.oldest_multi_db,
                 base.oldest_commit_ts_xid, base.newest_commit_ts_xid)
    for rec in records:
        try:
            _apply(r, rec)
        except (struct.error, IndexError):
            raise CheckpointValuesError(
                f"record at {rec.lsn:X} (rmgr {rec.rmid}, info {rec.info:#x}): main data too short"
            ) from None
    return CheckPoint(
        redo=redo,
        this_timeline_id=timeline_id,
        prev_timeline_id=timeline_id,
        full_page_writes=True,
        next_xid=r.next_xid,
        next_oid=r.next_oid,
        next_multi=r.next_multi,
        next_multi_offset=r.next_multi_offset,
        oldest_xid=r.oldest_xid,
        oldest_xid_db=r.oldest_xid_db,
        oldest_multi=r.oldest_multi,
        oldest_multi_db=r.oldest_multi_db,
        time=int(_time.time()) if now is None else now,
        oldest_commit_ts_xid=r.oldest_commit_ts_xid,
        newest_commit_ts_xid=r.newest_commit_ts_xid,
        oldest_active_xid=0,
    )


def _apply(r: _Running, rec: DecodedRecord) -> None:
    r.saw_xid(rec.xid)
    if rec.toplevel_xid is not None:
        r.saw_xid(rec.toplevel_xid)
    rmid = rec.rmid
    data = rec.main_data
    if rmid == RM_XACT_ID:
        _apply_xact(r, rec)
        return
    info = rec.info & _XLR_RMGR_INFO_MASK
    if rmid == RM_XLOG_ID:
        if info == XLOG_NEXTOID:
            r.next_oid = _U32.unpack_from(data, 0)[0]
        elif info in (XLOG_CHECKPOINT_SHUTDOWN, XLOG_CHECKPOINT_ONLINE):
            r.saw_checkpoint(parse_checkpoint(data), info == XLOG_CHECKPOINT_SHUTDOWN)
    elif rmid == RM_MULTIXACT_ID:
        if info == XLOG_MULTIXACT_CREATE_ID:
            create = parse_multixact_create(rec)
            r.saw_multi(create.next_multi, create.next_offset)
            for xid, _status in create.members:
                r.saw_xid(xid)
        elif info == XLOG_MULTIXACT_TRUNCATE_ID:
            oldest_db, _start, end = _MULTIXACT_TRUNCATE.unpack_from(data, 0)
            r.saw_oldest_multi(end, oldest_db)
    elif rmid == RM_CLOG_ID and info == CLOG_TRUNCATE:
        _pageno, oldest_xact, oldest_db = _CLOG_TRUNCATE.unpack_from(data, 0)
        r.saw_oldest_xid(oldest_xact, oldest_db)
    elif rmid == RM_COMMIT_TS_ID and info == COMMIT_TS_TRUNCATE:
        oldest = _COMMIT_TS_TRUNCATE.unpack_from(data, 0)[1]
        if transaction_id_precedes(r.oldest_commit_ts_xid, oldest):
            r.oldest_commit_ts_xid = oldest
    elif rmid == RM_STANDBY_ID and info == XLOG_RUNNING_XACTS:
        next_xid = _U32.unpack_from(data, _RUNNING_XACTS_NEXT_XID)[0]
        if transaction_id_is_normal(next_xid):
            # Every xid before it may have been handed out.
            r.saw_xid((next_xid - 1) & _XID_MASK)


def _apply_xact(r: _Running, rec: DecodedRecord) -> None:
    op = rec.info & XLOG_XACT_OPMASK
    data = rec.main_data
    if op in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT, XLOG_XACT_ABORT_PREPARED):
        commit = op in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED)
        parsed = parse_commit_record(rec) if commit else parse_abort_record(rec)
        prepared = op in (XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED)
        top = parsed.twophase_xid if prepared else rec.xid
        xids = (top, *parsed.subxacts)
        for xid in xids:
            r.saw_xid(xid)
        if commit:
            r.saw_commit(xids)
    elif op == XLOG_XACT_ASSIGNMENT:
        xtop, n = _ASSIGNMENT.unpack_from(data, 0)
        r.saw_xid(xtop)
        for xid in struct.unpack_from(f"<{max(n, 0)}I", data, _ASSIGNMENT.size):
            r.saw_xid(xid)
    elif op == XLOG_XACT_PREPARE:
        for xid in prepared_xids(data):
            r.saw_xid(xid)


def prepared_xids(state: bytes) -> tuple[int, ...]:
    """The xid and subtransaction xids of a two-phase state file (a PREPARE record's main data)."""
    xid = _U32.unpack_from(state, 8)[0]
    nsubxacts = struct.unpack_from("<i", state, 28)[0]
    gidlen = struct.unpack_from("<H", state, 54)[0]
    pos = maxalign(_PREPARE_SIZE) + maxalign(gidlen)
    subxacts = struct.unpack_from(f"<{max(nsubxacts, 0)}I", state, pos)
    return (xid, *subxacts)
