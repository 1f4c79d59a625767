"""The layer map: which layers a read of (key, LSN) visits, and the questions GC and
compaction ask about a timeline's layers.

The map keeps the descriptors of a timeline's live layers. For lookups it builds (lazily,
after changes) an index over *elementary key intervals*: the key space cut at every
layer's key range bounds, so each interval is either wholly inside a layer's key range or
wholly outside it. Each interval lists the delta layers over it sorted by LSN start and
the image layers over it sorted by LSN; a lookup is a bisect for the interval and one or
two bisects per layer visited, independent of how many layers the timeline has. Neon's
pageserver/src/tenant/layer_map.rs answers the same questions with a persistent segment
tree over the key space per LSN.

Delta layers over the same key are assumed not to overlap in LSN (compaction replaces L0
deltas with L1 deltas over the same LSN range in one `update`); where they do, the one
starting later is read first and the older one only below its start.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .blockfile import MAX_LSN
from .layer_desc import LayerDesc


class SearchStep(NamedTuple):
    """One layer a read visits: take its versions with LSN in [lsn_floor, lsn_ceil] (an image
    layer: its value at lsn_floor == lsn_ceil, which ends the read)."""

    layer: LayerDesc
    lsn_floor: int
    lsn_ceil: int


@dataclass(slots=True)
class _Interval:
    deltas: list[LayerDesc]  # sorted by (lsn_start, lsn_end)
    delta_starts: list[int]
    images: list[LayerDesc]  # sorted by LSN
    image_lsns: list[int]


class _Index:
    """An immutable snapshot of the map for lookups (a rebuild makes a new one)."""

    __slots__ = ("bounds", "intervals")

    def __init__(self, layers: Iterable[LayerDesc]) -> None:
        layers = sorted(layers, key=lambda d: (d.lsn_start, d.lsn_end, d.key_start))
        self.bounds = sorted({b for d in layers for b in (d.key_start, d.key_end)})
        deltas: list[list[LayerDesc]] = [[] for _ in range(max(len(self.bounds) - 1, 0))]
        images: list[list[LayerDesc]] = [[] for _ in range(len(deltas))]
        bounds = self.bounds
        for d in layers:
            lo = bisect.bisect_left(bounds, d.key_start)
            hi = bisect.bisect_left(bounds, d.key_end)
            target = deltas if d.is_delta else images
            for i in range(lo, hi):
                target[i].append(d)  # in LSN order already
        self.intervals = [_Interval(ds, [d.lsn_start for d in ds], im, [d.lsn_start for d in im])
                          for ds, im in zip(deltas, images)]

    def span(self, d: LayerDesc) -> range | None:
        """Indexes of the intervals `d` covers, None if its bounds are not bounds of the index."""
        bounds = self.bounds
        lo = bisect.bisect_left(bounds, d.key_start)
        hi = bisect.bisect_left(bounds, d.key_end)
        if lo == len(bounds) or bounds[lo] != d.key_start or hi == len(bounds) or bounds[hi] != d.key_end:
            return None
        return range(lo, hi)

    def add(self, d: LayerDesc) -> bool:
        """Add a layer in place if its bounds are already bounds (False: rebuild instead)."""
        span = self.span(d)
        if span is None:
            return False
        sort_key = (d.lsn_start, d.lsn_end, d.key_start)
        for i in span:
            iv = self.intervals[i]
            layers, lsns = (iv.deltas, iv.delta_starts) if d.is_delta else (iv.images, iv.image_lsns)
            at = bisect.bisect_right(layers, sort_key, key=lambda x: (x.lsn_start, x.lsn_end, x.key_start))
            layers.insert(at, d)
            lsns.insert(at, d.lsn_start)
        return True

    def discard(self, d: LayerDesc) -> bool:
        span = self.span(d)
        if span is None:
            return False
        for i in span:
            iv = self.intervals[i]
            layers, lsns = (iv.deltas, iv.delta_starts) if d.is_delta else (iv.images, iv.image_lsns)
            at = layers.index(d)
            del layers[at], lsns[at]
        return True

    def interval(self, key: bytes) -> _Interval | None:
        i = bisect.bisect_right(self.bounds, key) - 1
        if i < 0 or i >= len(self.intervals):
            return None
        return self.intervals[i]

    def overlapping(self, start: bytes, end: bytes) -> tuple[list[_Interval], bool]:
        """The intervals overlapping [start, end), and whether they cover all of it."""
        bounds = self.bounds
        if not bounds or start >= end:
            return [], False
        lo = max(bisect.bisect_right(bounds, start) - 1, 0)
        hi = bisect.bisect_left(bounds, end)
        whole = bounds[0] <= start and end <= bounds[-1]
        return self.intervals[lo:hi], whole


def _newest_image(iv: _Interval, lsn: int) -> LayerDesc | None:
    i = bisect.bisect_right(iv.image_lsns, lsn) - 1
    return iv.images[i] if i >= 0 else None


class LayerMap:
    """The live layers of one timeline. Not thread-safe: callers serialize changes with reads
    (a read-write lock, as Neon's layer map has)."""

    def __init__(self, layers: Iterable[LayerDesc] = ()) -> None:
        self._layers: set[LayerDesc] = set(layers)
        self._index: _Index | None = None

    # --- changes ---

    def insert(self, desc: LayerDesc) -> None:
        """Add a layer. Cheap when its key bounds are bounds of layers already in the map (an L0,
        a layer over the same partitions); otherwise the lookup index is rebuilt at the next read."""
        if desc in self._layers:
            return
        self._layers.add(desc)
        if self._index is not None and not self._index.add(desc):
            self._index = None

    def remove(self, desc: LayerDesc) -> None:
        """Remove a layer (KeyError if it is not in the map)."""
        self._layers.remove(desc)
        if self._index is not None and not self._index.discard(desc):
            self._index = None

    def update(self, add: Iterable[LayerDesc] = (), remove: Iterable[LayerDesc] = ()) -> None:
        """Several changes at once (a compaction's or GC's result): all or nothing."""
        remove = list(remove)
        missing = [d for d in remove if d not in self._layers]
        if missing:
            raise KeyError(f"not in the layer map: {', '.join(map(str, missing))}")
        self._layers.difference_update(remove)
        self._layers.update(add)
        self._index = None

    def __contains__(self, desc: object) -> bool:
        return desc in self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[LayerDesc]:
        return iter(self.layers())

    def layers(self) -> list[LayerDesc]:
        """Every layer, in (LSN start, LSN end, key start, kind) order."""
        return sorted(self._layers, key=lambda d: (d.lsn_start, d.lsn_end, d.key_start, d.kind))

    def _idx(self) -> _Index:
        idx = self._index
        if idx is None:
            idx = self._index = _Index(self._layers)
        return idx

    # --- reads ---

    def search(self, key: bytes, lsn: int) -> list[SearchStep]:
        """The layers a read of `key` as of `lsn` visits, newest first, each with the LSN window
        to take from it. Ends at the newest image layer covering the key at or below `lsn`, or
        where the key's layers end (older history is in an ancestor timeline, or there is none).
        A read may stop earlier, at a version that needs nothing older."""
        iv = self._idx().interval(key)
        steps: list[SearchStep] = []
        if iv is None:
            return steps
        cont = min(lsn, MAX_LSN)
        deltas, starts = iv.deltas, iv.delta_starts
        while cont >= 0:
            di = bisect.bisect_right(starts, cont) - 1
            img = _newest_image(iv, cont)
            if di < 0:
                if img is not None:
                    steps.append(SearchStep(img, img.lsn_start, img.lsn_start))
                break
            d = deltas[di]
            ceil = min(cont, d.lsn_end - 1)
            if img is not None and img.lsn_start >= ceil:  # the image hides what the delta has in reach
                steps.append(SearchStep(img, img.lsn_start, img.lsn_start))
                break
            if img is not None and img.lsn_start >= d.lsn_start:  # the image lies inside the delta's range
                steps.append(SearchStep(d, img.lsn_start + 1, ceil))
                steps.append(SearchStep(img, img.lsn_start, img.lsn_start))
                break
            steps.append(SearchStep(d, d.lsn_start, ceil))
            cont = d.lsn_start - 1
        return steps

    def same_layers(self, first: bytes, last: bytes) -> bool:
        """Whether reads of every key in [first, last] visit the same layers (one elementary interval)."""
        bounds = self._idx().bounds
        return bisect.bisect_right(bounds, first) == bisect.bisect_right(bounds, last)

    # --- what compaction and GC ask ---

    def l0_deltas(self) -> list[LayerDesc]:
        """Delta layers over the whole key space (frozen open layers), oldest first."""
        return sorted((d for d in self._layers if d.is_l0), key=lambda d: (d.lsn_start, d.lsn_end))

    def layers_below(self, lsn: int) -> list[LayerDesc]:
        """Layers holding nothing at or above `lsn` (deltas ending at or below it, images below it)."""
        return sorted((d for d in self._layers if d.lsn_end <= lsn), key=lambda d: (d.lsn_start, d.key_start))

    def delta_depth(self, key_start: bytes, key_end: bytes, lsn: int = MAX_LSN) -> int:
        """The most delta layers a read at `lsn` of a key in [key_start, key_end) visits above the
        newest image layer: when it passes a threshold, compaction writes an image layer."""
        intervals, _ = self._idx().overlapping(key_start, key_end)
        depth = 0
        for iv in intervals:
            img = _newest_image(iv, lsn)
            base = img.lsn_start if img is not None else -1
            n = 0
            for d in iv.deltas[:bisect.bisect_right(iv.delta_starts, lsn)]:
                if d.lsn_end - 1 > base:
                    n += 1
            depth = max(depth, n)
        return depth

    def covered_by_images(self, key_start: bytes, key_end: bytes, lsn_min: int, lsn_max: int) -> bool:
        """Whether every key of [key_start, key_end) has an image layer with LSN in [lsn_min, lsn_max]."""
        if lsn_min > lsn_max:
            return False
        intervals, whole = self._idx().overlapping(key_start, key_end)
        if not whole:
            return False
        for iv in intervals:
            img = _newest_image(iv, lsn_max)
            if img is None or img.lsn_start < lsn_min:
                return False
        return True

    def needed_at(self, desc: LayerDesc, lsn: int) -> bool:
        """Whether some read at exactly `lsn` may visit layer `desc`: it starts at or below `lsn`
        and newer image layers at or below `lsn` do not hide all of its keys."""
        if desc.lsn_start > lsn:
            return False
        newest = desc.lsn_end - 1 if desc.is_delta else desc.lsn_start + 1
        return not self.covered_by_images(desc.key_start, desc.key_end, newest, lsn)

    def gc_candidates(self, horizon: int, retain_lsns: Iterable[int] = ()) -> list[LayerDesc]:
        """Layers no read at or above `horizon`, nor at any of `retain_lsns` (child branch
        points), can visit: whole layers GC may delete."""
        retain = sorted(set(retain_lsns))
        out = []
        for d in self.layers_below(horizon + 1):
            if self.needed_at(d, horizon):
                continue
            if any(self.needed_at(d, b) for b in retain):
                continue
            out.append(d)
        return out
