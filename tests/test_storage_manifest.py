"""storage.manifest: round trips, atomic replacement on disk, and any damage reported with the
file's name (a missing or resized layer too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_storage_store import store  # noqa: F401  (the fixture: a memory and a disk store)

from services.pageserver.storage.delta_layer import DeltaLayerWriter
from services.pageserver.storage.errors import ManifestError
from services.pageserver.storage.layer_desc import KEY_MAX, KEY_MIN, LayerDesc
from services.pageserver.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    decode_manifest,
    encode_manifest,
    load_manifest,
    orphan_layers,
    save_manifest,
)
from services.pageserver.storage.store import (
    DiskLayerStore,
    LayerStore,
)
from services.pageserver.storage.values import Value


def _layer(target: LayerStore, lsn: int) -> tuple[LayerDesc, int]:
    w = DeltaLayerWriter(target, LayerDesc.delta(KEY_MIN, KEY_MAX, lsn, lsn + 10))
    w.add(bytes(18), lsn, Value.record(b"r" * lsn))
    d = w.finish()
    return d, target.size(d.file_name)


def test_round_trip_and_orphans(store: LayerStore) -> None:  # noqa: F811
    assert load_manifest(store) is None
    (a, sa), (b, sb), (c, _) = _layer(store, 10), _layer(store, 20), _layer(store, 30)
    m = Manifest(0x16B3748, extra={"prev_record_lsn": 5, "ancestor": None})
    m.add_layer(a, sa)
    m.add_layer(b, sb)
    save_manifest(store, m)
    got = load_manifest(store)
    assert got == m and got is not None and got.descs() == sorted([a, b], key=lambda d: d.file_name)
    assert orphan_layers(store, got) == [c.file_name]
    assert orphan_layers(store, None) == sorted([a.file_name, b.file_name, c.file_name])
    got.remove_layer(a)
    got.disk_consistent_lsn += 100
    save_manifest(store, got)
    assert load_manifest(store) == got
    assert MANIFEST_NAME in store.list()


def test_missing_and_resized_layers_reported(store: LayerStore) -> None:  # noqa: F811
    (a, sa), (b, sb) = _layer(store, 10), _layer(store, 20)
    save_manifest(store, Manifest(100, {a.file_name: sa, b.file_name: sb}))
    store.delete(a.file_name)
    with pytest.raises(ManifestError, match=f"missing: {a.file_name}"):
        load_manifest(store)
    assert load_manifest(store, check_layers=False) is not None
    save_manifest(store, Manifest(100, {b.file_name: sb + 1}))
    with pytest.raises(ManifestError, match="wrong size"):
        load_manifest(store)


def test_every_damage_named() -> None:
    m = Manifest(12345, {LayerDesc.delta(KEY_MIN, KEY_MAX, 1, 2).file_name: 99}, {"x": [1, 2]})
    good = encode_manifest(m)
    assert decode_manifest(good) == m
    for pos in range(len(good)):
        for flip in (0x01, 0x20):
            bad = bytearray(good)
            bad[pos] ^= flip
            with pytest.raises(ManifestError, match="manifest tl7"):
                decode_manifest(bytes(bad), "tl7")
    for cut in range(len(good)):
        with pytest.raises(ManifestError):
            decode_manifest(good[:cut])


def _signed(doc: object) -> bytes:
    """A manifest with a valid checksum around any JSON document."""
    from services.pageserver.storage.blockfile import crc32c

    body = b"ZENITH-MANIFEST\n" + json.dumps(doc).encode() + b"\n"
    return body + f"crc32c={crc32c(body):08x}\n".encode()


@pytest.mark.parametrize("doc,match", [
    ([], "not a JSON object"),
    ({"format_version": 2, "disk_consistent_lsn": 1, "layers": []}, "format version 2"),
    ({"format_version": 1, "disk_consistent_lsn": -1, "layers": []}, "disk_consistent_lsn"),
    ({"format_version": 1, "disk_consistent_lsn": True, "layers": []}, "disk_consistent_lsn"),
    ({"format_version": 1, "disk_consistent_lsn": 1, "layers": {}}, "wrong type"),
    ({"format_version": 1, "disk_consistent_lsn": 1, "layers": [{"name": "x.delta", "size": 1}]}, "not a layer"),
    ({"format_version": 1, "disk_consistent_lsn": 1, "layers": [{"name": "x", "size": -1}]}, "bad layer entry"),
    ({"format_version": 1, "disk_consistent_lsn": 1, "layers": [{"name": "x"}]}, "bad layer entry"),
])
def test_valid_checksum_bad_content(doc: object, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        decode_manifest(_signed(doc))


def test_duplicate_layer_refused() -> None:
    name = LayerDesc.image(KEY_MIN, KEY_MAX, 5).file_name
    doc = {"format_version": 1, "disk_consistent_lsn": 1, "layers": [{"name": name, "size": 1}] * 2}
    with pytest.raises(ManifestError, match="twice"):
        decode_manifest(_signed(doc))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_raises_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        decode_manifest(b"ZENITH-MANIFEST\n" + data if data[:1] == b"{" else data)


def test_disk_replacement_is_atomic(tmp_path: Path) -> None:
    disk = DiskLayerStore(tmp_path)
    save_manifest(disk, Manifest(1))
    before = os.stat(tmp_path / MANIFEST_NAME).st_ino
    save_manifest(disk, Manifest(2))
    assert os.stat(tmp_path / MANIFEST_NAME).st_ino != before  # a new file renamed over the old
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME]
    (tmp_path / MANIFEST_NAME).write_bytes(b"ZENITH-MANIFEST\n{")  # torn by hand
    with pytest.raises(ManifestError, match=MANIFEST_NAME):
        load_manifest(DiskLayerStore(tmp_path))
