"""Storage (smgr) records: the visibility-map page a heap truncation changes without WAL.

smgr_redo (src/backend/catalog/storage.c) calls visibilitymap_prepare_truncate
(src/backend/access/heap/visibilitymap.c) for XLOG_SMGR_TRUNCATE with
SMGR_TRUNCATE_VM: on the VM page that keeps the new last heap block, the bits
of every heap block at or past the new end are cleared. With checksums and
wal_log_hints off, the primary logs no image of that page, so redo must do it.
"""

from __future__ import annotations

import struct
from typing import Final

from pgformat.constants import VISIBILITYMAP_FORKNUM
from pgformat.rmgr import RM_SMGR_ID, XLOG_SMGR_TRUNCATE
from pgformat.xlogrecord import DecodedRecord, RelFileNode

from .engine import BufferTag, register_implied_redo
from .errors import BadRecordError
from .heap import HEAPBLOCKS_PER_PAGE, vm_map_position

SMGR_TRUNCATE_VM: Final = 0x0002
_SMGR_TRUNCATE = struct.Struct("<IIIIi")  # blkno, RelFileNode, flags
_MAP_END: Final = 8192


def _truncation(rec: DecodedRecord) -> tuple[RelFileNode, int] | None:
    """(relation, new heap size) of a truncation that clears part of a VM page."""
    if rec.rmid != RM_SMGR_ID or rec.info & 0xF0 != XLOG_SMGR_TRUNCATE:
        return None
    if len(rec.main_data) < _SMGR_TRUNCATE.size:
        raise BadRecordError(f"xl_smgr_truncate is {len(rec.main_data)} bytes")
    blkno, spc, db, rel, flags = _SMGR_TRUNCATE.unpack_from(rec.main_data, 0)
    if not flags & SMGR_TRUNCATE_VM or blkno % HEAPBLOCKS_PER_PAGE == 0:
        return None  # whole VM pages go: the page server just shortens the fork
    return RelFileNode(spc, db, rel), blkno


def smgr_truncate_vm_tags(rec: DecodedRecord) -> list[BufferTag]:
    t = _truncation(rec)
    if t is None:
        return []
    return [BufferTag(t[0], VISIBILITYMAP_FORKNUM, t[1] // HEAPBLOCKS_PER_PAGE)]


def smgr_truncate_vm_redo(rec: DecodedRecord, tag: BufferTag, page: bytearray) -> bool:
    """Clear the map bits of heap blocks >= the new size; the page LSN stays (Postgres sets none)."""
    t = _truncation(rec)
    if t is None or tag != smgr_truncate_vm_tags(rec)[0]:
        return False
    byte, shift = vm_map_position(t[1])
    page[byte] &= (1 << shift) - 1
    page[byte + 1 : _MAP_END] = bytes(_MAP_END - byte - 1)
    return False


register_implied_redo(RM_SMGR_ID, smgr_truncate_vm_tags, smgr_truncate_vm_redo)
