"""GIN redo (rmgr Gin, id 13) for PostgreSQL 15.

Follows src/backend/access/gin/ginxlog.c (gin_redo and the ginRedo*
functions) with the record layouts of src/include/access/ginxlog.h, the page
layout of src/include/access/ginblock.h (GinPageOpaqueData, the GIN_* flags,
GinMetaPageData, PostingItem, GinPostingList), the posting list codec of
src/backend/access/gin/ginpostinglist.c (ginPostingListDecode,
ginCompressPostingList, ginMergeItemPointers), GinDataPageAddPostingItem /
GinPageDeletePostingItem of gindatapage.c and GinInitPage /
GinInitMetabuffer of ginutil.c.

The engine calls :func:`gin_redo` once per block reference; every block's
change depends only on the record and that page:

- CREATE_PTREE (block 0, will-init): a new posting tree root leaf.
- INSERT: block 0 gets an entry tuple, a PostingItem or a leaf recompression;
  block 1 (on a non-leaf insert) is the child whose split this completes.
- SPLIT: blocks 0-2 always carry a full-page image (REGBUF_FORCE_IMAGE),
  which the engine restores; block 3 is the child whose split completes.
- VACUUM_PAGE: block 0 is a forced full-page image only.
- VACUUM_DATA_LEAF_PAGE: block 0 gets a leaf recompression.
- DELETE_PAGE: block 0 deleted page, block 1 parent, block 2 left sibling.
- UPDATE_META_PAGE: block 0 the metapage (re-initialized), block 1 the
  pending-list tail.
- INSERT_LISTPAGE: block 0, a new pending-list page.
- DELETE_LISTPAGE: block 0 the metapage, blocks 1.. the deleted list pages.

PostgreSQL 15 has no CREATE_INDEX record: index builds are WAL-logged as
XLOG FPI records by log_newpage_range.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Final

from pgformat.constants import BLCKSZ
from pgformat.page import (
    SIZE_OF_PAGE_HEADER_DATA,
    page_add_item_extended,
    page_index_tuple_delete,
    page_init,
)
from pgformat.rmgr import (
    RM_GIN_ID,
    XLOG_GIN_CREATE_PTREE,
    XLOG_GIN_DELETE_LISTPAGE,
    XLOG_GIN_DELETE_PAGE,
    XLOG_GIN_INSERT,
    XLOG_GIN_INSERT_LISTPAGE,
    XLOG_GIN_SPLIT,
    XLOG_GIN_UPDATE_META_PAGE,
    XLOG_GIN_VACUUM_DATA_LEAF_PAGE,
    XLOG_GIN_VACUUM_PAGE,
    XLR_RMGR_INFO_MASK,
)
from pgformat.xlogrecord import DecodedBlock, DecodedRecord

from .engine import register_block_redo
from .errors import BadRecordError, UnsupportedRecordError

__all__ = [
    "GIN_DATA",
    "GIN_LEAF",
    "GIN_DELETED",
    "GIN_META",
    "GIN_LIST",
    "GIN_LIST_FULLROW",
    "GIN_INCOMPLETE_SPLIT",
    "GIN_COMPRESSED",
    "GIN_SEGMENT_UNMODIFIED",
    "GIN_SEGMENT_DELETE",
    "GIN_SEGMENT_INSERT",
    "GIN_SEGMENT_REPLACE",
    "GIN_SEGMENT_ADDITEMS",
    "SIZE_OF_GIN_PAGE_OPAQUE",
    "gin_init_page",
    "gin_init_metapage",
    "gin_posting_list_decode",
    "gin_compress_posting_list",
    "gin_redo_recompress",
    "gin_redo",
]

# --- ginblock.h ----------------------------------------------------------------

GIN_DATA: Final = 1 << 0
GIN_LEAF: Final = 1 << 1
GIN_DELETED: Final = 1 << 2
GIN_META: Final = 1 << 3
GIN_LIST: Final = 1 << 4
GIN_LIST_FULLROW: Final = 1 << 5
GIN_INCOMPLETE_SPLIT: Final = 1 << 6
GIN_COMPRESSED: Final = 1 << 7

GIN_CURRENT_VERSION: Final = 2
INVALID_BLOCK_NUMBER: Final = 0xFFFFFFFF

# GinPageOpaqueData {BlockNumber rightlink; OffsetNumber maxoff; uint16 flags}
SIZE_OF_GIN_PAGE_OPAQUE: Final = 8
_OPAQUE = struct.Struct("<IHH")
_OPQ_RIGHTLINK: Final = 0
_OPQ_MAXOFF: Final = 4
_OPQ_FLAGS: Final = 6

# PageGetContents: MAXALIGN(SizeOfPageHeaderData).
_PAGE_CONTENTS: Final = SIZE_OF_PAGE_HEADER_DATA
# GinDataPageGetData / GinDataLeafPageGetPostingList: after the right bound
# (an ItemPointerData, MAXALIGNed to 8).
_DATA_START: Final = _PAGE_CONTENTS + 8
# GinDataPageMaxDataSize
_DATA_MAX_SIZE: Final = BLCKSZ - _DATA_START - SIZE_OF_GIN_PAGE_OPAQUE

# GinMetaPageData {head, tail, tailFreeSize, nPendingPages, int64
# nPendingHeapTuples, nTotalPages, nEntryPages, nDataPages, (pad), int64
# nEntries, int32 ginVersion, (pad)}: 56 bytes.
_META = struct.Struct("<IIIIqIII4xqi4x")
SIZE_OF_GIN_META_PAGE_DATA: Final = _META.size

# PostingItem {BlockIdData child_blkno; ItemPointerData key}: 10 bytes, 2-aligned.
SIZE_OF_POSTING_ITEM: Final = 10
_BLOCK_ID = struct.Struct("<HH")
_ITEM_POINTER = struct.Struct("<HHH")
_SIZEOF_ITEM_POINTER: Final = 6

# GinPostingList {ItemPointerData first; uint16 nbytes; bytes[]}
_PL_HEADER = struct.Struct("<HHHH")
_SIZEOF_PL_HEADER: Final = 8

# ginpostinglist.c
_MAX_HEAP_TUPLES_PER_PAGE_BITS: Final = 11
_OFFSET_MASK: Final = (1 << _MAX_HEAP_TUPLES_PER_PAGE_BITS) - 1

# itup.h
INDEX_SIZE_MASK: Final = 0x1FFF
_T_INFO: Final = 6

# --- ginxlog.h record layouts ---------------------------------------------------------

GIN_INSERT_ISDATA: Final = 0x01
GIN_INSERT_ISLEAF: Final = 0x02
GIN_SPLIT_ROOT: Final = 0x04

GIN_SEGMENT_UNMODIFIED: Final = 0
GIN_SEGMENT_DELETE: Final = 1
GIN_SEGMENT_INSERT: Final = 2
GIN_SEGMENT_REPLACE: Final = 3
GIN_SEGMENT_ADDITEMS: Final = 4

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_u16_from = _U16.unpack_from
_u16_into = _U16.pack_into
_u32_into = _U32.pack_into

_XL_CREATE_PTREE = struct.Struct("<I")  # size
_XL_INSERT = struct.Struct("<H")  # flags; non-leaf: BlockIdData left, right follow
_XL_INSERT_CHILDREN = struct.Struct("<HHHH")
_XL_INSERT_ENTRY = struct.Struct("<H?x")  # offset, isDelete; IndexTuple follows
_XL_INSERT_DATA_INTERNAL = struct.Struct("<H")  # offset; PostingItem follows
_XL_RECOMPRESS = struct.Struct("<H")  # nactions
_XL_DELETE_PAGE = struct.Struct("<H2xII")  # parentOffset, rightLink, deleteXid
# ginxlogUpdateMeta {RelFileNode node; (pad); GinMetaPageData metadata;
# prevTail; newRightlink; int32 ntuples}
_XL_UPDATE_META = struct.Struct(f"<12x4x{SIZE_OF_GIN_META_PAGE_DATA}sIIi")
_XL_INSERT_LISTPAGE = struct.Struct("<Ii")  # rightlink, ntuples
# ginxlogDeleteListPages {GinMetaPageData metadata; int32 ndeleted}
_XL_DELETE_LISTPAGES = struct.Struct(f"<{SIZE_OF_GIN_META_PAGE_DATA}si")


# --- page helpers (ginutil.c) -----------------------------------------------------------


def gin_init_page(page: bytearray, flags: int) -> None:
    """GinInitPage (ginutil.c): PageInit with GIN special space, flags, no right link."""
    page_init(page, SIZE_OF_GIN_PAGE_OPAQUE)
    _OPAQUE.pack_into(page, BLCKSZ - SIZE_OF_GIN_PAGE_OPAQUE, INVALID_BLOCK_NUMBER, 0, flags)


def gin_init_metapage(page: bytearray) -> None:
    """GinInitMetabuffer (ginutil.c): an empty metapage, pd_lower just past the metadata."""
    gin_init_page(page, GIN_META)
    _META.pack_into(
        page, _PAGE_CONTENTS, INVALID_BLOCK_NUMBER, INVALID_BLOCK_NUMBER, 0, 0, 0, 0, 0, 0, 0,
        GIN_CURRENT_VERSION,
    )
    _u16_into(page, 12, _PAGE_CONTENTS + SIZE_OF_GIN_META_PAGE_DATA)


def _special(page: bytearray) -> int:
    special = int(_u16_from(page, 16)[0])
    if special < SIZE_OF_PAGE_HEADER_DATA or special + SIZE_OF_GIN_PAGE_OPAQUE > BLCKSZ:
        raise BadRecordError(f"page has no room for GinPageOpaqueData (pd_special {special})")
    return special


def _get_flags(page: bytearray, special: int) -> int:
    return int(_u16_from(page, special + _OPQ_FLAGS)[0])


def _set_flags(page: bytearray, special: int, flags: int) -> None:
    _u16_into(page, special + _OPQ_FLAGS, flags & 0xFFFF)


def _set_data_size(page: bytearray, size: int) -> None:
    """GinDataPageSetDataSize (ginblock.h): pd_lower = end of the data area."""
    if size < 0 or size > _DATA_MAX_SIZE:
        raise BadRecordError(f"data size {size} exceeds GinDataPageMaxDataSize")
    _u16_into(page, 12, size + _DATA_START)


def _index_tuple_size(data: bytes | bytearray | memoryview, pos: int) -> int:
    if pos + 8 > len(data):
        raise BadRecordError(f"truncated index tuple header at data offset {pos}")
    size = int(_u16_from(data, pos + _T_INFO)[0]) & INDEX_SIZE_MASK
    if size < 8 or pos + size > len(data):
        raise BadRecordError(f"index tuple of {size} bytes at data offset {pos} does not fit")
    return size


# --- posting lists (ginpostinglist.c) ------------------------------------------------


def _segment_size(buf: bytes | bytearray | memoryview, pos: int) -> int:
    """SizeOfGinPostingList: header plus SHORTALIGN(nbytes)."""
    nbytes = int(_u16_from(buf, pos + 6)[0])
    return _SIZEOF_PL_HEADER + nbytes + (nbytes & 1)


def _decode_segment(buf: bytes | bytearray | memoryview, pos: int, out: list[int]) -> None:
    """Append the items of the segment at `pos`, as itemptr_to_uint64 values."""
    bi_hi, bi_lo, posid, nbytes = _PL_HEADER.unpack_from(buf, pos)
    val = (((bi_hi << 16) | bi_lo) << _MAX_HEAP_TUPLES_PER_PAGE_BITS) | posid
    out.append(val)
    p = pos + _SIZEOF_PL_HEADER
    if p + nbytes > len(buf):
        raise BadRecordError(f"posting list segment of {nbytes} bytes at {pos} overruns its buffer")
    append = out.append
    # decode_varbyte: 7 bits a byte while the high bit is set; a 7th byte is
    # taken whole. A delta below 0x80 (the usual case) is one byte.
    acc = 0
    shift = 0
    for c in bytes(buf[p : p + nbytes]):
        if c < 0x80 or shift == 42:
            val += acc | (c << shift)
            append(val)
            acc = 0
            shift = 0
        else:
            acc |= (c & 0x7F) << shift
            shift += 7
    if shift:
        raise BadRecordError(f"posting list segment at {pos} ends inside an item")


# A varbyte item of more than one byte: up to five continuation bytes and a
# final byte, or six continuation bytes and a 7th byte taken whole.
_MULTIBYTE_ITEM = re.compile(rb"[\x80-\xff]{1,5}[\x00-\x7f]|[\x80-\xff]{6}[\x00-\xff]")


def _sum_deltas(body: bytes) -> int:
    """The sum of the varbyte deltas in `body` without decoding each one.

    One-byte deltas are summed at C speed; only the rare multi-byte ones
    (a step to another heap page) are decoded.
    """
    total = sum(body)
    for m in _MULTIBYTE_ITEM.finditer(body):
        raw = m.group()
        total -= sum(raw)
        val = 0
        shift = 0
        for c in raw[:-1]:
            val |= (c & 0x7F) << shift
            shift += 7
        total += val | (raw[-1] << shift)
    return total


def _last_item(buf: bytes | bytearray | memoryview, pos: int) -> int:
    """The last item of the segment at `pos`: its first item plus every delta."""
    bi_hi, bi_lo, posid, nbytes = _PL_HEADER.unpack_from(buf, pos)
    body = bytes(buf[pos + _SIZEOF_PL_HEADER : pos + _SIZEOF_PL_HEADER + nbytes])
    if len(body) != nbytes:
        raise BadRecordError(f"posting list segment of {nbytes} bytes at {pos} overruns its buffer")
    first = (((bi_hi << 16) | bi_lo) << _MAX_HEAP_TUPLES_PER_PAGE_BITS) | posid
    return first + _sum_deltas(body)


def _encode_deltas(items: list[int], start: int, prev: int, out: bytearray) -> None:
    """encode_varbyte of each items[i] - items[i - 1] from `start` (prev before it)."""
    append = out.append
    for i in range(start, len(items)):
        val = items[i]
        delta = val - prev
        prev = val
        if 0 < delta < 0x80:
            append(delta)
            continue
        if delta <= 0:
            raise BadRecordError("posting list items are not in ascending order")
        while delta > 0x7F:
            append(0x80 | (delta & 0x7F))
            delta >>= 7
        append(delta)


def gin_posting_list_decode(buf: bytes | bytearray | memoryview, pos: int = 0, length: int | None = None) -> list[int]:
    """ginPostingListDecodeAllSegments: the items of consecutive segments.

    Items are returned as ``(block << 11) | offset`` integers
    (itemptr_to_uint64), which sort like ItemPointers. Without `length`,
    only the one segment at `pos` is decoded (ginPostingListDecode).
    """
    out: list[int] = []
    end = pos + (_segment_size(buf, pos) if length is None else length)
    while pos < end:
        _decode_segment(buf, pos, out)
        pos += _segment_size(buf, pos)
    return out


def _item_pointer(val: int) -> bytes:
    """uint64_to_itemptr, as the 6 bytes of an ItemPointerData."""
    blk = (val >> _MAX_HEAP_TUPLES_PER_PAGE_BITS) & 0xFFFFFFFF
    return _ITEM_POINTER.pack(blk >> 16, blk & 0xFFFF, val & _OFFSET_MASK)


def gin_compress_posting_list(items: list[int], maxsize: int = BLCKSZ) -> bytes:
    """ginCompressPostingList: one segment holding all of `items` (sorted, distinct).

    The first item is stored whole, the rest as varbyte deltas; an odd
    byte count gets a zero padding byte. Postgres stops at `maxsize` and
    reports how many items fit; redo always needs all of them, so running
    out of room is an error here.
    """
    if not items:
        raise BadRecordError("cannot compress an empty posting list")
    out = bytearray()
    _encode_deltas(items, 1, items[0], out)
    return _finish_segment(_item_pointer(items[0]), out, maxsize)


def _finish_segment(first: bytes, body: bytearray, maxsize: int = BLCKSZ) -> bytes:
    nbytes = len(body)
    if nbytes > (maxsize & ~1) - _SIZEOF_PL_HEADER:
        raise BadRecordError(f"posting list of {nbytes} bytes does not fit in {maxsize} bytes")
    if nbytes & 1:
        body.append(0)
    return first + _U16.pack(nbytes) + body


def _add_items_to_segment(buf: bytes, pos: int, added: list[int]) -> bytes:
    """The ADDITEMS step of ginRedoRecompress: decode, ginMergeItemPointers, compress.

    When every added item follows the segment's last one (appending, the
    usual case) the merged encoding is the old deltas followed by the new
    ones, so only those are encoded.
    """
    if not added:
        return gin_compress_posting_list(gin_posting_list_decode(buf, pos))
    last = _last_item(buf, pos)
    if added[0] > last:
        nbytes = int(_u16_from(buf, pos + 6)[0])
        body = bytearray(buf[pos + _SIZEOF_PL_HEADER : pos + _SIZEOF_PL_HEADER + nbytes])
        _encode_deltas(added, 0, last, body)
        return _finish_segment(bytes(buf[pos : pos + 6]), body)
    olditems = gin_posting_list_decode(buf, pos)
    return gin_compress_posting_list(_merge_item_pointers(added, olditems))


def _item_pointers(data: bytes | bytearray | memoryview, pos: int, n: int) -> list[int]:
    """n raw ItemPointerData from `pos`, as itemptr_to_uint64 values."""
    if pos + n * _SIZEOF_ITEM_POINTER > len(data):
        raise BadRecordError(f"record data too short for {n} item pointers")
    raw = struct.unpack_from(f"<{3 * n}H", data, pos)
    return [
        (((raw[i] << 16) | raw[i + 1]) << _MAX_HEAP_TUPLES_PER_PAGE_BITS) | raw[i + 2]
        for i in range(0, 3 * n, 3)
    ]


def _merge_item_pointers(a: list[int], b: list[int]) -> list[int]:
    """ginMergeItemPointers: the sorted union, one copy of items in both."""
    if not a or not b or a[-1] < b[0]:
        return a + b
    if b[-1] < a[0]:
        return b + a
    return sorted(set(a).union(b))


# --- leaf recompression (ginxlog.c ginRedoRecompress) -----------------------------------


def _convert_uncompressed_leaf(page: bytearray, special: int) -> None:
    """The pre-9.4 leaf conversion at the start of ginRedoRecompress."""
    nitems = int(_u16_from(page, special + _OPQ_MAXOFF)[0])
    if nitems > 0:
        items = _item_pointers(page, _DATA_START, nitems)
        plist = gin_compress_posting_list(items)
        page[_DATA_START : _DATA_START + len(plist)] = plist
        totalsize = len(plist)
    else:
        totalsize = 0
    _set_data_size(page, totalsize)
    _set_flags(page, special, _get_flags(page, special) | GIN_COMPRESSED)
    _u16_into(page, special + _OPQ_MAXOFF, 0)


def gin_redo_recompress(page: bytearray, data: bytes | bytearray | memoryview) -> None:
    """ginRedoRecompress (ginxlog.c): apply a ginxlogRecompressDataLeaf to a leaf.

    `data` starts with the uint16 action count; each action names an old
    segment number and DELETEs, INSERTs (before it), REPLACEs or ADDs ITEMS
    to it. Postgres edits in place until the first change, then copies the
    rest of the old segments aside and writes the new sequence over the
    page; the bytes up to the new end are the old untouched segments, then
    the rewritten run, then (if anything was copied aside) the rest. Bytes
    past the new pd_lower are left as they were.
    """
    special = _special(page)
    if not _get_flags(page, special) & GIN_COMPRESSED:
        _convert_uncompressed_leaf(page, special)

    lower = int(_u16_from(page, 12)[0])
    if lower < _DATA_START or lower > special:
        raise BadRecordError(f"data leaf page has pd_lower {lower}")
    old = bytes(page[_DATA_START:lower])  # the old segments (the C tail copy, taken whole)
    oldend = len(old)
    oldpos = 0  # oldseg
    segno = 0
    out = bytearray()  # page bytes from the posting list start to writePtr
    tail_copied = False

    nactions = int(_XL_RECOMPRESS.unpack_from(data, 0)[0])
    w = _XL_RECOMPRESS.size
    dlen = len(data)
    for _ in range(nactions):
        if w + 2 > dlen:
            raise BadRecordError("truncated segment action")
        a_segno = data[w]
        a_action = data[w + 1]
        w += 2
        newseg: bytes | None = None
        added: list[int] = []
        if a_action in (GIN_SEGMENT_INSERT, GIN_SEGMENT_REPLACE):
            if w + _SIZEOF_PL_HEADER > dlen:
                raise BadRecordError("truncated posting list in segment action")
            size = _segment_size(data, w)
            if w + size > dlen:
                raise BadRecordError("truncated posting list in segment action")
            newseg = bytes(data[w : w + size])
            w += size  # SHORTALIGN(size) == size
        elif a_action == GIN_SEGMENT_ADDITEMS:
            if w + 2 > dlen:
                raise BadRecordError("truncated ADDITEMS action")
            nitems = int(_u16_from(data, w)[0])
            added = _item_pointers(data, w + 2, nitems)
            w += 2 + nitems * _SIZEOF_ITEM_POINTER

        if a_segno < segno:
            raise BadRecordError(f"segment action for segment {a_segno} after segment {segno}")
        while segno < a_segno:
            if oldpos >= oldend:
                raise BadRecordError(f"segment {a_segno} is past the end of the page")
            size = _segment_size(old, oldpos)
            out += old[oldpos : oldpos + size]
            oldpos += size
            segno += 1

        if a_action == GIN_SEGMENT_ADDITEMS:
            if oldpos >= oldend:
                raise BadRecordError(f"ADDITEMS to missing segment {a_segno}")
            newseg = _add_items_to_segment(old, oldpos, added)
            a_action = GIN_SEGMENT_REPLACE

        if oldpos != oldend:
            segsize = _segment_size(old, oldpos)
            tail_copied = True
        elif a_action != GIN_SEGMENT_INSERT:
            raise BadRecordError(f"segment action {a_action} past the last segment")
        else:
            segsize = 0

        if a_action == GIN_SEGMENT_DELETE:
            oldpos += segsize
            segno += 1
        elif a_action == GIN_SEGMENT_INSERT:
            assert newseg is not None
            out += newseg
        elif a_action == GIN_SEGMENT_REPLACE:
            assert newseg is not None
            out += newseg
            oldpos += segsize
            segno += 1
        else:
            raise BadRecordError(f"unexpected GIN leaf action: {a_action}")

    if tail_copied and oldpos != oldend:
        out += old[oldpos:]
    if _DATA_START + len(out) > special:
        raise BadRecordError(f"recompressed leaf data of {len(out)} bytes does not fit the page")
    page[_DATA_START : _DATA_START + len(out)] = out
    _set_data_size(page, len(out))


# --- redo functions ------------------------------------------------------------------


def _clear_incomplete_split(page: bytearray) -> None:
    """ginRedoClearIncompleteSplit (ginxlog.c)."""
    special = _special(page)
    _set_flags(page, special, _get_flags(page, special) & ~GIN_INCOMPLETE_SPLIT)


def gin_create_ptree_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoCreatePTree (ginxlog.c): a posting tree root leaf from the record's list."""
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    size = int(_XL_CREATE_PTREE.unpack_from(rec.main_data, 0)[0])
    start = _XL_CREATE_PTREE.size
    if start + size > len(rec.main_data):
        raise BadRecordError(f"posting list of {size} bytes overruns the record")
    gin_init_page(page, GIN_DATA | GIN_LEAF | GIN_COMPRESSED)
    _set_data_size(page, size)
    page[_DATA_START : _DATA_START + size] = rec.main_data[start : start + size]


def _insert_entry(page: bytearray, rightblkno: int, data: bytes) -> None:
    """ginRedoInsertEntry (ginxlog.c)."""
    offset, is_delete = _XL_INSERT_ENTRY.unpack_from(data, 0)
    if rightblkno != INVALID_BLOCK_NUMBER:
        # GinSetDownlink on the item at `offset`: t_tid = (rightblkno, 0).
        lp = SIZE_OF_PAGE_HEADER_DATA + (offset - 1) * 4
        if offset < 1 or lp + 4 > int(_u16_from(page, 12)[0]):
            raise BadRecordError(f"no downlink at offset {offset}")
        lp_off = int(_U32.unpack_from(page, lp)[0]) & 0x7FFF
        _ITEM_POINTER.pack_into(page, lp_off, rightblkno >> 16, rightblkno & 0xFFFF, 0)
    if is_delete:
        page_index_tuple_delete(page, offset)
    tup_start = _XL_INSERT_ENTRY.size
    size = _index_tuple_size(data, tup_start)
    item = memoryview(data)[tup_start : tup_start + size]
    if page_add_item_extended(page, item, offset, 0) == 0:
        raise BadRecordError("failed to add item to index page")


def _insert_data_internal(page: bytearray, rightblkno: int, data: bytes) -> None:
    """ginRedoInsertData's non-leaf branch with GinDataPageAddPostingItem (gindatapage.c)."""
    special = _special(page)
    offset = int(_XL_INSERT_DATA_INTERNAL.unpack_from(data, 0)[0])
    start = _XL_INSERT_DATA_INTERNAL.size
    newitem = data[start : start + SIZE_OF_POSTING_ITEM]
    if len(newitem) != SIZE_OF_POSTING_ITEM:
        raise BadRecordError("truncated PostingItem")
    maxoff = int(_u16_from(page, special + _OPQ_MAXOFF)[0])
    if offset > maxoff + 1 or _DATA_START + (maxoff + 1) * SIZE_OF_POSTING_ITEM > special:
        raise BadRecordError(f"posting item offset {offset} on a page with {maxoff} items")
    # PostingItemSetBlockNumber(GinDataPageGetPostingItem(page, offset), rightblkno)
    pos = _DATA_START + (offset - 1) * SIZE_OF_POSTING_ITEM
    _BLOCK_ID.pack_into(page, pos, (rightblkno >> 16) & 0xFFFF, rightblkno & 0xFFFF)
    if offset == 0:
        pos = _DATA_START + maxoff * SIZE_OF_POSTING_ITEM
    elif offset != maxoff + 1:
        end = _DATA_START + maxoff * SIZE_OF_POSTING_ITEM
        page[pos + SIZE_OF_POSTING_ITEM : end + SIZE_OF_POSTING_ITEM] = page[pos:end]
    page[pos : pos + SIZE_OF_POSTING_ITEM] = newitem
    maxoff = (maxoff + 1) & 0xFFFF
    _u16_into(page, special + _OPQ_MAXOFF, maxoff)
    _set_data_size(page, maxoff * SIZE_OF_POSTING_ITEM)


def gin_insert_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoInsert (ginxlog.c): block 0 the target, block 1 the finished split's left child."""
    flags = int(_XL_INSERT.unpack_from(rec.main_data, 0)[0])
    is_leaf = bool(flags & GIN_INSERT_ISLEAF)
    if block.block_id == 1 and not is_leaf:
        _clear_incomplete_split(page)
        return
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    rightblkno = INVALID_BLOCK_NUMBER
    if not is_leaf:
        _l_hi, _l_lo, r_hi, r_lo = _XL_INSERT_CHILDREN.unpack_from(rec.main_data, _XL_INSERT.size)
        rightblkno = (r_hi << 16) | r_lo
    if flags & GIN_INSERT_ISDATA:
        if is_leaf:
            gin_redo_recompress(page, block.data)
        else:
            _insert_data_internal(page, rightblkno, block.data)
    else:
        _insert_entry(page, rightblkno, block.data)


def gin_split_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoSplit (ginxlog.c): only the child (block 3) is redone; 0-2 are images."""
    if block.block_id == 3:
        _clear_incomplete_split(page)
        return
    raise BadRecordError(f"GIN split record did not contain a full-page image of block {block.block_id}")


def gin_vacuum_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoVacuumPage (ginxlog.c): the record is only a full-page image."""
    raise BadRecordError("replay of gin entry tree page vacuum did not restore the page")


def gin_vacuum_data_leaf_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoVacuumDataLeafPage (ginxlog.c): a leaf recompression from block 0's data."""
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    gin_redo_recompress(page, block.data)


def gin_delete_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoDeletePage (ginxlog.c): block 0 deleted, block 1 parent, block 2 left sibling."""
    parent_offset, right_link, delete_xid = _XL_DELETE_PAGE.unpack_from(rec.main_data, 0)
    special = _special(page)
    if block.block_id == 0:
        _set_flags(page, special, _get_flags(page, special) | GIN_DELETED)
        _u32_into(page, 20, delete_xid)  # GinPageSetDeleteXid: pd_prune_xid
    elif block.block_id == 1:
        # GinPageDeletePostingItem (gindatapage.c)
        maxoff = int(_u16_from(page, special + _OPQ_MAXOFF)[0])
        if not 1 <= parent_offset <= maxoff or _DATA_START + maxoff * SIZE_OF_POSTING_ITEM > special:
            raise BadRecordError(f"posting item {parent_offset} not on a page with {maxoff} items")
        if parent_offset != maxoff:
            pos = _DATA_START + (parent_offset - 1) * SIZE_OF_POSTING_ITEM
            end = _DATA_START + maxoff * SIZE_OF_POSTING_ITEM
            page[pos : end - SIZE_OF_POSTING_ITEM] = page[pos + SIZE_OF_POSTING_ITEM : end]
        maxoff -= 1
        _u16_into(page, special + _OPQ_MAXOFF, maxoff)
        _set_data_size(page, maxoff * SIZE_OF_POSTING_ITEM)
    elif block.block_id == 2:
        _u32_into(page, special + _OPQ_RIGHTLINK, right_link)
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


def _add_tuples(page: bytearray, data: bytes, ntuples: int, off: int) -> int:
    """PageAddItem of `ntuples` concatenated IndexTuples at off, off + 1, ...; next off."""
    view = memoryview(data)
    pos = 0
    for _ in range(ntuples):
        size = _index_tuple_size(data, pos)
        if page_add_item_extended(page, view[pos : pos + size], off, 0) == 0:
            raise BadRecordError("failed to add item to index page")
        pos += size
        off += 1
    return off


def gin_update_meta_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoUpdateMetapage (ginxlog.c): block 0 the metapage, block 1 the list tail."""
    metadata, prev_tail, new_rightlink, ntuples = _XL_UPDATE_META.unpack_from(rec.main_data, 0)
    if block.block_id == 0:
        gin_init_metapage(page)
        page[_PAGE_CONTENTS : _PAGE_CONTENTS + SIZE_OF_GIN_META_PAGE_DATA] = metadata
    elif block.block_id == 1 and ntuples > 0:
        lower = int(_u16_from(page, 12)[0])
        if lower <= SIZE_OF_PAGE_HEADER_DATA:  # PageIsEmpty
            off = 1
        else:
            off = (lower - SIZE_OF_PAGE_HEADER_DATA) // 4 + 1
        _add_tuples(page, block.data, ntuples, off)
        special = _special(page)
        maxoff = int(_u16_from(page, special + _OPQ_MAXOFF)[0])
        _u16_into(page, special + _OPQ_MAXOFF, (maxoff + 1) & 0xFFFF)
    elif block.block_id == 1 and prev_tail != INVALID_BLOCK_NUMBER:
        _u32_into(page, _special(page) + _OPQ_RIGHTLINK, new_rightlink)
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


def gin_insert_listpage_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoInsertListPage (ginxlog.c): a pending-list page rebuilt from the record."""
    if block.block_id != 0:
        raise BadRecordError(f"unexpected block reference {block.block_id}")
    rightlink, ntuples = _XL_INSERT_LISTPAGE.unpack_from(rec.main_data, 0)
    gin_init_page(page, GIN_LIST)
    special = BLCKSZ - SIZE_OF_GIN_PAGE_OPAQUE
    if rightlink == INVALID_BLOCK_NUMBER:
        _OPAQUE.pack_into(page, special, rightlink, 1, GIN_LIST | GIN_LIST_FULLROW)
    else:
        _OPAQUE.pack_into(page, special, rightlink, 0, GIN_LIST)
    _add_tuples(page, block.data, ntuples, 1)


def gin_delete_listpage_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """ginRedoDeleteListPages (ginxlog.c): block 0 the metapage, the rest emptied, deleted."""
    metadata, ndeleted = _XL_DELETE_LISTPAGES.unpack_from(rec.main_data, 0)
    if block.block_id == 0:
        gin_init_metapage(page)
        page[_PAGE_CONTENTS : _PAGE_CONTENTS + SIZE_OF_GIN_META_PAGE_DATA] = metadata
    elif 1 <= block.block_id <= ndeleted:
        gin_init_page(page, GIN_DELETED)
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


_HANDLERS: dict[int, Callable[[DecodedRecord, DecodedBlock, bytearray], None]] = {
    XLOG_GIN_CREATE_PTREE: gin_create_ptree_redo,
    XLOG_GIN_INSERT: gin_insert_redo,
    XLOG_GIN_SPLIT: gin_split_redo,
    XLOG_GIN_VACUUM_PAGE: gin_vacuum_page_redo,
    XLOG_GIN_VACUUM_DATA_LEAF_PAGE: gin_vacuum_data_leaf_page_redo,
    XLOG_GIN_DELETE_PAGE: gin_delete_page_redo,
    XLOG_GIN_UPDATE_META_PAGE: gin_update_meta_page_redo,
    XLOG_GIN_INSERT_LISTPAGE: gin_insert_listpage_redo,
    XLOG_GIN_DELETE_LISTPAGE: gin_delete_listpage_redo,
}


def gin_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """gin_redo (ginxlog.c) for one block reference of `rec`."""
    handler = _HANDLERS.get(rec.info & XLR_RMGR_INFO_MASK)
    if handler is None:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    handler(rec, block, page)


register_block_redo(RM_GIN_ID, gin_redo)
