"""SP-GiST redo (rmgr SPGist, id 16) for PostgreSQL 15.

Follows src/backend/access/spgist/spgxlog.c (spg_redo, spgRedoAddLeaf,
spgRedoMoveLeafs, spgRedoAddNode, spgRedoSplitTuple, spgRedoPickSplit,
spgRedoVacuumLeaf, spgRedoVacuumRoot, spgRedoVacuumRedirect,
addOrReplaceTuple) with the record layouts of src/include/access/spgxlog.h,
the tuple and page layouts of src/include/access/spgist_private.h
(SpGistPageOpaqueData, SpGistInnerTupleData, SpGistLeafTupleData,
SpGistDeadTupleData), SpGistInitPage / spgFormDeadTuple of spgutils.c and
spgUpdateNodeLink / spgPageIndexMultiDelete of spgdoinsert.c.

Every SP-GiST record keeps all its payload in the main data (the block
references carry none); the engine calls :func:`spg_redo` once per block
reference, and each block's change is computed from the record alone. Where
spgxlog.c reads another block's number (the new leaf page of ADD_LEAF, the
destination of MOVE_LEAFS, the inner page of PICKSPLIT, the new page of
ADD_NODE), it comes from that block reference's tag.

Tuples in the record are unaligned; each is copied with the size its own
header gives, and only those bytes are written to the page, as memcpy does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from pgformat.constants import BLCKSZ
from pgformat.page import (
    SIZE_OF_PAGE_HEADER_DATA,
    page_add_item_extended,
    page_index_multi_delete,
    page_index_tuple_delete,
    page_init,
)
from pgformat.rmgr import (
    RM_SPGIST_ID,
    XLOG_SPGIST_ADD_LEAF,
    XLOG_SPGIST_ADD_NODE,
    XLOG_SPGIST_MOVE_LEAFS,
    XLOG_SPGIST_PICKSPLIT,
    XLOG_SPGIST_SPLIT_TUPLE,
    XLOG_SPGIST_VACUUM_LEAF,
    XLOG_SPGIST_VACUUM_REDIRECT,
    XLOG_SPGIST_VACUUM_ROOT,
    XLR_RMGR_INFO_MASK,
)
from pgformat.xlogrecord import DecodedBlock, DecodedRecord

from .engine import register_block_redo
from .errors import BadRecordError, UnsupportedRecordError

__all__ = [
    "SPGIST_META",
    "SPGIST_DELETED",
    "SPGIST_LEAF",
    "SPGIST_NULLS",
    "SPGIST_PAGE_ID",
    "SPGIST_LIVE",
    "SPGIST_REDIRECT",
    "SPGIST_DEAD",
    "SPGIST_PLACEHOLDER",
    "SIZE_OF_SPGIST_PAGE_OPAQUE",
    "SGDTSIZE",
    "spg_init_page",
    "spg_form_dead_tuple",
    "spg_update_node_link",
    "spg_page_index_multi_delete",
    "spg_redo",
]

# --- spgist_private.h --------------------------------------------------------------

SPGIST_META: Final = 1 << 0
SPGIST_DELETED: Final = 1 << 1
SPGIST_LEAF: Final = 1 << 2
SPGIST_NULLS: Final = 1 << 3
SPGIST_PAGE_ID: Final = 0xFF82

SPGIST_LIVE: Final = 0
SPGIST_REDIRECT: Final = 1
SPGIST_DEAD: Final = 2
SPGIST_PLACEHOLDER: Final = 3

INVALID_BLOCK_NUMBER: Final = 0xFFFFFFFF
INVALID_OFFSET_NUMBER: Final = 0

# SpGistPageOpaqueData {flags, nRedirection, nPlaceholder, spgist_page_id} at pd_special.
SIZE_OF_SPGIST_PAGE_OPAQUE: Final = 8
_OPAQUE = struct.Struct("<HHHH")
_OPQ_FLAGS: Final = 0
_OPQ_NREDIRECTION: Final = 2
_OPQ_NPLACEHOLDER: Final = 4

# Leaf, dead and inner tuples all start with a uint32 whose low two bits are
# tupstate (GCC allocates bit-fields from the least significant bit).
# Leaf/dead: size:30 above tupstate; then uint16 t_info (nextOffset in the low
# 14 bits) and ItemPointerData heapPtr / pointer; dead tuples end with xid.
# Inner: allTheSame:1, nNodes:13, prefixSize:16, then uint16 size.
SGDTSIZE: Final = 16
_DEAD_TUPLE = struct.Struct("<IHHHHI")  # word, t_info, bi_hi, bi_lo, ip_posid, xid
_SGITHDRSZ: Final = 8
_SGLT_T_INFO: Final = 4
_DT_POINTER: Final = 6
_INVALID_ITEM_POINTER: Final = struct.pack("<HHH", 0xFFFF, 0xFFFF, 0)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ITEM_POINTER = struct.Struct("<HHH")
_u16_from = _U16.unpack_from
_u16_into = _U16.pack_into
_u32_from = _U32.unpack_from

# --- spgxlog.h record layouts (C alignment: spgxlogState is 4-aligned) -------------

# spgxlogState {TransactionId myXid; bool isBuild} (8 bytes with padding)
# spgxlogAddLeaf: newPage, storesNulls, offnumLeaf, offnumHeadLeaf, offnumParent, nodeI
_XL_ADD_LEAF = struct.Struct("<??HHHH")
# spgxlogMoveLeafs: nMoves, newPage, replaceDead, storesNulls, (pad), offnumParent,
# nodeI, (pad), stateSrc; offsets at 20
_XL_MOVE_LEAFS = struct.Struct("<H???xHH2xI?3x")
# spgxlogAddNode: offnum, offnumNew, newPage, parentBlk, offnumParent, nodeI, (pad), stateSrc
_XL_ADD_NODE = struct.Struct("<HH?bHH2xI?3x")
# spgxlogSplitTuple: offnumPrefix, offnumPostfix, newPage, postfixBlkSame
_XL_SPLIT_TUPLE = struct.Struct("<HH??")
# spgxlogPickSplit: isRootSplit, (pad), nDelete, nInsert, initSrc, initDest,
# offnumInner, initInner, storesNulls, innerIsParent, (pad), offnumParent,
# nodeI, (pad), stateSrc; offsets at 28
_XL_PICKSPLIT = struct.Struct("<?xHH??H???xHH2xI?3x")
# spgxlogVacuumLeaf: nDead, nPlaceholder, nMove, nChain, stateSrc; offsets at 16
_XL_VACUUM_LEAF = struct.Struct("<HHHHI?3x")
# spgxlogVacuumRoot: nDelete, (pad), stateSrc; offsets at 12
_XL_VACUUM_ROOT = struct.Struct("<H2xI?3x")
# spgxlogVacuumRedirect: nToPlaceholder, firstPlaceholder, newestRedirectXid; offsets at 8
_XL_VACUUM_REDIRECT = struct.Struct("<HHI")


class _State(NamedTuple):
    """The spgxlogState fillFakeState copies: what spgFormDeadTuple needs."""

    my_xid: int
    is_build: bool


# --- tuples and pages ---------------------------------------------------------------


def spg_init_page(page: bytearray, flags: int) -> None:
    """SpGistInitPage / SpGistInitBuffer (spgutils.c)."""
    page_init(page, SIZE_OF_SPGIST_PAGE_OPAQUE)
    _OPAQUE.pack_into(page, BLCKSZ - SIZE_OF_SPGIST_PAGE_OPAQUE, flags, 0, 0, SPGIST_PAGE_ID)


def spg_form_dead_tuple(tupstate: int, blkno: int, offnum: int, my_xid: int) -> bytes:
    """spgFormDeadTuple (spgutils.c): a REDIRECT links to (blkno, offnum) and carries myXid."""
    word = tupstate | (SGDTSIZE << 2)
    if tupstate == SPGIST_REDIRECT:
        return _DEAD_TUPLE.pack(word, 0, blkno >> 16, blkno & 0xFFFF, offnum, my_xid)
    return _DEAD_TUPLE.pack(word, 0, 0xFFFF, 0xFFFF, INVALID_OFFSET_NUMBER, 0)


def _special(page: bytearray) -> int:
    special = int(_u16_from(page, 16)[0])
    if special + SIZE_OF_SPGIST_PAGE_OPAQUE > BLCKSZ:
        raise BadRecordError(f"page has no room for SpGistPageOpaqueData (pd_special {special})")
    return special


def _add_to_counter(page: bytearray, field: int, delta: int) -> None:
    pos = _special(page) + field
    _u16_into(page, pos, (int(_u16_from(page, pos)[0]) + delta) & 0xFFFF)


def _item_pos(page: bytearray, offnum: int) -> tuple[int, int]:
    """(lp_off, lp_len) of item `offnum`, checked against pd_lower and the page."""
    lower = int(_u16_from(page, 12)[0])
    if not 1 <= offnum <= (lower - SIZE_OF_PAGE_HEADER_DATA) // 4:
        raise BadRecordError(f"offset {offnum} is not on the page")
    raw = int(_u32_from(page, SIZE_OF_PAGE_HEADER_DATA + 4 * (offnum - 1))[0])
    off, length = raw & 0x7FFF, raw >> 17
    if off < SIZE_OF_PAGE_HEADER_DATA or off + length > BLCKSZ:
        raise BadRecordError(f"item {offnum} lies outside the page")
    return off, length


def _add_item_at(page: bytearray, item: bytes | memoryview, offnum: int) -> None:
    """PageAddItem(page, item, size, offnum, false, false), which must land at offnum."""
    if page_add_item_extended(page, item, offnum, 0) != offnum:
        raise BadRecordError(f"failed to add item of size {len(item)} to SPGiST index page")


def _add_or_replace_tuple(page: bytearray, tuple_: bytes | memoryview, offnum: int) -> None:
    """addOrReplaceTuple (spgxlog.c): add at offnum, replacing a placeholder there."""
    lower = int(_u16_from(page, 12)[0])
    maxoff = (lower - SIZE_OF_PAGE_HEADER_DATA) // 4 if lower > SIZE_OF_PAGE_HEADER_DATA else 0
    if offnum <= maxoff:
        off, _length = _item_pos(page, offnum)
        if int(_u32_from(page, off)[0]) & 3 != SPGIST_PLACEHOLDER:
            raise BadRecordError("SPGiST tuple to be replaced is not a placeholder")
        _add_to_counter(page, _OPQ_NPLACEHOLDER, -1)
        page_index_tuple_delete(page, offnum)
    _add_item_at(page, tuple_, offnum)


def spg_update_node_link(page: bytearray, offnum: int, node_n: int, blkno: int, offset: int) -> None:
    """spgUpdateNodeLink (spgdoinsert.c) on the inner tuple at `offnum`.

    Walks the node tuples after the header and prefix (SGITITERATE) and points
    node `node_n`'s t_tid at (blkno, offset).
    """
    off, length = _item_pos(page, offnum)
    word = int(_u32_from(page, off)[0])
    n_nodes = (word >> 3) & 0x1FFF
    prefix_size = word >> 16
    end = off + length
    pos = off + _SGITHDRSZ + prefix_size
    for i in range(n_nodes):
        if pos + 8 > end:
            break
        if i == node_n:
            _ITEM_POINTER.pack_into(page, pos, blkno >> 16, blkno & 0xFFFF, offset)
            return
        size = int(_u16_from(page, pos + 6)[0]) & 0x1FFF
        if size == 0:
            break
        pos += size
    raise BadRecordError(f"failed to find requested node {node_n} in SPGiST inner tuple")


def spg_page_index_multi_delete(
    page: bytearray,
    itemnos: Sequence[int],
    firststate: int,
    reststate: int,
    blkno: int,
    offnum: int,
    state: _State,
) -> None:
    """spgPageIndexMultiDelete (spgdoinsert.c): replace tuples by dead tuples in place.

    The first listed item becomes `firststate`, the others `reststate`;
    REDIRECT / PLACEHOLDER counts in the special space go up accordingly.
    """
    if not itemnos:
        return
    sortednos = sorted(itemnos)
    page_index_multi_delete(page, sortednos)
    first_item = itemnos[0]
    tuples = {
        s: spg_form_dead_tuple(s, blkno, offnum, state.my_xid) for s in {firststate, reststate}
    }
    nredirect = nplaceholder = 0
    for itemno in sortednos:
        tupstate = firststate if itemno == first_item else reststate
        _add_item_at(page, tuples[tupstate], itemno)
        if tupstate == SPGIST_REDIRECT:
            nredirect += 1
        elif tupstate == SPGIST_PLACEHOLDER:
            nplaceholder += 1
    if nredirect:
        _add_to_counter(page, _OPQ_NREDIRECTION, nredirect)
    if nplaceholder:
        _add_to_counter(page, _OPQ_NPLACEHOLDER, nplaceholder)


def _leaf_tuple(data: memoryview, pos: int) -> memoryview:
    """The unaligned leaf (or dead) tuple at data[pos:], as long as its header's size."""
    if pos + 4 > len(data):
        raise BadRecordError("truncated SP-GiST leaf tuple in record")
    size = int(_u32_from(data, pos)[0]) >> 2
    if size < 4 or pos + size > len(data):
        raise BadRecordError(f"SP-GiST leaf tuple of {size} bytes does not fit the record")
    return data[pos : pos + size]


def _inner_tuple(data: memoryview, pos: int) -> memoryview:
    """The unaligned inner tuple at data[pos:], as long as its header's size field."""
    if pos + _SGITHDRSZ > len(data):
        raise BadRecordError("truncated SP-GiST inner tuple in record")
    size = int(_u16_from(data, pos + 4)[0])
    if size < _SGITHDRSZ or pos + size > len(data):
        raise BadRecordError(f"SP-GiST inner tuple of {size} bytes does not fit the record")
    return data[pos : pos + size]


def _offsets(data: memoryview, pos: int, n: int) -> tuple[list[int], int]:
    if pos + 2 * n > len(data):
        raise BadRecordError(f"record data too short for {n} offsets")
    return list(struct.unpack_from(f"<{n}H", data, pos)), pos + 2 * n


def _block_number(rec: DecodedRecord, block_id: int) -> int:
    """XLogRecGetBlockTag(record, block_id, ...)'s block number."""
    b = rec.block(block_id)
    if b is None:
        raise BadRecordError(f"record has no block reference {block_id}")
    return b.blkno


def _leaf_flags(stores_nulls: bool) -> int:
    return SPGIST_LEAF | (SPGIST_NULLS if stores_nulls else 0)


# --- redo functions ------------------------------------------------------------------


def spg_add_leaf_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoAddLeaf (spgxlog.c): block 0 the leaf page, block 1 the parent."""
    data = memoryview(rec.main_data)
    new_page, stores_nulls, offnum_leaf, offnum_head, offnum_parent, node_i = _XL_ADD_LEAF.unpack_from(data, 0)
    if block.block_id == 0:
        leaf = _leaf_tuple(data, _XL_ADD_LEAF.size)
        if new_page:
            spg_init_page(page, _leaf_flags(stores_nulls))
        if offnum_leaf != offnum_head:
            # Normal case: the tuple was added by SpGistPageAddNewItem.
            _add_or_replace_tuple(page, leaf, offnum_leaf)
            if offnum_head != INVALID_OFFSET_NUMBER:
                off, _length = _item_pos(page, offnum_head)
                t_info = int(_u16_from(page, off + _SGLT_T_INFO)[0])
                _u16_into(page, off + _SGLT_T_INFO, (t_info & 0xC000) | (offnum_leaf & 0x3FFF))
        else:
            # Replacing a DEAD tuple.
            page_index_tuple_delete(page, offnum_leaf)
            _add_item_at(page, leaf, offnum_leaf)
    elif block.block_id == 1:
        if offnum_parent == INVALID_OFFSET_NUMBER:
            raise BadRecordError("parent block referenced without a parent offset")
        spg_update_node_link(page, offnum_parent, node_i, _block_number(rec, 0), offnum_leaf)
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


def spg_move_leafs_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoMoveLeafs (spgxlog.c): block 0 the source, 1 the destination, 2 the parent."""
    data = memoryview(rec.main_data)
    (n_moves, new_page, replace_dead, stores_nulls, offnum_parent, node_i,
     my_xid, is_build) = _XL_MOVE_LEAFS.unpack_from(data, 0)
    n_insert = 1 if replace_dead else n_moves + 1
    to_delete, pos = _offsets(data, _XL_MOVE_LEAFS.size, n_moves)
    to_insert, pos = _offsets(data, pos, n_insert)
    blkno_dst = _block_number(rec, 1)

    if block.block_id == 1:
        if new_page:
            spg_init_page(page, _leaf_flags(stores_nulls))
        for offnum in to_insert:
            leaf = _leaf_tuple(data, pos)
            _add_or_replace_tuple(page, leaf, offnum)
            pos += len(leaf)
    elif block.block_id == 0:
        state = _State(my_xid, is_build)
        spg_page_index_multi_delete(
            page, to_delete, SPGIST_PLACEHOLDER if is_build else SPGIST_REDIRECT,
            SPGIST_PLACEHOLDER, blkno_dst, to_insert[-1], state,
        )
    elif block.block_id == 2:
        spg_update_node_link(page, offnum_parent, node_i, blkno_dst, to_insert[-1])
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


def spg_add_node_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoAddNode (spgxlog.c).

    Without block 1 the enlarged inner tuple replaces the old one in place on
    block 0. Otherwise it goes to block 1 (the new page), the old one becomes a
    redirect (a placeholder during index build), and the parent downlink is
    fixed on whichever block parentBlk names.
    """
    data = memoryview(rec.main_data)
    (offnum, offnum_new, new_page, parent_blk, offnum_parent, node_i,
     my_xid, is_build) = _XL_ADD_NODE.unpack_from(data, 0)
    inner = _inner_tuple(data, _XL_ADD_NODE.size)

    if rec.block(1) is None:
        if block.block_id != 0:
            raise BadRecordError(f"unexpected block reference {block.block_id}")
        page_index_tuple_delete(page, offnum)
        _add_item_at(page, inner, offnum)
        return

    blkno_new = _block_number(rec, 1)
    if block.block_id == 1:
        if new_page:
            spg_init_page(page, 0)  # AddNode is not used for nulls pages
        _add_or_replace_tuple(page, inner, offnum_new)
        if parent_blk == 1:
            spg_update_node_link(page, offnum_parent, node_i, blkno_new, offnum_new)
    elif block.block_id == 0:
        if is_build:
            dt = spg_form_dead_tuple(SPGIST_PLACEHOLDER, INVALID_BLOCK_NUMBER, INVALID_OFFSET_NUMBER, my_xid)
        else:
            dt = spg_form_dead_tuple(SPGIST_REDIRECT, blkno_new, offnum_new, my_xid)
        page_index_tuple_delete(page, offnum)
        _add_item_at(page, dt, offnum)
        _add_to_counter(page, _OPQ_NPLACEHOLDER if is_build else _OPQ_NREDIRECTION, 1)
        if parent_blk == 0:
            spg_update_node_link(page, offnum_parent, node_i, blkno_new, offnum_new)
    elif block.block_id == 2:
        if parent_blk != 2:
            raise BadRecordError("parent block referenced but parentBlk is not 2")
        spg_update_node_link(page, offnum_parent, node_i, blkno_new, offnum_new)
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


def spg_split_tuple_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoSplitTuple (spgxlog.c): block 0 gets the prefix tuple, block 1 the postfix."""
    data = memoryview(rec.main_data)
    offnum_prefix, offnum_postfix, new_page, postfix_blk_same = _XL_SPLIT_TUPLE.unpack_from(data, 0)
    prefix = _inner_tuple(data, _XL_SPLIT_TUPLE.size)
    postfix = _inner_tuple(data, _XL_SPLIT_TUPLE.size + len(prefix))

    if block.block_id == 1:
        if postfix_blk_same:
            raise BadRecordError("postfix page referenced but postfixBlkSame is set")
        if new_page:
            spg_init_page(page, 0)  # SplitTuple is not used for nulls pages
        _add_or_replace_tuple(page, postfix, offnum_postfix)
    elif block.block_id == 0:
        page_index_tuple_delete(page, offnum_prefix)
        _add_item_at(page, prefix, offnum_prefix)
        if postfix_blk_same:
            _add_or_replace_tuple(page, postfix, offnum_postfix)
    else:
        raise BadRecordError(f"unexpected block reference {block.block_id}")


def spg_pick_split_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoPickSplit (spgxlog.c).

    Block 0 is the source leaf page (absent for a root split), 1 the new
    destination leaf page (optional), 2 the page of the new inner tuple, 3 the
    parent (unless the inner page is the parent, or the root was split).
    """
    data = memoryview(rec.main_data)
    (is_root_split, n_delete, n_insert, init_src, init_dest, offnum_inner, init_inner,
     stores_nulls, inner_is_parent, offnum_parent, node_i,
     my_xid, is_build) = _XL_PICKSPLIT.unpack_from(data, 0)
    to_delete, pos = _offsets(data, _XL_PICKSPLIT.size, n_delete)
    to_insert, pos = _offsets(data, pos, n_insert)
    if pos + n_insert > len(data):
        raise BadRecordError("record data too short for leafPageSelect")
    leaf_page_select = bytes(data[pos : pos + n_insert])
    pos += n_insert
    inner = _inner_tuple(data, pos)
    pos += len(inner)
    blkno_inner = _block_number(rec, 2)

    bid = block.block_id
    if bid in (0, 1):
        if bid == 0:
            if is_root_split:
                raise BadRecordError("root split references a source page")
            if init_src:
                spg_init_page(page, _leaf_flags(stores_nulls))
            elif not is_build:
                spg_page_index_multi_delete(
                    page, to_delete, SPGIST_REDIRECT, SPGIST_PLACEHOLDER, blkno_inner, offnum_inner,
                    _State(my_xid, is_build),
                )
            else:
                spg_page_index_multi_delete(
                    page, to_delete, SPGIST_PLACEHOLDER, SPGIST_PLACEHOLDER,
                    INVALID_BLOCK_NUMBER, INVALID_OFFSET_NUMBER, _State(my_xid, is_build),
                )
        elif init_dest:
            spg_init_page(page, _leaf_flags(stores_nulls))
        want = 1 if bid == 1 else 0
        for i in range(n_insert):
            leaf = _leaf_tuple(data, pos)
            pos += len(leaf)
            if (leaf_page_select[i] != 0) == bool(want):
                _add_or_replace_tuple(page, leaf, to_insert[i])
    elif bid == 2:
        if init_inner:
            spg_init_page(page, SPGIST_NULLS if stores_nulls else 0)
        _add_or_replace_tuple(page, inner, offnum_inner)
        if inner_is_parent:
            spg_update_node_link(page, offnum_parent, node_i, blkno_inner, offnum_inner)
    elif bid == 3:
        spg_update_node_link(page, offnum_parent, node_i, blkno_inner, offnum_inner)
    else:
        raise BadRecordError(f"unexpected block reference {bid}")


def spg_vacuum_leaf_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoVacuumLeaf (spgxlog.c): dead, placeholder, moved and re-chained leaf tuples."""
    data = memoryview(rec.main_data)
    n_dead, n_placeholder, n_move, n_chain, my_xid, is_build = _XL_VACUUM_LEAF.unpack_from(data, 0)
    state = _State(my_xid, is_build)
    to_dead, pos = _offsets(data, _XL_VACUUM_LEAF.size, n_dead)
    to_placeholder, pos = _offsets(data, pos, n_placeholder)
    move_src, pos = _offsets(data, pos, n_move)
    move_dest, pos = _offsets(data, pos, n_move)
    chain_src, pos = _offsets(data, pos, n_chain)
    chain_dest, pos = _offsets(data, pos, n_chain)

    spg_page_index_multi_delete(
        page, to_dead, SPGIST_DEAD, SPGIST_DEAD, INVALID_BLOCK_NUMBER, INVALID_OFFSET_NUMBER, state
    )
    spg_page_index_multi_delete(
        page, to_placeholder, SPGIST_PLACEHOLDER, SPGIST_PLACEHOLDER,
        INVALID_BLOCK_NUMBER, INVALID_OFFSET_NUMBER, state,
    )
    # Swap the line pointers of each moved tuple and its destination (vacuumLeafPage).
    lower = int(_u16_from(page, 12)[0])
    maxoff = (lower - SIZE_OF_PAGE_HEADER_DATA) // 4
    for src, dst in zip(move_src, move_dest):
        if not (1 <= src <= maxoff and 1 <= dst <= maxoff):
            raise BadRecordError(f"moved tuple offsets {src} -> {dst} are not on the page")
        psrc = SIZE_OF_PAGE_HEADER_DATA + 4 * (src - 1)
        pdst = SIZE_OF_PAGE_HEADER_DATA + 4 * (dst - 1)
        page[psrc : psrc + 4], page[pdst : pdst + 4] = page[pdst : pdst + 4], page[psrc : psrc + 4]
    spg_page_index_multi_delete(
        page, move_src, SPGIST_PLACEHOLDER, SPGIST_PLACEHOLDER,
        INVALID_BLOCK_NUMBER, INVALID_OFFSET_NUMBER, state,
    )
    for src, dst in zip(chain_src, chain_dest):
        off, _length = _item_pos(page, src)
        t_info = int(_u16_from(page, off + _SGLT_T_INFO)[0])
        _u16_into(page, off + _SGLT_T_INFO, (t_info & 0xC000) | (dst & 0x3FFF))


def spg_vacuum_root_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoVacuumRoot (spgxlog.c): delete tuples from a root that is a leaf."""
    data = memoryview(rec.main_data)
    n_delete, _my_xid, _is_build = _XL_VACUUM_ROOT.unpack_from(data, 0)
    to_delete, _pos = _offsets(data, _XL_VACUUM_ROOT.size, n_delete)
    page_index_multi_delete(page, to_delete)


def spg_vacuum_redirect_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spgRedoVacuumRedirect (spgxlog.c): old redirects become placeholders; trailing
    placeholders are removed."""
    data = memoryview(rec.main_data)
    n_to_placeholder, first_placeholder, _newest_xid = _XL_VACUUM_REDIRECT.unpack_from(data, 0)
    items, _pos = _offsets(data, _XL_VACUUM_REDIRECT.size, n_to_placeholder)
    for offnum in items:
        off, _length = _item_pos(page, offnum)
        word = int(_u32_from(page, off)[0])
        _U32.pack_into(page, off, (word & ~3) | SPGIST_PLACEHOLDER)
        page[off + _DT_POINTER : off + _DT_POINTER + 6] = _INVALID_ITEM_POINTER
    _add_to_counter(page, _OPQ_NREDIRECTION, -n_to_placeholder)
    _add_to_counter(page, _OPQ_NPLACEHOLDER, n_to_placeholder)

    if first_placeholder != INVALID_OFFSET_NUMBER:
        lower = int(_u16_from(page, 12)[0])
        maxoff = (lower - SIZE_OF_PAGE_HEADER_DATA) // 4 if lower > SIZE_OF_PAGE_HEADER_DATA else 0
        to_delete = list(range(first_placeholder, maxoff + 1))
        _add_to_counter(page, _OPQ_NPLACEHOLDER, -len(to_delete))
        page_index_multi_delete(page, to_delete)


_HANDLERS: dict[int, Callable[[DecodedRecord, DecodedBlock, bytearray], None]] = {
    XLOG_SPGIST_ADD_LEAF: spg_add_leaf_redo,
    XLOG_SPGIST_MOVE_LEAFS: spg_move_leafs_redo,
    XLOG_SPGIST_ADD_NODE: spg_add_node_redo,
    XLOG_SPGIST_SPLIT_TUPLE: spg_split_tuple_redo,
    XLOG_SPGIST_PICKSPLIT: spg_pick_split_redo,
    XLOG_SPGIST_VACUUM_LEAF: spg_vacuum_leaf_redo,
    XLOG_SPGIST_VACUUM_ROOT: spg_vacuum_root_redo,
    XLOG_SPGIST_VACUUM_REDIRECT: spg_vacuum_redirect_redo,
}


def spg_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """spg_redo (spgxlog.c) for one block reference of `rec`."""
    handler = _HANDLERS.get(rec.info & XLR_RMGR_INFO_MASK)
    if handler is None:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    handler(rec, block, page)


register_block_redo(RM_SPGIST_ID, spg_redo)
