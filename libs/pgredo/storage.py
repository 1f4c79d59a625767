"""Storage (smgr) records: the map pages a heap truncation changes without WAL.

smgr_redo (src/backend/catalog/storage.c) for XLOG_SMGR_TRUNCATE calls
visibilitymap_prepare_truncate (src/backend/access/heap/visibilitymap.c) with
SMGR_TRUNCATE_VM: on the VM page that keeps the new last heap block, the bits
of every heap block at or past the new end are cleared; and
FreeSpaceMapPrepareTruncateRel (src/backend/storage/freespace/freespace.c)
with SMGR_TRUNCATE_FSM: on the FSM leaf page of the new end, the slots at or
past it are zeroed and the page's tree rebuilt. With checksums and
wal_log_hints off the primary logs no image of either page, so redo must do
it. Both do nothing when the page does not exist (the page server checks).
"""

from __future__ import annotations

import struct
from typing import Final

from pgformat import fsm
from pgformat.constants import FSM_FORKNUM, VISIBILITYMAP_FORKNUM
from pgformat.rmgr import RM_SMGR_ID, XLOG_SMGR_TRUNCATE
from pgformat.xlogrecord import DecodedRecord, RelFileNode

from .engine import BufferTag, register_implied_redo
from .errors import BadRecordError
from .heap import HEAPBLOCKS_PER_PAGE, vm_map_position

SMGR_TRUNCATE_VM: Final = 0x0002
SMGR_TRUNCATE_FSM: Final = 0x0004
_SMGR_TRUNCATE = struct.Struct("<IIIIi")  # blkno, RelFileNode, flags
_MAP_END: Final = 8192


def _truncation(rec: DecodedRecord) -> tuple[RelFileNode, int, int] | None:
    """(relation, new heap size, flags) of an smgr truncation."""
    if rec.rmid != RM_SMGR_ID or rec.info & 0xF0 != XLOG_SMGR_TRUNCATE:
        return None
    if len(rec.main_data) < _SMGR_TRUNCATE.size:
        raise BadRecordError(f"xl_smgr_truncate is {len(rec.main_data)} bytes")
    blkno, spc, db, rel, flags = _SMGR_TRUNCATE.unpack_from(rec.main_data, 0)
    return RelFileNode(spc, db, rel), blkno, flags


def smgr_truncate_tags(rec: DecodedRecord) -> list[BufferTag]:
    """The VM and FSM pages that keep the new end (whole pages past it just go with the fork)."""
    t = _truncation(rec)
    if t is None:
        return []
    rnode, nblocks, flags = t
    tags = []
    if flags & SMGR_TRUNCATE_VM and nblocks % HEAPBLOCKS_PER_PAGE:
        tags.append(BufferTag(rnode, VISIBILITYMAP_FORKNUM, nblocks // HEAPBLOCKS_PER_PAGE))
    logpageno, slot = fsm.heap_block_location(nblocks)
    if flags & SMGR_TRUNCATE_FSM and slot:
        tags.append(BufferTag(rnode, FSM_FORKNUM, fsm.logical_to_physical(logpageno)))
    return tags


def smgr_truncate_redo(rec: DecodedRecord, tag: BufferTag, page: bytearray) -> bool:
    """Clear what lies past the new heap end on the VM or FSM page; the page LSN stays (Postgres sets none)."""
    t = _truncation(rec)
    if t is None or tag not in smgr_truncate_tags(rec):
        return False
    nblocks = t[1]
    if tag.forknum == FSM_FORKNUM:
        fsm.truncate_avail(page, fsm.heap_block_location(nblocks)[1])
        return False
    byte, shift = vm_map_position(nblocks)
    page[byte] &= (1 << shift) - 1
    page[byte + 1 : _MAP_END] = bytes(_MAP_END - byte - 1)
    return False


register_implied_redo(RM_SMGR_ID, smgr_truncate_tags, smgr_truncate_redo)
