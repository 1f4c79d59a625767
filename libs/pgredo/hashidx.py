"""Hash index redo (rmgr Hash, id 12) for PostgreSQL 15.

Follows src/backend/access/hash/hash_xlog.c (hash_redo and every
hash_xlog_* function) with the record layouts of
src/include/access/hash_xlog.h, the page layouts of src/include/access/hash.h
(HashPageOpaqueData, HashMetaPageData, bitmap pages) and the page builders
_hash_pageinit / _hash_initbuf / _hash_init_metabuffer (hashpage.c) and
_hash_initbitmapbuffer (hashovfl.c).

The engine calls :func:`hash_redo` once per block reference. Block references
that Postgres registers only to take a cleanup lock on the primary bucket page
during replay (block 0 of MOVE_PAGE_CONTENTS, SQUEEZE_PAGE and DELETE) are left
unchanged, LSN included, as XLogReadBufferForRedoExtended leaves them.

Restored images
---------------
hash_xlog_split_allocate_page (block 0) and hash_xlog_split_complete (blocks 0
and 1) also rewrite the bucket flag (and for the former hasho_prevblkno) of a
page restored from a full-page image (BLK_RESTORED). _hash_expandtable and
_hash_splitbucket make exactly those changes before XLogInsert, so an image
Postgres wrote already holds them; :func:`hash_restored_image_fixup`, which the
engine runs on every restored Hash image, repeats them anyway, as redo does.

SPLIT_PAGE carries a forced full-page image (log_split_page) that the engine
restores; a SPLIT_PAGE block without one is bad input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from pgformat.constants import BLCKSZ, maxalign
from pgformat.page import (
    SIZE_OF_PAGE_HEADER_DATA,
    page_add_item,
    page_index_multi_delete,
    page_init,
)
from pgformat.rmgr import (
    RM_HASH_ID,
    XLOG_HASH_ADD_OVFL_PAGE,
    XLOG_HASH_DELETE,
    XLOG_HASH_INIT_BITMAP_PAGE,
    XLOG_HASH_INIT_META_PAGE,
    XLOG_HASH_INSERT,
    XLOG_HASH_MOVE_PAGE_CONTENTS,
    XLOG_HASH_SPLIT_ALLOCATE_PAGE,
    XLOG_HASH_SPLIT_CLEANUP,
    XLOG_HASH_SPLIT_COMPLETE,
    XLOG_HASH_SPLIT_PAGE,
    XLOG_HASH_SQUEEZE_PAGE,
    XLOG_HASH_UPDATE_META_PAGE,
    XLOG_HASH_VACUUM_ONE_PAGE,
    XLR_RMGR_INFO_MASK,
)
from pgformat.xlogrecord import DecodedBlock, DecodedRecord

from .engine import register_block_redo, register_image_fixup
from .errors import BadRecordError, UnsupportedRecordError

__all__ = [
    "LH_UNUSED_PAGE",
    "LH_OVERFLOW_PAGE",
    "LH_BUCKET_PAGE",
    "LH_BITMAP_PAGE",
    "LH_META_PAGE",
    "LH_BUCKET_BEING_POPULATED",
    "LH_BUCKET_BEING_SPLIT",
    "LH_BUCKET_NEEDS_SPLIT_CLEANUP",
    "LH_PAGE_HAS_DEAD_TUPLES",
    "LH_PAGE_TYPE",
    "HASHO_PAGE_ID",
    "SIZE_OF_HASH_PAGE_OPAQUE",
    "SIZE_OF_HASH_META_PAGE_DATA",
    "HashMetaPage",
    "hash_pageinit",
    "hash_initbuf",
    "hash_init_metabuffer",
    "hash_initbitmapbuffer",
    "hash_spareindex",
    "hash_get_totalbuckets",
    "hash_read_meta",
    "hash_redo",
    "hash_restored_image_fixup",
]

# --- hash.h --------------------------------------------------------------------

LH_UNUSED_PAGE: Final = 0
LH_OVERFLOW_PAGE: Final = 1 << 0
LH_BUCKET_PAGE: Final = 1 << 1
LH_BITMAP_PAGE: Final = 1 << 2
LH_META_PAGE: Final = 1 << 3
LH_BUCKET_BEING_POPULATED: Final = 1 << 4
LH_BUCKET_BEING_SPLIT: Final = 1 << 5
LH_BUCKET_NEEDS_SPLIT_CLEANUP: Final = 1 << 6
LH_PAGE_HAS_DEAD_TUPLES: Final = 1 << 7
LH_PAGE_TYPE: Final = LH_OVERFLOW_PAGE | LH_BUCKET_PAGE | LH_BITMAP_PAGE | LH_META_PAGE
HASHO_PAGE_ID: Final = 0xFF80
INVALID_BLOCK_NUMBER: Final = 0xFFFFFFFF
INVALID_BUCKET: Final = 0xFFFFFFFF
HASH_MAGIC: Final = 0x6440640
HASH_VERSION: Final = 4
BYTE_TO_BIT: Final = 3

HASH_MAX_BITMAPS: Final = min(BLCKSZ // 8, 1024)
HASH_SPLITPOINT_PHASE_BITS: Final = 2
HASH_SPLITPOINT_PHASE_MASK: Final = (1 << HASH_SPLITPOINT_PHASE_BITS) - 1
HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE: Final = 10
HASH_MAX_SPLITPOINT_GROUP: Final = 32
HASH_MAX_SPLITPOINTS: Final = (
    (HASH_MAX_SPLITPOINT_GROUP - HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE) << HASH_SPLITPOINT_PHASE_BITS
) + HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE

# HashPageOpaqueData {hasho_prevblkno, hasho_nextblkno, hasho_bucket, hasho_flag,
# hasho_page_id} at pd_special.
SIZE_OF_HASH_PAGE_OPAQUE: Final = 16
_OPAQUE = struct.Struct("<IIIHH")
_OPQ_PREV: Final = 0
_OPQ_NEXT: Final = 4
_OPQ_FLAG: Final = 12

# HashMetaPageData at PageGetContents (MAXALIGN(SizeOfPageHeaderData)).
_META: Final = maxalign(SIZE_OF_PAGE_HEADER_DATA)
# magic, version, ntuples, ffactor, bsize, bmsize, bmshift, maxbucket, highmask,
# lowmask, ovflpoint, firstfree, nmaps, procid; then spares[], mapp[].
_META_FIXED = struct.Struct("<IIdHHHHIIIIIII")
_M_NTUPLES: Final = _META + 8
_M_MAXBUCKET: Final = _META + 24
_M_HIGHMASK: Final = _META + 28
_M_LOWMASK: Final = _META + 32
_M_OVFLPOINT: Final = _META + 36
_M_FIRSTFREE: Final = _META + 40
_M_NMAPS: Final = _META + 44
_M_SPARES: Final = _META + _META_FIXED.size
_M_MAPP: Final = _M_SPARES + 4 * HASH_MAX_SPLITPOINTS
# sizeof(HashMetaPageData): the double makes the struct 8-aligned.
SIZE_OF_HASH_META_PAGE_DATA: Final = maxalign(_M_MAPP + 4 * HASH_MAX_BITMAPS - _META)

# HashPageGetBitmap: uint32 words at PageGetContents.
_BITMAP: Final = _META

# --- hash_xlog.h record layouts ---------------------------------------------------

_XL_INIT_META_PAGE = struct.Struct("<dIH")  # num_tuples, procid, ffactor
_XL_INIT_BITMAP_PAGE = struct.Struct("<H")  # bmsize
_XL_INSERT = struct.Struct("<H")  # offnum
_XL_ADD_OVFL_PAGE = struct.Struct("<H?")  # bmsize, bmpage_found
_XL_SPLIT_ALLOCATE_PAGE = struct.Struct("<IHHB")  # new_bucket, old/new bucket flag, flags
_XL_SPLIT_COMPLETE = struct.Struct("<HH")  # old_bucket_flag, new_bucket_flag
_XL_MOVE_PAGE_CONTENTS = struct.Struct("<H?")  # ntups, is_prim_bucket_same_wrt
# prevblkno, nextblkno, ntups, is_prim_bucket_same_wrt, is_prev_bucket_same_wrt
_XL_SQUEEZE_PAGE = struct.Struct("<IIH??")
_XL_DELETE = struct.Struct("<??")  # clear_dead_marking, is_primary_bucket_page
_XL_UPDATE_META_PAGE = struct.Struct("<d")  # ntuples
_XL_VACUUM_ONE_PAGE = struct.Struct("<Ii")  # latestRemovedXid, ntuples

XLH_SPLIT_META_UPDATE_MASKS: Final = 1 << 0
XLH_SPLIT_META_UPDATE_SPLITPOINT: Final = 1 << 1

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_u16_from = _U16.unpack_from
_u16_into = _U16.pack_into
_u32_from = _U32.unpack_from
_u32_into = _U32.pack_into

# IndexTupleData: t_tid (6 bytes), t_info; IndexTupleSize = t_info & INDEX_SIZE_MASK.
_T_INFO: Final = 6
INDEX_SIZE_MASK: Final = 0x1FFF


class HashMetaPage:
    """The fixed fields of HashMetaPageData, read from a metapage (for tests and tools)."""

    __slots__ = (
        "magic", "version", "ntuples", "ffactor", "bsize", "bmsize", "bmshift", "maxbucket",
        "highmask", "lowmask", "ovflpoint", "firstfree", "nmaps", "procid", "spares", "mapp",
    )

    def __init__(self, page: bytes | bytearray) -> None:
        (
            self.magic, self.version, self.ntuples, self.ffactor, self.bsize, self.bmsize,
            self.bmshift, self.maxbucket, self.highmask, self.lowmask, self.ovflpoint,
            self.firstfree, self.nmaps, self.procid,
        ) = _META_FIXED.unpack_from(page, _META)
        self.spares: tuple[int, ...] = struct.unpack_from(f"<{HASH_MAX_SPLITPOINTS}I", page, _M_SPARES)
        self.mapp: tuple[int, ...] = struct.unpack_from(f"<{HASH_MAX_BITMAPS}I", page, _M_MAPP)


def hash_read_meta(page: bytes | bytearray) -> HashMetaPage:
    """HashPageGetMeta, as a snapshot of its fields."""
    return HashMetaPage(page)


# --- pg_bitutils.h / hashutil.c ---------------------------------------------------


def _leftmost_one_pos32(word: int) -> int:
    """pg_leftmost_one_pos32: index of the highest set bit (word > 0)."""
    return word.bit_length() - 1


def _ceil_log2_32(num: int) -> int:
    """pg_ceil_log2_32."""
    return 0 if num < 2 else _leftmost_one_pos32(num - 1) + 1


def _nextpower2_32(num: int) -> int:
    """pg_nextpower2_32: the smallest power of 2 >= num (num > 0)."""
    return 1 << _ceil_log2_32(num)


def hash_spareindex(num_bucket: int) -> int:
    """_hash_spareindex (hashutil.c): the splitpoint phase holding bucket count `num_bucket`."""
    num_bucket &= 0xFFFFFFFF
    group = _ceil_log2_32(num_bucket)
    if group < HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE:
        return group
    phases = HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE
    phases += (group - HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE) << HASH_SPLITPOINT_PHASE_BITS
    phases += ((num_bucket - 1) >> (group - (HASH_SPLITPOINT_PHASE_BITS + 1))) & HASH_SPLITPOINT_PHASE_MASK
    return phases


def hash_get_totalbuckets(splitpoint_phase: int) -> int:
    """_hash_get_totalbuckets (hashutil.c): buckets allocated up to a splitpoint phase."""
    if splitpoint_phase < HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE:
        return 1 << splitpoint_phase
    group = HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE + (
        (splitpoint_phase - HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE) >> HASH_SPLITPOINT_PHASE_BITS
    )
    total = 1 << (group - 1)
    phases_within = ((splitpoint_phase - HASH_SPLITPOINT_GROUPS_WITH_ONE_PHASE) & HASH_SPLITPOINT_PHASE_MASK) + 1
    total += ((1 << (group - 1)) >> HASH_SPLITPOINT_PHASE_BITS) * phases_within
    return total


# --- page builders (hashpage.c, hashovfl.c) ------------------------------------------


def hash_pageinit(page: bytearray) -> None:
    """_hash_pageinit (hashpage.c): PageInit with room for HashPageOpaqueData."""
    page_init(page, SIZE_OF_HASH_PAGE_OPAQUE)


def _special(page: bytearray) -> int:
    special = int(_u16_from(page, 16)[0])
    if special < SIZE_OF_PAGE_HEADER_DATA or special + SIZE_OF_HASH_PAGE_OPAQUE > BLCKSZ:
        raise BadRecordError(f"page has no room for HashPageOpaqueData (pd_special {special})")
    return special


def hash_initbuf(page: bytearray, max_bucket: int, num_bucket: int, flag: int) -> None:
    """_hash_initbuf (hashpage.c) with initpage = true."""
    hash_pageinit(page)
    _OPAQUE.pack_into(page, BLCKSZ - SIZE_OF_HASH_PAGE_OPAQUE, max_bucket, INVALID_BLOCK_NUMBER,
                      num_bucket, flag, HASHO_PAGE_ID)


def hash_init_metabuffer(page: bytearray, num_tuples: float, procid: int, ffactor: int) -> None:
    """_hash_init_metabuffer (hashpage.c) with initpage = true."""
    if ffactor == 0:
        raise BadRecordError("metapage fill factor is 0")
    dnumbuckets = num_tuples / ffactor
    if dnumbuckets <= 2.0:
        num_buckets = 2
    elif dnumbuckets >= float(0x40000000):
        num_buckets = 0x40000000
    else:
        num_buckets = hash_get_totalbuckets(hash_spareindex(int(dnumbuckets)))
    spare_index = hash_spareindex(num_buckets)

    hash_pageinit(page)
    _OPAQUE.pack_into(page, BLCKSZ - SIZE_OF_HASH_PAGE_OPAQUE, INVALID_BLOCK_NUMBER, INVALID_BLOCK_NUMBER,
                      INVALID_BUCKET, LH_META_PAGE, HASHO_PAGE_ID)
    # HashGetMaxBitmapSize: the page minus header and special space, both MAXALIGNed.
    bsize = BLCKSZ - (maxalign(SIZE_OF_PAGE_HEADER_DATA) + maxalign(SIZE_OF_HASH_PAGE_OPAQUE))
    lshift = _leftmost_one_pos32(bsize)
    highmask = _nextpower2_32(num_buckets + 1) - 1
    _META_FIXED.pack_into(
        page, _META, HASH_MAGIC, HASH_VERSION, 0.0, ffactor, bsize, 1 << lshift, lshift + BYTE_TO_BIT,
        num_buckets - 1, highmask, highmask >> 1, spare_index, 0, 0, procid,
    )
    # spares[] and mapp[] are already zero (PageInit); one spare page after the
    # initial splitpoints.
    _u32_into(page, _M_SPARES + 4 * spare_index, 1)
    _u16_into(page, 12, _META + SIZE_OF_HASH_META_PAGE_DATA)  # pd_lower


def hash_initbitmapbuffer(page: bytearray, bmsize: int) -> None:
    """_hash_initbitmapbuffer (hashovfl.c) with initpage = true: every bit set."""
    hash_pageinit(page)
    _OPAQUE.pack_into(page, BLCKSZ - SIZE_OF_HASH_PAGE_OPAQUE, INVALID_BLOCK_NUMBER, INVALID_BLOCK_NUMBER,
                      INVALID_BUCKET, LH_BITMAP_PAGE, HASHO_PAGE_ID)
    if _BITMAP + bmsize > BLCKSZ - SIZE_OF_HASH_PAGE_OPAQUE:
        raise BadRecordError(f"bitmap size {bmsize} does not fit in a page")
    page[_BITMAP : _BITMAP + bmsize] = b"\xff" * bmsize
    _u16_into(page, 12, _BITMAP + bmsize)  # pd_lower


# --- small helpers -----------------------------------------------------------------------


def _set_flag(page: bytearray, flag: int) -> None:
    _u16_into(page, _special(page) + _OPQ_FLAG, flag)


def _clear_flag_bits(page: bytearray, bits: int) -> None:
    pos = _special(page) + _OPQ_FLAG
    _u16_into(page, pos, int(_u16_from(page, pos)[0]) & ~bits)


def _set_prevblkno(page: bytearray, blkno: int) -> None:
    _u32_into(page, _special(page) + _OPQ_PREV, blkno)


def _set_nextblkno(page: bytearray, blkno: int) -> None:
    _u32_into(page, _special(page) + _OPQ_NEXT, blkno)


def _u32_data(block: DecodedBlock, what: str) -> int:
    if len(block.data) < 4:
        raise BadRecordError(f"block {block.block_id} data too short for {what}")
    return int(_u32_from(block.data, 0)[0])


def _bitmap_bit_pos(bit: int) -> tuple[int, int]:
    """Byte offset and mask of bit `bit` of HashPageGetBitmap (uint32 words, little-endian)."""
    pos = _BITMAP + (bit >> 3)
    if pos >= BLCKSZ - SIZE_OF_HASH_PAGE_OPAQUE:
        raise BadRecordError(f"bitmap bit {bit} is outside the bitmap page")
    return pos, 1 << (bit & 7)


def _offsets(data: bytes | memoryview, start: int, n: int) -> tuple[int, ...]:
    if n < 0 or start + 2 * n > len(data):
        raise BadRecordError(f"record data too short for {n} offsets")
    return struct.unpack_from(f"<{n}H", data, start)


def _add_moved_tuples(page: bytearray, data: bytes, ntups: int) -> None:
    """The tuple-adding loop of hash_xlog_move_page_contents / hash_xlog_squeeze_page.

    Block data: ntups target offsets, then the tuples, each MAXALIGN(IndexTupleSize)
    bytes; each is added at its offset with PageAddItem (no overwrite).
    """
    if ntups == 0:
        return
    towrite = _offsets(data, 0, ntups)
    view = memoryview(data)
    pos = 2 * ntups
    end = len(data)
    ninserted = 0
    while pos < end:
        if pos + 8 > end:
            raise BadRecordError("truncated index tuple header in record data")
        itemsz = maxalign(int(_u16_from(view, pos + _T_INFO)[0]) & INDEX_SIZE_MASK)
        if itemsz < 8 or pos + itemsz > end:
            raise BadRecordError(f"index tuple of {itemsz} bytes at data offset {pos} does not fit")
        if ninserted >= ntups:
            raise BadRecordError(f"record carries more than the {ntups} tuples it announces")
        if page_add_item(page, view[pos : pos + itemsz], towrite[ninserted], False, False) == 0:
            raise BadRecordError(f"failed to add item to hash index page, size {itemsz} bytes")
        pos += itemsz
        ninserted += 1
    if ninserted != ntups:
        raise BadRecordError(f"record carries {ninserted} tuples, header says {ntups}")


def _multi_delete(page: bytearray, data: bytes) -> None:
    """PageIndexMultiDelete of the OffsetNumbers filling `data`."""
    n = len(data) // 2
    if n > 0:
        page_index_multi_delete(page, _offsets(data, 0, n))


# --- redo functions -----------------------------------------------------------------------
# Each returns False where Postgres leaves the page (and its LSN) alone.

_Handler = Callable[[DecodedRecord, DecodedBlock, bytearray], "bool | None"]


def _unexpected_block(block: DecodedBlock) -> BadRecordError:
    return BadRecordError(f"unexpected block reference {block.block_id}")


def hash_init_meta_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_init_meta_page: block 0 is the new metapage."""
    if block.block_id != 0:
        raise _unexpected_block(block)
    num_tuples, procid, ffactor = _XL_INIT_META_PAGE.unpack_from(rec.main_data, 0)
    hash_init_metabuffer(page, num_tuples, procid, ffactor)


def hash_init_bitmap_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_init_bitmap_page: block 0 the new bitmap page, block 1 the metapage."""
    if block.block_id == 0:
        (bmsize,) = _XL_INIT_BITMAP_PAGE.unpack_from(rec.main_data, 0)
        hash_initbitmapbuffer(page, bmsize)
    elif block.block_id == 1:
        maxbucket, _hi, _lo, _ovfl, _ff, nmaps = struct.unpack_from("<6I", page, _M_MAXBUCKET)
        if nmaps >= HASH_MAX_BITMAPS:
            raise BadRecordError(f"metapage already lists {nmaps} bitmap pages")
        _u32_into(page, _M_MAPP + 4 * nmaps, (maxbucket + 1 + 1) & 0xFFFFFFFF)
        _u32_into(page, _M_NMAPS, nmaps + 1)
    else:
        raise _unexpected_block(block)


def hash_insert_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_insert: block 0 gets the tuple at offnum, block 1 (metapage) counts it."""
    if block.block_id == 0:
        (offnum,) = _XL_INSERT.unpack_from(rec.main_data, 0)
        if page_add_item(page, block.data, offnum, False, False) == 0:
            raise BadRecordError("hash_xlog_insert: failed to add item")
    elif block.block_id == 1:
        _F64.pack_into(page, _M_NTUPLES, _F64.unpack_from(page, _M_NTUPLES)[0] + 1)
    else:
        raise _unexpected_block(block)


def hash_add_ovfl_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_add_ovfl_page.

    Block 0 the new overflow page (data: its bucket), block 1 the page it is
    chained after, block 2 (optional) the bitmap page whose bit is set (data:
    the bit), block 3 (optional) a new bitmap page, block 4 the metapage (data:
    hashm_firstfree).
    """
    bid = block.block_id
    if bid == 0:
        left = rec.block(1)
        if left is None:
            raise BadRecordError("no block reference 1 (the left page)")
        hash_initbuf(page, INVALID_BLOCK_NUMBER, _u32_data(block, "the bucket"), LH_OVERFLOW_PAGE)
        _set_prevblkno(page, left.blkno)
    elif bid == 1:
        right = rec.block(0)
        if right is None:
            raise BadRecordError("no block reference 0 (the overflow page)")
        _set_nextblkno(page, right.blkno)
    elif bid == 2:
        pos, bit = _bitmap_bit_pos(_u32_data(block, "the bitmap bit"))
        page[pos] |= bit
    elif bid == 3:
        bmsize, _found = _XL_ADD_OVFL_PAGE.unpack_from(rec.main_data, 0)
        hash_initbitmapbuffer(page, bmsize)
    elif bid == 4:
        _bmsize, bmpage_found = _XL_ADD_OVFL_PAGE.unpack_from(rec.main_data, 0)
        _u32_into(page, _M_FIRSTFREE, _u32_data(block, "hashm_firstfree"))
        if not bmpage_found:
            ovflpoint, _firstfree, nmaps = struct.unpack_from("<3I", page, _M_OVFLPOINT)
            if ovflpoint >= HASH_MAX_SPLITPOINTS:
                raise BadRecordError(f"metapage ovflpoint {ovflpoint} out of range")
            spare = _M_SPARES + 4 * ovflpoint
            spares = int(_u32_from(page, spare)[0]) + 1
            newmap = rec.block(3)
            if newmap is not None:
                if nmaps >= HASH_MAX_BITMAPS:
                    raise BadRecordError(f"metapage already lists {nmaps} bitmap pages")
                _u32_into(page, _M_MAPP + 4 * nmaps, newmap.blkno)
                _u32_into(page, _M_NMAPS, nmaps + 1)
                spares += 1
            _u32_into(page, spare, spares & 0xFFFFFFFF)
    else:
        raise _unexpected_block(block)


def hash_split_allocate_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_split_allocate_page: block 0 the old bucket, block 1 the new bucket
    (built from scratch), block 2 the metapage (data: masks and splitpoint, per flags)."""
    new_bucket, old_flag, new_flag, flags = _XL_SPLIT_ALLOCATE_PAGE.unpack_from(rec.main_data, 0)
    bid = block.block_id
    if bid == 0:
        _set_flag(page, old_flag)
        _set_prevblkno(page, new_bucket)
    elif bid == 1:
        hash_initbuf(page, new_bucket, new_bucket, new_flag)
    elif bid == 2:
        _u32_into(page, _M_MAXBUCKET, new_bucket)
        data = block.data
        pos = 0
        if flags & XLH_SPLIT_META_UPDATE_MASKS:
            if len(data) < pos + 8:
                raise BadRecordError("metapage data too short for the masks")
            lowmask, highmask = struct.unpack_from("<II", data, pos)
            _u32_into(page, _M_LOWMASK, lowmask)
            _u32_into(page, _M_HIGHMASK, highmask)
            pos += 8
        if flags & XLH_SPLIT_META_UPDATE_SPLITPOINT:
            if len(data) < pos + 8:
                raise BadRecordError("metapage data too short for the splitpoint")
            ovflpoint, ovflpages = struct.unpack_from("<II", data, pos)
            if ovflpoint >= HASH_MAX_SPLITPOINTS:
                raise BadRecordError(f"splitpoint {ovflpoint} out of range")
            _u32_into(page, _M_SPARES + 4 * ovflpoint, ovflpages)
            _u32_into(page, _M_OVFLPOINT, ovflpoint)
    else:
        raise _unexpected_block(block)


def hash_split_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_split_page: the page must come from its full-page image (restored by the engine)."""
    raise BadRecordError("Hash split record did not contain a full-page image")


def hash_split_complete_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_split_complete: new bucket flags on block 0 (old) and block 1 (new bucket)."""
    old_flag, new_flag = _XL_SPLIT_COMPLETE.unpack_from(rec.main_data, 0)
    if block.block_id == 0:
        _set_flag(page, old_flag)
    elif block.block_id == 1:
        _set_flag(page, new_flag)
    else:
        raise _unexpected_block(block)


def hash_move_page_contents_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool | None:
    """hash_xlog_move_page_contents: block 0 the primary bucket page (lock only),
    block 1 receives tuples, block 2 loses them."""
    ntups, _prim_same = _XL_MOVE_PAGE_CONTENTS.unpack_from(rec.main_data, 0)
    bid = block.block_id
    if bid == 0:
        return False
    if bid == 1:
        _add_moved_tuples(page, block.data, ntups)
    elif bid == 2:
        _multi_delete(page, block.data)
    else:
        raise _unexpected_block(block)
    return None


def hash_squeeze_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool | None:
    """hash_xlog_squeeze_page.

    Block 0 the primary bucket page (lock only), block 1 receives the tuples
    (and becomes the freed page's predecessor if is_prev_bucket_same_wrt),
    block 2 the freed overflow page (reset to LH_UNUSED_PAGE), block 3 its
    predecessor, block 4 its successor, block 5 the bitmap page (bit cleared),
    block 6 the metapage (hashm_firstfree).
    """
    prevblkno, nextblkno, ntups, _prim_same, prev_same = _XL_SQUEEZE_PAGE.unpack_from(rec.main_data, 0)
    bid = block.block_id
    if bid == 0:
        return False
    if bid == 1:
        _add_moved_tuples(page, block.data, ntups)
        if prev_same:
            _set_nextblkno(page, nextblkno)
    elif bid == 2:
        hash_pageinit(page)
        _OPAQUE.pack_into(page, BLCKSZ - SIZE_OF_HASH_PAGE_OPAQUE, INVALID_BLOCK_NUMBER,
                          INVALID_BLOCK_NUMBER, INVALID_BUCKET, LH_UNUSED_PAGE, HASHO_PAGE_ID)
    elif bid == 3:
        if prev_same:
            return False  # never registered in this case; Postgres would not read it
        _set_nextblkno(page, nextblkno)
    elif bid == 4:
        _set_prevblkno(page, prevblkno)
    elif bid == 5:
        pos, bit = _bitmap_bit_pos(_u32_data(block, "the bitmap bit"))
        page[pos] &= ~bit & 0xFF
    elif bid == 6:
        _u32_into(page, _M_FIRSTFREE, _u32_data(block, "hashm_firstfree"))
    else:
        raise _unexpected_block(block)
    return None


def hash_delete_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool | None:
    """hash_xlog_delete: block 0 the primary bucket page (lock only), block 1 loses tuples."""
    clear_dead_marking, _is_primary = _XL_DELETE.unpack_from(rec.main_data, 0)
    if block.block_id == 0:
        return False
    if block.block_id != 1:
        raise _unexpected_block(block)
    _multi_delete(page, block.data)
    if clear_dead_marking:
        _clear_flag_bits(page, LH_PAGE_HAS_DEAD_TUPLES)
    return None


def hash_split_cleanup_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_split_cleanup: clear LH_BUCKET_NEEDS_SPLIT_CLEANUP on the bucket page."""
    if block.block_id != 0:
        raise _unexpected_block(block)
    _clear_flag_bits(page, LH_BUCKET_NEEDS_SPLIT_CLEANUP)


def hash_update_meta_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_update_meta_page: hashm_ntuples after vacuum."""
    if block.block_id != 0:
        raise _unexpected_block(block)
    (ntuples,) = _XL_UPDATE_META_PAGE.unpack_from(rec.main_data, 0)
    _F64.pack_into(page, _M_NTUPLES, ntuples)


def hash_vacuum_one_page_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """hash_xlog_vacuum_one_page: block 0 loses its LP_DEAD tuples, block 1 (metapage)
    its count of them."""
    _xid, ntuples = _XL_VACUUM_ONE_PAGE.unpack_from(rec.main_data, 0)
    if block.block_id == 0:
        if len(rec.main_data) > _XL_VACUUM_ONE_PAGE.size:
            page_index_multi_delete(page, _offsets(rec.main_data, _XL_VACUUM_ONE_PAGE.size, ntuples))
        _clear_flag_bits(page, LH_PAGE_HAS_DEAD_TUPLES)
    elif block.block_id == 1:
        _F64.pack_into(page, _M_NTUPLES, _F64.unpack_from(page, _M_NTUPLES)[0] - ntuples)
    else:
        raise _unexpected_block(block)


_HANDLERS: dict[int, _Handler] = {
    XLOG_HASH_INIT_META_PAGE: hash_init_meta_page_redo,
    XLOG_HASH_INIT_BITMAP_PAGE: hash_init_bitmap_page_redo,
    XLOG_HASH_INSERT: hash_insert_redo,
    XLOG_HASH_ADD_OVFL_PAGE: hash_add_ovfl_page_redo,
    XLOG_HASH_SPLIT_ALLOCATE_PAGE: hash_split_allocate_page_redo,
    XLOG_HASH_SPLIT_PAGE: hash_split_page_redo,
    XLOG_HASH_SPLIT_COMPLETE: hash_split_complete_redo,
    XLOG_HASH_MOVE_PAGE_CONTENTS: hash_move_page_contents_redo,
    XLOG_HASH_SQUEEZE_PAGE: hash_squeeze_page_redo,
    XLOG_HASH_DELETE: hash_delete_redo,
    XLOG_HASH_SPLIT_CLEANUP: hash_split_cleanup_redo,
    XLOG_HASH_UPDATE_META_PAGE: hash_update_meta_page_redo,
    XLOG_HASH_VACUUM_ONE_PAGE: hash_vacuum_one_page_redo,
}


def hash_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool | None:
    """hash_redo (hash_xlog.c) for one block reference of `rec`."""
    handler = _HANDLERS.get(rec.info & XLR_RMGR_INFO_MASK)
    if handler is None:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    return handler(rec, block, page)


def hash_restored_image_fixup(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool:
    """What hash redo does to a page restored from a BKPIMAGE_APPLY image.

    Block 0 of SPLIT_ALLOCATE_PAGE gets the old bucket's flag and
    hasho_prevblkno, blocks 0 and 1 of SPLIT_COMPLETE their bucket flags, from
    the record (hash_xlog_split_allocate_page / hash_xlog_split_complete act
    on BLK_RESTORED too). Returns True when it changed the page; any other
    block is left alone (False).
    """
    if rec.rmid != RM_HASH_ID:
        return False
    info = rec.info & XLR_RMGR_INFO_MASK
    if not (
        (info == XLOG_HASH_SPLIT_ALLOCATE_PAGE and block.block_id == 0)
        or (info == XLOG_HASH_SPLIT_COMPLETE and block.block_id in (0, 1))
    ):
        return False
    _HANDLERS[info](rec, block, page)
    return True


register_block_redo(RM_HASH_ID, hash_redo)
register_image_fixup(RM_HASH_ID, hash_restored_image_fixup)
