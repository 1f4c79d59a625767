"""pgformat._native (the compiled hot page operations) against the pure-Python reference.

Every compiled function must give what its Python twin gives, byte for byte:
the same return value, the same page bytes after it ran (stale bytes in free
space included), or the same exception class and message. Inputs: pages
built by random add/delete/prune sequences, then corrupted at random (header
pointers, line pointers, item bytes) and truncated pglz streams. Whole WAL
corpora (every rmgr, and images compressed with pglz) are compared in
test_wal_compat.py through walcorpus.compare_compiled_with_python.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgformat import native
from pgformat.constants import BLCKSZ
from pgformat.page import (
    LP_DEAD,
    LP_REDIRECT,
    PAI_IS_HEAP,
    PAI_OVERWRITE,
    PageError,
    page_add_item_extended_py,
    page_init,
    page_repair_fragmentation_py,
)
from pgformat.pglz import (
    PGLZ_STRATEGY_ALWAYS,
    PglzError,
    pglz_compress,
    pglz_decompress,
    pglz_decompress_py,
)
from pgredo.heap import _build_tuple

pytestmark = pytest.mark.skipif(not native.available(), reason="pgformat._native is not built (make install)")

hostile = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(fn: Callable[..., Any], page: bytearray | None, *args: Any) -> tuple[Any, bytes | None]:
    """What fn did: its result or (exception class, message), and the page bytes afterwards."""
    try:
        result: Any = fn(page, *args) if page is not None else fn(*args)
    except (PageError, PglzError, ValueError) as e:
        result = (type(e), str(e), getattr(e, "offset", None))
    return result, (bytes(page) if page is not None else None)


def same(fn_c: Callable[..., Any], fn_py: Callable[..., Any], page: bytearray | None, *args: Any) -> Any:
    """Run both on copies of `page`; assert identical outcomes; return the compiled one's."""
    a = outcome(fn_c, bytearray(page) if page is not None else None, *args)
    b = outcome(fn_py, bytearray(page) if page is not None else None, *args)
    assert a == b
    return a


@contextmanager
def compiled(enabled: bool) -> Iterator[None]:
    previous = native.use_compiled(enabled)
    try:
        yield
    finally:
        native.use_compiled(previous)


def _c() -> Any:
    assert native.compiled is not None
    return native.compiled


# -- pages to work on ---------------------------------------------------------------


def random_heap_page(rng: random.Random) -> bytearray:
    """A heap page after random inserts, then random line pointers made dead, redirected or unused."""
    page = bytearray(rng.randbytes(BLCKSZ))  # stale bytes everywhere, as on a recycled buffer
    page_init(page, 0)
    page[24:] = rng.randbytes(BLCKSZ - 24)
    for _ in range(rng.randrange(0, 120)):
        item = rng.randbytes(rng.choice([1, 7, 23, 24, 31, 40, 100, 400]))
        if page_add_item_extended_py(page, item, 0, PAI_IS_HEAP) == 0:
            break
    nline = (struct.unpack_from("<H", page, 12)[0] - 24) // 4
    for off in range(1, nline + 1):
        pos = 24 + 4 * (off - 1)
        roll = rng.random()
        if roll < 0.15:
            struct.pack_into("<I", page, pos, LP_DEAD << 15)
        elif roll < 0.25:
            struct.pack_into("<I", page, pos, LP_REDIRECT << 15 | rng.randrange(1, nline + 1))
        elif roll < 0.4:
            struct.pack_into("<I", page, pos, 0)
    if rng.random() < 0.5:
        struct.pack_into("<H", page, 10, struct.unpack_from("<H", page, 10)[0] | 1)  # PD_HAS_FREE_LINES
    return page


def corrupt(page: bytearray, rng: random.Random, n: int) -> bytearray:
    """Overwrite n random 2-byte fields in the header and line pointer array."""
    nline_end = min(BLCKSZ, max(26, struct.unpack_from("<H", page, 12)[0]))
    for _ in range(n):
        pos = rng.randrange(0, nline_end - 1)
        page[pos : pos + 2] = rng.randbytes(2)
    return page


# -- page_add_item_extended ---------------------------------------------------------------


@hostile
@given(seed=st.integers(0, 2**32), corruptions=st.integers(0, 3), size=st.integers(0, 9000),
       offnum=st.integers(-2, 70000), flags=st.integers(0, 3))
def test_page_add_item_extended_matches_python(seed: int, corruptions: int, size: int, offnum: int,
                                               flags: int) -> None:
    rng = random.Random(seed)
    page = corrupt(random_heap_page(rng), rng, corruptions)
    item = rng.randbytes(size)
    same(_c().page_add_item_extended, page_add_item_extended_py, page, item, offnum, flags)


def test_page_add_item_extended_every_branch() -> None:
    rng = random.Random(7)
    for _ in range(300):
        page = random_heap_page(rng)
        nline = (struct.unpack_from("<H", page, 12)[0] - 24) // 4
        for offnum in (0, 1, nline, nline + 1, nline + 2, 291, 292, 2048, 2049):
            for flags in range(4):
                same(_c().page_add_item_extended, page_add_item_extended_py, page, rng.randbytes(40), offnum, flags)


def test_page_add_item_extended_rejects_a_wrong_sized_page() -> None:
    for fn in (_c().page_add_item_extended, page_add_item_extended_py):
        with pytest.raises(PageError, match="page is 100 bytes"):
            fn(bytearray(100), b"x", 0, 0)
    with pytest.raises(BufferError):
        _c().page_add_item_extended(bytes(BLCKSZ), b"x", 0, 0)  # not writable


# -- heap tuples -----------------------------------------------------------------------------


def test_heap_add_tuple_matches_build_and_add() -> None:
    rng = random.Random(11)

    def py(page: bytearray, offnum: int, *fields: Any) -> int:
        tup = _build_tuple(fields[0], fields[1], fields[2], offnum, fields[3], fields[4], fields[5], fields[6])
        return page_add_item_extended_py(page, tup, offnum, PAI_OVERWRITE | PAI_IS_HEAP)

    for _ in range(500):
        page = corrupt(random_heap_page(rng), rng, rng.choice([0, 0, 0, 1]))
        nline = (struct.unpack_from("<H", page, 12)[0] - 24) // 4
        offnum = rng.choice([1, nline, nline + 1, nline + 2, rng.randrange(0, 300)])
        fields = (rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16),
                  rng.getrandbits(16), rng.getrandbits(8), rng.randbytes(rng.randrange(0, 300)))
        same(_c().heap_add_tuple, py, page, offnum, *fields)


def _multi_insert_data(rng: random.Random, ntuples: int) -> bytes:
    out = bytearray()
    for _ in range(ntuples):
        if len(out) & 1:
            out += b"\0"
        body = rng.randbytes(rng.randrange(0, 200))
        out += struct.pack("<HHHB", len(body), rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(8)) + body
    return bytes(out)


def test_heap_multi_insert_matches_python() -> None:
    """The compiled loop and the Python one (through the redo of a record) agree, truncated data included."""
    from pgformat.xlogrecord import (
        DecodedBlock,
        DecodedRecord,
        RelFileNode,
        XLogRecordHeader,
    )
    from pgredo.errors import RedoFailedError
    from pgredo.heap import heap2_block_redo

    rng = random.Random(5)
    for case in range(400):
        ntuples = rng.randrange(0, 80)
        init = rng.random() < 0.5
        data = _multi_insert_data(rng, ntuples)
        if case % 4 == 1:
            data = data[: rng.randrange(0, len(data) + 1)]  # truncated
        elif case % 4 == 2:
            data += rng.randbytes(rng.randrange(1, 4))  # trailing bytes
        offsets = [rng.randrange(0, 90) for _ in range(ntuples)]
        main = struct.pack("<BxH", 0, ntuples) + struct.pack(f"<{ntuples}H", *offsets)
        info = 0x50 | (0x80 if init else 0)  # XLOG_HEAP2_MULTI_INSERT (+ XLOG_HEAP_INIT_PAGE)
        rec = DecodedRecord(0x1000000, 0x1000100, XLogRecordHeader(0, 1234, 0, info, 9, 0), [], main)
        block = DecodedBlock(0, RelFileNode(1663, 5, 16384), 0, 7, 0x20, None, data)
        page = random_heap_page(rng)
        results = []
        for enabled in (True, False):
            work = bytearray(page)
            with compiled(enabled):
                try:
                    heap2_block_redo(rec, block, work)
                    res: Any = None
                except (RedoFailedError, PageError) as e:
                    res = str(e)
            results.append((res, bytes(work)))
        assert results[0] == results[1], case


def test_heap_tuple_edits_match_python() -> None:
    """DELETE, UPDATE / HOT_UPDATE (old tuple on the same page and on its own page) and LOCK:
    the compiled header edits and the Python ones leave the same page or raise the same error,
    on intact and corrupted pages."""
    from pgformat.xlogrecord import DecodedBlock, DecodedRecord, RelFileNode, XLogRecordHeader
    from pgredo.errors import RedoFailedError
    from pgredo.heap import heap_block_redo

    rng = random.Random(29)
    rnode = RelFileNode(1663, 5, 16384)
    compared = 0
    for case in range(1500):
        page = random_heap_page(rng)
        if case % 5 == 4:
            page = corrupt(page, rng, rng.randrange(1, 3))
        nline = max(1, (struct.unpack_from("<H", page, 12)[0] - 24) // 4)
        offnum = rng.choice([rng.randrange(1, nline + 1)] * 4 + [0, nline + 1, 5000])
        op = rng.choice([0x10, 0x20, 0x40, 0x60])
        bits = rng.getrandbits(8)
        xid = rng.choice([1, 2, 3, 1000, 0x7FFFFFFF, 0xFFFFFFF0])
        blocks = [DecodedBlock(0, rnode, 0, 7, 0x20, None, b"")]
        if op == 0x10:
            main = struct.pack("<IHBB", rng.getrandbits(32), offnum, rng.getrandbits(5), bits & 0x19)
        elif op == 0x60:
            main = struct.pack("<IHBB", rng.getrandbits(32), offnum, rng.getrandbits(5), bits & 1)
        else:
            new_off = rng.randrange(1, nline + 2)
            main = struct.pack("<IHBBIH", rng.getrandbits(32), offnum, rng.getrandbits(5), bits & 0x03,
                               rng.getrandbits(32), new_off)
            new_tuple = struct.pack("<HHB", rng.getrandbits(16), rng.getrandbits(16), 24) + rng.randbytes(30)
            blocks = [DecodedBlock(0, rnode, 0, 7, 0x20, None, new_tuple)]
            if rng.random() < 0.5:  # old tuple on its own page: redo block 1
                blocks.append(DecodedBlock(1, rnode, 0, 3, 0x20, None, b""))
        rec = DecodedRecord(0x1000000, 0x1000100, XLogRecordHeader(0, xid, 0, op, 10, 0), blocks, main)
        results = []
        for enabled in (True, False):
            work = bytearray(page)
            with compiled(enabled):
                try:
                    heap_block_redo(rec, blocks[-1], work)
                    res: Any = None
                except (RedoFailedError, PageError, struct.error) as e:  # the engine's input errors
                    res = f"{type(e).__name__}: {e}"
            results.append((res, bytes(work)))
        assert results[0] == results[1], case
        compared += results[0][0] is None
    assert compared > 250  # the rest are refusals, compared too


# -- page_repair_fragmentation ---------------------------------------------------------------


@hostile
@given(seed=st.integers(0, 2**32), corruptions=st.integers(0, 4))
def test_page_repair_fragmentation_matches_python(seed: int, corruptions: int) -> None:
    rng = random.Random(seed)
    page = corrupt(random_heap_page(rng), rng, corruptions)
    same(_c().page_repair_fragmentation, page_repair_fragmentation_py, page)


def test_page_repair_fragmentation_unsorted_and_many_removed() -> None:
    """Shuffled item order (the scratch-copy path) and pages where most items were removed."""
    rng = random.Random(3)
    for _ in range(300):
        page = random_heap_page(rng)
        nline = (struct.unpack_from("<H", page, 12)[0] - 24) // 4
        raws = list(struct.unpack_from(f"<{nline}I", page, 24))
        rng.shuffle(raws)
        if rng.random() < 0.5:
            raws = [r if rng.random() < 0.1 else 0 for r in raws]
        struct.pack_into(f"<{nline}I", page, 24, *raws)
        same(_c().page_repair_fragmentation, page_repair_fragmentation_py, page)


# -- pglz ----------------------------------------------------------------------------------------


def _pglz_cases(rng: random.Random) -> Iterator[tuple[bytes, int]]:
    for _ in range(200):
        raw = (rng.randbytes(rng.randrange(0, 50)) * rng.randrange(1, 200))[:BLCKSZ]
        comp = pglz_compress(raw, PGLZ_STRATEGY_ALWAYS)
        if comp is None:
            continue
        yield comp, len(raw)
        yield comp[: rng.randrange(0, len(comp) + 1)], len(raw)  # truncated
        yield comp, len(raw) + rng.choice([-5, -1, 1, 100])  # wrong size
        bad = bytearray(comp)
        for _ in range(3):
            bad[rng.randrange(len(bad))] = rng.getrandbits(8) if bad else 0
        yield bytes(bad), len(raw)


def test_pglz_decompress_matches_python() -> None:
    rng = random.Random(17)
    n = 0
    for src, rawsize in _pglz_cases(rng):
        for check in (True, False):
            same(_c().pglz_decompress, pglz_decompress_py, None, src, rawsize, check)
            n += 1
    assert n > 1000


@hostile
@given(src=st.binary(max_size=400), rawsize=st.integers(-3, 20000), check=st.booleans())
def test_pglz_decompress_hostile_input(src: bytes, rawsize: int, check: bool) -> None:
    same(_c().pglz_decompress, pglz_decompress_py, None, src, rawsize, check)


def test_pglz_public_function_uses_either() -> None:
    raw = b"abc" * 2000
    comp = pglz_compress(raw, PGLZ_STRATEGY_ALWAYS)
    assert comp is not None
    for enabled in (True, False):
        with compiled(enabled):
            assert pglz_decompress(comp, len(raw)) == raw
            with pytest.raises(PglzError, match="truncated|decompressed"):
                pglz_decompress(comp[:-3], len(raw))


# -- record decoding ---------------------------------------------------------------------------


def _random_record(rng: random.Random) -> bytes:
    """A record body with random block references (images with and without holes, compressed or
    not, SAME_REL, data), origin, toplevel xid and main data, as XLogRecordAssemble lays it out."""
    headers = bytearray()
    payload = bytearray()
    block_id = -1
    for _ in range(rng.randrange(0, 5)):
        block_id += rng.randrange(1, 4)
        if block_id > 32:
            break
        flags = rng.randrange(0, 4)  # fork
        data = rng.randbytes(rng.choice([0, 0, 1, 30, 300]))
        if data:
            flags |= 0x20
        same_rel = block_id > 0 and rng.random() < 0.3
        if same_rel:
            flags |= 0x80
        image = rng.random() < 0.4
        if image:
            flags |= 0x10
        if rng.random() < 0.2:
            flags |= 0x40
        headers += struct.pack("<BBH", block_id, flags, len(data))
        if image:
            kind = rng.randrange(4)
            if kind == 0:  # whole page
                img, info, extra = rng.randbytes(BLCKSZ), 0x02, b""
            elif kind == 1:  # hole, uncompressed
                hole = rng.randrange(1, 4000)
                img, info, extra = rng.randbytes(BLCKSZ - hole), 0x03, b""
            else:  # compressed, with or without hole
                img = rng.randbytes(rng.randrange(10, 3000))
                info = 0x02 | (0x04, 0x08)[kind - 2] | (0x01 if rng.random() < 0.5 else 0)
                extra = struct.pack("<H", rng.randrange(1, 3000)) if info & 1 else b""
            hole_offset = rng.randrange(1, 4000) if info & 1 else 0
            headers += struct.pack("<HHB", len(img), hole_offset, info) + extra
            payload += img
        if not same_rel:
            headers += struct.pack("<III", 1663, rng.randrange(1, 9), rng.randrange(1, 99999))
        headers += struct.pack("<I", rng.getrandbits(32))
        payload += data
    if rng.random() < 0.2:
        headers += struct.pack("<BH", 253, rng.getrandbits(16))
    if rng.random() < 0.2:
        headers += struct.pack("<BI", 252, rng.getrandbits(32))
    main = rng.randbytes(rng.choice([0, 5, 200, 300]))
    if len(main) > 255:
        headers += struct.pack("<BI", 254, len(main))
    elif main:
        headers += struct.pack("<BB", 255, len(main))
    body = bytes(headers + payload + main)
    return struct.pack("<IIQBBxxI", 24 + len(body), 7, 0, 0, 10, 0) + body


def _decoded_both(raw: bytes) -> list[Any]:
    from pgformat.errors import WalRecordError
    from pgformat.xlogrecord import XLogRecordHeader, decode_record

    header = XLogRecordHeader(len(raw), 7, 0, 0, 10, 0)
    out = []
    for enabled in (True, False):
        with compiled(enabled):
            try:
                out.append(decode_record(raw, 0x5000, 0x6000, verify_crc=False, header=header))
            except WalRecordError as e:
                out.append(str(e))
    return out


def _with_crc(raw: bytes) -> bytes:
    from pgformat.xlogrecord import record_crc

    with compiled(False):
        crc = record_crc(raw)
    return raw[:20] + struct.pack("<I", crc) + raw[24:]


def _decoded_whole_both(raw: bytes, verify_crc: bool) -> list[Any]:
    """decode_record without a parsed header: header checks, CRC and walk (one C call when compiled)."""
    from pgformat.errors import WalRecordError
    from pgformat.xlogrecord import decode_record

    out = []
    for enabled in (True, False):
        with compiled(enabled):
            try:
                out.append(decode_record(raw, 0x5000, 0x6000, verify_crc=verify_crc))
            except WalRecordError as e:  # WalCrcError included
                out.append(f"{type(e).__name__}: {e}")
    return out


@hostile
@given(seed=st.integers(0, 2**32), cut=st.integers(0, 40), flips=st.integers(0, 3), verify=st.booleans())
def test_decode_record_hostile_input(seed: int, cut: int, flips: int, verify: bool) -> None:
    """Whole records with their CRC, then header and body bytes flipped and the end cut."""
    rng = random.Random(seed)
    raw = bytearray(_with_crc(_random_record(rng)))
    for _ in range(flips):
        pos = rng.randrange(0, min(len(raw), 60))
        raw[pos] = rng.getrandbits(8)
    raw = raw[: len(raw) - min(cut, len(raw))] if rng.random() < 0.3 else raw
    a, b = _decoded_whole_both(bytes(raw), verify)
    assert a == b


def test_decode_record_with_crc_matches_python() -> None:
    rng = random.Random(37)
    ok = 0
    for _ in range(400):
        a, b = _decoded_whole_both(_with_crc(_random_record(rng)), True)
        assert a == b
        ok += not isinstance(a, str)
    assert ok > 200


def test_decode_body_matches_python() -> None:
    rng = random.Random(23)
    decoded = 0
    for _ in range(600):
        a, b = _decoded_both(_random_record(rng))
        assert a == b
        decoded += not isinstance(a, str)
    assert decoded > 300


@hostile
@given(seed=st.integers(0, 2**32), cut=st.integers(0, 400), flips=st.integers(0, 4))
def test_decode_body_hostile_input(seed: int, cut: int, flips: int) -> None:
    """Truncated and corrupted records: the same error (or the same record) either way, never a crash."""
    rng = random.Random(seed)
    raw = bytearray(_random_record(rng))
    for _ in range(flips):
        pos = rng.randrange(24, min(len(raw), 80)) if len(raw) > 24 else 0
        if pos:
            raw[pos] = rng.getrandbits(8)
    raw = raw[: max(24, len(raw) - cut)]
    a, b = _decoded_both(bytes(raw))
    assert a == b


def test_record_crc_matches_google_crc32c() -> None:
    """The compiled CRC-32C (hardware or table) against google-crc32c, every length up to 100 and
    some long ones, aligned and not."""
    from pgformat.xlogrecord import record_crc

    rng = random.Random(31)
    for n in [*range(101), 8191, 8192, 8193, 70000]:
        raw = rng.randbytes(n + 3)
        for start in (0, 3):
            view = raw[start : start + n]
            with compiled(False):
                want = record_crc(view) if n >= 20 else None
            if want is not None:
                assert _c().record_crc(view) == want
                assert _c().record_crc(memoryview(view)) == want


def test_use_compiled_switches_every_caller() -> None:
    with compiled(False):
        assert native.compiled is None
    assert native.compiled is not None
