"""GiST redo (rmgr Gist, id 14) for PostgreSQL 15.

Follows src/backend/access/gist/gistxlog.c (gist_redo,
gistRedoPageUpdateRecord, gistRedoDeleteRecord, gistRedoPageSplitRecord,
gistRedoPageDelete, gistRedoPageReuse, gistRedoClearFollowRight) with the
record layouts of src/include/access/gistxlog.h, the page layout of
src/include/access/gist.h (GISTPageOpaqueData, the F_* flags,
GistPageSetDeleted) and GISTInitBuffer / gistfillbuffer of
src/backend/access/gist/gistutil.c.

The engine calls :func:`gist_redo` once per block reference; each block's
change depends only on the record (a split page's right link is the next
block reference's block number, as XLogRecGetBlockTag reads it).

The follow-right child (block 1 of PAGE_UPDATE, block 0 of PAGE_SPLIT)
---------------------------------------------------------------------
gistplacetopage clears F_FOLLOW_RIGHT and sets the NSN of the left child
after XLogInsert, so a full-page image of that child still has the flag set.
gistRedoClearFollowRight therefore updates the page even when it was restored
from an image (BLK_RESTORED). The engine restores BKPIMAGE_APPLY images
without calling the rmgr; :func:`gist_restored_image_fixup` is the step it
must run on such a restored page (see its docstring).

PAGE_REUSE and ASSIGN_LSN register no block: they only give a hot standby a
conflict point / a distinct LSN, and have no page effect.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from pgformat.constants import BLCKSZ, maxalign
from pgformat.page import (
    ITEM_ID_SIZE,
    LP_NORMAL,
    SIZE_OF_PAGE_HEADER_DATA,
    page_index_multi_delete,
    page_index_tuple_delete,
    page_index_tuple_overwrite,
    page_init,
)
from pgformat.rmgr import (
    RM_GIST_ID,
    XLOG_GIST_ASSIGN_LSN,
    XLOG_GIST_DELETE,
    XLOG_GIST_PAGE_DELETE,
    XLOG_GIST_PAGE_REUSE,
    XLOG_GIST_PAGE_SPLIT,
    XLOG_GIST_PAGE_UPDATE,
    XLR_RMGR_INFO_MASK,
)
from pgformat.xlogrecord import DecodedBlock, DecodedRecord

from .engine import register_block_redo, register_image_fixup
from .errors import BadRecordError, UnsupportedRecordError

__all__ = [
    "F_LEAF",
    "F_DELETED",
    "F_TUPLES_DELETED",
    "F_FOLLOW_RIGHT",
    "F_HAS_GARBAGE",
    "GIST_PAGE_ID",
    "GIST_ROOT_BLKNO",
    "SIZE_OF_GIST_PAGE_OPAQUE",
    "gist_init_page",
    "gist_redo",
    "gist_restored_image_fixup",
]

# --- gist.h / gist_private.h ----------------------------------------------------

F_LEAF: Final = 1 << 0
F_DELETED: Final = 1 << 1
F_TUPLES_DELETED: Final = 1 << 2
F_FOLLOW_RIGHT: Final = 1 << 3
F_HAS_GARBAGE: Final = 1 << 4
GIST_PAGE_ID: Final = 0xFF81
GIST_ROOT_BLKNO: Final = 0
INVALID_BLOCK_NUMBER: Final = 0xFFFFFFFF

# GISTPageOpaqueData {PageGistNSN nsn {xlogid, xrecoff}; BlockNumber rightlink;
# uint16 flags; uint16 gist_page_id} at pd_special.
SIZE_OF_GIST_PAGE_OPAQUE: Final = 16
_OPAQUE = struct.Struct("<IIIHH")
_NSN = struct.Struct("<II")
_OPQ_FLAGS: Final = 12
_SPECIAL: Final = BLCKSZ - SIZE_OF_GIST_PAGE_OPAQUE

# GISTDeletedPageContents {FullTransactionId deleteXid} at PageGetContents.
_PAGE_CONTENTS: Final = maxalign(SIZE_OF_PAGE_HEADER_DATA)
_DELETED_PD_LOWER: Final = _PAGE_CONTENTS + 8

# --- gistxlog.h record layouts ----------------------------------------------------

_XL_PAGE_UPDATE = struct.Struct("<HH")  # ntodelete, ntoinsert
_XL_DELETE = struct.Struct("<IH")  # latestRemovedXid, ntodelete (SizeOfGistxlogDelete = 6)
# origrlink, (pad), orignsn, origleaf, (pad), npage, markfollowright
_XL_PAGE_SPLIT = struct.Struct("<I4xQ?xH?")
_XL_PAGE_DELETE = struct.Struct("<QH")  # deleteXid, downlinkOffset (SizeOfGistxlogPageDelete = 10)

_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_u16_from = _U16.unpack_from
_u16_into = _U16.pack_into

# IndexTupleData: t_tid (6 bytes), t_info; IndexTupleSize = t_info & INDEX_SIZE_MASK.
_T_INFO: Final = 6
INDEX_SIZE_MASK: Final = 0x1FFF


# --- page helpers ------------------------------------------------------------------


def gist_init_page(page: bytearray, flags: int) -> None:
    """gistinitpage / GISTInitBuffer (gistutil.c): PageInit with GiST special space."""
    page_init(page, SIZE_OF_GIST_PAGE_OPAQUE)
    _OPAQUE.pack_into(page, _SPECIAL, 0, 0, INVALID_BLOCK_NUMBER, flags, GIST_PAGE_ID)


def _special(page: bytearray) -> int:
    special = int(_u16_from(page, 16)[0])
    if special + SIZE_OF_GIST_PAGE_OPAQUE > BLCKSZ:
        raise BadRecordError(f"page has no room for GISTPageOpaqueData (pd_special {special})")
    return special


def _get_flags(page: bytearray, special: int) -> int:
    return int(_u16_from(page, special + _OPQ_FLAGS)[0])


def _set_flags(page: bytearray, special: int, flags: int) -> None:
    _u16_into(page, special + _OPQ_FLAGS, flags)


def _set_nsn(page: bytearray, special: int, nsn: int) -> None:
    """GistPageSetNSN: PageXLogRecPtrSet (xlogid high half first)."""
    _NSN.pack_into(page, special, (nsn >> 32) & 0xFFFFFFFF, nsn & 0xFFFFFFFF)


def _index_tuples(data: memoryview, start: int, count: int | None) -> list[memoryview]:
    """Split concatenated IndexTuples (each IndexTupleSize bytes) from `start`.

    With `count`, exactly that many must be there and fill the buffer.
    """
    tuples: list[memoryview] = []
    pos = start
    end = len(data)
    while pos < end:
        if pos + 8 > end:
            raise BadRecordError("truncated index tuple header in record data")
        size = int(_u16_from(data, pos + _T_INFO)[0]) & INDEX_SIZE_MASK
        if size < 8 or pos + size > end:
            raise BadRecordError(f"index tuple of {size} bytes at data offset {pos} does not fit")
        tuples.append(data[pos : pos + size])
        pos += size
    if count is not None and len(tuples) != count:
        raise BadRecordError(f"record carries {len(tuples)} tuples, header says {count}")
    return tuples


def _append_items(page: bytearray, items: Sequence[memoryview]) -> None:
    """gistfillbuffer (gistutil.c) at maxoff + 1: PageAddItem of each item in turn.

    Appending at OffsetNumberNext(maxoff) never shuffles line pointers or
    looks for free ones, so the items are laid out in one pass: each lands at
    the new pd_upper, only its own bytes written (padding keeps the old bytes,
    as C's memcpy does).
    """
    lower0, upper, special = struct.unpack_from("<HHH", page, 12)
    if lower0 < SIZE_OF_PAGE_HEADER_DATA or lower0 > upper or upper > special or special > BLCKSZ:
        raise BadRecordError(f"corrupted page pointers: lower {lower0}, upper {upper}, special {special}")
    lower = lower0
    linps: list[int] = []
    for item in items:
        size = len(item)
        upper -= maxalign(size)
        lower += ITEM_ID_SIZE
        if lower > upper:
            raise BadRecordError(f"failed to add item to GiST index page, size {size} bytes")
        page[upper : upper + size] = item
        linps.append(upper | (LP_NORMAL << 15) | (size << 17))
    if linps:
        struct.pack_into(f"<{len(linps)}I", page, lower0, *linps)
        struct.pack_into("<HH", page, 12, lower, upper)


def _offsets(data: memoryview, start: int, n: int) -> list[int]:
    if start + 2 * n > len(data):
        raise BadRecordError(f"record data too short for {n} offsets")
    return list(struct.unpack_from(f"<{n}H", data, start))


# --- redo functions ----------------------------------------------------------------


def _clear_follow_right(rec: DecodedRecord, page: bytearray) -> None:
    """gistRedoClearFollowRight's page change: NSN = record end, F_FOLLOW_RIGHT off."""
    special = _special(page)
    _set_nsn(page, special, rec.end_lsn)
    _set_flags(page, special, _get_flags(page, special) & ~F_FOLLOW_RIGHT)


def gist_page_update_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """gistRedoPageUpdateRecord (gistxlog.c): block 0 is the target, block 1 the left child."""
    if block.block_id == 1:
        _clear_follow_right(rec, page)
        return
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    ntodelete, ntoinsert = _XL_PAGE_UPDATE.unpack_from(rec.main_data, 0)
    data = memoryview(block.data)

    if ntodelete == 1 and ntoinsert == 1:
        # One tuple replaced by one other: PageIndexTupleOverwrite, as gistplacetopage does.
        offnum = int(_u16_from(data, 0)[0])
        (itup,) = _index_tuples(data, 2, 1)
        if not page_index_tuple_overwrite(page, offnum, itup):
            raise BadRecordError(f"failed to add item to GiST index page, size {len(itup)} bytes")
        return

    pos = 0
    if ntodelete > 0:
        todelete = _offsets(data, 0, ntodelete)
        pos = 2 * ntodelete
        page_index_multi_delete(page, todelete)
        special = _special(page)
        flags = _get_flags(page, special)
        if flags & F_LEAF:
            _set_flags(page, special, flags | F_TUPLES_DELETED)

    if pos < len(data):
        _append_items(page, _index_tuples(data, pos, ntoinsert))


def gist_delete_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """gistRedoDeleteRecord (gistxlog.c): remove tuples killed by gistprunepage.

    Deliberate difference from gistxlog.c: Postgres's redo also sets
    F_TUPLES_DELETED here, but gistprunepage (gist.c), which wrote the
    record, only clears F_HAS_GARBAGE. gist_mask does not hide that bit, so
    PostgreSQL 15 fails its own wal_consistency_checking on this record
    ("inconsistent page found", see tests/test_redo_gist_spgist.py). We
    produce the primary's page. Nothing but pageinspect reads the bit.
    """
    _latest_removed_xid, ntodelete = _XL_DELETE.unpack_from(rec.main_data, 0)
    if len(rec.main_data) > _XL_DELETE.size:
        data = memoryview(rec.main_data)
        page_index_multi_delete(page, _offsets(data, _XL_DELETE.size, ntodelete))
    special = _special(page)
    _set_flags(page, special, _get_flags(page, special) & ~F_HAS_GARBAGE)


def gist_page_split_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """gistRedoPageSplitRecord (gistxlog.c).

    Block 0 (optional) is the left child whose split this completes; blocks
    1..npage are the pages the split page became, rebuilt from scratch.
    """
    if block.block_id == 0:
        _clear_follow_right(rec, page)
        return
    origrlink, orignsn, origleaf, npage, markfollowright = _XL_PAGE_SPLIT.unpack_from(rec.main_data, 0)
    i = block.block_id - 1
    if not 0 <= i < npage:
        raise BadRecordError(f"block reference {block.block_id} is not one of the {npage} split pages")
    first = rec.block(1)
    isrootsplit = first is not None and first.blkno == GIST_ROOT_BLKNO
    blkno = block.blkno

    data = memoryview(block.data)
    if len(data) < 4:
        raise BadRecordError("split page data has no tuple count")
    num = int(_I32.unpack_from(data, 0)[0])
    tuples = _index_tuples(data, 4, num)

    flags = F_LEAF if origleaf and blkno != GIST_ROOT_BLKNO else 0
    gist_init_page(page, flags)
    _append_items(page, tuples)

    if blkno == GIST_ROOT_BLKNO:
        rightlink = INVALID_BLOCK_NUMBER
        follow_right = False
    else:
        if i < npage - 1:
            nxt = rec.block(i + 2)
            if nxt is None:
                raise BadRecordError(f"split page {i + 2} has no block reference")
            rightlink = nxt.blkno
        else:
            rightlink = origrlink
        follow_right = i < npage - 1 and not isrootsplit and markfollowright
    _OPAQUE.pack_into(
        page, _SPECIAL, (orignsn >> 32) & 0xFFFFFFFF, orignsn & 0xFFFFFFFF, rightlink,
        flags | F_FOLLOW_RIGHT if follow_right else flags, GIST_PAGE_ID,
    )


def gist_page_delete_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """gistRedoPageDelete (gistxlog.c): block 0 the deleted leaf, block 1 its parent."""
    delete_xid, downlink_offset = _XL_PAGE_DELETE.unpack_from(rec.main_data, 0)
    if block.block_id == 0:
        # GistPageSetDeleted (gist.h)
        special = _special(page)
        _set_flags(page, special, _get_flags(page, special) | F_DELETED)
        _u16_into(page, 12, _DELETED_PD_LOWER)
        struct.pack_into("<Q", page, _PAGE_CONTENTS, delete_xid)
    elif block.block_id == 1:
        page_index_tuple_delete(page, downlink_offset)
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


def _no_page_effect(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """PAGE_REUSE and ASSIGN_LSN register no block; one referenced anyway is bad input."""
    raise BadRecordError("record type has no page effect but references a block")


_HANDLERS: dict[int, Callable[[DecodedRecord, DecodedBlock, bytearray], None]] = {
    XLOG_GIST_PAGE_UPDATE: gist_page_update_redo,
    XLOG_GIST_DELETE: gist_delete_redo,
    XLOG_GIST_PAGE_REUSE: _no_page_effect,
    XLOG_GIST_PAGE_SPLIT: gist_page_split_redo,
    XLOG_GIST_PAGE_DELETE: gist_page_delete_redo,
    XLOG_GIST_ASSIGN_LSN: _no_page_effect,
}


def gist_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """gist_redo (gistxlog.c) for one block reference of `rec`."""
    handler = _HANDLERS.get(rec.info & XLR_RMGR_INFO_MASK)
    if handler is None:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    handler(rec, block, page)


def gist_restored_image_fixup(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool:
    """What gistRedoClearFollowRight does to a page restored from a BKPIMAGE_APPLY image.

    For block 1 of PAGE_UPDATE and block 0 of PAGE_SPLIT, Postgres sets the
    NSN to the record's end and clears F_FOLLOW_RIGHT on the restored page
    too (the image predates that change). Returns True when it changed the
    page; the caller then keeps pd_lsn at the record's end. Any other block
    is left alone (False). The engine must call this after restoring an
    image for a Gist record, or the child keeps F_FOLLOW_RIGHT and a later
    insert would add its downlink a second time.
    """
    if rec.rmid != RM_GIST_ID or not block.has_image:
        return False
    info = rec.info & XLR_RMGR_INFO_MASK
    if (info == XLOG_GIST_PAGE_UPDATE and block.block_id == 1) or (
        info == XLOG_GIST_PAGE_SPLIT and block.block_id == 0
    ):
        _clear_follow_right(rec, page)  # the engine reports BadRecordError with the record's position
        return True
    return False


register_block_redo(RM_GIST_ID, gist_redo)
register_image_fixup(RM_GIST_ID, gist_restored_image_fixup)
