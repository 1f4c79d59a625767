"""Redo of the Heap (10) and Heap2 (9) resource managers, PostgreSQL 15.

Follows heap_redo / heap2_redo and the heap_xlog_* functions of
src/backend/access/heap/heapam.c, heap_page_prune_execute of pruneheap.c and
visibilitymap_set / visibilitymap_clear of visibilitymap.c. Record layouts are
those of src/include/access/heapam_xlog.h; tuple header fields and infomask
bits those of src/include/access/htup_details.h.

Each block reference is redone on its own (the engine calls
:func:`heap_block_redo` once per block). For an UPDATE whose old and new
tuples are on different pages, block 1 (old page) and block 0 (new page) are
independent: Postgres only compresses the new tuple against the old one
(XLH_UPDATE_PREFIX_FROM_OLD / XLH_UPDATE_SUFFIX_FROM_OLD) when
``oldbuf == newbuf`` (log_heap_update), so the new page never needs the old
page. A record claiming prefix/suffix compression across pages is refused.

Visibility-map pages
--------------------
Heap records whose flags say PD_ALL_VISIBLE was cleared (or, for LOCK and
LOCK_UPDATED, that the all-frozen bit was cleared) also clear bits on a VM
page they do not register. :func:`heap_implied_tags` names those VM pages and
:func:`heap_implied_redo` clears the bits. visibilitymap_clear never sets the
VM page's LSN, so neither do we: the redo clears the bits in place and
returns False, which tells the engine to leave pd_lsn alone. The VM page's LSN
therefore stays that of the last XLOG_HEAP2_VISIBLE that set a bit on it,
exactly as on the primary (where clearing is not WAL-logged either).

Page LSN rules that differ from "always set":
- XLOG_HEAP2_VISIBLE, heap page (block 1): PD_ALL_VISIBLE is set but the LSN
  is bumped only if XLogHintBitIsNeeded() (data checksums or wal_log_hints),
  a cluster setting the record does not carry; see
  :func:`set_hint_bits_logged` (default off, initdb's default).
- XLOG_HEAP2_VISIBLE, VM page (block 0): visibilitymap_set sets the LSN only
  when the bits it was asked to set differ from those present.
- Records without page effect (Heap TRUNCATE, Heap2 NEW_CID, Heap2 REWRITE)
  register no blocks; if asked anyway, the page is left untouched.
"""

from __future__ import annotations

import struct
from typing import Final

from pgformat import native
from pgformat.constants import BLCKSZ, VISIBILITYMAP_FORKNUM, maxalign
from pgformat.page import (
    LP_DEAD,
    LP_NORMAL,
    LP_REDIRECT,
    PAI_IS_HEAP,
    PAI_OVERWRITE,
    PD_ALL_VISIBLE,
    SIZE_OF_PAGE_HEADER_DATA,
    PageError,
    page_add_item_extended,
    page_init,
    page_repair_fragmentation,
    page_set_prunable,
    page_truncate_line_pointer_array,
)
from pgformat.rmgr import (
    RM_HEAP2_ID,
    RM_HEAP_ID,
    XLOG_HEAP2_FREEZE_PAGE,
    XLOG_HEAP2_LOCK_UPDATED,
    XLOG_HEAP2_MULTI_INSERT,
    XLOG_HEAP2_NEW_CID,
    XLOG_HEAP2_PRUNE,
    XLOG_HEAP2_REWRITE,
    XLOG_HEAP2_VACUUM,
    XLOG_HEAP2_VISIBLE,
    XLOG_HEAP_CONFIRM,
    XLOG_HEAP_DELETE,
    XLOG_HEAP_HOT_UPDATE,
    XLOG_HEAP_INIT_PAGE,
    XLOG_HEAP_INPLACE,
    XLOG_HEAP_INSERT,
    XLOG_HEAP_LOCK,
    XLOG_HEAP_OPMASK,
    XLOG_HEAP_TRUNCATE,
    XLOG_HEAP_UPDATE,
)
from pgformat.xlogrecord import DecodedBlock, DecodedRecord, RelFileNode

from .engine import BufferTag, register_block_redo, register_implied_redo
from .errors import RedoFailedError, UnsupportedRecordError

__all__ = [
    "HEAPBLOCKS_PER_PAGE",
    "VISIBILITYMAP_ALL_VISIBLE",
    "VISIBILITYMAP_ALL_FROZEN",
    "VISIBILITYMAP_VALID_BITS",
    "heap_block_redo",
    "heap2_block_redo",
    "heap_implied_tags",
    "heap_implied_redo",
    "heapblk_to_mapblock",
    "visibilitymap_set",
    "visibilitymap_clear",
    "set_hint_bits_logged",
]

# --- heapam_xlog.h flags -------------------------------------------------------

XLH_INSERT_ALL_VISIBLE_CLEARED: Final = 1 << 0
XLH_INSERT_ALL_FROZEN_SET: Final = 1 << 5

XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED: Final = 1 << 0
XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED: Final = 1 << 1
XLH_UPDATE_PREFIX_FROM_OLD: Final = 1 << 5
XLH_UPDATE_SUFFIX_FROM_OLD: Final = 1 << 6

XLH_DELETE_ALL_VISIBLE_CLEARED: Final = 1 << 0
XLH_DELETE_IS_SUPER: Final = 1 << 3
XLH_DELETE_IS_PARTITION_MOVE: Final = 1 << 4

XLHL_XMAX_IS_MULTI: Final = 0x01
XLHL_XMAX_LOCK_ONLY: Final = 0x02
XLHL_XMAX_EXCL_LOCK: Final = 0x04
XLHL_XMAX_KEYSHR_LOCK: Final = 0x08
XLHL_KEYS_UPDATED: Final = 0x10

XLH_LOCK_ALL_FROZEN_CLEARED: Final = 0x01

XLH_FREEZE_XVAC: Final = 0x02
XLH_INVALID_XVAC: Final = 0x04

# --- htup_details.h --------------------------------------------------------------

SIZEOF_HEAP_TUPLE_HEADER: Final = 23  # offsetof(HeapTupleHeaderData, t_bits)
# Field offsets in HeapTupleHeaderData.
_T_XMIN: Final = 0
_T_XMAX: Final = 4
_T_FIELD3: Final = 8  # t_cid or t_xvac
_T_CTID: Final = 12  # ItemPointerData {bi_hi, bi_lo, ip_posid}
_T_INFOMASK2: Final = 18
_T_INFOMASK: Final = 20
_T_HOFF: Final = 22

HEAP_XMAX_KEYSHR_LOCK: Final = 0x0010
HEAP_COMBOCID: Final = 0x0020
HEAP_XMAX_EXCL_LOCK: Final = 0x0040
HEAP_XMAX_LOCK_ONLY: Final = 0x0080
HEAP_XMAX_SHR_LOCK: Final = HEAP_XMAX_EXCL_LOCK | HEAP_XMAX_KEYSHR_LOCK
HEAP_LOCK_MASK: Final = HEAP_XMAX_SHR_LOCK | HEAP_XMAX_EXCL_LOCK | HEAP_XMAX_KEYSHR_LOCK
HEAP_XMAX_COMMITTED: Final = 0x0400
HEAP_XMAX_INVALID: Final = 0x0800
HEAP_XMAX_IS_MULTI: Final = 0x1000
HEAP_MOVED: Final = 0x4000 | 0x8000
HEAP_XMAX_BITS: Final = (
    HEAP_XMAX_COMMITTED | HEAP_XMAX_INVALID | HEAP_XMAX_IS_MULTI | HEAP_LOCK_MASK | HEAP_XMAX_LOCK_ONLY
)
HEAP_KEYS_UPDATED: Final = 0x2000
HEAP_HOT_UPDATED: Final = 0x4000

FROZEN_TRANSACTION_ID: Final = 2
# itemptr.h: ItemPointerSetMovedPartitions
_MOVED_PARTITIONS_BLOCK: Final = 0xFFFFFFFF
_MOVED_PARTITIONS_OFFSET: Final = 0xFFFD

# --- visibilitymap.h / visibilitymap.c -------------------------------------------

VISIBILITYMAP_ALL_VISIBLE: Final = 0x01
VISIBILITYMAP_ALL_FROZEN: Final = 0x02
VISIBILITYMAP_VALID_BITS: Final = 0x03
_MAP_OFFSET: Final = maxalign(SIZE_OF_PAGE_HEADER_DATA)  # PageGetContents
_MAPSIZE: Final = BLCKSZ - _MAP_OFFSET
_HEAPBLOCKS_PER_BYTE: Final = 4  # BITS_PER_BYTE / BITS_PER_HEAPBLOCK
HEAPBLOCKS_PER_PAGE: Final = _MAPSIZE * _HEAPBLOCKS_PER_BYTE

# --- precompiled layouts -----------------------------------------------------------

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ITEM_POINTER = struct.Struct("<HHH")
# xl_heap_header {t_infomask2, t_infomask, t_hoff}
_XL_HEAP_HEADER = struct.Struct("<HHB")
SIZE_OF_HEAP_HEADER: Final = _XL_HEAP_HEADER.size  # 5
# HeapTupleHeaderData up to t_bits: xmin, xmax, field3, ctid(3 x u16), infomask2, infomask, hoff
_TUPLE_HEADER = struct.Struct("<IIIHHHHHB")
# xl_heap_insert {offnum, flags}
_XL_HEAP_INSERT = struct.Struct("<HB")
# xl_heap_delete {xmax, offnum, infobits_set, flags}
_XL_HEAP_DELETE = struct.Struct("<IHBB")
# xl_heap_update {old_xmax, old_offnum, old_infobits_set, flags, new_xmax, new_offnum}
_XL_HEAP_UPDATE = struct.Struct("<IHBBIH")
# xl_heap_lock / xl_heap_lock_updated {xid, offnum, infobits_set, flags}
_XL_HEAP_LOCK = struct.Struct("<IHBB")
# xl_heap_multi_insert {flags, ntuples} (offsets[] from byte 4)
_XL_HEAP_MULTI_INSERT = struct.Struct("<BxH")
# xl_multi_insert_tuple {datalen, t_infomask2, t_infomask, t_hoff}
_XL_MULTI_INSERT_TUPLE = struct.Struct("<HHHB")
# xl_heap_prune {latestRemovedXid, nredirected, ndead}
_XL_HEAP_PRUNE = struct.Struct("<IHH")
# xl_heap_freeze_page {cutoff_xid, ntuples}
_XL_HEAP_FREEZE_PAGE = struct.Struct("<IH")
# xl_heap_freeze_tuple {xmax, offset, t_infomask2, t_infomask, frzflags} (sizeof 12)
_XL_HEAP_FREEZE_TUPLE = struct.Struct("<IHHHBx")
# xl_heap_visible {cutoff_xid, flags}
_XL_HEAP_VISIBLE = struct.Struct("<IB")

_u16_from = _U16.unpack_from
_u16_into = _U16.pack_into
_u32_from = _U32.unpack_from
_u32_into = _U32.pack_into
_OFF_FLAGS: Final = 10
_OFF_LOWER: Final = 12
_OFF_UPPER: Final = 14

_hint_bits_logged = False


def set_hint_bits_logged(enabled: bool) -> None:
    """Declare XLogHintBitIsNeeded() of the cluster being redone.

    True when the primary runs with data checksums or wal_log_hints=on; then
    XLOG_HEAP2_VISIBLE bumps the heap page's LSN as well (heap_xlog_visible).
    """
    global _hint_bits_logged
    _hint_bits_logged = enabled


# --- small helpers ---------------------------------------------------------------


def _fail(rec: DecodedRecord, reason: str) -> RedoFailedError:
    return RedoFailedError(rec.lsn, rec.rmid, rec.info, reason)


def _main(rec: DecodedRecord, layout: struct.Struct) -> tuple[int, ...]:
    if len(rec.main_data) < layout.size:
        raise _fail(rec, f"main data is {len(rec.main_data)} bytes, expected at least {layout.size}")
    return layout.unpack_from(rec.main_data, 0)


def _max_offset(page: bytearray) -> int:
    lower = _u16_from(page, _OFF_LOWER)[0]
    return 0 if lower <= SIZE_OF_PAGE_HEADER_DATA else (lower - SIZE_OF_PAGE_HEADER_DATA) >> 2


def _normal_tuple(rec: DecodedRecord, page: bytearray, offnum: int) -> tuple[int, int]:
    """(lp_off, lp_len) of the LP_NORMAL item at offnum; "invalid lp" PANIC otherwise."""
    if offnum < 1 or _max_offset(page) < offnum:
        raise _fail(rec, f"invalid lp: offset {offnum} beyond the line pointer array")
    raw = _u32_from(page, SIZE_OF_PAGE_HEADER_DATA + (offnum - 1) * 4)[0]
    if (raw >> 15) & 3 != LP_NORMAL:
        raise _fail(rec, f"invalid lp: item {offnum} is not LP_NORMAL")
    lp_off = raw & 0x7FFF
    lp_len = raw >> 17
    if lp_off < SIZE_OF_PAGE_HEADER_DATA or lp_off + max(lp_len, SIZEOF_HEAP_TUPLE_HEADER) > BLCKSZ:
        raise _fail(rec, f"item {offnum} (offset {lp_off}, length {lp_len}) lies outside the page")
    return lp_off, lp_len


def _item_offset(rec: DecodedRecord, page: bytearray, offnum: int) -> int:
    """PageGetItem's address without the LP_NORMAL check (as freeze redo uses it)."""
    if offnum < 1 or offnum > (BLCKSZ - SIZE_OF_PAGE_HEADER_DATA) // 4:
        raise _fail(rec, f"offset {offnum} is outside the page")
    lp_off = _u32_from(page, SIZE_OF_PAGE_HEADER_DATA + (offnum - 1) * 4)[0] & 0x7FFF
    if lp_off < SIZE_OF_PAGE_HEADER_DATA or lp_off + SIZEOF_HEAP_TUPLE_HEADER > BLCKSZ:
        raise _fail(rec, f"item {offnum} at offset {lp_off} lies outside the page")
    return lp_off


def _fix_infomask_from_infobits(infobits: int, infomask: int, infomask2: int) -> tuple[int, int]:
    """fix_infomask_from_infobits (heapam.c): the reverse of compute_infobits."""
    infomask &= ~(HEAP_XMAX_IS_MULTI | HEAP_XMAX_LOCK_ONLY | HEAP_XMAX_KEYSHR_LOCK | HEAP_XMAX_EXCL_LOCK)
    infomask2 &= ~HEAP_KEYS_UPDATED
    if infobits & XLHL_XMAX_IS_MULTI:
        infomask |= HEAP_XMAX_IS_MULTI
    if infobits & XLHL_XMAX_LOCK_ONLY:
        infomask |= HEAP_XMAX_LOCK_ONLY
    if infobits & XLHL_XMAX_EXCL_LOCK:
        infomask |= HEAP_XMAX_EXCL_LOCK
    if infobits & XLHL_XMAX_KEYSHR_LOCK:
        infomask |= HEAP_XMAX_KEYSHR_LOCK
    if infobits & XLHL_KEYS_UPDATED:
        infomask2 |= HEAP_KEYS_UPDATED
    return infomask, infomask2


def _set_ctid(page: bytearray, htup: int, blkno: int, offnum: int) -> None:
    """ItemPointerSet(&htup->t_ctid, blkno, offnum)."""
    _ITEM_POINTER.pack_into(page, htup + _T_CTID, (blkno >> 16) & 0xFFFF, blkno & 0xFFFF, offnum)


def _build_tuple(
    xmin: int, xmax: int, blkno: int, offnum: int, infomask2: int, infomask: int, hoff: int,
    body: bytes | memoryview,
) -> bytes:
    """A tuple as heap_xlog_insert/update build it in tbuf: header fields from the
    record, t_cid = FirstCommandId (HeapTupleHeaderSetCmin also drops HEAP_COMBOCID),
    then the logged bitmap/oid/data."""
    header = _TUPLE_HEADER.pack(
        xmin, xmax, 0, (blkno >> 16) & 0xFFFF, blkno & 0xFFFF, offnum,
        infomask2, infomask & ~HEAP_COMBOCID & 0xFFFF, hoff,
    )
    return header + bytes(body)


def _add_tuple(rec: DecodedRecord, page: bytearray, tup: bytes, offnum: int) -> None:
    if page_add_item_extended(page, tup, offnum, PAI_OVERWRITE | PAI_IS_HEAP) == 0:
        raise _fail(rec, f"failed to add tuple at offset {offnum}")


def _add_heap_tuple(
    rec: DecodedRecord, page: bytearray, offnum: int, xmin: int, xmax: int, blkno: int,
    infomask2: int, infomask: int, hoff: int, body: bytes | memoryview,
) -> None:
    """Build the tuple (see _build_tuple) and add it at offnum, compiled when pgformat._native is built."""
    compiled = native.compiled
    if compiled is None:
        _add_tuple(rec, page, _build_tuple(xmin, xmax, blkno, offnum, infomask2, infomask, hoff, body), offnum)
    elif compiled.heap_add_tuple(page, offnum, xmin, xmax, blkno, infomask2, infomask, hoff, body) == 0:
        raise _fail(rec, f"failed to add tuple at offset {offnum}")


def _clear_all_visible(page: bytearray) -> None:
    _u16_into(page, _OFF_FLAGS, _u16_from(page, _OFF_FLAGS)[0] & ~PD_ALL_VISIBLE)


def _set_all_visible(page: bytearray) -> None:
    _u16_into(page, _OFF_FLAGS, _u16_from(page, _OFF_FLAGS)[0] | PD_ALL_VISIBLE)


def _check_max_offset(rec: DecodedRecord, page: bytearray, offnum: int) -> None:
    if _max_offset(page) + 1 < offnum:
        raise _fail(rec, f"invalid max offset number: adding {offnum} after {_max_offset(page)}")


# --- Heap (RM_HEAP_ID) -------------------------------------------------------------


def heap_insert_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_insert: one tuple into block 0 (INIT: on a freshly initialized page)."""
    offnum, flags = _main(rec, _XL_HEAP_INSERT)
    if rec.info & XLOG_HEAP_INIT_PAGE:
        page_init(page, 0)
    _check_max_offset(rec, page, offnum)
    data = block.data
    if len(data) <= SIZE_OF_HEAP_HEADER:
        raise _fail(rec, f"block data of {len(data)} bytes holds no tuple")
    infomask2, infomask, hoff = _XL_HEAP_HEADER.unpack_from(data, 0)
    _add_heap_tuple(rec, page, offnum, rec.xid, 0, block.blkno, infomask2, infomask, hoff,
                    memoryview(data)[SIZE_OF_HEAP_HEADER:])
    if flags & XLH_INSERT_ALL_VISIBLE_CLEARED:
        _clear_all_visible(page)


def heap_delete_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_delete: set xmax (or, for a speculative super-delete, clear xmin)."""
    xmax, offnum, infobits, flags = _main(rec, _XL_HEAP_DELETE)
    compiled = native.compiled
    if compiled is not None and compiled.heap_delete(page, offnum, xmax, infobits, flags, rec.xid, block.blkno):
        return  # the same edits in C (their errors are PageErrors with the messages below)
    htup, _ = _normal_tuple(rec, page, offnum)
    infomask = _u16_from(page, htup + _T_INFOMASK)[0] & ~(HEAP_XMAX_BITS | HEAP_MOVED)
    infomask2 = _u16_from(page, htup + _T_INFOMASK2)[0] & ~HEAP_KEYS_UPDATED & ~HEAP_HOT_UPDATED
    infomask, infomask2 = _fix_infomask_from_infobits(infobits, infomask, infomask2)
    if not flags & XLH_DELETE_IS_SUPER:
        _u32_into(page, htup + _T_XMAX, xmax)
    else:
        _u32_into(page, htup + _T_XMIN, 0)
    # HeapTupleHeaderSetCmax(htup, FirstCommandId, false)
    _u32_into(page, htup + _T_FIELD3, 0)
    infomask &= ~HEAP_COMBOCID
    _u16_into(page, htup + _T_INFOMASK, infomask)
    _u16_into(page, htup + _T_INFOMASK2, infomask2)
    page_set_prunable(page, rec.xid)
    if flags & XLH_DELETE_ALL_VISIBLE_CLEARED:
        _clear_all_visible(page)
    if flags & XLH_DELETE_IS_PARTITION_MOVE:
        _set_ctid(page, htup, _MOVED_PARTITIONS_BLOCK, _MOVED_PARTITIONS_OFFSET)
    else:
        _set_ctid(page, htup, block.blkno, offnum)


def _update_old_tuple(
    rec: DecodedRecord, page: bytearray, hot: bool, xlrec: tuple[int, ...], newblk: int
) -> tuple[int, int]:
    """heap_xlog_update, old-tuple half. Returns the old tuple's (lp_off, lp_len)."""
    old_xmax, old_offnum, old_infobits, flags, _new_xmax, new_offnum = xlrec
    compiled = native.compiled
    if compiled is not None:
        done = compiled.heap_update_old(page, old_offnum, old_xmax, old_infobits, flags, hot, newblk, new_offnum,
                                        rec.xid)
        if done is not None:
            return done  # type: ignore[no-any-return]
    htup, tlen = _normal_tuple(rec, page, old_offnum)
    infomask = _u16_from(page, htup + _T_INFOMASK)[0] & ~(HEAP_XMAX_BITS | HEAP_MOVED)
    infomask2 = _u16_from(page, htup + _T_INFOMASK2)[0] & ~HEAP_KEYS_UPDATED
    if hot:
        infomask2 |= HEAP_HOT_UPDATED
    else:
        infomask2 &= ~HEAP_HOT_UPDATED
    infomask, infomask2 = _fix_infomask_from_infobits(old_infobits, infomask, infomask2)
    _u32_into(page, htup + _T_XMAX, old_xmax)
    _u32_into(page, htup + _T_FIELD3, 0)  # HeapTupleHeaderSetCmax(FirstCommandId, false)
    infomask &= ~HEAP_COMBOCID
    _u16_into(page, htup + _T_INFOMASK, infomask)
    _u16_into(page, htup + _T_INFOMASK2, infomask2)
    _set_ctid(page, htup, newblk, new_offnum)
    page_set_prunable(page, rec.xid)
    if flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED:
        _clear_all_visible(page)
    return htup, tlen


def _update_new_tuple(
    rec: DecodedRecord, block: DecodedBlock, page: bytearray, xlrec: tuple[int, ...],
    old: tuple[int, int] | None,
) -> None:
    """heap_xlog_update, new-tuple half: rebuild the tuple (prefix/suffix from `old`)."""
    _old_xmax, _old_offnum, _old_infobits, flags, new_xmax, new_offnum = xlrec
    _check_max_offset(rec, page, new_offnum)
    data = memoryview(block.data)
    pos = 0
    prefixlen = suffixlen = 0
    try:
        if flags & XLH_UPDATE_PREFIX_FROM_OLD:
            prefixlen = _u16_from(data, pos)[0]
            pos += 2
        if flags & XLH_UPDATE_SUFFIX_FROM_OLD:
            suffixlen = _u16_from(data, pos)[0]
            pos += 2
        infomask2, infomask, hoff = _XL_HEAP_HEADER.unpack_from(data, pos)
    except struct.error:
        raise _fail(rec, f"block data of {len(data)} bytes is too short for the new tuple") from None
    pos += SIZE_OF_HEAP_HEADER
    tuplen = len(data) - pos
    if prefixlen or suffixlen:
        if old is None:
            raise _fail(rec, "prefix/suffix compression against an old tuple on another page")
        old_off, old_len = old
        old_hoff = page[old_off + _T_HOFF]
        if prefixlen > old_len - old_hoff or suffixlen > old_len - old_hoff:
            raise _fail(rec, f"prefix {prefixlen}/suffix {suffixlen} longer than the old tuple's data")
        bitmap_len = hoff - SIZEOF_HEAP_TUPLE_HEADER
        if prefixlen:
            if not 0 <= bitmap_len <= tuplen:
                raise _fail(rec, f"t_hoff {hoff} does not fit the logged tuple")
            body = b"".join((
                data[pos : pos + bitmap_len],
                page[old_off + old_hoff : old_off + old_hoff + prefixlen],
                data[pos + bitmap_len :],
            ))
        else:
            body = bytes(data[pos:])
        if suffixlen:
            body += page[old_off + old_len - suffixlen : old_off + old_len]
    else:
        body = bytes(data[pos:])
    _add_heap_tuple(rec, page, new_offnum, rec.xid, new_xmax, block.blkno, infomask2, infomask, hoff, body)
    if flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED:
        _clear_all_visible(page)


def heap_update_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray, hot: bool) -> None:
    """heap_xlog_update: block 0 is the new page, block 1 (if any) the old page."""
    xlrec = _main(rec, _XL_HEAP_UPDATE)
    if block.block_id == 0:
        old_block = rec.block(1)
        if old_block is None:
            # Same page: old tuple first, then the new one (PG reads one buffer).
            old = _update_old_tuple(rec, page, hot, xlrec, block.blkno)
            _update_new_tuple(rec, block, page, xlrec, old)
        else:
            if rec.info & XLOG_HEAP_INIT_PAGE:
                page_init(page, 0)
            _update_new_tuple(rec, block, page, xlrec, None)
    elif block.block_id == 1:
        new_block = rec.block(0)
        if new_block is None:
            raise _fail(rec, "update record without block 0")
        _update_old_tuple(rec, page, hot, xlrec, new_block.blkno)
    else:
        raise _fail(rec, f"unexpected block id {block.block_id}")


def heap_confirm_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_confirm: a speculative insertion's t_ctid becomes its own TID."""
    (offnum,) = _main(rec, _U16)
    htup, _ = _normal_tuple(rec, page, offnum)
    _set_ctid(page, htup, block.blkno, offnum)


def heap_lock_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_lock: set the locker as xmax with the lock's infomask bits."""
    locking_xid, offnum, infobits, _flags = _main(rec, _XL_HEAP_LOCK)
    compiled = native.compiled
    if compiled is not None and compiled.heap_lock(page, offnum, locking_xid, infobits, block.blkno):
        return
    htup, _ = _normal_tuple(rec, page, offnum)
    infomask = _u16_from(page, htup + _T_INFOMASK)[0] & ~(HEAP_XMAX_BITS | HEAP_MOVED)
    infomask2 = _u16_from(page, htup + _T_INFOMASK2)[0] & ~HEAP_KEYS_UPDATED
    infomask, infomask2 = _fix_infomask_from_infobits(infobits, infomask, infomask2)
    # HEAP_XMAX_IS_LOCKED_ONLY: no update, so no HOT link or forward ctid.
    if infomask & HEAP_XMAX_LOCK_ONLY or (
        infomask & (HEAP_XMAX_IS_MULTI | HEAP_LOCK_MASK) == HEAP_XMAX_EXCL_LOCK
    ):
        infomask2 &= ~HEAP_HOT_UPDATED
        _set_ctid(page, htup, block.blkno, offnum)
    _u32_into(page, htup + _T_XMAX, locking_xid)
    _u32_into(page, htup + _T_FIELD3, 0)  # HeapTupleHeaderSetCmax(FirstCommandId, false)
    infomask &= ~HEAP_COMBOCID
    _u16_into(page, htup + _T_INFOMASK, infomask)
    _u16_into(page, htup + _T_INFOMASK2, infomask2)


def heap_inplace_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_inplace: overwrite the tuple's data (after t_hoff), same length."""
    (offnum,) = _main(rec, _U16)
    htup, tlen = _normal_tuple(rec, page, offnum)
    hoff = page[htup + _T_HOFF]
    newtup = block.data
    if tlen - hoff != len(newtup):
        raise _fail(rec, f"wrong tuple length: {tlen - hoff} on the page, {len(newtup)} in the record")
    page[htup + hoff : htup + tlen] = newtup


def heap_block_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool | None:
    """heap_redo (heapam.c) for one block reference."""
    op = rec.info & XLOG_HEAP_OPMASK
    try:
        if op == XLOG_HEAP_INSERT:
            heap_insert_redo(rec, block, page)
        elif op == XLOG_HEAP_DELETE:
            heap_delete_redo(rec, block, page)
        elif op == XLOG_HEAP_UPDATE:
            heap_update_redo(rec, block, page, hot=False)
        elif op == XLOG_HEAP_HOT_UPDATE:
            heap_update_redo(rec, block, page, hot=True)
        elif op == XLOG_HEAP_CONFIRM:
            heap_confirm_redo(rec, block, page)
        elif op == XLOG_HEAP_LOCK:
            heap_lock_redo(rec, block, page)
        elif op == XLOG_HEAP_INPLACE:
            heap_inplace_redo(rec, block, page)
        elif op == XLOG_HEAP_TRUNCATE:
            # Only for logical decoding; the smgr records do the work. No page effect.
            return False
        else:  # pragma: no cover - every opcode is listed above
            raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    except PageError as e:
        raise _fail(rec, str(e)) from None
    return None


# --- Heap2 (RM_HEAP2_ID) -----------------------------------------------------------


def _offsets(rec: DecodedRecord, data: bytes | memoryview, start: int, count: int) -> tuple[int, ...]:
    end = start + 2 * count
    if end > len(data):
        raise _fail(rec, f"{count} offsets do not fit in {len(data)} bytes")
    return struct.unpack_from(f"<{count}H", data, start)


def heap_prune_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_prune + heap_page_prune_execute (pruneheap.c), then PageRepairFragmentation."""
    _latest_removed, nredirected, ndead = _main(rec, _XL_HEAP_PRUNE)
    data = block.data
    if len(data) % 2:
        raise _fail(rec, f"odd offset array length {len(data)}")
    offs = _offsets(rec, data, 0, len(data) // 2)
    nred2 = 2 * nredirected
    if nred2 + ndead > len(offs):
        raise _fail(rec, f"{nredirected} redirects and {ndead} dead items exceed {len(offs)} offsets")
    max_linp = (BLCKSZ - SIZE_OF_PAGE_HEADER_DATA) // 4
    for off in offs:
        if not 1 <= off <= max_linp:
            raise _fail(rec, f"offset {off} is outside the page")
    base = SIZE_OF_PAGE_HEADER_DATA - 4
    for i in range(0, nred2, 2):
        # ItemIdSetRedirect(fromlp, tooff): lp_off = target, LP_REDIRECT, lp_len 0
        _u32_into(page, base + 4 * offs[i], (offs[i + 1] & 0x7FFF) | (LP_REDIRECT << 15))
    dead = LP_DEAD << 15
    for off in offs[nred2 : nred2 + ndead]:
        _u32_into(page, base + 4 * off, dead)  # ItemIdSetDead
    for off in offs[nred2 + ndead :]:
        _u32_into(page, base + 4 * off, 0)  # ItemIdSetUnused
    page_repair_fragmentation(page)


def heap_vacuum_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_vacuum: LP_DEAD items become LP_UNUSED, then PageTruncateLinePointerArray."""
    (nunused,) = _main(rec, _U16)
    offs = _offsets(rec, block.data, 0, nunused)
    max_linp = (BLCKSZ - SIZE_OF_PAGE_HEADER_DATA) // 4
    for off in offs:
        if not 1 <= off <= max_linp:
            raise _fail(rec, f"offset {off} is outside the page")
        _u32_into(page, SIZE_OF_PAGE_HEADER_DATA + 4 * (off - 1), 0)
    page_truncate_line_pointer_array(page)


def heap_freeze_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_freeze_page + heap_execute_freeze_tuple for each freeze plan."""
    _cutoff, ntuples = _main(rec, _XL_HEAP_FREEZE_PAGE)
    data = block.data
    size = _XL_HEAP_FREEZE_TUPLE.size
    if ntuples * size > len(data):
        raise _fail(rec, f"{ntuples} freeze plans do not fit in {len(data)} bytes")
    for i in range(ntuples):
        xmax, offset, infomask2, infomask, frzflags = _XL_HEAP_FREEZE_TUPLE.unpack_from(data, i * size)
        htup = _item_offset(rec, page, offset)
        _u32_into(page, htup + _T_XMAX, xmax)
        if frzflags & XLH_FREEZE_XVAC:
            _u32_into(page, htup + _T_FIELD3, FROZEN_TRANSACTION_ID)
        if frzflags & XLH_INVALID_XVAC:
            _u32_into(page, htup + _T_FIELD3, 0)
        _u16_into(page, htup + _T_INFOMASK, infomask)
        _u16_into(page, htup + _T_INFOMASK2, infomask2)


def heapblk_to_mapblock(heapblk: int) -> int:
    """HEAPBLK_TO_MAPBLOCK (visibilitymap.c): the VM block holding heapblk's bits."""
    return heapblk // HEAPBLOCKS_PER_PAGE


def vm_map_position(heapblk: int) -> tuple[int, int]:
    """Byte position in the VM page (PageGetContents + HEAPBLK_TO_MAPBYTE) and bit offset."""
    return _MAP_OFFSET + (heapblk % HEAPBLOCKS_PER_PAGE) // _HEAPBLOCKS_PER_BYTE, (heapblk % 4) * 2


def visibilitymap_set(page: bytearray, heapblk: int, flags: int) -> bool:
    """visibilitymap_set's change to the map page. True if it changed (and so would
    set the page LSN): only when the requested bits differ from the present ones."""
    pos, shift = vm_map_position(heapblk)
    cur = page[pos]
    if flags == (cur >> shift) & VISIBILITYMAP_VALID_BITS:
        return False
    page[pos] = (cur | (flags << shift)) & 0xFF
    return True


def visibilitymap_clear(page: bytearray, heapblk: int, flags: int) -> bool:
    """visibilitymap_clear's change to the map page (never touches the LSN)."""
    pos, shift = vm_map_position(heapblk)
    mask = (flags << shift) & 0xFF
    cur = page[pos]
    if not cur & mask:
        return False
    page[pos] = cur & ~mask
    return True


def heap_visible_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool:
    """heap_xlog_visible. Block 0 is the VM page, block 1 the heap page.

    Returns whether Postgres sets the page LSN (see the module docstring)."""
    _cutoff, flags = _main(rec, _XL_HEAP_VISIBLE)
    if block.block_id == 1:
        _set_all_visible(page)
        return _hint_bits_logged
    if block.block_id != 0:
        raise _fail(rec, f"unexpected block id {block.block_id}")
    heap_block = rec.block(1)
    if heap_block is None:
        raise _fail(rec, "visible record without the heap block")
    if _u16_from(page, _OFF_UPPER)[0] == 0:  # PageIsNew: read as zeroes
        page_init(page, 0)
    return visibilitymap_set(page, heap_block.blkno, flags)


def heap_multi_insert_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_multi_insert: several tuples into block 0 (INIT: from offset 1 on a new page)."""
    flags, ntuples = _main(rec, _XL_HEAP_MULTI_INSERT)
    isinit = bool(rec.info & XLOG_HEAP_INIT_PAGE)
    offsets: tuple[int, ...] = () if isinit else _offsets(rec, rec.main_data, 4, ntuples)
    if isinit:
        page_init(page, 0)
    compiled = native.compiled
    if compiled is not None:
        # The same loop in C; its PageErrors carry the messages of the one below.
        compiled.heap_multi_insert(page, block.data, None if isinit else memoryview(rec.main_data)[4:],
                                   ntuples, rec.xid, block.blkno)
    else:
        _multi_insert_tuples(rec, block, page, ntuples, None if isinit else offsets)
    if flags & XLH_INSERT_ALL_VISIBLE_CLEARED:
        _clear_all_visible(page)
    if flags & XLH_INSERT_ALL_FROZEN_SET:
        _set_all_visible(page)


def _multi_insert_tuples(
    rec: DecodedRecord, block: DecodedBlock, page: bytearray, ntuples: int, offsets: tuple[int, ...] | None,
) -> None:
    """heap_xlog_multi_insert's tuple loop (offsets None: an INIT record, tuples at 1..ntuples)."""
    data = memoryview(block.data)
    end = len(data)
    pos = 0
    xid = rec.xid
    blkno = block.blkno
    for i in range(ntuples):
        offnum = i + 1 if offsets is None else offsets[i]
        _check_max_offset(rec, page, offnum)
        pos += pos & 1  # SHORTALIGN
        if pos + _XL_MULTI_INSERT_TUPLE.size > end:
            raise _fail(rec, "total tuple length mismatch")
        datalen, infomask2, infomask, hoff = _XL_MULTI_INSERT_TUPLE.unpack_from(data, pos)
        pos += _XL_MULTI_INSERT_TUPLE.size
        if pos + datalen > end:
            raise _fail(rec, "total tuple length mismatch")
        tup = _build_tuple(xid, 0, blkno, offnum, infomask2, infomask, hoff, data[pos : pos + datalen])
        pos += datalen
        _add_tuple(rec, page, tup, offnum)
    if pos != end:
        raise _fail(rec, "total tuple length mismatch")


def heap_lock_updated_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """heap_xlog_lock_updated: lock an updated tuple version (xmax and infomask only)."""
    xmax, offnum, infobits, _flags = _main(rec, _XL_HEAP_LOCK)
    htup, _ = _normal_tuple(rec, page, offnum)
    infomask = _u16_from(page, htup + _T_INFOMASK)[0] & ~(HEAP_XMAX_BITS | HEAP_MOVED)
    infomask2 = _u16_from(page, htup + _T_INFOMASK2)[0] & ~HEAP_KEYS_UPDATED
    infomask, infomask2 = _fix_infomask_from_infobits(infobits, infomask, infomask2)
    _u32_into(page, htup + _T_XMAX, xmax)
    _u16_into(page, htup + _T_INFOMASK, infomask)
    _u16_into(page, htup + _T_INFOMASK2, infomask2)


def heap2_block_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool | None:
    """heap2_redo (heapam.c) for one block reference."""
    op = rec.info & XLOG_HEAP_OPMASK
    try:
        if op == XLOG_HEAP2_PRUNE:
            heap_prune_redo(rec, block, page)
        elif op == XLOG_HEAP2_VACUUM:
            heap_vacuum_redo(rec, block, page)
        elif op == XLOG_HEAP2_FREEZE_PAGE:
            heap_freeze_page_redo(rec, block, page)
        elif op == XLOG_HEAP2_VISIBLE:
            return heap_visible_redo(rec, block, page)
        elif op == XLOG_HEAP2_MULTI_INSERT:
            heap_multi_insert_redo(rec, block, page)
        elif op == XLOG_HEAP2_LOCK_UPDATED:
            heap_lock_updated_redo(rec, block, page)
        elif op in (XLOG_HEAP2_NEW_CID, XLOG_HEAP2_REWRITE):
            # NEW_CID is for logical decoding; REWRITE writes pg_logical/mappings files.
            return False
        else:  # pragma: no cover - every opcode is listed above
            raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    except PageError as e:
        raise _fail(rec, str(e)) from None
    return None


# --- implied visibility-map clears -------------------------------------------------


# Records that clear VM bits of their block 0's heap page: (rmid, opcode) -> (byte of
# the flags field in the main data, the flag that says PD_ALL_VISIBLE or the all-frozen
# bit was cleared, the VM bits to clear). The flags byte sits at offsetof(..., flags) of
# xl_heap_insert (2), xl_heap_delete (7), xl_heap_lock (7), xl_heap_multi_insert (0)
# and xl_heap_lock_updated (7) in heapam_xlog.h.
_VM_CLEARING: Final = {
    (RM_HEAP_ID, XLOG_HEAP_INSERT): (2, XLH_INSERT_ALL_VISIBLE_CLEARED, VISIBILITYMAP_VALID_BITS),
    (RM_HEAP_ID, XLOG_HEAP_DELETE): (7, XLH_DELETE_ALL_VISIBLE_CLEARED, VISIBILITYMAP_VALID_BITS),
    (RM_HEAP_ID, XLOG_HEAP_LOCK): (7, XLH_LOCK_ALL_FROZEN_CLEARED, VISIBILITYMAP_ALL_FROZEN),
    (RM_HEAP2_ID, XLOG_HEAP2_MULTI_INSERT): (0, XLH_INSERT_ALL_VISIBLE_CLEARED, VISIBILITYMAP_VALID_BITS),
    (RM_HEAP2_ID, XLOG_HEAP2_LOCK_UPDATED): (7, XLH_LOCK_ALL_FROZEN_CLEARED, VISIBILITYMAP_ALL_FROZEN),
}


def _flag_set(md: bytes, byte: int, flag: int) -> bool:
    """Whether the main data's flags byte at `byte` has `flag` (False if the data is too short)."""
    return len(md) > byte and bool(md[byte] & flag)


def _vm_clears(rec: DecodedRecord) -> list[tuple[RelFileNode, int, int]]:
    """(relation, heap block, VM flags) of every visibilitymap_clear the redo of `rec` does."""
    md = rec.main_data
    op = rec.info & XLOG_HEAP_OPMASK
    if rec.rmid == RM_HEAP_ID and op in (XLOG_HEAP_UPDATE, XLOG_HEAP_HOT_UPDATE):
        # xl_heap_update.flags (byte 7) says which of the old and new pages was cleared.
        out: list[tuple[RelFileNode, int, int]] = []
        new = rec.block(0)
        if new is None:
            return out
        if _flag_set(md, 7, XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED):
            old = rec.block(1) or new
            out.append((old.rnode, old.blkno, VISIBILITYMAP_VALID_BITS))
        if _flag_set(md, 7, XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED):
            out.append((new.rnode, new.blkno, VISIBILITYMAP_VALID_BITS))
        return out
    rule = _VM_CLEARING.get((rec.rmid, op))
    if rule is None or not _flag_set(md, rule[0], rule[1]):
        return []
    blk = rec.block(0)
    return [] if blk is None else [(blk.rnode, blk.blkno, rule[2])]


# (rmid, opcode) -> (byte of the flags field in the main data, the flags that say some VM
# bits are cleared): the cheap test that most heap records clear nothing (see _vm_clears).
_VM_CLEAR_FLAGS: Final = {
    **{key: (byte, flag) for key, (byte, flag, _bits) in _VM_CLEARING.items()},
    (RM_HEAP_ID, XLOG_HEAP_UPDATE): (7, XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED | XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED),
    (RM_HEAP_ID, XLOG_HEAP_HOT_UPDATE): (7, XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED | XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED),
}


def heap_implied_tags(rec: DecodedRecord) -> list[BufferTag]:
    """The VM pages whose bits `rec` clears without registering them."""
    header = rec.header
    rule = _VM_CLEAR_FLAGS.get((header.rmid, header.info & XLOG_HEAP_OPMASK))
    if rule is None:
        return []
    md = rec.main_data
    if len(md) <= rule[0] or not md[rule[0]] & rule[1]:
        return []  # no VM bit cleared: what _vm_clears would find, without building it
    tags: list[BufferTag] = []
    for rnode, heapblk, _bits in _vm_clears(rec):
        tag = BufferTag(rnode, VISIBILITYMAP_FORKNUM, heapblk // HEAPBLOCKS_PER_PAGE)
        if tag not in tags:
            tags.append(tag)
    return tags


def heap_implied_redo(rec: DecodedRecord, tag: BufferTag, page: bytearray) -> bool:
    """Clear the VM bits `rec` clears on page `tag`, in place.

    Always returns False: visibilitymap_clear does not set the page LSN, so the
    engine must not either (the page is still changed in place).
    """
    if tag.forknum != VISIBILITYMAP_FORKNUM:
        return False
    for rnode, heapblk, bits in _vm_clears(rec):
        if rnode == tag.rnode and heapblk // HEAPBLOCKS_PER_PAGE == tag.blkno:
            visibilitymap_clear(page, heapblk, bits)
    return False


register_block_redo(RM_HEAP_ID, heap_block_redo)
register_block_redo(RM_HEAP2_ID, heap2_block_redo)
register_implied_redo(RM_HEAP_ID, heap_implied_tags, heap_implied_redo)
register_implied_redo(RM_HEAP2_ID, heap_implied_tags, heap_implied_redo)
