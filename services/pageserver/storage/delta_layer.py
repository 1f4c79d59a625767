"""Delta layers: the versions of a key range over an LSN range, sorted by (key, LSN).

Frozen open layers become L0 delta layers (the whole key space, the LSN range the open
layer took in); compaction rewrites them as L1 delta layers over key partitions. A read
of (key, LSN) takes from each delta layer on its way `versions(key, lsn)`: the versions at
or below the LSN, newest first, down to the first that needs nothing older (an image, a
record that initializes the page, a file or a deletion). Neon's counterpart is
pageserver/src/tenant/storage_layer/delta_layer.rs; the file format is blockfile.py's.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from ..keys import KEY_SIZE
from .blockfile import MAX_LSN, Block, LayerKind, entry_key
from .layer_file import LayerFileReader, LayerFileWriter
from .values import Value


class DeltaLayerWriter(LayerFileWriter):
    """Writes a delta layer: `add` in strictly increasing (key, LSN) order (LayerWriteError
    otherwise, and for a key or LSN outside the layer's ranges), then `finish`."""

    KIND = LayerKind.DELTA

    def add(self, key: bytes, lsn: int, value: Value) -> None:
        self._add(key, lsn, self._encode(value))

    def add_encoded(self, key: bytes, lsn: int, value: bytes) -> None:
        """Add a value already encoded (a compaction copying entries from another layer)."""
        self._add(key, lsn, value)


class DeltaLayerReader(LayerFileReader):
    """An open delta layer."""

    KIND = LayerKind.DELTA

    def versions(self, key: bytes, lsn: int, floor: int = 0) -> list[tuple[int, Value]]:
        """The versions of `key` with LSN in [floor, lsn], newest first, ending at the first one
        that needs nothing older (Value.complete) if there is one in reach."""
        if lsn < 0 or lsn < floor:
            return []
        f = self._file
        target = entry_key(key, min(lsn, MAX_LSN))
        b = f.find_block(target)
        if b < 0:
            return []
        blk = f.block(b)
        i = bisect.bisect_right(blk.keys, target) - 1
        out: list[tuple[int, Value]] = []
        floor_key = entry_key(key, max(floor, 0))
        while True:
            keys = blk.keys
            while i >= 0:
                ek = keys[i]
                if ek < floor_key or not ek.startswith(key):
                    return out
                value = self._decode(blk.value(i), ek)
                out.append((int.from_bytes(ek[KEY_SIZE:], "big"), value))
                if value.complete:
                    return out
                i -= 1
            b -= 1
            if b < 0:
                return out
            blk = f.block(b)
            i = len(blk) - 1

    def versions_between(self, key: bytes, lo: int, hi: int) -> list[tuple[int, Value]]:
        """The versions of `key` with LSN in [lo, hi], oldest first."""
        out: list[tuple[int, Value]] = []
        start, stop = entry_key(key, max(lo, 0)), entry_key(key, min(hi, MAX_LSN))
        for blk, i in self._blocks_from(start):
            keys = blk.keys
            for j in range(i, len(keys)):
                ek = keys[j]
                if ek > stop:
                    return out
                out.append((int.from_bytes(ek[KEY_SIZE:], "big"), self._decode(blk.value(j), ek)))
        return out

    def encoded_in(self, start: bytes, end: bytes, floor: int, ceil: int) -> dict[bytes, list[tuple[int, bytes]]]:
        """key -> [(LSN, encoded value)] oldest first, of the keys in [start, end) with LSN in
        [floor, ceil]: one pass over the blocks of a key range (a base backup's chunk of pages)."""
        out: dict[bytes, list[tuple[int, bytes]]] = {}
        for key, lsn, raw in self.iter_encoded((start, end)):
            if floor <= lsn <= ceil:
                out.setdefault(key, []).append((lsn, raw))
        return out

    def decode(self, raw: bytes, key: bytes) -> Value:
        return self._decode(raw, key)

    def _blocks_from(self, start: bytes | None) -> Iterator[tuple[Block, int]]:
        """Blocks in order from the one holding entry key `start`, each with the position to start at."""
        f = self._file
        if start is None:
            for blk in f.iter_blocks(0):
                yield blk, 0
            return
        b = max(f.find_block(start), 0)
        first = True
        for blk in f.iter_blocks(b):
            yield blk, bisect.bisect_left(blk.keys, start) if first else 0
            first = False

    def iter_encoded(self, key_range: tuple[bytes, bytes] | None = None) -> Iterator[tuple[bytes, int, bytes]]:
        """(key, LSN, encoded value) of every entry, in (key, LSN) order, optionally only of keys in
        [start, end): what compaction copies."""
        start, end = key_range if key_range is not None else (None, None)
        for blk, i in self._blocks_from(None if start is None else entry_key(start[:KEY_SIZE], 0)):
            keys = blk.keys
            for j in range(i, len(keys)):
                ek = keys[j]
                key = ek[:KEY_SIZE]
                if start is not None and key < start:
                    continue
                if end is not None and key >= end:
                    return
                yield key, int.from_bytes(ek[KEY_SIZE:], "big"), blk.value(j)

    def iter_entries(self, key_range: tuple[bytes, bytes] | None = None) -> Iterator[tuple[bytes, int, Value]]:
        """(key, LSN, value) of every entry in (key, LSN) order, optionally only keys in [start, end)."""
        for key, lsn, raw in self.iter_encoded(key_range):
            yield key, lsn, self._decode(raw, key)

    def iter_keys(self, key_range: tuple[bytes, bytes] | None = None) -> Iterator[bytes]:
        """Each distinct key once, in order (without decoding values), optionally only keys in
        [start, end)."""
        start, end = key_range if key_range is not None else (None, None)
        last = None
        for blk, i in self._blocks_from(None if start is None else entry_key(start[:KEY_SIZE], 0)):
            keys = blk.keys
            for j in range(i, len(keys)):
                key = keys[j][:KEY_SIZE]
                if key != last:
                    if start is not None and key < start:
                        continue
                    if end is not None and key >= end:
                        return
                    yield key
                    last = key
