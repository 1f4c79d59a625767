"""The walreceiver against a real primary, a real page server and real gRPC, all on loopback.

Checked: what the page server stores equals the primary's own WAL files
record for record (no gap, no duplicate, consecutive xl_prev links), through
a primary restart, a primary crash and a page server restart; synchronous
commit returns only once the page server holds the commit record; a
CRC-bad record (played back by a scripted walsender) is never stored nor
reported flushed; Status shows states and lag; the RPCs' error codes; the
service binary's health and SIGTERM handling. The streaming protocol helpers
are checked on their own.
"""

from __future__ import annotations

import os
import signal
import socket
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st
from polling import wait_for
from psycopg.conninfo import conninfo_to_dict

from pgformat.lsn import format_lsn, parse_lsn
from pgformat.xlogreader import segment_file_name
from services.pageserver.main import PageServer
from services.pageserver.repository import DEFAULT_TENANT, Repository
from services.walreceiver.main import WalReceiverServer
from services.walreceiver.errors import ReplicationError
from services.walreceiver.protocol import (
    Keepalive,
    XLogData,
    parse_copy_message,
    parse_size_setting,
    redact_conninfo,
    replication_conninfo,
    standby_status_update,
)
from services.walreceiver.receiver import AttachConfig, ReceiverOptions, WalReceiver
from services.walreceiver.walstore import TimelineWal
from zctl.postgres import PostgresNode
from zctl.waldump import iter_file_records
from zproto import common_pb2, walreceiver_pb2, walreceiver_pb2_grpc

PgFactory = Callable[..., PostgresNode]

RM_XACT_ID = 1
XLOG_XACT_COMMIT = 0x00
XLOG_XACT_OPMASK = 0x70

# Short backoff so reconnect tests stay quick; everything else is the default.
FAST = ReceiverOptions(backoff_initial=0.05, backoff_max=1.0)


# -- helpers --------------------------------------------------------------------



def flush_lsn(node: PostgresNode) -> int:
    """Commit a tiny transaction (so everything before it is flushed), then the primary's flush LSN."""
    node.sql("SELECT txid_current()")
    return parse_lsn(node.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0])


def stored_records(repo: Repository, timeline: str) -> list[tuple[int, int, bytes]]:
    """(start_lsn, end_lsn, raw) of every record the page server stored, in WAL order."""
    tl = repo.timeline(DEFAULT_TENANT, timeline)
    return [(r.lsn, r.end_lsn, r.raw) for r in repo.records_between(tl, tl.start_lsn, tl.last_record_lsn)]


def file_records(node: PostgresNode, start: int, end: int) -> list[tuple[int, int, bytes]]:
    """The same, read by our reader from the primary's pg_wal files."""
    return [(r.lsn, r.end_lsn, r.data) for r in iter_file_records([node.waldir])
            if r.lsn >= start and r.end_lsn <= end]


def xl_prev(raw: bytes) -> int:
    return int(struct.unpack_from("<Q", raw, 8)[0])


def assert_same_wal(node: PostgresNode, repo: Repository, timeline: str, start: int, target: int) -> int:
    """Stored records == file records from `start` to the stored end (at least `target`).

    Also checks the xl_prev chain of the stored records. Returns their number.
    (The primary may still be writing: background records arrive meanwhile.)
    """
    stored = stored_records(repo, timeline)
    assert stored, "nothing stored"
    end = stored[-1][1]
    assert end >= target
    assert stored[0][0] == start
    for (a_start, _, _), (_, _, b_raw) in zip(stored, stored[1:]):
        assert xl_prev(b_raw) == a_start, "broken xl_prev chain in the stored WAL"
    expected = file_records(node, start, end)
    assert len(stored) == len(expected)
    assert stored == expected
    return len(stored)


def crash(node: PostgresNode) -> None:
    """SIGKILL the postmaster and wait until it is reaped.

    PostgresNode.kill() returns once the postmaster is a zombie; a new
    postmaster refuses to start while the old PID still exists ("lock file
    postmaster.pid already exists"), and reaping is up to PID 1 here.
    """
    pid = node.postmaster_pid()
    node.kill()
    if pid is not None:
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, f"postmaster {pid} to be reaped")


class Cluster:
    """A page server and a walreceiver service in this process, a stub for each."""

    def __init__(self, repo_dir: Path, options: ReceiverOptions = FAST, port: int = 0) -> None:
        self.repo_dir = repo_dir
        self.options = options
        self.ps = PageServer(repo_dir, f"127.0.0.1:{port}")
        self.ps.start()
        self.wr = WalReceiverServer("127.0.0.1:0", self.ps.address, repo_dir.parent / "walreceiver", options)
        self.wr.start()
        self.channel = grpc.insecure_channel(self.wr.address)
        self.stub = walreceiver_pb2_grpc.WalReceiverStub(self.channel)

    @property
    def repo(self) -> Repository:
        return self.ps.repo

    def create_timeline(self, start_lsn: int) -> str:
        tl = uuid.uuid4().hex
        self.repo.create_timeline(DEFAULT_TENANT, tl, start_lsn=start_lsn)
        return tl

    def attach(self, node: PostgresNode, timeline: str, slot: str = "zenith", create_slot: bool = True,
               **kw: Any) -> walreceiver_pb2.AttachmentStatus:
        resp = self.stub.Attach(walreceiver_pb2.AttachRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=timeline),
            primary_conninfo=node.connstr(), slot_name=slot, create_slot=create_slot, **kw))
        return resp.status

    def status(self, timeline: str) -> walreceiver_pb2.AttachmentStatus:
        resp = self.stub.Status(walreceiver_pb2.StatusRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=timeline)))
        assert len(resp.attachments) == 1
        return resp.attachments[0]

    def wait_durable(self, timeline: str, lsn: int, timeout: float = 60.0) -> None:
        tl = self.repo.timeline(DEFAULT_TENANT, timeline)
        wait_for(lambda: tl.last_record_lsn >= lsn, timeout,
                 f"page server to reach {lsn:X} (status: {self.status(timeline)})")

    def restart_pageserver(self, downtime: float = 0.0) -> None:
        """Stop the page server hard (RPCs cancelled), then serve the same repository on the same port."""
        port = self.ps.port
        old = self.ps
        old.endpoint.server.stop(0).wait()
        # The in-process handler of a cancelled Ingest may still be inside its
        # SQLite transaction; a killed process would not be. Let it finish first.
        with old.repo._write_lock:
            pass
        old.repo.close()
        time.sleep(downtime)
        self.ps = PageServer(self.repo_dir, f"127.0.0.1:{port}")
        self.ps.start()

    def close(self) -> None:
        self.channel.close()
        self.wr.stop()
        self.ps.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "repo")
    try:
        yield c
    finally:
        c.close()


# -- the protocol helpers ---------------------------------------------------------------


def test_parse_xlogdata_and_keepalive() -> None:
    msg = parse_copy_message(b"w" + struct.pack(">QQq", 0x1000028, 0x2000000, 12345) + b"abc")
    assert isinstance(msg, XLogData)
    assert (msg.start, msg.wal_end, msg.send_time, bytes(msg.data)) == (0x1000028, 0x2000000, 12345, b"abc")
    ka = parse_copy_message(b"k" + struct.pack(">QqB", 0x3000000, -5, 1))
    assert ka == Keepalive(0x3000000, -5, True)
    for bad in (b"", b"w123", b"k" + bytes(16), b"k" + bytes(18), b"x" + bytes(20)):
        with pytest.raises(ReplicationError):
            parse_copy_message(bad)


@given(st.binary(max_size=40))
def test_parse_copy_message_rejects_garbage_with_domain_error(data: bytes) -> None:
    try:
        parse_copy_message(data)
    except ReplicationError:
        pass


def test_standby_status_update_layout() -> None:
    # walreceiver.c XLogWalRcvSendReply: 'r', write, flush, apply (int64 each), sendTime, replyRequested.
    msg = standby_status_update(0x10, 0x0F, 0x0E, 7, True)
    assert len(msg) == 34
    assert msg[:1] == b"r"
    assert struct.unpack(">QQQqB", msg[1:]) == (0x10, 0x0F, 0x0E, 7, 1)


def test_size_setting_and_conninfo() -> None:
    assert parse_size_setting("16MB") == 16 << 20
    assert parse_size_setting("1GB") == 1 << 30
    assert parse_size_setting("8192") == 8192
    with pytest.raises(ReplicationError):
        parse_size_setting("sixteen")
    tl = "ab" * 16
    ci = replication_conninfo("host=h port=5 password=secret", tl)
    assert "replication=true" in ci and f"application_name=zenith_walreceiver_{tl}" in ci
    assert "application_name=mine" in replication_conninfo("host=h application_name=mine", tl)
    assert "secret" not in redact_conninfo("host=h password=secret")
    with pytest.raises(ValueError):
        replication_conninfo("host=h bogus_option=1", tl)


# -- streaming into the page server ----------------------------------------------------------


def test_pgbench_wal_lands_in_the_page_server_byte_for_byte(pg_factory: PgFactory, cluster: Cluster) -> None:
    node = pg_factory()
    start = node.current_lsn()
    tl = cluster.create_timeline(start)
    status = cluster.attach(node, tl)
    assert status.state in (walreceiver_pb2.ATTACHMENT_STATE_CONNECTING, walreceiver_pb2.ATTACHMENT_STATE_STREAMING)
    node.pgbench("-i", "-s", "1", "-q")
    node.pgbench("-c", "2", "-j", "2", "-T", "3")
    target = flush_lsn(node)
    cluster.wait_durable(tl, target)
    count = assert_same_wal(node, cluster.repo, tl, start, target)
    assert count > 10_000
    st_ = cluster.status(tl)
    assert st_.state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING
    assert st_.durable_lsn >= target and st_.received_lsn >= st_.durable_lsn
    assert st_.reconnects == 0 and not st_.last_error
    # The primary sees a streaming replica whose flush position is the page server's.
    rows = node.sql("SELECT state, flush_lsn::text FROM pg_stat_replication")
    assert rows and rows[0][0] == "streaming"
    wait_for(lambda: parse_lsn(node.sql("SELECT flush_lsn::text FROM pg_stat_replication")[0][0]) >= target,
             10, "flush feedback")
    # The slot was created and follows the durable position.
    slot = node.sql("SELECT slot_type, restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'zenith'")
    assert slot and slot[0][0] == "physical" and parse_lsn(slot[0][1]) >= target


def _is_commit_of(raw: bytes, xid: int) -> bool:
    rec_xid, info, rmid = struct.unpack_from("<I", raw, 4)[0], raw[16], raw[17]
    return rmid == RM_XACT_ID and rec_xid == xid and info & XLOG_XACT_OPMASK == XLOG_XACT_COMMIT


def _commit_record_stored(repo: Repository, timeline: str, xid: int, after: int) -> bool:
    return any(start >= after and _is_commit_of(raw, xid) for start, _, raw in stored_records(repo, timeline))


def _commit_record_kept(wal_dir: Path, xid: int, after: int) -> bool:
    """In the walreceiver's own segment files."""
    wal = TimelineWal.open(wal_dir)
    assert wal is not None
    return any(r.lsn >= after and _is_commit_of(r.data, xid) for r in wal.records(*wal.scan_start()))


def test_synchronous_commit_waits_for_the_walreceivers_fsync(pg_factory: PgFactory, cluster: Cluster) -> None:
    node = pg_factory()
    tl = cluster.create_timeline(node.current_lsn())
    app = f"zenith_walreceiver_{tl}"
    cluster.attach(node, tl)
    node.execute("CREATE TABLE t (x int)")
    node.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{app}'")
    node.sql("SELECT pg_reload_conf()")
    wait_for(lambda: node.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                              (app,)) == [("sync",)], 30, "the walreceiver to be the synchronous standby")

    # Each commit returns only when the walreceiver's segment files hold its commit record.
    wal_dir = cluster.wr.servicer.wal_dir(DEFAULT_TENANT, tl)
    with psycopg.connect(node.connstr()) as conn:
        for i in range(20):
            with conn.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (%s)", (i,))
                cur.execute("SELECT txid_current(), pg_current_wal_insert_lsn()::text")
                row = cur.fetchone()
                assert row is not None
                xid, before = int(row[0]), parse_lsn(row[1])
            conn.commit()
            assert _commit_record_kept(wal_dir, xid, before), f"commit of xid {xid} not in the walreceiver's WAL"
            # The page server gets it right after, from there.
            wait_for(lambda: _commit_record_stored(cluster.repo, tl, xid, before), 10, f"commit of xid {xid}")
    # The primary's view of the standby's flush position is the walreceiver's durable WAL, and the
    # page server catches up with it; pg_waldump reads the walreceiver's segments as a pg_wal.
    timeline = cluster.repo.timeline(DEFAULT_TENANT, tl)

    def flush_is_durable() -> bool:
        state, flush = node.sql("SELECT sync_state, flush_lsn::text FROM pg_stat_replication")[0]
        return bool(state == "sync" and parse_lsn(flush) == cluster.status(tl).durable_lsn
                    == timeline.last_record_lsn)

    wait_for(flush_is_durable, 10, "flush_lsn == the walreceiver's durable LSN == the page server's last record")
    dump = subprocess.run([str(node.bin("pg_waldump")), "-p", str(wal_dir), "-s", format_lsn(timeline.start_lsn),
                           "-e", format_lsn(timeline.last_record_lsn)], capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stderr
    assert re.search(rf"tx:\s+{xid}, lsn: [0-9A-F/]+, prev [0-9A-F/]+, desc: COMMIT", dump.stdout), dump.stdout

    # Without the walreceiver, a commit waits (SyncRep) until the walreceiver is back.
    cluster.stub.Detach(walreceiver_pb2.DetachRequest(
        tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=tl)))
    notices: list[str] = []
    done = threading.Event()
    blocked = psycopg.connect(node.connstr(), autocommit=True)
    blocked.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    pid = blocked.info.backend_pid

    def commit() -> None:
        blocked.execute("INSERT INTO t VALUES (-1)")
        done.set()

    worker = threading.Thread(target=commit)
    worker.start()
    try:
        time.sleep(1.0)
        assert not done.is_set(), "a commit returned without the synchronous standby"
        assert node.sql("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)) == [("SyncRep",)]
        # Attach again: the walreceiver resumes from the page server and releases the commit.
        cluster.attach(node, tl, create_slot=False)
        assert done.wait(30), "the commit was not released after re-attaching"
    finally:
        if not done.is_set():
            node.sql("SELECT pg_cancel_backend(%s)", (pid,))
        worker.join()
        blocked.close()
    assert not notices, notices
    node.execute("ALTER SYSTEM RESET synchronous_standby_names")
    node.sql("SELECT pg_reload_conf()")
    assert cluster.status(tl).reconnects == 0  # a new attachment


def test_primary_restart_and_crash_resume_without_gap(pg_factory: PgFactory, cluster: Cluster) -> None:
    node = pg_factory()
    start = node.current_lsn()
    tl = cluster.create_timeline(start)
    cluster.attach(node, tl)
    node.pgbench("-i", "-s", "1", "-q")
    node.stop("fast")  # the walsender sends everything and waits for our flush feedback
    wait_for(lambda: cluster.status(tl).state == walreceiver_pb2.ATTACHMENT_STATE_BACKOFF, 10, "backoff")
    assert cluster.status(tl).last_error
    node.start()
    node.pgbench("-c", "2", "-j", "2", "-t", "200")
    wait_for(lambda: cluster.status(tl).state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING, 30, "streaming")
    cluster.wait_durable(tl, flush_lsn(node))
    crash(node)  # WAL after the last flush is lost; recovery continues from the end of flushed WAL
    node.start()
    node.pgbench("-c", "2", "-j", "2", "-t", "200")
    target = flush_lsn(node)
    cluster.wait_durable(tl, target)
    assert_same_wal(node, cluster.repo, tl, start, target)
    st_ = cluster.status(tl)
    assert st_.reconnects >= 2
    assert st_.state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING


def test_page_server_restart_resumes_without_gap_or_duplicate(pg_factory: PgFactory, cluster: Cluster) -> None:
    node = pg_factory()
    start = node.current_lsn()
    tl = cluster.create_timeline(start)
    cluster.attach(node, tl)
    node.pgbench("-i", "-s", "1", "-q")
    node.execute(f"ALTER SYSTEM SET synchronous_standby_names = 'zenith_walreceiver_{tl}'")
    node.sql("SELECT pg_reload_conf()")
    load = threading.Thread(target=node.pgbench, args=("-c", "2", "-j", "2", "-T", "4"))
    load.start()
    try:
        time.sleep(1.0)
        before = cluster.status(tl).durable_lsn
        cluster.restart_pageserver(downtime=1.0)
        # Commits went on while the page server was away: the walreceiver's fsync is what they wait for.
        assert cluster.status(tl).durable_lsn > before
    finally:
        load.join()
    target = flush_lsn(node)
    cluster.wait_durable(tl, target)
    assert_same_wal(node, cluster.repo, tl, start, target)
    st_ = cluster.status(tl)
    assert st_.reconnects == 0  # the primary's stream never noticed
    assert st_.state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING and st_.pageserver_error == ""
    node.execute("ALTER SYSTEM RESET synchronous_standby_names")
    node.sql("SELECT pg_reload_conf()")


def test_status_shows_lag_and_states(pg_factory: PgFactory, cluster: Cluster) -> None:
    node = pg_factory()
    tl = cluster.create_timeline(node.current_lsn())
    cluster.attach(node, tl, slot="lagging")
    wait_for(lambda: cluster.status(tl).state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING, 10, "streaming")

    # A slow page server: WAL is received ahead of what is durable, and the lag shows.
    repo = cluster.repo
    fast_ingest = repo.ingest

    def slow_ingest(*args: Any, **kw: Any) -> int:
        time.sleep(0.2)
        return fast_ingest(*args, **kw)

    repo.ingest = slow_ingest  # type: ignore[method-assign]
    try:
        node.pgbench("-i", "-s", "1", "-q")
        lagging = wait_for(lambda: (s := cluster.status(tl)).lag_bytes > 0 and s, 10, "lag")
        assert lagging.primary_lsn - lagging.durable_lsn == lagging.lag_bytes
        assert lagging.received_lsn >= lagging.durable_lsn
        assert lagging.state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING
    finally:
        repo.ingest = fast_ingest  # type: ignore[method-assign]
    target = flush_lsn(node)
    cluster.wait_durable(tl, target)
    caught_up = wait_for(lambda: (s := cluster.status(tl)).lag_bytes == 0 and s.primary_lsn >= target and s,
                         10, "lag to reach 0")
    assert caught_up.durable_lsn == caught_up.received_lsn >= target
    assert conninfo_to_dict(caught_up.primary_conninfo) == conninfo_to_dict(node.connstr())
    assert caught_up.slot_name == "lagging"

    # Status filters: all tenants, one tenant, an unknown timeline.
    everyone = cluster.stub.Status(walreceiver_pb2.StatusRequest(all_tenants=True)).attachments
    assert [a.timeline.id for a in everyone] == [tl]
    assert len(cluster.stub.Status(walreceiver_pb2.StatusRequest()).attachments) == 1
    assert not cluster.stub.Status(walreceiver_pb2.StatusRequest(
        timeline=common_pb2.TimelineId(id="0" * 32))).attachments

    # RPC errors.
    with pytest.raises(grpc.RpcError) as err:
        cluster.attach(node, tl, slot="lagging")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        cluster.attach(node, uuid.uuid4().hex)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        cluster.attach(node, tl, slot="Bad-Slot")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        cluster.attach(node, "not-hex")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Detach: STOPPED, and the slot is dropped on request.
    resp = cluster.stub.Detach(walreceiver_pb2.DetachRequest(
        tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=tl), drop_slot=True))
    assert resp.status.state == walreceiver_pb2.ATTACHMENT_STATE_STOPPED
    assert not resp.status.last_error
    assert node.sql("SELECT count(*) FROM pg_replication_slots")[0][0] == 0
    with pytest.raises(grpc.RpcError) as err:
        cluster.stub.Detach(walreceiver_pb2.DetachRequest(timeline=common_pb2.TimelineId(id=tl)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


class ScriptedWalsender:
    """Stands in for the primary's connection: plays back given WAL bytes as XLogData messages.

    Messages alternate with a quiet spell (read_message -> None), so batches
    go out as the stream goes quiet; status updates sent back are recorded.
    """

    def __init__(self, sysid: int, wal: bytes, wal_start: int, replies: list[tuple[int, int, int]]) -> None:
        self.sysid, self.wal, self.wal_start, self.replies = sysid, wal, wal_start, replies
        self.pos = wal_start
        self.quiet = False
        self._r, self._w = socket.socketpair()
        self._w.send(b"x")  # always readable: the receiver never sleeps on us

    @property
    def socket(self) -> int:
        return self._r.fileno()

    wants_write = False

    def identify_system(self, stop: threading.Event, timeout: float) -> tuple[int, int, int]:
        return self.sysid, 1, self.wal_start + len(self.wal)

    def show(self, name: str, stop: threading.Event, timeout: float) -> str:
        assert name == "wal_segment_size"
        return "16MB"

    def create_physical_slot(self, slot: str, stop: threading.Event, timeout: float) -> bool:
        return False

    def start_replication(self, slot: str, lsn: int, stop: threading.Event, timeout: float) -> None:
        if not self.wal_start <= lsn <= self.wal_start + len(self.wal):
            raise ReplicationError(f"requested WAL at {lsn:X} is not here")  # as a primary that removed it
        self.pos = lsn

    def read_message(self) -> memoryview | None:
        self.quiet = not self.quiet
        off = self.pos - self.wal_start
        if self.quiet or off >= len(self.wal):
            return None
        chunk = self.wal[off:off + 8192]
        msg = b"w" + struct.pack(">QQq", self.pos, self.wal_start + len(self.wal), 0) + chunk
        self.pos += len(chunk)
        return memoryview(msg)

    def send(self, payload: bytes, stop: threading.Event, timeout: float) -> None:
        self.replies.append(struct.unpack_from(">QQQ", payload, 1))

    def on_readable(self) -> None:
        pass

    def on_writable(self) -> None:
        pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


def test_crc_bad_record_is_never_sent(pg_factory: PgFactory, cluster: Cluster) -> None:
    node = pg_factory()
    start = node.current_lsn()
    node.execute("CREATE TABLE t (x int, y text);"
                 " INSERT INTO t SELECT g, repeat('y', g % 50) FROM generate_series(1, 2000) g")
    end = flush_lsn(node)
    sysid = int(node.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    seg = 16 << 20
    segments = b"".join((node.waldir / segment_file_name(1, lsn)).read_bytes()
                        for lsn in range(start - start % seg, end, seg))
    page = start - start % 8192  # the walreceiver asks for the WAL from the start of the page
    wal = bytearray(segments[page % seg:page % seg + end - page])
    records = file_records(node, start, end)
    # Spoil one byte of the body of a record in the middle that lies within one page.
    bad = next(r for r in records[len(records) // 2:] if r[0] % 8192 + len(r[2]) <= 8192)
    wal[bad[0] - page + len(bad[2]) - 1] ^= 0xFF

    tl = cluster.create_timeline(start)
    replies: list[tuple[int, int, int]] = []
    receiver = WalReceiver(
        AttachConfig(DEFAULT_TENANT, tl, node.connstr(), "scripted"), cluster.ps.address,
        cluster.repo_dir.parent / "scripted-wal", FAST,
        connect=lambda *_: ScriptedWalsender(sysid, bytes(wal), page, replies))
    receiver.start()
    try:
        st_ = wait_for(lambda: (s := receiver.status()).reconnects >= 1 and s, 30, "a retry after the bad record")
    finally:
        receiver.stop()
    assert "checksum" in st_.last_error and format_lsn(bad[0]) in st_.last_error
    # Everything before the bad record is stored, byte for byte; the bad record and what follows are not.
    stored = stored_records(cluster.repo, tl)
    assert stored == [r for r in records if r[1] <= bad[0]]
    assert cluster.repo.timeline(DEFAULT_TENANT, tl).last_record_lsn == bad[0]
    # Nothing past it was ever reported to the primary as flushed.
    assert replies and max(flush for _, flush, _ in replies) == bad[0]


def test_unreachable_primary_backs_off(cluster: Cluster) -> None:
    tl = cluster.create_timeline(0x1000028)
    resp = cluster.stub.Attach(walreceiver_pb2.AttachRequest(
        timeline=common_pb2.TimelineId(id=tl), primary_conninfo="host=127.0.0.1 port=1 user=nobody",
        slot_name="s"))
    assert resp.status.state in (walreceiver_pb2.ATTACHMENT_STATE_CONNECTING, walreceiver_pb2.ATTACHMENT_STATE_BACKOFF)
    st_ = wait_for(lambda: (s := cluster.status(tl)).reconnects >= 1 and s, 10, "reconnects")
    assert "127.0.0.1" in st_.last_error and st_.last_error_time_us > 0
    # The same error session after session, no progress: reported FAILING, still retrying.
    st_ = wait_for(lambda: (s := cluster.status(tl)).state == walreceiver_pb2.ATTACHMENT_STATE_FAILING and s, 20,
                   "FAILING")
    assert st_.repeated_errors >= FAST.failing_after and "Connection refused" in st_.last_error
    reconnects = st_.reconnects
    wait_for(lambda: cluster.status(tl).reconnects > reconnects, 10, "a retry while failing")


def test_service_binary_health_and_sigterm(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "zenith-walreceiver"
    if not exe.exists():
        pytest.skip("zenith-walreceiver is not installed (pip install -e .)")
    with subprocess.Popen([exe, "--listen", "127.0.0.1:0", "--pageserver", "127.0.0.1:1", "--data-dir",
                           str(tmp_path / "wr"), "--insecure"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("zenith-walreceiver listening on "), line
            address = line.rsplit(" ", 1)[1].strip()
            with grpc.insecure_channel(address) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                for name in ("", "zenith.v1.WalReceiver"):
                    assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                        health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
            assert proc.returncode == 0, err
            assert "signal received; shutting down signal=SIGTERM" in err
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
