"""The WAL reader on real WAL, cut, corrupted and fed in arbitrary chunks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import PgFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgformat.constants import XLOG_BLCKSZ
from pgformat.errors import WalCrcError, WalError, WalPageHeaderError, WalRecordError
from pgformat.lsn import format_lsn, parse_lsn
from pgformat.xlogreader import (
    RawRecord,
    WalStreamReader,
    next_record_starts,
    parse_segment_file_name,
    segment_file_name,
)
from pgformat.xlogrecord import decode_record

# Enough WAL for records that cross pages and a segment boundary.
WINDOW = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def wal(pg_factory_module: PgFactory) -> tuple[int, bytes]:
    """(start LSN, bytes) of real WAL: the end of one segment and the start of the next."""
    node = pg_factory_module(wal_compression="off")
    begin = node.current_lsn()
    node.execute("CREATE TABLE wide (v text); ALTER TABLE wide ALTER v SET STORAGE PLAIN")
    # Full-page images make records bigger than a WAL page, to exercise continuations.
    node.execute("INSERT INTO wide SELECT repeat(md5(i::text), 240) FROM generate_series(1, 200) i")
    node.sql("CHECKPOINT")
    node.execute("UPDATE wide SET v = v || 'x'")
    # Records spanning several pages (and likely a segment boundary later on).
    node.execute("SELECT pg_logical_emit_message(false, 'zenith', repeat('m', 40000)) FROM generate_series(1, 20)")
    node.pgbench("-i", "-s", "1", "-q")
    node.sql("SELECT pg_switch_wal()")
    node.execute("INSERT INTO wide SELECT repeat(md5(i::text), 30) FROM generate_series(1, 3000) i")
    node.sql("CHECKPOINT")
    node.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
    global WIDE_PAGE0_LSN, WIDE_RELFILENODE
    WIDE_PAGE0_LSN = parse_lsn(node.sql("SELECT lsn::text FROM page_header(get_raw_page('wide', 0))")[0][0])
    WIDE_RELFILENODE = node.sql("SELECT pg_relation_filenode('wide')")[0][0]
    end = node.current_lsn()
    node.stop()
    seg = 16 * 1024 * 1024
    segs = sorted(p for p in node.waldir.iterdir() if p.is_file() and len(p.name) == 24)
    data = b"".join(p.read_bytes() for p in segs)
    first = parse_segment_file_name(segs[0].name)[1]
    start = begin // XLOG_BLCKSZ * XLOG_BLCKSZ  # a page boundary: the reader skips a leading tail
    assert end - first < len(data)
    return start, data[start - first : end - first]


@pytest.fixture(scope="module")
def pg_factory_module(pg_session_factory: PgFactory) -> PgFactory:
    return pg_session_factory


def read_all(start: int, chunks: list[bytes]) -> list[RawRecord]:
    reader = WalStreamReader(start)
    out: list[RawRecord] = []
    for c in chunks:
        reader.feed(c)
        out.extend(reader.records())
    return out


def test_whole_stream_decodes(wal: tuple[int, bytes]) -> None:
    start, data = wal
    records = read_all(start, [data])
    assert len(records) > 5000
    big = [r for r in records if r.end_lsn // XLOG_BLCKSZ != r.lsn // XLOG_BLCKSZ]
    assert len(big) > 100, "expected records crossing page boundaries"
    for a, b in zip(records, records[1:]):
        assert b.decode().prev == a.lsn or a.decode().rmid == 0  # xl_prev chain
        assert b.lsn in next_record_starts(a.end_lsn)  # what the page server's continuity check allows
    assert any(a.end_lsn % XLOG_BLCKSZ == 0 for a in records), "no record ended on a page boundary"
    for r in records[:2000]:
        rec = r.decode()
        assert rec.tot_len == len(r.data)


WIDE_PAGE0_LSN = 0
WIDE_RELFILENODE = 0


def test_end_lsn_is_the_page_lsn_postgres_sets(wal: tuple[int, bytes]) -> None:
    """end_lsn is EndRecPtr (MAXALIGNed), exactly what Postgres stores as the page LSN."""
    start, data = wal
    last = None
    for r in read_all(start, [data]):
        rec = r.decode()
        if any(b.rnode.rel == WIDE_RELFILENODE and b.blkno == 0 and b.forknum == 0 for b in rec.blocks):
            last = r
    assert last is not None
    assert last.end_lsn == WIDE_PAGE0_LSN
    assert last.end_lsn % 8 == 0


def test_switch_skips_rest_of_segment(wal: tuple[int, bytes]) -> None:
    start, data = wal
    records = read_all(start, [data])
    switches = [r for r in records if r.decode().rmid == 0 and r.decode().info & 0xF0 == 0x40]
    assert switches, "workload ran pg_switch_wal()"
    s = switches[0]
    after = next(r for r in records if r.lsn > s.lsn)
    seg = 16 * 1024 * 1024
    assert s.end_lsn == (s.lsn // seg + 1) * seg  # EndRecPtr of a switch is its segment's end
    # The next record starts right after the long page header of the next segment.
    assert after.lsn == (s.lsn // seg + 1) * seg + 40


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=1, max_value=70000), min_size=1, max_size=60))
def test_any_chunking_gives_identical_records(wal: tuple[int, bytes], cuts: list[int]) -> None:
    start, data = wal
    window = data[: 600 * 1024]
    expected = read_all(start, [window])
    chunks: list[bytes] = []
    pos = 0
    for n in cuts:
        chunks.append(window[pos : pos + n])
        pos += n
    chunks.append(window[pos:])
    got = read_all(start, chunks)
    assert [(r.lsn, r.end_lsn, r.data) for r in got] == [(r.lsn, r.end_lsn, r.data) for r in expected]


def test_truncated_stream_yields_no_partial_record_and_resumes(wal: tuple[int, bytes]) -> None:
    start, data = wal
    records = read_all(start, [data[: 400 * 1024]])
    # Cut in the middle of a multi-page record.
    big = next(r for r in records if r.end_lsn - r.lsn > XLOG_BLCKSZ)
    cut = big.lsn - start + (big.end_lsn - big.lsn) // 2
    reader = WalStreamReader(start)
    reader.feed(data[:cut])
    first = list(reader.records())
    assert first and first[-1].end_lsn <= big.lsn
    assert all(r.lsn < big.lsn for r in first)
    assert list(reader.records()) == []  # asking again yields nothing new
    reader.feed(data[cut : 400 * 1024])
    rest = list(reader.records())
    assert rest[0].lsn == big.lsn and rest[0].data == big.data
    assert [r.lsn for r in first + rest] == [r.lsn for r in records]


def _record_at(start: int, data: bytes, min_len: int = 100) -> RawRecord:
    return next(r for r in read_all(start, [data[: 200 * 1024]]) if len(r.data) >= min_len
                and r.lsn // XLOG_BLCKSZ == r.end_lsn // XLOG_BLCKSZ)


@pytest.mark.parametrize("offset_in_record", [0, 4, 8, 16, 17, 24, 30, -1])
def test_flipped_bit_is_a_crc_error_naming_the_lsn(wal: tuple[int, bytes], offset_in_record: int) -> None:
    start, data = wal
    victim = _record_at(start, data)
    pos = victim.lsn - start + (offset_in_record % len(victim.data))
    bad = bytearray(data[: 200 * 1024])
    bad[pos] ^= 0x10
    reader = WalStreamReader(start)
    reader.feed(bytes(bad))
    got: list[RawRecord] = []
    with pytest.raises(WalError) as ei:
        for r in reader.records():
            got.append(r)
    assert ei.value.lsn == victim.lsn
    assert format_lsn(victim.lsn) in str(ei.value)
    if offset_in_record not in (0, 4, 8, 17):  # length, xid->crc, prev-link and rmid have their own checks
        assert isinstance(ei.value, WalCrcError)
    # Nothing at or after the bad record was yielded; the reader stays failed.
    assert all(r.lsn < victim.lsn for r in got)
    with pytest.raises(WalError):
        list(reader.records())


def test_crc_error_from_decode_record(wal: tuple[int, bytes]) -> None:
    start, data = wal
    victim = _record_at(start, data)
    bad = bytearray(victim.data)
    bad[-1] ^= 1
    with pytest.raises(WalCrcError, match=format_lsn(victim.lsn)):
        decode_record(bytes(bad), victim.lsn)


@pytest.mark.parametrize(
    "field,offset,value,message",
    [
        ("magic", 0, struct.pack("<H", 0xD10D), "invalid magic number"),
        ("info", 2, struct.pack("<H", 0x0010), "invalid info bits"),
        ("pageaddr", 8, struct.pack("<Q", 0x12345000), "unexpected pageaddr"),
        ("contrecord", 2, struct.pack("<H", 0x0000), ""),
    ],
)
def test_bad_page_header_is_a_clear_error(wal: tuple[int, bytes], field: str, offset: int, value: bytes, message: str) -> None:
    start, data = wal
    records = read_all(start, [data[: 400 * 1024]])
    # A page that starts with the continuation of a record.
    big = next(r for r in records if r.end_lsn - r.lsn > XLOG_BLCKSZ and r.lsn > start + XLOG_BLCKSZ)
    page = (big.lsn // XLOG_BLCKSZ + 1) * XLOG_BLCKSZ
    bad = bytearray(data[: 400 * 1024])
    p = page - start + offset
    bad[p : p + len(value)] = value
    reader = WalStreamReader(start)
    reader.feed(bytes(bad))
    with pytest.raises(WalPageHeaderError) as ei:
        list(reader.records())
    assert ei.value.lsn == page
    assert message in str(ei.value)
    if field == "contrecord":
        assert "no contrecord flag" in str(ei.value)


def test_start_mid_stream_on_page_with_contrecord(wal: tuple[int, bytes]) -> None:
    start, data = wal
    records = read_all(start, [data])
    # A record over three pages: the reader must skip a whole page of its tail, then part of the next.
    big = next(r for r in records if r.end_lsn // XLOG_BLCKSZ - r.lsn // XLOG_BLCKSZ >= 2 and r.lsn > start + XLOG_BLCKSZ)
    page = (big.lsn // XLOG_BLCKSZ + 1) * XLOG_BLCKSZ
    got = read_all(page, [data[page - start :]])
    assert [r.lsn for r in got] == [r.lsn for r in records if r.lsn >= big.end_lsn]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=3000), st.integers(min_value=0, max_value=XLOG_BLCKSZ - 8))
def test_random_garbage_only_raises_wal_errors(wal: tuple[int, bytes], junk: bytes, at: int) -> None:
    start, data = wal
    buf = bytearray(data[: 64 * 1024])
    at = at & ~7
    buf[XLOG_BLCKSZ + at : XLOG_BLCKSZ + at + len(junk)] = junk
    reader = WalStreamReader(start)
    reader.feed(bytes(buf[: 64 * 1024]))
    try:
        for r in reader.records():
            r.decode()
    except WalError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=24, max_size=400))
def test_decode_record_rejects_garbage_with_domain_errors(raw: bytes) -> None:
    raw = struct.pack("<I", len(raw)) + raw[4:]
    try:
        decode_record(raw, 0x1000, verify_crc=False)
    except WalRecordError:
        pass


def test_segment_file_names() -> None:
    assert parse_segment_file_name("000000010000000000000003") == (1, 3 * 16 * 1024 * 1024)
    assert parse_segment_file_name("00000002000000010000000A") == (2, (0x100 + 0xA) * 16 * 1024 * 1024)
    assert segment_file_name(1, parse_lsn("1/0A000028")) == "00000001000000010000000A"
    with pytest.raises(ValueError):
        parse_segment_file_name("00000001000000000000XYZ")
    with pytest.raises(ValueError):
        parse_segment_file_name("000000010000000000000100")  # seg >= 256 for 16 MB segments
