"""Apply WAL records to one page, following XLogReadBufferForRedoExtended.

src/backend/access/transam/xlogutils.c decides, per block reference:
- an image marked BKPIMAGE_APPLY is restored and the page LSN set to the
  record's end (BLK_RESTORED);
- BKPBLOCK_WILL_INIT: the rmgr builds the page from zeroes;
- a page whose LSN is already >= the record's end is left alone (BLK_DONE);
- otherwise the rmgr's redo runs on it (BLK_NEEDS_REDO) and the page LSN
  becomes the record's end.

Each rmgr module registers one `BlockRedo` per rmgr id: a function that
applies a record's effect on one of its block references. A record can also
touch a page it did not register (heap records clear visibility-map bits, a
heap truncation trims the last VM and FSM pages): an rmgr may register an
`ImpliedRedo` for those.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pgformat.constants import BLCKSZ
from pgformat.page import PageError, page_get_lsn, page_is_new, page_set_lsn
from pgformat.xlogrecord import DecodedBlock, DecodedRecord, RelFileNode

from .errors import BadRecordError, RedoFailedError, UnsupportedRecordError


@dataclass(frozen=True, slots=True)
class BufferTag:
    """A relation page: which relation file, fork and block (BufferTag in buf_internals.h)."""

    rnode: RelFileNode
    forknum: int
    blkno: int


# Applies `rec`'s change to the page of `block` in place. Returns False when
# Postgres would not set the page LSN (rare; see the rmgr's comments).
BlockRedo = Callable[[DecodedRecord, DecodedBlock, bytearray], "bool | None"]
# Applies a record's effect on a page it did not register (an all-zero page when
# there is no base); returns False when Postgres would not set the page LSN.
ImpliedRedo = Callable[[DecodedRecord, BufferTag, bytearray], bool]
# Lists the pages a record changes without registering them (the page server
# files the record under those keys too).
ImpliedTags = Callable[[DecodedRecord], "list[BufferTag]"]

# Runs after a BKPIMAGE_APPLY image is restored, for the few records whose
# redo still changes the restored page (GiST clears F_FOLLOW_RIGHT on it).
ImageFixup = Callable[[DecodedRecord, DecodedBlock, bytearray], bool]

_BLOCK_REDO: dict[int, BlockRedo] = {}
_IMAGE_FIXUP: dict[int, ImageFixup] = {}
_IMPLIED_REDO: dict[int, tuple[ImpliedTags, ImpliedRedo]] = {}


def register_block_redo(rmid: int, fn: BlockRedo) -> None:
    _BLOCK_REDO[rmid] = fn


def register_image_fixup(rmid: int, fn: ImageFixup) -> None:
    _IMAGE_FIXUP[rmid] = fn


def register_implied_redo(rmid: int, tags: ImpliedTags, fn: ImpliedRedo) -> None:
    _IMPLIED_REDO[rmid] = (tags, fn)


def implied_tags(rec: DecodedRecord) -> list[BufferTag]:
    """Pages `rec` changes without a block reference (e.g. visibility-map bits)."""
    _load_rmgrs()
    entry = _IMPLIED_REDO.get(rec.rmid)
    return entry[0](rec) if entry is not None else []


_rmgrs_loaded = False


def _load_rmgrs() -> None:
    """Import every rmgr module so each registers itself (once, lazily: the modules import this one)."""
    global _rmgrs_loaded
    if not _rmgrs_loaded:
        from . import rmgrs  # noqa: F401

        _rmgrs_loaded = True


def find_block(rec: DecodedRecord, tag: BufferTag) -> DecodedBlock | None:
    for b in rec.blocks:
        if b.blkno == tag.blkno and b.forknum == tag.forknum and b.rnode == tag.rnode:
            return b
    return None


def apply_record(tag: BufferTag, page: bytearray | None, rec: DecodedRecord) -> bytearray:
    """One record's effect on the page `tag`. `page` is None when no base exists yet."""
    _load_rmgrs()
    block = find_block(rec, tag)
    if block is None:
        entry = _IMPLIED_REDO.get(rec.rmid)
        if entry is None:
            raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"record does not reference block {tag}")
        if page is None:
            if tag not in entry[0](rec):
                raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"no base page, and the record does not change {tag}")
            # A map page the page server never saw (Postgres creates VM and FSM pages
            # without WAL): Postgres reads a missing or new map page as zeroes too
            # (vm_readbuf, fsm_readbuf), and the implied changes only clear bits.
            page = bytearray(BLCKSZ)
        if page_get_lsn(page) >= rec.end_lsn:
            return page
        if entry[1](rec, tag, page):
            page_set_lsn(page, rec.end_lsn)
        return page
    return apply_block(block, page, rec)


def apply_block(block: DecodedBlock, page: bytearray | None, rec: DecodedRecord) -> bytearray:
    """XLogReadBufferForRedoExtended plus the rmgr's redo for one block reference."""
    if block.image is not None and block.image.apply:
        restored = bytearray(block.image.page())
        fixup = _IMAGE_FIXUP.get(rec.rmid)
        if fixup is not None:
            with _record_context(rec, block):
                fixup(rec, block, restored)
        if not page_is_new(restored):
            page_set_lsn(restored, rec.end_lsn)
        return restored
    if block.will_init:
        page = bytearray(BLCKSZ)
    elif page is None:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"block {block.block_id} has no base page and no image")
    elif page_get_lsn(page) >= rec.end_lsn:
        return page  # BLK_DONE: the change is already there
    _load_rmgrs()
    redo = _BLOCK_REDO.get(rec.rmid)
    if redo is None:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    with _record_context(rec, block):
        set_lsn = redo(rec, block, page)
    if set_lsn is not False:
        page_set_lsn(page, rec.end_lsn)
    return page


@contextmanager
def _record_context(rec: DecodedRecord, block: DecodedBlock) -> Iterator[None]:
    """Turn what rmgr code raises on bad input into one RedoFailedError naming the record and block."""
    try:
        yield
    except (BadRecordError, PageError, struct.error, IndexError) as e:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"block {block.block_id} (blk {block.blkno}): {e}") from e


def redo_page(tag: BufferTag, base: bytes | None, records: Iterable[DecodedRecord]) -> bytearray:
    """The page after applying `records` in order to `base` (None: no page yet)."""
    page = bytearray(base) if base is not None else None
    for rec in records:
        page = apply_record(tag, page, rec)
    if page is None:
        raise RedoFailedError(0, 0, 0, f"no records and no base image for {tag}")
    return page
