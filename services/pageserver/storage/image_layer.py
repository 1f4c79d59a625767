"""Image layers: the value of every key of a key range as of one LSN.

Written by compaction where a key range's delta depth grows (and by GC at its horizon,
import, and CREATE DATABASE copies); a read that reaches one stops there. A key absent
from an image layer has no value at that LSN (the page does not exist). Neon's
counterpart is pageserver/src/tenant/storage_layer/image_layer.rs; the file format is
blockfile.py's, every entry at the layer's LSN.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from ..keys import KEY_SIZE
from .blockfile import LayerKind, entry_key
from .layer_file import LayerFileReader, LayerFileWriter
from .values import Value


class ImageLayerWriter(LayerFileWriter):
    """Writes an image layer: `add` in strictly increasing key order, then `finish`."""

    KIND = LayerKind.IMAGE

    @property
    def lsn(self) -> int:
        return self.desc.image_lsn

    def add(self, key: bytes, value: Value) -> None:
        self._add(key, self.desc.lsn_start, self._encode(value))

    def add_encoded(self, key: bytes, value: bytes) -> None:
        self._add(key, self.desc.lsn_start, value)


class ImageLayerReader(LayerFileReader):
    """An open image layer."""

    KIND = LayerKind.IMAGE

    @property
    def lsn(self) -> int:
        return self.desc.image_lsn

    def get(self, key: bytes) -> Value | None:
        """The value of `key` at the layer's LSN, None if the layer has none."""
        f = self._file
        target = entry_key(key, self.desc.lsn_start)
        b = f.find_block(target)
        if b < 0:
            return None
        blk = f.block(b)
        i = bisect.bisect_left(blk.keys, target)
        if i == len(blk) or blk.keys[i] != target:
            return None
        return self._decode(blk.value(i), target)

    def iter_encoded(self, key_range: tuple[bytes, bytes] | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, encoded value) in key order, optionally only keys in [start, end)."""
        f = self._file
        start, end = key_range if key_range is not None else (None, None)
        b = 0 if start is None else max(f.find_block(entry_key(start[:KEY_SIZE], 0)), 0)
        for blk in f.iter_blocks(b):
            keys = blk.keys
            i = 0 if start is None else bisect.bisect_left(keys, start)
            for j in range(i, len(keys)):
                key = keys[j][:KEY_SIZE]
                if end is not None and key >= end:
                    return
                yield key, blk.value(j)

    def iter_entries(self, key_range: tuple[bytes, bytes] | None = None) -> Iterator[tuple[bytes, Value]]:
        """(key, value) in key order, optionally only keys in [start, end)."""
        for key, raw in self.iter_encoded(key_range):
            yield key, self._decode(raw, key)

    def iter_keys(self, key_range: tuple[bytes, bytes] | None = None) -> Iterator[bytes]:
        for key, _ in self.iter_encoded(key_range):
            yield key
