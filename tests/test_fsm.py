"""The free space map: address arithmetic, page operations, and what a heap truncation does to it.

Oracles: the depth-first page order freespace.c's README describes, walked
here independently of fsm_logical_to_physical; and a real Postgres primary's
FSM pages before and after a VACUUM that truncates the heap.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest
from conftest import PgFactory
from pageserver_util import FSM_TABLE_KEEP, create_fsm_table, raw_fsm_pages, truncate_fsm_table

from pgformat.constants import BLCKSZ, FSM_FORKNUM, MAIN_FORKNUM, VISIBILITYMAP_FORKNUM
from pgformat.fsm import (
    FSM_ROOT_ADDRESS,
    FSM_TREE_DEPTH,
    NODES_PER_PAGE,
    NON_LEAF_NODES_PER_PAGE,
    SLOTS_PER_FSM_PAGE,
    FSMAddress,
    FsmError,
    fsm_blocks_after_truncate,
    fsm_get_avail,
    fsm_get_child,
    fsm_get_heap_blk,
    fsm_get_location,
    fsm_get_max_avail,
    fsm_get_next_slot,
    fsm_get_parent,
    fsm_logical_to_physical,
    fsm_nodes,
    fsm_rebuild_page,
    fsm_set_avail,
    fsm_set_next_slot,
    fsm_slots,
    fsm_truncate_avail,
)
from pgformat.page import page_get_lsn, page_set_lsn
from pgformat.rmgr import RM_SMGR_ID, XLOG_SMGR_TRUNCATE
from pgformat.xlogrecord import DecodedRecord, RelFileNode, XLogRecordHeader
from pgredo.engine import BufferTag, implied_tags, redo_page
from pgredo.errors import RedoFailedError
from pgredo.storage import SMGR_TRUNCATE_FSM, SMGR_TRUNCATE_VM, fsm_truncate_page, fsm_truncation_path

S = SLOTS_PER_FSM_PAGE


def test_page_geometry_is_postgres_15s() -> None:
    # fsm_internals.h with BLCKSZ 8192: NodesPerPage = 8192 - 24 - 4, NonLeafNodesPerPage = 4095.
    assert (NODES_PER_PAGE, NON_LEAF_NODES_PER_PAGE, SLOTS_PER_FSM_PAGE) == (8164, 4095, 4069)
    assert FSM_TREE_DEPTH == 3  # 4069 >= 1626: three levels address 2^32 - 1 heap blocks


# (heap block, bottom-level page, slot, FSM block of that page), worked out by hand from
# freespace.c: block 0 is the root, 1 the first level-1 page, 2.. its 4069 leaves, then the
# next level-1 page (4071) and its leaves from 4072 on.
KNOWN = [
    (0, 0, 0, 2),
    (4000, 0, 4000, 2),
    (4068, 0, 4068, 2),
    (4069, 1, 0, 3),
    (4100, 1, 31, 3),
    (S * S - 1, S - 1, S - 1, 4070),  # last leaf under level-1 page 0
    (S * S, S, 0, 4072),  # first leaf under level-1 page 1 (at 4071)
    (16 * 1024 * 1024, 4123, 729, 4126),  # 16M = 4123 * 4069 + 729; 4072 + (4123 - 4069)
]


@pytest.mark.parametrize(("heapblk", "logpageno", "slot", "physical"), KNOWN)
def test_heap_block_to_fsm_page_and_slot(heapblk: int, logpageno: int, slot: int, physical: int) -> None:
    addr, got_slot = fsm_get_location(heapblk)
    assert (addr, got_slot) == (FSMAddress(0, logpageno), slot)
    assert fsm_logical_to_physical(addr) == physical
    assert fsm_get_heap_blk(addr, got_slot) == heapblk
    parent, pslot = fsm_get_parent(addr)
    assert parent == FSMAddress(1, logpageno // S) and pslot == logpageno % S
    assert fsm_get_child(parent, pslot) == addr


def test_upper_pages_and_truncated_sizes() -> None:
    assert fsm_logical_to_physical(FSM_ROOT_ADDRESS) == 0
    assert fsm_logical_to_physical(FSMAddress(1, 0)) == 1
    assert fsm_logical_to_physical(FSMAddress(1, 1)) == 4071
    assert fsm_logical_to_physical(FSMAddress(1, 2)) == 4071 + 1 + S
    # FreeSpaceMapPrepareTruncateRel: a cut inside a bottom-level page keeps it, a cut at
    # its first slot drops it (and the upper pages before it stay).
    assert [fsm_blocks_after_truncate(n) for n in (0, 1, 4068, 4069, 4070, S * S, S * S + 1)] == [
        2, 3, 3, 3, 4, 4072, 4073]
    with pytest.raises(FsmError):
        fsm_get_parent(FSM_ROOT_ADDRESS)
    with pytest.raises(FsmError):
        fsm_get_heap_blk(FSMAddress(1, 0), 0)


def _depth_first(level: int, logpageno: int) -> Iterator[FSMAddress]:
    """The FSM fork's pages in file order: a page, then each child's subtree (freespace/README)."""
    yield FSMAddress(level, logpageno)
    if level > 0:
        for slot in range(S):
            yield from _depth_first(level - 1, logpageno * S + slot)


def test_physical_order_is_depth_first() -> None:
    walk = _depth_first(FSM_TREE_DEPTH - 1, 0)
    for blkno in range(3 * (S + 1) + 2):  # the root and the first three level-1 subtrees
        assert fsm_logical_to_physical(next(walk)) == blkno


def _random_page(rng: random.Random, used_slots: int) -> bytearray:
    page = bytearray(BLCKSZ)
    for slot in range(used_slots):
        fsm_set_avail(page, slot, rng.randrange(256))
    return page


def test_set_avail_keeps_the_tree_a_max_heap() -> None:
    rng = random.Random(4)
    page = _random_page(rng, S)
    rebuilt = bytearray(page)
    assert not fsm_rebuild_page(rebuilt)  # propagation already left every inner node right
    assert fsm_get_max_avail(page) == max(fsm_slots(page))
    assert not fsm_set_avail(page, 7, fsm_get_avail(page, 7))
    assert fsm_set_avail(page, 7, 255) and fsm_get_max_avail(page) == 255


def test_truncate_avail_clears_the_tail_and_rebuilds() -> None:
    rng = random.Random(5)
    page = _random_page(rng, 3000)
    fsm_set_next_slot(page, 2999)
    before = bytes(page)
    assert fsm_truncate_avail(page, 1000)
    slots = fsm_slots(page)
    assert slots[:1000] == fsm_slots(before)[:1000] and not any(slots[1000:])
    assert fsm_get_max_avail(page) == max(slots[:1000])
    assert not fsm_rebuild_page(bytearray(page))
    assert fsm_get_next_slot(page) == 2999  # fsm_truncate_avail leaves it; the vacuum pass resets it
    assert not fsm_truncate_avail(page, 1000)  # nothing left to clear: no change, no rebuild
    new = bytearray(BLCKSZ)
    assert not fsm_truncate_page(new, 0, 5) and not any(new)  # a never-written page stays new


def test_truncation_path() -> None:
    # Inside a bottom-level page: that page from the cut, its parent from the next slot,
    # the root from the next level-1 page.
    assert fsm_truncation_path(4100) == [(FSMAddress(0, 1), 31), (FSMAddress(1, 0), 2), (FSMAddress(2, 0), 1)]
    # At a bottom-level page's first slot: the page goes, its parent's slot for it is cleared.
    assert fsm_truncation_path(4069) == [(FSMAddress(1, 0), 1), (FSMAddress(2, 0), 1)]
    # At a level-1 subtree's first block: that whole subtree is cleared in the root too.
    assert fsm_truncation_path(S * S) == [(FSMAddress(1, 1), 0), (FSMAddress(2, 0), 1)]
    assert fsm_truncation_path(0) == [(FSMAddress(1, 0), 0), (FSMAddress(2, 0), 0)]


RNODE = RelFileNode(1663, 5, 16384)
SMGR_TRUNCATE_ALL = 0x0007  # what VACUUM's RelationTruncate logs: heap, VM and FSM


def _truncate_record(nblocks: int, flags: int = SMGR_TRUNCATE_ALL) -> DecodedRecord:
    main = struct.pack("<IIIIi", nblocks, *RNODE, flags)  # xl_smgr_truncate
    return DecodedRecord(0x2000000, 0x2000038, XLogRecordHeader(0, 0, 0, XLOG_SMGR_TRUNCATE, RM_SMGR_ID, 0), [], main)


def test_truncate_record_implies_the_map_pages() -> None:
    rec = _truncate_record(4100)
    fsm = [BufferTag(RNODE, FSM_FORKNUM, blk) for blk in (0, 1, 3)]  # root, level-1 page, leaf 1
    assert implied_tags(rec) == [*fsm, BufferTag(RNODE, VISIBILITYMAP_FORKNUM, 0)]
    assert implied_tags(_truncate_record(4100, SMGR_TRUNCATE_VM)) == [BufferTag(RNODE, VISIBILITYMAP_FORKNUM, 0)]
    assert implied_tags(_truncate_record(4100, SMGR_TRUNCATE_FSM)) == fsm
    assert implied_tags(_truncate_record(4069, SMGR_TRUNCATE_FSM)) == fsm[:2]  # leaf 1 goes whole

    leaf = _random_page(random.Random(6), S)
    fsm_set_next_slot(leaf, 17)
    page_set_lsn(leaf, 0x1000000)
    out = redo_page(fsm[2], bytes(leaf), [rec])
    assert fsm_slots(out)[:31] == fsm_slots(leaf)[:31] and not any(fsm_slots(out)[31:])
    assert not fsm_rebuild_page(bytearray(out)) and fsm_get_next_slot(out) == 0
    assert page_get_lsn(out) == 0x1000000  # FreeSpaceMapPrepareTruncateRel sets no LSN
    parent = redo_page(fsm[1], bytes(leaf), [rec])
    assert fsm_slots(parent)[:2] == fsm_slots(leaf)[:2] and not any(fsm_slots(parent)[2:])

    # A map page the page server never had: Postgres reads zeroes, and so do we.
    assert redo_page(fsm[2], None, [rec]) == bytearray(BLCKSZ)
    # A page the record does not change, with no base: still an error, never a made-up page.
    with pytest.raises(RedoFailedError):
        redo_page(BufferTag(RNODE, MAIN_FORKNUM, 0), None, [rec])
    with pytest.raises(RedoFailedError):
        redo_page(BufferTag(RNODE, FSM_FORKNUM, 2), None, [rec])


@pytest.fixture
def primary(pg_factory: PgFactory):  # type: ignore[no-untyped-def]
    node = pg_factory(autovacuum="off")
    node.execute("CREATE EXTENSION pageinspect")
    return node


def test_truncation_matches_the_primarys_fsm(primary) -> None:  # type: ignore[no-untyped-def]
    """Our truncation of the primary's FSM pages equals what the primary's own truncation wrote.

    Why the primary is the oracle: VACUUM's heap truncation, RelationTruncate in
    catalog/storage.c, runs FreeSpaceMapPrepareTruncateRel and then
    FreeSpaceMapVacuumRange(rel, new size, InvalidBlockNumber) -- the very calls
    smgr_redo makes when a standby replays the XLOG_SMGR_TRUNCATE it logs. The
    only other FSM writes of that VACUUM are RecordPageWithFreeSpace for the heap
    pages it scans; the kept pages are all-visible and untouched since the first
    VACUUM, so it skips them, which the test checks (kept slots unchanged). A
    vanilla standby is a weaker oracle here: its heap redo records free space on
    its own (XLogRecordPageWithFreeSpace), so its FSM differs from the page
    server's input before the truncation.
    """
    create_fsm_table(primary, "big")
    before = raw_fsm_pages(primary, "big")
    assert len(before) == 4  # root, level-1 page, two bottom-level pages
    truncate_fsm_table(primary, "big")
    after = raw_fsm_pages(primary, "big")
    assert len(after) == fsm_blocks_after_truncate(FSM_TABLE_KEEP) == 3

    leaf_before = fsm_slots(before[2])
    assert any(leaf_before[FSM_TABLE_KEEP:4200]), "the slots to clear must hold something"
    assert fsm_slots(after[2])[:FSM_TABLE_KEEP] == leaf_before[:FSM_TABLE_KEEP], "VACUUM rewrote kept slots"

    ours = {blk: bytearray(page) for blk, page in enumerate(before[:3])}
    path = fsm_truncation_path(FSM_TABLE_KEEP)
    assert [fsm_logical_to_physical(a) for a, _ in path] == [2, 1, 0]
    for addr, first in path:
        fsm_truncate_page(ours[fsm_logical_to_physical(addr)], addr.level, first)

    # Bottom level: every slot and every inner node, and fp_next_slot.
    assert not any(fsm_slots(ours[2])[FSM_TABLE_KEEP:])
    assert fsm_nodes(ours[2]) == fsm_nodes(after[2])
    assert fsm_get_next_slot(ours[2]) == fsm_get_next_slot(after[2]) == 0
    # Upper levels: we clear the slots of removed children (here slot 1 of the level-1 page).
    # The slot of the partly kept child keeps its old value where Postgres stores the child's
    # new maximum; every kept heap page has the same free space, so the two agree here.
    assert fsm_get_avail(before[1], 1) > 0 and fsm_get_avail(ours[1], 1) == 0
    assert fsm_get_max_avail(after[2]) == fsm_get_avail(before[1], 0)
    for blk in (0, 1):
        assert fsm_nodes(ours[blk]) == fsm_nodes(after[blk]), blk
