"""BRIN redo (rmgr BRIN, id 17) for PostgreSQL 15.

Follows src/backend/access/brin/brin_xlog.c (brin_redo, brin_xlog_createidx,
brin_xlog_insert_update, brin_xlog_update, brin_xlog_samepage_update,
brin_xlog_revmap_extend, brin_xlog_desummarize_page) with the record layouts
of src/include/access/brin_xlog.h, the page layout of
src/include/access/brin_page.h (BrinSpecialSpace, BrinMetaPageData, revmap
pages) and brin_page_init / brin_metapage_init (brin_pageops.c) and
brinSetHeapBlockItemptr (brin_revmap.c).

The engine calls :func:`brin_redo` once per block reference. An INSERT or
UPDATE with XLOG_BRIN_INIT_PAGE registers block 0 with WILL_INIT: the engine
hands us a zeroed page and we build a regular page before adding the tuple.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from pgformat.constants import BLCKSZ, maxalign
from pgformat.page import (
    SIZE_OF_PAGE_HEADER_DATA,
    page_add_item,
    page_get_max_offset_number,
    page_index_tuple_delete_no_compact,
    page_index_tuple_overwrite,
    page_init,
)
from pgformat.rmgr import (
    RM_BRIN_ID,
    XLOG_BRIN_CREATE_INDEX,
    XLOG_BRIN_DESUMMARIZE,
    XLOG_BRIN_INIT_PAGE,
    XLOG_BRIN_INSERT,
    XLOG_BRIN_OPMASK,
    XLOG_BRIN_REVMAP_EXTEND,
    XLOG_BRIN_SAMEPAGE_UPDATE,
    XLOG_BRIN_UPDATE,
)
from pgformat.xlogrecord import DecodedBlock, DecodedRecord

from .engine import register_block_redo
from .errors import BadRecordError, UnsupportedRecordError

__all__ = [
    "BRIN_PAGETYPE_META",
    "BRIN_PAGETYPE_REVMAP",
    "BRIN_PAGETYPE_REGULAR",
    "BRIN_EVACUATE_PAGE",
    "BRIN_META_MAGIC",
    "SIZE_OF_BRIN_SPECIAL_SPACE",
    "REVMAP_PAGE_MAXITEMS",
    "brin_page_init",
    "brin_metapage_init",
    "brin_set_heap_block_itemptr",
    "brin_redo",
]

# --- brin_page.h ---------------------------------------------------------------------

BRIN_PAGETYPE_META: Final = 0xF091
BRIN_PAGETYPE_REVMAP: Final = 0xF092
BRIN_PAGETYPE_REGULAR: Final = 0xF093
BRIN_EVACUATE_PAGE: Final = 1 << 0
BRIN_META_MAGIC: Final = 0xA8109CFA
INVALID_BLOCK_NUMBER: Final = 0xFFFFFFFF

# BrinSpecialSpace {uint16 vector[MAXALIGN(1) / 2]}: the page type in the last
# element, the flags in the one before.
SIZE_OF_BRIN_SPECIAL_SPACE: Final = maxalign(1)
_SPECIAL: Final = BLCKSZ - SIZE_OF_BRIN_SPECIAL_SPACE
_TYPE_AT: Final = SIZE_OF_BRIN_SPECIAL_SPACE - 2
_FLAGS_AT: Final = SIZE_OF_BRIN_SPECIAL_SPACE - 4

# PageGetContents: MAXALIGN(SizeOfPageHeaderData).
_CONTENTS: Final = maxalign(SIZE_OF_PAGE_HEADER_DATA)
# BrinMetaPageData {brinMagic, brinVersion, pagesPerRange, lastRevmapPage}.
_META = struct.Struct("<IIII")
_META_LAST_REVMAP: Final = _CONTENTS + 12
_META_PD_LOWER: Final = _CONTENTS + _META.size

# RevmapContents: ItemPointerData rm_tids[] filling the page.
_ITEM_POINTER = struct.Struct("<HHH")  # bi_hi, bi_lo, ip_posid
REVMAP_CONTENT_SIZE: Final = BLCKSZ - _CONTENTS - SIZE_OF_BRIN_SPECIAL_SPACE
REVMAP_PAGE_MAXITEMS: Final = REVMAP_CONTENT_SIZE // _ITEM_POINTER.size

# --- brin_xlog.h record layouts ------------------------------------------------------

_XL_CREATEIDX = struct.Struct("<IH")  # pagesPerRange, version
_XL_INSERT = struct.Struct("<IIH")  # heapBlk, pagesPerRange, offnum
_XL_UPDATE = struct.Struct("<H2xIIH")  # oldOffnum, insert {heapBlk, pagesPerRange, offnum}
_XL_SAMEPAGE_UPDATE = struct.Struct("<H")  # offnum
_XL_REVMAP_EXTEND = struct.Struct("<I")  # targetBlk
_XL_DESUMMARIZE = struct.Struct("<IIH")  # pagesPerRange, heapBlk, regOffset

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


# --- page builders ----------------------------------------------------------------------


def brin_page_init(page: bytearray, page_type: int) -> None:
    """brin_page_init (brin_pageops.c): PageInit with BrinSpecialSpace, then the type."""
    page_init(page, SIZE_OF_BRIN_SPECIAL_SPACE)
    _U16.pack_into(page, _SPECIAL + _TYPE_AT, page_type)


def brin_metapage_init(page: bytearray, pages_per_range: int, version: int) -> None:
    """brin_metapage_init (brin_pageops.c): lastRevmapPage 0, pd_lower past the metadata."""
    brin_page_init(page, BRIN_PAGETYPE_META)
    _META.pack_into(page, _CONTENTS, BRIN_META_MAGIC, version, pages_per_range, 0)
    _U16.pack_into(page, 12, _META_PD_LOWER)


def brin_set_heap_block_itemptr(
    page: bytearray, pages_per_range: int, heap_blk: int, blkno: int, offnum: int
) -> None:
    """brinSetHeapBlockItemptr (brin_revmap.c): the revmap entry of `heap_blk`'s range.

    An invalid TID (blkno InvalidBlockNumber) is stored as ItemPointerSetInvalid
    does: block 0xFFFFFFFF, offset 0.
    """
    if pages_per_range == 0:
        raise BadRecordError("pagesPerRange is 0")
    index = (heap_blk // pages_per_range) % REVMAP_PAGE_MAXITEMS
    if blkno == INVALID_BLOCK_NUMBER:
        offnum = 0
    _ITEM_POINTER.pack_into(page, _CONTENTS + index * _ITEM_POINTER.size, blkno >> 16, blkno & 0xFFFF, offnum)


# --- redo functions ------------------------------------------------------------------------

_Handler = Callable[[DecodedRecord, DecodedBlock, bytearray], None]


def _unexpected_block(block: DecodedBlock) -> BadRecordError:
    return BadRecordError(f"unexpected block reference {block.block_id}")


def brin_createidx_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """brin_xlog_createidx: block 0 is the new metapage."""
    if block.block_id != 0:
        raise _unexpected_block(block)
    pages_per_range, version = _XL_CREATEIDX.unpack_from(rec.main_data, 0)
    brin_metapage_init(page, pages_per_range, version)


def _insert_update(
    rec: DecodedRecord, block: DecodedBlock, page: bytearray, heap_blk: int, pages_per_range: int, offnum: int
) -> None:
    """brin_xlog_insert_update: block 0 gets the tuple, block 1 (revmap) points at it."""
    if block.block_id == 0:
        if rec.info & XLOG_BRIN_INIT_PAGE:
            brin_page_init(page, BRIN_PAGETYPE_REGULAR)
        if page_get_max_offset_number(page) + 1 < offnum:
            raise BadRecordError("brin_xlog_insert_update: invalid max offset number")
        if page_add_item(page, block.data, offnum, True, False) == 0:
            raise BadRecordError("brin_xlog_insert_update: failed to add tuple")
    elif block.block_id == 1:
        target = rec.block(0)
        if target is None:
            raise BadRecordError("no block reference 0 (the regular page)")
        brin_set_heap_block_itemptr(page, pages_per_range, heap_blk, target.blkno, offnum)
    else:
        raise _unexpected_block(block)


def brin_insert_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """brin_xlog_insert."""
    heap_blk, pages_per_range, offnum = _XL_INSERT.unpack_from(rec.main_data, 0)
    _insert_update(rec, block, page, heap_blk, pages_per_range, offnum)


def brin_update_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """brin_xlog_update: block 2 loses the old tuple; blocks 0 and 1 as an insert."""
    old_offnum, heap_blk, pages_per_range, offnum = _XL_UPDATE.unpack_from(rec.main_data, 0)
    if block.block_id == 2:
        page_index_tuple_delete_no_compact(page, old_offnum)
    else:
        _insert_update(rec, block, page, heap_blk, pages_per_range, offnum)


def brin_samepage_update_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """brin_xlog_samepage_update: overwrite the tuple at offnum in place."""
    if block.block_id != 0:
        raise _unexpected_block(block)
    (offnum,) = _XL_SAMEPAGE_UPDATE.unpack_from(rec.main_data, 0)
    if not page_index_tuple_overwrite(page, offnum, block.data):
        raise BadRecordError("brin_xlog_samepage_update: failed to replace tuple")


def brin_revmap_extend_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """brin_xlog_revmap_extend: block 0 (metapage) records the new last revmap page,
    block 1 becomes an empty revmap page."""
    if block.block_id == 0:
        (target_blk,) = _XL_REVMAP_EXTEND.unpack_from(rec.main_data, 0)
        _U32.pack_into(page, _META_LAST_REVMAP, target_blk)
        _U16.pack_into(page, 12, _META_PD_LOWER)
    elif block.block_id == 1:
        brin_page_init(page, BRIN_PAGETYPE_REVMAP)
    else:
        raise _unexpected_block(block)


def brin_desummarize_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """brin_xlog_desummarize_page: block 0 (revmap) entry invalidated, block 1 loses the tuple."""
    pages_per_range, heap_blk, reg_offset = _XL_DESUMMARIZE.unpack_from(rec.main_data, 0)
    if block.block_id == 0:
        brin_set_heap_block_itemptr(page, pages_per_range, heap_blk, INVALID_BLOCK_NUMBER, 0)
    elif block.block_id == 1:
        page_index_tuple_delete_no_compact(page, reg_offset)
    else:
        raise _unexpected_block(block)


_HANDLERS: dict[int, _Handler] = {
    XLOG_BRIN_CREATE_INDEX: brin_createidx_redo,
    XLOG_BRIN_INSERT: brin_insert_redo,
    XLOG_BRIN_UPDATE: brin_update_redo,
    XLOG_BRIN_SAMEPAGE_UPDATE: brin_samepage_update_redo,
    XLOG_BRIN_REVMAP_EXTEND: brin_revmap_extend_redo,
    XLOG_BRIN_DESUMMARIZE: brin_desummarize_redo,
}


def brin_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """brin_redo (brin_xlog.c) for one block reference of `rec`."""
    info = rec.info & 0xF0
    handler = _HANDLERS.get(info & XLOG_BRIN_OPMASK)
    if handler is None or (info & XLOG_BRIN_INIT_PAGE and info & XLOG_BRIN_OPMASK not in (
        XLOG_BRIN_INSERT, XLOG_BRIN_UPDATE
    )):
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    handler(rec, block, page)


register_block_redo(RM_BRIN_ID, brin_redo)
