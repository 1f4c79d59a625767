"""Storage (smgr) records: the map pages a heap truncation changes without WAL.

smgr_redo (src/backend/catalog/storage.c) replays XLOG_SMGR_TRUNCATE in three
steps that touch pages no record registers:

- SMGR_TRUNCATE_VM, visibilitymap_prepare_truncate (access/heap/visibilitymap.c):
  on the VM page that keeps the new last heap block, the bits of every heap
  block at or past the new end are cleared.
- SMGR_TRUNCATE_FSM, FreeSpaceMapPrepareTruncateRel (storage/freespace/freespace.c):
  on the bottom-level FSM page that holds the first removed heap block, unless
  that block is the page's first slot (then the page goes with the fork cut),
  the slots from that block on are zeroed and the page's tree rebuilt
  (fsm_truncate_avail in fsmpage.c).
- Then FreeSpaceMapVacuumRange(rel, new size, InvalidBlockNumber) walks the
  path from the FSM root down to that page: on each upper page, the slots of
  children wholly past the new end become 0 (their pages are gone: fsm_vacuum_page
  hits end of file), and every page on the path gets fp_next_slot = 0.

With checksums and wal_log_hints off the primary logs no image of these pages,
so redo must make the change. Neither map sets a page LSN here, so the redo
returns False and the engine leaves pd_lsn alone.

One difference from Postgres, on upper FSM pages only: fsm_vacuum_page sets
the slot of the child that keeps part of its subtree to that child's new
maximum, which a one-page redo cannot see. We leave that slot as it was: it can
only be too high, and fsm_search corrects a too-high upper slot when it
descends into the child and finds less (freespace.c), so the map stays a valid
hint. Where Postgres finds no FSM page (fork shorter, or absent) it changes
nothing; the engine gives a page with no base an all-zero one, on which these
changes are no-ops too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pgformat.constants import FSM_FORKNUM, VISIBILITYMAP_FORKNUM
from pgformat.fsm import (
    FSM_BOTTOM_LEVEL,
    FSM_ROOT_LEVEL,
    SLOTS_PER_FSM_PAGE,
    FSMAddress,
    fsm_get_avail,
    fsm_get_location,
    fsm_get_parent,
    fsm_logical_to_physical,
    fsm_set_avail,
    fsm_set_next_slot,
    fsm_truncate_avail,
)
from pgformat.rmgr import RM_SMGR_ID, XLOG_SMGR_TRUNCATE
from pgformat.xlogrecord import DecodedRecord, RelFileNode

from .engine import BufferTag, register_implied_redo
from .errors import BadRecordError
from .heap import HEAPBLOCKS_PER_PAGE, vm_map_position

# storage_xlog.h
SMGR_TRUNCATE_VM: Final = 0x0002
SMGR_TRUNCATE_FSM: Final = 0x0004
_SMGR_TRUNCATE = struct.Struct("<IIIIi")  # blkno, RelFileNode, flags
_MAP_END: Final = 8192


@dataclass(frozen=True, slots=True)
class _Truncation:
    rnode: RelFileNode
    nblocks: int  # the new heap size
    flags: int


def _truncation(rec: DecodedRecord) -> _Truncation | None:
    if rec.rmid != RM_SMGR_ID or rec.info & 0xF0 != XLOG_SMGR_TRUNCATE:
        return None
    if len(rec.main_data) < _SMGR_TRUNCATE.size:
        raise BadRecordError(f"xl_smgr_truncate is {len(rec.main_data)} bytes")
    blkno, spc, db, rel, flags = _SMGR_TRUNCATE.unpack_from(rec.main_data, 0)
    return _Truncation(RelFileNode(spc, db, rel), blkno, flags)


# -- visibility map -----------------------------------------------------------------------


def _vm_page(t: _Truncation) -> int | None:
    """The VM block whose tail is cleared; None when whole VM pages go (the fork cut does it)."""
    if not t.flags & SMGR_TRUNCATE_VM or t.nblocks % HEAPBLOCKS_PER_PAGE == 0:
        return None
    return t.nblocks // HEAPBLOCKS_PER_PAGE


def _vm_truncate(page: bytearray, nblocks: int) -> None:
    """Clear the map bits of heap blocks >= nblocks on their VM page."""
    byte, shift = vm_map_position(nblocks)
    page[byte] &= (1 << shift) - 1
    page[byte + 1 : _MAP_END] = bytes(_MAP_END - byte - 1)


# -- free space map -----------------------------------------------------------------------


def fsm_truncation_path(heap_nblocks: int) -> list[tuple[FSMAddress, int]]:
    """(page, first slot to clear) of every FSM page that truncating the heap to
    `heap_nblocks` changes, bottom level first.

    The bottom-level page of the first removed heap block is on the path only
    when it keeps some slots. On an upper page, the slot of the child holding
    the first removed heap block is cleared only when that child's whole
    subtree is removed (the block is the first its subtree covers).
    """
    addr, slot = fsm_get_location(heap_nblocks)
    path: list[tuple[FSMAddress, int]] = []
    if slot > 0:
        path.append((addr, slot))
    wholly_removed = slot == 0
    while addr.level < FSM_ROOT_LEVEL:
        addr, slot = fsm_get_parent(addr)
        path.append((addr, slot if wholly_removed else slot + 1))
        wholly_removed = wholly_removed and slot == 0
    return path


def fsm_truncate_page(page: bytearray, level: int, first_slot: int) -> bool:
    """Clear the slots from `first_slot` on, as truncation does on a page of `level`; True if changed.

    Bottom level: fsm_truncate_avail (zero, then rebuild the tree). Upper
    levels: fsm_set_avail(slot, 0) for each slot that is set, as fsm_vacuum_page
    does for children past the end of the fork. Both leave fp_next_slot = 0
    (fsm_vacuum_page resets it on every page it visits).
    """
    changed = False
    if first_slot < SLOTS_PER_FSM_PAGE:
        if level == FSM_BOTTOM_LEVEL:
            changed = fsm_truncate_avail(page, first_slot)
        else:
            for slot in range(first_slot, SLOTS_PER_FSM_PAGE):
                if fsm_get_avail(page, slot):
                    changed = fsm_set_avail(page, slot, 0) or changed
    if any(page):  # a new (all-zero) page stays new
        fsm_set_next_slot(page, 0)
    return changed


def _fsm_pages(t: _Truncation) -> dict[int, tuple[int, int]]:
    """FSM block -> (level, first slot to clear) for the truncation."""
    if not t.flags & SMGR_TRUNCATE_FSM:
        return {}
    return {fsm_logical_to_physical(addr): (addr.level, first) for addr, first in fsm_truncation_path(t.nblocks)}


# -- registration with the engine -----------------------------------------------------------


def smgr_truncate_tags(rec: DecodedRecord) -> list[BufferTag]:
    """The VM and FSM pages an XLOG_SMGR_TRUNCATE changes without registering them."""
    t = _truncation(rec)
    if t is None:
        return []
    tags = [BufferTag(t.rnode, FSM_FORKNUM, blkno) for blkno in sorted(_fsm_pages(t))]
    vm_blk = _vm_page(t)
    if vm_blk is not None:
        tags.append(BufferTag(t.rnode, VISIBILITYMAP_FORKNUM, vm_blk))
    return tags


def smgr_truncate_redo(rec: DecodedRecord, tag: BufferTag, page: bytearray) -> bool:
    """Apply the truncation's change to the map page `tag`. Never sets the page LSN (Postgres sets none)."""
    t = _truncation(rec)
    if t is None or tag.rnode != t.rnode:
        return False
    if tag.forknum == VISIBILITYMAP_FORKNUM and tag.blkno == _vm_page(t):
        _vm_truncate(page, t.nblocks)
    elif tag.forknum == FSM_FORKNUM:
        where = _fsm_pages(t).get(tag.blkno)
        if where is not None:
            fsm_truncate_page(page, *where)
    return False


register_implied_redo(RM_SMGR_ID, smgr_truncate_tags, smgr_truncate_redo)
