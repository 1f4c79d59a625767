"""Page redo for the XLOG (0), Sequence (15) and Generic (20) resource managers.

- XLOG: only XLOG_FPI and XLOG_FPI_FOR_HINT carry block references
  (xlog_redo in src/backend/access/transam/xlog.c). Their images are
  restored by the engine when flagged BKPIMAGE_APPLY; what reaches us here is
  a block without an applicable image: legal only for XLOG_FPI_FOR_HINT
  written with full_page_writes off, where redo does nothing (the page and
  its LSN stay as they are). Every other XLOG record type has no block
  reference, so the engine never asks us about a page for it.
- Sequence: XLOG_SEQ_LOG re-initializes the page with the sequence magic in
  its special space and the tuple from the record (seq_redo in
  src/backend/commands/sequence.c).
- Generic: a delta of fragments <offset u16, length u16, data> per block;
  afterwards the hole between pd_lower and pd_upper is zeroed (generic_redo
  and applyPageRedo in src/backend/access/transam/generic_xlog.c). Blocks
  written with GENERIC_XLOG_FULL_IMAGE arrive as applicable images.
"""

from __future__ import annotations

import struct
from typing import Final

from pgformat.constants import BLCKSZ
from pgformat.page import INVALID_OFFSET_NUMBER, page_add_item_extended, page_init
from pgformat.rmgr import RM_GENERIC_ID, RM_SEQ_ID, RM_XLOG_ID, XLOG_FPI, XLOG_FPI_FOR_HINT, XLOG_SEQ_LOG
from pgformat.xlogrecord import DecodedBlock, DecodedRecord

from .engine import register_block_redo
from .errors import RedoFailedError, UnsupportedRecordError

# xlogrecord.h: the low four bits of xl_info belong to the WAL machinery.
XLR_INFO_MASK: Final = 0x0F
XLR_RMGR_INFO_MASK: Final = 0xF0

# sequence.c: sequence_magic {uint32 magic} sits in the special space.
SEQ_MAGIC: Final = 0x1717
SIZE_OF_SEQUENCE_MAGIC: Final = 4
# sequence.h: xl_seq_rec {RelFileNode node}; the tuple follows.
SIZE_OF_XL_SEQ_REC: Final = 12

# generic_xlog.c: FRAGMENT_HEADER_SIZE = 2 * sizeof(OffsetNumber).
FRAGMENT_HEADER_SIZE: Final = 4
# generic_xlog.h
MAX_GENERIC_XLOG_PAGES: Final = 4

_U32 = struct.Struct("<I")
_FRAGMENT_HEADER = struct.Struct("<HH")
_LOWER_UPPER = struct.Struct("<HH")  # pd_lower, pd_upper at offset 12
_OFF_LOWER: Final = 12


# --- XLOG ---------------------------------------------------------------------


def xlog_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> bool:
    """xlog_redo (xlog.c) for a block reference the engine did not restore from an image.

    XLOG_FPI_FOR_HINT without an image (full_page_writes off) is a no-op:
    Postgres does not even read the buffer, so the page LSN stays too.
    """
    info = rec.info & XLR_RMGR_INFO_MASK
    if info == XLOG_FPI or info == XLOG_FPI_FOR_HINT:
        if block.image is None:
            if info == XLOG_FPI:
                raise RedoFailedError(rec.lsn, rec.rmid, rec.info, "XLOG_FPI record did not contain a full-page image")
            return False
        # An image Postgres does not apply: XLogReadBufferForRedo would not
        # return BLK_RESTORED.
        raise RedoFailedError(
            rec.lsn, rec.rmid, rec.info,
            "unexpected XLogReadBufferForRedo result when restoring backup block (image not marked APPLY)",
        )
    raise RedoFailedError(
        rec.lsn, rec.rmid, rec.info, f"XLOG record carries block reference {block.block_id}; only FPI records may"
    )


# --- Sequence -------------------------------------------------------------------


def seq_log_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """seq_redo (sequence.c): rebuild the page from the tuple in the record.

    The page is always re-initialized (XLogInitBufferForRedo), so whatever
    was there does not matter.
    """
    info = rec.info & XLR_RMGR_INFO_MASK
    if info != XLOG_SEQ_LOG:
        raise UnsupportedRecordError(rec.lsn, rec.rmid, rec.info)
    if block.block_id != 0:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"unexpected block reference {block.block_id}")
    data = rec.main_data
    if len(data) < SIZE_OF_XL_SEQ_REC:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"xl_seq_rec truncated: {len(data)} bytes")
    page_init(page, SIZE_OF_SEQUENCE_MAGIC)
    _U32.pack_into(page, BLCKSZ - 8, SEQ_MAGIC)  # PageGetSpecialPointer: BLCKSZ - MAXALIGN(4)
    item = memoryview(data)[SIZE_OF_XL_SEQ_REC:]
    if page_add_item_extended(page, item, 1, 0) == INVALID_OFFSET_NUMBER:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, "seq_redo: failed to add item to page")


# --- Generic ----------------------------------------------------------------------


def apply_page_redo(page: bytearray, delta: bytes | memoryview) -> None:
    """applyPageRedo (generic_xlog.c): copy each fragment's data to its offset."""
    pos = 0
    end = len(delta)
    while pos < end:
        if pos + FRAGMENT_HEADER_SIZE > end:
            raise ValueError(f"generic delta fragment header truncated at byte {pos}")
        offset, length = _FRAGMENT_HEADER.unpack_from(delta, pos)
        pos += FRAGMENT_HEADER_SIZE
        if pos + length > end:
            raise ValueError(f"generic delta fragment at byte {pos} wants {length} bytes, {end - pos} left")
        if offset + length > BLCKSZ:
            raise ValueError(f"generic delta fragment {offset}+{length} runs past the page")
        page[offset : offset + length] = delta[pos : pos + length]
        pos += length


def generic_redo(rec: DecodedRecord, block: DecodedBlock, page: bytearray) -> None:
    """generic_redo (generic_xlog.c) for one block that needs redo."""
    if block.block_id >= MAX_GENERIC_XLOG_PAGES:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, f"generic record block id {block.block_id} too large")
    try:
        apply_page_redo(page, memoryview(block.data))
    except ValueError as e:
        raise RedoFailedError(rec.lsn, rec.rmid, rec.info, str(e)) from None
    # The delta says nothing about the hole: zero it, as GenericXLogFinish did.
    lower, upper = _LOWER_UPPER.unpack_from(page, _OFF_LOWER)
    if lower > upper or upper > BLCKSZ:
        raise RedoFailedError(
            rec.lsn, rec.rmid, rec.info, f"page after delta has pd_lower {lower} > pd_upper {upper}"
        )
    page[lower:upper] = bytes(upper - lower)


register_block_redo(RM_XLOG_ID, xlog_redo)
register_block_redo(RM_SEQ_ID, seq_log_redo)
register_block_redo(RM_GENERIC_ID, generic_redo)

__all__ = [
    "SEQ_MAGIC",
    "apply_page_redo",
    "generic_redo",
    "seq_log_redo",
    "xlog_redo",
]
