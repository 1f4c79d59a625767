"""What one WAL record means for the page server's keys and metadata.

`plan_record` turns a decoded record into an `IngestPlan`: the page keys it
changes (registered blocks, visibility-map and free-space-map pages it changes
without registering them -- see pgredo.heap and pgredo.storage -- SLRU pages),
relation creations, extensions, truncations and drops, database creation and
drop, relmapper and two-phase files, and the checkpoint. No I/O here: the
repository applies the plan.

Record layouts: catalog/storage_xlog.h, commands/dbcommands_xlog.h,
utils/relmapper.h, access/xact.h; the effects follow smgr_redo,
dbase_redo, relmap_redo and xact_redo in Postgres.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from pgformat.constants import BLCKSZ, FSM_FORKNUM, MAIN_FORKNUM, VISIBILITYMAP_FORKNUM
from pgformat.fsm import fsm_blocks_after_truncate
from pgformat.rmgr import (
    RM_DBASE_ID,
    RM_RELMAP_ID,
    RM_SMGR_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    XLOG_CHECKPOINT_ONLINE,
    XLOG_CHECKPOINT_SHUTDOWN,
    XLOG_DBASE_CREATE_FILE_COPY,
    XLOG_DBASE_CREATE_WAL_LOG,
    XLOG_DBASE_DROP,
    XLOG_RELMAP_UPDATE,
    XLOG_SMGR_CREATE,
    XLOG_SMGR_TRUNCATE,
    XLOG_XACT_ABORT,
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
    XLOG_XACT_PREPARE,
)
from pgformat.xlogrecord import DecodedRecord
from pgredo.engine import implied_tags
from pgredo.slru import (
    parse_abort_record,
    parse_commit_record,
    slru_record_will_init,
    slru_tags_for_record,
)

from .keys import CHECKPOINT_KEY, RelTag, relmap_key, slru_page_key, twophase_key

_XLR_RMGR_INFO_MASK: Final = 0xF0

# storage_xlog.h
SMGR_TRUNCATE_HEAP: Final = 0x0001
SMGR_TRUNCATE_VM: Final = 0x0002
SMGR_TRUNCATE_FSM: Final = 0x0004
_SMGR_CREATE = struct.Struct("<IIIi")  # RelFileNode, ForkNumber
_SMGR_TRUNCATE = struct.Struct("<IIIIi")  # blkno, RelFileNode, flags
# dbcommands_xlog.h
_DBASE_CREATE_FILE_COPY = struct.Struct("<IIII")  # db_id, tablespace_id, src_db_id, src_tablespace_id
_DBASE_CREATE_WAL_LOG = struct.Struct("<II")  # db_id, tablespace_id
_DBASE_DROP = struct.Struct("<Ii")  # db_id, ntablespaces, then Oid[ntablespaces]
# relmapper.h: xl_relmap_update {Oid dbid; Oid tsid; int32 nbytes; char data[]}
_RELMAP_UPDATE = struct.Struct("<IIi")

# visibilitymap.c: two bits per heap block, map after the MAXALIGNed page header.
_VM_MAPSIZE: Final = BLCKSZ - 24
VM_HEAPBLOCKS_PER_PAGE: Final = _VM_MAPSIZE * 4


class IngestError(ValueError):
    """A record whose contents the page server cannot interpret."""


@dataclass(slots=True)
class IngestPlan:
    """The effects of one record, in the order the repository must apply them."""

    # Page keys whose value at this LSN is this record; True when it initializes the page.
    pages: list[tuple[bytes, bool]] = field(default_factory=list)
    # Relation forks that must be at least this many blocks long after the record.
    extends: list[tuple[RelTag, int]] = field(default_factory=list)
    creates: list[RelTag] = field(default_factory=list)
    truncates: list[tuple[RelTag, int]] = field(default_factory=list)
    # Pages the record changes without referencing them (VM bits, map pages of a truncation): a
    # change to a page of a fork the page server does not hold (map pages are created without WAL)
    # is not filed, so such a page stays "not found" rather than appearing as zeroes.
    implied: list[tuple[RelTag, int]] = field(default_factory=list)
    # (spc, db, relfilenode): every fork goes.
    drops: list[tuple[int, int, int]] = field(default_factory=list)
    db_drops: list[tuple[int, int]] = field(default_factory=list)
    # (src spc, src db, dst spc, dst db)
    db_copies: list[tuple[int, int, int, int]] = field(default_factory=list)
    # Whole-file values (relmapper, two-phase state, checkpoint); None deletes.
    files: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    # TimestampTz of a commit record (for finding the LSN of a moment).
    commit_time: int | None = None


def vm_block_for_heap_block(heap_blkno: int) -> int:
    return heap_blkno // VM_HEAPBLOCKS_PER_PAGE


def vm_blocks_after_truncate(heap_nblocks: int) -> int:
    """visibilitymap_prepare_truncate: VM pages kept when the heap shrinks to heap_nblocks."""
    blk, remainder = divmod(heap_nblocks, VM_HEAPBLOCKS_PER_PAGE)
    return blk + (1 if remainder else 0)


def plan_record(rec: DecodedRecord, track_commit_ts: bool = True) -> IngestPlan:
    plan = IngestPlan()
    for b in rec.blocks:
        rel = RelTag(b.rnode.spc, b.rnode.db, b.rnode.rel, b.forknum)
        plan.pages.append((rel.page_key(b.blkno), b.will_init or b.apply_image))
        plan.extends.append((rel, b.blkno + 1))
    for tag in implied_tags(rec):
        plan.implied.append((RelTag(tag.rnode.spc, tag.rnode.db, tag.rnode.rel, tag.forknum), tag.blkno))
    for stag in slru_tags_for_record(rec, track_commit_ts):
        plan.pages.append((slru_page_key(stag.kind, stag.segno, stag.pageno), slru_record_will_init(stag, rec)))

    rmid = rec.rmid
    info = rec.info & _XLR_RMGR_INFO_MASK
    data = rec.main_data
    try:
        if rmid == RM_SMGR_ID:
            _plan_smgr(rec, info, data, plan)
        elif rmid == RM_DBASE_ID:
            _plan_dbase(info, data, plan)
        elif rmid == RM_RELMAP_ID and info == XLOG_RELMAP_UPDATE:
            dbid, tsid, nbytes = _RELMAP_UPDATE.unpack_from(data, 0)
            content = data[_RELMAP_UPDATE.size : _RELMAP_UPDATE.size + nbytes]
            if len(content) != nbytes:
                raise IngestError(f"relmap update of {nbytes} bytes has {len(content)}")
            plan.files.append((relmap_key(tsid, dbid), bytes(content)))
        elif rmid == RM_XACT_ID:
            _plan_xact(rec, plan)
        elif rmid == RM_XLOG_ID and info in (XLOG_CHECKPOINT_SHUTDOWN, XLOG_CHECKPOINT_ONLINE):
            plan.files.append((CHECKPOINT_KEY, bytes(data)))
    except struct.error:
        raise IngestError(f"record at {rec.lsn:X}: main data too short for rmgr {rmid} info {info:#x}") from None
    return plan


def _plan_smgr(rec: DecodedRecord, info: int, data: bytes, plan: IngestPlan) -> None:
    if info == XLOG_SMGR_CREATE:
        spc, db, rel, fork = _SMGR_CREATE.unpack_from(data, 0)
        plan.creates.append(RelTag(spc, db, rel, fork))
    elif info == XLOG_SMGR_TRUNCATE:
        blkno, spc, db, rel, flags = _SMGR_TRUNCATE.unpack_from(data, 0)
        if flags & SMGR_TRUNCATE_HEAP:
            plan.truncates.append((RelTag(spc, db, rel, MAIN_FORKNUM), blkno))
        if flags & SMGR_TRUNCATE_FSM:
            plan.truncates.append((RelTag(spc, db, rel, FSM_FORKNUM), fsm_blocks_after_truncate(blkno)))
        if flags & SMGR_TRUNCATE_VM:
            plan.truncates.append((RelTag(spc, db, rel, VISIBILITYMAP_FORKNUM), vm_blocks_after_truncate(blkno)))


def _plan_dbase(info: int, data: bytes, plan: IngestPlan) -> None:
    if info == XLOG_DBASE_CREATE_FILE_COPY:
        db, spc, src_db, src_spc = _DBASE_CREATE_FILE_COPY.unpack_from(data, 0)
        plan.db_copies.append((src_spc, src_db, spc, db))
    elif info == XLOG_DBASE_CREATE_WAL_LOG:
        pass  # the pages arrive as FPI records, the relmapper file as a RelMap record
    elif info == XLOG_DBASE_DROP:
        db, ntablespaces = _DBASE_DROP.unpack_from(data, 0)
        spcs = struct.unpack_from(f"<{ntablespaces}I", data, _DBASE_DROP.size)
        plan.db_drops.extend((spc, db) for spc in spcs)


def _plan_xact(rec: DecodedRecord, plan: IngestPlan) -> None:
    op = rec.info & XLOG_XACT_OPMASK
    if op == XLOG_XACT_PREPARE:
        # The record's main data is the two-phase state file (twophase.c).
        plan.files.append((twophase_key(rec.xid), bytes(rec.main_data)))
        return
    if op in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED):
        parsed = parse_commit_record(rec)
    elif op in (XLOG_XACT_ABORT, XLOG_XACT_ABORT_PREPARED):
        parsed = parse_abort_record(rec)
    else:
        return
    plan.drops.extend((r.spc, r.db, r.rel) for r in parsed.rels)
    if op in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED):
        plan.commit_time = parsed.xact_time
    if op in (XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED):
        plan.files.append((twophase_key(parsed.twophase_xid), None))
