"""storage.layer_map: `search` against a brute-force scan of every layer, reads through the
map against a model of the whole history, the compaction and GC questions, and speed with
thousands of layers."""

from __future__ import annotations

import random
import time
from itertools import pairwise

import pytest

from services.pageserver.keys import rel_page_key
from services.pageserver.storage.blockfile import MAX_LSN
from services.pageserver.storage.delta_layer import DeltaLayerReader, DeltaLayerWriter
from services.pageserver.storage.image_layer import ImageLayerReader, ImageLayerWriter
from services.pageserver.storage.layer_desc import KEY_MAX, KEY_MIN, LayerDesc
from services.pageserver.storage.layer_map import LayerMap, SearchStep
from services.pageserver.storage.store import MemoryLayerStore
from services.pageserver.storage.values import Value


def key(blk: int) -> bytes:
    return rel_page_key(1663, 5, 16384, 0, blk)


def brute_search(layers: list[LayerDesc], k: bytes, lsn: int) -> list[SearchStep]:
    """The same rules as LayerMap.search, by scanning every layer at every step."""
    steps: list[SearchStep] = []
    cont = min(lsn, MAX_LSN)
    while cont >= 0:
        deltas = [d for d in layers if d.is_delta and d.covers_key(k) and d.lsn_start <= cont]
        images = [d for d in layers if d.is_image and d.covers_key(k) and d.lsn_start <= cont]
        img = max(images, key=lambda d: d.lsn_start, default=None)
        if not deltas:
            if img is not None:
                steps.append(SearchStep(img, img.lsn_start, img.lsn_start))
            break
        d = max(deltas, key=lambda d: (d.lsn_start, d.lsn_end, d.key_start))
        ceil = min(cont, d.lsn_end - 1)
        if img is not None and img.lsn_start >= ceil:
            steps.append(SearchStep(img, img.lsn_start, img.lsn_start))
            break
        if img is not None and img.lsn_start >= d.lsn_start:
            steps += [SearchStep(d, img.lsn_start + 1, ceil), SearchStep(img, img.lsn_start, img.lsn_start)]
            break
        steps.append(SearchStep(d, d.lsn_start, ceil))
        cont = d.lsn_start - 1
    return steps


def random_layers(rng: random.Random, nbands: int, nkeys: int, max_parts: int = 6,
                  image_every: float = 0.3) -> list[LayerDesc]:
    """A plausible timeline: LSN bands, each one L0 delta or key-partitioned L1 deltas, and image
    layers over key partitions at LSNs anywhere (inside or between bands)."""
    layers: list[LayerDesc] = []
    lsn = 100
    for _ in range(nbands):
        end = lsn + rng.randint(1, 50)
        if rng.random() < 0.5:
            layers.append(LayerDesc.delta(KEY_MIN, KEY_MAX, lsn, end))
        else:
            cuts = sorted(rng.sample(range(1, nkeys), min(rng.randint(1, max_parts), nkeys - 1)))
            bounds = [KEY_MIN, *(key(c) for c in cuts), KEY_MAX]
            layers += [LayerDesc.delta(a, b, lsn, end) for a, b in pairwise(bounds)]
        if rng.random() < image_every:
            cuts = sorted(rng.sample(range(1, nkeys), min(rng.randint(0, max_parts), nkeys - 1)))
            bounds = [KEY_MIN, *(key(c) for c in cuts), KEY_MAX]
            at = rng.randrange(lsn, end + 1)
            for a, b in pairwise(bounds):
                if rng.random() < 0.7:
                    layers.append(LayerDesc.image(a, b, at))
        lsn = end
    return layers


@pytest.mark.parametrize("seed", range(8))
def test_search_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    layers = random_layers(rng, 30, 50)
    lm = LayerMap(layers)
    assert len(lm) == len(set(layers))
    top = max(d.lsn_end for d in layers)
    for _ in range(400):
        k, lsn = key(rng.randrange(0, 52)), rng.randrange(0, top + 20)
        got = lm.search(k, lsn)
        assert got == brute_search(layers, k, lsn), (k.hex(), lsn)
        # newest first, windows inside each layer, never overlapping
        for a, b in pairwise(got):
            assert b.lsn_ceil < a.lsn_floor
        for s in got:
            assert s.layer.lsn_start <= s.lsn_floor <= s.lsn_ceil < s.layer.lsn_end and s.lsn_ceil <= lsn
        if got:
            assert got[-1].layer.is_image or all(s.layer.is_delta for s in got)


def test_remove_insert_update() -> None:
    rng = random.Random(1)
    layers = random_layers(rng, 20, 30)
    lm = LayerMap()
    for d in layers:
        lm.insert(d)
    gone = rng.sample(layers, 10)
    lm.search(key(1), 10_000)  # the index exists: removals below change it in place
    for d in gone[:5]:
        lm.remove(d)
    lm.update(remove=gone[5:], add=[LayerDesc.image(KEY_MIN, KEY_MAX, 5000)])
    live = [d for d in set(layers) if d not in gone] + [LayerDesc.image(KEY_MIN, KEY_MAX, 5000)]
    assert sorted(lm.layers(), key=str) == sorted(live, key=str)
    for _ in range(200):
        k, lsn = key(rng.randrange(32)), rng.randrange(6000)
        assert lm.search(k, lsn) == brute_search(live, k, lsn)
    with pytest.raises(KeyError):
        lm.remove(gone[0])
    with pytest.raises(KeyError):
        lm.update(remove=[gone[0]], add=[LayerDesc.image(KEY_MIN, KEY_MAX, 6000)])
    assert LayerDesc.image(KEY_MIN, KEY_MAX, 6000) not in lm  # all or nothing


def test_reads_through_the_map_match_the_history() -> None:
    """Write real layers from one history and read (key, LSN) through search + layer reads."""
    rng = random.Random(4)
    nkeys = 40
    history: dict[bytes, list[tuple[int, Value]]] = {key(b): [] for b in range(nkeys)}
    for k, vs in history.items():
        for lsn in sorted(rng.sample(range(100, 600), 25)):
            vs.append((lsn, Value.record(f"{k.hex()}@{lsn}".encode(), will_init=rng.random() < 0.05)))
    store = MemoryLayerStore()
    lm = LayerMap()
    layers = random_layers(rng, 12, nkeys, max_parts=4, image_every=0.6)
    # stretch the bands to cover LSN 100..600
    top = max(d.lsn_end for d in layers)
    scale = 500 / (top - 100)

    def s(lsn: int) -> int:
        return 100 + round((lsn - 100) * scale)

    for d in layers:
        if d.is_delta:
            nd = LayerDesc.delta(d.key_start, d.key_end, s(d.lsn_start), s(d.lsn_end))
            if nd.lsn_start >= nd.lsn_end or nd in lm:
                continue
            dw = DeltaLayerWriter(store, nd)
            for k, vs in history.items():
                if nd.covers_key(k):
                    for lsn, v in vs:
                        if nd.lsn_start <= lsn < nd.lsn_end:
                            dw.add(k, lsn, v)
            lm.insert(dw.finish())
        else:
            nd = LayerDesc.image(d.key_start, d.key_end, s(d.lsn_start))
            if nd in lm:
                continue
            iw = ImageLayerWriter(store, nd)
            for k in history:
                if nd.covers_key(k):
                    iw.add(k, Value.image(f"image {k.hex()}@{nd.image_lsn}".encode()))
            lm.insert(iw.finish())
    readers = {d: (DeltaLayerReader if d.is_delta else ImageLayerReader).open(store, d.file_name) for d in lm}
    lsn_max = max(d.lsn_end for d in lm) - 1

    def layered_read(k: bytes, lsn: int) -> list[tuple[int, Value]]:
        out: list[tuple[int, Value]] = []
        for step in lm.search(k, lsn):
            r = readers[step.layer]
            if isinstance(r, ImageLayerReader):
                v = r.get(k)
                assert v is not None
                out.append((r.lsn, v))
                break
            assert isinstance(r, DeltaLayerReader)
            out += r.versions(k, step.lsn_ceil, step.lsn_floor)
            if out and out[-1][1].complete:
                break
        return out

    def model_read(k: bytes, lsn: int) -> list[tuple[int, Value]]:
        images = [d.image_lsn for d in lm if d.is_image and d.covers_key(k) and d.image_lsn <= lsn]
        base = max(images, default=-1)
        out = []
        for vlsn, v in reversed(history[k]):
            if vlsn <= lsn and vlsn > base:
                out.append((vlsn, v))
                if v.complete:
                    return out
        if base >= 0:
            out.append((base, Value.image(f"image {k.hex()}@{base}".encode())))
        return out

    for _ in range(1500):
        k, lsn = key(rng.randrange(nkeys)), rng.randrange(90, lsn_max + 1)
        assert layered_read(k, lsn) == model_read(k, lsn), (k.hex(), lsn)


def test_l0_layers_below_and_depth() -> None:
    l0a, l0b = LayerDesc.delta(KEY_MIN, KEY_MAX, 10, 20), LayerDesc.delta(KEY_MIN, KEY_MAX, 20, 30)
    l1 = [LayerDesc.delta(KEY_MIN, key(50), 30, 40), LayerDesc.delta(key(50), KEY_MAX, 30, 40)]
    img = LayerDesc.image(key(50), KEY_MAX, 39)
    lm = LayerMap([l0a, l0b, *l1, img])
    assert lm.l0_deltas() == [l0a, l0b]
    assert lm.layers_below(30) == [l0a, l0b] and lm.layers_below(40) == [l0a, l0b, *l1, img]
    assert lm.delta_depth(KEY_MIN, key(50)) == 3
    assert lm.delta_depth(key(50), KEY_MAX) == 0  # the image at 39 hides everything
    assert lm.delta_depth(KEY_MIN, KEY_MAX) == 3
    assert lm.delta_depth(key(60), key(70), lsn=38) == 3  # below the image
    assert lm.delta_depth(key(60), key(70), lsn=25) == 2
    assert lm.covered_by_images(key(50), KEY_MAX, 0, 39)
    assert not lm.covered_by_images(key(49), KEY_MAX, 0, 39)
    assert not lm.covered_by_images(key(50), KEY_MAX, 40, 100)
    assert not LayerMap().covered_by_images(KEY_MIN, KEY_MAX, 0, 1)


def test_gc_candidates() -> None:
    d1, d2 = LayerDesc.delta(KEY_MIN, KEY_MAX, 10, 20), LayerDesc.delta(KEY_MIN, KEY_MAX, 20, 30)
    half = LayerDesc.image(KEY_MIN, key(50), 29)
    lm = LayerMap([d1, d2, half])
    assert lm.gc_candidates(100) == []  # keys above 50 have no image: every delta is needed
    full = LayerDesc.image(key(50), KEY_MAX, 35)
    lm.insert(full)
    assert lm.gc_candidates(100) == [d1, d2]
    assert lm.gc_candidates(34) == []  # the image at 35 is above the horizon
    assert lm.gc_candidates(100, retain_lsns=[25]) == []  # a branch at 25 reads d2 and d1
    assert lm.gc_candidates(100, retain_lsns=[5]) == [d1, d2]  # nothing there yet
    newer = LayerDesc.image(KEY_MIN, KEY_MAX, 50)
    lm.insert(newer)
    assert lm.gc_candidates(60) == [d1, d2, half, full]
    assert lm.gc_candidates(60, retain_lsns=[40]) == [d1, d2]  # a read at 40 stops at half/full
    assert not lm.needed_at(newer, 49) and lm.needed_at(newer, 50)


def test_search_speed_with_thousands_of_layers() -> None:
    rng = random.Random(2)
    nkeys = 100_000
    layers: list[LayerDesc] = []
    lsn = 1000
    for band in range(400):  # 400 LSN bands of 10 key partitions each, images every 20 bands, 20 L0s on top
        end = lsn + 100
        cuts = sorted(rng.sample(range(1, nkeys), 9))
        bounds = [KEY_MIN, *(key(c) for c in cuts), KEY_MAX]
        layers += [LayerDesc.delta(a, b, lsn, end) for a, b in pairwise(bounds)]
        if band % 20 == 19:
            layers += [LayerDesc.image(a, b, end - 1) for a, b in pairwise(bounds)]
        lsn = end
    for _ in range(20):
        layers.append(LayerDesc.delta(KEY_MIN, KEY_MAX, lsn, lsn + 100))
        lsn += 100
    lm = LayerMap(layers)
    t0 = time.perf_counter()
    lm.search(key(5), lsn)  # builds the index
    build = time.perf_counter() - t0
    queries = [(key(rng.randrange(nkeys)), rng.randrange(1000, lsn)) for _ in range(3000)]
    t0 = time.perf_counter()
    results = [lm.search(k, q) for k, q in queries]
    per_search = (time.perf_counter() - t0) / len(queries)
    for (k, q), got in list(zip(queries, results))[:40]:
        assert got == brute_search(layers, k, q)
    t0 = time.perf_counter()
    for i in range(20):  # new L0s and image layers over existing partitions change the index in place
        lm.insert(LayerDesc.delta(KEY_MIN, KEY_MAX, lsn, lsn + 100))
        lm.insert(LayerDesc.image(KEY_MIN, KEY_MAX, lsn + 50))
        lm.search(key(i), lsn + 60)
        lsn += 100
    per_insert = (time.perf_counter() - t0) / 40
    lm.remove(LayerDesc.image(KEY_MIN, KEY_MAX, lsn - 50))
    layers = lm.layers()
    for k, q in queries[:40] + [(key(9), lsn - 1), (key(99_999), lsn - 30)]:
        assert lm.search(k, q) == brute_search(layers, k, q)
    print(f"\n{len(layers)} layers: index built in {build * 1e3:.0f} ms, {per_search * 1e6:.1f} us per search,"
          f" {per_insert * 1e3:.1f} ms per insert")
    assert build < 5 and per_search < 2e-3 and per_insert < 0.1  # generous: a shared 2-core machine
