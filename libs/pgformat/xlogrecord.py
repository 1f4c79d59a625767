"""WAL records: the header, block references, images and main data.

Formats from src/include/access/xlogrecord.h; the decoding walk follows
DecodeXLogRecord in src/backend/access/transam/xlogreader.c and the image
restore follows RestoreBlockImage there.

A record is laid out as:

    XLogRecord header (24 bytes)
    block headers, each optionally followed by an image header, a compress
      header (hole length), a RelFileNode (unless SAME_REL) and a block number
    optional origin (id 253) / toplevel xid (id 252) / main data length (255/254)
    for each block: image bytes, then block data bytes
    main data
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import google_crc32c

from . import native
from .constants import BLCKSZ
from .errors import FormatError, WalCrcError, WalRecordError

SIZE_OF_XLOG_RECORD: Final = 24
XLR_MAX_BLOCK_ID: Final = 32
XLR_BLOCK_ID_DATA_SHORT: Final = 255
XLR_BLOCK_ID_DATA_LONG: Final = 254
XLR_BLOCK_ID_ORIGIN: Final = 253
XLR_BLOCK_ID_TOPLEVEL_XID: Final = 252

# fork_flags of XLogRecordBlockHeader
BKPBLOCK_FORK_MASK: Final = 0x0F
BKPBLOCK_HAS_IMAGE: Final = 0x10
BKPBLOCK_HAS_DATA: Final = 0x20
BKPBLOCK_WILL_INIT: Final = 0x40
BKPBLOCK_SAME_REL: Final = 0x80

# bimg_info of XLogRecordBlockImageHeader (PostgreSQL 15 values)
BKPIMAGE_HAS_HOLE: Final = 0x01
BKPIMAGE_APPLY: Final = 0x02
BKPIMAGE_COMPRESS_PGLZ: Final = 0x04
BKPIMAGE_COMPRESS_LZ4: Final = 0x08
BKPIMAGE_COMPRESS_ZSTD: Final = 0x10
BKPIMAGE_COMPRESSED: Final = BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD

# Records are at most 1 GB (XLogRecordMaxSize is 1020 MB in later majors);
# anything bigger is corruption, not a record.
MAX_RECORD_LENGTH: Final = 1024 * 1024 * 1024

_RECORD_HEADER = struct.Struct("<IIQBBxxI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_BLOCK_HEADER = struct.Struct("<BBH")
_IMAGE_HEADER = struct.Struct("<HHB")
_RELFILENODE = struct.Struct("<III")


_tuple_new = tuple.__new__  # a NamedTuple from a tuple of its fields, without the Python-level _make


class RelFileNode(NamedTuple):
    """Identifies a relation's files: tablespace, database and relfilenode OIDs.

    A NamedTuple rather than a dataclass: one is built per block reference,
    and tuples are the cheapest hashable value Python has.
    """

    spc: int
    db: int
    rel: int

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.rel}"


class XLogRecordHeader(NamedTuple):
    """XLogRecord from xlogrecord.h."""

    tot_len: int
    xid: int
    prev: int
    info: int
    rmid: int
    crc: int


@dataclass(slots=True)
class BlockImage:
    """A full-page image as stored in the record (maybe compressed, without its hole)."""

    data: bytes
    hole_offset: int
    hole_length: int
    bimg_info: int

    @property
    def apply(self) -> bool:
        """True when redo must restore it; False for wal_consistency_checking-only images."""
        return bool(self.bimg_info & BKPIMAGE_APPLY)

    @property
    def compression(self) -> str | None:
        if self.bimg_info & BKPIMAGE_COMPRESS_PGLZ:
            return "pglz"
        if self.bimg_info & BKPIMAGE_COMPRESS_LZ4:
            return "lz4"
        if self.bimg_info & BKPIMAGE_COMPRESS_ZSTD:
            return "zstd"
        return None

    def page(self) -> bytes:
        """The 8192-byte page: decompressed, with its hole filled with zeroes."""
        return restore_block_image(self)


@dataclass(slots=True)
class DecodedBlock:
    """One block reference of a record (DecodedBkpBlock in xlogreader.h)."""

    block_id: int
    rnode: RelFileNode
    forknum: int
    blkno: int
    flags: int
    image: BlockImage | None
    data: bytes

    @property
    def will_init(self) -> bool:
        return bool(self.flags & BKPBLOCK_WILL_INIT)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def apply_image(self) -> bool:
        return self.image is not None and self.image.apply

    @property
    def has_data(self) -> bool:
        return bool(self.flags & BKPBLOCK_HAS_DATA)


@dataclass(slots=True)
class DecodedRecord:
    """A whole WAL record, decoded. `lsn` is where it starts, `end_lsn` where it ends."""

    lsn: int
    end_lsn: int
    header: XLogRecordHeader
    blocks: list[DecodedBlock]
    main_data: bytes
    origin: int | None = None
    toplevel_xid: int | None = None
    raw: bytes = field(default=b"", repr=False)

    @property
    def rmid(self) -> int:
        return self.header.rmid

    @property
    def info(self) -> int:
        return self.header.info

    @property
    def xid(self) -> int:
        return self.header.xid

    @property
    def prev(self) -> int:
        return self.header.prev

    @property
    def tot_len(self) -> int:
        return self.header.tot_len

    def block(self, block_id: int) -> DecodedBlock | None:
        """The block reference with this id, or None (XLogRecHasBlockRef)."""
        for b in self.blocks:
            if b.block_id == block_id:
                return b
        return None

    @property
    def max_block_id(self) -> int:
        return max((b.block_id for b in self.blocks), default=-1)


def parse_record_header(buf: bytes | memoryview, lsn: int = 0) -> XLogRecordHeader:
    """Read the 24-byte XLogRecord header; check only what needs no context."""
    if len(buf) < SIZE_OF_XLOG_RECORD:
        raise WalRecordError(lsn, f"record header truncated: {len(buf)} of {SIZE_OF_XLOG_RECORD} bytes")
    header = _tuple_new(XLogRecordHeader, _RECORD_HEADER.unpack_from(buf, 0))
    tot_len, rmid = header.tot_len, header.rmid
    if tot_len < SIZE_OF_XLOG_RECORD:
        raise WalRecordError(lsn, f"invalid record length: wanted {SIZE_OF_XLOG_RECORD}, got {tot_len}")
    if tot_len > MAX_RECORD_LENGTH:
        raise WalRecordError(lsn, f"record length {tot_len} exceeds the maximum {MAX_RECORD_LENGTH}")
    if 21 < rmid < 128:
        raise WalRecordError(lsn, f"invalid resource manager ID {rmid}")
    return header


def record_crc(raw: bytes | memoryview) -> int:
    """CRC-32C over the record body after the header, then the header up to xl_crc.

    In C without copying the record when pgformat._native is built.
    """
    compiled = native.compiled
    if compiled is not None:
        return int(compiled.record_crc(raw))
    crc = google_crc32c.value(bytes(raw[SIZE_OF_XLOG_RECORD:]))
    return int(google_crc32c.extend(crc, bytes(raw[:20])))


def check_record_crc(raw: bytes | memoryview, lsn: int) -> None:
    expected = _U32.unpack_from(raw, 20)[0]
    actual = record_crc(raw)
    if actual != expected:
        raise WalCrcError(lsn, f"incorrect resource manager data checksum: {actual:08X}, expected {expected:08X}")


def decode_record(
    raw: bytes,
    lsn: int = 0,
    end_lsn: int = 0,
    verify_crc: bool = True,
    header: XLogRecordHeader | None = None,
) -> DecodedRecord:
    """Decode one complete record (`raw` is exactly xl_tot_len bytes).

    `header` may be passed when the caller has already parsed and checked it.
    Raises WalRecordError (WalCrcError for a checksum mismatch) naming `lsn`.
    """
    compiled = native.compiled
    if compiled is not None and header is None:
        # The same checks in the same order in one C call (parse_record_header, the length,
        # check_record_crc, then the walk of _decode_body).
        parts = compiled.decode_record(raw, verify_crc)
        if parts[0] is None:
            raise (WalCrcError if parts[1] else WalRecordError)(lsn, parts[2])
        head, block_parts, main_data, origin, toplevel_xid = parts
        return _record_from_parts(raw, _tuple_new(XLogRecordHeader, head), lsn, end_lsn, block_parts, main_data,
                                  origin, toplevel_xid)
    if header is None:
        header = parse_record_header(raw, lsn)
    if header.tot_len != len(raw):
        raise WalRecordError(lsn, f"record is {len(raw)} bytes but its header says {header.tot_len}")
    if verify_crc:
        check_record_crc(raw, lsn)
    try:
        return _decode_body(raw, header, lsn, end_lsn)
    except (struct.error, IndexError):
        raise WalRecordError(lsn, "record body truncated: a header runs past the end of the record") from None


_unpack_u16 = _U16.unpack_from
_unpack_u32 = _U32.unpack_from
_unpack_block_header = struct.Struct("<BH").unpack_from  # fork_flags, data_length (after the id byte)
_unpack_image_header = _IMAGE_HEADER.unpack_from
_unpack_relfilenode = _RELFILENODE.unpack_from


def _decode_body(raw: bytes, header: XLogRecordHeader, lsn: int, end_lsn: int) -> DecodedRecord:
    """The DecodeXLogRecord walk: in C when pgformat._native is built (its walk gives the
    objects and errors of :func:`_decode_body_py`, the reference), else in Python."""
    compiled = native.compiled
    if compiled is None:
        return _decode_body_py(raw, header, lsn, end_lsn)
    parts = compiled.decode_body(raw)
    if isinstance(parts, str):
        raise WalRecordError(lsn, parts)
    block_parts, main_data, origin, toplevel_xid = parts
    return _record_from_parts(raw, header, lsn, end_lsn, block_parts, main_data, origin, toplevel_xid)


def _record_from_parts(
    raw: bytes, header: XLogRecordHeader, lsn: int, end_lsn: int, block_parts: list[tuple[Any, ...]],
    main_data: bytes, origin: int | None, toplevel_xid: int | None,
) -> DecodedRecord:
    """The DecodedRecord of what pgformat._native's walk returned."""
    blocks = [
        DecodedBlock(block_id, _tuple_new(RelFileNode, (spc, db, rel)), fork_flags & BKPBLOCK_FORK_MASK, blkno,
                     fork_flags, None if image is None else BlockImage(*image), data)
        for block_id, spc, db, rel, fork_flags, blkno, image, data in block_parts
    ]
    return DecodedRecord(lsn, end_lsn, header, blocks, main_data, origin, toplevel_xid, raw)


def _decode_body_py(raw: bytes, header: XLogRecordHeader, lsn: int, end_lsn: int) -> DecodedRecord:
    """The DecodeXLogRecord walk, pure Python. Hot: one call per record, so locals over attributes."""
    pos = SIZE_OF_XLOG_RECORD
    end = len(raw)
    datatotal = 0
    main_data_len = 0
    origin: int | None = None
    toplevel_xid: int | None = None
    blocks: list[DecodedBlock] = []
    # Lengths of each block's image and data, in order; the bytes follow all headers.
    lengths: list[tuple[int, int]] = []
    last_rnode: RelFileNode | None = None
    last_block_id = -1

    while end - pos > datatotal:
        block_id = raw[pos]
        pos += 1
        if block_id > XLR_MAX_BLOCK_ID:
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_data_len = raw[pos]
                pos += 1
                datatotal += main_data_len
                break  # main data length is always last
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                main_data_len = _unpack_u32(raw, pos)[0]
                pos += 4
                datatotal += main_data_len
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                origin = _unpack_u16(raw, pos)[0]
                pos += 2
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                toplevel_xid = _unpack_u32(raw, pos)[0]
                pos += 4
                continue
            raise WalRecordError(lsn, f"invalid block_id {block_id}")
        if block_id <= last_block_id:
            raise WalRecordError(lsn, f"out-of-order block_id {block_id}")
        last_block_id = block_id

        fork_flags, data_len = _unpack_block_header(raw, pos)
        pos += 3
        if (fork_flags & BKPBLOCK_HAS_DATA) and not data_len:
            raise WalRecordError(lsn, "BKPBLOCK_HAS_DATA set, but no data included")
        if data_len and not (fork_flags & BKPBLOCK_HAS_DATA):
            raise WalRecordError(lsn, f"BKPBLOCK_HAS_DATA not set, but data length is {data_len}")
        datatotal += data_len

        image: BlockImage | None = None
        bimg_len = 0
        if fork_flags & BKPBLOCK_HAS_IMAGE:
            bimg_len, hole_offset, bimg_info = _unpack_image_header(raw, pos)
            pos += 5
            if bimg_info & BKPIMAGE_HAS_HOLE:
                if bimg_info & BKPIMAGE_COMPRESSED:
                    hole_length = _unpack_u16(raw, pos)[0]
                    pos += 2
                else:
                    hole_length = BLCKSZ - bimg_len
            else:
                hole_length = 0
            datatotal += bimg_len
            _check_image_header(lsn, block_id, bimg_len, hole_offset, hole_length, bimg_info)
            image = BlockImage(b"", hole_offset, hole_length, bimg_info)

        if fork_flags & BKPBLOCK_SAME_REL:
            if last_rnode is None:
                raise WalRecordError(lsn, "BKPBLOCK_SAME_REL set but no previous rel")
            rnode = last_rnode
        else:
            rnode = last_rnode = RelFileNode._make(_unpack_relfilenode(raw, pos))
            pos += 12
        blkno = _unpack_u32(raw, pos)[0]
        pos += 4
        blocks.append(DecodedBlock(block_id, rnode, fork_flags & BKPBLOCK_FORK_MASK, blkno, fork_flags, image, b""))
        lengths.append((bimg_len, data_len))

    if end - pos != datatotal:
        raise WalRecordError(
            lsn, f"record lengths disagree: {end - pos} bytes after the headers, {datatotal} announced"
        )

    for block, (bimg_len, data_len) in zip(blocks, lengths):
        if block.image is not None:
            block.image.data = raw[pos : pos + bimg_len]
            pos += bimg_len
        if data_len:
            block.data = raw[pos : pos + data_len]
            pos += data_len
    main_data = raw[pos : pos + main_data_len] if main_data_len else b""
    return DecodedRecord(lsn, end_lsn, header, blocks, main_data, origin, toplevel_xid, raw)


def _check_image_header(
    lsn: int, block_id: int, bimg_len: int, hole_offset: int, hole_length: int, bimg_info: int
) -> None:
    """The consistency checks DecodeXLogRecord applies to an image header."""
    if bimg_info & BKPIMAGE_HAS_HOLE:
        if hole_offset == 0 or hole_length == 0 or bimg_len == BLCKSZ:
            raise WalRecordError(
                lsn, f"block image {block_id}: BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length {hole_length}"
            )
    elif hole_offset != 0 or hole_length != 0:
        raise WalRecordError(lsn, f"block image {block_id}: BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset}")
    if bimg_info & BKPIMAGE_COMPRESSED:
        if bimg_len == BLCKSZ:
            raise WalRecordError(lsn, f"block image {block_id}: compressed image length {bimg_len}")
        if bin(bimg_info & BKPIMAGE_COMPRESSED).count("1") > 1:
            raise WalRecordError(lsn, f"block image {block_id}: more than one compression method in {bimg_info:#x}")
    elif not bimg_info & BKPIMAGE_HAS_HOLE and bimg_len != BLCKSZ:
        raise WalRecordError(lsn, f"block image {block_id}: image length {bimg_len} without hole or compression")
    if hole_offset + hole_length > BLCKSZ:
        raise WalRecordError(lsn, f"block image {block_id}: hole {hole_offset}+{hole_length} beyond the page")


class ImageRestoreError(FormatError):
    """A full-page image that does not decompress to exactly a page."""


def restore_block_image(image: BlockImage) -> bytes:
    """RestoreBlockImage: decompress if needed, then put the hole back as zeroes."""
    want = BLCKSZ - image.hole_length
    data = image.data
    info = image.bimg_info
    if info & BKPIMAGE_COMPRESSED:
        try:
            if info & BKPIMAGE_COMPRESS_PGLZ:
                from .pglz import pglz_decompress

                data = pglz_decompress(data, want, check_complete=True)
            elif info & BKPIMAGE_COMPRESS_LZ4:
                import lz4.block

                data = lz4.block.decompress(data, uncompressed_size=want)
            else:
                import zstandard

                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=want)
        except Exception as e:  # every decompressor has its own error types
            raise ImageRestoreError(f"could not decompress {image.compression} image: {e}") from None
    if len(data) != want:
        raise ImageRestoreError(f"image is {len(data)} bytes after decompression, expected {want}")
    if image.hole_length == 0:
        return bytes(data)
    off = image.hole_offset
    return b"".join((data[:off], bytes(image.hole_length), data[off:]))
