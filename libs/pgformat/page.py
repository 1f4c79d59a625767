"""The 8 KB page: layout and the bufpage.c operations redo needs (PostgreSQL 15).

Layout follows src/include/storage/bufpage.h (PageHeaderData) and
src/include/storage/itemid.h (ItemIdData); the operations follow
src/backend/storage/page/bufpage.c line by line, because redo must leave every
byte -- including the stale bytes Postgres leaves behind in free space -- where
Postgres leaves them.

A page is a ``bytearray`` of exactly BLCKSZ bytes, changed in place. Offsets
into the line pointer array are 1-based ``OffsetNumber``s, as in Postgres.

Where Postgres would ``elog(ERROR)`` or ``PANIC`` on a corrupt page, these
functions raise :class:`PageError` and leave the page unchanged. Where Postgres
returns ``InvalidOffsetNumber`` / ``false`` after a WARNING (PageAddItemExtended,
PageIndexTupleOverwrite), so do these functions; the caller decides.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final, NamedTuple, Sequence

from pgformat import native
from pgformat.constants import BLCKSZ, maxalign
from pgformat.errors import FormatError

__all__ = [
    "PageError",
    "PageHeaderData",
    "ItemIdData",
    "SIZE_OF_PAGE_HEADER_DATA",
    "ITEM_ID_SIZE",
    "PG_PAGE_LAYOUT_VERSION",
    "PD_HAS_FREE_LINES",
    "PD_PAGE_FULL",
    "PD_ALL_VISIBLE",
    "PD_VALID_FLAG_BITS",
    "LP_UNUSED",
    "LP_NORMAL",
    "LP_REDIRECT",
    "LP_DEAD",
    "PAI_OVERWRITE",
    "PAI_IS_HEAP",
    "INVALID_OFFSET_NUMBER",
    "FIRST_OFFSET_NUMBER",
    "MAX_OFFSET_NUMBER",
    "MAX_HEAP_TUPLES_PER_PAGE",
    "MAX_HEAP_TUPLE_SIZE",
    "MAX_INDEX_TUPLES_PER_PAGE",
    "new_page",
    "page_get_header",
    "page_set_header",
    "page_get_lsn",
    "page_set_lsn",
    "page_get_checksum",
    "page_set_checksum",
    "page_get_flags",
    "page_set_flags",
    "page_get_lower",
    "page_set_lower",
    "page_get_upper",
    "page_set_upper",
    "page_get_special",
    "page_set_special",
    "page_get_page_size",
    "page_get_page_layout_version",
    "page_get_special_size",
    "page_get_special_pointer",
    "page_get_prune_xid",
    "page_set_prune_xid",
    "page_set_prunable",
    "page_clear_prunable",
    "page_has_free_line_pointers",
    "page_set_has_free_line_pointers",
    "page_clear_has_free_line_pointers",
    "page_is_full",
    "page_set_full",
    "page_clear_full",
    "page_is_all_visible",
    "page_set_all_visible",
    "page_clear_all_visible",
    "page_is_new",
    "page_is_empty",
    "page_get_max_offset_number",
    "pack_item_id",
    "unpack_item_id",
    "page_get_item_id",
    "page_set_item_id",
    "item_id_set_unused",
    "item_id_set_normal",
    "item_id_set_redirect",
    "item_id_set_dead",
    "item_id_mark_dead",
    "page_get_item",
    "page_init",
    "page_add_item_extended",
    "page_add_item",
    "page_repair_fragmentation",
    "page_truncate_line_pointer_array",
    "page_get_free_space",
    "page_get_free_space_for_multiple_tuples",
    "page_get_exact_free_space",
    "page_get_heap_free_space",
    "page_index_tuple_delete",
    "page_index_multi_delete",
    "page_index_tuple_delete_no_compact",
    "page_index_tuple_overwrite",
]


class PageError(FormatError):
    """A page Postgres would reject as corrupt (its elog(ERROR) / PANIC cases).

    A ValueError, through FormatError.
    """


# --- bufpage.h ---------------------------------------------------------------

#: offsetof(PageHeaderData, pd_linp)
SIZE_OF_PAGE_HEADER_DATA: Final = 24
#: sizeof(ItemIdData)
ITEM_ID_SIZE: Final = 4
PG_PAGE_LAYOUT_VERSION: Final = 4

PD_HAS_FREE_LINES: Final = 0x0001
PD_PAGE_FULL: Final = 0x0002
PD_ALL_VISIBLE: Final = 0x0004
PD_VALID_FLAG_BITS: Final = 0x0007

PAI_OVERWRITE: Final = 1 << 0
PAI_IS_HEAP: Final = 1 << 1

# --- itemid.h ------------------------------------------------------------------

LP_UNUSED: Final = 0
LP_NORMAL: Final = 1
LP_REDIRECT: Final = 2
LP_DEAD: Final = 3

# --- off.h ---------------------------------------------------------------------

INVALID_OFFSET_NUMBER: Final = 0
FIRST_OFFSET_NUMBER: Final = 1
MAX_OFFSET_NUMBER: Final = BLCKSZ // ITEM_ID_SIZE

# --- htup_details.h / itup.h -------------------------------------------------
# MaxHeapTuplesPerPage = (BLCKSZ - SizeOfPageHeaderData)
#                        / (MAXALIGN(SizeofHeapTupleHeader) + sizeof(ItemIdData))
MAX_HEAP_TUPLES_PER_PAGE: Final = (BLCKSZ - SIZE_OF_PAGE_HEADER_DATA) // (
    maxalign(23) + ITEM_ID_SIZE
)
MAX_HEAP_TUPLE_SIZE: Final = BLCKSZ - maxalign(SIZE_OF_PAGE_HEADER_DATA + ITEM_ID_SIZE)
# MaxIndexTuplesPerPage = (BLCKSZ - SizeOfPageHeaderData)
#                         / (MAXALIGN(sizeof(IndexTupleData) + 1) + sizeof(ItemIdData))
MAX_INDEX_TUPLES_PER_PAGE: Final = (BLCKSZ - SIZE_OF_PAGE_HEADER_DATA) // (
    maxalign(8 + 1) + ITEM_ID_SIZE
)

# Header field offsets (PageHeaderData, no padding: 8 + 2*6 + 4 = 24 bytes).
_OFF_LSN: Final = 0
_OFF_CHECKSUM: Final = 8
_OFF_FLAGS: Final = 10
_OFF_LOWER: Final = 12
_OFF_UPPER: Final = 14
_OFF_SPECIAL: Final = 16
_OFF_PAGESIZE_VERSION: Final = 18
_OFF_PRUNE_XID: Final = 20

# pd_lsn is PageXLogRecPtr {uint32 xlogid (high); uint32 xrecoff (low)}.
_HEADER = struct.Struct("<IIHHHHHHI")
_LSN = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_BOUNDS = struct.Struct("<HHH")  # pd_lower, pd_upper, pd_special

_u16_from = _U16.unpack_from
_u16_into = _U16.pack_into
_u32_from = _U32.unpack_from
_u32_into = _U32.pack_into
_bounds_from = _BOUNDS.unpack_from

# ItemIdData is {unsigned lp_off:15, lp_flags:2, lp_len:15}; GCC on a
# little-endian machine allocates bit-fields from the least significant bit.
_LP_OFF_MASK: Final = 0x7FFF
_LP_FLAGS_SHIFT: Final = 15
_LP_LEN_SHIFT: Final = 17

# The highest OffsetNumber whose line pointer still lies inside the page.
_MAX_LINP: Final = (BLCKSZ - SIZE_OF_PAGE_HEADER_DATA) // ITEM_ID_SIZE


class PageHeaderData(NamedTuple):
    """PageHeaderData (bufpage.h), with pd_lsn as one 64-bit int."""

    pd_lsn: int
    pd_checksum: int
    pd_flags: int
    pd_lower: int
    pd_upper: int
    pd_special: int
    pd_pagesize_version: int
    pd_prune_xid: int


class ItemIdData(NamedTuple):
    """One line pointer (itemid.h)."""

    lp_off: int
    lp_flags: int
    lp_len: int

    @property
    def is_used(self) -> bool:
        """ItemIdIsUsed."""
        return self.lp_flags != LP_UNUSED

    @property
    def is_normal(self) -> bool:
        """ItemIdIsNormal."""
        return self.lp_flags == LP_NORMAL

    @property
    def is_redirected(self) -> bool:
        """ItemIdIsRedirected."""
        return self.lp_flags == LP_REDIRECT

    @property
    def is_dead(self) -> bool:
        """ItemIdIsDead."""
        return self.lp_flags == LP_DEAD

    @property
    def has_storage(self) -> bool:
        """ItemIdHasStorage."""
        return self.lp_len != 0


# --- small helpers ---------------------------------------------------------


def _check_page(page: bytearray) -> None:
    if len(page) != BLCKSZ:
        raise PageError(f"page is {len(page)} bytes, expected {BLCKSZ}")


def _linp_pos(offnum: int) -> int:
    if not FIRST_OFFSET_NUMBER <= offnum <= _MAX_LINP:
        raise PageError(f"offset number {offnum} is outside the page")
    return SIZE_OF_PAGE_HEADER_DATA + (offnum - 1) * ITEM_ID_SIZE


def _max_offset(lower: int) -> int:
    # PageGetMaxOffsetNumber: 0 for pd_lower <= SizeOfPageHeaderData.
    if lower <= SIZE_OF_PAGE_HEADER_DATA:
        return 0
    return (lower - SIZE_OF_PAGE_HEADER_DATA) // ITEM_ID_SIZE


def _read_linps(page: bytearray, nline: int) -> tuple[int, ...]:
    if nline > _MAX_LINP:
        raise PageError(f"{nline} line pointers do not fit in a page")
    return struct.unpack_from(f"<{nline}I", page, SIZE_OF_PAGE_HEADER_DATA)


def _set_lp_off(page: bytearray, pos: int, lp_off: int) -> None:
    raw = _u32_from(page, pos)[0]
    _u32_into(page, pos, (raw & ~_LP_OFF_MASK) | (lp_off & _LP_OFF_MASK))


def _corrupt_pointers(lower: int, upper: int, special: int) -> PageError:
    return PageError(
        f"corrupted page pointers: lower = {lower}, upper = {upper}, special = {special}"
    )


def _check_bounds_strict(page: bytearray) -> tuple[int, int, int]:
    """The 'paranoid' pointer check shared by the compacting functions."""
    _check_page(page)
    lower, upper, special = _bounds_from(page, _OFF_LOWER)
    if (
        lower < SIZE_OF_PAGE_HEADER_DATA
        or lower > upper
        or upper > special
        or special > BLCKSZ
        or special != maxalign(special)
    ):
        raise _corrupt_pointers(lower, upper, special)
    return lower, upper, special


def new_page(special_size: int = 0) -> bytearray:
    """A fresh BLCKSZ page, initialized by :func:`page_init`."""
    page = bytearray(BLCKSZ)
    page_init(page, special_size)
    return page


# --- header accessors (bufpage.h macros) --------------------------------------


def page_get_header(page: bytearray) -> PageHeaderData:
    """The whole PageHeaderData."""
    _check_page(page)
    hi, lo, *rest = _HEADER.unpack_from(page, 0)
    return PageHeaderData((hi << 32) | lo, *rest)


def page_set_header(page: bytearray, hdr: PageHeaderData) -> None:
    """Write all PageHeaderData fields."""
    _check_page(page)
    _HEADER.pack_into(
        page,
        0,
        hdr.pd_lsn >> 32,
        hdr.pd_lsn & 0xFFFFFFFF,
        hdr.pd_checksum,
        hdr.pd_flags,
        hdr.pd_lower,
        hdr.pd_upper,
        hdr.pd_special,
        hdr.pd_pagesize_version,
        hdr.pd_prune_xid,
    )


def page_get_lsn(page: bytearray) -> int:
    """PageGetLSN: pd_lsn.xlogid (high half) then pd_lsn.xrecoff (low half)."""
    hi, lo = _LSN.unpack_from(page, _OFF_LSN)
    return (hi << 32) | lo


def page_set_lsn(page: bytearray, lsn: int) -> None:
    """PageSetLSN."""
    _LSN.pack_into(page, _OFF_LSN, (lsn >> 32) & 0xFFFFFFFF, lsn & 0xFFFFFFFF)


# The plain integer fields, one (struct, offset) each; every field gets a getter
# page_get_<field> and a setter page_set_<field> made here rather than written out.


def _header_field(fmt: struct.Struct, offset: int, field: str, doc: str) -> tuple[
    Callable[[bytearray], int], Callable[[bytearray, int], None]
]:
    unpack_from, pack_into = fmt.unpack_from, fmt.pack_into

    def get(page: bytearray) -> int:
        return int(unpack_from(page, offset)[0])

    def put(page: bytearray, value: int) -> None:
        pack_into(page, offset, value)

    _name(get, f"page_get_{field}", f"{doc}.")
    _name(put, f"page_set_{field}", f"Store {doc}.")
    return get, put


def _name(fn: Callable[..., object], name: str, doc: str) -> None:
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc


page_get_checksum, page_set_checksum = _header_field(_U16, _OFF_CHECKSUM, "checksum", "pd_checksum")
page_get_flags, page_set_flags = _header_field(_U16, _OFF_FLAGS, "flags", "pd_flags")
page_get_lower, page_set_lower = _header_field(_U16, _OFF_LOWER, "lower", "pd_lower")
page_get_upper, page_set_upper = _header_field(_U16, _OFF_UPPER, "upper", "pd_upper")
# pd_special is an offset; see page_get_special_pointer for the bytes.
page_get_special, page_set_special = _header_field(_U16, _OFF_SPECIAL, "special", "pd_special")
page_get_prune_xid, page_set_prune_xid = _header_field(_U32, _OFF_PRUNE_XID, "prune_xid", "pd_prune_xid")


def page_get_page_size(page: bytearray) -> int:
    """PageGetPageSize: pd_pagesize_version & 0xFF00."""
    return int(_u16_from(page, _OFF_PAGESIZE_VERSION)[0]) & 0xFF00


def page_get_page_layout_version(page: bytearray) -> int:
    """PageGetPageLayoutVersion: pd_pagesize_version & 0x00FF."""
    return int(_u16_from(page, _OFF_PAGESIZE_VERSION)[0]) & 0x00FF


def page_get_special_size(page: bytearray) -> int:
    """PageGetSpecialSize: page size minus pd_special (as uint16)."""
    return (page_get_page_size(page) - page_get_special(page)) & 0xFFFF


def page_get_special_pointer(page: bytearray) -> memoryview:
    """PageGetSpecialPointer: a writable view of [pd_special, BLCKSZ)."""
    _check_page(page)
    special = page_get_special(page)
    if not SIZE_OF_PAGE_HEADER_DATA <= special <= BLCKSZ:
        raise PageError(f"invalid pd_special {special}")
    return memoryview(page)[special:]


def _transaction_id_precedes(id1: int, id2: int) -> bool:
    # transam.c TransactionIdPrecedes: modulo-2^32 unless either is special.
    if id1 < 3 or id2 < 3:
        return id1 < id2
    diff = (id1 - id2) & 0xFFFFFFFF
    return diff >= 0x80000000


def page_set_prunable(page: bytearray, xid: int) -> None:
    """PageSetPrunable: lower pd_prune_xid to xid if unset or later."""
    cur = page_get_prune_xid(page)
    if cur == 0 or _transaction_id_precedes(xid, cur):
        page_set_prune_xid(page, xid)


def page_clear_prunable(page: bytearray) -> None:
    """PageClearPrunable."""
    page_set_prune_xid(page, 0)


# The pd_flags bits: a test, a set and a clear each, named after the bufpage.h macros
# (PageIsFull, PageSetFull, PageClearFull; PageHasFreeLinePointers, ...).


def _flag_bit(bit: int, field: str, macro: str, is_prefix: bool = True) -> tuple[
    Callable[[bytearray], bool], Callable[[bytearray], None], Callable[[bytearray], None]
]:
    def is_set(page: bytearray) -> bool:
        return bool(_u16_from(page, _OFF_FLAGS)[0] & bit)

    def set_bit(page: bytearray) -> None:
        _u16_into(page, _OFF_FLAGS, _u16_from(page, _OFF_FLAGS)[0] | bit)

    def clear_bit(page: bytearray) -> None:
        _u16_into(page, _OFF_FLAGS, _u16_from(page, _OFF_FLAGS)[0] & ~bit)

    is_ = ("is_", "Is") if is_prefix else ("", "")  # page_is_full but page_has_free_line_pointers
    _name(is_set, f"page_{is_[0]}{field}", f"Page{is_[1]}{macro}.")
    _name(set_bit, f"page_set_{field}", f"PageSet{macro}.")
    _name(clear_bit, f"page_clear_{field}", f"PageClear{macro}.")
    return is_set, set_bit, clear_bit


page_has_free_line_pointers, page_set_has_free_line_pointers, page_clear_has_free_line_pointers = _flag_bit(
    PD_HAS_FREE_LINES, "has_free_line_pointers", "HasFreeLinePointers", is_prefix=False)
page_is_full, page_set_full, page_clear_full = _flag_bit(PD_PAGE_FULL, "full", "Full")
page_is_all_visible, page_set_all_visible, page_clear_all_visible = _flag_bit(PD_ALL_VISIBLE, "all_visible", "AllVisible")


def page_is_new(page: bytearray) -> bool:
    """PageIsNew: pd_upper == 0 (never initialized)."""
    return page_get_upper(page) == 0


def page_is_empty(page: bytearray) -> bool:
    """PageIsEmpty: no line pointer allocated."""
    return page_get_lower(page) <= SIZE_OF_PAGE_HEADER_DATA


def page_get_max_offset_number(page: bytearray) -> int:
    """PageGetMaxOffsetNumber: number of line pointers (0 on a new page)."""
    return _max_offset(page_get_lower(page))


# --- line pointers (itemid.h) ---------------------------------------------------


def pack_item_id(lp_off: int, lp_flags: int, lp_len: int) -> int:
    """ItemIdData as the little-endian uint32 it is stored as."""
    return (
        (lp_off & _LP_OFF_MASK)
        | ((lp_flags & 3) << _LP_FLAGS_SHIFT)
        | ((lp_len & _LP_OFF_MASK) << _LP_LEN_SHIFT)
    )


def unpack_item_id(raw: int) -> ItemIdData:
    """Split a stored uint32 into lp_off, lp_flags, lp_len."""
    return ItemIdData(raw & _LP_OFF_MASK, (raw >> _LP_FLAGS_SHIFT) & 3, raw >> _LP_LEN_SHIFT)


def page_get_item_id(page: bytearray, offnum: int) -> ItemIdData:
    """PageGetItemId (by value). Like Postgres, does not check against pd_lower."""
    return unpack_item_id(_u32_from(page, _linp_pos(offnum))[0])


def page_set_item_id(
    page: bytearray, offnum: int, lp_off: int, lp_flags: int, lp_len: int
) -> None:
    """Store a line pointer (values are truncated to their bit widths as in C)."""
    _u32_into(page, _linp_pos(offnum), pack_item_id(lp_off, lp_flags, lp_len))


def item_id_set_unused(page: bytearray, offnum: int) -> None:
    """ItemIdSetUnused: flags, offset and length all zero."""
    _u32_into(page, _linp_pos(offnum), 0)


def item_id_set_normal(page: bytearray, offnum: int, off: int, length: int) -> None:
    """ItemIdSetNormal."""
    page_set_item_id(page, offnum, off, LP_NORMAL, length)


def item_id_set_redirect(page: bytearray, offnum: int, link: int) -> None:
    """ItemIdSetRedirect: lp_off holds the target offset number, lp_len 0."""
    page_set_item_id(page, offnum, link, LP_REDIRECT, 0)


def item_id_set_dead(page: bytearray, offnum: int) -> None:
    """ItemIdSetDead: LP_DEAD without storage."""
    page_set_item_id(page, offnum, 0, LP_DEAD, 0)


def item_id_mark_dead(page: bytearray, offnum: int) -> None:
    """ItemIdMarkDead: LP_DEAD, keeping offset and length (storage)."""
    pos = _linp_pos(offnum)
    raw = _u32_from(page, pos)[0]
    _u32_into(page, pos, raw | (LP_DEAD << _LP_FLAGS_SHIFT))


def page_get_item(page: bytearray, offnum: int) -> memoryview:
    """PageGetItem: a writable view of the item's lp_len bytes."""
    _check_page(page)
    lp = page_get_item_id(page, offnum)
    if lp.lp_off + lp.lp_len > BLCKSZ:
        raise PageError(
            f"item {offnum} (offset {lp.lp_off}, length {lp.lp_len}) extends past the page"
        )
    return memoryview(page)[lp.lp_off : lp.lp_off + lp.lp_len]


# --- bufpage.c ------------------------------------------------------------------


_ZERO_PAGE: Final = bytes(BLCKSZ)


def page_init(page: bytearray, special_size: int = 0) -> None:
    """PageInit (bufpage.c): zero the page and set up an empty header.

    special_size is MAXALIGNed; pd_upper = pd_special = BLCKSZ - special_size.
    """
    _check_page(page)
    special_size = maxalign(special_size)
    if special_size < 0 or BLCKSZ <= special_size + SIZE_OF_PAGE_HEADER_DATA:
        raise PageError(f"special size {special_size} does not fit in a page")
    page[:] = _ZERO_PAGE
    _HEADER.pack_into(
        page,
        0,
        0,
        0,
        0,
        0,
        SIZE_OF_PAGE_HEADER_DATA,
        BLCKSZ - special_size,
        BLCKSZ - special_size,
        BLCKSZ | PG_PAGE_LAYOUT_VERSION,
        0,
    )


def page_add_item_extended(
    page: bytearray, item: bytes | bytearray | memoryview, offset_number: int, flags: int
) -> int:
    """PageAddItemExtended (bufpage.c): add an item; return its offset number.

    Runs the compiled twin (pgformat._native) when it is built, else
    :func:`page_add_item_extended_py`, the reference it is tested against;
    both behave as documented there.
    """
    compiled = native.compiled
    if compiled is not None:
        return int(compiled.page_add_item_extended(page, item, offset_number, flags))
    return page_add_item_extended_py(page, item, offset_number, flags)


def page_add_item_extended_py(
    page: bytearray, item: bytes | bytearray | memoryview, offset_number: int, flags: int
) -> int:
    """PageAddItemExtended (bufpage.c), pure Python: add an item; return its offset number.

    offset_number is INVALID_OFFSET_NUMBER (0) to take the first free line
    pointer (guided by PD_HAS_FREE_LINES), or 1 .. maxoff+1. With PAI_OVERWRITE
    the item goes into that (unused) slot; without it, later line pointers
    shift up. PAI_IS_HEAP enforces MaxHeapTuplesPerPage.

    Returns INVALID_OFFSET_NUMBER where Postgres warns and refuses (used slot,
    offset too large, too many heap tuples, no room). Only ``len(item)`` bytes
    are written: MAXALIGN padding keeps whatever bytes were there, as in C.
    Raises PageError for corrupted page pointers (Postgres PANICs).
    """
    _check_page(page)
    if not 0 <= offset_number <= 0xFFFF:
        raise PageError(f"offset number {offset_number} is not an OffsetNumber")
    lower0, upper0, special = _bounds_from(page, _OFF_LOWER)
    if (
        lower0 < SIZE_OF_PAGE_HEADER_DATA
        or lower0 > upper0
        or upper0 > special
        or special > BLCKSZ
    ):
        raise _corrupt_pointers(lower0, upper0, special)

    limit = _max_offset(lower0) + 1
    needshuffle = False
    offnum = offset_number

    if offnum != INVALID_OFFSET_NUMBER and offnum <= MAX_OFFSET_NUMBER:
        if flags & PAI_OVERWRITE:
            if offnum < limit:
                lp = _u32_from(page, _linp_pos(offnum))[0]
                # ItemIdIsUsed || ItemIdHasStorage
                if (lp >> _LP_FLAGS_SHIFT) & 3 or lp >> _LP_LEN_SHIFT:
                    return INVALID_OFFSET_NUMBER  # "will not overwrite a used ItemId"
        elif offnum < limit:
            needshuffle = True
    else:
        # Not passed in (OffsetNumberIsValid false): find a free slot.
        if _u16_from(page, _OFF_FLAGS)[0] & PD_HAS_FREE_LINES:
            linps = _read_linps(page, limit - 1)
            offnum = limit
            for idx, raw in enumerate(linps):
                # unused and no storage: lp_flags == 0 and lp_len == 0
                if raw & 0xFFFF8000 == 0:
                    offnum = idx + 1
                    break
            if offnum >= limit:
                # the hint is wrong, so reset it
                page_clear_has_free_line_pointers(page)
        else:
            offnum = limit

    if offnum > limit:
        return INVALID_OFFSET_NUMBER  # "specified item offset is too large"
    if flags & PAI_IS_HEAP and offnum > MAX_HEAP_TUPLES_PER_PAGE:
        return INVALID_OFFSET_NUMBER  # "can't put more than MaxHeapTuplesPerPage ..."

    if offnum == limit or needshuffle:
        lower = lower0 + ITEM_ID_SIZE
    else:
        lower = lower0
    size = len(item)
    upper = upper0 - maxalign(size)
    if lower > upper:
        return INVALID_OFFSET_NUMBER

    pos = _linp_pos(offnum)
    if needshuffle:
        nbytes = (limit - offnum) * ITEM_ID_SIZE
        page[pos + ITEM_ID_SIZE : pos + ITEM_ID_SIZE + nbytes] = page[pos : pos + nbytes]
    _u32_into(page, pos, pack_item_id(upper, LP_NORMAL, size))
    page[upper : upper + size] = item
    _u16_into(page, _OFF_LOWER, lower)
    _u16_into(page, _OFF_UPPER, upper)
    return offnum


def page_add_item(
    page: bytearray,
    item: bytes | bytearray | memoryview,
    offset_number: int,
    overwrite: bool,
    is_heap: bool,
) -> int:
    """PageAddItem macro (bufpage.h) over :func:`page_add_item_extended`."""
    flags = (PAI_OVERWRITE if overwrite else 0) | (PAI_IS_HEAP if is_heap else 0)
    return page_add_item_extended(page, item, offset_number, flags)


# itemIdCompactData: (offsetindex, itemoff, alignedlen)
_Compact = tuple[int, int, int]


def _move(page: bytearray, dst: int, src: bytes | bytearray, head: int, tail: int) -> None:
    """page[dst:dst + n] = src[head:tail], refusing a move that would leave the page
    (overlapping line pointers can ask for one; the slice assignment would resize the page)."""
    n = tail - head
    if n <= 0:
        return
    if dst < 0 or dst + n > BLCKSZ or head < 0 or tail > BLCKSZ:
        raise PageError("corrupted line pointers: overlapping items")
    page[dst : dst + n] = src[head:tail]


def _compactify_tuples(page: bytearray, items: list[_Compact], presorted: bool) -> None:
    """compactify_tuples (bufpage.c, PG14+): move tuples to the end of the page.

    Follows the C memmove/memcpy sequence exactly, so bytes left in what becomes
    free space are the same as Postgres leaves. In the unsorted case, the C
    code copies tuples into an uninitialized scratch block and reads back only
    the parts it copied; a snapshot of the page gives the same bytes for every
    page whose items do not overlap.
    """
    special = page_get_special(page)
    nitems = len(items)
    linp0 = SIZE_OF_PAGE_HEADER_DATA
    upper = special

    if presorted:
        # Skip tuples already in place at the end of the page.
        i = 0
        while i < nitems:
            _, itemoff, alignedlen = items[i]
            if upper != itemoff + alignedlen:
                break
            upper -= alignedlen
            i += 1
        _, itemoff, alignedlen = items[min(i, nitems - 1)]
        copy_tail = copy_head = itemoff + alignedlen
        while i < nitems:
            offsetindex, itemoff, alignedlen = items[i]
            if copy_head != itemoff + alignedlen:
                _move(page, upper, page, copy_head, copy_tail)  # memmove
                copy_tail = itemoff + alignedlen
            upper -= alignedlen
            copy_head = itemoff
            _set_lp_off(page, linp0 + offsetindex * ITEM_ID_SIZE, upper)
            i += 1
        _move(page, upper, page, copy_head, copy_tail)
    else:
        scratch = bytes(page)
        if nitems < _max_offset(page_get_lower(page)) // 4:
            # Many tuples removed: C copies each tuple to scratch.
            i = 0
        else:
            # Skip tuples already in place; C copies [pd_upper, upper) to scratch.
            i = 0
            while i < nitems:
                _, itemoff, alignedlen = items[i]
                if upper != itemoff + alignedlen:
                    break
                upper -= alignedlen
                i += 1
        _, itemoff, alignedlen = items[min(i, nitems - 1)]
        copy_tail = copy_head = itemoff + alignedlen
        while i < nitems:
            offsetindex, itemoff, alignedlen = items[i]
            if copy_head != itemoff + alignedlen:
                _move(page, upper, scratch, copy_head, copy_tail)  # memcpy
                copy_tail = itemoff + alignedlen
            upper -= alignedlen
            copy_head = itemoff
            _set_lp_off(page, linp0 + offsetindex * ITEM_ID_SIZE, upper)
            i += 1
        _move(page, upper, scratch, copy_head, copy_tail)
    _u16_into(page, _OFF_UPPER, upper)


def page_repair_fragmentation(page: bytearray) -> None:
    """PageRepairFragmentation (bufpage.c, PG15): defragment a heap page.

    Runs the compiled twin (pgformat._native) when it is built, else
    :func:`page_repair_fragmentation_py`, the reference it is tested against.
    """
    compiled = native.compiled
    if compiled is not None:
        compiled.page_repair_fragmentation(page)
    else:
        page_repair_fragmentation_py(page)


def page_repair_fragmentation_py(page: bytearray) -> None:
    """PageRepairFragmentation (bufpage.c, PG15), pure Python: defragment a heap page.

    Zeroes LP_UNUSED line pointers, compacts tuple storage to the end of the
    page (compactify_tuples, with its presorted fast path), truncates trailing
    unused line pointers, and sets or clears PD_HAS_FREE_LINES.
    """
    lower, upper, special = _check_bounds_strict(page)
    nline = _max_offset(lower)
    linps = _read_linps(page, nline)

    # Validate everything before changing anything.
    items: list[_Compact] = []
    unused: list[int] = []
    totallen = 0
    last_offset = special
    presorted = True
    finalusedlp = 0
    for idx, raw in enumerate(linps):
        if (raw >> _LP_FLAGS_SHIFT) & 3:
            lp_len = raw >> _LP_LEN_SHIFT
            if lp_len:
                itemoff = raw & _LP_OFF_MASK
                if last_offset > itemoff:
                    last_offset = itemoff
                else:
                    presorted = False
                if itemoff < upper or itemoff >= special:
                    raise PageError(f"corrupted line pointer: {itemoff}")
                alignedlen = maxalign(lp_len)
                if itemoff + alignedlen > BLCKSZ:
                    # C would read past the page; refuse rather than guess.
                    raise PageError(
                        f"corrupted line pointer: offset = {itemoff}, size = {lp_len}"
                    )
                totallen += alignedlen
                items.append((idx, itemoff, alignedlen))
            finalusedlp = idx + 1
        else:
            unused.append(idx)

    if items and totallen > special - lower:
        raise PageError(
            f"corrupted item lengths: total {totallen}, available space {special - lower}"
        )

    for idx in unused:
        _u32_into(page, SIZE_OF_PAGE_HEADER_DATA + idx * ITEM_ID_SIZE, 0)  # ItemIdSetUnused
    nunused = len(unused)

    if not items:
        _u16_into(page, _OFF_UPPER, special)
    else:
        _compactify_tuples(page, items, presorted)

    if finalusedlp != nline:
        nunusedend = nline - finalusedlp
        nunused -= nunusedend
        _u16_into(page, _OFF_LOWER, lower - ITEM_ID_SIZE * nunusedend)

    if nunused > 0:
        page_set_has_free_line_pointers(page)
    else:
        page_clear_has_free_line_pointers(page)


def page_truncate_line_pointer_array(page: bytearray) -> None:
    """PageTruncateLinePointerArray (bufpage.c): drop trailing LP_UNUSED pointers.

    Never truncates to zero line pointers (one unused one stays). Sets or
    clears PD_HAS_FREE_LINES by whether unused pointers remain.
    """
    _check_page(page)
    lower = page_get_lower(page)
    nline = _max_offset(lower)
    linps = _read_linps(page, nline)
    countdone = False
    sethint = False
    nunusedend = 0
    for i in range(nline, 0, -1):
        used = (linps[i - 1] >> _LP_FLAGS_SHIFT) & 3 != LP_UNUSED
        if not countdone and i > FIRST_OFFSET_NUMBER:
            if not used:
                nunusedend += 1
            else:
                countdone = True
        elif not used:
            sethint = True
            break
    if nunusedend > 0:
        _u16_into(page, _OFF_LOWER, lower - ITEM_ID_SIZE * nunusedend)
    if sethint:
        page_set_has_free_line_pointers(page)
    else:
        page_clear_has_free_line_pointers(page)


def page_get_free_space(page: bytearray) -> int:
    """PageGetFreeSpace (bufpage.c): pd_upper - pd_lower minus one line pointer, >= 0."""
    lower, upper = page_get_lower(page), page_get_upper(page)
    space = upper - lower
    if space < ITEM_ID_SIZE:
        return 0
    return space - ITEM_ID_SIZE


def page_get_free_space_for_multiple_tuples(page: bytearray, ntups: int) -> int:
    """PageGetFreeSpaceForMultipleTuples (bufpage.c)."""
    space = page_get_upper(page) - page_get_lower(page)
    if space < ntups * ITEM_ID_SIZE:
        return 0
    return space - ntups * ITEM_ID_SIZE


def page_get_exact_free_space(page: bytearray) -> int:
    """PageGetExactFreeSpace (bufpage.c): pd_upper - pd_lower, >= 0."""
    space = page_get_upper(page) - page_get_lower(page)
    return space if space > 0 else 0


def page_get_heap_free_space(page: bytearray) -> int:
    """PageGetHeapFreeSpace (bufpage.c): 0 once MaxHeapTuplesPerPage are in use."""
    space = page_get_free_space(page)
    if space > 0:
        nline = page_get_max_offset_number(page)
        if nline >= MAX_HEAP_TUPLES_PER_PAGE:
            if page_has_free_line_pointers(page):
                linps = _read_linps(page, nline)
                if all((raw >> _LP_FLAGS_SHIFT) & 3 != LP_UNUSED for raw in linps):
                    space = 0
            else:
                space = 0
    return space


def _check_index_item(
    page: bytearray, offnum: int, nline: int, upper: int, special: int
) -> tuple[int, int, int]:
    """Shared offnum and line pointer checks of the PageIndex* functions."""
    if offnum <= 0 or offnum > nline:
        raise PageError(f"invalid index offnum: {offnum}")
    pos = _linp_pos(offnum)
    raw = _u32_from(page, pos)[0]
    size = raw >> _LP_LEN_SHIFT
    offset = raw & _LP_OFF_MASK
    if offset < upper or offset + size > special or offset != maxalign(offset):
        raise PageError(f"corrupted line pointer: offset = {offset}, size = {size}")
    return pos, offset, size


def page_index_tuple_delete(page: bytearray, offnum: int) -> None:
    """PageIndexTupleDelete (bufpage.c): remove one index tuple and its line pointer.

    Later line pointers shift down one slot; tuple data before the deleted
    tuple moves up by its aligned size; pointers to moved data are adjusted.
    """
    lower, upper, special = _check_bounds_strict(page)
    nline = _max_offset(lower)
    pos, offset, size = _check_index_item(page, offnum, nline, upper, special)
    size = maxalign(size)

    nbytes = lower - (pos + ITEM_ID_SIZE)
    if nbytes > 0:
        page[pos : pos + nbytes] = page[pos + ITEM_ID_SIZE : pos + ITEM_ID_SIZE + nbytes]

    if offset > upper:
        n = offset - upper
        page[upper + size : upper + size + n] = page[upper : upper + n]

    upper += size
    lower -= ITEM_ID_SIZE
    _u16_into(page, _OFF_UPPER, upper)
    _u16_into(page, _OFF_LOWER, lower)

    if lower > SIZE_OF_PAGE_HEADER_DATA:  # !PageIsEmpty
        nline -= 1
        linps = list(_read_linps(page, nline))
        changed = False
        for idx, raw in enumerate(linps):
            if raw & _LP_OFF_MASK <= offset:
                linps[idx] = (raw & ~_LP_OFF_MASK) | ((raw + size) & _LP_OFF_MASK)
                changed = True
        if changed:
            struct.pack_into(f"<{nline}I", page, SIZE_OF_PAGE_HEADER_DATA, *linps)


def page_index_multi_delete(page: bytearray, itemnos: Sequence[int]) -> None:
    """PageIndexMultiDelete (bufpage.c): delete several index tuples at once.

    itemnos must be in ascending order. Up to two items go through
    :func:`page_index_tuple_delete` (in reverse order) as in Postgres; more are
    removed in one pass and the survivors compacted with compactify_tuples.
    """
    nitems = len(itemnos)
    if nitems <= 2:
        for offnum in reversed(itemnos):
            page_index_tuple_delete(page, offnum)
        return

    lower, upper, special = _check_bounds_strict(page)
    nline = _max_offset(lower)
    linps = _read_linps(page, nline)

    items: list[_Compact] = []
    newitemids: list[int] = []
    totallen = 0
    nextitm = 0
    last_offset = special
    presorted = True
    for idx, raw in enumerate(linps):
        offnum = idx + 1
        size = raw >> _LP_LEN_SHIFT
        offset = raw & _LP_OFF_MASK
        if offset < upper or offset + size > special or offset != maxalign(offset):
            raise PageError(f"corrupted line pointer: offset = {offset}, size = {size}")
        if nextitm < nitems and offnum == itemnos[nextitm]:
            nextitm += 1
        else:
            if last_offset > offset:
                last_offset = offset
            else:
                presorted = False
            alignedlen = maxalign(size)
            totallen += alignedlen
            items.append((len(newitemids), offset, alignedlen))
            newitemids.append(raw)

    if nextitm != nitems:
        raise PageError("incorrect index offsets supplied")
    if totallen > special - lower:
        raise PageError(
            f"corrupted item lengths: total {totallen}, available space {special - lower}"
        )

    nused = len(newitemids)
    struct.pack_into(f"<{nused}I", page, SIZE_OF_PAGE_HEADER_DATA, *newitemids)
    _u16_into(page, _OFF_LOWER, SIZE_OF_PAGE_HEADER_DATA + nused * ITEM_ID_SIZE)
    if nused > 0:
        _compactify_tuples(page, items, presorted)
    else:
        _u16_into(page, _OFF_UPPER, special)


def page_index_tuple_delete_no_compact(page: bytearray, offnum: int) -> None:
    """PageIndexTupleDeleteNoCompact (bufpage.c): delete keeping other item numbers.

    The line pointer becomes LP_UNUSED (or is dropped if it is the last one);
    tuple data is compacted as in :func:`page_index_tuple_delete`.
    """
    lower, upper, special = _check_bounds_strict(page)
    nline = _max_offset(lower)
    pos, offset, size = _check_index_item(page, offnum, nline, upper, special)
    size = maxalign(size)

    if offnum < nline:
        _u32_into(page, pos, 0)  # ItemIdSetUnused
    else:
        lower -= ITEM_ID_SIZE
        _u16_into(page, _OFF_LOWER, lower)
        nline -= 1

    if offset > upper:
        n = offset - upper
        page[upper + size : upper + size + n] = page[upper : upper + n]
    upper += size
    _u16_into(page, _OFF_UPPER, upper)

    if lower > SIZE_OF_PAGE_HEADER_DATA:  # !PageIsEmpty
        linps = list(_read_linps(page, nline))
        changed = False
        for idx, raw in enumerate(linps):
            if raw >> _LP_LEN_SHIFT and raw & _LP_OFF_MASK <= offset:
                linps[idx] = (raw & ~_LP_OFF_MASK) | ((raw + size) & _LP_OFF_MASK)
                changed = True
        if changed:
            struct.pack_into(f"<{nline}I", page, SIZE_OF_PAGE_HEADER_DATA, *linps)


def page_index_tuple_overwrite(
    page: bytearray, offnum: int, newtup: bytes | bytearray | memoryview
) -> bool:
    """PageIndexTupleOverwrite (bufpage.c): replace an index tuple in place.

    Tuple data before the target shifts by the change in aligned size; the
    line pointer keeps its lp_flags. Returns False if the new tuple does not
    fit. Only ``len(newtup)`` bytes are written.
    """
    lower, upper, special = _check_bounds_strict(page)
    itemcount = _max_offset(lower)
    pos, offset, oldsize = _check_index_item(page, offnum, itemcount, upper, special)

    newsize = len(newtup)
    oldsize = maxalign(oldsize)
    alignednewsize = maxalign(newsize)
    if alignednewsize > oldsize + (upper - lower):
        return False

    size_diff = oldsize - alignednewsize
    if size_diff != 0:
        n = offset - upper
        page[upper + size_diff : upper + size_diff + n] = page[upper : upper + n]
        _u16_into(page, _OFF_UPPER, upper + size_diff)
        linps = list(_read_linps(page, itemcount))
        for idx, raw in enumerate(linps):
            if raw >> _LP_LEN_SHIFT and raw & _LP_OFF_MASK <= offset:
                linps[idx] = (raw & ~_LP_OFF_MASK) | ((raw + size_diff) & _LP_OFF_MASK)
        struct.pack_into(f"<{itemcount}I", page, SIZE_OF_PAGE_HEADER_DATA, *linps)

    raw = _u32_from(page, pos)[0]
    flags = (raw >> _LP_FLAGS_SHIFT) & 3
    newoff = offset + size_diff
    _u32_into(page, pos, pack_item_id(newoff, flags, newsize))
    page[newoff : newoff + newsize] = newtup
    return True
