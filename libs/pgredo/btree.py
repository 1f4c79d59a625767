"""B-tree redo (rmgr Btree, id 11) for PostgreSQL 15.

Follows src/backend/access/nbtree/nbtxlog.c (btree_redo and the
btree_xlog_* functions) with the record layouts of
src/include/access/nbtxlog.h, the page layout of src/include/access/nbtree.h
(BTPageOpaqueData, BTMetaPageData, BTDeletedPageData, posting lists), the
posting-list helpers of src/backend/access/nbtree/nbtdedup.c
(_bt_dedup_start_pending, _bt_dedup_save_htid, _bt_dedup_finish_pending,
_bt_form_posting, _bt_update_posting, _bt_swap_posting) and _bt_pageinit /
_bt_restore_meta of nbtpage.c / nbtxlog.c.

Postgres redoes a multi-block record (a split touches the left page, the new
right page, the right sibling and the child whose split it completes) in one
call; the engine here calls :func:`btree_redo` once per block reference, so
every block's change is computed on its own from the record. Where nbtxlog.c
reads another block's number (the split's right page number), it comes from
that block reference's tag, as XLogRecGetBlockTag does.

Pages that redo rebuilds (split halves, deduplicated pages) are built on a
zeroed temporary page, as PageGetTempPageCopySpecial does, so the bytes left
in free space are the ones Postgres leaves.
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
    page_add_item_extended,
    page_get_item_id,
    page_index_multi_delete,
    page_index_tuple_delete,
    page_index_tuple_overwrite,
    page_init,
)
from pgformat.rmgr import (
    RM_BTREE_ID,
    XLOG_BTREE_DEDUP,
    XLOG_BTREE_DELETE,
    XLOG_BTREE_INSERT_LEAF,
    XLOG_BTREE_INSERT_META,
    XLOG_BTREE_INSERT_POST,
    XLOG_BTREE_INSERT_UPPER,
    XLOG_BTREE_MARK_PAGE_HALFDEAD,
    XLOG_BTREE_META_CLEANUP,
    XLOG_BTREE_NEWROOT,
    XLOG_BTREE_REUSE_PAGE,
    XLOG_BTREE_SPLIT_L,
    XLOG_BTREE_SPLIT_R,
    XLOG_BTREE_UNLINK_PAGE,
    XLOG_BTREE_UNLINK_PAGE_META,
    XLOG_BTREE_VACUUM,
    XLR_RMGR_INFO_MASK,
)
from pgformat.xlogrecord import DecodedBlock, DecodedRecord

from .engine import register_block_redo
from .errors import BadRecordError, UnsupportedRecordError

__all__ = [
    "BTP_LEAF",
    "BTP_ROOT",
    "BTP_DELETED",
    "BTP_META",
    "BTP_HALF_DEAD",
    "BTP_SPLIT_END",
    "BTP_HAS_GARBAGE",
    "BTP_INCOMPLETE_SPLIT",
    "BTP_HAS_FULLXID",
    "BTREE_MAGIC",
    "P_NONE",
    "btree_redo",
]

# --- nbtree.h -----------------------------------------------------------------

BTP_LEAF: Final = 1 << 0
BTP_ROOT: Final = 1 << 1
BTP_DELETED: Final = 1 << 2
BTP_META: Final = 1 << 3
BTP_HALF_DEAD: Final = 1 << 4
BTP_SPLIT_END: Final = 1 << 5
BTP_HAS_GARBAGE: Final = 1 << 6
BTP_INCOMPLETE_SPLIT: Final = 1 << 7
BTP_HAS_FULLXID: Final = 1 << 8

BTREE_MAGIC: Final = 0x053162
P_NONE: Final = 0
P_HIKEY: Final = 1
P_FIRSTKEY: Final = 2

# BTPageOpaqueData {btpo_prev, btpo_next, btpo_level, btpo_flags, btpo_cycleid}
SIZE_OF_BT_PAGE_OPAQUE: Final = 16
_OPAQUE = struct.Struct("<IIIHH")
_OPQ_PREV: Final = 0
_OPQ_NEXT: Final = 4
_OPQ_FLAGS: Final = 12

# BTMetaPageData at PageGetContents (MAXALIGN(SizeOfPageHeaderData) = 24):
# magic, version, root, level, fastroot, fastlevel, last_cleanup_num_delpages,
# (4 pad bytes), float8 last_cleanup_num_heap_tuples, bool allequalimage.
_META = struct.Struct("<7I4xd?")
_SIZEOF_BT_META_PAGE_DATA: Final = 48
_PAGE_CONTENTS: Final = maxalign(SIZE_OF_PAGE_HEADER_DATA)

# BTDeletedPageData {FullTransactionId safexid} at PageGetContents.
_SIZEOF_BT_DELETED_PAGE_DATA: Final = 8
_U64 = struct.Struct("<Q")

# IndexTupleData (itup.h): t_tid {bi_hi, bi_lo, ip_posid}, t_info.
_SIZEOF_INDEX_TUPLE_DATA: Final = 8
_SIZEOF_ITEM_POINTER: Final = 6
_INDEX_TUPLE = struct.Struct("<HHHH")
_BLOCK_ID = struct.Struct("<HH")
_T_INFO: Final = 6
INDEX_SIZE_MASK: Final = 0x1FFF
INDEX_ALT_TID_MASK: Final = 0x2000  # INDEX_AM_RESERVED_BIT
BT_OFFSET_MASK: Final = 0x0FFF
BT_IS_POSTING: Final = 0x2000

# BTMaxItemSize(page) for an 8 KB page: the deduplication limit redo uses.
_BT_MAX_ITEM_SIZE: Final = (
    (BLCKSZ - maxalign(SIZE_OF_PAGE_HEADER_DATA + 3 * ITEM_ID_SIZE + 3 * _SIZEOF_ITEM_POINTER)
     - maxalign(SIZE_OF_BT_PAGE_OPAQUE)) // 3
) & ~7

# --- nbtxlog.h record layouts ----------------------------------------------------

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
# xl_btree_metadata {version, root, level, fastroot, fastlevel,
# last_cleanup_num_delpages, allequalimage}
_XL_METADATA = struct.Struct("<6I?")
_XL_INSERT = struct.Struct("<H")  # offnum
_XL_SPLIT = struct.Struct("<IHHH")  # level, firstrightoff, newitemoff, postingoff
_XL_DEDUP = struct.Struct("<H")  # nintervals
_XL_VACUUM = struct.Struct("<HH")  # ndeleted, nupdated
_XL_DELETE = struct.Struct("<IHH")  # latestRemovedXid, ndeleted, nupdated
# poffset, leafblk, leftblk, rightblk, topparent
_XL_MARK_PAGE_HALFDEAD = struct.Struct("<H2xIIII")
# leftsib, rightsib, level, safexid (8-aligned), leafleftsib, leafrightsib, leaftopparent
_XL_UNLINK_PAGE = struct.Struct("<III4xQIII")
_XL_NEWROOT = struct.Struct("<II")  # rootblk, level
_BT_DEDUP_INTERVAL = struct.Struct("<HH")  # baseoff, nitems

_u16_from = _U16.unpack_from
_u16_into = _U16.pack_into
_u32_into = _U32.pack_into


# --- page helpers ------------------------------------------------------------------


def _special(page: bytearray) -> int:
    special = int(_u16_from(page, 16)[0])
    if special + SIZE_OF_BT_PAGE_OPAQUE > BLCKSZ:
        raise BadRecordError(f"page has no room for BTPageOpaqueData (pd_special {special})")
    return special


def _bt_pageinit(page: bytearray) -> int:
    """_bt_pageinit (nbtpage.c): PageInit with a BTPageOpaqueData special space.

    Returns pd_special.
    """
    page_init(page, SIZE_OF_BT_PAGE_OPAQUE)
    return BLCKSZ - SIZE_OF_BT_PAGE_OPAQUE


def _set_opaque(
    page: bytearray, special: int, prev: int, next_: int, level: int, flags: int
) -> None:
    _OPAQUE.pack_into(page, special, prev, next_, level, flags, 0)


def _get_flags(page: bytearray, special: int) -> int:
    return int(_u16_from(page, special + _OPQ_FLAGS)[0])


def _set_flags(page: bytearray, special: int, flags: int) -> None:
    _u16_into(page, special + _OPQ_FLAGS, flags)


def _temp_page_copy_special(page: bytearray) -> bytearray:
    """PageGetTempPageCopySpecial (bufpage.c): a fresh page with page's special space."""
    special = int(_u16_from(page, 16)[0])
    temp = bytearray(BLCKSZ)
    page_init(temp, BLCKSZ - special)
    temp[special:] = page[special:]
    return temp


def _append_items(page: bytearray, items: Sequence[bytes | bytearray | memoryview]) -> None:
    """PageAddItem(page, item, len(item), maxoff + 1, false, false) for each item in turn.

    Only for a freshly initialized (zeroed) page, as all of nbtxlog.c's
    rebuilt pages are: each item lands just below the previous one, its
    MAXALIGN padding keeps the page's zeroes, and its line pointer is
    LP_NORMAL with lp_len = len(item). Raises BadRecordError where PageAddItem
    would fail for lack of room.
    """
    lower0, upper0 = struct.unpack_from("<HH", page, 12)
    nitems = len(items)
    if nitems == 0:
        return
    sizes = [len(item) for item in items]
    total = sum(maxalign(size) for size in sizes)
    upper = upper0 - total
    lower = lower0 + ITEM_ID_SIZE * nitems
    if lower > upper:
        raise BadRecordError("index tuples do not fit on the page")
    # Items go top-down: the first sits just below upper0, the last at upper.
    area = bytearray(total)
    pos = total
    linps = [0] * nitems
    for i, item in enumerate(items):
        size = sizes[i]
        pos -= maxalign(size)
        area[pos : pos + size] = item
        linps[i] = (upper + pos) | (LP_NORMAL << 15) | (size << 17)
    page[upper:upper0] = area
    struct.pack_into(f"<{nitems}I", page, lower0, *linps)
    struct.pack_into("<HH", page, 12, lower, upper)


def _line_pointers(page: bytearray) -> tuple[int, ...]:
    """The raw line pointer array (PageGetItemId for every offset)."""
    lower = int(_u16_from(page, 12)[0])
    nline = (lower - SIZE_OF_PAGE_HEADER_DATA) // ITEM_ID_SIZE if lower > SIZE_OF_PAGE_HEADER_DATA else 0
    if SIZE_OF_PAGE_HEADER_DATA + nline * ITEM_ID_SIZE > BLCKSZ:
        raise BadRecordError(f"invalid pd_lower {lower}")
    return struct.unpack_from(f"<{nline}I", page, SIZE_OF_PAGE_HEADER_DATA)


def _item_at(view: memoryview, raw: int) -> memoryview:
    """PageGetItem for a raw line pointer, checked against the page."""
    off = raw & 0x7FFF
    length = raw >> 17
    if off < SIZE_OF_PAGE_HEADER_DATA or off + length > BLCKSZ:
        raise BadRecordError(f"item at {off} of {length} bytes lies outside the page")
    return view[off : off + length]


def _page_item(page: bytearray, offnum: int) -> memoryview:
    """PageGetItem(page, PageGetItemId(page, offnum)), checked against the page."""
    lower = int(_u16_from(page, 12)[0])
    if not 1 <= offnum <= (lower - SIZE_OF_PAGE_HEADER_DATA) // ITEM_ID_SIZE:
        raise BadRecordError(f"offset {offnum} is not on the page")
    lp = page_get_item_id(page, offnum)
    if lp.lp_off + lp.lp_len > BLCKSZ or lp.lp_off < SIZE_OF_PAGE_HEADER_DATA:
        raise BadRecordError(f"item {offnum} lies outside the page")
    return memoryview(page)[lp.lp_off : lp.lp_off + lp.lp_len]


def _pad(item: bytes | bytearray | memoryview, size: int) -> bytes | bytearray | memoryview:
    """The first `size` bytes of item, zero-padded (C reads MAXALIGN bytes of a tuple)."""
    if len(item) == size:
        return item
    if len(item) > size:
        return item[:size]
    return bytes(item) + bytes(size - len(item))


# --- index tuples (itup.h, nbtree.h) -------------------------------------------------


def _index_tuple_size(buf: bytes | bytearray | memoryview, off: int = 0) -> int:
    """IndexTupleSize."""
    return int(_u16_from(buf, off + _T_INFO)[0]) & INDEX_SIZE_MASK


def _is_posting(tup: bytes | bytearray | memoryview) -> bool:
    """BTreeTupleIsPosting."""
    return bool(_u16_from(tup, _T_INFO)[0] & INDEX_ALT_TID_MASK) and bool(
        _u16_from(tup, 4)[0] & BT_IS_POSTING
    )


def _posting_offset(tup: bytes | bytearray | memoryview) -> int:
    """BTreeTupleGetPostingOffset: the block number field of t_tid."""
    hi, lo = _BLOCK_ID.unpack_from(tup, 0)
    return int((hi << 16) | lo)


def _n_posting(tup: bytes | bytearray | memoryview) -> int:
    """BTreeTupleGetNPosting."""
    return int(_u16_from(tup, 4)[0]) & BT_OFFSET_MASK


def _set_posting(itup: bytearray, nhtids: int, postingoffset: int) -> None:
    """BTreeTupleSetPosting."""
    info = int(_u16_from(itup, _T_INFO)[0]) | INDEX_ALT_TID_MASK
    _INDEX_TUPLE.pack_into(
        itup, 0, (postingoffset >> 16) & 0xFFFF, postingoffset & 0xFFFF, nhtids | BT_IS_POSTING, info
    )


def _set_size(itup: bytearray, newsize: int) -> None:
    info = int(_u16_from(itup, _T_INFO)[0])
    _u16_into(itup, _T_INFO, (info & ~INDEX_SIZE_MASK) | newsize)


def _form_posting(base: bytes | bytearray | memoryview, htids: bytes | bytearray, nhtids: int) -> bytearray:
    """_bt_form_posting (nbtdedup.c): base's key with the given heap TIDs."""
    keysize = _posting_offset(base) if _is_posting(base) else _index_tuple_size(base)
    if nhtids > 1:
        newsize = maxalign(keysize + nhtids * _SIZEOF_ITEM_POINTER)
    else:
        newsize = keysize
    if newsize > INDEX_SIZE_MASK or keysize > len(base):
        raise BadRecordError(f"posting list tuple of {newsize} bytes is too large")
    itup = bytearray(newsize)
    itup[:keysize] = base[:keysize]
    _set_size(itup, newsize)
    if nhtids > 1:
        _set_posting(itup, nhtids, keysize)
        itup[keysize : keysize + nhtids * _SIZEOF_ITEM_POINTER] = htids
    else:
        info = int(_u16_from(itup, _T_INFO)[0]) & ~INDEX_ALT_TID_MASK
        _u16_into(itup, _T_INFO, info)
        itup[0:_SIZEOF_ITEM_POINTER] = htids[0:_SIZEOF_ITEM_POINTER]
    return itup


def _update_posting(origtuple: bytes | bytearray | memoryview, deletetids: Sequence[int]) -> bytearray:
    """_bt_update_posting (nbtdedup.c): origtuple without the TIDs at `deletetids`."""
    if not _is_posting(origtuple):
        raise BadRecordError("updated tuple is not a posting list tuple")
    norig = _n_posting(origtuple)
    nhtids = norig - len(deletetids)
    if not 0 < nhtids < norig:
        raise BadRecordError(f"cannot delete {len(deletetids)} of {norig} TIDs of a posting list")
    keysize = _posting_offset(origtuple)
    if keysize + norig * _SIZEOF_ITEM_POINTER > len(origtuple):
        raise BadRecordError("posting list extends past its tuple")
    newsize = maxalign(keysize + nhtids * _SIZEOF_ITEM_POINTER) if nhtids > 1 else keysize
    itup = bytearray(newsize)
    itup[:keysize] = origtuple[:keysize]
    _set_size(itup, newsize)
    if nhtids > 1:
        _set_posting(itup, nhtids, keysize)
        pos = keysize
    else:
        _u16_into(itup, _T_INFO, int(_u16_from(itup, _T_INFO)[0]) & ~INDEX_ALT_TID_MASK)
        pos = 0
    deleted = set(deletetids)
    src = keysize
    for i in range(norig):
        if i not in deleted:
            itup[pos : pos + _SIZEOF_ITEM_POINTER] = origtuple[src : src + _SIZEOF_ITEM_POINTER]
            pos += _SIZEOF_ITEM_POINTER
        src += _SIZEOF_ITEM_POINTER
    return itup


def _swap_posting(newitem: bytearray, oposting: bytes | bytearray | memoryview, postingoff: int) -> bytearray:
    """_bt_swap_posting (nbtdedup.c): split a posting list around newitem's TID.

    Returns the new posting list (same size as oposting); newitem's heap TID
    becomes oposting's old maximum TID.
    """
    if not _is_posting(oposting):
        raise BadRecordError("posting list split of a tuple that is not a posting list")
    nhtids = _n_posting(oposting)
    if not 0 < postingoff < nhtids:
        raise BadRecordError(
            f"posting list tuple with {nhtids} items cannot be split at offset {postingoff}"
        )
    size = _index_tuple_size(oposting)
    base = _posting_offset(oposting)
    end = base + nhtids * _SIZEOF_ITEM_POINTER
    if end > size or size > len(oposting):
        raise BadRecordError("posting list extends past its tuple")
    nposting = bytearray(oposting[:size])
    replacepos = base + postingoff * _SIZEOF_ITEM_POINTER
    nposting[replacepos + _SIZEOF_ITEM_POINTER : end] = nposting[replacepos : end - _SIZEOF_ITEM_POINTER]
    nposting[replacepos : replacepos + _SIZEOF_ITEM_POINTER] = newitem[0:_SIZEOF_ITEM_POINTER]
    newitem[0:_SIZEOF_ITEM_POINTER] = oposting[end - _SIZEOF_ITEM_POINTER : end]
    return nposting


# --- shared redo steps ---------------------------------------------------------------


def _bt_restore_page(page: bytearray, data: bytes | memoryview) -> None:
    """_bt_restore_page (nbtxlog.c): re-enter the tuples of a page's upper part.

    Postgres adds the items in reverse so each lands where it was; the result
    is the data copied verbatim to the top of the page, with line pointer i
    pointing at the i-th item from the top (lp_len = MAXALIGN(IndexTupleSize)).
    """
    length = len(data)
    sizes: list[int] = []
    pos = 0
    while pos < length:
        if pos + _SIZEOF_INDEX_TUPLE_DATA > length:
            raise BadRecordError("truncated index tuple in page data")
        itemsz = maxalign(_index_tuple_size(data, pos))
        if itemsz == 0:
            raise BadRecordError("zero-length index tuple in page data")
        sizes.append(itemsz)
        pos += itemsz
    if pos != length:
        raise BadRecordError("page data does not end at a tuple boundary")
    lower0, upper0 = struct.unpack_from("<HH", page, 12)
    nitems = len(sizes)
    lower = lower0 + nitems * ITEM_ID_SIZE
    upper = upper0 - length
    if lower > upper:
        raise BadRecordError("_bt_restore_page: cannot add item to page")
    page[upper:upper0] = data
    linps = [0] * nitems
    top = upper0
    for i in range(nitems):  # item number i + 1 is the i-th from the top
        itemsz = sizes[nitems - 1 - i]
        top -= itemsz
        linps[i] = top | (LP_NORMAL << 15) | (itemsz << 17)
    struct.pack_into(f"<{nitems}I", page, lower0, *linps)
    struct.pack_into("<HH", page, 12, lower, upper)


def _bt_restore_meta(block: DecodedBlock, page: bytearray) -> None:
    """_bt_restore_meta (nbtxlog.c): rebuild the metapage from xl_btree_metadata."""
    if len(block.data) < _XL_METADATA.size:
        raise BadRecordError(f"metapage data is {len(block.data)} bytes, expected {_XL_METADATA.size}")
    version, root, level, fastroot, fastlevel, num_delpages, allequalimage = (
        _XL_METADATA.unpack_from(block.data, 0)
    )
    special = _bt_pageinit(page)
    _META.pack_into(
        page, _PAGE_CONTENTS, BTREE_MAGIC, version, root, level, fastroot, fastlevel,
        num_delpages, -1.0, allequalimage,
    )
    _set_opaque(page, special, 0, 0, 0, BTP_META)
    _u16_into(page, 12, _PAGE_CONTENTS + _SIZEOF_BT_META_PAGE_DATA)


def _bt_clear_incomplete_split(page: bytearray) -> None:
    """_bt_clear_incomplete_split (nbtxlog.c) on the child page."""
    special = _special(page)
    _set_flags(page, special, _get_flags(page, special) & ~BTP_INCOMPLETE_SPLIT)


def _add_half_dead_hikey(page: bytearray, topparent: int) -> None:
    """The dummy high key of a half-dead leaf: BTreeTupleSetTopParent(&trunctuple, topparent)."""
    trunctuple = _INDEX_TUPLE.pack(
        (topparent >> 16) & 0xFFFF, topparent & 0xFFFF, 0, _SIZEOF_INDEX_TUPLE_DATA | INDEX_ALT_TID_MASK
    )
    _append_items(page, (trunctuple,))


def _main(rec: DecodedRecord, st: struct.Struct) -> tuple[int, ...]:
    if len(rec.main_data) < st.size:
        raise BadRecordError(f"main data is {len(rec.main_data)} bytes, expected at least {st.size}")
    return st.unpack_from(rec.main_data, 0)


def _other_blkno(rec: DecodedRecord, block_id: int) -> int | None:
    ref = rec.block(block_id)
    return ref.blkno if ref is not None else None


# --- record types ------------------------------------------------------------------------


def _btree_xlog_insert(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_insert (nbtxlog.c): INSERT_LEAF / INSERT_UPPER / INSERT_META / INSERT_POST."""
    info = rec.info & XLR_RMGR_INFO_MASK
    bid = block.block_id
    if bid == 1 and info in (XLOG_BTREE_INSERT_UPPER, XLOG_BTREE_INSERT_META):
        _bt_clear_incomplete_split(page)
        return
    if bid == 2 and info == XLOG_BTREE_INSERT_META:
        _bt_restore_meta(block, page)
        return
    if bid != 0:
        raise BadRecordError(f"unexpected block reference {bid}")
    (offnum,) = _main(rec, _XL_INSERT)
    data = block.data
    if info != XLOG_BTREE_INSERT_POST:
        if page_add_item_extended(page, data, offnum, 0) == 0:
            raise BadRecordError("failed to add new item")
        return
    # A posting list split: the record holds postingoff, then orignewitem.
    if len(data) < 2 + _SIZEOF_INDEX_TUPLE_DATA:
        raise BadRecordError("INSERT_POST data too short")
    (postingoff,) = _u16_from(data, 0)
    datalen = len(data) - 2
    newitem = bytearray(data[2 : 2 + _index_tuple_size(data, 2)])  # CopyIndexTuple
    oposting = _page_item(page, offnum - 1)
    nposting = _swap_posting(newitem, oposting, postingoff)
    size = maxalign(_index_tuple_size(nposting))
    lp = page_get_item_id(page, offnum - 1)
    if lp.lp_off + size > BLCKSZ:
        raise BadRecordError("posting list extends past the page")
    page[lp.lp_off : lp.lp_off + size] = _pad(nposting, size)
    if page_add_item_extended(page, _pad(newitem, datalen), offnum, 0) == 0:
        raise BadRecordError("failed to add posting split new item")


def _btree_xlog_split(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_split (nbtxlog.c): SPLIT_L / SPLIT_R, one block at a time."""
    newitemonleft = (rec.info & XLR_RMGR_INFO_MASK) == XLOG_BTREE_SPLIT_L
    level, firstrightoff, newitemoff, postingoff = _main(rec, _XL_SPLIT)
    isleaf = level == 0
    bid = block.block_id

    if bid == 3 and not isleaf:
        # the child whose split this downlink insertion completes
        _bt_clear_incomplete_split(page)
        return

    if bid == 1:
        # Reconstruct the new right sibling from scratch.
        origpagenumber = _other_blkno(rec, 0)
        if origpagenumber is None:
            raise BadRecordError("split record has no block 0")
        spagenumber = _other_blkno(rec, 2)
        special = _bt_pageinit(page)
        _set_opaque(
            page, special, origpagenumber, P_NONE if spagenumber is None else spagenumber,
            level, BTP_LEAF if isleaf else 0,
        )
        _bt_restore_page(page, block.data)
        return

    if bid == 2:
        # Fix the left-link of the page to the right of the new right sibling.
        rightpagenumber = _other_blkno(rec, 1)
        if rightpagenumber is None:
            raise BadRecordError("split record has no block 1")
        _u32_into(page, _special(page) + _OPQ_PREV, rightpagenumber)
        return

    if bid != 0:
        raise BadRecordError(f"unexpected block reference {bid}")

    # The original page becomes the left half.
    rightpagenumber = _other_blkno(rec, 1)
    if rightpagenumber is None:
        raise BadRecordError("split record has no block 1")
    special = _special(page)
    data = block.data
    pos = 0
    newitem: bytes | bytearray | memoryview = b""
    nposting: bytearray | None = None
    replacepostingoff = 0
    if newitemonleft or postingoff != 0:
        newitemsz = maxalign(_index_tuple_size(data, 0))
        newitem = data[0:newitemsz]
        pos = newitemsz
        if postingoff != 0:
            replacepostingoff = newitemoff - 1
            copied = bytearray(data[0 : _index_tuple_size(data, 0)])  # CopyIndexTuple
            nposting = _swap_posting(copied, _page_item(page, replacepostingoff), postingoff)
            newitem = _pad(copied, newitemsz)
    left_hikeysz = maxalign(_index_tuple_size(data, pos))
    left_hikey = data[pos : pos + left_hikeysz]
    if pos + left_hikeysz != len(data):
        raise BadRecordError("split data does not end after the left high key")

    _prev, next_, _level, _flags, _cycle = _OPAQUE.unpack_from(page, special)
    firstdatakey = P_HIKEY if next_ == P_NONE else P_FIRSTKEY
    linps = _line_pointers(page)
    if firstrightoff - 1 > len(linps):
        raise BadRecordError(f"first right offset {firstrightoff} is past the page's {len(linps)} items")
    view = memoryview(page)
    items: list[bytes | bytearray | memoryview] = [left_hikey]
    off = firstdatakey
    while off < firstrightoff:
        if off == replacepostingoff and nposting is not None:
            # the post-split posting list replaces the original one
            items.append(_pad(nposting, maxalign(_index_tuple_size(nposting))))
            off += 1
            continue
        if newitemonleft and off == newitemoff:
            items.append(newitem)
        items.append(_item_at(view, linps[off - 1]))
        off += 1
    if newitemonleft and off == newitemoff:
        items.append(newitem)

    leftpage = _temp_page_copy_special(page)
    _append_items(leftpage, items)
    page[:] = leftpage  # PageRestoreTempPage
    _OPAQUE.pack_into(
        page, special, _prev, rightpagenumber, _level,
        BTP_INCOMPLETE_SPLIT | (BTP_LEAF if isleaf else 0), 0,
    )


def _btree_xlog_dedup(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_dedup (nbtxlog.c) with _bt_dedup_start_pending / _save_htid / _finish_pending."""
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    (nintervals,) = _main(rec, _XL_DEDUP)
    data = block.data
    if len(data) < nintervals * _BT_DEDUP_INTERVAL.size:
        raise BadRecordError("dedup intervals truncated")
    intervals = [_BT_DEDUP_INTERVAL.unpack_from(data, 4 * i) for i in range(nintervals)]

    special = _special(page)
    _prev, next_, _level, flags, _cycle = _OPAQUE.unpack_from(page, special)
    minoff = P_HIKEY if next_ == P_NONE else P_FIRSTKEY
    linps = _line_pointers(page)
    maxoff = len(linps)
    view = memoryview(page)

    newitems: list[bytes | bytearray | memoryview] = []
    if next_ != P_NONE:
        newitems.append(_page_item(page, P_HIKEY))

    # BTDedupState
    base: memoryview | None = None
    baseoff = 0
    basetupsize = 0
    htids = bytearray()
    nhtids = 0
    nitems = 0
    ninterval_done = 0

    def start_pending(itup: memoryview, off: int) -> None:
        nonlocal base, baseoff, basetupsize, htids, nhtids, nitems
        if _is_posting(itup):
            n = _n_posting(itup)
            po = _posting_offset(itup)
            htids = bytearray(itup[po : po + n * _SIZEOF_ITEM_POINTER])
            nhtids = n
            basetupsize = po
        else:
            htids = bytearray(itup[0:_SIZEOF_ITEM_POINTER])
            nhtids = 1
            basetupsize = _index_tuple_size(itup)
        nitems = 1
        base = itup
        baseoff = off

    def save_htid(itup: memoryview) -> bool:
        nonlocal nhtids, nitems
        if _is_posting(itup):
            n = _n_posting(itup)
            po = _posting_offset(itup)
            tids = itup[po : po + n * _SIZEOF_ITEM_POINTER]
        else:
            n = 1
            tids = itup[0:_SIZEOF_ITEM_POINTER]
        if maxalign(basetupsize + (nhtids + n) * _SIZEOF_ITEM_POINTER) > _BT_MAX_ITEM_SIZE:
            return False
        nitems += 1
        htids.extend(tids)
        nhtids += n
        return True

    def finish_pending() -> None:
        nonlocal nhtids, nitems, ninterval_done
        assert base is not None
        if nitems == 1:
            newitems.append(base[: _index_tuple_size(base)])
        else:
            newitems.append(_form_posting(base, htids, nhtids))
            ninterval_done += 1
        nhtids = 0
        nitems = 0

    for offnum in range(minoff, maxoff + 1):
        itup = _item_at(view, linps[offnum - 1])
        if offnum == minoff:
            start_pending(itup, offnum)
        elif (
            ninterval_done < nintervals
            and baseoff == intervals[ninterval_done][0]
            and nitems < intervals[ninterval_done][1]
        ):
            if not save_htid(itup):
                raise BadRecordError("deduplication failed to add heap tid to pending posting list")
        else:
            finish_pending()
            start_pending(itup, offnum)
    if base is not None:
        finish_pending()
    if ninterval_done != nintervals:
        raise BadRecordError(f"deduplication formed {ninterval_done} intervals, record has {nintervals}")

    newpage = _temp_page_copy_special(page)
    _append_items(newpage, newitems)
    if flags & BTP_HAS_GARBAGE:
        _set_flags(newpage, special, flags & ~BTP_HAS_GARBAGE)
    page[:] = newpage


def _btree_xlog_updates(page: bytearray, data: bytes, pos: int, updatedoffsets: Sequence[int]) -> None:
    """btree_xlog_updates (nbtxlog.c): shrink posting lists in place."""
    for updatedoffset in updatedoffsets:
        (ndeletedtids,) = _u16_from(data, pos)
        deletetids = struct.unpack_from(f"<{ndeletedtids}H", data, pos + 2)
        pos += 2 + 2 * ndeletedtids
        itup = _update_posting(_page_item(page, updatedoffset), deletetids)
        itemsz = maxalign(_index_tuple_size(itup))
        if not page_index_tuple_overwrite(page, updatedoffset, _pad(itup, itemsz)):
            raise BadRecordError("failed to update partially dead item")


def _btree_xlog_delete_items(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_vacuum and btree_xlog_delete (nbtxlog.c): same page change."""
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    if (rec.info & XLR_RMGR_INFO_MASK) == XLOG_BTREE_VACUUM:
        ndeleted, nupdated = _main(rec, _XL_VACUUM)
    else:
        _xid, ndeleted, nupdated = _main(rec, _XL_DELETE)
    data = block.data
    if nupdated > 0:
        updatedoffsets = struct.unpack_from(f"<{nupdated}H", data, 2 * ndeleted)
        _btree_xlog_updates(page, data, 2 * (ndeleted + nupdated), updatedoffsets)
    if ndeleted > 0:
        page_index_multi_delete(page, struct.unpack_from(f"<{ndeleted}H", data, 0))
    special = _special(page)
    _set_flags(page, special, _get_flags(page, special) & ~BTP_HAS_GARBAGE)


def _btree_xlog_mark_page_halfdead(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_mark_page_halfdead (nbtxlog.c)."""
    poffset, _leafblk, leftblk, rightblk, topparent = _main(rec, _XL_MARK_PAGE_HALFDEAD)
    if block.block_id == 1:
        # The to-be-deleted subtree's parent: poffset takes over the next downlink.
        nextoffset = poffset + 1
        rightsib = _BLOCK_ID.unpack_from(_page_item(page, nextoffset), 0)
        itup = _page_item(page, poffset)
        _BLOCK_ID.pack_into(itup, 0, *rightsib)
        page_index_tuple_delete(page, nextoffset)
        return
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    special = _bt_pageinit(page)
    _set_opaque(page, special, leftblk, rightblk, 0, BTP_HALF_DEAD | BTP_LEAF)
    _add_half_dead_hikey(page, topparent)


def _btree_xlog_unlink_page(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_unlink_page (nbtxlog.c): UNLINK_PAGE and UNLINK_PAGE_META."""
    leftsib, rightsib, level, safexid, leafleftsib, leafrightsib, leaftopparent = _main(
        rec, _XL_UNLINK_PAGE
    )
    bid = block.block_id
    if bid == 1:
        _u32_into(page, _special(page) + _OPQ_NEXT, rightsib)  # left sibling's right-link
    elif bid == 0:
        # The target becomes an empty deleted page (BTPageSetDeleted).
        special = _bt_pageinit(page)
        flags = BTP_DELETED | BTP_HAS_FULLXID | (BTP_LEAF if level == 0 else 0)
        _set_opaque(page, special, leftsib, rightsib, level, flags)
        _U64.pack_into(page, _PAGE_CONTENTS, safexid)
        struct.pack_into(
            "<HH", page, 12, _PAGE_CONTENTS + _SIZEOF_BT_DELETED_PAGE_DATA, special
        )
    elif bid == 2:
        _u32_into(page, _special(page) + _OPQ_PREV, leftsib)  # right sibling's left-link
    elif bid == 3:
        # The leaf of the subtree: half-dead, pointing to the next child down.
        special = _bt_pageinit(page)
        _set_opaque(page, special, leafleftsib, leafrightsib, 0, BTP_HALF_DEAD | BTP_LEAF)
        _add_half_dead_hikey(page, leaftopparent)
    elif bid == 4 and (rec.info & XLR_RMGR_INFO_MASK) == XLOG_BTREE_UNLINK_PAGE_META:
        _bt_restore_meta(block, page)
    else:
        raise BadRecordError(f"unexpected block reference {bid}")


def _btree_xlog_newroot(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_newroot (nbtxlog.c)."""
    _rootblk, level = _main(rec, _XL_NEWROOT)
    bid = block.block_id
    if bid == 0:
        special = _bt_pageinit(page)
        _set_opaque(page, special, P_NONE, P_NONE, level, BTP_ROOT | (BTP_LEAF if level == 0 else 0))
        if level > 0:
            _bt_restore_page(page, block.data)
    elif bid == 1 and level > 0:
        _bt_clear_incomplete_split(page)
    elif bid == 2:
        _bt_restore_meta(block, page)
    else:
        raise BadRecordError(f"unexpected block reference {bid}")


def _btree_xlog_meta_cleanup(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """XLOG_BTREE_META_CLEANUP: _bt_restore_meta(record, 0)."""
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    _bt_restore_meta(block, page)


def _btree_xlog_reuse_page(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_xlog_reuse_page: only a recovery conflict on a standby; no page changes."""
    raise BadRecordError("REUSE_PAGE registers no blocks")


_Redo = Callable[[DecodedRecord, DecodedBlock, bytearray], None]

_HANDLERS: dict[int, _Redo] = {
    XLOG_BTREE_INSERT_LEAF: _btree_xlog_insert,
    XLOG_BTREE_INSERT_UPPER: _btree_xlog_insert,
    XLOG_BTREE_INSERT_META: _btree_xlog_insert,
    XLOG_BTREE_SPLIT_L: _btree_xlog_split,
    XLOG_BTREE_SPLIT_R: _btree_xlog_split,
    XLOG_BTREE_INSERT_POST: _btree_xlog_insert,
    XLOG_BTREE_DEDUP: _btree_xlog_dedup,
    XLOG_BTREE_VACUUM: _btree_xlog_delete_items,
    XLOG_BTREE_DELETE: _btree_xlog_delete_items,
    XLOG_BTREE_MARK_PAGE_HALFDEAD: _btree_xlog_mark_page_halfdead,
    XLOG_BTREE_UNLINK_PAGE: _btree_xlog_unlink_page,
    XLOG_BTREE_UNLINK_PAGE_META: _btree_xlog_unlink_page,
    XLOG_BTREE_NEWROOT: _btree_xlog_newroot,
    XLOG_BTREE_REUSE_PAGE: _btree_xlog_reuse_page,
    XLOG_BTREE_META_CLEANUP: _btree_xlog_meta_cleanup,
}


def btree_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """btree_redo (nbtxlog.c) for one block reference of `rec`."""
    handler = _HANDLERS.get(rec.info & XLR_RMGR_INFO_MASK)
    if handler is None:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    handler(rec, block, page)


register_block_redo(RM_BTREE_ID, btree_redo)
