"""A timeline's layered storage against a brute-force model: puts, freezes, flushes to delta layers,
crashes (everything above disk_consistent_lsn lost, orphans removed) and reopens, reads throughout."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.pageserver.keys import KIND_RECORD, RelTag
from services.pageserver.storage.compaction import compact_l0
from services.pageserver.storage.image_layer import ImageLayerWriter
from services.pageserver.storage.layer_desc import KEY_MAX, KEY_MIN, LayerDesc
from services.pageserver.storage.manifest import load_manifest
from services.pageserver.storage.store import DiskLayerStore, LayerStore, MemoryLayerStore
from services.pageserver.storage.timeline_layers import TimelineLayers
from services.pageserver.storage.values import Value

REL = RelTag(1663, 5, 16384, 0)
START = 0x1000


def key(blk: int) -> bytes:
    return REL.page_key(blk)


def _model(model: list[tuple[bytes, int, Value]], k: bytes, lsn: int) -> tuple[list[tuple[int, Value]], bool]:
    out = []
    for kk, vl, v in sorted(model, key=lambda e: e[1], reverse=True):
        if kk == k and vl <= lsn:
            out.append((vl, v))
            if v.kind != KIND_RECORD:
                return out, True
    return out, False


_op = st.one_of(
    st.tuples(st.just("record"), st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=3,
                                          unique_by=lambda p: p[0])),
    st.tuples(st.just("image"), st.integers(0, 9)),
    st.tuples(st.just("freeze"), st.none()),
    st.tuples(st.just("flush"), st.none()),
    st.tuples(st.just("crash"), st.none()),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_op, min_size=1, max_size=60), st.booleans(), st.data())
def test_reads_match_the_model_through_flushes_and_crashes(tmp_path_factory: pytest.TempPathFactory,
                                                           ops: list[tuple[str, object]], on_disk: bool,
                                                           data: st.DataObject) -> None:
    tmp = tmp_path_factory.mktemp("tl")
    store: LayerStore = DiskLayerStore(tmp / "layers") if on_disk else MemoryLayerStore()
    tl = TimelineLayers(store, tmp / "scratch", START, checkpoint_distance=20_000)
    model: list[tuple[bytes, int, Value]] = []
    lsn = START
    try:
        for op, arg in ops:
            if op == "record":
                lsn += 8 * data.draw(st.integers(1, 30))
                pages = [(key(b), init) for b, init in arg]  # type: ignore[union-attr]
                raw = lsn.to_bytes(8, "big") * data.draw(st.integers(1, 500))
                tl.put_record(lsn, raw, lsn - 8, pages)
                model += [(k, lsn, Value.record(raw, will_init=init, start_lsn=lsn - 8)) for k, init in pages]
            elif op == "image":
                lsn += 8
                value = Value.image(lsn.to_bytes(8, "big") * 1024)
                tl.put(key(arg), lsn, value)  # type: ignore[arg-type]
                model.append((key(arg), lsn, value))  # type: ignore[arg-type]
            elif op == "freeze":
                tl.freeze()
            elif op == "flush":
                tl.flush()
            else:  # crash: what is not flushed is lost; the WAL above disk_consistent_lsn comes again
                durable = tl.disk_consistent_lsn
                tl.close()
                tl = TimelineLayers(store, tmp / "scratch", START, checkpoint_distance=20_000)
                assert tl.disk_consistent_lsn == durable
                model = [e for e in model if e[1] <= durable]
                lsn = durable  # the WAL above it comes again, from here
            for _ in range(3):
                blk = data.draw(st.integers(0, 10))
                at = data.draw(st.integers(START, lsn + 8))
                assert tl.versions(key(blk), at) == _model(model, key(blk), at)
            # Many keys at once (a base backup's chunk): what one key at a time answers.
            at = data.draw(st.integers(START, lsn + 8))
            chunk = [key(b) for b in range(data.draw(st.integers(0, 5)), data.draw(st.integers(5, 11)))]
            assert tl.versions_many(chunk, at) == [_model(model, k, at) for k in chunk]
            # Range reads: the keys with versions up to an LSN (a superset is allowed, never fewer)
            # and every version of a key in an LSN window, oldest first.
            at = data.draw(st.integers(START, lsn + 8))
            lo, hi = key(data.draw(st.integers(0, 5))), key(data.draw(st.integers(5, 11)))
            listed = list(tl.keys(lo, hi, at))
            assert listed == sorted(set(listed)) and all(lo <= k < hi for k in listed)
            assert {k for k, vl, _ in model if lo <= k < hi and vl <= at} <= set(listed)
            blk, a = data.draw(st.integers(0, 10)), data.draw(st.integers(START, lsn + 8))
            b = data.draw(st.integers(a, lsn + 8))
            assert list(tl.versions_between(key(blk), a, b)) == sorted(
                ((vl, v) for k, vl, v in model if k == key(blk) and a <= vl <= b), key=lambda e: e[0])
        tl.flush_all()
        assert tl.disk_consistent_lsn == max(lsn, START)
        manifest = load_manifest(store)
        assert manifest is not None and manifest.disk_consistent_lsn == tl.disk_consistent_lsn
        for blk in range(10):
            assert tl.versions(key(blk), lsn) == _model(model, key(blk), lsn)
    finally:
        tl.close()


def test_orphans_and_stale_open_layers_are_removed_at_open(tmp_path: Path) -> None:
    store = DiskLayerStore(tmp_path / "layers")
    tl = TimelineLayers(store, tmp_path / "scratch", START)
    tl.put(key(1), START + 8, Value.image(b"x" * 8192))
    tl.flush_all()
    kept = set(store.list())
    tl.put(key(2), START + 16, Value.image(b"y" * 8192))
    tl.close()
    # A layer written but never named by a manifest (a crash between the two), and an open layer's file.
    orphan = LayerDesc.delta(KEY_MIN, KEY_MAX, START + 9, START + 17).file_name
    with store.create(orphan) as w:
        w.write(b"junk")
        w.finish(orphan)
    (tmp_path / "scratch" / "open-0000000000001011").write_bytes(b"junk")
    tl = TimelineLayers(store, tmp_path / "scratch", START)
    assert set(store.list()) == kept
    assert list((tmp_path / "scratch").iterdir()) == []
    assert tl.versions(key(1), START + 100) == ([(START + 8, Value.image(b"x" * 8192))], True)
    assert tl.versions(key(2), START + 100) == ([], False)
    tl.close()


def test_reads_go_on_while_layers_freeze_and_flush(tmp_path: Path) -> None:
    tl = TimelineLayers(MemoryLayerStore(), tmp_path / "scratch", START, checkpoint_distance=50_000)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            found, complete = tl.versions(key(0), 1 << 40)
            if not complete or [v for _, v in found[-1:]] != [Value.image(b"base" * 2048)]:
                errors.append(f"incomplete read: {len(found)} versions, complete={complete}")
                return

    def flusher() -> None:
        while not stop.is_set():
            tl.flush()

    tl.put(key(0), START + 8, Value.image(b"base" * 2048))
    threads = [threading.Thread(target=reader), threading.Thread(target=flusher)]
    for t in threads:
        t.start()
    try:
        for i in range(2, 3000):
            tl.put_record(START + 8 * i, b"r" * 100, START + 8 * i - 8, [(key(0), False)])
    finally:
        stop.set()
        for t in threads:
            t.join()
    tl.flush_all()
    found, complete = tl.versions(key(0), 1 << 40)
    assert complete and len(found) == 2999
    assert not errors, errors[:3]
    tl.close()


def test_image_layers_end_reads_and_gc_drops_what_they_hide(tmp_path: Path) -> None:
    store = DiskLayerStore(tmp_path / "layers")
    tl = TimelineLayers(store, tmp_path / "scratch", START)
    tl.put(key(1), START + 8, Value.image(b"a" * 8192))
    tl.put_record(START + 16, b"r1", START + 8, [(key(1), False), (key(2), True)])
    tl.flush_all()
    first = tl.descs()
    # An image layer at START + 16 holding key 1 only: key 2 did not exist "then" as far as it says.
    image = LayerDesc.image(KEY_MIN, KEY_MAX, START + 16)
    with ImageLayerWriter(store, image) as w:
        w.add(key(1), Value.image(b"b" * 8192))
        w.finish()
    tl.add_layer(image)
    assert tl.has_image_at(START + 16) and not tl.has_image_at(START + 8)
    assert tl.versions(key(1), START + 20) == ([(START + 16, Value.image(b"b" * 8192))], True)
    assert tl.versions(key(2), START + 20) == ([], True)  # absent from the image: no older read
    assert tl.versions_many([key(0), key(1), key(2)], START + 20) == [
        tl.versions(key(b), START + 20) for b in range(3)]
    assert tl.versions(key(1), START + 8) == ([(START + 8, Value.image(b"a" * 8192))], True)
    # Everything below the image is hidden from reads at or above it: GC may drop it.
    assert tl.gc_candidates(START + 16, []) == first
    assert tl.remove_layers(first) > 0 and tl.descs() == [image]
    assert not any(store.exists(d.file_name) for d in first)
    tl.close()
    reopened = TimelineLayers(store, tmp_path / "scratch", START)
    assert reopened.descs() == [image]
    assert reopened.versions(key(1), START + 20) == ([(START + 16, Value.image(b"b" * 8192))], True)
    reopened.close()


def test_checkpoint_writes_out_an_old_open_layer(tmp_path: Path) -> None:
    tl = TimelineLayers(MemoryLayerStore(), tmp_path / "scratch", START)
    tl.put(key(1), START + 8, Value.image(b"a" * 8192))
    assert not tl.checkpoint(timeout=3600) and tl.disk_consistent_lsn == START  # young: stays open
    assert tl.open_age() >= 0
    assert tl.checkpoint(timeout=0) and tl.disk_consistent_lsn == START + 8
    assert not tl.checkpoint(timeout=0)  # nothing new
    tl.close()


def test_compaction_merges_l0_layers_into_l1_and_reads_stay_the_same(tmp_path: Path) -> None:
    store = DiskLayerStore(tmp_path / "layers")
    tl = TimelineLayers(store, tmp_path / "scratch", START)
    model: list[tuple[bytes, int, Value]] = []
    lsn = START
    for round_ in range(6):
        for i in range(40):
            lsn += 8
            blk = (i * 7 + round_) % 30
            if i % 9 == 0:
                value = Value.image(lsn.to_bytes(8, "big") * 1024)
                tl.put(key(blk), lsn, value)
            else:
                value = Value.record(b"r" * (i + 1), will_init=False, start_lsn=lsn - 8)
                tl.put_record(lsn, value.data, lsn - 8, [(key(blk), False)])
            model.append((key(blk), lsn, value))
        tl.flush_all()
    assert len([d for d in tl.descs() if d.is_l0]) == 6
    assert compact_l0(tl, at=7) is None  # not due
    done = compact_l0(tl, at=6, target=4096)
    assert done is not None and len(done.merged) == 6 and len(done.written) > 1 and done.bytes_merged > 0
    descs = tl.descs()
    assert not any(d.is_l0 for d in descs) and set(descs) == set(done.written)
    # Edge to edge over the key space, one LSN range; the L0 files are gone.
    spans = sorted((d.key_start, d.key_end) for d in descs)
    assert spans[0][0] == KEY_MIN and spans[-1][1] == KEY_MAX
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert not any(store.exists(d.file_name) for d in done.merged)
    for at in (START + 8, START + 800, lsn):
        for blk in range(31):
            assert tl.versions(key(blk), at) == _model(model, key(blk), at), (blk, at)
        assert tl.versions_many([key(b) for b in range(31)], at) == [_model(model, key(b), at) for b in range(31)]
    # A later generation of L0 layers and an image layer above the compacted range: GC may then
    # drop the L1 layers whole.
    for i in range(20):
        lsn += 8
        tl.put(key(i), lsn, Value.image(lsn.to_bytes(8, "big") * 1024))
        model.append((key(i), lsn, Value.image(lsn.to_bytes(8, "big") * 1024)))
    tl.flush_all()
    image = LayerDesc.image(KEY_MIN, KEY_MAX, lsn)
    with ImageLayerWriter(store, image) as w:
        for blk in range(31):
            found, _ = _model(model, key(blk), lsn)
            if found:
                w.add(key(blk), found[0][1] if found[0][1].kind != KIND_RECORD else Value.image(b"z" * 8192))
        w.finish()
    tl.add_layer(image)
    assert set(done.written) <= set(tl.gc_candidates(lsn, []))
    tl.close()
    reopened = TimelineLayers(store, tmp_path / "scratch", START)
    assert set(done.written) <= set(reopened.descs())
    for blk in range(31):
        assert reopened.versions(key(blk), lsn - 8 * 20) == _model(model, key(blk), lsn - 8 * 20)
    reopened.close()
