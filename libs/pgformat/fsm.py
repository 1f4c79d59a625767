"""The free space map: its page layout and how heap blocks map to FSM pages (PostgreSQL 15).

Layout from src/include/storage/fsm_internals.h and
src/backend/storage/freespace/fsmpage.c: after the MAXALIGNed page header an
FSM page holds ``int fp_next_slot`` and then ``fp_nodes``, a binary tree of
one-byte free-space categories stored as an array. The first
NON_LEAF_NODES_PER_PAGE nodes are inner nodes (each the max of its two
children: ``leftchild(x) = 2x + 1``), the remaining SLOTS_PER_FSM_PAGE nodes
are the leaves, one per heap block (on a bottom-level page) or per child FSM
page (on an upper-level page).

Addressing from src/backend/storage/freespace/freespace.c: the map is a tree
of FSM_TREE_DEPTH levels of pages. Each level is a logically separate array of
pages (an `FSMAddress` is (level, page number within the level)); on disk the
pages are laid out depth first -- root, first level-1 page, its leaves, next
level-1 page, ... -- which `fsm_logical_to_physical` computes.

The FSM is not WAL-logged. These are pure functions over a ``bytearray`` page
changed in place, for the redo of the records whose replay changes it anyway
(a heap truncation, smgr_redo in src/backend/catalog/storage.c).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .constants import BLCKSZ, maxalign
from .errors import FormatError

# fsm_internals.h: NodesPerPage, NonLeafNodesPerPage, LeafNodesPerPage (= SlotsPerFSMPage).
FSM_CONTENTS_OFFSET: Final = maxalign(24)  # PageGetContents: after MAXALIGN(SizeOfPageHeaderData)
_NEXT_SLOT = struct.Struct("<i")  # FSMPageData.fp_next_slot
FSM_NODES_OFFSET: Final = FSM_CONTENTS_OFFSET + _NEXT_SLOT.size  # offsetof(FSMPageData, fp_nodes)
NODES_PER_PAGE: Final = BLCKSZ - FSM_NODES_OFFSET
NON_LEAF_NODES_PER_PAGE: Final = BLCKSZ // 2 - 1
SLOTS_PER_FSM_PAGE: Final = NODES_PER_PAGE - NON_LEAF_NODES_PER_PAGE

# freespace.c: the smallest depth with SlotsPerFSMPage ** depth >= 2^32 - 1 blocks.
FSM_TREE_DEPTH: Final = 3 if SLOTS_PER_FSM_PAGE >= 1626 else 4
FSM_ROOT_LEVEL: Final = FSM_TREE_DEPTH - 1
FSM_BOTTOM_LEVEL: Final = 0

_FIRST_LEAF: Final = FSM_NODES_OFFSET + NON_LEAF_NODES_PER_PAGE  # byte offset of slot 0


class FsmError(FormatError):
    """An FSM address or slot outside what the map can hold."""


@dataclass(frozen=True, slots=True)
class FSMAddress:
    """A page of the map by level (0 = bottom, heap blocks) and number within that level."""

    level: int
    logpageno: int


FSM_ROOT_ADDRESS: Final = FSMAddress(FSM_ROOT_LEVEL, 0)


# -- addressing (freespace.c) ------------------------------------------------------------


def fsm_get_location(heapblk: int) -> tuple[FSMAddress, int]:
    """The bottom-level page and slot that hold heap block `heapblk`."""
    logpageno, slot = divmod(heapblk, SLOTS_PER_FSM_PAGE)
    return FSMAddress(FSM_BOTTOM_LEVEL, logpageno), slot


def fsm_get_heap_blk(addr: FSMAddress, slot: int) -> int:
    """The heap block of `slot` on the bottom-level page `addr`."""
    if addr.level != FSM_BOTTOM_LEVEL:
        raise FsmError(f"heap blocks live on bottom-level FSM pages, not level {addr.level}")
    return addr.logpageno * SLOTS_PER_FSM_PAGE + slot


def fsm_get_parent(child: FSMAddress) -> tuple[FSMAddress, int]:
    """The page one level up that points to `child`, and the slot it uses for it."""
    if child.level >= FSM_ROOT_LEVEL:
        raise FsmError("the FSM root has no parent")
    logpageno, slot = divmod(child.logpageno, SLOTS_PER_FSM_PAGE)
    return FSMAddress(child.level + 1, logpageno), slot


def fsm_get_child(parent: FSMAddress, slot: int) -> FSMAddress:
    if parent.level <= FSM_BOTTOM_LEVEL:
        raise FsmError("bottom-level FSM pages have no children")
    return FSMAddress(parent.level - 1, parent.logpageno * SLOTS_PER_FSM_PAGE + slot)


def fsm_logical_to_physical(addr: FSMAddress) -> int:
    """The block number of `addr` in the FSM fork.

    A page is preceded by every page of the levels above it that leads to its
    subtree, and by every page of earlier subtrees. Count the pages up to and
    including the first leaf below `addr` at each level, then drop the leaves
    below `addr` itself (one per level under it) to land on `addr`.
    """
    first_leaf = addr.logpageno * SLOTS_PER_FSM_PAGE**addr.level
    pages = 0
    below = first_leaf
    for _ in range(FSM_TREE_DEPTH):
        pages += below + 1
        below //= SLOTS_PER_FSM_PAGE
    return pages - addr.level - 1


def fsm_blocks_after_truncate(heap_nblocks: int) -> int:
    """FSM blocks kept when the heap is cut to `heap_nblocks` (FreeSpaceMapPrepareTruncateRel).

    The bottom-level page holding the first removed heap block stays when that
    block is not its first slot (its tail is cleared instead); otherwise it
    goes too. Callers keep the fork as it is when it is already that short.
    """
    first_removed, slot = fsm_get_location(heap_nblocks)
    physical = fsm_logical_to_physical(first_removed)
    return physical + 1 if slot > 0 else physical


# -- one page (fsmpage.c) ----------------------------------------------------------------


def _check_slot(slot: int) -> None:
    if not 0 <= slot < SLOTS_PER_FSM_PAGE:
        raise FsmError(f"FSM slot {slot} outside 0..{SLOTS_PER_FSM_PAGE - 1}")


def fsm_get_avail(page: bytearray | bytes, slot: int) -> int:
    """The category stored for `slot`."""
    _check_slot(slot)
    return page[_FIRST_LEAF + slot]


def fsm_get_max_avail(page: bytearray | bytes) -> int:
    """The root node: the highest category on the page."""
    return page[FSM_NODES_OFFSET]


def fsm_get_next_slot(page: bytearray | bytes) -> int:
    return int(_NEXT_SLOT.unpack_from(page, FSM_CONTENTS_OFFSET)[0])


def fsm_set_next_slot(page: bytearray, slot: int) -> None:
    _NEXT_SLOT.pack_into(page, FSM_CONTENTS_OFFSET, slot)


def fsm_nodes(page: bytearray | bytes) -> bytes:
    """All NODES_PER_PAGE tree nodes, inner nodes first."""
    return bytes(page[FSM_NODES_OFFSET:BLCKSZ])


def fsm_slots(page: bytearray | bytes) -> bytes:
    """The SLOTS_PER_FSM_PAGE leaf nodes."""
    return bytes(page[_FIRST_LEAF:BLCKSZ])


def fsm_set_avail(page: bytearray, slot: int, value: int) -> bool:
    """Set `slot` to `value` and fix the inner nodes above it; False if nothing changed.

    Propagates up until a node already holds the right value, and rebuilds the
    whole tree when the new value exceeds the root (a corrupt tree), as
    fsm_set_avail does.
    """
    _check_slot(slot)
    nodeno = NON_LEAF_NODES_PER_PAGE + slot
    base = FSM_NODES_OFFSET
    if page[base + nodeno] == value and value <= page[base]:
        return False
    page[base + nodeno] = value
    while nodeno > 0:
        nodeno = (nodeno - 1) // 2
        lchild = 2 * nodeno + 1
        newvalue = page[base + lchild]
        if lchild + 1 < NODES_PER_PAGE:
            newvalue = max(newvalue, page[base + lchild + 1])
        if page[base + nodeno] == newvalue:
            break
        page[base + nodeno] = newvalue
    if value > page[base]:
        fsm_rebuild_page(page)
    return True


def fsm_rebuild_page(page: bytearray) -> bool:
    """Recompute every inner node from its children, bottom up; True if any changed."""
    base = FSM_NODES_OFFSET
    changed = False
    for nodeno in range(NON_LEAF_NODES_PER_PAGE - 1, -1, -1):
        lchild = 2 * nodeno + 1
        # The last inner nodes may have one child or none: NODES_PER_PAGE is not a power of two.
        newvalue = page[base + lchild] if lchild < NODES_PER_PAGE else 0
        if lchild + 1 < NODES_PER_PAGE:
            newvalue = max(newvalue, page[base + lchild + 1])
        if page[base + nodeno] != newvalue:
            page[base + nodeno] = newvalue
            changed = True
    return changed


def fsm_truncate_avail(page: bytearray, nslots: int) -> bool:
    """Zero every slot from `nslots` on and, if any was set, rebuild the tree; True if changed."""
    _check_slot(nslots)
    start = _FIRST_LEAF + nslots
    if not any(page[start:BLCKSZ]):
        return False
    page[start:BLCKSZ] = bytes(BLCKSZ - start)
    fsm_rebuild_page(page)
    return True
