"""The on-disk scheme shared by delta and image layers: sorted entries in checksummed LZ4 blocks.

A layer file is a sequence of entries sorted by their *entry key*: the 18-byte page
server key followed by the 8-byte big-endian LSN, so byte order is (key, LSN) order.
Each entry carries an encoded value (values.py). Layout::

    header    128 bytes: magic, format version, layer kind, LSN range [start, end),
              key range [start, end) (each up to 32 bytes), zero padding, CRC-32C
    blocks    one after the other from offset 128; each holds whole entries, about
              BLOCK_TARGET bytes of them before compression (an entry larger than that
              gets a block of its own), LZ4-compressed unless that does not make it
              smaller (then stored as is)
    index     one 51-byte row per block: its first entry key, offset, stored length,
              uncompressed length, entry count, CRC-32C of the stored bytes, codec
    footer    84 bytes: index offset and length, index CRC-32C, block, entry and key
              counts, the last entry key, a magic, and the footer's own CRC-32C

A block, uncompressed: the entry count n (u32), n entry keys (26 bytes each, so a
block's keys can be binary searched without parsing), n+1 value offsets (u32, relative
to the start of the values), then the values. Every byte of the file is under one of the
checksums, so a flipped byte or a truncation is found (LayerCorruptError naming the file
and block) before anything from that part of the file is used.

Writers stream: they hold one block of entries and the index (one row per block), never
the layer. Readers read the header, footer and index when opened and each block when
first needed, keeping a few decoded blocks in a small cache. Neon keeps a B-tree index
in its layer files (pageserver/src/tenant/disk_btree.rs); a flat sorted index of one row
per 64 KB block is small enough to hold in memory for the 128 MiB layers we target.
"""

from __future__ import annotations

import bisect
import enum
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import google_crc32c
import lz4.block

from ..keys import KEY_SIZE
from .errors import LayerCorruptError, LayerWriteError
from .store import FileReader, FileWriter

MAGIC: Final = b"ZNLAYER\x00"
FOOTER_MAGIC: Final = b"ZNLYEND\x00"
FORMAT_VERSION: Final = 1
BLOCK_TARGET: Final = 64 * 1024
ENTRY_KEY_SIZE: Final = KEY_SIZE + 8
MAX_BOUND_SIZE: Final = 32  # a key range bound: a key, or an exclusive end one byte longer
MAX_LSN: Final = (1 << 64) - 1


class LayerKind(enum.IntEnum):
    DELTA = 1
    IMAGE = 2


class Codec(enum.IntEnum):
    RAW = 0
    LZ4 = 1


_LSN = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_CRC = struct.Struct(">I")
_HEADER = struct.Struct(">8sHBBQQBB32s32s")  # magic, version, kind, flags, lsn start/end, bound lens, bounds
HEADER_SIZE: Final = 128
_HEADER_CRC_AT: Final = HEADER_SIZE - _CRC.size
_INDEX_ROW = struct.Struct(">26sQIIIIB")  # first entry key, offset, stored len, raw len, entries, crc, codec
_FOOTER_BODY = struct.Struct(">QQIIQQ26s8s")  # index offset, len, crc, blocks, entries, keys, last entry, magic
FOOTER_SIZE: Final = _FOOTER_BODY.size + _CRC.size
assert _HEADER.size <= _HEADER_CRC_AT


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)  # type: ignore[no-any-return]


def entry_key(key: bytes, lsn: int) -> bytes:
    """The sort key of an entry: key bytes then big-endian LSN."""
    return key + _LSN.pack(lsn)


def split_entry_key(ekey: bytes) -> tuple[bytes, int]:
    return ekey[:KEY_SIZE], _LSN.unpack_from(ekey, KEY_SIZE)[0]


@dataclass(frozen=True, slots=True)
class LayerHeader:
    kind: LayerKind
    key_start: bytes
    key_end: bytes
    lsn_start: int
    lsn_end: int


def encode_header(h: LayerHeader) -> bytes:
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, h.kind, 0, h.lsn_start, h.lsn_end,
                        len(h.key_start), len(h.key_end), h.key_start, h.key_end)
    body = body.ljust(_HEADER_CRC_AT, b"\0")
    return body + _CRC.pack(crc32c(body))


def check_ranges(key_start: bytes, key_end: bytes, lsn_start: int, lsn_end: int) -> None:
    """Raise LayerWriteError unless the ranges are valid for a layer header."""
    if len(key_start) > MAX_BOUND_SIZE or len(key_end) > MAX_BOUND_SIZE:
        raise LayerWriteError(f"key range bounds are at most {MAX_BOUND_SIZE} bytes")
    if key_start >= key_end:
        raise LayerWriteError(f"empty key range [{key_start.hex()}, {key_end.hex()})")
    if not 0 <= lsn_start < lsn_end <= MAX_LSN:
        raise LayerWriteError(f"bad LSN range [{lsn_start:X}, {lsn_end:X})")


@dataclass(frozen=True, slots=True)
class BlockFileSummary:
    """What a finished file holds (the writer's answer; the reader has the same properties)."""

    header: LayerHeader
    file_size: int
    n_blocks: int
    n_entries: int
    n_keys: int


class BlockFileWriter:
    """Streams entries, in strictly increasing entry-key order, into a new layer file.

    Checks order and ranges itself (LayerWriteError); `finish` may narrow the key end
    (a compaction decides where a layer stops when it is full).
    """

    def __init__(self, out: FileWriter, header: LayerHeader, block_target: int = BLOCK_TARGET) -> None:
        check_ranges(header.key_start, header.key_end, header.lsn_start, header.lsn_end)
        self._out, self._header, self._target = out, header, block_target
        self._keys: list[bytes] = []
        self._values: list[bytes] = []
        self._bytes = 0
        self._index: list[bytes] = []
        self._n_entries = 0
        self._n_keys = 0
        self._last = b""
        self._done = False
        out.write(encode_header(header))

    @property
    def name(self) -> str:
        return self._out.name

    @property
    def n_entries(self) -> int:
        return self._n_entries

    @property
    def last_entry_key(self) -> bytes | None:
        return self._last or None

    @property
    def approx_size(self) -> int:
        """Bytes written so far plus the open block, uncompressed (to decide when a layer is full)."""
        return self._out.size + self._bytes

    def add(self, ekey: bytes, value: bytes) -> None:
        """Append one entry: `ekey` from entry_key(), `value` an encoded value."""
        if self._done:
            raise LayerWriteError(f"{self.name}: writer already finished")
        if len(ekey) != ENTRY_KEY_SIZE:
            raise LayerWriteError(f"{self.name}: entry key of {len(ekey)} bytes, expected {ENTRY_KEY_SIZE}")
        if ekey <= self._last:
            raise LayerWriteError(f"{self.name}: entry {_describe(ekey)} added after {_describe(self._last)}:"
                                  " entries must come in strictly increasing (key, LSN) order")
        if ekey[:KEY_SIZE] != self._last[:KEY_SIZE]:
            self._n_keys += 1
        self._last = ekey
        self._keys.append(ekey)
        self._values.append(value)
        self._bytes += ENTRY_KEY_SIZE + 4 + len(value)
        self._n_entries += 1
        if self._bytes >= self._target:
            self._flush_block()

    def _flush_block(self) -> None:
        keys, values = self._keys, self._values
        n = len(keys)
        if not n:
            return
        offs = [0] * (n + 1)
        pos = 0
        for i, v in enumerate(values):
            pos += len(v)
            offs[i + 1] = pos
        raw = b"".join((_U32.pack(n), *keys, struct.pack(f">{n + 1}I", *offs), *values))
        packed = lz4.block.compress(raw, store_size=False)
        codec = Codec.LZ4
        if len(packed) >= len(raw):
            packed, codec = raw, Codec.RAW
        offset = self._out.size
        self._out.write(packed)
        self._index.append(_INDEX_ROW.pack(keys[0], offset, len(packed), len(raw), n, crc32c(packed), codec))
        self._keys, self._values, self._bytes = [], [], 0

    def finish(self, key_end: bytes | None = None, name: str | None = None) -> BlockFileSummary:
        """Write the last block, the index and the footer, and publish the file (as `name` if given)."""
        if self._done:
            raise LayerWriteError(f"{self.name}: writer already finished")
        header = self._header
        if key_end is not None and key_end != header.key_end:
            if not header.key_start < key_end <= header.key_end or len(key_end) > MAX_BOUND_SIZE:
                raise LayerWriteError(f"{self.name}: key end {key_end.hex()} outside the layer's key range")
            if self._last and self._last[:KEY_SIZE] >= key_end:
                raise LayerWriteError(f"{self.name}: key end {key_end.hex()} is not above the last key written")
            header = LayerHeader(header.kind, header.key_start, key_end, header.lsn_start, header.lsn_end)
        self._flush_block()
        index = b"".join(self._index)
        index_offset = self._out.size
        self._out.write(index)
        body = _FOOTER_BODY.pack(index_offset, len(index), crc32c(index), len(self._index), self._n_entries,
                                 self._n_keys, self._last.ljust(ENTRY_KEY_SIZE, b"\0"), FOOTER_MAGIC)
        self._out.write(body + _CRC.pack(crc32c(body)))
        if header is not self._header:
            self._out.pwrite(encode_header(header), 0)
        self._done = True
        size = self._out.finish(name)
        return BlockFileSummary(header, size, len(self._index), self._n_entries, self._n_keys)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._out.abort()


def _describe(ekey: bytes) -> str:
    if len(ekey) != ENTRY_KEY_SIZE:
        return "(start)" if not ekey else ekey.hex()
    key, lsn = split_entry_key(ekey)
    return f"key {key.hex()} at {lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class Block:
    """One decoded block: its entry keys (a list, for bisect) and its values."""

    __slots__ = ("_base", "_buf", "_offs", "keys")

    def __init__(self, keys: list[bytes], offs: tuple[int, ...], buf: bytes, base: int) -> None:
        self.keys, self._offs, self._buf, self._base = keys, offs, buf, base

    def __len__(self) -> int:
        return len(self.keys)

    def value(self, i: int) -> bytes:
        base, offs = self._base, self._offs
        return self._buf[base + offs[i]:base + offs[i + 1]]

    def values(self) -> Iterator[bytes]:
        buf, base, offs = self._buf, self._base, self._offs
        for i in range(len(self.keys)):
            yield buf[base + offs[i]:base + offs[i + 1]]


@dataclass(frozen=True, slots=True)
class _BlockRef:
    first: bytes
    offset: int
    stored: int
    raw: int
    entries: int
    crc: int
    codec: int


class BlockFileReader:
    """An open layer file: header, footer and index read and checked at open, blocks on demand.

    Thread-safe: reads are preads, the block cache is under a lock.
    """

    READ_AHEAD: Final = 1 << 20

    def __init__(self, f: FileReader, expect_kind: LayerKind | None = None, cache_blocks: int = 16) -> None:
        self._f = f
        self.name = f.name
        self._cache: OrderedDict[int, Block] = OrderedDict()
        self._cache_size = cache_blocks
        self._lock = threading.Lock()
        size = f.size
        if size < HEADER_SIZE + FOOTER_SIZE:
            raise self._corrupt(f"{size} bytes is too short for a layer file (truncated?)")
        self.header = self._read_header(f.pread(HEADER_SIZE, 0), expect_kind)
        footer = f.pread(FOOTER_SIZE, size - FOOTER_SIZE)
        if len(footer) != FOOTER_SIZE:
            raise self._corrupt("short read of the footer (file truncated while open?)")
        body = footer[:_FOOTER_BODY.size]
        (index_offset, index_len, index_crc, n_blocks, self.n_entries, self.n_keys, last,
         magic) = _FOOTER_BODY.unpack(body)
        if magic != FOOTER_MAGIC:
            raise self._corrupt("footer magic missing (file truncated or not a layer file)")
        if crc32c(body) != _CRC.unpack_from(footer, _FOOTER_BODY.size)[0]:
            raise self._corrupt("footer checksum mismatch")
        if index_offset < HEADER_SIZE or index_offset + index_len != size - FOOTER_SIZE:
            raise self._corrupt(f"index at {index_offset}+{index_len} does not end at the footer ({size - FOOTER_SIZE})")
        if index_len != n_blocks * _INDEX_ROW.size:
            raise self._corrupt(f"index of {index_len} bytes for {n_blocks} blocks")
        index = f.pread(index_len, index_offset)
        if len(index) != index_len or crc32c(index) != index_crc:
            raise self._corrupt("index checksum mismatch")
        self.file_size = size
        self._blocks = self._parse_index(index, n_blocks, index_offset)
        self._firsts = [b.first for b in self._blocks]
        if sum(b.entries for b in self._blocks) != self.n_entries:
            raise self._corrupt("the blocks' entry counts do not add up to the footer's")
        self.last_entry_key = last if self.n_entries else None
        h = self.header
        if self._blocks:
            first_key, first_lsn = split_entry_key(self._blocks[0].first)
            last_key = last[:KEY_SIZE]
            if (self._blocks[0].first > last or first_key < h.key_start or last_key >= h.key_end
                    or not h.lsn_start <= first_lsn < h.lsn_end):
                raise self._corrupt("entries outside the key or LSN range of the header")

    # --- opening ---

    def _corrupt(self, detail: str, *, key: bytes | None = None, block: int | None = None) -> LayerCorruptError:
        return LayerCorruptError(self.name, detail, key=key, block=block)

    def _read_header(self, raw: bytes, expect_kind: LayerKind | None) -> LayerHeader:
        if len(raw) != HEADER_SIZE:
            raise self._corrupt("short read of the header")
        magic, version, kind, _flags, lsn_start, lsn_end, ks_len, ke_len, ks, ke = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise self._corrupt(f"not a layer file (magic {magic!r})")
        if crc32c(raw[:_HEADER_CRC_AT]) != _CRC.unpack_from(raw, _HEADER_CRC_AT)[0]:
            raise self._corrupt("header checksum mismatch")
        if version != FORMAT_VERSION:
            raise self._corrupt(f"format version {version}, this build reads {FORMAT_VERSION}")
        try:
            layer_kind = LayerKind(kind)
        except ValueError:
            raise self._corrupt(f"unknown layer kind {kind}") from None
        if expect_kind is not None and layer_kind != expect_kind:
            raise self._corrupt(f"a {layer_kind.name.lower()} layer where a {expect_kind.name.lower()} layer was expected")
        if ks_len > MAX_BOUND_SIZE or ke_len > MAX_BOUND_SIZE:
            raise self._corrupt("key range bound too long")
        header = LayerHeader(layer_kind, ks[:ks_len], ke[:ke_len], lsn_start, lsn_end)
        try:
            check_ranges(header.key_start, header.key_end, lsn_start, lsn_end)
        except LayerWriteError as e:
            raise self._corrupt(f"header: {e}") from None
        return header

    def _parse_index(self, index: bytes, n_blocks: int, data_end: int) -> list[_BlockRef]:
        blocks = []
        expect_offset, prev = HEADER_SIZE, b""
        for i in range(n_blocks):
            ref = _BlockRef(*_INDEX_ROW.unpack_from(index, i * _INDEX_ROW.size))
            if ref.offset != expect_offset or ref.stored == 0 or ref.entries == 0:
                raise self._corrupt(f"index row of block {i} does not follow the block before it", block=i)
            if ref.first <= prev:
                raise self._corrupt("blocks out of order in the index", block=i)
            if ref.codec not in (Codec.RAW, Codec.LZ4) or (ref.codec == Codec.RAW and ref.raw != ref.stored):
                raise self._corrupt(f"unknown codec {ref.codec}", block=i)
            if ref.raw < 4 + ref.entries * (ENTRY_KEY_SIZE + 4) + 4:
                raise self._corrupt("block too small for its entries", block=i)
            expect_offset, prev = ref.offset + ref.stored, ref.first
            blocks.append(ref)
        if expect_offset != data_end:
            raise self._corrupt(f"blocks end at {expect_offset}, the index starts at {data_end}")
        return blocks

    # --- blocks ---

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    def close(self) -> None:
        self._f.close()
        with self._lock:
            self._cache.clear()

    def find_block(self, ekey: bytes) -> int:
        """The block holding the last entry at or before `ekey` (-1: before the first entry)."""
        return bisect.bisect_right(self._firsts, ekey) - 1

    def block(self, i: int) -> Block:
        """Block i, from the cache or the file."""
        with self._lock:
            blk = self._cache.get(i)
            if blk is not None:
                self._cache.move_to_end(i)
                return blk
        ref = self._blocks[i]
        blk = self._decode(i, self._f.pread(ref.stored, ref.offset))
        with self._lock:
            self._cache[i] = blk
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return blk

    def iter_blocks(self, start: int = 0) -> Iterator[Block]:
        """Blocks start.. in order, read ahead in large preads and not cached (a scan)."""
        blocks, i = self._blocks, max(start, 0)
        while i < len(blocks):
            j, end = i + 1, blocks[i].offset + blocks[i].stored
            while j < len(blocks) and end - blocks[i].offset < self.READ_AHEAD:
                end += blocks[j].stored
                j += 1
            chunk = self._f.pread(end - blocks[i].offset, blocks[i].offset)
            base = blocks[i].offset
            for k in range(i, j):
                ref = blocks[k]
                yield self._decode(k, chunk[ref.offset - base:ref.offset - base + ref.stored])
            i = j

    def _decode(self, i: int, stored: bytes) -> Block:
        ref = self._blocks[i]
        if len(stored) != ref.stored:
            raise self._corrupt(f"short read ({len(stored)} of {ref.stored} bytes): file truncated", block=i,
                                key=ref.first[:KEY_SIZE])
        if crc32c(stored) != ref.crc:
            raise self._corrupt("block checksum mismatch", block=i, key=ref.first[:KEY_SIZE])
        if ref.codec == Codec.LZ4:
            try:
                raw = lz4.block.decompress(stored, uncompressed_size=ref.raw)
            except Exception as e:  # noqa: BLE001 -- lz4.block.LZ4BlockError, or what a future lz4 raises
                raise self._corrupt(f"block does not decompress: {e}", block=i, key=ref.first[:KEY_SIZE]) from None
            if len(raw) != ref.raw:
                raise self._corrupt(f"block decompresses to {len(raw)} bytes, not {ref.raw}", block=i)
        else:
            raw = stored
        n = _U32.unpack_from(raw, 0)[0]
        keys_end = 4 + n * ENTRY_KEY_SIZE
        base = keys_end + (n + 1) * 4
        if n != ref.entries or base > len(raw):
            raise self._corrupt(f"block holds {n} entries, its index row says {ref.entries}", block=i)
        offs = struct.unpack_from(f">{n + 1}I", raw, keys_end)
        if offs[0] != 0 or base + offs[n] != len(raw):
            raise self._corrupt("block's value offsets do not cover its values", block=i)
        keys = [raw[p:p + ENTRY_KEY_SIZE] for p in range(4, keys_end, ENTRY_KEY_SIZE)]
        if keys[0] != ref.first:
            raise self._corrupt("block's first entry is not the one its index row names", block=i)
        return Block(keys, offs, raw, base)
