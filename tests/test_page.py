"""pgformat.page and pgformat.bufmask: byte-exact with PostgreSQL 15's bufpage.c.

Three kinds of tests:
- hand-built pages whose expected bytes were worked out by following
  bufpage.c by hand (memmove for memmove, stale bytes included);
- hypothesis: random add/delete/repair sequences keep the page invariants and
  every surviving item's bytes; corrupt pages only ever raise PageError;
- real Postgres: pages Postgres wrote before and after VACUUM (pageinspect's
  get_raw_page), with our functions replaying what VACUUM did to the page.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgformat.bufmask import (
    NoMaskError,
    btree_mask,
    generic_mask,
    heap_mask,
    mask_for_rmgr,
    mask_lp_flags,
    mask_page_content,
    mask_page_hint_bits,
    mask_page_lsn_and_checksum,
    mask_unused_space,
    seq_mask,
)
from pgformat.constants import BLCKSZ, maxalign
from pgformat.page import (
    LP_DEAD,
    LP_NORMAL,
    LP_REDIRECT,
    LP_UNUSED,
    MAX_HEAP_TUPLES_PER_PAGE,
    PAI_IS_HEAP,
    PAI_OVERWRITE,
    PD_ALL_VISIBLE,
    PD_HAS_FREE_LINES,
    PD_PAGE_FULL,
    ItemIdData,
    PageError,
    item_id_mark_dead,
    item_id_set_dead,
    item_id_set_normal,
    item_id_set_redirect,
    item_id_set_unused,
    new_page,
    pack_item_id,
    page_add_item,
    page_add_item_extended,
    page_get_exact_free_space,
    page_get_flags,
    page_get_free_space,
    page_get_free_space_for_multiple_tuples,
    page_get_header,
    page_get_heap_free_space,
    page_get_item,
    page_get_item_id,
    page_get_lower,
    page_get_lsn,
    page_get_max_offset_number,
    page_get_page_layout_version,
    page_get_page_size,
    page_get_prune_xid,
    page_get_special,
    page_get_special_pointer,
    page_get_special_size,
    page_get_upper,
    page_index_multi_delete,
    page_index_tuple_delete,
    page_index_tuple_delete_no_compact,
    page_index_tuple_overwrite,
    page_init,
    page_is_empty,
    page_is_new,
    page_repair_fragmentation,
    page_set_checksum,
    page_set_flags,
    page_set_has_free_line_pointers,
    page_set_item_id,
    page_set_lower,
    page_set_lsn,
    page_set_prunable,
    page_set_prune_xid,
    page_set_special,
    page_set_upper,
    page_truncate_line_pointer_array,
    unpack_item_id,
)

U32 = struct.Struct("<I")


def lp_bytes(off: int, flags: int, length: int) -> bytes:
    """A line pointer as stored, computed independently of the library."""
    return U32.pack(off | (flags << 15) | (length << 17))


def linp_at(page: bytearray, offnum: int) -> bytes:
    pos = 24 + 4 * (offnum - 1)
    return bytes(page[pos : pos + 4])


def garbage_page(special: int = 0) -> bytearray:
    """An initialized page whose unused bytes hold a recognizable pattern,
    so tests can see exactly which bytes an operation touched."""
    page = new_page(special)
    upper = page_get_upper(page)
    page[24:upper] = bytes((i * 7 + 3) & 0xFF for i in range(24, upper))
    return page


def build(
    items: list[tuple[int, int, bytes]] | list[tuple[int, int, int, bytes]],
    upper: int,
    special: int = BLCKSZ,
    flags: int = 0,
) -> bytearray:
    """A page from explicit line pointers: (lp_off, lp_flags, data) or
    (lp_off, lp_flags, lp_len, data); data is written at lp_off."""
    page = garbage_page(BLCKSZ - special)
    page_set_upper(page, upper)
    page_set_lower(page, 24 + 4 * len(items))
    page_set_flags(page, flags)
    for i, it in enumerate(items, 1):
        if len(it) == 3:
            off, fl, data = it  # type: ignore[misc]
            length = len(data) if fl in (LP_NORMAL, LP_DEAD) else 0
        else:
            off, fl, length, data = it  # type: ignore[misc]
        page[24 + 4 * (i - 1) : 24 + 4 * i] = lp_bytes(off, fl, length)
        if data:
            page[off : off + len(data)] = data
    return page


# --- layout -------------------------------------------------------------------------


def test_item_id_bitfields_pack_little_endian() -> None:
    raw = pack_item_id(8176, LP_NORMAL, 10)
    assert raw == 8176 | (1 << 15) | (10 << 17)
    assert unpack_item_id(raw) == ItemIdData(8176, LP_NORMAL, 10)
    # 15-bit fields truncate as C bit-fields do.
    assert unpack_item_id(pack_item_id(0x8001, LP_DEAD, 0x8002)) == ItemIdData(1, LP_DEAD, 2)
    lp = ItemIdData(5, LP_REDIRECT, 0)
    assert lp.is_used and lp.is_redirected and not lp.has_storage and not lp.is_normal
    assert ItemIdData(0, LP_DEAD, 4).is_dead and not ItemIdData(0, LP_UNUSED, 0).is_used


def test_page_init_exact_bytes() -> None:
    page = bytearray(b"\xff" * BLCKSZ)
    page_init(page, 10)  # MAXALIGNed to 16
    expected = bytearray(BLCKSZ)
    expected[0:24] = struct.pack("<IIHHHHHHI", 0, 0, 0, 0, 24, 8176, 8176, 0x2004, 0)
    assert page == expected
    assert page_get_page_size(page) == 8192 and page_get_page_layout_version(page) == 4
    assert page_get_special_size(page) == 16
    assert page_get_special_pointer(page).nbytes == 16
    assert page_is_empty(page) and not page_is_new(page)
    assert page_get_max_offset_number(page) == 0
    assert page_is_new(bytearray(BLCKSZ))
    with pytest.raises(PageError):
        page_init(page, 8168)
    with pytest.raises(PageError):
        page_init(bytearray(100))


def test_header_accessors() -> None:
    page = new_page()
    page_set_lsn(page, 0x1_0000_0002)
    assert page[0:8] == struct.pack("<II", 1, 2)  # xlogid (hi) then xrecoff (lo)
    assert page_get_lsn(page) == 0x1_0000_0002
    page_set_checksum(page, 0xBEEF)
    page_set_prune_xid(page, 0)
    page_set_prunable(page, 1000)
    page_set_prunable(page, 2000)  # later: ignored
    assert page_get_prune_xid(page) == 1000
    page_set_prunable(page, 900)
    assert page_get_prune_xid(page) == 900
    page_set_prune_xid(page, 0xFFFFFFF0)
    page_set_prunable(page, 5)  # 5 follows 0xFFFFFFF0 modulo 2^32
    assert page_get_prune_xid(page) == 0xFFFFFFF0
    hdr = page_get_header(page)
    assert hdr.pd_lsn == 0x1_0000_0002 and hdr.pd_checksum == 0xBEEF
    assert hdr.pd_lower == 24 and hdr.pd_upper == 8192 and hdr.pd_special == 8192


# --- PageAddItemExtended -------------------------------------------------------------


def test_add_items_append_exact_layout() -> None:
    page = garbage_page(16)
    before = bytes(page)
    assert page_add_item_extended(page, b"A" * 10, 0, 0) == 1
    assert page_add_item_extended(page, b"B" * 16, 0, 0) == 2
    assert page_add_item_extended(page, b"C" * 5, 0, 0) == 3
    expected = bytearray(before)
    expected[12:16] = struct.pack("<HH", 36, 8136)
    expected[24:36] = lp_bytes(8160, 1, 10) + lp_bytes(8144, 1, 16) + lp_bytes(8136, 1, 5)
    # only `size` bytes are written: MAXALIGN padding keeps the old bytes
    expected[8160:8170] = b"A" * 10
    expected[8144:8160] = b"B" * 16
    expected[8136:8141] = b"C" * 5
    assert page == expected
    assert bytes(page_get_item(page, 3)) == b"CCCCC"


def test_add_item_in_middle_shuffles_line_pointers() -> None:
    page = new_page()
    page_add_item(page, b"a" * 8, 0, False, False)
    page_add_item(page, b"b" * 8, 0, False, False)
    assert page_add_item(page, b"c" * 8, 1, False, False) == 1
    assert linp_at(page, 1) == lp_bytes(8168, 1, 8)
    assert linp_at(page, 2) == lp_bytes(8184, 1, 8)
    assert linp_at(page, 3) == lp_bytes(8176, 1, 8)
    assert page_get_lower(page) == 36 and page_get_upper(page) == 8168
    # one past the end is an append; further is refused
    assert page_add_item(page, b"d", 4, False, False) == 4
    assert page_add_item(page, b"e", 6, False, False) == 0


def test_add_item_overwrite() -> None:
    page = new_page()
    for ch in b"abc":
        page_add_item(page, bytes([ch]) * 8, 0, False, True)
    item_id_set_unused(page, 2)
    assert page_add_item_extended(page, b"x" * 8, 2, PAI_OVERWRITE | PAI_IS_HEAP) == 2
    assert page_get_lower(page) == 36  # no new line pointer
    assert linp_at(page, 2) == lp_bytes(8160, 1, 8)
    # a used (or storage-holding) slot is refused and nothing changes
    snapshot = bytes(page)
    assert page_add_item_extended(page, b"y" * 8, 1, PAI_OVERWRITE) == 0
    page_set_item_id(page, 3, 8168, LP_UNUSED, 8)
    snapshot = bytes(page)
    assert page_add_item_extended(page, b"y" * 8, 3, PAI_OVERWRITE) == 0
    assert bytes(page) == snapshot
    # overwrite at limit appends
    assert page_add_item_extended(page, b"z" * 8, 4, PAI_OVERWRITE) == 4


def test_add_item_uses_free_line_pointer_hint() -> None:
    page = new_page()
    for ch in b"abcd":
        page_add_item(page, bytes([ch]) * 8, 0, False, True)
    item_id_set_unused(page, 2)
    item_id_set_unused(page, 3)
    # no hint: append
    assert page_add_item(page, b"e" * 8, 0, False, True) == 5
    page_set_has_free_line_pointers(page)
    assert page_add_item(page, b"f" * 8, 0, False, True) == 2
    assert page_add_item(page, b"g" * 8, 0, False, True) == 3
    assert page_get_flags(page) & PD_HAS_FREE_LINES  # hint not re-checked until wrong
    assert page_add_item(page, b"h" * 8, 0, False, True) == 6
    assert not page_get_flags(page) & PD_HAS_FREE_LINES  # wrong hint was reset


def test_add_item_refusals() -> None:
    page = new_page()
    for _ in range(MAX_HEAP_TUPLES_PER_PAGE):
        assert page_add_item(page, b"", 0, False, True) != 0
    assert page_add_item(page, b"", 0, False, True) == 0
    assert page_add_item(page, b"", 0, False, False) == MAX_HEAP_TUPLES_PER_PAGE + 1
    page = new_page()
    assert page_add_item(page, b"x" * 8160, 0, False, True) == 1
    assert page_add_item(page, b"y", 0, False, True) == 0  # no room
    page_set_upper(page, 10)
    with pytest.raises(PageError, match="corrupted page pointers"):
        page_add_item(page, b"y", 0, False, True)


# --- PageRepairFragmentation -------------------------------------------------------


def test_repair_fragmentation_presorted_exact() -> None:
    a, b, c, d = b"A" * 16, b"B" * 24, b"C" * 8, b"D" * 37
    page = build([(8176, 1, a), (8152, 1, b), (8144, 1, c), (8104, 1, d)], upper=8104)
    item_id_set_dead(page, 2)
    before = bytes(page)
    page_repair_fragmentation(page)
    # A already at the end is skipped; C and D form one chunk moved by one memmove
    # of [8104, 8152) to 8128.
    expected = bytearray(before)
    expected[14:16] = struct.pack("<H", 8128)
    expected[32:36] = lp_bytes(8168, 1, 8)
    expected[36:40] = lp_bytes(8128, 1, 37)
    expected[8128:8176] = before[8104:8152]
    assert page == expected
    assert bytes(page_get_item(page, 4)) == d and bytes(page_get_item(page, 3)) == c
    assert page[8104:8128] == before[8104:8128]  # stale bytes stay
    assert not page_get_flags(page) & PD_HAS_FREE_LINES


def test_repair_fragmentation_presorted_two_gaps() -> None:
    # Items: 1 @8176 (16), 2 @8160 (16, removed), 3 @8152 (8), 4 @8136 (16, removed),
    # 5 @8120 (16). Two gaps -> two memmoves; 4 is the last used -> nothing truncated
    # because 5 is used; 2 and 4 unused -> hint set.
    data = [bytes([0x31 + i]) * n for i, n in enumerate([16, 16, 8, 16, 16])]
    offs = [8176, 8160, 8152, 8136, 8120]
    page = build([(o, 1, x) for o, x in zip(offs, data)], upper=8120)
    item_id_set_unused(page, 2)
    item_id_set_unused(page, 4)
    before = bytes(page)
    page_repair_fragmentation(page)
    expected = bytearray(before)
    # i=1 (item 3): gap -> nothing pending yet (copy_tail == copy_head): empty move
    # item 3 -> 8168; item 5: gap -> memmove(8168 <- [8152,8160)), item 5 -> 8152;
    # final memmove(8152 <- [8120,8136)).
    expected[8168:8176] = before[8152:8160]
    expected[8152:8168] = before[8120:8136]
    expected[14:16] = struct.pack("<H", 8152)
    expected[10:12] = struct.pack("<H", PD_HAS_FREE_LINES)
    expected[32:36] = lp_bytes(8168, 1, 8)
    expected[40:44] = lp_bytes(8152, 1, 16)
    assert page == expected


def test_repair_fragmentation_unsorted_many_survivors_exact() -> None:
    a, b, c, d = b"a" * 16, b"b" * 16, b"c" * 32, b"d" * 32
    page = build([(8096, 1, a), (8176, 1, b), (8112, 1, c), (8144, 1, d)], upper=8096)
    item_id_set_dead(page, 3)
    before = bytes(page)
    page_repair_fragmentation(page)
    # not presorted, 3 survivors >= 4/4: scratch copy of [pd_upper, special); items
    # are laid down in line pointer order from the end: a, b, d.
    expected = bytearray(before)
    expected[8176:8192] = a
    expected[8160:8176] = b
    expected[8128:8160] = d
    expected[14:16] = struct.pack("<H", 8128)
    expected[24:28] = lp_bytes(8176, 1, 16)
    expected[28:32] = lp_bytes(8160, 1, 16)
    expected[36:40] = lp_bytes(8128, 1, 32)
    assert page == expected
    assert page[8096:8128] == a + c[:16]  # stale


def test_repair_fragmentation_unsorted_few_survivors_exact() -> None:
    x, y = b"x" * 8, b"y" * 20
    items: list[tuple[int, int, int, bytes]] = [(0, LP_UNUSED, 0, b"")] * 12
    items[1] = (8112, LP_NORMAL, 8, x)
    items[9] = (8160, LP_NORMAL, 20, y + b"\xee" * 4)
    items[4] = (10, LP_REDIRECT, 0, b"")
    items[11] = (0, LP_DEAD, 0, b"")
    items[2] = (1234, LP_UNUSED, 0, b"")  # sloppy unused pointer: zeroed
    page = build(items, upper=8112)
    before = bytes(page)
    page_repair_fragmentation(page)
    # 2 survivors < 12/4: per-tuple scratch copies; x goes last-to-end, y stays.
    expected = bytearray(before)
    expected[8184:8192] = x
    expected[14:16] = struct.pack("<H", 8160)
    expected[10:12] = struct.pack("<H", PD_HAS_FREE_LINES)
    expected[28:32] = lp_bytes(8184, 1, 8)
    expected[32:36] = bytes(4)
    assert page == expected
    assert page[8180:8184] == b"\xee" * 4  # padding moves with its tuple


def test_repair_fragmentation_truncates_trailing_unused() -> None:
    page = new_page()
    for ch in b"abcde":
        page_add_item(page, bytes([ch]) * 8, 0, False, True)
    item_id_set_unused(page, 2)
    item_id_set_unused(page, 4)
    item_id_set_unused(page, 5)
    page_repair_fragmentation(page)
    assert page_get_lower(page) == 24 + 3 * 4
    assert page_get_flags(page) & PD_HAS_FREE_LINES
    assert bytes(page_get_item(page, 3)) == b"c" * 8
    # everything unused: empty page, no line pointers, hint cleared
    for off in (1, 3):
        item_id_set_unused(page, off)
    page_repair_fragmentation(page)
    assert page_get_lower(page) == 24 and page_get_upper(page) == 8192
    assert not page_get_flags(page) & PD_HAS_FREE_LINES


def test_repair_fragmentation_rejects_corruption() -> None:
    page = new_page()
    page_add_item(page, b"x" * 8, 0, False, True)
    bad = bytearray(page)
    page_set_special(bad, 8190)  # not MAXALIGNed
    with pytest.raises(PageError, match="corrupted page pointers"):
        page_repair_fragmentation(bad)
    bad = bytearray(page)
    item_id_set_normal(bad, 1, 100, 8)  # below pd_upper
    snapshot = bytes(bad)
    with pytest.raises(PageError, match="corrupted line pointer"):
        page_repair_fragmentation(bad)
    assert bytes(bad) == snapshot
    bad = bytearray(page)
    page_set_upper(bad, 100)
    page_set_lower(bad, 32)
    item_id_set_normal(bad, 1, 100, 8000)  # more data than the page can hold
    item_id_set_normal(bad, 2, 200, 7000)
    with pytest.raises(PageError, match="corrupted item lengths"):
        page_repair_fragmentation(bad)
    item_id_set_normal(bad, 2, 200, 8000)  # would read past the page
    with pytest.raises(PageError):
        page_repair_fragmentation(bad)


# --- PageTruncateLinePointerArray ----------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "lower", "hint"),
    [
        ([LP_NORMAL, LP_UNUSED, LP_NORMAL, LP_UNUSED, LP_UNUSED], 24 + 12, True),
        ([LP_NORMAL, LP_DEAD, LP_REDIRECT, LP_UNUSED], 24 + 12, False),
        ([LP_UNUSED, LP_UNUSED, LP_UNUSED], 24 + 4, True),  # keep one
        ([LP_NORMAL, LP_UNUSED], 24 + 4, False),
        ([LP_UNUSED, LP_NORMAL], 24 + 8, True),
    ],
)
def test_truncate_line_pointer_array(flags: list[int], lower: int, hint: bool) -> None:
    page = new_page()
    for f in flags:
        page_add_item(page, b"t" * 8, 0, False, True)
    for i, f in enumerate(flags, 1):
        if f == LP_UNUSED:
            item_id_set_unused(page, i)
        elif f == LP_DEAD:
            item_id_set_dead(page, i)
        elif f == LP_REDIRECT:
            item_id_set_redirect(page, i, 1)
    before = bytes(page)
    page_truncate_line_pointer_array(page)
    assert page_get_lower(page) == lower
    assert bool(page_get_flags(page) & PD_HAS_FREE_LINES) == hint
    # nothing else changes (no CLOBBER_FREED_MEMORY in production builds)
    assert page[16:] == before[16:] and page[0:10] == before[0:10]


# --- index page operations ------------------------------------------------------------


def index_page(sizes: list[int]) -> bytearray:
    page = garbage_page(16)
    for i, n in enumerate(sizes):
        assert page_add_item(page, bytes([0x41 + i]) * n, 0, False, False) == i + 1
    return page


def test_index_tuple_delete_exact() -> None:
    page = index_page([16, 24, 8])  # A@8160, B@8136, C@8128
    before = bytes(page)
    page_index_tuple_delete(page, 2)
    # C's pointer moves down one slot and is adjusted by 24; memmove(addr + 24,
    # addr, 8) copies C to [8152, 8160); [8128, 8152) keeps stale bytes.
    expected = bytearray(before)
    expected[12:16] = struct.pack("<HH", 32, 8152)
    expected[28:32] = lp_bytes(8152, 1, 8)
    expected[8152:8160] = before[8128:8136]
    assert page == expected
    assert page[32:36] == before[32:36]  # stale third pointer stays past pd_lower
    assert bytes(page_get_item(page, 2)) == b"C" * 8
    # deleting the last tuple empties the page without touching pointers
    page_index_tuple_delete(page, 2)
    page_index_tuple_delete(page, 1)
    assert page_get_lower(page) == 24 and page_get_upper(page) == 8176
    with pytest.raises(PageError, match="invalid index offnum"):
        page_index_tuple_delete(page, 1)


def test_index_multi_delete_presorted_exact() -> None:
    page = index_page([8, 8, 8, 8, 8])  # A@8168 B@8160 C@8152 D@8144 E@8136
    before = bytes(page)
    page_index_multi_delete(page, [1, 3, 4])
    expected = bytearray(before)
    expected[12:16] = struct.pack("<HH", 32, 8160)
    expected[24:28] = lp_bytes(8168, 1, 8)  # B
    expected[28:32] = lp_bytes(8160, 1, 8)  # E
    expected[8168:8176] = b"B" * 8
    expected[8160:8168] = b"E" * 8
    assert page == expected  # [32, 44) keeps old pointers 3..5 (stale)


def test_index_multi_delete_unsorted_exact() -> None:
    # key order differs from storage order, as after random-order inserts
    page = index_page([8, 8, 8, 8])  # A@8168 B@8160 C@8152 D@8144
    assert page_add_item(page, b"E" * 8, 1, False, False) == 1  # E@8136 first
    assert page_add_item(page, b"F" * 8, 3, False, False) == 3  # F@8128
    # linp order: E A F B C D
    before = bytes(page)
    page_index_multi_delete(page, [2, 4, 6])  # drop A, B, D -> keep E F C
    # not presorted: skip nothing (E does not end at 8176), copy [8128, 8176) to
    # scratch, lay down E, F, C from the end.
    expected = bytearray(before)
    expected[12:16] = struct.pack("<HH", 36, 8152)
    expected[24:36] = lp_bytes(8168, 1, 8) + lp_bytes(8160, 1, 8) + lp_bytes(8152, 1, 8)
    expected[8152:8176] = b"C" * 8 + b"F" * 8 + b"E" * 8
    assert page == expected


def test_index_multi_delete_small_and_errors() -> None:
    page = index_page([8, 16, 24, 8])
    other = bytearray(page)
    page_index_multi_delete(page, [1, 3])
    page_index_tuple_delete(other, 3)
    page_index_tuple_delete(other, 1)
    assert page == other
    page = index_page([8, 16, 24, 8])
    with pytest.raises(PageError, match="incorrect index offsets"):
        page_index_multi_delete(page, [3, 1, 2])
    page_index_multi_delete(page, [1, 2, 3, 4])
    assert page_get_lower(page) == 24 and page_get_upper(page) == 8176


def test_index_tuple_delete_no_compact_exact() -> None:
    page = index_page([16, 24, 8])  # A@8160, B@8136, C@8128
    before = bytes(page)
    page_index_tuple_delete_no_compact(page, 2)
    expected = bytearray(before)
    expected[14:16] = struct.pack("<H", 8152)
    expected[28:32] = bytes(4)
    expected[32:36] = lp_bytes(8152, 1, 8)
    expected[8152:8160] = before[8128:8136]
    assert page == expected
    page_index_tuple_delete_no_compact(page, 3)  # last: pointer dropped
    assert page_get_lower(page) == 32 and page_get_upper(page) == 8160
    assert linp_at(page, 1) == lp_bytes(8160, 1, 16)


def test_index_tuple_overwrite_exact() -> None:
    page = index_page([16, 24, 8])  # A@8160, B@8136, C@8128
    item_id_mark_dead(page, 2)
    before = bytes(page)
    # same aligned size: data only, flags kept
    assert page_index_tuple_overwrite(page, 2, b"b" * 20)
    expected = bytearray(before)
    expected[28:32] = lp_bytes(8136, LP_DEAD, 20)
    expected[8136:8156] = b"b" * 20
    assert page == expected
    # grow by 16: C moves down by 16
    before = bytes(page)
    assert page_index_tuple_overwrite(page, 2, b"W" * 40)
    expected = bytearray(before)
    expected[14:16] = struct.pack("<H", 8112)
    expected[28:32] = lp_bytes(8120, LP_DEAD, 40)
    expected[32:36] = lp_bytes(8112, 1, 8)
    expected[8112:8120] = b"C" * 8
    expected[8120:8160] = b"W" * 40
    assert page == expected
    # shrink by 32: C moves up by 32
    before = bytes(page)
    assert page_index_tuple_overwrite(page, 2, b"s" * 3)
    expected = bytearray(before)
    expected[14:16] = struct.pack("<H", 8144)
    expected[28:32] = lp_bytes(8152, LP_DEAD, 3)
    expected[32:36] = lp_bytes(8144, 1, 8)
    expected[8144:8152] = b"C" * 8
    expected[8152:8155] = b"sss"
    assert page == expected
    # 16 bytes of A plus 8108 free: MAXALIGN(8121) = 8128 does not fit, 8120 does
    assert not page_index_tuple_overwrite(page, 1, b"z" * 8121)
    assert page_index_tuple_overwrite(page, 1, b"z" * 8120)
    assert page_get_upper(page) == 40 and page_get_lower(page) == 36


def test_free_space_functions() -> None:
    page = new_page(16)
    assert page_get_exact_free_space(page) == 8176 - 24
    assert page_get_free_space(page) == 8176 - 28
    assert page_get_free_space_for_multiple_tuples(page, 3) == 8176 - 36
    page_set_upper(page, 26)
    assert page_get_free_space(page) == 0 and page_get_exact_free_space(page) == 2
    page_set_upper(page, 20)
    assert page_get_exact_free_space(page) == 0
    page = new_page()
    for _ in range(MAX_HEAP_TUPLES_PER_PAGE):
        page_add_item(page, b"", 0, False, True)
    assert page_get_free_space(page) > 0 and page_get_heap_free_space(page) == 0
    item_id_set_unused(page, 7)
    assert page_get_heap_free_space(page) == 0  # no hint: believed
    page_set_has_free_line_pointers(page)
    assert page_get_heap_free_space(page) == page_get_free_space(page)
    item_id_set_normal(page, 7, 0, 0)
    assert page_get_heap_free_space(page) == 0  # hint wrong: checked


def test_item_accessors_reject_out_of_page() -> None:
    assert issubclass(PageError, ValueError)
    page = new_page()
    with pytest.raises(PageError):
        page_get_item_id(page, 0)
    with pytest.raises(PageError):
        page_get_item_id(page, 2043)
    item_id_set_normal(page, 1, 8190, 10)
    with pytest.raises(PageError):
        page_get_item(page, 1)


# --- property tests ---------------------------------------------------------------------


def page_invariants(page: bytearray) -> None:
    assert len(page) == BLCKSZ
    hdr = page_get_header(page)
    assert 24 <= hdr.pd_lower <= hdr.pd_upper <= hdr.pd_special <= BLCKSZ
    spans = []
    for off in range(1, page_get_max_offset_number(page) + 1):
        lp = page_get_item_id(page, off)
        if lp.lp_flags == LP_UNUSED:
            assert lp.lp_len == 0
        if lp.has_storage:
            assert hdr.pd_upper <= lp.lp_off and lp.lp_off + lp.lp_len <= hdr.pd_special
            spans.append((lp.lp_off, lp.lp_off + maxalign(lp.lp_len)))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "items overlap"


HeapOp = tuple[str, int, int]
heap_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 300), st.integers(0, 255)),
        st.tuples(st.just("add_at"), st.integers(1, 80), st.integers(1, 120)),
        st.tuples(
            st.sampled_from(["dead", "unused", "redirect", "markdead"]),
            st.integers(1, 80),
            st.just(0),
        ),
        st.tuples(st.sampled_from(["repair", "truncate"]), st.just(0), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heap_ops)
def test_heap_page_random_operations_keep_invariants(ops: list[HeapOp]) -> None:
    page = new_page()
    model: dict[int, bytes] = {}  # offnum -> bytes of every item with storage
    for op, a, b in ops:
        nline = page_get_max_offset_number(page)
        if op in ("add", "add_at"):
            data = bytes([b & 0xFF]) * a if op == "add" else bytes([a & 0xFF]) * b
            target = 0 if op == "add" else min(a, nline + 1)
            flags = PAI_IS_HEAP | (PAI_OVERWRITE if op == "add_at" else 0)
            got = page_add_item_extended(page, data, target, flags)
            if got:
                model[got] = data
        elif nline and op in ("dead", "unused", "redirect", "markdead"):
            off = (a - 1) % nline + 1
            lp = page_get_item_id(page, off)
            if op == "markdead":
                if lp.is_normal:
                    item_id_mark_dead(page, off)
                continue
            if op == "unused" and not lp.is_used:
                continue
            model.pop(off, None)
            if op == "dead":
                item_id_set_dead(page, off)
            elif op == "unused":
                item_id_set_unused(page, off)
            else:
                item_id_set_redirect(page, off, 1)
        elif op == "repair":
            before = bytearray(page)
            page_repair_fragmentation(page)
            # compactify lays items down from pd_special in line pointer order
            pos = page_get_special(page)
            for off in range(1, page_get_max_offset_number(page) + 1):
                lp = page_get_item_id(page, off)
                if lp.has_storage:
                    pos -= maxalign(lp.lp_len)
                    assert lp.lp_off == pos
                    old = page_get_item_id(before, off)
                    # padding travels with the tuple
                    assert page[pos : pos + maxalign(lp.lp_len)] == before[
                        old.lp_off : old.lp_off + maxalign(lp.lp_len)
                    ]
            assert page_get_upper(page) == pos
        elif op == "truncate" and nline:
            page_truncate_line_pointer_array(page)
        page_invariants(page)
        for off, data in model.items():
            assert bytes(page_get_item(page, off)) == data


IndexOp = tuple[str, int, int]
index_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 60), st.integers(1, 100)),
        st.tuples(st.sampled_from(["delete", "nocompact"]), st.integers(1, 60), st.just(0)),
        st.tuples(st.just("overwrite"), st.integers(1, 60), st.integers(1, 100)),
        st.tuples(st.just("multi"), st.integers(0, 2**60), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index_ops)
def test_index_page_random_operations_keep_invariants(ops: list[IndexOp]) -> None:
    page = new_page(16)
    model: list[bytes | None] = []  # per line pointer; None = unused
    counter = 0
    for op, a, b in ops:
        counter += 1
        nline = len(model)
        if op == "add":
            data = bytes([counter & 0xFF]) * b
            target = a % (nline + 2)  # 0 = append
            got = page_add_item_extended(page, data, target, 0)
            if got:
                if target == 0:
                    model.append(data)
                else:
                    model.insert(got - 1, data)
            continue
        live = [i + 1 for i, d in enumerate(model) if d is not None]
        if not live:
            continue
        off = live[a % len(live)]
        if op == "delete":
            if any(d is None for d in model):
                continue  # PageIndexTupleDelete expects storage everywhere
            page_index_tuple_delete(page, off)
            del model[off - 1]
        elif op == "nocompact":
            page_index_tuple_delete_no_compact(page, off)
            if off == nline:
                model.pop()
            else:
                model[off - 1] = None
        elif op == "overwrite":
            data = bytes([counter & 0xFF]) * b
            if page_index_tuple_overwrite(page, off, data):
                model[off - 1] = data
        elif op == "multi":
            if any(d is None for d in model):
                continue
            chosen = [o for o in live if (a >> (o % 60)) & 1]
            page_index_multi_delete(page, chosen)
            for o in reversed(chosen):
                del model[o - 1]
        page_invariants(page)
        assert page_get_max_offset_number(page) == len(model)
        for i, data in enumerate(model, 1):
            if data is not None:
                assert bytes(page_get_item(page, i)) == data


@settings(max_examples=300, deadline=None)
@given(
    header=st.tuples(*[st.integers(0, 0xFFFF)] * 4),
    linps=st.lists(st.integers(0, 0xFFFFFFFF), max_size=40),
    offnum=st.integers(0, 70),
)
def test_corrupt_pages_raise_only_page_error(
    header: tuple[int, int, int, int], linps: list[int], offnum: int
) -> None:
    flags, lower, upper, special = header
    base = bytearray(BLCKSZ)
    base[10:18] = struct.pack("<HHHH", flags, lower % 8300, upper % 8300, special % 8300)
    base[24 : 24 + 4 * len(linps)] = struct.pack(f"<{len(linps)}I", *linps)
    ops: list[Any] = [
        page_repair_fragmentation,
        page_truncate_line_pointer_array,
        page_get_heap_free_space,
        lambda p: page_add_item_extended(p, b"x" * 30, offnum, PAI_IS_HEAP),
        lambda p: page_add_item_extended(p, b"x" * 30, offnum, PAI_OVERWRITE),
        lambda p: page_index_tuple_delete(p, offnum),
        lambda p: page_index_tuple_delete_no_compact(p, offnum),
        lambda p: page_index_tuple_overwrite(p, offnum, b"y" * 17),
        lambda p: page_index_multi_delete(p, [1, 2, offnum]),
        lambda p: page_get_item(p, offnum),
        lambda p: heap_mask(p, 3),
        lambda p: btree_mask(p, 3),
        mask_lp_flags,
        lambda p: seq_mask(p, 0),
    ]
    for op in ops:
        page = bytearray(base)
        try:
            op(page)
        except PageError:
            pass
        assert len(page) == BLCKSZ


# --- bufmask ----------------------------------------------------------------------------


def heap_tuple(
    xmin: int, infomask: int, cid: int, ctid: tuple[int, int], data: bytes, infomask2: int = 2
) -> bytes:
    blk, pos = ctid
    hdr = struct.pack("<IIIHHHHHB", xmin, 0, cid, blk >> 16, blk & 0xFFFF, pos, infomask2, infomask, 24)
    return hdr + b"\x00" + data


def test_generic_mask_helpers() -> None:
    page = garbage_page()
    page_add_item(page, b"q" * 12, 0, False, True)
    page_set_lsn(page, 0xABCDEF)
    page_set_checksum(page, 77)
    page_set_flags(page, PD_ALL_VISIBLE | PD_PAGE_FULL | PD_HAS_FREE_LINES | 0x8)
    page_set_prune_xid(page, 1234)
    mask_page_lsn_and_checksum(page)
    assert page[0:10] == bytes(10)
    mask_page_hint_bits(page)
    assert page_get_flags(page) == 0x8 and page_get_prune_xid(page) == 0
    mask_unused_space(page)
    assert page[28:8176] == bytes(8148)
    assert page[8176:8188] == b"q" * 12
    page_set_upper(page, 10)
    with pytest.raises(PageError):
        mask_unused_space(page)
    page = garbage_page()
    page_add_item(page, b"q" * 12, 0, False, True)
    item_id_mark_dead(page, 1)
    mask_lp_flags(page)
    assert linp_at(page, 1) == lp_bytes(8176, LP_UNUSED, 12)
    mask_page_content(page)
    assert page[12:16] == bytes(4) and page[24:] == bytes(BLCKSZ - 24)
    assert page_get_special(page) == 8192


def test_heap_mask() -> None:
    page = garbage_page()
    plain = heap_tuple(700, 0x0100 | 0x0800 | 0x0002, 5, (0, 1), b"abcdefghijk")  # 35 bytes
    frozen = heap_tuple(2, 0x0300 | 0x0400 | 0x0800 | 0x0002, 9, (0, 2), b"xyz")
    spec = heap_tuple(701, 0x0800, 3, (0x12345, 0xFFFE), b"spec")
    assert page_add_item(page, plain, 0, False, True) == 1
    assert page_add_item(page, frozen, 0, False, True) == 2
    assert page_add_item(page, spec, 0, False, True) == 3
    page_add_item(page, b"D" * 30, 0, False, True)
    item_id_mark_dead(page, 4)  # dead with storage: padding masked too
    page_add_item(page, b"", 0, False, True)
    item_id_set_redirect(page, 5, 1)
    page_set_lsn(page, 99)
    page_set_flags(page, PD_ALL_VISIBLE)
    before = bytes(page)
    heap_mask(page, 0x10002)

    def item(off: int) -> bytes:
        lp = page_get_item_id(page, off)
        return bytes(page[lp.lp_off : lp.lp_off + maxalign(lp.lp_len)])

    t1 = item(1)
    assert struct.unpack_from("<H", t1, 20)[0] == 0x0002  # all of HEAP_XACT_MASK gone
    assert struct.unpack_from("<I", t1, 8)[0] == 0  # t_cid
    assert t1[35:40] == bytes(5)  # padding
    assert t1[:8] == plain[:8] and t1[12:20] == plain[12:20] and t1[22:35] == plain[22:]
    t2 = item(2)
    assert struct.unpack_from("<H", t2, 20)[0] == 0x0302  # frozen: only xmax hints go
    t3 = item(3)
    assert struct.unpack_from("<HHH", t3, 12) == (0x1, 0x0002, 3)  # ctid = (blkno, off)
    assert struct.unpack_from("<H", t3, 20)[0] == 0
    t4 = item(4)
    assert t4 == b"D" * 30 + bytes(2)  # dead: not a tuple, only padding masked
    assert page[0:8] == bytes(8) and page_get_flags(page) == 0
    lower, upper = page_get_lower(page), page_get_upper(page)
    assert page[lower:upper] == bytes(upper - lower)
    assert page[24:lower] == before[24:lower]  # line pointers untouched


def test_btree_mask() -> None:
    page = garbage_page(16)
    page_add_item(page, b"k" * 16, 0, False, False)
    item_id_mark_dead(page, 1)
    special = page_get_special(page)
    # btpo_prev, btpo_next, btpo_level, btpo_flags, btpo_cycleid
    page[special : special + 16] = struct.pack("<IIIHH", 1, 2, 0, 0x1 | 0x20 | 0x40 | 0x80, 77)
    leaf = bytearray(page)
    btree_mask(leaf, 1)
    assert struct.unpack_from("<IIIHH", leaf, special) == (1, 2, 0, 0x81, 0)
    assert linp_at(leaf, 1) == lp_bytes(page_get_item_id(page, 1).lp_off, LP_UNUSED, 16)
    internal = bytearray(page)
    internal[special + 12 : special + 14] = struct.pack("<H", 0x2 | 0x40)
    btree_mask(internal, 1)
    assert struct.unpack_from("<HH", internal, special + 12) == (0x2, 0)
    assert page_get_item_id(internal, 1).lp_flags == LP_DEAD  # only leaves mask flags
    with pytest.raises(PageError):
        btree_mask(new_page(0), 1)


def test_seq_and_generic_mask() -> None:
    page = garbage_page(16)
    page_add_item(page, b"s" * 20, 0, False, False)
    page_set_lsn(page, 5)
    page_set_flags(page, PD_PAGE_FULL)
    for fn in (seq_mask, generic_mask):
        p = bytearray(page)
        fn(p, 0)
        assert p[0:10] == bytes(10)
        assert page_get_flags(p) == PD_PAGE_FULL  # hints are not masked here
        assert p[28:8152] == bytes(8124)
        assert p[8152:] == page[8152:]


def test_mask_for_rmgr() -> None:
    assert mask_for_rmgr(9) is heap_mask and mask_for_rmgr(10) is heap_mask
    assert mask_for_rmgr(11) is btree_mask
    assert mask_for_rmgr(15) is seq_mask and mask_for_rmgr(20) is generic_mask
    # Transaction (1) never touches relation pages, so Postgres has no mask for it.
    with pytest.raises(NoMaskError) as err:
        mask_for_rmgr(1)
    assert isinstance(err.value, KeyError)
    assert "1" in str(err.value)


# --- pages Postgres wrote -----------------------------------------------------------------
#
# VACUUM changes a heap page in two steps that redo replays with our functions:
# pruning (heap_page_prune_execute: set line pointers redirected / dead / unused,
# then PageRepairFragmentation) and the second heap pass (lazy_vacuum_heap_page:
# LP_DEAD -> LP_UNUSED, then PageTruncateLinePointerArray). On a btree leaf,
# _bt_delitems_vacuum overwrites posting lists that lost some TIDs
# (PageIndexTupleOverwrite) and deletes whole tuples (PageIndexMultiDelete).
# Each test takes raw pages (pageinspect) just before and just after VACUUM, reads
# off *which* line pointers changed and how, replays that on the "before" page
# with our functions, and requires the result to equal Postgres's page byte for
# byte -- free space included -- except for what is not bufpage.c's doing: pd_lsn,
# pd_checksum, the PD_ALL_VISIBLE / PD_PAGE_FULL flags and pd_prune_xid.

HEAP_ONLY_TUPLE = 0x8000
BTP_LEAF = 0x1
BTP_HAS_GARBAGE = 0x40
INDEX_ALT_TID_MASK = 0x2000
BT_IS_POSTING = 0x2000
BT_OFFSET_MASK = 0x0FFF

Tid = tuple[int, int]


def raw_page(pg: Any, rel: str, blkno: int) -> bytearray:
    return bytearray(pg.sql(f"SELECT get_raw_page('{rel}', {int(blkno)})")[0][0])


def nblocks(pg: Any, rel: str) -> int:
    return int(pg.sql(f"SELECT pg_relation_size('{rel}') / 8192")[0][0])


def parse_tid(text: str) -> Tid:
    blk, off = text.strip("()").split(",")
    return int(blk), int(off)


def diff_ranges(a: bytes, b: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(a):
        if a[i] != b[i]:
            j = i
            while j < len(a) and a[j] != b[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def assert_same_as_postgres(ours: bytearray, theirs: bytearray, what: str) -> None:
    ours = bytearray(ours)
    ours[0:10] = theirs[0:10]  # pd_lsn, pd_checksum
    hint_bits = PD_ALL_VISIBLE | PD_PAGE_FULL
    flags = (page_get_flags(ours) & ~hint_bits) | (page_get_flags(theirs) & hint_bits)
    page_set_flags(ours, flags)
    page_set_prune_xid(ours, page_get_prune_xid(theirs))
    assert ours == theirs, f"{what}: differs at {diff_ranges(ours, theirs)[:10]}"


def compaction_path(page: bytearray) -> str:
    """Which compactify_tuples path PageRepairFragmentation takes on this page."""
    offs = []
    for off in range(1, page_get_max_offset_number(page) + 1):
        lp = page_get_item_id(page, off)
        if lp.is_used and lp.has_storage:
            offs.append(lp.lp_off)
    if not offs:
        return "empty"
    if all(x > y for x, y in zip(offs, offs[1:])):
        return "presorted"
    if len(offs) < page_get_max_offset_number(page) // 4:
        return "unsorted-few"
    return "unsorted-many"


def replay_heap_vacuum(before: bytearray, after: bytearray, paths: list[str]) -> bytearray:
    page = bytearray(before)
    nafter = page_get_max_offset_number(after)
    redirect: list[tuple[int, int]] = []
    dead: list[int] = []
    unused: list[int] = []
    for off in range(1, page_get_max_offset_number(before) + 1):
        b = page_get_item_id(before, off)
        a = page_get_item_id(after, off) if off <= nafter else ItemIdData(0, LP_UNUSED, 0)
        if a.is_redirected and a != b:
            redirect.append((off, a.lp_off))
        elif b.is_used and not a.is_used and not b.is_dead:
            infomask2 = struct.unpack_from("<H", before, b.lp_off + 18)[0] if b.is_normal else 0
            if infomask2 & HEAP_ONLY_TUPLE:
                unused.append(off)  # dead heap-only tuple: pruned straight to unused
            else:
                dead.append(off)  # dead root or plain tuple: LP_DEAD, then unused
    if redirect or dead or unused:
        for off, target in redirect:
            item_id_set_redirect(page, off, target)
        for off in dead:
            item_id_set_dead(page, off)
        for off in unused:
            item_id_set_unused(page, off)
        paths.append(compaction_path(page))
        page_repair_fragmentation(page)
    lpdead = [
        off
        for off in range(1, page_get_max_offset_number(page) + 1)
        if page_get_item_id(page, off).is_dead
        and (off > nafter or not page_get_item_id(after, off).is_used)
    ]
    if lpdead:
        for off in lpdead:
            item_id_set_unused(page, off)
        page_truncate_line_pointer_array(page)
    return page


def index_tuple_tids(page: bytearray, off: int) -> list[Tid]:
    item = page_get_item(page, off)
    bi_hi, bi_lo, posid, t_info = struct.unpack_from("<HHHH", item, 0)
    if t_info & INDEX_ALT_TID_MASK and posid & BT_IS_POSTING:
        start, n = (bi_hi << 16) | bi_lo, posid & BT_OFFSET_MASK
        return [
            (h << 16 | lo, p)
            for h, lo, p in struct.iter_unpack("<HHH", bytes(item[start : start + 6 * n]))
        ]
    return [((bi_hi << 16) | bi_lo, posid)]


def replay_btree_vacuum(
    before: bytearray, after: bytearray, dead: set[Tid], paths: list[str]
) -> bytearray:
    page = bytearray(before)
    special = page_get_special(page)
    _, btpo_next, _, btpo_flags, _ = struct.unpack_from("<IIIHH", page, special)
    if not btpo_flags & BTP_LEAF:
        return page  # VACUUM removes tuples from leaf pages only
    first = 1 if btpo_next == 0 else 2  # P_FIRSTDATAKEY: skip the high key
    nline = page_get_max_offset_number(page)
    deletable: list[int] = []
    updatable: list[int] = []
    for off in range(first, nline + 1):
        tids = index_tuple_tids(page, off)
        ndead = sum(t in dead for t in tids)
        if ndead == len(tids):
            deletable.append(off)
        elif ndead:
            updatable.append(off)
    if not deletable and not updatable:
        return page
    survivors = [off for off in range(1, nline + 1) if off not in deletable]
    assert len(survivors) == page_get_max_offset_number(after)
    for off in updatable:
        # the shrunken posting tuple's bytes come from Postgres; where it goes is ours
        newtup = bytes(page_get_item(after, survivors.index(off) + 1))
        assert page_index_tuple_overwrite(page, off, newtup)
    if len(deletable) > 2:
        kept = [page_get_item_id(page, off).lp_off for off in survivors]
        presorted = all(x > y for x, y in zip(kept, kept[1:]))
        paths.append("presorted" if presorted else "unsorted-many")
    elif deletable:
        paths.append("retail")
    if updatable:
        paths.append("overwrite")
    page_index_multi_delete(page, deletable)
    # _bt_delitems_vacuum also resets btpo_cycleid and BTP_HAS_GARBAGE
    struct.pack_into("<HH", page, special + 12, btpo_flags & ~BTP_HAS_GARBAGE, 0)
    return page


def vacuum_and_compare(
    pg: Any, table: str, index: str | None = None, dead: set[Tid] | None = None
) -> tuple[list[str], list[str]]:
    """VACUUM table; replay every heap (and index leaf) page; return the paths taken."""
    pg.sql(f"SELECT count(*) FROM {table}")  # settle hint bits before the snapshot
    heap_before = [raw_page(pg, table, b) for b in range(nblocks(pg, table))]
    index_before = [raw_page(pg, index, b) for b in range(nblocks(pg, index))] if index else []
    pg.execute(f"VACUUM (INDEX_CLEANUP ON) {table}")
    heap_paths: list[str] = []
    for blkno, before in enumerate(heap_before):
        after = raw_page(pg, table, blkno)
        ours = replay_heap_vacuum(before, after, heap_paths)
        assert_same_as_postgres(ours, after, f"{table} block {blkno}")
    index_paths: list[str] = []
    if index:
        for blkno, before in enumerate(index_before):
            if blkno == 0:
                continue  # metapage
            after = raw_page(pg, index, blkno)
            ours = replay_btree_vacuum(before, after, dead or set(), index_paths)
            assert_same_as_postgres(ours, after, f"{index} block {blkno}")
    return heap_paths, index_paths


@pytest.fixture
def pgi(pg: Any) -> Any:
    pg.execute("CREATE EXTENSION pageinspect")
    return pg


def test_postgres_heap_prune_presorted(pgi: Any) -> None:
    pgi.execute(
        "CREATE TABLE t (id int, pad text) WITH (autovacuum_enabled = off);"
        "INSERT INTO t SELECT g, repeat('x', g % 37) FROM generate_series(1, 60) g;"
        "DELETE FROM t WHERE id % 3 = 0 OR id > 55;"
    )
    heap_paths, _ = vacuum_and_compare(pgi, "t")
    assert heap_paths == ["presorted"]
    after = raw_page(pgi, "t", 0)
    assert page_get_max_offset_number(after) == 55  # trailing line pointers truncated
    assert page_get_flags(after) & PD_HAS_FREE_LINES


def test_postgres_heap_hot_chains_and_unsorted(pgi: Any) -> None:
    pgi.execute(
        "CREATE TABLE t (id int, pad text) WITH (autovacuum_enabled = off);"
        "INSERT INTO t SELECT g, repeat('y', g % 29) FROM generate_series(1, 60) g;"
        "UPDATE t SET pad = pad || 'z' WHERE id % 4 = 0;"
        "UPDATE t SET pad = pad || 'zz' WHERE id % 8 = 0;"
        "DELETE FROM t WHERE id % 5 = 0;"
    )
    heap_paths, _ = vacuum_and_compare(pgi, "t")
    after = raw_page(pgi, "t", 0)
    flags = {page_get_item_id(after, o).lp_flags for o in range(1, page_get_max_offset_number(after) + 1)}
    assert LP_REDIRECT in flags  # HOT chains were pruned to redirects
    # new rows reuse freed line pointers at the lowest tuple offsets: not presorted
    pgi.execute(
        "INSERT INTO t SELECT g, repeat('w', g % 23) FROM generate_series(101, 125) g;"
        "DELETE FROM t WHERE id % 7 = 1;"
    )
    heap_paths2, _ = vacuum_and_compare(pgi, "t")
    assert heap_paths2 == ["unsorted-many"]


def test_postgres_heap_unsorted_few_survivors(pgi: Any) -> None:
    pgi.execute(
        "CREATE TABLE t (id int, pad text) WITH (autovacuum_enabled = off);"
        "INSERT INTO t SELECT g, repeat('v', g % 31) FROM generate_series(1, 100) g;"
        "DELETE FROM t WHERE id % 10 IN (1, 2, 3);"
    )
    assert vacuum_and_compare(pgi, "t")[0] == ["presorted"]
    pgi.execute(
        "INSERT INTO t SELECT g, repeat('u', g % 13) FROM generate_series(101, 130) g;"
        "DELETE FROM t WHERE id <= 100 AND id < 95 OR id > 110;"
    )
    assert vacuum_and_compare(pgi, "t")[0] == ["unsorted-few"]


def _dead_tids(pg: Any, table: str, where: str) -> set[Tid]:
    return {parse_tid(r[0]) for r in pg.sql(f"SELECT ctid::text FROM {table} WHERE {where}")}


def test_postgres_btree_multi_delete_presorted(pgi: Any) -> None:
    pgi.execute(
        "CREATE TABLE b (id int, v int) WITH (autovacuum_enabled = off);"
        "CREATE INDEX b_idx ON b (id);"
        "INSERT INTO b SELECT g, g FROM generate_series(1, 1000) g;"
    )
    where = "id % 4 = 0 OR id BETWEEN 300 AND 340"
    dead = _dead_tids(pgi, "b", where)
    pgi.execute(f"DELETE FROM b WHERE {where}")
    heap_paths, index_paths = vacuum_and_compare(pgi, "b", "b_idx", dead)
    assert index_paths and set(index_paths) == {"presorted"}
    assert heap_paths and set(heap_paths) == {"presorted"}


def test_postgres_btree_multi_delete_unsorted_and_retail(pgi: Any) -> None:
    # keys inserted in a scrambled order: storage order differs from key order
    pgi.execute(
        "CREATE TABLE b (id int, v int) WITH (autovacuum_enabled = off);"
        "CREATE INDEX b_idx ON b (id);"
        "INSERT INTO b SELECT (g * 37) % 401, g FROM generate_series(1, 400) g;"
    )
    where = "id % 3 = 0"
    dead = _dead_tids(pgi, "b", where)
    pgi.execute(f"DELETE FROM b WHERE {where}")
    _, index_paths = vacuum_and_compare(pgi, "b", "b_idx", dead)
    assert "unsorted-many" in index_paths
    # one or two index tuples per page: PageIndexTupleDelete
    where = "id IN (1, 2, 399)"
    dead = _dead_tids(pgi, "b", where)
    pgi.execute(f"DELETE FROM b WHERE {where}")
    _, index_paths = vacuum_and_compare(pgi, "b", "b_idx", dead)
    assert index_paths and set(index_paths) == {"retail"}


def test_postgres_btree_posting_lists(pgi: Any) -> None:
    # duplicates get deduplicated into posting lists; VACUUM shrinks them in place
    pgi.execute(
        "CREATE TABLE b (id int, k int) WITH (autovacuum_enabled = off);"
        "CREATE INDEX b_idx ON b (k);"
        "INSERT INTO b SELECT g, CASE WHEN g <= 1500 THEN g % 7 ELSE g END"
        "  FROM generate_series(1, 1700) g;"
    )
    where = "id % 5 = 0 OR id BETWEEN 1550 AND 1580"
    dead = _dead_tids(pgi, "b", where)
    pgi.execute(f"DELETE FROM b WHERE {where}")
    _, index_paths = vacuum_and_compare(pgi, "b", "b_idx", dead)
    assert "overwrite" in index_paths


def test_postgres_pages_under_masks(pgi: Any) -> None:
    """Masks are idempotent on real pages and leave two reads of one page equal."""
    pgi.execute(
        "CREATE TABLE t (id int primary key, pad text) WITH (autovacuum_enabled = off);"
        "INSERT INTO t SELECT g, repeat('m', g % 11) FROM generate_series(1, 50) g;"
        "CREATE SEQUENCE s; SELECT nextval('s');"
    )
    for rel, blk, fn in (("t", 0, heap_mask), ("t_pkey", 1, btree_mask), ("s", 0, seq_mask)):
        page = raw_page(pgi, rel, blk)
        once = bytearray(page)
        fn(once, blk)
        twice = bytearray(once)
        fn(twice, blk)
        assert once == twice
        lower, upper = page_get_lower(once), page_get_upper(once)
        assert once[lower:upper] == bytes(upper - lower) and once[0:10] == bytes(10)


def test_postgres_unlogged_hints_are_masked(pgi: Any) -> None:
    """Hint bits Postgres sets without WAL vanish under heap_mask / btree_mask."""
    pgi.execute(
        "CREATE TABLE t (id int primary key, pad text) WITH (autovacuum_enabled = off);"
        "INSERT INTO t SELECT g, repeat('h', g % 13) FROM generate_series(1, 120) g;"
        "DELETE FROM t WHERE id % 6 = 0;"
    )
    heap0, idx0 = raw_page(pgi, "t", 0), raw_page(pgi, "t_pkey", 1)
    # a seq scan sets t_infomask hint bits; an index scan sets LP_DEAD on leaf items
    pgi.execute(
        "SELECT count(*) FROM t;"
        "SET enable_seqscan = off; SET enable_bitmapscan = off;"
        "SELECT count(*) FROM t WHERE id BETWEEN 1 AND 120;"
    )
    heap1, idx1 = raw_page(pgi, "t", 0), raw_page(pgi, "t_pkey", 1)
    assert heap0 != heap1 and idx0 != idx1
    dead_before = sum(page_get_item_id(idx0, o).is_dead for o in range(1, 121))
    dead_after = sum(page_get_item_id(idx1, o).is_dead for o in range(1, 121))
    assert dead_before == 0 and dead_after == 20
    for page in (heap0, heap1):
        heap_mask(page, 0)
    for page in (idx0, idx1):
        btree_mask(page, 1)
    assert heap0 == heap1
    assert idx0 == idx1
