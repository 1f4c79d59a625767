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
from collections.abc import Callable, Iterable
from typing import NamedTuple

from pgformat.constants import BLCKSZ
from pgformat.page import PageError, page_get_lsn, page_set_lsn
from pgformat.xlogrecord import (
    BKPBLOCK_WILL_INIT,
    BKPIMAGE_APPLY,
    BKPIMAGE_COMPRESSED,
    BlockImage,
    DecodedBlock,
    DecodedRecord,
    RelFileNode,
)

from .errors import BadRecordError, RedoFailedError, UnsupportedRecordError


class BufferTag(NamedTuple):
    """A relation page: which relation file, fork and block (BufferTag in buf_internals.h).

    A NamedTuple (immutable, and hashed and compared in C): redo looks pages up
    by tag several times per record.
    """

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

_LSN = struct.Struct("<II")  # pd_lsn: xlogid (high half), xrecoff (low half)
_u16_from = struct.Struct("<H").unpack_from
_OFF_UPPER = 14

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
    if not _rmgrs_loaded:
        _load_rmgrs()
    entry = _IMPLIED_REDO.get(rec.header.rmid)
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
    """XLogReadBufferForRedoExtended plus the rmgr's redo for one block reference.

    `page` is changed in place and returned (a restored image or an
    initialized page is a new bytearray): a chain of records runs on one page
    image without copying it per record.
    """
    image = block.image
    if image is not None and image.bimg_info & BKPIMAGE_APPLY:
        restored = _restored_page(image)
        fixup = _IMAGE_FIXUP.get(rec.header.rmid)
        if fixup is not None:
            try:
                fixup(rec, block, restored)
            except _INPUT_ERRORS as e:
                raise _block_failure(rec, block, e) from e
        if _u16_from(restored, _OFF_UPPER)[0] != 0:  # !PageIsNew
            _LSN.pack_into(restored, 0, (rec.end_lsn >> 32) & 0xFFFFFFFF, rec.end_lsn & 0xFFFFFFFF)
        return restored
    if block.flags & BKPBLOCK_WILL_INIT:
        page = bytearray(BLCKSZ)
    elif page is None:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"block {block.block_id} has no base page and no image")
    else:
        hi, lo = _LSN.unpack_from(page, 0)
        if (hi << 32) | lo >= rec.end_lsn:
            return page  # BLK_DONE: the change is already there
    if not _rmgrs_loaded:
        _load_rmgrs()
    redo = _BLOCK_REDO.get(rec.header.rmid)
    if redo is None:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    try:
        set_lsn = redo(rec, block, page)
    except _INPUT_ERRORS as e:
        raise _block_failure(rec, block, e) from e
    if set_lsn is not False:
        _LSN.pack_into(page, 0, (rec.end_lsn >> 32) & 0xFFFFFFFF, rec.end_lsn & 0xFFFFFFFF)
    return page


def _restored_page(image: BlockImage) -> bytearray:
    """RestoreBlockImage into a new bytearray, with one copy for an uncompressed image."""
    data = image.data
    hole = image.hole_length
    if image.bimg_info & BKPIMAGE_COMPRESSED or len(data) + hole != BLCKSZ:
        return bytearray(image.page())  # decompresses, and names what is wrong with a bad image
    if hole == 0:
        return bytearray(data)
    off = image.hole_offset
    page = bytearray(BLCKSZ)
    page[:off] = data[:off]
    page[off + hole :] = data[off:]
    return page


# What rmgr code raises on bad input; the engine turns it into one RedoFailedError.
_INPUT_ERRORS = (BadRecordError, PageError, struct.error, IndexError)


def _block_failure(rec: DecodedRecord, block: DecodedBlock, e: Exception) -> RedoFailedError:
    """A RedoFailedError naming the record and block for what the rmgr code raised."""
    return RedoFailedError(rec.lsn, rec.rmid, rec.info, f"block {block.block_id} (blk {block.blkno}): {e}")


def redo_page(tag: BufferTag, base: bytes | None, records: Iterable[DecodedRecord]) -> bytearray:
    """The page after applying `records` in order to `base` (None: no page yet)."""
    page = bytearray(base) if base is not None else None
    for rec in records:
        page = apply_record(tag, page, rec)
    if page is None:
        raise RedoFailedError(0, 0, 0, f"no records and no base image for {tag}")
    return page
