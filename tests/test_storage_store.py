"""storage.store: the disk and memory layer stores behave alike; the disk store publishes
atomically and durably and cleans up after writers that never finished."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.pageserver.storage.errors import StoreError
from services.pageserver.storage.store import (
    TEMP_PREFIX,
    DiskLayerStore,
    LayerStore,
    MemoryLayerStore,
)


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LayerStore]:
    yield MemoryLayerStore() if request.param == "memory" else DiskLayerStore(tmp_path / "layers")


def test_write_read_list_delete(store: LayerStore) -> None:
    w = store.create("a.delta")
    w.write(b"hello ")
    w.write(b"world")
    assert w.size == 11
    assert store.list() == []  # nothing visible before finish
    w.pwrite(b"J", 0)
    assert w.finish() == 11
    assert store.list() == ["a.delta"]
    assert store.exists("a.delta") and store.size("a.delta") == 11
    with store.open("a.delta") as f:
        assert f.size == 11
        assert f.pread(5, 0) == b"Jello"
        assert f.pread(100, 6) == b"world"
        assert f.pread(4, 11) == b""
    assert store.read("a.delta") == b"Jello world"
    store.delete("a.delta")
    assert store.list() == [] and not store.exists("a.delta")
    with pytest.raises(FileNotFoundError):
        store.open("a.delta")
    with pytest.raises(FileNotFoundError):
        store.delete("a.delta")
    with pytest.raises(FileNotFoundError):
        store.size("a.delta")


def test_immutable_names(store: LayerStore) -> None:
    w = store.create("x")
    w.write(b"1")
    w.finish()
    w2 = store.create("x")
    w2.write(b"2")
    with pytest.raises(StoreError):
        w2.finish()
    assert store.read("x") == b"1"
    with pytest.raises(StoreError):
        w.write(b"more")  # finished


def test_finish_under_another_name(store: LayerStore) -> None:
    w = store.create("draft")
    w.write(b"data")
    w.finish("final")
    assert store.list() == ["final"]


def test_abort_leaves_nothing(store: LayerStore) -> None:
    w = store.create("gone")
    w.write(b"x" * 1000)
    w.abort()
    w.abort()
    assert store.list() == []
    with pytest.raises(ValueError), store.create("ctx") as w3:
        w3.write(b"y")
        raise ValueError("boom")
    assert store.list() == []
    if isinstance(store, DiskLayerStore):
        assert os.listdir(store.root) == []


def test_pwrite_beyond_written(store: LayerStore) -> None:
    w = store.create("p")
    w.write(b"abc")
    with pytest.raises(StoreError):
        w.pwrite(b"zz", 2)
    w.abort()


def test_put_replaces(store: LayerStore) -> None:
    store.put("manifest", b"one")
    store.put("manifest", b"two")
    assert store.read("manifest") == b"two" and store.list() == ["manifest"]


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", f"{TEMP_PREFIX}x", " x", "a\0b"])
def test_bad_names(store: LayerStore, name: str) -> None:
    with pytest.raises(StoreError):
        store.create(name)
    with pytest.raises(StoreError):
        store.put(name, b"")


def test_reader_survives_delete(store: LayerStore) -> None:
    w = store.create("f")
    w.write(b"0123456789")
    w.finish()
    f = store.open("f")
    store.delete("f")
    assert f.pread(3, 2) == b"234"
    f.close()


def test_concurrent_preads(store: LayerStore) -> None:
    data = os.urandom(1 << 16)
    w = store.create("big")
    w.write(data)
    w.finish()
    f = store.open("big")
    errors: list[str] = []

    def worker(seed: int) -> None:
        for i in range(200):
            off = (seed * 7919 + i * 104729) % len(data)
            if f.pread(100, off) != data[off:off + 100]:
                errors.append(f"{seed}/{i}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    assert errors == []


def test_disk_store_layout_and_cleanup(tmp_path: Path) -> None:
    root = tmp_path / "tl"
    store = DiskLayerStore(root)
    w = store.create("half")
    w.write(b"x" * 10)  # a writer that never finishes: a crash
    (root / f"{TEMP_PREFIX}other-123").write_bytes(b"junk")
    store.put("m", b"manifest")
    assert store.list() == ["m"]
    assert any(p.name.startswith(TEMP_PREFIX) for p in root.iterdir())
    store2 = DiskLayerStore(root)  # reopening removes temporary files
    assert sorted(p.name for p in root.iterdir()) == ["m"]
    assert store2.read("m") == b"manifest"
    w.abort()
    with pytest.raises(StoreError):
        DiskLayerStore(tmp_path / "missing", create=False)


def test_disk_store_file_is_durable_bytes(tmp_path: Path) -> None:
    store = DiskLayerStore(tmp_path)
    w = store.create("layer")
    for i in range(100):
        w.write(bytes([i]) * 4096)
    w.pwrite(b"HEAD", 0)
    w.finish()
    raw = (tmp_path / "layer").read_bytes()
    assert len(raw) == 409600 and raw[:4] == b"HEAD" and raw[4096:4100] == b"\x01" * 4
