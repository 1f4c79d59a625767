"""The open layer: a timeline's versions since its last delta layer, in memory and an ephemeral file.

Ingest appends here and nowhere else: no fsync, no database row per record.
The values go to an append-only file (never fsynced: after a crash the
walreceiver resends everything above `disk_consistent_lsn`), the last
megabyte of it in a buffer; an index in memory maps each key to a compact
array of (LSN, offset and kind) pairs in LSN order, so a million versions
cost about 16 MB of index, not a million Python objects. A WAL record
that touches several pages is stored once and indexed under each of them
(with its own will_init flag per page).

When the layer is big or old enough, the timeline freezes it (no more
appends; reads go on) and starts a new one; the flusher writes the frozen
layer out as an L0 delta layer (`write_delta`, from `entries()` in key, LSN
order) and then drops it. Neon's counterpart is InMemoryLayer in
pageserver/src/tenant/storage_layer/inmemory_layer.rs.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from ..keys import KIND_DELETED, KIND_FILE, KIND_IMAGE, KIND_RECORD, KIND_RECORD_INIT
from .delta_layer import DeltaLayerWriter
from .errors import StorageError
from .layer_desc import KEY_MAX, KEY_MIN, LayerDesc
from .store import LayerStore
from .values import Value

# An index entry packs the kind into the low bits of the offset.
_KIND_BITS: Final = 3
_KIND_MASK: Final = (1 << _KIND_BITS) - 1
_KINDS: Final = (KIND_IMAGE, KIND_RECORD, KIND_RECORD_INIT, KIND_FILE, KIND_DELETED)
_KIND_CODE: Final = {k: i for i, k in enumerate(_KINDS)}
_INCOMPLETE: Final = _KIND_CODE[KIND_RECORD]  # the only kind that needs an older version

_BLOB_HEADER = struct.Struct("<IQ")  # data length, record start LSN (0 for other kinds)
_FLUSH_AT: Final = 1 << 20


class OpenLayerError(StorageError):
    """Misuse of an open layer (an append after freezing, LSNs going backwards)."""


class LayerRetired(StorageError):
    """The layer was closed (flushed and dropped) while a read was about to use it: read again."""


class OpenLayer:
    """Versions of one timeline with LSNs in [start_lsn, end_lsn); thread-safe: one appender,
    any number of readers."""

    def __init__(self, path: Path, start_lsn: int) -> None:
        self.path = Path(path)
        self.start_lsn = start_lsn
        self.end_lsn = start_lsn  # one past the newest version's LSN once it has one
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._written = 0  # bytes in the file
        self._tail = bytearray()  # bytes after _written, not yet in the file
        self._index: dict[bytes, array[int]] = {}
        self._lock = threading.Lock()
        self._frozen = False
        self.entries_count = 0
        self.opened_at = time.monotonic()

    # -- appending ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of values held (the freeze threshold compares against it)."""
        return self._written + len(self._tail)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def _append_blob(self, data: bytes, start_lsn: int) -> int:
        offset = self._written + len(self._tail)
        self._tail += _BLOB_HEADER.pack(len(data), start_lsn)
        self._tail += data
        if len(self._tail) >= _FLUSH_AT:
            self._flush_tail()
        return offset

    def _flush_tail(self) -> None:
        view = memoryview(self._tail)
        pos = self._written
        while view:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n
        self._written = pos
        self._tail = bytearray()

    def _index_entry(self, key: bytes, lsn: int, offset: int, kind: int) -> None:
        entries = self._index.get(key)
        if entries is None:
            entries = self._index[key] = array("Q")
        elif entries[-2] >= lsn:
            if entries[-2] > lsn:
                raise OpenLayerError(f"version at {lsn:X} for a key already at {entries[-2]:X}: LSNs go backwards")
            # One version per (key, LSN): a second one at the same LSN (a size set twice by one
            # record) replaces the first; its bytes stay in the file unreferenced.
            entries[-1] = offset << _KIND_BITS | _KIND_CODE[kind]
            return
        entries.append(lsn)
        entries.append(offset << _KIND_BITS | _KIND_CODE[kind])

    def _check_lsn(self, lsn: int) -> None:
        if self._frozen:
            raise OpenLayerError(f"open layer {self.path.name} is frozen")
        if lsn < self.start_lsn:
            raise OpenLayerError(f"version at {lsn:X} is below the layer's start {self.start_lsn:X}")

    def put_record(self, lsn: int, raw: bytes, start_lsn: int, pages: Sequence[tuple[bytes, bool]]) -> None:
        """A WAL record ending at `lsn` that applies to each of `pages` (key, will_init): stored once."""
        with self._lock:
            self._check_lsn(lsn)
            offset = self._append_blob(raw, start_lsn)
            for key, will_init in pages:
                self._index_entry(key, lsn, offset, KIND_RECORD_INIT if will_init else KIND_RECORD)
            self.entries_count += len(pages)
            self.end_lsn = max(self.end_lsn, lsn + 1)

    def put(self, key: bytes, lsn: int, value: Value) -> None:
        """Any one version (an image, a file, a deletion, or a record for one page)."""
        with self._lock:
            self._check_lsn(lsn)
            offset = self._append_blob(value.data, value.start_lsn)
            self._index_entry(key, lsn, offset, value.kind)
            self.entries_count += 1
            self.end_lsn = max(self.end_lsn, lsn + 1)

    def freeze(self) -> None:
        """No more appends; reads and `entries()` go on."""
        with self._lock:
            self._frozen = True
            self._flush_tail()

    # -- reading -------------------------------------------------------------------------------

    def _read_blob(self, offset: int) -> tuple[bytes, int]:
        written = self._written
        if offset >= written:
            tail = self._tail
            at = offset - written
            length, start_lsn = _BLOB_HEADER.unpack_from(tail, at)
            return bytes(tail[at + _BLOB_HEADER.size:at + _BLOB_HEADER.size + length]), start_lsn
        header = os.pread(self._fd, _BLOB_HEADER.size, offset)
        length, start_lsn = _BLOB_HEADER.unpack(header)
        data = os.pread(self._fd, length, offset + _BLOB_HEADER.size)
        if len(data) != length:
            raise StorageError(f"open layer {self.path}: short read at offset {offset}")
        return data, start_lsn

    def _value(self, packed: int) -> Value:
        kind = _KINDS[packed & _KIND_MASK]
        data, start_lsn = self._read_blob(packed >> _KIND_BITS)
        return Value(kind, data, start_lsn if kind in (KIND_RECORD, KIND_RECORD_INIT) else 0)

    def versions(self, key: bytes, lsn: int) -> tuple[list[tuple[int, Value]], bool]:
        """The versions of `key` at or below `lsn`, newest first, up to the first that stands alone;
        and whether one did (if not, older layers hold the rest)."""
        out: list[tuple[int, Value]] = []
        with self._lock:
            if self._fd < 0:
                raise LayerRetired(f"open layer {self.path.name} was dropped")
            entries = self._index.get(key)
            if entries is None:
                return out, False
            i = _bisect_pairs(entries, lsn, len(entries) // 2)
            while i > 0:
                i -= 1
                packed = entries[2 * i + 1]
                out.append((entries[2 * i], self._value(packed)))
                if packed & _KIND_MASK != _INCOMPLETE:
                    return out, True
        return out, False

    def keys(self, start: bytes | None = None, end: bytes | None = None) -> list[bytes]:
        """The keys with versions here, sorted (only those in [start, end) if given)."""
        with self._lock:
            if self._fd < 0:
                raise LayerRetired(f"open layer {self.path.name} was dropped")
            keys = list(self._index)
        if start is not None or end is not None:
            lo, hi = start or b"", end
            keys = [k for k in keys if k >= lo and (hi is None or k < hi)]
        keys.sort()
        return keys

    def versions_between(self, key: bytes, lo: int, hi: int) -> list[tuple[int, Value]]:
        """Every version of `key` with LSN in [lo, hi], oldest first."""
        with self._lock:
            if self._fd < 0:
                raise LayerRetired(f"open layer {self.path.name} was dropped")
            entries = self._index.get(key)
            if entries is None:
                return []
            n = len(entries) // 2
            first = _bisect_pairs(entries, lo - 1, n)
            last = _bisect_pairs(entries, hi, n)
            return [(entries[2 * i], self._value(entries[2 * i + 1])) for i in range(first, last)]

    def lsn_span(self, key: bytes) -> tuple[int, int] | None:
        """(oldest, newest) LSN of the versions of `key` here, None if it has none."""
        with self._lock:
            entries = self._index.get(key)
            return (entries[0], entries[-2]) if entries else None

    def entries(self) -> Iterator[tuple[bytes, int, Value]]:
        """Every version in (key, LSN) order: what the delta layer written from a frozen layer holds."""
        if not self._frozen:
            raise OpenLayerError("only a frozen layer is written out")
        for key in sorted(self._index):
            entries = self._index[key]
            for i in range(0, len(entries), 2):
                yield key, entries[i], self._value(entries[i + 1])

    def write_delta(self, store: LayerStore) -> LayerDesc:
        """Write the frozen layer out as an L0 delta layer (every key; LSNs [start_lsn, end_lsn)) into
        `store`, streaming (memory stays bounded); the new layer's descriptor. Nothing is left in the
        store if this fails."""
        if self.end_lsn == self.start_lsn:
            raise OpenLayerError("an empty open layer is not written out")
        writer = DeltaLayerWriter(store, LayerDesc.delta(KEY_MIN, KEY_MAX, self.start_lsn, self.end_lsn))
        try:
            for key, lsn, value in self.entries():
                writer.add(key, lsn, value)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise

    def close(self, remove: bool = True) -> None:
        with self._lock:
            os.close(self._fd)
            self._fd = -1
            if remove:
                self.path.unlink(missing_ok=True)


def _bisect_pairs(entries: array[int], lsn: int, n: int) -> int:
    """Index of the first (LSN, packed) pair whose LSN is above `lsn`."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if entries[2 * mid] <= lsn:
            lo = mid + 1
        else:
            hi = mid
    return lo
