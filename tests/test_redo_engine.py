"""The engine's own rules, on hand-built records: errors name the record, images and BLK_DONE."""

from __future__ import annotations

import pytest

from pgformat.constants import BLCKSZ
from pgformat.lsn import format_lsn
from pgformat.page import page_get_lsn, page_init, page_set_lsn
from pgformat.rmgr import RM_BTREE_ID, RM_HEAP_ID, XLOG_BTREE_INSERT_LEAF, XLOG_HEAP_INSERT
from pgformat.xlogrecord import BKPBLOCK_HAS_DATA, BlockImage, DecodedBlock, DecodedRecord, RelFileNode, XLogRecordHeader
from pgredo.engine import BufferTag, apply_block, apply_record
from pgredo.errors import RedoFailedError, UnsupportedRecordError

REL = RelFileNode(1663, 5, 16384)


def record(rmid: int, info: int, block: DecodedBlock, main_data: bytes = b"", lsn: int = 0x1000000) -> DecodedRecord:
    header = XLogRecordHeader(64, 700, lsn - 64, info, rmid, 0)
    return DecodedRecord(lsn, lsn + 64, header, [block], main_data)


def heap_page(lsn: int = 0) -> bytearray:
    page = bytearray(BLCKSZ)
    page_init(page, 0)
    page_set_lsn(page, lsn)
    return page


def test_bad_record_contents_name_lsn_rmgr_and_block() -> None:
    block = DecodedBlock(0, REL, 0, 7, BKPBLOCK_HAS_DATA, None, b"\x01")
    rec = record(RM_BTREE_ID, XLOG_BTREE_INSERT_LEAF, block, main_data=b"")  # xl_btree_insert missing
    with pytest.raises(RedoFailedError) as ei:
        apply_block(block, heap_page(), rec)
    msg = str(ei.value)
    assert format_lsn(rec.lsn) in msg and "Btree/INSERT_LEAF" in msg and "blk 7" in msg


def test_unknown_rmgr_is_unsupported_never_a_guess() -> None:
    block = DecodedBlock(0, REL, 0, 0, 0, None, b"")
    rec = record(200, 0x10, block)
    with pytest.raises(UnsupportedRecordError, match="rmgr 200"):
        apply_block(block, heap_page(), rec)


def test_apply_image_is_restored_with_the_record_end_as_lsn() -> None:
    image_page = heap_page(lsn=0x500)
    block = DecodedBlock(0, REL, 0, 0, 0x10, BlockImage(bytes(image_page), 0, 0, 0x02), b"")
    rec = record(RM_HEAP_ID, XLOG_HEAP_INSERT, block)
    out = apply_block(block, heap_page(), rec)
    assert page_get_lsn(out) == rec.end_lsn
    assert out[8:] == image_page[8:]


def test_page_already_past_the_record_is_left_alone() -> None:
    block = DecodedBlock(0, REL, 0, 0, BKPBLOCK_HAS_DATA, None, b"garbage that would fail")
    rec = record(RM_HEAP_ID, XLOG_HEAP_INSERT, block)
    newer = heap_page(lsn=rec.end_lsn)
    assert apply_block(block, bytearray(newer), rec) == newer  # BLK_DONE


def test_record_that_does_not_touch_the_page_is_an_error() -> None:
    block = DecodedBlock(0, REL, 0, 0, 0, None, b"")
    rec = record(RM_BTREE_ID, XLOG_BTREE_INSERT_LEAF, block)
    with pytest.raises(RedoFailedError, match="does not reference"):
        apply_record(BufferTag(REL, 0, 99), heap_page(), rec)
