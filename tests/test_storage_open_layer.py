"""The open (in-memory) layer against a brute-force model: versions newest first down to one that
stands alone, records stored once for several pages, reads while appending, key-ordered entries."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.pageserver.keys import KIND_RECORD, RelTag
from services.pageserver.storage.delta_layer import DeltaLayerReader
from services.pageserver.storage.open_layer import OpenLayer, OpenLayerError
from services.pageserver.storage.store import DiskLayerStore, MemoryLayerStore
from services.pageserver.storage.values import Value

REL = RelTag(1663, 5, 16384, 0)


def key(blk: int) -> bytes:
    return REL.page_key(blk)


# A version: (block, kind, payload size); kinds: image, record, record(init), file, deleted.
_version = st.tuples(st.integers(0, 7), st.sampled_from(["image", "record", "init", "file", "deleted"]),
                     st.integers(0, 9000))


def _value(kind: str, size: int, lsn: int) -> Value:
    data = (lsn.to_bytes(8, "big") * (size // 8 + 1))[:size]
    if kind == "image":
        return Value.image(data)
    if kind in ("record", "init"):
        return Value.record(data, will_init=kind == "init", start_lsn=lsn - 8)
    if kind == "file":
        return Value.file(data)
    return Value.deleted()


def _model_versions(model: list[tuple[bytes, int, Value]], k: bytes, lsn: int) -> tuple[list[tuple[int, Value]], bool]:
    out = []
    for kk, vl, v in reversed(model):
        if kk != k or vl > lsn:
            continue
        out.append((vl, v))
        if v.kind != KIND_RECORD:
            return out, True
    return out, False


@settings(max_examples=60, deadline=None)
@given(st.lists(_version, min_size=1, max_size=120), st.data())
def test_versions_match_the_model(tmp_path_factory: pytest.TempPathFactory, versions: list[tuple[int, str, int]],
                                  data: st.DataObject) -> None:
    layer = OpenLayer(tmp_path_factory.mktemp("ol") / "layer", start_lsn=0x1000)
    model: list[tuple[bytes, int, Value]] = []
    lsn = 0x1000
    try:
        for blk, kind, size in versions:
            lsn += 8 * data.draw(st.integers(1, 40))
            value = _value(kind, size, lsn)
            layer.put(key(blk), lsn, value)
            model.append((key(blk), lsn, value))
        for _ in range(20):
            blk = data.draw(st.integers(0, 8))
            at = data.draw(st.integers(0x1000, lsn + 16))
            assert layer.versions(key(blk), at) == _model_versions(model, key(blk), at)
        layer.freeze()
        assert list(layer.entries()) == sorted(model, key=lambda e: (e[0], e[1]))
        assert layer.end_lsn == lsn + 1 and layer.entries_count == len(model)
    finally:
        layer.close()


@settings(max_examples=25, deadline=None)
@given(st.lists(_version, min_size=1, max_size=150), st.data())
def test_written_delta_layer_answers_as_the_open_layer(tmp_path_factory: pytest.TempPathFactory,
                                                       versions: list[tuple[int, str, int]],
                                                       data: st.DataObject) -> None:
    """A frozen open layer written out as a delta layer (on disk and in memory) gives the same
    versions for every key at every LSN, and a complete entry scan equal to its own."""
    tmp = tmp_path_factory.mktemp("delta")
    layer = OpenLayer(tmp / "open", start_lsn=0x2000)
    lsn = 0x2000
    for blk, kind, size in versions:
        lsn += 8 * data.draw(st.integers(1, 40))
        layer.put(key(blk), lsn, _value(kind, size, lsn))
    layer.freeze()
    try:
        for store in (DiskLayerStore(tmp / "layers"), MemoryLayerStore()):
            desc = layer.write_delta(store)
            assert desc.is_l0 and desc.lsn_range == (0x2000, lsn + 1)
            with DeltaLayerReader.open(store, desc.file_name) as reader:
                assert list(reader.iter_entries()) == list(layer.entries())
                for _ in range(30):
                    blk = data.draw(st.integers(0, 8))
                    at = data.draw(st.integers(0x2000, lsn + 8))
                    ours, _ = layer.versions(key(blk), at)
                    assert reader.versions(key(blk), at) == ours
    finally:
        layer.close()


def test_an_empty_layer_is_not_written(tmp_path: Path) -> None:
    layer = OpenLayer(tmp_path / "open", start_lsn=100)
    layer.freeze()
    with pytest.raises(OpenLayerError, match="empty"):
        layer.write_delta(MemoryLayerStore())
    layer.close()


def test_a_record_for_several_pages_is_stored_once(tmp_path: Path) -> None:
    layer = OpenLayer(tmp_path / "layer", start_lsn=100)
    raw = b"r" * 5000
    layer.put_record(200, raw, 150, [(key(1), False), (key(2), True), (key(3), False)])
    assert layer.size < 2 * len(raw)
    assert layer.versions(key(2), 200) == ([(200, Value.record(raw, will_init=True, start_lsn=150))], True)
    assert layer.versions(key(1), 200) == ([(200, Value.record(raw, start_lsn=150))], False)
    assert layer.versions(key(1), 199) == ([], False)
    assert layer.versions(key(9), 300) == ([], False)
    layer.close()
    assert not (tmp_path / "layer").exists()


def test_values_spill_to_the_file_and_read_back(tmp_path: Path) -> None:
    layer = OpenLayer(tmp_path / "layer", start_lsn=0)
    pages = {}
    for i in range(400):  # 3.2 MB: most of it leaves the buffer for the file
        page = bytes([i % 251]) * 8192
        pages[i] = page
        layer.put(key(i), 1000 + i, Value.image(page))
    assert (tmp_path / "layer").stat().st_size >= 2 << 20
    for i in (0, 17, 250, 399):
        assert layer.versions(key(i), 10_000) == ([(1000 + i, Value.image(pages[i]))], True)
    layer.close()


def test_misuse_is_refused(tmp_path: Path) -> None:
    layer = OpenLayer(tmp_path / "layer", start_lsn=1000)
    with pytest.raises(OpenLayerError, match="below the layer's start"):
        layer.put(key(0), 999, Value.deleted())
    layer.put(key(0), 2000, Value.deleted())
    with pytest.raises(OpenLayerError, match="backwards"):
        layer.put(key(0), 1500, Value.deleted())
    with pytest.raises(OpenLayerError, match="frozen"):
        list(layer.entries())
    layer.freeze()
    with pytest.raises(OpenLayerError, match="frozen"):
        layer.put(key(1), 3000, Value.deleted())
    layer.close()


def test_reads_while_appending_see_a_consistent_prefix(tmp_path: Path) -> None:
    layer = OpenLayer(tmp_path / "layer", start_lsn=0)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            versions, complete = layer.versions(key(0), 1 << 40)
            lsns = [lsn for lsn, _ in versions]
            if lsns != sorted(lsns, reverse=True) or (versions and not complete):
                errors.append(f"bad read {lsns[:5]} {complete}")
            for lsn, v in versions:
                if v.data != lsn.to_bytes(8, "big") * 16:
                    errors.append(f"torn value at {lsn}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        layer.put(key(0), 10, Value.image((10).to_bytes(8, "big") * 16))
        for lsn in range(11, 20000):
            layer.put(key(0), lsn, Value.record(lsn.to_bytes(8, "big") * 16) if lsn % 100 else
                      Value.image(lsn.to_bytes(8, "big") * 16))
    finally:
        stop.set()
        for t in threads:
            t.join()
        layer.close()
    assert not errors, errors[:3]
