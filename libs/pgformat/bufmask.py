"""Page masking for consistency checks (PostgreSQL 15).

The generic helpers follow src/backend/access/common/bufmask.c; the per-rmgr
``rm_mask`` functions follow heap_mask (src/backend/access/heap/heapam.c),
btree_mask (src/backend/access/nbtree/nbtxlog.c), seq_mask
(src/backend/commands/sequence.c) and generic_mask
(src/backend/access/transam/generic_xlog.c).

With ``wal_consistency_checking`` Postgres compares the page redo produced
with the full-page image the primary attached, after masking both with the
rmgr's mask; a page our redo produced is correct when it compares equal to
that image under the same mask. Every mask works in place on a BLCKSZ
``bytearray`` and has the signature ``mask(page, blkno)``.
"""

from __future__ import annotations

import struct
from typing import Callable, Final

from pgformat.constants import BLCKSZ, maxalign
from pgformat.page import (
    LP_NORMAL,
    PD_ALL_VISIBLE,
    PD_HAS_FREE_LINES,
    PD_PAGE_FULL,
    SIZE_OF_PAGE_HEADER_DATA,
    PageError,
)
from pgformat.rmgr import RM_BTREE_ID, RM_GENERIC_ID, RM_HEAP2_ID, RM_HEAP_ID, RM_SEQ_ID
from pgformat.rmgr import RM_GIST_ID, RM_SPGIST_ID
from pgformat.rmgr import RM_GIN_ID
from pgformat.rmgr import RM_BRIN_ID, RM_HASH_ID

__all__ = [
    "MASK_MARKER",
    "MaskFunc",
    "NoMaskError",
    "mask_page_lsn_and_checksum",
    "mask_page_hint_bits",
    "mask_unused_space",
    "mask_lp_flags",
    "mask_page_content",
    "heap_mask",
    "btree_mask",
    "seq_mask",
    "generic_mask",
    "gist_mask",
    "spg_mask",
    "gin_mask",
    "hash_mask",
    "brin_mask",
    "mask_for_rmgr",
]

#: bufmask.h: the byte masked regions are filled with.
MASK_MARKER: Final = 0

MaskFunc = Callable[[bytearray, int], None]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_BOUNDS = struct.Struct("<HHH")  # pd_lower, pd_upper, pd_special at offset 12

_OFF_FLAGS: Final = 10
_OFF_LOWER: Final = 12
_OFF_UPPER: Final = 14
_OFF_PRUNE_XID: Final = 20

# htup_details.h: HeapTupleHeaderData field offsets and t_infomask bits.
_T_CID: Final = 8  # t_choice.t_heap.t_field3.t_cid
_T_CTID: Final = 12  # ItemPointerData {bi_hi, bi_lo, ip_posid}
_T_INFOMASK: Final = 20
_SIZEOF_HEAP_TUPLE_HEADER: Final = 23
HEAP_XMIN_COMMITTED: Final = 0x0100
HEAP_XMIN_INVALID: Final = 0x0200
HEAP_XMIN_FROZEN: Final = HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID
HEAP_XMAX_COMMITTED: Final = 0x0400
HEAP_XMAX_INVALID: Final = 0x0800
HEAP_XACT_MASK: Final = 0xFFF0
#: itemptr.h: ip_posid of a speculative insertion token.
SPEC_TOKEN_OFFSET_NUMBER: Final = 0xFFFE
_ITEM_POINTER = struct.Struct("<HHH")

# nbtree.h: BTPageOpaqueData {btpo_prev, btpo_next, btpo_level, btpo_flags,
# btpo_cycleid}, 16 bytes at pd_special.
_SIZEOF_BT_OPAQUE: Final = 16
_BTPO_FLAGS: Final = 12
_BTPO_CYCLEID: Final = 14
BTP_LEAF: Final = 1 << 0
BTP_SPLIT_END: Final = 1 << 5
BTP_HAS_GARBAGE: Final = 1 << 6


class NoMaskError(KeyError):
    """No mask function is known for this resource manager."""

    def __init__(self, rmid: int) -> None:
        super().__init__(rmid)
        self.rmid = int(rmid)

    def __str__(self) -> str:
        return f"no page mask for resource manager id {self.rmid}"


def _check_page(page: bytearray) -> None:
    if len(page) != BLCKSZ:
        raise PageError(f"page is {len(page)} bytes, expected {BLCKSZ}")


def _max_offset(page: bytearray) -> int:
    lower = _U16.unpack_from(page, _OFF_LOWER)[0]
    if lower <= SIZE_OF_PAGE_HEADER_DATA:
        return 0
    return (lower - SIZE_OF_PAGE_HEADER_DATA) // 4


# --- bufmask.c ------------------------------------------------------------------


def mask_page_lsn_and_checksum(page: bytearray) -> None:
    """mask_page_lsn_and_checksum (bufmask.c): zero pd_lsn and pd_checksum."""
    _check_page(page)
    page[0:10] = bytes(10)


def mask_page_hint_bits(page: bytearray) -> None:
    """mask_page_hint_bits (bufmask.c).

    Zero pd_prune_xid; clear PD_PAGE_FULL, PD_HAS_FREE_LINES, PD_ALL_VISIBLE.
    """
    _check_page(page)
    _U32.pack_into(page, _OFF_PRUNE_XID, MASK_MARKER)
    flags = _U16.unpack_from(page, _OFF_FLAGS)[0]
    flags &= ~(PD_PAGE_FULL | PD_HAS_FREE_LINES | PD_ALL_VISIBLE)
    _U16.pack_into(page, _OFF_FLAGS, flags)


def mask_unused_space(page: bytearray) -> None:
    """mask_unused_space (bufmask.c): zero [pd_lower, pd_upper).

    Raises PageError for invalid pointers, as Postgres does.
    """
    _check_page(page)
    lower, upper, special = _BOUNDS.unpack_from(page, _OFF_LOWER)
    if (
        lower > upper
        or special < upper
        or lower < SIZE_OF_PAGE_HEADER_DATA
        or special > BLCKSZ
    ):
        raise PageError(
            f"invalid page pd_lower {lower} pd_upper {upper} pd_special {special}"
        )
    page[lower:upper] = bytes(upper - lower)


def mask_lp_flags(page: bytearray) -> None:
    """mask_lp_flags (bufmask.c): set lp_flags of every used line pointer to LP_UNUSED.

    lp_off and lp_len are kept.
    """
    _check_page(page)
    nline = _max_offset(page)
    if nline == 0:
        return
    if SIZE_OF_PAGE_HEADER_DATA + 4 * nline > BLCKSZ:
        raise PageError(f"invalid page pd_lower {SIZE_OF_PAGE_HEADER_DATA + 4 * nline}")
    fmt = f"<{nline}I"
    linps = struct.unpack_from(fmt, page, SIZE_OF_PAGE_HEADER_DATA)
    struct.pack_into(
        fmt, page, SIZE_OF_PAGE_HEADER_DATA, *(raw & ~(3 << 15) for raw in linps)
    )


def mask_page_content(page: bytearray) -> None:
    """mask_page_content (bufmask.c): zero everything after the header, and
    pd_lower and pd_upper."""
    _check_page(page)
    page[SIZE_OF_PAGE_HEADER_DATA:] = bytes(BLCKSZ - SIZE_OF_PAGE_HEADER_DATA)
    page[_OFF_LOWER : _OFF_UPPER + 2] = bytes(4)


# --- rmgr masks -------------------------------------------------------------------


def heap_mask(page: bytearray, blkno: int) -> None:
    """heap_mask (heapam.c), the rm_mask of Heap and Heap2.

    Beyond the header and free space: for each LP_NORMAL tuple, clear the
    t_infomask visibility hint bits (only the xmax hints if xmin is frozen),
    zero t_cid, and set a speculative token's t_ctid to (blkno, offnum); then
    zero the MAXALIGN padding after every item with storage.
    """
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)

    nline = _max_offset(page)
    linps = struct.unpack_from(f"<{nline}I", page, SIZE_OF_PAGE_HEADER_DATA)
    for off, raw in enumerate(linps, 1):
        lp_off = raw & 0x7FFF
        lp_flags = (raw >> 15) & 3
        lp_len = raw >> 17

        if lp_flags == LP_NORMAL:
            if lp_off + _SIZEOF_HEAP_TUPLE_HEADER > BLCKSZ:
                raise PageError(f"heap tuple {off} at offset {lp_off} extends past the page")
            pos = lp_off + _T_INFOMASK
            infomask = _U16.unpack_from(page, pos)[0]
            if infomask & HEAP_XMIN_FROZEN != HEAP_XMIN_FROZEN:
                infomask &= ~HEAP_XACT_MASK
            else:
                infomask &= ~(HEAP_XMAX_INVALID | HEAP_XMAX_COMMITTED)
            _U16.pack_into(page, pos, infomask)

            _U32.pack_into(page, lp_off + _T_CID, MASK_MARKER)

            if _U16.unpack_from(page, lp_off + _T_CTID + 4)[0] == SPEC_TOKEN_OFFSET_NUMBER:
                _ITEM_POINTER.pack_into(
                    page, lp_off + _T_CTID, (blkno >> 16) & 0xFFFF, blkno & 0xFFFF, off
                )

        if lp_len:
            padlen = maxalign(lp_len) - lp_len
            if padlen > 0:
                start = lp_off + lp_len
                if start + padlen > BLCKSZ:
                    raise PageError(
                        f"item {off} (offset {lp_off}, length {lp_len}) extends past the page"
                    )
                page[start : start + padlen] = bytes(padlen)


def btree_mask(page: bytearray, blkno: int) -> None:
    """btree_mask (nbtxlog.c).

    Header hints and free space; line pointer flags on leaf pages; and in
    BTPageOpaqueData the BTP_HAS_GARBAGE and BTP_SPLIT_END flags and
    btpo_cycleid.
    """
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)

    special = _U16.unpack_from(page, 16)[0]
    if special + _SIZEOF_BT_OPAQUE > BLCKSZ:
        raise PageError(f"btree page has no room for its special space (pd_special {special})")
    flags = _U16.unpack_from(page, special + _BTPO_FLAGS)[0]
    if flags & BTP_LEAF:
        mask_lp_flags(page)
    flags &= ~(BTP_HAS_GARBAGE | BTP_SPLIT_END)
    _U16.pack_into(page, special + _BTPO_FLAGS, flags)
    _U16.pack_into(page, special + _BTPO_CYCLEID, 0)


def seq_mask(page: bytearray, blkno: int) -> None:
    """seq_mask (sequence.c): LSN, checksum and free space."""
    mask_page_lsn_and_checksum(page)
    mask_unused_space(page)


def generic_mask(page: bytearray, blkno: int) -> None:
    """generic_mask (generic_xlog.c): LSN, checksum and free space."""
    mask_page_lsn_and_checksum(page)
    mask_unused_space(page)


def gist_mask(page: bytearray, blkno: int) -> None:
    """gist_mask (gistxlog.c).

    Header hints and free space; the NSN in GISTPageOpaqueData (an LSN);
    F_FOLLOW_RIGHT set (cleared on the child only after the WAL record is
    written); line pointer flags on leaf pages (gistkillitems sets LP_DEAD
    without WAL); F_HAS_GARBAGE cleared (redo never sets it).
    """
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)

    special = _U16.unpack_from(page, 16)[0]
    if special + _SIZEOF_GIST_OPAQUE > BLCKSZ:
        raise PageError(f"gist page has no room for its special space (pd_special {special})")
    page[special : special + 8] = bytes(8)  # GistPageSetNSN(page, MASK_MARKER)
    flags = _U16.unpack_from(page, special + _GIST_FLAGS)[0] | _GIST_F_FOLLOW_RIGHT
    _U16.pack_into(page, special + _GIST_FLAGS, flags)
    if flags & _GIST_F_LEAF:
        mask_lp_flags(page)
    _U16.pack_into(page, special + _GIST_FLAGS, flags & ~_GIST_F_HAS_GARBAGE)


def spg_mask(page: bytearray, blkno: int) -> None:
    """spg_mask (spgxlog.c): LSN, checksum, header hints, and free space when
    pd_lower looks set."""
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    if _U16.unpack_from(page, _OFF_LOWER)[0] >= SIZE_OF_PAGE_HEADER_DATA:
        mask_unused_space(page)


# gist.h: GISTPageOpaqueData {nsn, rightlink, flags, gist_page_id}, 16 bytes at pd_special.
_SIZEOF_GIST_OPAQUE: Final = 16
_GIST_FLAGS: Final = 12
_GIST_F_LEAF: Final = 1 << 0
_GIST_F_FOLLOW_RIGHT: Final = 1 << 3
_GIST_F_HAS_GARBAGE: Final = 1 << 4


def gin_mask(page: bytearray, blkno: int) -> None:
    """gin_mask (ginxlog.c).

    LSN, checksum and header hints; a GIN_DELETED page (redo empties it)
    has its whole content masked, any other page its free space when
    pd_lower looks set.
    """
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    special = _U16.unpack_from(page, 16)[0]
    if special + _SIZEOF_GIN_OPAQUE > BLCKSZ:
        raise PageError(f"gin page has no room for its special space (pd_special {special})")
    # GinPageOpaqueData {rightlink, maxoff, flags}: flags at offset 6.
    if _U16.unpack_from(page, special + 6)[0] & _GIN_DELETED:
        mask_page_content(page)
    elif _U16.unpack_from(page, _OFF_LOWER)[0] > SIZE_OF_PAGE_HEADER_DATA:
        mask_unused_space(page)


_SIZEOF_GIN_OPAQUE: Final = 8
_GIN_DELETED: Final = 1 << 2


# hash.h: HashPageOpaqueData {hasho_prevblkno, hasho_nextblkno, hasho_bucket,
# hasho_flag, hasho_page_id}, 16 bytes at pd_special.
_SIZEOF_HASH_OPAQUE: Final = 16
_HASHO_FLAG: Final = 12
_LH_OVERFLOW_PAGE: Final = 1 << 0
_LH_BUCKET_PAGE: Final = 1 << 1
_LH_BITMAP_PAGE: Final = 1 << 2
_LH_META_PAGE: Final = 1 << 3
_LH_PAGE_HAS_DEAD_TUPLES: Final = 1 << 7
_LH_PAGE_TYPE: Final = _LH_OVERFLOW_PAGE | _LH_BUCKET_PAGE | _LH_BITMAP_PAGE | _LH_META_PAGE


def hash_mask(page: bytearray, blkno: int) -> None:
    """hash_mask (hash_xlog.c).

    Header hints and free space; an unused page (LH_UNUSED_PAGE) has its
    whole content masked; bucket and overflow pages their line pointer flags
    (hashgettuple / _hash_kill_items set LP_DEAD without WAL); and the
    LH_PAGE_HAS_DEAD_TUPLES hint is cleared everywhere.
    """
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)

    special = _U16.unpack_from(page, 16)[0]
    if special + _SIZEOF_HASH_OPAQUE > BLCKSZ:
        raise PageError(f"hash page has no room for its special space (pd_special {special})")
    pagetype = _U16.unpack_from(page, special + _HASHO_FLAG)[0] & _LH_PAGE_TYPE
    if pagetype == 0:  # LH_UNUSED_PAGE
        mask_page_content(page)
    elif pagetype == _LH_BUCKET_PAGE or pagetype == _LH_OVERFLOW_PAGE:
        mask_lp_flags(page)
    flags = _U16.unpack_from(page, special + _HASHO_FLAG)[0]
    _U16.pack_into(page, special + _HASHO_FLAG, flags & ~_LH_PAGE_HAS_DEAD_TUPLES)


# brin_page.h: BrinSpecialSpace {uint16 vector[MAXALIGN(1) / 2]} at pd_special:
# the page type in the last element, the flags in the one before.
_SIZEOF_BRIN_SPECIAL: Final = 8
_BRIN_TYPE: Final = _SIZEOF_BRIN_SPECIAL - 2
_BRIN_FLAGS: Final = _SIZEOF_BRIN_SPECIAL - 4
_BRIN_PAGETYPE_META: Final = 0xF091
_BRIN_PAGETYPE_REGULAR: Final = 0xF093
_BRIN_EVACUATE_PAGE: Final = 1 << 0


def brin_mask(page: bytearray, blkno: int) -> None:
    """brin_mask (brin_xlog.c).

    LSN, checksum and header hints; free space of regular pages, and of the
    metapage when pd_lower looks set; the BRIN_EVACUATE_PAGE flag (never
    WAL-logged, see brin_start_evacuating_page).
    """
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)

    special = _U16.unpack_from(page, 16)[0]
    if special + _SIZEOF_BRIN_SPECIAL > BLCKSZ:
        raise PageError(f"brin page has no room for its special space (pd_special {special})")
    pagetype = _U16.unpack_from(page, special + _BRIN_TYPE)[0]
    if pagetype == _BRIN_PAGETYPE_REGULAR or (
        pagetype == _BRIN_PAGETYPE_META and _U16.unpack_from(page, _OFF_LOWER)[0] > SIZE_OF_PAGE_HEADER_DATA
    ):
        mask_unused_space(page)
    flags = _U16.unpack_from(page, special + _BRIN_FLAGS)[0]
    _U16.pack_into(page, special + _BRIN_FLAGS, flags & ~_BRIN_EVACUATE_PAGE)


# rmid -> rm_mask, as in rmgrlist.h.
_RMGR_MASKS: dict[int, MaskFunc] = {
    RM_HASH_ID: hash_mask,
    RM_BRIN_ID: brin_mask,
    RM_GIN_ID: gin_mask,
    RM_GIST_ID: gist_mask,
    RM_SPGIST_ID: spg_mask,
    RM_HEAP2_ID: heap_mask,
    RM_HEAP_ID: heap_mask,
    RM_BTREE_ID: btree_mask,
    RM_SEQ_ID: seq_mask,
    RM_GENERIC_ID: generic_mask,
}


def mask_for_rmgr(rmid: int) -> MaskFunc:
    """The rm_mask of resource manager ``rmid``; NoMaskError if there is none (yet)."""
    try:
        return _RMGR_MASKS[int(rmid)]
    except KeyError:
        raise NoMaskError(rmid) from None
