"""Base backups a stock postgres boots: pg_control, the synthetic checkpoint WAL, the running
checkpoint values, and end to end against a real primary.

Oracles: pg_controldata and pg_waldump read what we write; the primary's own
data at the backup LSN (row counts and checksums of every table), pg_amcheck
on the booted compute, and the compute itself (new xids, oids, multixacts,
sequence values, prepared transactions).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pwd
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import PgFactory
from hypothesis import given
from hypothesis import strategies as st
from pageserver_util import RunningPageServer, current_lsn, import_backup, push_wal, take_base_backup

from pgformat.constants import XLOG_BLCKSZ
from pgformat.controlfile import (
    DB_IN_PRODUCTION,
    PG_CONTROL_FILE_SIZE,
    CheckPoint,
    ControlFileError,
    parse_checkpoint,
    parse_control_file,
    write_checkpoint,
    write_control_file,
)
from pgformat.lsn import format_lsn, parse_lsn
from pgformat.rmgr import (
    RM_MULTIXACT_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    XLOG_CHECKPOINT_SHUTDOWN,
    XLOG_MULTIXACT_CREATE_ID,
    XLOG_NEXTOID,
    XLOG_XACT_ASSIGNMENT,
    XLOG_XACT_COMMIT,
    XLOG_XACT_HAS_INFO,
)
from pgformat.walbuild import WalBuildError, build_checkpoint_record, build_record, build_wal_segments, record_start_for
from pgformat.xlogreader import WalStreamReader, segment_file_name
from pgformat.xlogrecord import decode_record
from services.pageserver.basebackup import twophase_file
from services.pageserver.checkpoint_values import advance_next_full_xid_past, running_checkpoint
from services.pageserver.repository import DEFAULT_TENANT
from zctl.postgres import PG_OS_USER, PostgresNode, free_port, make_pg_owned_dir, pg_bindir, run_as_pg_user
from zproto import common_pb2, pageserver_pb2

TIMELINE = "22222222222222222222222222222222"
BRANCH = "33333333333333333333333333333333"
SYSID = 7300000000000000001


def _checkpoint(**kw: Any) -> CheckPoint:
    base = dict(redo=0x1500718, this_timeline_id=1, prev_timeline_id=1, full_page_writes=True, next_xid=724,
                next_oid=13572, next_multi=1, next_multi_offset=0, oldest_xid=716, oldest_xid_db=1, oldest_multi=1,
                oldest_multi_db=1, time=1_700_000_000, oldest_commit_ts_xid=0, newest_commit_ts_xid=0,
                oldest_active_xid=0)
    base.update(kw)
    return CheckPoint(**base)  # type: ignore[arg-type]


# -- pg_control -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def initdb_control(pg_session_factory: PgFactory) -> bytes:
    node = pg_session_factory("controlsrc", start=False)
    return (node.datadir / "global/pg_control").read_bytes()


def test_control_file_round_trips_byte_for_byte(initdb_control: bytes) -> None:
    cf = parse_control_file(initdb_control)
    assert cf.pg_control_version == 1300 and cf.blcksz == 8192 and cf.float_format == 1234567.0
    assert cf.checkpoint == cf.checkpoint_copy.redo
    assert write_control_file(cf) == initdb_control
    assert write_checkpoint(cf.checkpoint_copy) == initdb_control[40:128]


def test_control_file_errors(initdb_control: bytes) -> None:
    bad = bytearray(initdb_control)
    bad[100] ^= 1
    with pytest.raises(ControlFileError, match="checksum"):
        parse_control_file(bytes(bad))
    parse_control_file(bytes(bad), verify_crc=False)
    with pytest.raises(ControlFileError, match="bytes"):
        parse_control_file(initdb_control[:200])
    swapped = bytearray(initdb_control)
    swapped[8:12] = struct.pack(">I", 1300)
    with pytest.raises(ControlFileError, match="byte order"):
        parse_control_file(bytes(swapped))
    with pytest.raises(ControlFileError):
        parse_checkpoint(b"\0" * 87)
    with pytest.raises(ControlFileError, match="out of range"):
        write_checkpoint(_checkpoint(next_oid=1 << 32))


@given(st.binary(max_size=400), st.integers(min_value=0, max_value=295), st.integers(min_value=0, max_value=255))
def test_control_file_parser_raises_only_its_error(junk: bytes, pos: int, byte: int) -> None:
    image = bytearray(junk) + bytes(max(0, 296 - len(junk)))
    image[8:12] = struct.pack("<I", 1300)
    image[pos] = byte
    for candidate in (bytes(image), bytes(junk)):
        try:
            parse_control_file(candidate, verify_crc=False)
            parse_control_file(candidate)
        except ControlFileError:
            pass


_u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1), _u32, _u32, st.booleans(),
       st.integers(min_value=0, max_value=(1 << 64) - 1), st.lists(_u32, min_size=7, max_size=7),
       st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), st.lists(_u32, min_size=3, max_size=3))
def test_checkpoint_round_trips(redo: int, tli: int, prev_tli: int, fpw: bool, next_xid: int, u32s: list[int],
                                ts: int, tail: list[int]) -> None:
    ckpt = CheckPoint(redo, tli, prev_tli, fpw, next_xid, *u32s, ts, *tail)
    image = write_checkpoint(ckpt)
    assert len(image) == 88 and parse_checkpoint(image) == ckpt
    rec = build_checkpoint_record(ckpt, xl_prev=redo)
    decoded = decode_record(rec, 0, 0, verify_crc=True)
    assert parse_checkpoint(decoded.main_data) == ckpt


def test_pg_controldata_reads_what_we_write(initdb_control: bytes, pg_base_dir: Path) -> None:
    cf = parse_control_file(initdb_control)
    ckpt = _checkpoint(redo=0x3_0000_0028, next_xid=(5 << 32) | 1234, next_oid=99999, next_multi=42,
                       next_multi_offset=777, oldest_xid=600, oldest_multi=3, time=cf.checkpoint_copy.time)
    new = dataclasses.replace(cf, state=DB_IN_PRODUCTION, checkpoint=ckpt.redo, checkpoint_copy=ckpt,
                              max_prepared_xacts=7, track_commit_timestamp=True)
    image = write_control_file(new)
    assert len(image) == PG_CONTROL_FILE_SIZE
    d = make_pg_owned_dir(make_pg_owned_dir(Path(tempfile.mkdtemp(dir=pg_base_dir))) / "global")
    (d / "pg_control").write_bytes(image)
    (d / "pg_control").chmod(0o644)
    out = run_as_pg_user([pg_bindir() / "pg_controldata", d.parent]).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["Database cluster state"] == "in production"
    assert fields["Latest checkpoint location"] == "3/28"
    assert fields["Latest checkpoint's NextXID"] == "5:1234"
    assert fields["Latest checkpoint's NextOID"] == "99999"
    assert fields["Latest checkpoint's NextMultiXactId"] == "42"
    assert fields["Latest checkpoint's NextMultiOffset"] == "777"
    assert fields["Latest checkpoint's oldestMultiXid"] == "3"
    assert fields["max_prepared_xacts setting"] == "7"
    assert fields["track_commit_timestamp setting"] == "on"
    assert parse_control_file(image) == dataclasses.replace(new, crc=parse_control_file(image).crc)


# -- the synthetic WAL -------------------------------------------------------------------------

SEG = 16 * 1024 * 1024
# Mid-page, a page boundary, a segment boundary, crossing a page, crossing a segment, first page of a segment.
POSITIONS = [0x1500718, 0x3002000, 0x4000000, 0x5001FE8, 0x6FFFFF0, 0x7000040]


@pytest.mark.parametrize("insert_lsn", POSITIONS, ids=[format_lsn(p) for p in POSITIONS])
def test_checkpoint_segment_reads_back(insert_lsn: int) -> None:
    lsn = record_start_for(insert_lsn)
    ckpt = _checkpoint(redo=lsn)
    record = build_checkpoint_record(ckpt, xl_prev=0x1400000)
    assert len(record) == 114
    wal = build_wal_segments(insert_lsn, [record], 1, SYSID)
    assert wal.record_lsns == [lsn]
    next_page = lsn - lsn % XLOG_BLCKSZ + XLOG_BLCKSZ
    crossing = lsn + 114 > next_page
    assert wal.end_lsn == lsn + 120 + ((40 if next_page % SEG == 0 else 24) if crossing else 0)
    assert all(len(s.data) == SEG for s in wal.segments)
    assert len(wal.segments) == (2 if insert_lsn == 0x6FFFFF0 else 1)
    # Our reader, starting at the page boundary, skips what lies before the record.
    start = insert_lsn - insert_lsn % XLOG_BLCKSZ
    reader = WalStreamReader(start, expect_sysid=SYSID)
    data = b"".join(s.data for s in wal.segments)
    reader.feed(data[start - wal.segments[0].start_lsn : wal.end_lsn - wal.segments[0].start_lsn])
    (raw,) = list(reader.records())
    assert (raw.lsn, raw.end_lsn) == (lsn, wal.end_lsn)
    rec = raw.decode()
    assert (rec.rmid, rec.info, rec.prev) == (RM_XLOG_ID, XLOG_CHECKPOINT_SHUTDOWN, 0x1400000)
    assert parse_checkpoint(rec.main_data) == ckpt


def test_pg_waldump_reads_the_segments(tmp_path: Path) -> None:
    try:
        waldump = pg_bindir() / "pg_waldump"
    except Exception as e:  # pragma: no cover
        pytest.skip(str(e))
    for insert_lsn in POSITIONS:
        d = tmp_path / format_lsn(insert_lsn).replace("/", "_")
        d.mkdir()
        lsn = record_start_for(insert_lsn)
        wal = build_wal_segments(insert_lsn, [build_checkpoint_record(_checkpoint(redo=lsn), 0x1400000)], 1, SYSID)
        for s in wal.segments:
            (d / segment_file_name(1, s.start_lsn)).write_bytes(s.data)
        for start in (lsn, insert_lsn - insert_lsn % XLOG_BLCKSZ):
            out = subprocess.run([waldump, "-p", d, "-s", format_lsn(start), "-e", format_lsn(wal.end_lsn)],
                                 capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("rmgr:")]
            assert len(lines) == 1 and f"lsn: {format_lsn(lsn)}, prev 0/01400000" in lines[0], lines
            assert "CHECKPOINT_SHUTDOWN" in lines[0] and f"redo {lsn >> 32:X}/{lsn & 0xFFFFFFFF:X};" in lines[0]


def test_walbuild_rejects_bad_input() -> None:
    rec = build_checkpoint_record(_checkpoint(), 0)
    with pytest.raises(WalBuildError):
        build_wal_segments(0x1500001, [rec], 1, SYSID)
    with pytest.raises(WalBuildError):
        build_wal_segments(0x1500008, [rec], 1, SYSID)  # inside the page header
    with pytest.raises(WalBuildError):
        build_wal_segments(0x1500718, [rec[:-1]], 1, SYSID)
    with pytest.raises(WalBuildError):
        build_wal_segments(0x1500718, [], 1, SYSID)


# -- running checkpoint values ---------------------------------------------------------------


def _rec(rmid: int, info: int, data: bytes, xid: int = 0, lsn: int = 0x2000000) -> Any:
    raw = build_record(rmid, info, data, xl_prev=lsn - 0x100, xid=xid)
    return decode_record(raw, lsn, lsn + len(raw))


def _commit(xid: int, subxacts: tuple[int, ...] = ()) -> Any:
    data = struct.pack("<q", 0)
    info = XLOG_XACT_COMMIT
    if subxacts:
        info |= XLOG_XACT_HAS_INFO
        data += struct.pack("<I", 1 << 1) + struct.pack(f"<i{len(subxacts)}I", len(subxacts), *subxacts)
    return _rec(RM_XACT_ID, info, data, xid=xid)


def test_next_xid_advances_with_epoch_wrap() -> None:
    assert advance_next_full_xid_past(724, 800) == 801
    assert advance_next_full_xid_past(724, 700) == 724
    assert advance_next_full_xid_past(724, 0) == 724  # InvalidTransactionId moves nothing
    # Just before wraparound: xid 2^32-1 is followed by 3 of the next epoch.
    assert advance_next_full_xid_past((2 << 32) | 0xFFFFFFF0, 0xFFFFFFFF) == (3 << 32) | 3
    # An xid "after" next modulo 2^32, numerically smaller: next epoch.
    assert advance_next_full_xid_past((2 << 32) | 0xFFFFFFF0, 10) == (3 << 32) | 11
    # An xid far behind modulo 2^32 is old: no change.
    assert advance_next_full_xid_past((2 << 32) | 100, 0x90000000) == (2 << 32) | 100


def test_running_checkpoint_follows_the_records() -> None:
    base = _checkpoint(next_xid=(1 << 32) | 1000, next_oid=20000)
    multi = struct.pack("<IIi", 5, 30, 2) + struct.pack("<4I", 1500, 1, 1501, 2)
    records = [
        _commit(1010, (1011, 1020)),
        _rec(RM_XACT_ID, XLOG_XACT_ASSIGNMENT, struct.pack("<Ii3I", 1030, 3, 1031, 1032, 1040), xid=1030),
        _rec(RM_XLOG_ID, XLOG_NEXTOID, struct.pack("<I", 28192)),
        _rec(RM_XLOG_ID, XLOG_NEXTOID, struct.pack("<I", 36384)),
        _rec(RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID, multi, xid=1002),
    ]
    ckpt = running_checkpoint(base, records, 0x3000000, now=123)
    assert ckpt.next_xid == (1 << 32) | 1502
    assert ckpt.next_oid == 36384
    assert (ckpt.next_multi, ckpt.next_multi_offset) == (6, 32)
    assert (ckpt.redo, ckpt.time, ckpt.oldest_active_xid, ckpt.full_page_writes) == (0x3000000, 123, 0, True)
    assert (ckpt.oldest_xid, ckpt.oldest_multi) == (base.oldest_xid, base.oldest_multi)
    # A later online checkpoint moves the oldest values forward, never back.
    online = _checkpoint(next_xid=(1 << 32) | 900, oldest_xid=800, oldest_xid_db=5, next_oid=1)
    later = running_checkpoint(base, [_rec(RM_XLOG_ID, 0x10, write_checkpoint(online))], 0)
    assert (later.oldest_xid, later.oldest_xid_db, later.next_xid, later.next_oid) == (800, 5, base.next_xid, 20000)
    # Subtransaction xids of a prepared transaction's state count too.
    state = struct.pack("<IIIIqIiiiiiiBxH", 0x57F94534, 0, 1600, 5, 0, 10, 2, 0, 0, 0, 0, 0, 0, 3) + bytes(16)
    state = state[:72] + b"gid\0\0\0\0\0" + struct.pack("<2I", 1601, 1650)
    prep = running_checkpoint(base, [_rec(RM_XACT_ID, 0x10, state, xid=1600)], 0)
    assert prep.next_xid == (1 << 32) | 1651


def test_twophase_file_gets_its_crc() -> None:
    body = struct.pack("<II", 0x57F94534, 84) + bytes(72)
    full = twophase_file(body, 5)
    assert len(full) == 84 and full[:80] == body
    assert twophase_file(full, 5) == full


# -- end to end --------------------------------------------------------------------------------


def _table_checksums(node: PostgresNode, dbname: str = "postgres") -> dict[str, tuple[int, int]]:
    """(rows, sum of row hashes) of every permanent table of the public schema (TOAST included)."""
    tables = node.sql(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relpersistence = 'p' ORDER BY 1", dbname=dbname)
    return {t: tuple(node.sql(f"SELECT count(*), coalesce(sum(hashtext(x::text)::bigint), 0) FROM {t} x",
                              dbname=dbname)[0]) for (t,) in tables}


@dataclasses.dataclass
class Snapshot:
    lsn: int
    tables: dict[str, tuple[int, int]]
    other_db: dict[str, tuple[int, int]] | None
    next_xid: int  # the primary's next xid at the quiet moment (taken by a txid_current() after `lsn`)
    max_oid: int
    seq_value: int
    prepared: list[str]


def _snapshot(node: PostgresNode, other_db: bool) -> Snapshot:
    lsn = current_lsn(node)
    return Snapshot(
        lsn=lsn,
        tables=_table_checksums(node),
        other_db=_table_checksums(node, "db2") if other_db else None,
        next_xid=int(node.sql("SELECT txid_current()")[0][0]),
        max_oid=int(node.sql("SELECT max(oid::bigint) FROM pg_class")[0][0]),
        seq_value=int(node.sql("SELECT last_value FROM ticket_seq")[0][0]),
        prepared=sorted(r[0] for r in node.sql("SELECT gid FROM pg_prepared_xacts")),
    )


def _multixact(node: PostgresNode, table: str, key: int) -> None:
    """Two transactions share-lock one row: its xmax becomes a multixact."""
    with node.connect(autocommit=False) as a, node.connect(autocommit=False) as b:
        a.execute(f"SELECT * FROM {table} WHERE id = %s FOR SHARE", (key,))
        b.execute(f"SELECT * FROM {table} WHERE id = %s FOR SHARE", (key,))
        a.commit()
        b.commit()


def _workload_part1(node: PostgresNode) -> None:
    node.pgbench("-c", "2", "-t", "200", "-n")
    node.execute("""
        CREATE TABLE items (id serial PRIMARY KEY, name text, qty int, note text);
        CREATE INDEX items_name ON items (name);
        INSERT INTO items (name, qty, note)
            SELECT 'item' || i, i % 97, repeat('n', i % 300) FROM generate_series(1, 5000) i;
        UPDATE items SET qty = qty + 1 WHERE id % 4 = 0;
        DELETE FROM items WHERE id % 11 = 0;
        CREATE SEQUENCE ticket_seq;
        CREATE TABLE docs (id int PRIMARY KEY, body text);
        INSERT INTO docs SELECT i, repeat(md5(i::text), 400) FROM generate_series(1, 60) i;
        CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, v text);
        INSERT INTO scratch SELECT i, 'x' || i FROM generate_series(1, 1000) i;
    """)
    node.sql("SELECT nextval('ticket_seq') FROM generate_series(1, 10)")
    # Subtransactions: their xids must not be handed out again either.
    node.execute("BEGIN; INSERT INTO items (name) VALUES ('sub0'); SAVEPOINT a; INSERT INTO items (name)"
                 " VALUES ('sub1'); SAVEPOINT b; INSERT INTO items (name) VALUES ('sub2'); RELEASE a; COMMIT")
    _multixact(node, "items", 1)
    node.execute("BEGIN; INSERT INTO docs VALUES (-1, 'prepared one'); SAVEPOINT s;"
                 " INSERT INTO docs VALUES (-2, 'sub of prepared'); PREPARE TRANSACTION 'p1'")


def _workload_part2(node: PostgresNode) -> None:
    node.execute("CREATE DATABASE db2")
    node.execute("CREATE TABLE t2 (id int PRIMARY KEY, v text);"
                 " INSERT INTO t2 SELECT i, md5(i::text) FROM generate_series(1, 2000) i;"
                 " UPDATE t2 SET v = 'u' WHERE id % 3 = 0", dbname="db2")
    node.pgbench("-c", "2", "-t", "200", "-n")
    node.execute("""
        UPDATE items SET name = name || '-renamed' WHERE id % 9 = 0;
        DELETE FROM items WHERE id % 13 = 0;
        UPDATE docs SET body = body || 'more' WHERE id % 5 = 0;
        INSERT INTO scratch SELECT i, 'y' FROM generate_series(1001, 2000) i;
    """)
    node.sql("SELECT nextval('ticket_seq') FROM generate_series(1, 100)")
    _multixact(node, "items", 2)
    node.sql("COMMIT PREPARED 'p1'")
    node.execute("BEGIN; UPDATE items SET qty = -1 WHERE id = 3; PREPARE TRANSACTION 'p2'")


def _fetch_basebackup(ps: RunningPageServer, lsn: int, timeline: str = TIMELINE) -> tuple[bytes, int]:
    chunks = list(ps.stub.Basebackup(pageserver_pb2.BasebackupRequest(
        tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=timeline), lsn=lsn),
        timeout=300))
    return b"".join(c.data for c in chunks), chunks[0].lsn


def _boot(archive: bytes, where: Path) -> PostgresNode:
    datadir = make_pg_owned_dir(where) / "compute"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r|") as tar:
        tar.extractall(datadir)  # noqa: S202 - our own archive
    node = PostgresNode(datadir=datadir, port=free_port())
    node.configure({"listen_addresses": node.host, "port": node.port, "unix_socket_directories": "",
                    "max_prepared_transactions": 5, "fsync": "off", "autovacuum": "off",
                    "log_min_messages": "warning", "lock_timeout": "60s"})
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_OS_USER)
        for root, dirs, files in os.walk(datadir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
        os.chown(datadir, pw.pw_uid, pw.pw_gid)
    datadir.chmod(0o700)
    node.start()
    return node


def _check_compute(compute: PostgresNode, snap: Snapshot, backup_lsn: int, checkpoint_lsn: int) -> None:
    assert _table_checksums(compute) == snap.tables
    if snap.other_db is not None:
        assert _table_checksums(compute, "db2") == snap.other_db
    else:
        assert not compute.sql("SELECT 1 FROM pg_database WHERE datname = 'db2'")
    out = run_as_pg_user([compute.bin("pg_amcheck"), "-h", compute.host, "-p", str(compute.port), "-U", compute.user,
                          "--all", "--install-missing", "--heapallindexed"], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert parse_lsn(compute.sql("SELECT pg_current_wal_lsn()::text")[0][0]) >= snap.lsn >= backup_lsn
    assert sorted(r[0] for r in compute.sql("SELECT gid FROM pg_prepared_xacts")) == snap.prepared
    # New xids, oids, multixacts and sequence values continue past the primary's.
    assert int(compute.sql("SELECT txid_current()")[0][0]) >= snap.next_xid
    compute.execute("CREATE TABLE after_boot (id int PRIMARY KEY, v text);"
                    " INSERT INTO after_boot SELECT i, 'v' FROM generate_series(1, 100) i;"
                    " UPDATE items SET qty = 0 WHERE id < 50 AND id <> 3")  # row 3 is locked by prepared p2
    assert int(compute.sql("SELECT 'after_boot'::regclass::oid::bigint")[0][0]) > snap.max_oid
    assert int(compute.sql("SELECT nextval('ticket_seq')")[0][0]) > snap.seq_value
    _multixact(compute, "items", 5)
    # The compute's own WAL continues ours: pg_waldump reads from our checkpoint record on, and a
    # crash now makes Postgres replay from that record.
    flushed = compute.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0]
    dump = run_as_pg_user([compute.bin("pg_waldump"), "-p", compute.waldir, "-s", format_lsn(checkpoint_lsn),
                           "-e", flushed], check=False)
    assert dump.returncode == 0, dump.stderr
    assert "CHECKPOINT_SHUTDOWN" in dump.stdout.splitlines()[0] and "after_boot" not in dump.stderr
    compute.kill()
    compute.start()
    assert compute.sql("SELECT count(*) FROM after_boot")[0][0] == 100
    # The unlogged table is there, empty, as after a crash of the primary.
    assert compute.sql("SELECT count(*) FROM scratch")[0][0] == 0
    compute.execute("INSERT INTO scratch VALUES (1, 'new')")
    # The prepared transactions can be finished.
    for gid in snap.prepared:
        compute.sql(f"COMMIT PREPARED '{gid}'")
    if "p1" in snap.prepared:
        assert compute.sql("SELECT count(*) FROM docs WHERE id < 0")[0][0] == 2
    compute.execute("CHECKPOINT")
    out = run_as_pg_user([compute.bin("pg_amcheck"), "-h", compute.host, "-p", str(compute.port), "-U", compute.user,
                          "--all", "--heapallindexed"], check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compute_boots_from_basebackup_at_two_lsns(pg_factory: PgFactory, tmp_path: Path, pg_base_dir: Path) -> None:
    primary = pg_factory(autovacuum="off", max_prepared_transactions=5)
    primary.pgbench("-i", "-s", "1", "-q")
    backup = take_base_backup(primary, pg_base_dir / f"backup-{tmp_path.name}")
    _workload_part1(primary)
    snap1 = _snapshot(primary, other_db=False)
    _workload_part2(primary)
    snap2 = _snapshot(primary, other_db=True)
    primary.sql("SELECT pg_switch_wal()")

    ps = RunningPageServer(tmp_path / "repo")
    computes: list[PostgresNode] = []
    try:
        summary = import_backup(ps.stub, backup, TIMELINE)
        assert push_wal(ps.stub, primary.waldir, TIMELINE, summary.start_lsn) >= snap2.lsn
        # A branch at L1 (O(1), nothing copied) boots with the same data: its base backup follows
        # the lineage into the parent for the records since the last checkpoint.
        _, lsn1 = _fetch_basebackup(ps, snap1.lsn)
        ps.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), new_timeline=common_pb2.TimelineId(id=BRANCH),
            ancestor_timeline=common_pb2.TimelineId(id=TIMELINE), ancestor_lsn=lsn1))
        for i, (timeline, snap) in enumerate(((TIMELINE, snap1), (TIMELINE, snap2), (BRANCH, snap1))):
            archive, lsn = _fetch_basebackup(ps, 0 if timeline == BRANCH else snap.lsn, timeline)
            assert snap.lsn - XLOG_BLCKSZ < lsn <= snap.lsn
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                names = tar.getnames()
                control = tar.extractfile("global/pg_control")
                assert control is not None
                checkpoint_lsn = parse_control_file(control.read()).checkpoint
            assert lsn <= checkpoint_lsn < lsn + 64
            assert "global/pg_control" == names[-1] and "PG_VERSION" in names
            assert not [n for n in names if n.endswith("_fsm")]
            compute = _boot(archive, Path(tempfile.mkdtemp(prefix=f"compute{i}-", dir=pg_base_dir)))
            computes.append(compute)
            _check_compute(compute, snap, lsn, checkpoint_lsn)
            compute.stop()
            computes.pop()
    finally:
        for c in computes:
            c.stop(mode="immediate")
        ps.close()


def test_compute_boots_from_a_freshly_imported_cluster(pg_factory: PgFactory, tmp_path: Path,
                                                       pg_base_dir: Path) -> None:
    """What `zctl init` does: initdb, import the stopped cluster, boot a compute at the import LSN
    (no record since the checkpoint: the checkpoint values come from pg_control)."""
    from zctl.importer import import_requests, scan_stopped_datadir

    seed = pg_factory("seed", start=False)
    control = parse_control_file((seed.datadir / "global/pg_control").read_bytes())
    summary = scan_stopped_datadir(seed.datadir)
    ps = RunningPageServer(tmp_path / "repo")
    compute = None
    try:
        ps.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), new_timeline=common_pb2.TimelineId(id=TIMELINE)))
        ps.stub.Import(import_requests(seed.datadir, DEFAULT_TENANT, TIMELINE, summary))
        archive, lsn = _fetch_basebackup(ps, 0)
        assert lsn == summary.start_lsn
        compute = _boot(archive, Path(tempfile.mkdtemp(prefix="fresh-", dir=pg_base_dir)))
        assert int(compute.sql("SELECT txid_current()")[0][0]) >= control.checkpoint_copy.next_xid
        compute.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)")
        assert int(compute.sql("SELECT 't'::regclass::oid::bigint")[0][0]) >= control.checkpoint_copy.next_oid
        assert {r[0] for r in compute.sql("SELECT datname FROM pg_database")} >= {"postgres", "template0", "template1"}
        out = run_as_pg_user([compute.bin("pg_amcheck"), "-h", compute.host, "-p", str(compute.port), "-U",
                              compute.user, "--all", "--install-missing", "--heapallindexed"], check=False, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        # The checkpoint record's prev-link is the imported cluster's own shutdown checkpoint.
        dump = run_as_pg_user([compute.bin("pg_waldump"), "-p", compute.waldir, "-s", format_lsn(lsn), "-n", "1"])
        assert f"prev {format_lsn(control.checkpoint)}" in dump.stdout
    finally:
        if compute is not None:
            compute.stop(mode="immediate")
        ps.close()


def test_compute_keeps_data_checksums(pg_base_dir: Path, tmp_path: Path) -> None:
    """A primary with data checksums: the backup's pages carry valid checksums (pg_checksums --check
    on the stopped compute is the oracle) and the compute runs with checksums on."""
    from pgformat.checksum import page_checksums

    primary = PostgresNode(datadir=make_pg_owned_dir(Path(tempfile.mkdtemp(prefix="cksum-", dir=pg_base_dir))) / "p",
                           port=free_port())
    primary.initdb(["--data-checksums"])
    primary.configure({"autovacuum": "off", "wal_keep_size": "256MB"})
    primary.start()
    ps = RunningPageServer(tmp_path / "repo")
    compute = None
    try:
        primary.execute("CREATE TABLE t (id int PRIMARY KEY, s text); INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 5000) i")
        backup = take_base_backup(primary, pg_base_dir / f"cksum-backup-{tmp_path.name}")
        # Changes after the backup: pages the page server rebuilds from WAL records, stale pd_checksum and all.
        primary.execute("UPDATE t SET s = s || 'x' WHERE id % 3 = 0; DELETE FROM t WHERE id % 7 = 0")
        primary.execute("VACUUM t")
        expected = _table_checksums(primary)
        primary.sql("SELECT pg_switch_wal()")
        summary = import_backup(ps.stub, backup, TIMELINE)
        push_wal(ps.stub, primary.waldir, TIMELINE, summary.start_lsn)
        archive, _ = _fetch_basebackup(ps, 0)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            rel = primary.sql("SELECT pg_relation_filepath('t')")[0][0]
            data = tar.extractfile(rel).read()  # type: ignore[union-attr]
        pages = [data[i:i + 8192] for i in range(0, len(data), 8192)]
        assert [struct.unpack_from("<H", p, 8)[0] for p in pages] == page_checksums(pages, 0)
        compute = _boot(archive, Path(tempfile.mkdtemp(prefix="cksum-compute-", dir=pg_base_dir)))
        assert compute.sql("SHOW data_checksums")[0][0] == "on"
        assert _table_checksums(compute) == expected
        compute.stop()
        out = run_as_pg_user([compute.bin("pg_checksums"), "--check", "-D", compute.datadir], check=False)
        assert out.returncode == 0 and "Bad checksums:  0" in out.stdout, out.stdout + out.stderr
        compute = None
    finally:
        if compute is not None:
            compute.stop(mode="immediate")
        ps.close()
        primary.stop(mode="immediate")
