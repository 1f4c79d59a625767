"""The libpq shim against real clients: psql, psycopg, pg_basebackup, pg_verifybackup, postgres.

A real primary's base backup is imported into a real page server (gRPC on
loopback) and its WAL ingested; the shim runs as its own process in front.
Oracles: gRPC GetPage/RelSize/... for pagestream, pg_verifybackup and a
booted stock postgres (row counts and checksums as of the chosen LSN) for
BASE_BACKUP, libpq's own parsing for every reply.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from conftest import PgFactory
from pageserver_util import current_lsn, get_page, import_backup, push_wal, rel_key, take_base_backup
from psycopg import pq
from shim_util import PageServerProcess, RunningShim

from pgformat import pagestream as ps
from pgformat import wire
from pgformat.lsn import format_lsn
from services.pageserver.repository import DEFAULT_TENANT
from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir, run_as_pg_user
from zctl.waldump import iter_file_records
from zproto import common_pb2, pageserver_pb2

TIMELINE = "44444444444444444444444444444444"
BRANCH = "55555555555555555555555555555555"
CHECK_SQL = "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(sum(id), 0) FROM items"


@dataclass
class ShimEnv:
    primary: PostgresNode
    ps: PageServerProcess
    shim: RunningShim
    lsn1: int  # a record end on main; the branch "feature" starts here
    lsn2: int  # the last record ingested on main
    rows1: tuple[int, int, int]
    rows2: tuple[int, int, int]
    rel: common_pb2.RelTag
    base: Path

    def conninfo(self, **extra: str) -> str:
        parts = {"host": self.shim.host, "port": str(self.shim.port), "user": "postgres", "dbname": "postgres",
                 "connect_timeout": "10", **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())


@pytest.fixture(scope="module")
def env(pg_session_factory: PgFactory, pg_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShimEnv]:
    primary = pg_session_factory("shimsrc", autovacuum="off", wal_keep_size="512MB")
    primary.execute("CREATE TABLE items (id int PRIMARY KEY, body text);"
                    "INSERT INTO items SELECT i, repeat('x', 100) FROM generate_series(1, 5000) i")
    backup = take_base_backup(primary, Path(tempfile.mkdtemp(prefix="shim-backup-", dir=pg_base_dir)) / "b")
    primary.execute("INSERT INTO items SELECT i, 'second' FROM generate_series(5001, 8000) i")
    rows1 = tuple(int(v) for v in primary.sql(CHECK_SQL)[0])
    mark = current_lsn(primary)
    primary.execute("DELETE FROM items WHERE id > 6000; UPDATE items SET body = 'third' WHERE id <= 100;"
                    "CREATE TABLE other (x int); INSERT INTO other VALUES (1)")
    rows2 = tuple(int(v) for v in primary.sql(CHECK_SQL)[0])
    primary.sql("SELECT pg_switch_wal()")
    rel = rel_key(primary, "items")
    pageserver = PageServerProcess(tmp_path_factory.mktemp("shimrepo"))
    shim = None
    try:
        summary = import_backup(pageserver.stub, backup, TIMELINE, name="main")
        lsn2 = push_wal(pageserver.stub, primary.waldir, TIMELINE, summary.start_lsn)
        lsn1 = max(r.end_lsn for r in iter_file_records([primary.waldir]) if r.end_lsn <= mark)
        pageserver.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), new_timeline=common_pb2.TimelineId(id=BRANCH),
            ancestor_timeline=common_pb2.TimelineId(id=TIMELINE), ancestor_lsn=lsn1, name="feature"))
        lsn2 = pageserver.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE))).last_record_lsn
        shim = RunningShim(pageserver.address)
        yield ShimEnv(primary, pageserver, shim, lsn1, lsn2, rows1, rows2, rel, pg_base_dir)  # type: ignore[arg-type]
    finally:
        if shim is not None:
            shim.close()
        pageserver.close()


# ------------------------------------------------------------------- psql / psycopg


def test_psql_status_lists_timelines(env: ShimEnv) -> None:
    out = subprocess.run(["psql", "-X", "-At", "-h", env.shim.host, "-p", str(env.shim.port), "-U", "postgres",
                          "-c", "status"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1]: line.split("|") for line in out.stdout.splitlines()}
    assert rows[TIMELINE][2] == "main" and rows[TIMELINE][5] == format_lsn(env.lsn2)
    assert rows[BRANCH][2] == "feature" and rows[BRANCH][3] == TIMELINE and rows[BRANCH][4] == format_lsn(env.lsn1)


def test_psycopg_extended_protocol_and_errors(env: ShimEnv) -> None:
    with psycopg.connect(env.conninfo()) as conn:  # not autocommit: psycopg sends BEGIN first
        rows = conn.execute("status").fetchall()
        assert {r[1] for r in rows} == {TIMELINE, BRANCH}
        assert conn.execute("SHOW wal_segment_size").fetchone() == ("16MB",)
        with pytest.raises(psycopg.errors.SyntaxError) as e:
            conn.execute("SELECT * FROM pg_class")
        assert "unknown command" in str(e.value)
        conn.rollback()
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SHOW no_such_setting")
        conn.rollback()
        assert len(conn.execute("status").fetchall()) == 2  # the session goes on after errors
    with psycopg.connect(env.conninfo(options="'-c zenith.branch=nosuch'"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedObject, match="nosuch"):
            conn.execute("IDENTIFY_SYSTEM")


def test_identify_system_reports_the_primary(env: ShimEnv) -> None:
    sysid = env.primary.sql("SELECT system_identifier FROM pg_control_system()")[0][0]
    with psycopg.connect(env.conninfo(replication="true"), autocommit=True) as conn:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
    assert row == (str(sysid), 1, format_lsn(env.lsn2), None)


# ------------------------------------------------------------------- pagestream


class PagestreamClient:
    """A Neon-style compute client: libpq (through psycopg's pq layer) in CopyBoth."""

    def __init__(self, conninfo: str, version: int, timeline: str = TIMELINE) -> None:
        self.version = version
        self.conn = pq.PGconn.connect(conninfo.encode())
        assert self.conn.status == pq.ConnStatus.OK, self.conn.error_message
        self.conn.send_query(f"pagestream_v{version} {DEFAULT_TENANT} {timeline}".encode())
        res = self.conn.get_result()
        assert res is not None and res.status == pq.ExecStatus.COPY_BOTH, res and res.error_message
        self.reqid = 0

    def send(self, tag: ps.RequestTag, lsn: int, nms: int | None = None, **kw: int) -> ps.RequestTag:
        self.reqid += 1
        self.conn.put_copy_data(ps.build_request(self.version, tag, lsn, lsn if nms is None else nms,
                                                 reqid=self.reqid, **kw))
        return tag

    def receive(self, tag: ps.RequestTag) -> ps.PagestreamResponse:
        self.conn.flush()
        n, data = self.conn.get_copy_data(0)
        assert n > 0, self.conn.error_message
        return ps.parse_response(bytes(data), self.version, tag)

    def call(self, tag: ps.RequestTag, lsn: int, nms: int | None = None, **kw: int) -> ps.PagestreamResponse:
        return self.receive(self.send(tag, lsn, nms, **kw))

    def close(self) -> pq.PGresult | None:
        self.conn.put_copy_end()
        self.conn.flush()
        while self.conn.get_copy_data(0)[0] > 0:
            pass
        res = self.conn.get_result()
        self.conn.finish()
        return res


def _grpc_ids(timeline: str = TIMELINE) -> dict[str, object]:
    return {"tenant": common_pb2.TenantId(id=DEFAULT_TENANT), "timeline": common_pb2.TimelineId(id=timeline)}


@pytest.mark.parametrize("version", [2, 3])
def test_pagestream_pages_equal_grpc(env: ShimEnv, version: int) -> None:
    stub = env.ps.stub
    rel = env.rel
    relkw = dict(spc=rel.spc_oid, db=rel.db_oid, rel=rel.rel_number, fork=0)
    nblocks = stub.RelSize(pageserver_pb2.RelSizeRequest(rel=rel, lsn=common_pb2.RequestLsn(lsn=env.lsn2),
                                                         **_grpc_ids())).nblocks
    assert nblocks > 10
    client = PagestreamClient(env.conninfo(), version)
    try:
        assert client.call(ps.RequestTag.NBLOCKS, env.lsn2, **relkw).nblocks == nblocks
        assert client.call(ps.RequestTag.EXISTS, env.lsn2, **relkw).exists
        assert not client.call(ps.RequestTag.EXISTS, env.lsn2, **{**relkw, "rel": 999999}).exists
        # Pipelined: every request is sent before the first answer is read.
        for lsn, nms in ((env.lsn2, env.lsn2), (env.lsn1, env.lsn1), (ps.LSN_MAX, env.lsn1)):
            tags = [client.send(ps.RequestTag.GET_PAGE, lsn, nms, blkno=b, **relkw) for b in range(nblocks)]
            for blk, tag in enumerate(tags):
                resp = client.receive(tag)
                assert resp.tag == ps.ResponseTag.GET_PAGE, resp.error
                want_lsn = env.lsn2 if lsn == ps.LSN_MAX else lsn
                if blk >= stub.RelSize(pageserver_pb2.RelSizeRequest(
                        rel=rel, lsn=common_pb2.RequestLsn(lsn=want_lsn), **_grpc_ids())).nblocks:
                    continue
                assert resp.page == get_page(stub, TIMELINE, rel, blk, want_lsn), f"block {blk} at {lsn:X}"
                if version == 3:
                    reqid, req_lsn, req_nms = struct.unpack_from("!QQQ", resp.echoed)
                    assert (req_lsn, req_nms) == (lsn, nms) and reqid > 0
        db_size = stub.DbSize(pageserver_pb2.DbSizeRequest(db_oid=rel.db_oid, lsn=common_pb2.RequestLsn(lsn=env.lsn2),
                                                           **_grpc_ids())).size_bytes
        assert client.call(ps.RequestTag.DB_SIZE, env.lsn2, db=rel.db_oid).db_size == db_size
        clog = stub.GetSlruSegment(pageserver_pb2.GetSlruSegmentRequest(
            kind=common_pb2.SLRU_KIND_CLOG, segno=0, lsn=common_pb2.RequestLsn(lsn=env.lsn2), **_grpc_ids())).segment
        assert client.call(ps.RequestTag.GET_SLRU_SEGMENT, env.lsn2, slru_kind=ps.SLRU_CLOG, segno=0).segment == clog
        # Per-request failures are pagestream errors; the stream goes on.
        err = client.call(ps.RequestTag.GET_PAGE, env.lsn2, blkno=0, **{**relkw, "rel": 999999})
        assert err.tag == ps.ResponseTag.ERROR and "999999" in err.error
        err = client.call(ps.RequestTag.GET_PAGE, env.lsn1, env.lsn2, blkno=0, **relkw)
        assert err.tag == ps.ResponseTag.ERROR and "not_modified_since" in err.error
        assert client.call(ps.RequestTag.GET_PAGE, env.lsn2, blkno=0, **relkw).page == \
            get_page(stub, TIMELINE, rel, 0, env.lsn2)
    finally:
        res = client.close()
    assert res is not None and res.status == pq.ExecStatus.COMMAND_OK


def test_pagestream_on_a_branch_reads_the_branch_point(env: ShimEnv) -> None:
    rel = env.rel
    client = PagestreamClient(env.conninfo(), 3, timeline="feature")  # a branch name works as well as an id
    try:
        resp = client.call(ps.RequestTag.GET_PAGE, ps.LSN_MAX, env.lsn1, blkno=1, spc=rel.spc_oid, db=rel.db_oid,
                           rel=rel.rel_number, fork=0)
        assert resp.page == get_page(env.ps.stub, TIMELINE, rel, 1, env.lsn1)
    finally:
        client.close()


def test_cancel_request_stops_a_waiting_read(env: ShimEnv) -> None:
    rel = env.rel
    client = PagestreamClient(env.conninfo(), 2)
    future = env.lsn2 + (1 << 24)
    client.send(ps.RequestTag.GET_PAGE, future, future, blkno=0, spc=rel.spc_oid, db=rel.db_oid,
                rel=rel.rel_number, fork=0)
    client.conn.flush()
    time.sleep(0.5)
    started = time.monotonic()
    cancel = client.conn.get_cancel()
    cancel.cancel()
    n, _ = client.conn.get_copy_data(0)
    assert n < 0
    res = client.conn.get_result()
    assert res is not None and res.error_field(pq.DiagnosticField.SQLSTATE) == b"57014"
    assert time.monotonic() - started < 3  # the page server would have waited 5 s
    client.conn.finish()


def _copy_out(env: ShimEnv, command: str) -> bytes:
    """Run a COPY OUT command through libpq; its data, after checking it completed."""
    conn = pq.PGconn.connect(env.conninfo().encode())
    try:
        conn.send_query(command.encode())
        res = conn.get_result()
        assert res is not None and res.status == pq.ExecStatus.COPY_OUT, res and res.error_message
        data = bytearray()
        while (got := conn.get_copy_data(0))[0] > 0:
            data += bytes(got[1])
        res = conn.get_result()
        assert res is not None and res.status == pq.ExecStatus.COMMAND_OK, res and res.error_message
        return bytes(data)
    finally:
        conn.finish()


def test_basebackup_command_streams_the_page_servers_tar(env: ShimEnv) -> None:
    data = _copy_out(env, f"basebackup {DEFAULT_TENANT} {TIMELINE} {format_lsn(env.lsn1)}")
    theirs = b"".join(c.data for c in env.ps.stub.Basebackup(pageserver_pb2.BasebackupRequest(
        lsn=env.lsn1, **_grpc_ids()), timeout=120))
    ours_tar, theirs_tar = (tarfile.open(fileobj=io.BytesIO(bytes(b))) for b in (data, theirs))
    assert ours_tar.getnames() == theirs_tar.getnames()
    relpath = f"base/{env.rel.db_oid}/{env.rel.rel_number}"
    assert ours_tar.extractfile(relpath).read() == theirs_tar.extractfile(relpath).read()  # type: ignore[union-attr]


def test_page_server_not_modified_since_rules(env: ShimEnv) -> None:
    """Neon's rules, at the gRPC level the shim relies on: wait only for the hint, read at min(request, last)."""
    rel = env.rel
    key = common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=1))
    future = env.lsn2 + (1 << 24)
    started = time.monotonic()
    resp = env.ps.stub.GetPage(pageserver_pb2.GetPageRequest(
        key=key, lsn=common_pb2.RequestLsn(lsn=future, not_modified_since=env.lsn1), **_grpc_ids()), timeout=30)
    assert time.monotonic() - started < 2  # no wait for the future request LSN
    assert resp.read_lsn == env.lsn2 and bytes(resp.page) == get_page(env.ps.stub, TIMELINE, rel, 1, env.lsn2)
    with pytest.raises(grpc.RpcError) as e:
        env.ps.stub.GetPage(pageserver_pb2.GetPageRequest(
            key=key, lsn=common_pb2.RequestLsn(lsn=env.lsn1, not_modified_since=env.lsn2), **_grpc_ids()), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:  # a hint beyond what is ingested still waits (bounded)
        env.ps.stub.GetPage(pageserver_pb2.GetPageRequest(
            key=key, lsn=common_pb2.RequestLsn(latest=True, not_modified_since=future), **_grpc_ids()), timeout=30)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_basebackup_command_gzip(env: ShimEnv) -> None:
    data = _copy_out(env, f"basebackup {DEFAULT_TENANT} feature --gzip")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(bytes(data)))) as tar:
        assert "global/pg_control" in tar.getnames()


# ------------------------------------------------------------------- pg_basebackup


def _pg_basebackup(env: ShimEnv, dest: Path, *args: str, options: str = "") -> subprocess.CompletedProcess[str]:
    cmd = ["env", f"PGOPTIONS={options}", str(env.primary.bin("pg_basebackup")), "-h", env.shim.host,
           "-p", str(env.shim.port), "-U", "postgres", "-D", str(dest), "--no-sync", *args]
    return run_as_pg_user(cmd, check=False, timeout=300)


def _boot_and_check(env: ShimEnv, datadir: Path, expected: tuple[int, int, int]) -> None:
    node = PostgresNode(datadir=datadir, port=free_port())
    node.configure({"listen_addresses": node.host, "port": node.port, "unix_socket_directories": "",
                    "fsync": "off", "autovacuum": "off"})
    node.start()
    try:
        assert tuple(int(v) for v in node.sql(CHECK_SQL)[0]) == expected
        node.execute("INSERT INTO items VALUES (-1, 'written on the copy')")  # a writable, working cluster
    finally:
        node.stop(mode="fast")


def _workdir(env: ShimEnv, name: str) -> Path:
    return make_pg_owned_dir(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=env.base)))


def test_pg_basebackup_plain_with_streamed_wal(env: ShimEnv) -> None:
    dest = _workdir(env, "bb-plain") / "data"
    out = _pg_basebackup(env, dest, "-Fp", "-X", "stream", "-c", "fast", "-P")
    assert out.returncode == 0, out.stderr
    verify = run_as_pg_user([env.primary.bin("pg_verifybackup"), dest], check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "successfully verified" in verify.stdout
    _boot_and_check(env, dest, env.rows2)


def test_pg_basebackup_tar_of_a_branch_at_an_lsn(env: ShimEnv) -> None:
    work = _workdir(env, "bb-tar")
    out = _pg_basebackup(env, work / "tar", "-Ft", "-X", "fetch",
                         options=f"-c zenith.branch=main -c zenith.lsn={format_lsn(env.lsn1)}")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (work / "tar").iterdir()) == ["backup_manifest", "base.tar"]
    dest = work / "data"
    run_as_pg_user(["mkdir", "-m", "0700", dest])
    run_as_pg_user(["tar", "-xf", work / "tar" / "base.tar", "-C", dest])
    run_as_pg_user(["cp", work / "tar" / "backup_manifest", dest])
    verify = run_as_pg_user([env.primary.bin("pg_verifybackup"), dest], check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _boot_and_check(env, dest, env.rows1)


def test_pg_basebackup_of_a_branch_with_streamed_wal_tar(env: ShimEnv) -> None:
    work = _workdir(env, "bb-branch")
    out = _pg_basebackup(env, work / "tar", "-Ft", "-X", "stream", options="-c zenith.branch=feature")
    assert out.returncode == 0, out.stderr
    dest = work / "data"
    run_as_pg_user(["mkdir", "-m", "0700", dest])
    run_as_pg_user(["tar", "-xf", work / "tar" / "base.tar", "-C", dest])
    run_as_pg_user(["tar", "-xf", work / "tar" / "pg_wal.tar", "-C", dest / "pg_wal"])
    run_as_pg_user(["cp", work / "tar" / "backup_manifest", dest])
    verify = run_as_pg_user([env.primary.bin("pg_verifybackup"), dest], check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _boot_and_check(env, dest, env.rows1)


def test_pg_verifybackup_catches_a_changed_file(env: ShimEnv) -> None:
    """The manifest is a real oracle: a file changed after the backup fails verification."""
    dest = _workdir(env, "bb-tamper") / "data"
    assert _pg_basebackup(env, dest, "-Fp", "-X", "fetch").returncode == 0
    target = dest / "base" / str(env.rel.db_oid) / str(env.rel.rel_number)
    with open(target, "r+b") as f:  # flip one bit of the first page
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 1]))
    verify = run_as_pg_user([env.primary.bin("pg_verifybackup"), dest], check=False)
    assert verify.returncode != 0 and "checksum mismatch" in verify.stderr


# ------------------------------------------------------------------- hostile input


def _raw(env: ShimEnv) -> socket.socket:
    s = socket.create_connection((env.shim.host, env.shim.port), timeout=5)
    return s


def _startup_bytes(user: str = "postgres", **params: str) -> bytes:
    body = struct.pack("!I", wire.PROTOCOL_V3)
    for k, v in {"user": user, **params}.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def _packet(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


def _read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or the timeout: then the test fails)."""
    s.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise AssertionError(f"server kept the connection open; sent {bytes(out[:200])!r}") from None
        if not chunk:
            return bytes(out)
        out += chunk


def _messages(data: bytes) -> list[tuple[bytes, bytes]]:
    parser = wire.MessageParser(1 << 24)
    return parser.feed(data)


def _started(env: ShimEnv) -> socket.socket:
    s = _raw(env)
    s.sendall(_startup_bytes())
    buf = b""
    while not buf.endswith(wire.ready_for_query()):
        chunk = s.recv(65536)
        assert chunk
        buf += chunk
    return s


def _assert_error_then_close(s: socket.socket, sqlstate: str = wire.SqlState.PROTOCOL_VIOLATION) -> None:
    msgs = _messages(_read_all(s))
    errors = [body for kind, body in msgs if kind == b"E"]
    assert errors, msgs
    assert b"C" + sqlstate.encode() + b"\0" in errors[-1]


def _shim_still_serves(env: ShimEnv) -> None:
    assert env.shim.alive()
    with psycopg.connect(env.conninfo(), autocommit=True) as conn:
        assert len(conn.execute("status").fetchall()) == 2


def test_hostile_startup_packets(env: ShimEnv) -> None:
    cases = [
        struct.pack("!I", 100_000) + b"x" * 10,  # too long
        struct.pack("!I", 3),  # shorter than its own header
        struct.pack("!II", 8, 0x00020000),  # protocol 2
        _packet(struct.pack("!I", wire.PROTOCOL_V3) + b"user"),  # not NUL-terminated
        _packet(struct.pack("!I", wire.PROTOCOL_V3) + b"database\0x\0\0"),  # no user
        _packet(struct.pack("!I", wire.PROTOCOL_V3) + b"user\0\xff\xfe\0\0"),  # invalid UTF-8
        _packet(struct.pack("!I", wire.PROTOCOL_V3) + b"user\0a\0b\0\0"),  # a name without a value
        _startup_bytes(options="-c zenith.lsn=nonsense"),
    ]
    for data in cases:
        s = _raw(env)
        s.sendall(data)
        _assert_error_then_close(s, wire.SqlState.INVALID_PARAMETER_VALUE if b"nonsense" in data
                                 else wire.SqlState.PROTOCOL_VIOLATION)
        s.close()
    _shim_still_serves(env)


def test_ssl_and_gss_requests_are_refused_then_startup_works(env: ShimEnv) -> None:
    s = _raw(env)
    s.sendall(struct.pack("!II", 8, wire.SSL_REQUEST_CODE))
    assert s.recv(1) == b"N"
    s.sendall(struct.pack("!II", 8, wire.GSSENC_REQUEST_CODE))
    assert s.recv(1) == b"N"
    s.sendall(_startup_bytes())
    data = b""
    while not data.endswith(wire.ready_for_query()):
        data += s.recv(65536)
    assert _messages(data)[0] == (b"R", struct.pack("!I", 0))
    s.close()


def test_hostile_messages_after_startup(env: ShimEnv) -> None:
    for data in (
        b"z" + struct.pack("!I", 4),  # unknown message type
        b"Q" + struct.pack("!I", 2),  # length below its own size
        b"Q" + struct.pack("!I", 1 << 30),  # absurd length
        b"Q" + struct.pack("!I", 9) + b"stat",  # query not NUL-terminated (length says 5 bytes)
        b"P" + struct.pack("!I", 8) + b"\0\0\xff\xff",  # Parse with a truncated body
    ):
        s = _started(env)
        s.sendall(data)
        if data.startswith(b"Q" + struct.pack("!I", 9)):
            s.sendall(b"x")  # complete the lying message
        _assert_error_then_close(s)
        s.close()
    _shim_still_serves(env)


def _expect_copy_both(s: socket.socket) -> None:
    s.settimeout(5)
    want = len(wire.copy_both_response())
    got = b""
    while len(got) < want:
        chunk = s.recv(want - len(got))
        assert chunk, "connection closed before CopyBothResponse"
        got += chunk
    assert got == wire.copy_both_response()


def test_query_during_pagestream_copy_is_a_protocol_violation(env: ShimEnv) -> None:
    s = _started(env)
    s.sendall(b"Q" + struct.pack("!I", 4 + len(f"pagestream_v2 {DEFAULT_TENANT} {TIMELINE}") + 1)
              + f"pagestream_v2 {DEFAULT_TENANT} {TIMELINE}".encode() + b"\0")
    _expect_copy_both(s)
    s.sendall(b"Q" + struct.pack("!I", 11) + b"status\0")
    _assert_error_then_close(s)
    s.close()
    s = _started(env)  # a malformed pagestream request
    s.sendall(b"Q" + struct.pack("!I", 4 + len(f"pagestream_v3 {DEFAULT_TENANT} {TIMELINE}") + 1)
              + f"pagestream_v3 {DEFAULT_TENANT} {TIMELINE}".encode() + b"\0")
    _expect_copy_both(s)
    s.sendall(wire.copy_data(b"\x02" + b"\0" * 10))
    _assert_error_then_close(s)
    s.close()
    _shim_still_serves(env)


def test_fuzzed_connections_get_errors_and_the_server_keeps_serving(env: ShimEnv) -> None:
    """A bounded fuzz run: random mutations of valid traffic; every connection ends, the shim lives."""
    rng = random.Random(20261126)
    valid = [_startup_bytes(), wire.message(b"Q", b"status\0"), wire.message(b"P", b"\0status\0\0\0"),
             wire.message(b"B", b"\0\0\0\0\0\0\0\0"), wire.message(b"E", b"\0\0\0\0\0"), wire.message(b"S"),
             wire.copy_data(b"\x02" + bytes(40)), wire.message(b"X")]
    for _ in range(120):
        stream = bytearray(b"".join(rng.choice(valid[1:]) for _ in range(rng.randint(0, 4))))
        stream[:0] = valid[0]
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(stream))
            if op < 0.4:
                stream[pos] = rng.randrange(256)
            elif op < 0.7:
                del stream[pos:pos + rng.randint(1, 8)]
            else:
                stream[pos:pos] = rng.randbytes(rng.randint(1, 8))
        s = _raw(env)
        try:
            s.sendall(bytes(stream))
            s.shutdown(socket.SHUT_WR)  # EOF: the server must finish with us either way
            _read_all(s, timeout=15)
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            s.close()
    _shim_still_serves(env)


def test_startup_timeout_and_many_connections(env: ShimEnv) -> None:
    shim = RunningShim(env.ps.address, ["--startup-timeout", "1"])
    try:
        s = socket.create_connection((shim.host, shim.port), timeout=5)
        s.sendall(_startup_bytes()[:6])  # and then nothing
        started = time.monotonic()
        _assert_error_then_close(s)
        assert time.monotonic() - started < 4
        conns = [psycopg.connect(f"host={shim.host} port={shim.port} user=postgres connect_timeout=10",
                                 autocommit=True) for _ in range(20)]
        for c in conns:
            assert len(c.execute("status").fetchall()) == 2
        for c in conns:
            c.close()
    finally:
        shim.close()


def test_shim_refuses_unknown_replication_features(env: ShimEnv) -> None:
    with psycopg.connect(env.conninfo(replication="true"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("CREATE_REPLICATION_SLOT keep PHYSICAL")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("BASE_BACKUP (TARGET 'server')")
        with pytest.raises(psycopg.Error, match="not available"):
            conn.execute("START_REPLICATION 0/1000000")
        assert conn.execute("status").fetchall()


def test_page_server_down_is_a_clear_error(env: ShimEnv) -> None:
    shim = RunningShim(f"127.0.0.1:{free_port()}")
    try:
        with psycopg.connect(f"host={shim.host} port={shim.port} user=postgres connect_timeout=10",
                             autocommit=True) as conn:
            with pytest.raises(psycopg.OperationalError, match="page server"):
                conn.execute("status")
    finally:
        shim.close()


