"""Resilience: kill -9 of each service and restarts of the primary, under pgbench load, lose nothing.

Services run as processes through zctl; the primary is a real Postgres 15
whose synchronous standby is our walreceiver, so a commit returns only once
the walreceiver holds it in its fsynced segment files (WAL-first durability);
the page server gets it from there. Each scenario:

- runs pgbench (4 clients) and a probe client that records the xid of every
  commit the primary acknowledged;
- kills a service with SIGKILL (pid from `zctl status --json`) and brings it
  back with `zctl start`, which must restart only what is missing; or stops
  the primary (fast) or crashes it (immediate) and starts it again;
- checks that every commit acknowledged before the kill is durable: in the
  walreceiver's segment files or the page server's store, read from disk
  while the service is dead; while the page server is down commits go on,
  while the walreceiver is down they wait;
- after the load, waits until the page server's LSN (`zctl lsn`) reaches the
  primary's flush LSN, then checks that the stored WAL is an unbroken
  xl_prev chain without duplicates, CRC-valid record by record, equal to the
  primary's own WAL files over the whole range; that every page of every
  user table and btree index at latest equals the primary's (masked); and
  that pgbench_history holds exactly the transactions pgbench reported
  committed (for a primary restart, where a transaction can commit without
  its client hearing back, at least those and at most one more per client).

The state file that keeps the walreceiver's attachments across a kill is
also checked on its own: atomic rewrite, reload, and a clear start-up error
for a damaged file.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from conftest import PgFactory
from pageserver_util import masked_page, rel_key, user_relations
from polling import wait_for
from zctl_util import make_repo, service_channel, zctl

from pgformat.lsn import parse_lsn
from pgformat.rmgr import RM_XLOG_ID, XLOG_OVERWRITE_CONTRECORD
from pgformat.xlogrecord import decode_record
from services.pageserver.inspect import durable_records, timeline_start
from services.walreceiver.receiver import AttachConfig
from services.walreceiver.walstore import TimelineWal
from services.walreceiver.server import AttachmentStore, StateFileError
from zctl.postgres import PostgresNode, pid_alive, run_as_pg_user
from zctl.waldump import iter_file_records
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

TENANT = "0" * 32
RM_XACT_ID = 1
XLOG_XACT_OPMASK = 0x70
XLOG_XACT_COMMIT = 0x00
XLOG_BLCKSZ = 8192
WAL_SEG_SIZE = 16 << 20
CLIENTS = 4


# -- helpers -------------------------------------------------------------------



def status(repo: Path) -> dict[str, Any]:
    return dict(json.loads(zctl(repo, "status", "--json").stdout))


def service_pids(repo: Path) -> dict[str, int | None]:
    return {s["name"]: s["pid"] for s in status(repo)["services"]}


def kill9(repo: Path, service: str) -> int:
    pid = service_pids(repo)[service]
    assert pid is not None and pid_alive(pid), f"{service} is not running"
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 30, f"{service} (pid {pid}) to die")
    return pid


def restart_missing(repo: Path, service: str) -> None:
    """`zctl start` after a crash: the dead service comes back, the others keep their pids."""
    before = service_pids(repo)
    assert before[service] is None
    zctl(repo, "start")
    after = service_pids(repo)
    assert after[service] is not None
    assert {k: v for k, v in after.items() if k != service} == {k: v for k, v in before.items() if k != service}
    assert all(s["healthy"] for s in status(repo)["services"])


def flush_lsn(node: PostgresNode) -> int:
    """Commit a tiny transaction (everything before it is flushed), then the primary's flush LSN."""
    node.sql("SELECT txid_current()")
    return parse_lsn(node.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0])


def wait_caught_up(repo: Path, node: PostgresNode, timeout: float = 120) -> int:
    target = flush_lsn(node)
    wait_for(lambda: parse_lsn(zctl(repo, "lsn").stdout.strip()) >= target, timeout,
             f"the page server to reach the primary's flush LSN {target:X}")
    return target


def pageserver_stub(repo: Path) -> pageserver_pb2_grpc.PageServerStub:
    return pageserver_pb2_grpc.PageServerStub(service_channel(repo, "pageserver",
                                                              [("grpc.max_receive_message_length", 64 << 20)]))


def make_sync(node: PostgresNode, timeline: str) -> None:
    """synchronous_standby_names = our walreceiver: commits wait for its fsync."""
    app = f"zenith_walreceiver_{timeline}"
    node.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{app}'")
    node.sql("SELECT pg_reload_conf()")
    wait_for(lambda: node.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                              (app,)) == [("sync",)], 30, "the walreceiver to be the synchronous standby")


# -- the page server's stored WAL, read from its layer files -------------------------


@dataclass(frozen=True)
class StoredRecord:
    lsn: int
    end_lsn: int
    raw: bytes


def stored_wal(repo: Path, timeline: str) -> tuple[int, list[StoredRecord]]:
    """(timeline start LSN, every record in the page server's layer files in WAL order), read-only,
    as it is on disk."""
    records = durable_records(repo / "pageserver", TENANT, timeline)
    return timeline_start(repo / "pageserver", TENANT, timeline), [StoredRecord(*r) for r in records]


def committed_xids(records: list[StoredRecord]) -> set[int]:
    out = set()
    for r in records:
        rec = decode_record(r.raw, r.lsn, r.end_lsn, verify_crc=False)
        if rec.rmid == RM_XACT_ID and rec.info & XLOG_XACT_OPMASK == XLOG_XACT_COMMIT:
            out.add(rec.xid)
    return out


def next_record_start(end: int) -> int:
    """Where the record after one ending at `end` starts: past a page header if `end` is on a page boundary."""
    if end % XLOG_BLCKSZ:
        return end
    return end + (40 if end % WAL_SEG_SIZE == 0 else 24)


def check_stored_wal(repo: Path, timeline: str, node: PostgresNode, target: int) -> int:
    """The stored WAL is CRC-valid, gapless, duplicate-free and equals the primary's WAL files; return its size."""
    pageserver_stub(repo).Checkpoint(pageserver_pb2.CheckpointRequest(
        tenant=common_pb2.TenantId(id=TENANT), timeline=common_pb2.TimelineId(id=timeline)), timeout=60)
    start, stored = stored_wal(repo, timeline)
    assert stored and stored[0].lsn == start, "the stored WAL does not begin at the timeline's start"
    assert stored[-1].end_lsn >= target
    assert len({r.lsn for r in stored}) == len(stored), "duplicate record start LSNs in the stored WAL"
    prev: StoredRecord | None = None
    for r in stored:
        rec = decode_record(r.raw, r.lsn, r.end_lsn, verify_crc=True)  # raises on a bad CRC
        if prev is not None:
            if rec.rmid == RM_XLOG_ID and rec.info & 0xF0 == XLOG_OVERWRITE_CONTRECORD:
                # The primary crashed mid-record: this one links to the aborted record, never streamed,
                # whose start lies between the previous record and this one.
                assert next_record_start(prev.end_lsn) <= rec.prev < r.lsn, f"bad overwrite link at {r.lsn:X}"
            else:
                assert rec.prev == prev.lsn, f"broken xl_prev chain at {r.lsn:X}"
                assert r.lsn == next_record_start(prev.end_lsn), f"gap before the record at {r.lsn:X}"
        prev = r
    end = stored[-1].end_lsn
    files = [(r.lsn, r.end_lsn, r.data) for r in iter_file_records([node.waldir])
             if r.lsn >= start and r.end_lsn <= end]
    assert len(files) == len(stored), f"{len(stored)} records stored, {len(files)} in the primary's WAL files"
    assert files == [(r.lsn, r.end_lsn, r.raw) for r in stored], "stored WAL differs from the primary's"
    return end - start


def check_pages(repo: Path, timeline: str, node: PostgresNode) -> int:
    """Every page of every user table and btree index at latest equals the primary's, masked."""
    stub = pageserver_stub(repo)
    tenant, tl = common_pb2.TenantId(id=TENANT), common_pb2.TimelineId(id=timeline)
    latest = common_pb2.RequestLsn(latest=True)
    compared = 0
    for relname, rmid in user_relations(node):
        rel = rel_key(node, relname)
        theirs = [bytes(p) for (p,) in node.sql(
            "SELECT get_raw_page(%s, 'main', b::int) FROM generate_series(0, pg_relation_size(%s) / 8192 - 1) b"
            " ORDER BY b", (relname, relname))]
        size = stub.RelSize(pageserver_pb2.RelSizeRequest(tenant=tenant, timeline=tl, rel=rel, lsn=latest),
                            timeout=60).nblocks
        assert size == len(theirs), f"{relname}: {size} blocks in the page server, {len(theirs)} in the primary"

        def requests() -> Iterator[pageserver_pb2.GetPagesRequest]:
            for first in range(0, size, 32):
                yield pageserver_pb2.GetPagesRequest(tenant=tenant, timeline=tl, pages=[
                    pageserver_pb2.PageRequestItem(request_id=blk, lsn=latest, key=common_pb2.PageKey(
                        rel_block=common_pb2.RelBlock(rel=rel, blkno=blk)))
                    for blk in range(first, min(first + 32, size))])

        ours: dict[int, bytes] = {}
        for resp in stub.GetPages(requests(), timeout=600):
            for item in resp.pages:
                assert item.WhichOneof("result") == "page", f"{relname} block {item.request_id}: {item.error}"
                ours[item.request_id] = bytes(item.page.page)
        assert sorted(ours) == list(range(size))
        for blk, page in enumerate(theirs):
            assert masked_page(ours[blk], rmid, blk) == masked_page(page, rmid, blk), f"{relname} block {blk} differs"
            compared += 1
    return compared


# -- load -------------------------------------------------------------------------------------


_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")


class Pgbench:
    """pgbench in a thread; `committed` is what it reported committed once it ended."""

    def __init__(self, node: PostgresNode, *args: str) -> None:
        self.argv = [str(node.bin("pgbench")), "-h", node.host, "-p", str(node.port), "-U", node.user,
                     "-n", "-c", str(CLIENTS), "-j", "2", *args, "postgres"]
        self.output = ""
        self.returncode: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        proc = run_as_pg_user(self.argv, check=False, timeout=600)
        self.output, self.returncode = proc.stdout + proc.stderr, proc.returncode

    def wait(self, timeout: float = 300) -> int:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "pgbench did not finish"
        m = _PROCESSED.search(self.output)
        assert m, f"pgbench printed no transaction count:\n{self.output}"
        return int(m.group(1))

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


@dataclass
class Probe:
    """A client committing one row at a time; `acked` holds the xid of every commit the primary acknowledged."""

    node: PostgresNode
    acked: list[int] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Probe:
        self.node.execute("CREATE TABLE IF NOT EXISTS probe (xid bigint)")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.node.connstr(), connect_timeout=5) as conn:
                    while not self._stop.is_set():
                        row = conn.execute("INSERT INTO probe VALUES (txid_current()) RETURNING xid").fetchone()
                        conn.commit()  # returns once the commit is acknowledged (synchronously replicated)
                        assert row is not None
                        self.acked.append(int(row[0]))
                        time.sleep(0.01)
            except psycopg.Error:
                self.errors += 1  # the primary is restarting: that commit's outcome is unknown, not acked
                self._stop.wait(0.2)

    def snapshot(self) -> list[int]:
        return list(self.acked)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


def kept_wal(repo: Path, timeline: str) -> list[StoredRecord]:
    """The records in the walreceiver's segment files for `timeline`, as they are on disk."""
    wal = TimelineWal.open(repo / "walreceiver" / "wal" / TENANT / timeline)
    if wal is None:
        return []
    return [StoredRecord(r.lsn, r.end_lsn, r.data) for r in wal.records(*wal.scan_start())]


def assert_acked_are_durable(repo: Path, timeline: str, acked: list[int], pageserver_only: bool = False) -> None:
    """Every acknowledged commit is on disk now: in the walreceiver's WAL or the page server's store."""
    assert acked, "the probe got no commit acknowledged before the kill"
    _, stored = stored_wal(repo, timeline)
    durable = committed_xids(stored) | (set() if pageserver_only else committed_xids(kept_wal(repo, timeline)))
    missing = set(acked) - durable
    assert not missing, f"{len(missing)} acknowledged commits are not durable: {sorted(missing)[:10]}"


def history_rows(node: PostgresNode) -> int:
    return int(node.sql("SELECT count(*) FROM pgbench_history")[0][0])


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Path]:
    r = make_repo(tmp_path / "repo")
    yield r
    zctl(r, "stop", check=False)


@pytest.fixture
def primary(pg_factory: PgFactory) -> PostgresNode:
    node = pg_factory(autovacuum="off", checkpoint_timeout="30s")
    node.execute("CREATE EXTENSION pageinspect")
    node.pgbench("-i", "-s", "1", "-q")
    return node


def attach(repo: Path, node: PostgresNode, sync: bool = True) -> str:
    zctl(repo, "start")
    zctl(repo, "attach", "--primary", node.connstr(), "--branch", "main")
    (attachment,) = status(repo)["attachments"]
    timeline = str(attachment["timeline"])
    if sync:
        make_sync(node, timeline)
    return timeline


def final_checks(repo: Path, timeline: str, node: PostgresNode) -> None:
    target = wait_caught_up(repo, node)
    assert check_stored_wal(repo, timeline, node, target) > 1 << 20
    assert check_pages(repo, timeline, node) > 1500


# -- scenarios -----------------------------------------------------------------------------------


def _kill9_under_sync_load(repo: Path, primary: PostgresNode, timeline: str, service: str,
                           after_restart: Callable[[], None] = lambda: None) -> None:
    """kill -9 `service` while pgbench and a probe commit synchronously, then `zctl start` it again:
    every acknowledged commit survives, commits wait while it is down, the run completes."""
    probe = Probe(primary).start()
    bench = Pgbench(primary, "-t", "150")
    try:
        wait_for(lambda: len(probe.acked) >= 20, 30, "probe commits")
        kill9(repo, service)
        acked = probe.snapshot()
        assert_acked_are_durable(repo, timeline, acked)
        time.sleep(1.0)
        if service == "walreceiver":
            # Commits wait: nothing is acknowledged while the synchronous standby is down.
            assert len(probe.acked) <= len(acked) + 1
        else:
            # The page server is not on the commit path: commits go on, durable in the walreceiver.
            assert len(probe.acked) > len(acked) + 5, "commits stopped while the page server was down"
            assert_acked_are_durable(repo, timeline, probe.snapshot())
        restart_missing(repo, service)
        after_restart()
        committed = bench.wait()
    finally:
        probe.stop()
    assert committed == CLIENTS * 150, bench.output
    assert len(probe.acked) > len(acked), f"no commit was acknowledged after the {service} came back"
    final_checks(repo, timeline, primary)
    assert_acked_are_durable(repo, timeline, probe.snapshot(), pageserver_only=True)
    assert history_rows(primary) == committed


def test_kill9_pageserver_under_sync_load(repo: Path, primary: PostgresNode) -> None:
    _kill9_under_sync_load(repo, primary, attach(repo, primary), "pageserver")


def test_kill9_walreceiver_under_sync_load(repo: Path, primary: PostgresNode) -> None:
    timeline = attach(repo, primary)
    state_file = repo / "walreceiver" / "attachments.json"
    saved = json.loads(state_file.read_text())["attachments"]
    assert [a["timeline"] for a in saved] == [timeline]

    def attachment_restored() -> None:
        # Nobody attaches again: the restarted walreceiver brings the attachment back from its state file.
        (attachment,) = status(repo)["attachments"]
        assert attachment["timeline"] == timeline

    _kill9_under_sync_load(repo, primary, timeline, "walreceiver", attachment_restored)
    assert status(repo)["attachments"][0]["state"] == "ATTACHMENT_STATE_STREAMING"


def test_primary_fast_restart_and_crash_under_sync_load(repo: Path, primary: PostgresNode) -> None:
    timeline = attach(repo, primary)
    probe = Probe(primary).start()
    committed = 0
    try:
        for mode in ("fast", "immediate"):
            bench = Pgbench(primary, "-T", "6")
            seen = len(probe.acked)
            wait_for(lambda: len(probe.acked) >= seen + 20, 30, "probe commits")
            time.sleep(1.0)
            primary.stop(mode=mode)
            acked = probe.snapshot()
            assert_acked_are_durable(repo, timeline, acked)
            done = bench.wait()
            assert bench.returncode != 0, "pgbench did not notice the primary going away"
            committed += done
            primary.start()
            wait_for(lambda: len(probe.acked) > len(acked), 60, "a commit acknowledged after the restart")
        bench = Pgbench(primary, "-t", "100")
        last = bench.wait()
        assert bench.returncode == 0 and last == CLIENTS * 100, bench.output
        committed += last
    finally:
        probe.stop()
    final_checks(repo, timeline, primary)
    rows = history_rows(primary)
    # A transaction whose commit was written but whose client was cut off counts in the table only.
    assert committed <= rows <= committed + 2 * CLIENTS, (committed, rows)
    (attachment,) = status(repo)["attachments"]
    assert attachment["state"] == "ATTACHMENT_STATE_STREAMING"


def _kill9_cycles(repo: Path, primary: PostgresNode, cycles: int, seed: int) -> None:
    """kill -9 the page server and the walreceiver in turn, each at a random moment, `cycles`
    times in all, under synchronous pgbench load and the probe; nothing acknowledged is lost, the stored
    WAL equals the primary's and every page equals the primary's."""
    rng = random.Random(seed)
    timeline = attach(repo, primary)
    probe = Probe(primary).start()
    bench = Pgbench(primary, "-T", str(max(20, cycles * 4)))
    kills = {"pageserver": 0, "walreceiver": 0}
    try:
        for i in range(cycles):
            time.sleep(rng.uniform(0.2, 2.0))
            service = ("pageserver", "walreceiver")[i % 2]
            kill9(repo, service)
            kills[service] += 1
            assert_acked_are_durable(repo, timeline, probe.snapshot())
            time.sleep(rng.uniform(0.0, 1.0))
            restart_missing(repo, service)
        committed = bench.wait(600)
    finally:
        probe.stop()
    assert bench.returncode == 0, bench.output
    final_checks(repo, timeline, primary)
    assert_acked_are_durable(repo, timeline, probe.snapshot(), pageserver_only=True)
    assert history_rows(primary) == committed
    assert kills == {"pageserver": (cycles + 1) // 2, "walreceiver": cycles // 2}


def test_kill9_cycles_short(repo: Path, primary: PostgresNode) -> None:
    _kill9_cycles(repo, primary, cycles=2, seed=1)


@pytest.mark.slow
def test_kill9_cycles_long(repo: Path, primary: PostgresNode) -> None:
    """20 kills of each service at random moments (issue 12)."""
    _kill9_cycles(repo, primary, cycles=40, seed=12)


# -- the attachments state file -------------------------------------------------------------------


def _config(timeline: str, start_lsn: int | None = 0x1000028) -> AttachConfig:
    return AttachConfig(tenant=TENANT, timeline=timeline, conninfo="host=127.0.0.1 port=5432 password=secret",
                        slot_name=f"zenith_{timeline[:12]}", start_lsn=start_lsn)


def test_state_file_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    store = AttachmentStore(tmp_path / "wr" / "attachments.json")
    assert store.load() == []
    configs = [_config("a" * 32), _config("b" * 32, None)]
    store.save(configs)
    assert store.load() == configs
    assert (store.path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in store.path.parent.iterdir()] == ["attachments.json"]  # no temp file left
    store.save(configs[1:])
    assert store.load() == configs[1:]
    doc = json.loads(store.path.read_text())
    assert doc["version"] == 1 and doc["attachments"][0]["start_lsn"] is None
    store.save([])
    assert store.load() == []


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"version": 2, "attachments": []}', "expected"),
    ('{"version": 1, "attachments": [{"tenant": "x"}]}', "missing"),
    ('{"version": 1, "attachments": [{"tenant": "' + "0" * 32 + '", "timeline": "nothex", '
     '"primary_conninfo": "", "slot_name": "s"}]}', "invalid timeline id"),
    ('{"version": 1, "attachments": [{"tenant": "' + "0" * 32 + '", "timeline": "' + "a" * 32 + '", '
     '"primary_conninfo": "host=x", "slot_name": "s", "start_lsn": "zz"}]}', "LSN"),
])
def test_damaged_state_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "attachments.json"
    path.write_text(text)
    with pytest.raises(StateFileError, match=message) as ei:
        AttachmentStore(path).load()
    assert str(path) in str(ei.value)


def test_walreceiver_refuses_to_start_on_a_damaged_state_file(tmp_path: Path) -> None:
    path = tmp_path / "attachments.json"
    path.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "services.walreceiver.main", "--listen", "127.0.0.1:0",
                           "--data-dir", str(tmp_path), "--state-file", str(path), "--insecure"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not valid JSON" in proc.stderr and str(path) in proc.stderr
    assert path.read_text() == "{not json"  # left for the operator to look at


def test_attach_and_detach_persist_and_a_new_process_restores(tmp_path: Path) -> None:
    """In process, no primary needed: attachments to an unreachable primary just back off."""
    from services.walreceiver.main import WalReceiverServer
    from services.walreceiver.receiver import ReceiverOptions
    from zctl.postgres import free_port
    from zproto import walreceiver_pb2, walreceiver_pb2_grpc

    state = tmp_path / "wr" / "attachments.json"
    nowhere = f"127.0.0.1:{free_port()}"  # the page server: not reachable, so Attach does not check it
    options = ReceiverOptions(backoff_initial=0.05, backoff_max=0.2, connect_timeout=1.0, rpc_timeout=1.0)
    timelines = ["c" * 32, "d" * 32]

    def request(tl: str) -> walreceiver_pb2.AttachRequest:
        return walreceiver_pb2.AttachRequest(
            tenant=common_pb2.TenantId(id=TENANT), timeline=common_pb2.TimelineId(id=tl),
            primary_conninfo=f"host=127.0.0.1 port={free_port()} user=postgres", slot_name=f"s_{tl[:4]}",
            start_lsn=0x2000028)

    def attached(server: WalReceiverServer) -> list[str]:
        with grpc.insecure_channel(server.address) as ch:
            resp = walreceiver_pb2_grpc.WalReceiverStub(ch).Status(
                walreceiver_pb2.StatusRequest(all_tenants=True), timeout=10)
        return [a.timeline.id for a in resp.attachments]

    first = WalReceiverServer("127.0.0.1:0", nowhere, tmp_path / "wr", options, state_file=state)
    first.start()
    try:
        with grpc.insecure_channel(first.address) as ch:
            stub = walreceiver_pb2_grpc.WalReceiverStub(ch)
            for tl in timelines:
                stub.Attach(request(tl), timeout=30)
            assert [a.timeline for a in AttachmentStore(state).load()] == timelines
            stub.Detach(walreceiver_pb2.DetachRequest(tenant=common_pb2.TenantId(id=TENANT),
                                                      timeline=common_pb2.TimelineId(id=timelines[0])), timeout=30)
            (saved,) = AttachmentStore(state).load()
            assert saved.timeline == timelines[1] and saved.slot_name == "s_dddd" and saved.start_lsn == 0x2000028
            # The state file cannot be written (a directory squats on its temp name; this fails
            # even for root): Attach fails, nothing is attached, the file is unchanged.
            squatter = state.with_name(f".{state.name}.tmp")
            squatter.mkdir()
            try:
                with pytest.raises(grpc.RpcError) as ei:
                    stub.Attach(request(timelines[0]), timeout=30)
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "cannot write the state file" in (ei.value.details() or "")
                assert attached(first) == [timelines[1]]
            finally:
                squatter.rmdir()
    finally:
        first.stop()
    assert [a.timeline for a in AttachmentStore(state).load()] == [timelines[1]]  # a clean stop keeps them
    second = WalReceiverServer("127.0.0.1:0", nowhere, tmp_path / "wr", options, state_file=state)
    second.start()
    try:
        assert attached(second) == [timelines[1]]
    finally:
        second.stop()
