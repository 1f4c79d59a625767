"""storage delta and image layers: round trips against a brute-force model, `versions()` at
random (key, LSN), ordering and range enforcement, and damage of every kind found by the
checksums (LayerCorruptError naming the file, never a wrong answer)."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.pageserver.keys import KEY_SIZE, rel_page_key
from services.pageserver.storage import blockfile
from services.pageserver.storage.blockfile import FOOTER_SIZE, HEADER_SIZE, crc32c
from services.pageserver.storage.delta_layer import DeltaLayerReader, DeltaLayerWriter
from services.pageserver.storage.errors import LayerCorruptError, LayerWriteError
from services.pageserver.storage.image_layer import ImageLayerReader, ImageLayerWriter
from services.pageserver.storage.layer_desc import (
    KEY_MAX,
    KEY_MIN,
    LayerDesc,
    LayerNameError,
    parse_layer_name,
)
from services.pageserver.storage.store import (
    DiskLayerStore,
    LayerStore,
    MemoryLayerStore,
)
from services.pageserver.storage.values import Value

Model = dict[bytes, list[tuple[int, Value]]]  # key -> versions, LSN ascending


def key(blk: int, rel: int = 16384) -> bytes:
    return rel_page_key(1663, 5, rel, 0, blk)


def page(seed: int) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(64) * 128  # 8 KB, compressible like a real page


def random_value(rng: random.Random, big: bool = False) -> Value:
    r = rng.random()
    if r < 0.15:
        return Value.image(page(rng.randrange(1 << 30)) if rng.random() < 0.5 else rng.randbytes(8192))
    if r < 0.75:
        size = rng.choice((40, 80, 200, 1000)) if not big or rng.random() < 0.9 else rng.randrange(70_000, 200_000)
        return Value.record(rng.randbytes(size), will_init=rng.random() < 0.1, start_lsn=rng.randrange(1 << 40))
    if r < 0.9:
        return Value.file(rng.randbytes(rng.randrange(0, 600)))
    return Value.deleted()


def make_model(rng: random.Random, nkeys: int, lsn_lo: int, lsn_hi: int, dense: bool, big: bool = False) -> Model:
    blocks = range(nkeys) if dense else sorted(rng.sample(range(1 << 31), nkeys))
    model: Model = {}
    for b in blocks:
        k = key(b, rel=16384 + (b % 3 if not dense else 0))
        lsns = sorted(rng.sample(range(lsn_lo, lsn_hi), rng.randint(1, min(12, lsn_hi - lsn_lo))))
        model[k] = [(lsn, random_value(rng, big)) for lsn in lsns]
    return dict(sorted(model.items()))


def write_delta(store: LayerStore, model: Model, lsn_lo: int, lsn_hi: int, block_target: int = 4096) -> LayerDesc:
    w = DeltaLayerWriter(store, LayerDesc.delta(KEY_MIN, KEY_MAX, lsn_lo, lsn_hi), block_target=block_target)
    for k, versions in model.items():
        for lsn, v in versions:
            w.add(k, lsn, v)
    return w.finish()


def expected_versions(model: Model, k: bytes, lsn: int, floor: int = 0) -> list[tuple[int, Value]]:
    out = []
    for vlsn, v in reversed(model.get(k, [])):
        if vlsn > lsn:
            continue
        if vlsn < floor:
            break
        out.append((vlsn, v))
        if v.complete:
            break
    return out


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LayerStore]:
    yield MemoryLayerStore() if request.param == "memory" else DiskLayerStore(tmp_path / "layers")


# --- round trips ---


@pytest.mark.parametrize("dense", [True, False])
def test_delta_round_trip_and_versions(store: LayerStore, dense: bool) -> None:
    rng = random.Random(7 + dense)
    model = make_model(rng, 400, 1000, 1100, dense, big=True)
    desc = write_delta(store, model, 1000, 1100)
    assert store.list() == [desc.file_name]
    r = DeltaLayerReader.open(store, desc.file_name, cache_blocks=4)
    assert r.entry_count == sum(len(v) for v in model.values())
    assert r.key_count == len(model) and r.block_count > 10
    assert r.key_range == (KEY_MIN, KEY_MAX) and r.lsn_range == (1000, 1100)
    entries = [(k, lsn, v) for k, vs in model.items() for lsn, v in vs]
    assert list(r.iter_entries()) == entries
    assert list(r.iter_keys()) == list(model)
    keys = list(model)
    for _ in range(1500):
        k = rng.choice(keys) if rng.random() < 0.9 else key(rng.randrange(1 << 31), rel=16383 + rng.randrange(5))
        lsn = rng.randrange(990, 1110)
        floor = rng.choice((0, 0, rng.randrange(990, 1110)))
        assert r.versions(k, lsn, floor) == expected_versions(model, k, lsn, floor), (k.hex(), lsn, floor)
    lo, hi = sorted(rng.sample(keys, 2))
    assert list(r.iter_entries((lo, hi))) == [e for e in entries if lo <= e[0] < hi]
    assert list(r.iter_entries((KEY_MIN, lo))) == [e for e in entries if e[0] < lo]
    r.close()


entry_st = st.tuples(st.integers(0, 40), st.integers(0, 60))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entry_st, max_size=120, unique=True), st.integers(1, 5000), st.randoms(use_true_random=False),
       st.lists(st.tuples(st.integers(0, 41), st.integers(0, 61), st.integers(0, 61)), max_size=40))
def test_delta_property(entries: list[tuple[int, int]], block_target: int, rng: random.Random,
                        queries: list[tuple[int, int, int]]) -> None:
    model: Model = {}
    for b, lsn in sorted(entries):
        model.setdefault(key(b), []).append((lsn + 10, random_value(rng)))
    store = MemoryLayerStore()
    desc = write_delta(store, model, 10, 71, block_target)
    r = DeltaLayerReader.open(store, desc.file_name, cache_blocks=2)
    assert list(r.iter_entries()) == [(k, lsn, v) for k, vs in model.items() for lsn, v in vs]
    for b, lsn, floor in queries:
        assert r.versions(key(b), lsn + 10, floor + 10) == expected_versions(model, key(b), lsn + 10, floor + 10)


@pytest.mark.parametrize("dense", [True, False])
def test_image_round_trip(store: LayerStore, dense: bool) -> None:
    rng = random.Random(11)
    blocks = range(300) if dense else sorted(rng.sample(range(1 << 31), 300))
    model = {key(b): (Value.image(page(b)) if b % 7 else Value.file(rng.randbytes(50))) for b in blocks}
    ks, ke = key(0), key(0xFFFFFFFF) + b"\xff"
    w = ImageLayerWriter(store, LayerDesc.image(ks, ke, 0x1234), block_target=16384)
    for k, v in model.items():
        w.add(k, v)
    desc = w.finish()
    assert desc == parse_layer_name(desc.file_name) and desc.image_lsn == 0x1234
    r = ImageLayerReader.open(store, desc.file_name)
    assert r.lsn == 0x1234 and r.key_count == r.entry_count == 300 and r.key_range == (ks, ke)
    assert list(r.iter_entries()) == list(model.items())
    for k, v in model.items():
        assert r.get(k) == v
    for _ in range(200):
        k = key(rng.randrange(1 << 31))
        assert r.get(k) == model.get(k)
    assert r.get(key(0, rel=1)) is None
    keys = list(model)
    lo, hi = keys[37], keys[211]
    assert [k for k, _ in r.iter_entries((lo, hi))] == keys[37:211]
    assert list(r.iter_keys()) == keys


def test_empty_layers(store: LayerStore) -> None:
    d = DeltaLayerWriter(store, LayerDesc.delta(KEY_MIN, KEY_MAX, 5, 6)).finish()
    r = DeltaLayerReader.open(store, d.file_name)
    assert r.entry_count == 0 and r.versions(key(1), 10) == [] and list(r.iter_entries()) == []
    i = ImageLayerWriter(store, LayerDesc.image(KEY_MIN, KEY_MAX, 5)).finish()
    ri = ImageLayerReader.open(store, i.file_name)
    assert ri.get(key(1)) is None and list(ri.iter_entries()) == []


def test_large_values_span_blocks(store: LayerStore) -> None:
    big = os.urandom(3 << 20)  # bigger than any block target: a block of its own
    w = DeltaLayerWriter(store, LayerDesc.delta(KEY_MIN, KEY_MAX, 1, 100))
    w.add(key(1), 5, Value.record(b"small"))
    w.add(key(1), 6, Value.record(big, start_lsn=3))
    w.add(key(1), 7, Value.record(b"after"))
    d = w.finish()
    r = DeltaLayerReader.open(store, d.file_name)
    assert r.versions(key(1), 99) == [(7, Value.record(b"after")), (6, Value.record(big, start_lsn=3)),
                                      (5, Value.record(b"small"))]


def test_finish_narrows_key_end(store: LayerStore) -> None:
    w = DeltaLayerWriter(store, LayerDesc.delta(KEY_MIN, KEY_MAX, 1, 10))
    w.add(key(1), 2, Value.record(b"a"))
    w.add(key(5), 2, Value.record(b"b"))
    with pytest.raises(LayerWriteError):
        w.finish(key(5))  # not above the last key
    d = w.finish(key(6))
    assert d.key_end == key(6) and store.list() == [d.file_name]
    r = DeltaLayerReader.open(store, d.file_name)
    assert r.key_range == (KEY_MIN, key(6)) and [e[0] for e in r.iter_entries()] == [key(1), key(5)]


# --- refusals ---


def test_out_of_order_and_range_refused(store: LayerStore) -> None:
    w = DeltaLayerWriter(store, LayerDesc.delta(key(10), key(20), 100, 200))
    w.add(key(11), 150, Value.record(b"x"))
    for k, lsn in [(key(11), 150), (key(11), 149), (key(10), 199), (key(9), 150), (key(20), 150),
                   (key(12), 99), (key(12), 200), (b"short", 150)]:
        with pytest.raises(LayerWriteError):
            w.add(k, lsn, Value.record(b"y"))
    with pytest.raises(LayerWriteError):
        w.add(key(12), 150, Value(99, b""))
    w.add(key(11), 151, Value.record(b"z"))  # still usable after refusals
    w.add(key(12), 100, Value.image(page(1)))
    d = w.finish()
    with pytest.raises(LayerWriteError):
        w.add(key(13), 150, Value.record(b"late"))
    assert [(k, lsn) for k, lsn, _ in DeltaLayerReader.open(store, d.file_name).iter_entries()] == [
        (key(11), 150), (key(11), 151), (key(12), 100)]

    iw = ImageLayerWriter(store, LayerDesc.image(KEY_MIN, KEY_MAX, 7))
    iw.add(key(3), Value.image(page(3)))
    for k in (key(3), key(2)):
        with pytest.raises(LayerWriteError):
            iw.add(k, Value.image(page(0)))
    iw.abort()
    assert store.list() == [d.file_name]
    with pytest.raises(LayerWriteError):
        DeltaLayerWriter(store, LayerDesc.image(KEY_MIN, KEY_MAX, 7))
    with pytest.raises(LayerNameError):
        LayerDesc.delta(key(2), key(1), 1, 2)


def test_layer_names() -> None:
    d = LayerDesc.delta(KEY_MIN, KEY_MAX, 0x16B3748, 0x2000000)
    assert parse_layer_name(d.file_name) == d and d.is_l0
    i = LayerDesc.image(key(0), key(100), 42)
    assert parse_layer_name(i.file_name) == i and not i.is_l0 and i.image_lsn == 42
    for bad in ["x.delta", "00-01__0000000000000001.delta", "0-01__0000000000000001.image",
                "01-00__0000000000000001.image", "00-01__0000000000000002-0000000000000001.delta"]:
        with pytest.raises(LayerNameError):
            parse_layer_name(bad)


def test_wrong_kind_or_name(store: LayerStore) -> None:
    d = DeltaLayerWriter(store, LayerDesc.delta(KEY_MIN, KEY_MAX, 1, 2)).finish()
    with pytest.raises(LayerCorruptError, match="delta layer where a image"):
        ImageLayerReader.open(store, d.file_name)
    other = LayerDesc.delta(KEY_MIN, KEY_MAX, 1, 3).file_name
    w = store.create(other)
    w.write(store.read(d.file_name))
    w.finish()
    with pytest.raises(LayerCorruptError, match="its header says"):
        DeltaLayerReader.open(store, other)


# --- damage ---


def _small_delta() -> tuple[MemoryLayerStore, str, Model]:
    """A layer of ~10 KB in ~8 blocks: small values, so every byte position can be damaged in turn."""
    rng = random.Random(3)
    model: Model = {}
    for b in range(40):
        lsns = sorted(rng.sample(range(100, 140), rng.randint(1, 6)))
        model[key(b)] = [(lsn, rng.choice((Value.record(rng.randbytes(rng.randrange(10, 60)), rng.random() < 0.2),
                                           Value.file(rng.randbytes(20)), Value.deleted()))) for lsn in lsns]
    store = MemoryLayerStore()
    desc = write_delta(store, model, 100, 140, block_target=1500)
    return store, desc.file_name, model


def _read_everything(store: LayerStore, name: str, model: Model) -> None:
    """Open and read every entry and every version; asserts nothing read is wrong."""
    r = DeltaLayerReader.open(store, name, cache_blocks=1)
    assert list(r.iter_entries()) == [(k, lsn, v) for k, vs in model.items() for lsn, v in vs]
    for k in model:
        assert r.versions(k, 200) == expected_versions(model, k, 200)


def _regions(data: bytes) -> dict[str, range]:
    index_offset, index_len = struct.unpack_from(">QQ", data, len(data) - FOOTER_SIZE)
    return {
        "header": range(HEADER_SIZE),
        "blocks": range(HEADER_SIZE, index_offset),
        "index": range(index_offset, index_offset + index_len),
        "footer": range(len(data) - FOOTER_SIZE, len(data)),
    }


def test_every_flipped_byte_is_found() -> None:
    store, name, model = _small_delta()
    good = store.files[name]
    _read_everything(store, name, model)
    regions = _regions(good)
    assert all(len(r) for r in regions.values()) and len(good) > 4000 and len(regions["index"]) >= 4 * 51
    rng = random.Random(5)
    checked = 0
    for region, positions in regions.items():
        picks = positions if region != "blocks" else range(positions.start, positions.stop, 5)
        for pos in picks:
            for flip in (0x01, 0x80, rng.randrange(1, 256))[: 3 if region != "blocks" else 1]:
                damaged = bytearray(good)
                damaged[pos] ^= flip
                store.files[name] = bytes(damaged)
                with pytest.raises(LayerCorruptError) as e:
                    _read_everything(store, name, model)
                assert name in str(e.value), region
                checked += 1
    assert checked > 1500


def test_block_damage_names_block_and_key() -> None:
    store, name, model = _small_delta()
    good = store.files[name]
    damaged = bytearray(good)
    damaged[HEADER_SIZE + 3] ^= 0xFF
    store.files[name] = bytes(damaged)
    r = DeltaLayerReader.open(store, name)  # header, index and footer are fine
    first = next(iter(model))
    with pytest.raises(LayerCorruptError) as e:
        r.versions(first, 200)
    assert e.value.block == 0 and e.value.key == first and "checksum" in str(e.value)
    # other blocks still read
    last = list(model)[-1]
    assert r.versions(last, 200) == expected_versions(model, last, 200)


def test_every_truncation_is_found() -> None:
    store, name, model = _small_delta()
    good = store.files[name]
    cuts = sorted(set(range(300)) | set(range(300, len(good), 13)) | set(range(len(good) - 200, len(good))))
    for cut in cuts:
        store.files[name] = good[:cut]
        with pytest.raises(LayerCorruptError):
            _read_everything(store, name, model)
    store.files[name] = good + b"\0"  # bytes appended: the footer is no longer at the end
    with pytest.raises(LayerCorruptError):
        _read_everything(store, name, model)


def _refooter(data: bytes, **changes: int) -> bytes:
    """The file with footer fields changed and its checksum made right again."""
    fmt = struct.Struct(">QQIIQQ26s8s")
    body = list(fmt.unpack_from(data, len(data) - FOOTER_SIZE))
    names = ["index_offset", "index_len", "index_crc", "n_blocks", "n_entries", "n_keys"]
    for k, v in changes.items():
        body[names.index(k)] = v
    packed = fmt.pack(*body)
    return data[:len(data) - FOOTER_SIZE] + packed + struct.pack(">I", crc32c(packed))


def _reheader(data: bytes, offset: int, value: bytes) -> bytes:
    head = bytearray(data[:HEADER_SIZE])
    head[offset:offset + len(value)] = value
    head[-4:] = struct.pack(">I", crc32c(bytes(head[:-4])))
    return bytes(head) + data[HEADER_SIZE:]


@pytest.mark.parametrize("case,match", [
    ("magic", "not a layer file"),
    ("version", "format version 2"),
    ("kind", "unknown layer kind"),
    ("index_beyond", "index at"),
    ("index_short", "does not end at the footer"),
    ("n_blocks", "for 3 blocks"),
    ("n_entries", "do not add up"),
])
def test_structural_damage_with_valid_checksums(case: str, match: str) -> None:
    store, name, model = _small_delta()
    good = store.files[name]
    size = len(good)
    _, idx_len = struct.unpack_from(">QQ", good, size - FOOTER_SIZE)
    damaged = {
        "magic": b"NOTLAYER" + good[8:],
        "version": _reheader(good, 8, b"\x00\x02"),
        "kind": _reheader(good, 10, b"\x07"),
        "index_beyond": _refooter(good, index_offset=size * 4),
        "index_short": _refooter(good, index_len=idx_len - 51),
        "n_blocks": _refooter(good, n_blocks=3),
        "n_entries": _refooter(good, n_entries=5),
    }[case]
    store.files[name] = damaged
    with pytest.raises(LayerCorruptError, match=match):
        _read_everything(store, name, model)


def test_damaged_file_on_disk(tmp_path: Path) -> None:
    store = DiskLayerStore(tmp_path)
    rng = random.Random(9)
    model = make_model(rng, 50, 1, 30, dense=True)
    desc = write_delta(store, model, 1, 30)
    path = tmp_path / desc.file_name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(LayerCorruptError, match=desc.file_name):
        _read_everything(store, desc.file_name, model)
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(LayerCorruptError, match="too short|footer|truncated"):
        DeltaLayerReader.open(store, desc.file_name)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4), st.data())
def test_random_damage_only_raises_corrupt(flips: list[tuple[int, int]], data: st.DataObject) -> None:
    store, name, model = _CACHED
    good = _CACHED_BYTES
    damaged = bytearray(good)
    for pos, x in flips:
        damaged[pos % len(good)] ^= x
    if data.draw(st.booleans()):
        damaged = damaged[: data.draw(st.integers(0, len(damaged)))]
    store.files[name] = bytes(damaged)
    if bytes(damaged) == good:
        _read_everything(store, name, model)
        return
    with pytest.raises(LayerCorruptError):
        _read_everything(store, name, model)


_CACHED = _small_delta()
_CACHED_BYTES = _CACHED[0].files[_CACHED[1]]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_files(garbage: bytes) -> None:
    store = MemoryLayerStore()
    store.files["g"] = blockfile.MAGIC + garbage if garbage[:1] == b"\0" else garbage
    for cls in (DeltaLayerReader, ImageLayerReader):
        with pytest.raises(LayerCorruptError):
            cls.open(store, "g")


def test_image_damage_found(store: LayerStore) -> None:
    w = ImageLayerWriter(store, LayerDesc.image(KEY_MIN, KEY_MAX, 9), block_target=20000)
    pages = {key(b): Value.image(page(b)) for b in range(40)}
    for k, v in pages.items():
        w.add(k, v)
    d = w.finish()
    good = store.read(d.file_name)

    def check(damaged: bytes) -> None:
        s = MemoryLayerStore()
        s.files[d.file_name] = damaged
        with pytest.raises(LayerCorruptError):
            r = ImageLayerReader.open(s, d.file_name)
            for k, v in pages.items():
                assert r.get(k) == v
            raise AssertionError("damage not found")

    for pos in list(range(0, len(good), 97)) + list(range(len(good) - FOOTER_SIZE, len(good))):
        damaged = bytearray(good)
        damaged[pos] ^= 0x04
        check(bytes(damaged))
    for cut in range(0, len(good), 331):
        check(good[:cut])


def test_header_fields_match_key_size() -> None:
    assert blockfile.ENTRY_KEY_SIZE == KEY_SIZE + 8


