"""One writer per timeline (issue 18): a branch that follows an external primary takes WAL from nobody else.

A real primary is attached with `zctl attach` (services started by `zctl start`,
all processes). Checked: zctl refuses a writable compute on the attached branch
(create and start) with a message naming the primary and the alternatives, while
read-only computes at an LSN work and follow the primary; a second writer forced
through gRPC is refused by the walreceiver (Attach) and by the page server
(Ingest at a wrong epoch, or foreign WAL at the right one), and afterwards the
branch's stored WAL is still the primary's, byte for byte, and GetPage at latest
equals the primary's pages (masked); `zctl detach` makes the branch writable
and it forks from the detach point on purpose; a compute restarted while its
previous incarnation's attachment still streams fences the old epoch.
"""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from conftest import PgFactory
from polling import wait_for
from zctl_util import make_repo, service_channel, zctl

from pgformat.bufmask import heap_mask
from pgformat.constants import maxalign
from pgformat.lsn import format_lsn, parse_lsn
from pgformat.xlogreader import RawRecord, next_record_starts
from zctl.computes import Computes
from zctl.postgres import PostgresNode, free_port
from zctl.supervisor import LocalCluster
from zctl.waldump import iter_file_records
from services.pageserver.inspect import durable_records
from zproto import (
    common_pb2,
    pageserver_pb2,
    pageserver_pb2_grpc,
    walreceiver_pb2,
    walreceiver_pb2_grpc,
)

TENANT = "0" * 32
XLOG_BLCKSZ = 8192

Record = tuple[int, int, bytes]  # (start LSN, end LSN, raw record)


def xl_prev(raw: bytes) -> int:
    return int(struct.unpack_from("<Q", raw, 8)[0])


@dataclass
class Cluster:
    """Services started by `zctl start`, a real primary, gRPC stubs; shared by the tests of this module."""

    repo: Path
    primary: PostgresNode
    ps: pageserver_pb2_grpc.PageServerStub
    wr: walreceiver_pb2_grpc.WalReceiverStub


@dataclass
class Attached:
    """The primary attached with `zctl attach` as `branch` (a branch per test), and table `table` on it."""

    repo: Path
    primary: PostgresNode
    ps: pageserver_pb2_grpc.PageServerStub
    wr: walreceiver_pb2_grpc.WalReceiverStub
    branch: str
    timeline: str
    table: str
    ports: dict[str, int] = field(default_factory=dict)  # the computes this test made

    # -- zctl and computes ----------------------------------------------------------------

    def zctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return zctl(self.repo, *args, check=check)

    def computes(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in json.loads(self.zctl("pg", "list", "--json").stdout)}

    def branches(self) -> dict[str, dict[str, Any]]:
        return {b["name"]: b for b in json.loads(self.zctl("branch", "list", "--json").stdout)}

    def compute_sql(self, compute: str, query: str, *, sync_local: bool = False) -> list[tuple[Any, ...]]:
        conninfo = f"host=127.0.0.1 port={self.ports[compute]} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True) as c:
            if sync_local:
                c.execute("SET synchronous_commit = local")
            cur = c.execute(query.encode())
            return cur.fetchall() if cur.description else []

    def start_compute(self, name: str, branch: str, lsn: int | None = None) -> None:
        self.ports[name] = free_port()
        args = ["pg", "create", name, "--branch", branch, "--port", str(self.ports[name])]
        if lsn is not None:
            args += ["--lsn", format_lsn(lsn)]
        self.zctl(*args)
        self.zctl("pg", "start", name)

    def compute_node(self, name: str) -> PostgresNode:
        c = Computes(self.repo, self.ps, self.wr)
        return c.node(c.spec(name))

    # -- the primary ------------------------------------------------------------------------

    def primary_flush(self) -> int:
        """Commit a tiny transaction (everything before is flushed), then the primary's flush LSN."""
        self.primary.sql("SELECT txid_current()")
        return parse_lsn(self.primary.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0])

    def count(self, compute: str | None = None, where: str = "true") -> int:
        """Rows of this test's table on a compute, or on the primary."""
        query = f"SELECT count(*) FROM {self.table} WHERE {where}"
        rows = self.primary.sql(query) if compute is None else self.compute_sql(compute, query)
        return int(rows[0][0])

    # -- gRPC --------------------------------------------------------------------------------

    def ids(self, timeline: str | None = None) -> tuple[common_pb2.TenantId, common_pb2.TimelineId]:
        return common_pb2.TenantId(id=TENANT), common_pb2.TimelineId(id=timeline or self.timeline)

    def info(self, timeline: str | None = None) -> pageserver_pb2.TimelineInfo:
        tenant, tl = self.ids(timeline)
        return self.ps.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=tenant, timeline=tl), timeout=10)

    def wait_caught_up(self, lsn: int, timeline: str | None = None, timeout: float = 60.0) -> None:
        wait_for(lambda: self.info(timeline).last_record_lsn >= lsn, timeout,
                 f"the page server to reach {format_lsn(lsn)}")

    def ingest(self, records: Sequence[common_pb2.DecodedRecord], epoch: int,
               timeline: str | None = None) -> grpc.RpcError | None:
        """One Ingest batch; the error it ended with, None if it was acknowledged."""
        tenant, tl = self.ids(timeline)
        req = pageserver_pb2.IngestRequest(tenant=tenant, timeline=tl, batch_seq=1, records=list(records),
                                           writer_epoch=epoch)
        # With the walreceiver's token (scope ingest): an admin's does not carry WAL.
        ingest = LocalCluster(self.repo).client_security("ingest").channel(
            LocalCluster(self.repo).load_config().address("pageserver"))
        try:
            acks = list(pageserver_pb2_grpc.PageServerStub(ingest).Ingest(iter([req]), timeout=30))
        except grpc.RpcError as e:
            return e
        assert len(acks) == 1
        return None

    def attachments(self, timeline: str | None = None) -> list[walreceiver_pb2.AttachmentStatus]:
        tenant, tl = self.ids(timeline)
        return list(self.wr.Status(walreceiver_pb2.StatusRequest(tenant=tenant, timeline=tl), timeout=10).attachments)

    def stored_records(self, timeline: str | None = None) -> list[Record]:
        """Every WAL record the page server stored for the timeline, in WAL order: what its layer
        files hold once it has written out everything it received (Checkpoint)."""
        tenant, tl = self.ids(timeline)
        self.ps.Checkpoint(pageserver_pb2.CheckpointRequest(tenant=tenant, timeline=tl), timeout=60)
        return durable_records(self.repo / "pageserver", TENANT, timeline or self.timeline)

    def get_page(self, rel: common_pb2.RelTag, blkno: int, timeline: str | None = None) -> bytes:
        tenant, tl = self.ids(timeline)
        resp = self.ps.GetPage(pageserver_pb2.GetPageRequest(
            tenant=tenant, timeline=tl, key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=blkno)),
            lsn=common_pb2.RequestLsn(latest=True)), timeout=60)
        return bytes(resp.page)


def record_to_proto(raw: RawRecord) -> common_pb2.DecodedRecord:
    """A record as a walreceiver sends it to Ingest (the page server re-decodes the raw bytes)."""
    rec = raw.decode()
    blocks = [common_pb2.BlockRef(
        block_id=b.block_id, blkno=b.blkno, will_init=b.will_init, has_image=b.has_image,
        apply_image=b.apply_image, has_data=b.has_data,
        rel=common_pb2.RelTag(spc_oid=b.rnode.spc, db_oid=b.rnode.db, rel_number=b.rnode.rel, fork=b.forknum),
    ) for b in rec.blocks]
    return common_pb2.DecodedRecord(lsn=raw.lsn, end_lsn=raw.end_lsn, prev_lsn=rec.prev, xid=rec.xid, rmid=rec.rmid,
                                    info=rec.info, total_len=rec.tot_len, raw=raw.data, blocks=blocks)


def file_records(node: PostgresNode, start: int, end: int) -> list[Record]:
    """The records of `node`'s pg_wal from `start` through `end`, read from its segment files."""
    return [(r.lsn, r.end_lsn, bytes(r.data)) for r in iter_file_records([node.waldir])
            if r.lsn >= start and r.end_lsn <= end]


def assert_stored_wal_is_the_primarys(a: Attached, up_to: int | None = None) -> int:
    """The branch's stored records (through `up_to`, default all) == the primary's own WAL records,
    byte for byte, from the import LSN on, xl_prev linked. Returns the end of the last one compared."""
    info = a.info()
    stored = [r for r in a.stored_records() if up_to is None or r[1] <= up_to]
    assert stored, f"the page server stored no WAL for {a.branch}"
    assert stored[0][0] in (info.start_lsn, *next_record_starts(info.start_lsn))
    for (start, _, _), (_, _, raw) in itertools.pairwise(stored):
        assert xl_prev(raw) == start, "broken xl_prev chain in the stored WAL"
    expected = file_records(a.primary, stored[0][0], stored[-1][1])
    assert len(stored) == len(expected)
    assert stored == expected
    return stored[-1][1]


def rel_tag(node: PostgresNode, table: str) -> common_pb2.RelTag:
    spc, db, rel = node.sql(
        "SELECT CASE WHEN reltablespace = 0 THEN 1663 ELSE reltablespace END,"
        " (SELECT oid FROM pg_database WHERE datname = current_database()), pg_relation_filenode(oid)"
        f" FROM pg_class WHERE oid = '{table}'::regclass")[0]
    return common_pb2.RelTag(spc_oid=spc, db_oid=db, rel_number=rel, fork=0)


@pytest.fixture(scope="module")
def cluster(pg_base_dir: Path, pg_session_factory: PgFactory) -> Iterator[Cluster]:
    """One `zctl start` for the module (computes run as the postgres OS user: the repository is in
    pg_base_dir); the primary keeps its WAL (wal_keep_size = 1GB from initdb) for the comparisons."""
    repo = make_repo(pg_base_dir / "repo-single-writer")
    try:
        with ThreadPoolExecutor(1) as pool:
            started = pool.submit(zctl, repo, "start")
            primary = pg_session_factory("single-writer-primary", autovacuum="off")
            primary.execute("CREATE EXTENSION pageinspect")
            started.result()
        yield Cluster(repo, primary,
                      pageserver_pb2_grpc.PageServerStub(service_channel(repo, "pageserver")),
                      walreceiver_pb2_grpc.WalReceiverStub(service_channel(repo, "walreceiver")))
    finally:
        zctl(repo, "stop", check=False)


@pytest.fixture
def attached(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Attached]:
    """This test's table (1,000 rows) on the primary, then `zctl attach --primary ... --branch prod-<test>`."""
    word = request.node.name.split("_")[1]
    branch, table = f"prod-{word}", f"t_{word}"
    cluster.primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text);"
                            f"INSERT INTO {table} SELECT g, 'primary ' || g FROM generate_series(1, 1000) g;")
    zctl(cluster.repo, "attach", "--primary", cluster.primary.connstr(), "--branch", branch)
    tls = cluster.ps.ListTimelines(pageserver_pb2.ListTimelinesRequest(tenant=common_pb2.TenantId(id=TENANT)),
                                   timeout=10).timelines
    [timeline] = [t.timeline.id for t in tls if t.name == branch]
    a = Attached(cluster.repo, cluster.primary, cluster.ps, cluster.wr, branch, timeline, table)
    yield a
    for name in a.ports:
        zctl(a.repo, "pg", "stop", name, check=False)
    # Stop following (a no-op error when the test detached already): the next test has the services to itself.
    zctl(a.repo, "detach", "--branch", branch, "--drop-slot", check=False)


def primary_writer_name(a: Attached) -> tuple[str, str]:
    """What identifies the primary in the writer's name: its port and its system identifier."""
    sysid = a.primary.sql("SELECT system_identifier FROM pg_control_system()")[0][0]
    return f"port={a.primary.port}", f"system {sysid}"


# -- 1: zctl -----------------------------------------------------------------------------------


def test_zctl_refuses_a_writable_compute_on_an_attached_branch(attached: Attached) -> None:
    a, prod, t = attached, attached.branch, attached.table
    port, system = primary_writer_name(a)
    info = a.info()
    assert info.writer.kind == pageserver_pb2.WRITER_KIND_PRIMARY and info.writer.epoch >= 1
    assert port in info.writer.name and system in info.writer.name
    writer = a.branches()[prod]["writer"]
    assert writer.startswith("follows primary") and port in writer and system in writer

    # zctl pg create of a writable compute: refused, naming the primary and the alternatives.
    out = a.zctl("pg", "create", "pc", "--branch", prod, check=False)
    assert out.returncode == 1
    for text in ("follows the external primary", port, system, f"--branch {prod} --lsn",
                 f"zctl branch create dev --parent {prod}", f"zctl detach --branch {prod}"):
        assert text in out.stderr, (text, out.stderr)
    assert "pc" not in a.computes()

    # zctl pg start of a writable compute that exists already (made before the branch was
    # attached, or by an older zctl): refused the same way; nothing claimed, nothing started.
    computes = Computes(a.repo, a.ps, a.wr)
    computes.create("pc", prod, a.timeline, None, free_port())
    try:
        out = a.zctl("pg", "start", "pc", check=False)
        assert out.returncode == 1
        for text in ("follows the external primary", port, f"zctl branch create dev --parent {prod}",
                     f"zctl detach --branch {prod}"):
            assert text in out.stderr, (text, out.stderr)
        assert a.computes()["pc"]["status"] == "stopped"
        assert a.compute_node("pc").postmaster_pid() is None
    finally:
        computes.destroy("pc")
    # Forced through gRPC: a compute's claim (no takeover) is refused, naming the primary; nothing changes.
    tenant, tl = a.ids()
    with pytest.raises(grpc.RpcError) as e:
        a.ps.ClaimTimeline(pageserver_pb2.ClaimTimelineRequest(
            tenant=tenant, timeline=tl, kind=pageserver_pb2.WRITER_KIND_COMPUTE, name="pc"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "primary" in e.value.details() and port in e.value.details()
    assert a.info().writer == info.writer

    # Read-only computes at an LSN work, and a later one sees the primary's newer rows: the branch follows.
    lsn_a = a.primary_flush()
    a.wait_caught_up(lsn_a)
    a.start_compute("ro1", prod, lsn=lsn_a)
    assert a.compute_sql("ro1", f"SELECT count(*), pg_is_in_recovery() FROM {t}") == [(1000, True)]
    a.primary.sql(f"INSERT INTO {t} SELECT g, 'later ' || g FROM generate_series(1001, 1500) g")
    lsn_b = a.primary_flush()
    a.wait_caught_up(lsn_b)
    a.start_compute("ro2", prod, lsn=lsn_b)
    assert a.compute_sql("ro2", f"SELECT count(*), max(id) FROM {t}") == [(1500, 1500)]
    assert a.count("ro1") == 1000  # still as of its LSN
    # Read-only computes claim nothing: the primary is still the writer, at the same epoch, and followed.
    assert a.info().writer == info.writer
    [att] = a.attachments()
    assert att.state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING and port in att.primary_conninfo
    assert assert_stored_wal_is_the_primarys(a) >= lsn_b


# -- 2: forced through gRPC ----------------------------------------------------------------------


def test_second_writer_forced_through_grpc_is_refused_and_wal_unchanged(attached: Attached,
                                                                         pg_factory: PgFactory) -> None:
    a, t = attached, attached.table
    port, _ = primary_writer_name(a)
    info = a.info()
    epoch = info.writer.epoch
    # Another Postgres cluster, with WAL of its own: a would-be second writer.
    other = pg_factory("other")
    other.execute("CREATE TABLE t (id int PRIMARY KEY, v text);"
                  "INSERT INTO t SELECT g, 'other ' || g FROM generate_series(1, 300) g;")
    other_flush = parse_lsn(other.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0])
    a.wait_caught_up(a.primary_flush())
    before = a.stored_records()

    # -- the walreceiver: an Attach at any epoch but the writer's is refused, naming the writer,
    # whoever it would stream from (another cluster, or the primary itself through another slot).
    tenant, tl = a.ids()
    for conninfo, slot in ((other.connstr(), "intruder"), (a.primary.connstr(), "intruder2")):
        for wrong in (0, epoch + 1, epoch + 100):
            with pytest.raises(grpc.RpcError) as e:
                a.wr.Attach(walreceiver_pb2.AttachRequest(
                    tenant=tenant, timeline=tl, primary_conninfo=conninfo, slot_name=slot, create_slot=True,
                    writer_epoch=wrong), timeout=30)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
            assert "primary" in e.value.details() and port in e.value.details()
            assert f"epoch {epoch})" in e.value.details() and f"epoch is {wrong}" in e.value.details()
    # (At the writer's epoch the only objection left is that the timeline is attached already.)
    with pytest.raises(grpc.RpcError) as e:
        a.wr.Attach(walreceiver_pb2.AttachRequest(tenant=tenant, timeline=tl, primary_conninfo=other.connstr(),
                                                  slot_name="intruder", writer_epoch=epoch), timeout=30)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert other.sql("SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert a.primary.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'intruder%'") == [(0,)]
    [att] = a.attachments()
    assert att.state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING and port in att.primary_conninfo

    # -- the page server: an Ingest batch at any epoch but the writer's is refused, whatever it holds.
    foreign = [record_to_proto(r) for r in iter_file_records([other.waldir]) if r.end_lsn <= other_flush]
    own = [record_to_proto(r) for r in iter_file_records([a.primary.waldir]) if r.lsn >= info.start_lsn]
    assert len(foreign) > 100 and own
    for records in (foreign[-50:], own, []):
        for wrong in (0, epoch - 1, epoch + 1):
            err = a.ingest(records, wrong)
            assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
            assert f"epoch {wrong} refused" in err.details() and "primary" in err.details()
            assert port in err.details()

    # -- ... and at the writer's epoch, WAL that does not continue the timeline is refused too: a
    # foreign record placed where the timeline's WAL ends (its xl_prev links elsewhere), and one
    # after a gap. (The primary is idle but may log a record meanwhile: then try again.)
    small = [r for r in foreign if r.total_len <= 200]
    for where in ("end", "gap"):
        for _ in range(5):
            cur = a.info()
            last, prev = cur.last_record_lsn, cur.prev_record_lsn
            rec = common_pb2.DecodedRecord()
            rec.CopyFrom(next(r for r in small if r.prev_lsn != prev))
            rec.lsn = last if where == "end" else (last // XLOG_BLCKSZ + 3) * XLOG_BLCKSZ + 24 + 64
            rec.end_lsn = rec.lsn + maxalign(rec.total_len)
            err = a.ingest([rec], epoch)
            assert not any(r == (rec.lsn, rec.end_lsn, rec.raw) for r in a.stored_records()), \
                f"a foreign record was stored at {format_lsn(rec.lsn)} ({where})"
            if (err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION) \
                    or a.info().last_record_lsn == last:
                break
        else:
            pytest.fail(f"the primary kept writing: could not place a record at the end of {a.branch}'s WAL")
        assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION, (where, err)
        if where == "gap" or last % XLOG_BLCKSZ == 0:
            assert "a gap in the WAL" in err.details()
        else:
            assert "links back to" in err.details() and "foreign or diverged WAL" in err.details()
    # (Records it holds already, at the writer's epoch, are what a reconnecting walreceiver resends: fine.)
    assert a.ingest(own, epoch) is None

    # Nothing of all that was stored, and the primary is still followed: its later writes get through.
    assert a.stored_records()[:len(before)] == before
    assert a.info().writer == info.writer
    a.primary.execute(f"UPDATE {t} SET v = v || ' updated' WHERE id % 7 = 0;"
                      f"DELETE FROM {t} WHERE id % 11 = 0;"
                      f"INSERT INTO {t} SELECT g, 'more ' || g FROM generate_series(1001, 1400) g;")
    target = a.primary_flush()
    a.wait_caught_up(target)
    assert assert_stored_wal_is_the_primarys(a) >= target
    # GetPage at latest == the primary's pages (masked), every block of the table.
    rel = rel_tag(a.primary, t)
    nblocks = a.primary.sql(f"SELECT pg_relation_size('{t}') / 8192")[0][0]
    assert nblocks >= 8
    for blkno in range(nblocks):
        ours = bytearray(a.get_page(rel, blkno))
        theirs = bytearray(a.primary.sql(f"SELECT get_raw_page('{t}', {blkno})")[0][0])
        heap_mask(ours, blkno)
        heap_mask(theirs, blkno)
        assert ours == theirs, f"block {blkno} of {t} differs from the primary's"
    [att] = a.attachments()
    assert att.state == walreceiver_pb2.ATTACHMENT_STATE_STREAMING and not att.last_error


# -- 3: zctl detach ----------------------------------------------------------------------------


def test_detach_then_a_writable_compute_forks_the_branch_on_purpose(attached: Attached) -> None:
    a, prod, t = attached, attached.branch, attached.table
    epoch = a.info().writer.epoch
    slot = a.attachments()[0].slot_name
    a.primary.sql(f"INSERT INTO {t} SELECT g, 'before detach ' || g FROM generate_series(1001, 1200) g")
    a.wait_caught_up(a.primary_flush())

    out = a.zctl("detach", "--branch", prod, "--drop-slot")
    assert "no longer follows" in out.stdout and f"port={a.primary.port}" in out.stdout
    released = a.info()
    detach_lsn = released.last_record_lsn
    assert format_lsn(detach_lsn) in out.stdout
    assert released.writer.kind == pageserver_pb2.WRITER_KIND_NONE and released.writer.epoch == epoch + 1
    assert a.branches()[prod]["writer"] is None
    assert a.attachments() == []
    assert a.primary.sql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") == [(0,)]
    # Released: no batch is stored, not even at the epoch the primary held.
    err = a.ingest([], epoch)
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no writer" in err.details()
    tenant, tl = a.ids()
    with pytest.raises(grpc.RpcError) as e:
        a.wr.Attach(walreceiver_pb2.AttachRequest(tenant=tenant, timeline=tl, primary_conninfo=a.primary.connstr(),
                                                  slot_name=slot, create_slot=True, writer_epoch=epoch), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no writer" in e.value.details()
    assert a.attachments() == []
    again = a.zctl("detach", "--branch", prod, check=False)
    assert again.returncode == 1 and "does not follow an external primary" in again.stderr

    # The primary goes on; the branch does not follow any more.
    a.primary.sql(f"INSERT INTO {t} SELECT g, 'after detach ' || g FROM generate_series(1201, 1500) g")
    a.primary_flush()

    # A writable compute on the branch now works: it has the rows as of the detach point, commits, forks.
    a.start_compute("pc", prod)
    claimed = a.info().writer
    assert (claimed.kind, claimed.name, claimed.epoch) == (pageserver_pb2.WRITER_KIND_COMPUTE, "pc", epoch + 2)
    assert a.branches()[prod]["writer"] == "written by compute pc"
    assert a.compute_sql("pc", f"SELECT count(*), max(id), pg_is_in_recovery() FROM {t}") == [(1200, 1200, False)]
    a.compute_sql("pc", f"INSERT INTO {t} SELECT g, 'fork ' || g FROM generate_series(5001, 5007) g")
    a.primary.sql(f"INSERT INTO {t} SELECT g, 'primary later ' || g FROM generate_series(1501, 1600) g")
    a.primary_flush()
    assert a.count("pc", "id > 1200") == 7
    assert a.count() == 1600 and a.count(None, "id > 5000") == 0

    # The fork is what the page server keeps: the compute restarted starts from it.
    a.zctl("pg", "stop", "pc")
    assert a.info().writer.kind == pageserver_pb2.WRITER_KIND_NONE  # a stopped compute releases its claim
    a.zctl("pg", "start", "pc")
    assert a.info().writer.epoch == epoch + 4
    assert a.compute_sql("pc", f"SELECT count(*), count(*) FILTER (WHERE id > 5000), max(id) FROM {t}") == \
        [(1207, 7, 5007)]
    # Up to the detach point the branch's WAL is the primary's; after it, none of it is.
    assert assert_stored_wal_is_the_primarys(a, up_to=detach_lsn) == detach_lsn
    after = [r for r in a.stored_records() if r[1] > detach_lsn]
    assert after, "the compute's WAL was not stored"
    theirs = {raw for _, _, raw in file_records(a.primary, detach_lsn, 1 << 62)}
    assert theirs and not any(raw in theirs for _, _, raw in after)


# -- 4: a restarted compute fences its previous incarnation -----------------------------------------


def test_restarted_compute_fences_its_previous_incarnation(attached: Attached) -> None:
    a, t = attached, attached.table
    primary_writer = a.info().writer
    # The alternative the refusal offers: a new branch of the attached one, written by a compute.
    a.zctl("branch", "create", "dev", "--parent", a.branch)
    dev = a.branches()["dev"]["timeline_id"]
    a.start_compute("dc", "dev")
    first = a.info(dev).writer
    assert (first.kind, first.name, first.epoch) == (pageserver_pb2.WRITER_KIND_COMPUTE, "dc", 1)
    assert a.info().writer == primary_writer  # the parent still follows its primary
    a.compute_sql("dc", f"INSERT INTO {t} SELECT g, 'dev ' || g FROM generate_series(2001, 2010) g")

    # The compute crashes; its attachment (epoch 1) stays, retrying. The restart claims epoch 2.
    a.compute_node("dc").kill()
    assert len(a.attachments(dev)) == 1
    a.zctl("pg", "start", "dc")
    second = a.info(dev).writer
    assert (second.kind, second.name, second.epoch) == (pageserver_pb2.WRITER_KIND_COMPUTE, "dc", 2)
    assert a.count("dc", "id > 2000") == 10
    # Acknowledged by a synchronous commit: from here on no claim may lose these rows.
    a.compute_sql("dc", f"INSERT INTO {t} SELECT g, 'dev again ' || g FROM generate_series(2011, 2020) g")
    # WAL of the old epoch is refused, whatever it is: the branch's own records, or nothing at all.
    new_wal = [record_to_proto(RawRecord(start, end, raw)) for start, end, raw in a.stored_records(dev)]
    assert len(new_wal) >= 10
    for records in (new_wal[-10:], []):
        err = a.ingest(records, first.epoch, timeline=dev)
        assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        assert "epoch 1 refused" in err.details() and "compute 'dc' (epoch 2)" in err.details()

    # Another claim (a restart elsewhere) while this incarnation still streams: it is fenced at once.
    tenant, tl = a.ids(dev)
    third = a.ps.ClaimTimeline(pageserver_pb2.ClaimTimelineRequest(
        tenant=tenant, timeline=tl, kind=pageserver_pb2.WRITER_KIND_COMPUTE, name="dc"), timeout=10).writer
    assert third.epoch == 3
    stored_end = a.info(dev).last_record_lsn
    a.compute_sql("dc", f"INSERT INTO {t} SELECT g, 'fenced ' || g FROM generate_series(3001, 3010) g",
                  sync_local=True)
    [att] = wait_for(lambda: [s for s in a.attachments(dev) if s.state == walreceiver_pb2.ATTACHMENT_STATE_FAILED],
                     30, "the fenced attachment to fail")
    assert "refused" in att.last_error and "epoch 2" in att.last_error, att.last_error
    assert a.info(dev).last_record_lsn == stored_end  # nothing of the fenced incarnation was stored
    assert a.ingest([], second.epoch, timeline=dev) is not None

    # The next incarnation starts from what the page server holds: every acknowledged commit (rows
    # 2001..2020), none of the fenced incarnation's rows (3001..3010, committed locally only).
    a.compute_node("dc").kill()
    a.zctl("pg", "start", "dc")
    assert a.info(dev).writer.epoch == 4
    assert a.compute_sql("dc", f"SELECT count(*) FILTER (WHERE id > 2000), max(id) FROM {t}") == [(20, 2020)], \
        "acknowledged commits lost, or the fenced incarnation's rows stored"
    a.compute_sql("dc", f"INSERT INTO {t} VALUES (4001, 'committed')")  # synchronous commit: stored at epoch 4
    assert a.info(dev).last_record_lsn > stored_end
    assert a.info().writer == primary_writer
