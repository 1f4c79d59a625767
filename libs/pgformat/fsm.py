"""Free space map pages and addresses (src/backend/storage/freespace/{freespace,fsmpage}.c).

An FSM fork is a tree of pages, FSM_TREE_DEPTH levels deep, stored depth-first;
each page holds a binary max-tree of one-byte free-space categories: the first
NON_LEAF_NODES bytes of fp_nodes are inner nodes, then one leaf ("slot") per
heap block (bottom level) or child page. FSM pages are not WAL-logged.
"""

from __future__ import annotations

from typing import Final

from .constants import BLCKSZ

_CONTENTS: Final = 24  # MAXALIGN(SizeOfPageHeaderData): FSMPageData starts here
_NODES: Final = _CONTENTS + 4  # after int fp_next_slot: uint8 fp_nodes[]
NODES_PER_PAGE: Final = BLCKSZ - _CONTENTS - 4
NON_LEAF_NODES_PER_PAGE: Final = BLCKSZ // 2 - 1
SLOTS_PER_PAGE: Final = NODES_PER_PAGE - NON_LEAF_NODES_PER_PAGE  # 4069 with 8 KB pages
TREE_DEPTH: Final = 3 if SLOTS_PER_PAGE >= 1626 else 4


def logical_to_physical(logpageno: int, level: int = 0) -> int:
    """fsm_logical_to_physical: the block of the FSM page at (level, logical page number)."""
    leafno = logpageno * SLOTS_PER_PAGE ** level
    pages = 0
    for _ in range(TREE_DEPTH):
        pages += leafno + 1
        leafno //= SLOTS_PER_PAGE
    return pages - level - 1


def heap_block_location(heap_blkno: int) -> tuple[int, int]:
    """fsm_get_location: (bottom-level logical page, slot) of a heap block."""
    return divmod(heap_blkno, SLOTS_PER_PAGE)


def blocks_after_truncate(heap_nblocks: int) -> int:
    """FreeSpaceMapPrepareTruncateRel: FSM blocks kept when the heap shrinks to heap_nblocks."""
    logpageno, slot = heap_block_location(heap_nblocks)
    physical = logical_to_physical(logpageno)
    return physical + 1 if slot else physical


def truncate_avail(page: bytearray, nslots: int) -> bool:
    """fsm_truncate_avail: zero every leaf from `nslots` on, then fix the inner nodes."""
    if not 0 <= nslots < SLOTS_PER_PAGE:
        raise ValueError(f"slot {nslots} out of range")
    start = _NODES + NON_LEAF_NODES_PER_PAGE + nslots
    end = _NODES + NODES_PER_PAGE
    if not any(page[start:end]):
        return False
    page[start:end] = bytes(end - start)
    rebuild_page(page)
    return True


def rebuild_page(page: bytearray) -> bool:
    """fsm_rebuild_page: every inner node becomes the max of its children, bottom up."""
    nodes = memoryview(page)[_NODES:_NODES + NODES_PER_PAGE]
    changed = False
    for nodeno in range(NON_LEAF_NODES_PER_PAGE - 1, -1, -1):
        left = 2 * nodeno + 1
        value = nodes[left] if left < NODES_PER_PAGE else 0
        if left + 1 < NODES_PER_PAGE:
            value = max(value, nodes[left + 1])
        if nodes[nodeno] != value:
            nodes[nodeno] = value
            changed = True
    return changed


def slot_values(page: bytes) -> bytes:
    """The leaf bytes (one category per slot)."""
    start = _NODES + NON_LEAF_NODES_PER_PAGE
    return bytes(page[start:_NODES + NODES_PER_PAGE])
