"""One timeline's layered storage: the open layer, frozen layers on their way to disk, the layer files.

Ingest puts versions into the open layer (open_layer.py). At
`checkpoint_distance` bytes the open layer is frozen (it still answers
reads) and a new one takes the next versions; `flush` writes the oldest
frozen layer out as an L0 delta layer, then saves a manifest naming it with
the new `disk_consistent_lsn`, and only then drops the frozen layer: a crash
at any point leaves the previous manifest or the new one, an orphan file at
worst (removed at open). After a crash everything above
`disk_consistent_lsn` is gone from here and comes back from the walreceiver.

A read of (key, LSN) takes versions newest first from the open layer, the
frozen layers and then the layers the layer map names, until one stands
alone (an image, a file, a deletion or a record that initializes the page);
the caller goes on into the ancestor timeline if none did. Readers of layer
files are opened once and kept.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from .delta_layer import DeltaLayerReader
from .image_layer import ImageLayerReader
from .layer_desc import KEY_MAX, KEY_MIN, LayerDesc
from .layer_map import LayerMap
from .manifest import Manifest, load_manifest, orphan_layers, save_manifest
from .open_layer import LayerRetired, OpenLayer
from .store import LayerStore
from .values import Value

log = logging.getLogger(__name__)

# Neon's default is 256 MiB of WAL per L0 delta layer; the page server sets its own.
DEFAULT_CHECKPOINT_DISTANCE: Final = 64 << 20


class TimelineLayers:
    """Thread-safe: one ingesting thread, one flushing thread, any number of readers."""

    def __init__(self, store: LayerStore, scratch: Path, start_lsn: int,
                 checkpoint_distance: int = DEFAULT_CHECKPOINT_DISTANCE) -> None:
        """Open the timeline's layers in `store` (a timeline with no manifest yet starts empty at
        `start_lsn`); `scratch` holds the ephemeral files of open layers."""
        self.store = store
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        for stale in self.scratch.glob("open-*"):
            stale.unlink()  # a crashed predecessor's open layers: their WAL is resent
        self.checkpoint_distance = checkpoint_distance
        manifest = load_manifest(store)
        if manifest is None:
            manifest = Manifest(disk_consistent_lsn=start_lsn)
            save_manifest(store, manifest)  # the timeline exists from here on, empty at start_lsn
        for name in orphan_layers(store, manifest):
            log.info("removing orphan layer file %s", name)
            store.delete(name)
        self._manifest = manifest
        self.map = LayerMap(manifest.descs())
        self.disk_consistent_lsn = manifest.disk_consistent_lsn
        self.last_lsn = manifest.disk_consistent_lsn  # newest LSN put here
        self._open: OpenLayer | None = None
        self._frozen: list[OpenLayer] = []  # oldest first
        self._readers: dict[LayerDesc, DeltaLayerReader | ImageLayerReader] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    # -- ingest ---------------------------------------------------------------------------

    def _open_layer(self) -> OpenLayer:
        if self._open is None:
            start = self._covered() + 1  # right after what the frozen and flushed layers cover
            self._open = OpenLayer(self.scratch / f"open-{start:016X}", start_lsn=start)
        return self._open

    def put_record(self, lsn: int, raw: bytes, start_lsn: int, pages: list[tuple[bytes, bool]]) -> None:
        """A WAL record ending at `lsn` for `pages` (key, will_init); an empty `pages` only moves the LSN."""
        with self._lock:
            self._next_lsn(lsn)
            if pages:
                self._open_layer().put_record(lsn, raw, start_lsn, pages)

    def put(self, key: bytes, lsn: int, value: Value) -> None:
        """One version (several may share an LSN: what one record did)."""
        with self._lock:
            self._next_lsn(lsn)
            self._open_layer().put(key, lsn, value)

    def _next_lsn(self, lsn: int) -> None:
        """Versions at a new LSN: the previous record is complete, so the open layer may freeze here."""
        if lsn > self.last_lsn:
            if self._open is not None and self._open.size >= self.checkpoint_distance:
                self._freeze()
            self.last_lsn = lsn

    def _covered(self) -> int:
        """The newest LSN the frozen and flushed layers cover."""
        return self._frozen[-1].end_lsn - 1 if self._frozen else self.disk_consistent_lsn

    def _freeze(self) -> None:
        layer = self._open_layer()
        layer.end_lsn = max(layer.end_lsn, self.last_lsn + 1)  # covers every record up to here
        layer.freeze()
        self._frozen.append(layer)
        self._open = None

    def freeze(self) -> bool:
        """Freeze what is open (the next versions go to a new layer); False if nothing new was put."""
        with self._lock:
            if self.last_lsn <= self._covered():
                return False
            self._freeze()
            return True

    @property
    def frozen_count(self) -> int:
        with self._lock:
            return len(self._frozen)

    # -- flush ------------------------------------------------------------------------------

    def flush(self) -> bool:
        """Write the oldest frozen layer to disk and make it part of the timeline; False if there
        was none. disk_consistent_lsn moves to the end of that layer."""
        with self._flush_lock:
            with self._lock:
                if not self._frozen:
                    return False
                layer = self._frozen[0]
            desc = layer.write_delta(self.store) if layer.entries_count else None
            manifest = Manifest(layer.end_lsn - 1, dict(self._manifest.layers), dict(self._manifest.extra))
            if desc is not None:
                manifest.add_layer(desc, self.store.size(desc.file_name))
            save_manifest(self.store, manifest)
            with self._lock:
                if desc is not None:
                    self.map.insert(desc)
                self._manifest = manifest
                self.disk_consistent_lsn = manifest.disk_consistent_lsn
                self._frozen.pop(0)
            layer.close()
            return True

    def flush_all(self) -> None:
        """Freeze what is open and flush everything: all put so far is durable."""
        self.freeze()
        while self.flush():
            pass

    # -- reads --------------------------------------------------------------------------------

    def _reader(self, desc: LayerDesc) -> DeltaLayerReader | ImageLayerReader:
        reader = self._readers.get(desc)
        if reader is None:
            cls = DeltaLayerReader if desc.is_delta else ImageLayerReader
            try:
                opened = cls.open(self.store, desc.file_name)
            except FileNotFoundError:
                raise LayerRetired(f"layer {desc.file_name} was removed") from None
            reader = self._readers.setdefault(desc, opened)
        return reader

    def versions(self, key: bytes, lsn: int) -> tuple[list[tuple[int, Value]], bool]:
        """Versions of `key` at or below `lsn`, newest first, down to one that stands alone; and
        whether one did (if not, the ancestor timeline holds the rest)."""
        while True:
            try:
                return self._versions(key, lsn)
            except LayerRetired:
                continue  # a frozen layer was flushed under this read: its versions are in a file now

    def _versions(self, key: bytes, lsn: int) -> tuple[list[tuple[int, Value]], bool]:
        with self._lock:
            in_memory = ([self._open] if self._open is not None else []) + self._frozen[::-1]
            steps = self.map.search(key, lsn)
        out: list[tuple[int, Value]] = []
        for layer in in_memory:
            if layer.start_lsn > lsn:
                continue
            found, complete = layer.versions(key, lsn)
            out += found
            if complete:
                return out, True
        for step in steps:
            reader = self._reader(step.layer)
            if isinstance(reader, ImageLayerReader):
                # An image layer holds every key of its range that had a value at its LSN: a key
                # it lacks did not exist then, and nothing older (nor the ancestor) is read.
                value = reader.get(key)
                if value is not None:
                    out.append((step.layer.image_lsn, value))
                return out, True
            found = reader.versions(key, step.lsn_ceil, step.lsn_floor)
            out += found
            if found and found[-1][1].complete:
                return out, True
        return out, False

    def versions_many(self, keys: list[bytes], lsn: int) -> list[tuple[list[tuple[int, Value]], bool]]:
        """`versions` of each of `keys` (sorted, close together: a chunk of a relation's pages),
        each layer file read once for all of them where they share their layers."""
        while True:
            try:
                return self._versions_many(keys, lsn)
            except LayerRetired:
                continue

    def _versions_many(self, keys: list[bytes], lsn: int) -> list[tuple[list[tuple[int, Value]], bool]]:
        if not keys:
            return []
        with self._lock:
            in_memory = ([self._open] if self._open is not None else []) + self._frozen[::-1]
            shared = self.map.same_layers(keys[0], keys[-1])
            steps = self.map.search(keys[0], lsn) if shared else []
        if not shared:
            return [self._versions(key, lsn) for key in keys]
        results: list[tuple[list[tuple[int, Value]], bool]] = []
        for key in keys:
            out: list[tuple[int, Value]] = []
            done = False
            for layer in in_memory:
                if layer.start_lsn <= lsn:
                    found, done = layer.versions(key, lsn)
                    out += found
                    if done:
                        break
            results.append((out, done))
        todo = [i for i, (_, done) in enumerate(results) if not done]
        start, end = keys[0], keys[-1] + b"\x00"
        for step in steps:
            if not todo:
                break
            reader = self._reader(step.layer)
            if isinstance(reader, ImageLayerReader):
                values = dict(reader.iter_entries((start, end)))
                for i in todo:
                    value = values.get(keys[i])
                    if value is not None:
                        results[i][0].append((step.layer.image_lsn, value))
                    results[i] = (results[i][0], True)  # the image ends every read (see _versions)
                todo = []
                break
            by_key = reader.encoded_in(start, end, step.lsn_floor, step.lsn_ceil)
            left = []
            for i in todo:
                out, complete = results[i][0], False
                for vlsn, raw in reversed(by_key.get(keys[i], ())):
                    value = reader.decode(raw, keys[i])
                    out.append((vlsn, value))
                    if value.complete:
                        complete = True
                        break
                if complete:
                    results[i] = (out, True)
                else:
                    left.append(i)
            todo = left
        return results

    def _sources(self) -> tuple[list[OpenLayer], list[LayerDesc]]:
        """The in-memory layers (oldest first) and the layer files, as one consistent snapshot."""
        with self._lock:
            return self._frozen + ([self._open] if self._open is not None else []), self.map.layers()

    def versions_between(self, key: bytes, lo: int, hi: int) -> Iterator[tuple[int, Value]]:
        """Every version of `key` with LSN in [lo, hi] that a delta or open layer holds, oldest
        first (image layers are left out: they repeat a version at their LSN). For the keys with
        a version per record or per commit (WAL_RECORD, COMMIT_TIME)."""
        while True:
            try:
                return iter(self._versions_between(key, lo, hi))
            except LayerRetired:
                continue

    def _versions_between(self, key: bytes, lo: int, hi: int) -> list[tuple[int, Value]]:
        in_memory, files = self._sources()
        out: list[tuple[int, Value]] = []
        for desc in files:
            if desc.is_delta and desc.covers_key(key) and desc.lsn_start <= hi and desc.lsn_end > lo:
                reader = self._reader(desc)
                assert isinstance(reader, DeltaLayerReader)
                out += reader.versions_between(key, lo, hi)
        for layer in in_memory:
            out += layer.versions_between(key, lo, hi)
        return out

    def keys(self, start: bytes, end: bytes, lsn: int) -> Iterator[bytes]:
        """Every key in [start, end) that may have a version at or below `lsn`, once each, in
        order (a superset: the caller reads each one's value). Streams over the layer files."""
        while True:
            try:
                in_memory, files = self._sources()
                sources: list[Iterable[bytes]] = [layer.keys(start, end) for layer in in_memory
                                                  if layer.start_lsn <= lsn]
                sources += [self._reader(desc).iter_keys((start, end)) for desc in files
                            if desc.lsn_start <= lsn and desc.overlaps_keys(start, end)]
                break
            except LayerRetired:
                continue
        last = None
        for key in heapq.merge(*sources):
            if key != last:
                yield key
                last = key

    def open_age(self) -> float:
        """Seconds since the open layer took its first version (0 without one)."""
        with self._lock:
            return time.monotonic() - self._open.opened_at if self._open is not None else 0.0

    def checkpoint(self, timeout: float) -> bool:
        """What the page server does every second: freeze the open layer once it is `timeout`
        seconds old, and flush every frozen layer. True if disk_consistent_lsn moved."""
        before = self.disk_consistent_lsn
        with self._lock:
            if self._open is not None and time.monotonic() - self._open.opened_at >= timeout \
                    and self.last_lsn > self._covered():
                self._freeze()
        while self.flush():
            pass
        return self.disk_consistent_lsn != before

    # -- layers written by others: image layers, GC -----------------------------------------

    def add_layer(self, desc: LayerDesc) -> None:
        """Make a layer file already in the store (an image layer) part of the timeline."""
        self.replace_layers([desc], [])

    def open_reader(self, desc: LayerDesc) -> DeltaLayerReader | ImageLayerReader:
        """A reader of one of the timeline's layer files (shared with reads; do not close it)."""
        return self._reader(desc)

    def remove_layers(self, descs: Iterable[LayerDesc]) -> int:
        """Drop layers from the timeline (GC); their files go once the manifest no longer names
        them (reads holding one open finish on it). Bytes freed."""
        return self.replace_layers([], descs)

    def replace_layers(self, add: Iterable[LayerDesc], remove: Iterable[LayerDesc]) -> int:
        """In one manifest: add layer files already in the store, drop others (compaction, GC).
        Bytes of the dropped files, which are deleted once the manifest no longer names them."""
        add, remove = list(add), list(remove)
        if not add and not remove:
            return 0
        with self._flush_lock:
            manifest = Manifest(self._manifest.disk_consistent_lsn, dict(self._manifest.layers),
                                dict(self._manifest.extra))
            freed = 0
            for d in remove:
                freed += manifest.layers.get(d.file_name, 0)
                manifest.remove_layer(d)
            for d in add:
                manifest.add_layer(d, self.store.size(d.file_name))
            save_manifest(self.store, manifest)
            with self._lock:
                self.map.update(add=add, remove=remove)
                self._manifest = manifest
                for d in remove:
                    self._readers.pop(d, None)
        for d in remove:
            self.store.delete(d.file_name)
        return freed

    def descs(self) -> list[LayerDesc]:
        """Every live layer file, in (LSN, key) order."""
        with self._lock:
            return self.map.layers()

    def gc_candidates(self, horizon: int, retain_lsns: Iterable[int]) -> list[LayerDesc]:
        """Layers no read at or above `horizon`, nor at any of `retain_lsns`, visits (LayerMap.gc_candidates)."""
        with self._lock:
            return self.map.gc_candidates(horizon, retain_lsns)

    def has_image_at(self, lsn: int) -> bool:
        """Whether an image layer over the whole key space holds every key as of exactly `lsn`."""
        with self._lock:
            return self.map.covered_by_images(KEY_MIN, KEY_MAX, lsn, lsn)

    def layer_sizes(self) -> dict[str, int]:
        """File name -> bytes of every live layer file."""
        with self._lock:
            return dict(self._manifest.layers)

    def close(self) -> None:
        with self._lock:
            for layer in ([self._open] if self._open else []) + self._frozen:
                layer.close()
            self._open, self._frozen = None, []
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
