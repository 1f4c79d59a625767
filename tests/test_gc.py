"""Garbage collection in the page server: a GC cutoff per timeline, and history below it removed.

The oracle is the page server itself before GC: every page (of several
relations, at several LSNs at or above the cutoff), relation size, database
size, SLRU segment and base backup must come back byte-identical after GC,
and so must a child branch's reads at its branch point below the cutoff.
Those pre-GC answers are themselves checked against a real primary by
test_pageserver.py and test_basebackup.py. Below the cutoff, every read and
branching fails with OUT_OF_RANGE. The timeline's manifest and layer files
show that GC removed layers; a page server killed with SIGKILL in the middle
of GC comes back with the same answers and a second GC finishes the job.
Background compaction is off here: it would merge the delta layers GC
removes a few at a time (tests/test_storage_timeline_layers.py covers GC
after compaction).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from conftest import PgFactory
from pageserver_util import RunningPageServer, current_lsn, import_backup, push_wal, rel_key, take_base_backup
from zctl_util import zctl

from pgformat.controlfile import parse_control_file
from pgformat.lsn import format_lsn
from services.pageserver.keys import rel_page_key
from services.pageserver.repository import DEFAULT_TENANT, Repository, RepositoryError
from services.pageserver.storage.delta_layer import DeltaLayerReader
from services.pageserver.storage.image_layer import ImageLayerReader
from services.pageserver.storage.manifest import load_manifest
from services.pageserver.storage.store import DiskLayerStore
from zctl.postgres import free_port
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

MAIN = "11111111111111111111111111111111"
CHILD = "22222222222222222222222222222222"
TENANT = common_pb2.TenantId(id=DEFAULT_TENANT)
VM_FORK = 2
# Relations whose every page is compared (pgbench's, ours, and a catalog).
RELATIONS = ("pgbench_accounts", "pgbench_accounts_pkey", "pgbench_branches", "pgbench_tellers",
             "pgbench_history", "kv", "kv_pkey", "pg_class")


# -- the catalog ------------------------------------------------------------------------------


def test_old_repository_gets_the_gc_cutoff_column(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    repo.ensure_tenant()
    repo.create_timeline(DEFAULT_TENANT, MAIN, name="main", start_lsn=0x1000000)
    repo.close()
    with sqlite3.connect(tmp_path / "repo" / "repository.sqlite") as db:  # the schema before GC existed
        db.execute("ALTER TABLE timelines DROP COLUMN gc_cutoff_lsn")
    repo = Repository(tmp_path / "repo")
    tl = repo.timeline(DEFAULT_TENANT, MAIN)
    assert tl.gc_cutoff_lsn == 0 and tl.name == "main"
    assert repo.gc(tl, 0x2000000).cutoff == 0x1000000  # capped at the last record LSN
    repo.close()
    assert Repository(tmp_path / "repo").timeline(DEFAULT_TENANT, MAIN).gc_cutoff_lsn == 0x1000000


def test_a_repository_of_the_sqlite_page_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    with sqlite3.connect(tmp_path / "repo" / "repository.sqlite") as db:  # what versions before layers wrote
        db.execute("CREATE TABLE page_versions (tl INTEGER, key BLOB, lsn INTEGER, kind INTEGER, data BLOB)")
    with pytest.raises(RepositoryError, match="older page server that kept page versions in SQLite"):
        Repository(tmp_path / "repo")


# -- against a real primary ----------------------------------------------------------------


@dataclass
class History:
    repo: Path  # page server repository with MAIN imported and all WAL ingested (no GC yet)
    rels: dict[str, common_pb2.RelTag]
    doomed: common_pb2.RelTag  # a table dropped before the cutoff
    db_oid: int
    branch_lsn: int  # a moment before the cutoff: the child branch point
    cutoff: int
    mid: int
    end: int


@pytest.fixture(scope="module")
def history(pg_session_factory: PgFactory, pg_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> History:
    node = pg_session_factory("gc", autovacuum="off", wal_keep_size="1GB")
    node.pgbench("-i", "-s", "1", "-q")
    tmp = tmp_path_factory.mktemp("gc")
    backup = take_base_backup(node, pg_base_dir / f"backup-{tmp.name}")
    node.execute("CREATE TABLE kv (k int PRIMARY KEY, v text);"
                 " INSERT INTO kv SELECT g, repeat('v', g % 200) FROM generate_series(1, 3000) g")
    node.pgbench("-c", "2", "-t", "150", "-n")
    node.sql("CHECKPOINT")  # a base backup of the child scans the WAL from here: little of it is kept
    branch_lsn = current_lsn(node)
    node.pgbench("-c", "2", "-t", "150", "-n")  # history between the branch point and the next checkpoint
    node.execute("UPDATE kv SET v = v || 'x' WHERE k % 3 = 0")
    node.execute("CREATE TABLE doomed AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g")
    doomed = rel_key(node, "doomed")
    node.sql("CHECKPOINT")  # base backups at the cutoff scan the WAL from this checkpoint's redo point
    node.pgbench("-c", "2", "-t", "150", "-n")
    node.execute("DROP TABLE doomed")
    node.sql("VACUUM pgbench_accounts")
    node.execute("UPDATE kv SET v = 'w' WHERE k % 7 = 0")
    cutoff = current_lsn(node)
    node.execute("UPDATE kv SET v = 'y' WHERE k % 5 = 0")
    node.pgbench("-c", "2", "-t", "100", "-n")
    mid = current_lsn(node)
    node.pgbench("-c", "2", "-t", "100", "-n")
    node.execute("DELETE FROM kv WHERE k % 11 = 0")
    end = current_lsn(node)
    rels = {name: rel_key(node, name) for name in RELATIONS}
    db_oid = node.sql("SELECT oid FROM pg_database WHERE datname = 'postgres'")[0][0]
    ps = RunningPageServer(tmp / "repo", compaction=False)
    try:
        summary = import_backup(ps.stub, backup, MAIN)
        assert summary.start_lsn < branch_lsn
        push_wal(ps.stub, node.waldir, MAIN, summary.start_lsn, end, flush_every=1)  # many delta layers
    finally:
        ps.close()
    return History(tmp / "repo", rels, doomed, db_oid, branch_lsn, cutoff, mid, end)


def _copy(history: History, dest: Path) -> Path:
    shutil.copytree(history.repo, dest)
    return dest


def _tl(timeline: str) -> common_pb2.TimelineId:
    return common_pb2.TimelineId(id=timeline)


def _at(lsn: int | None) -> common_pb2.RequestLsn:
    return common_pb2.RequestLsn(latest=True) if lsn is None else common_pb2.RequestLsn(lsn=lsn)


def _fork(rel: common_pb2.RelTag, fork: int) -> common_pb2.RelTag:
    return common_pb2.RelTag(spc_oid=rel.spc_oid, db_oid=rel.db_oid, rel_number=rel.rel_number, fork=fork)


def _pages(stub: pageserver_pb2_grpc.PageServerStub, timeline: str, rel: common_pb2.RelTag, nblocks: int,
           lsn: int | None) -> list[tuple[bytes, int]]:
    """(page, page LSN) of blocks 0..nblocks-1, through the GetPages stream."""
    def batches() -> Iterator[pageserver_pb2.GetPagesRequest]:
        for start in range(0, nblocks, 64):
            yield pageserver_pb2.GetPagesRequest(tenant=TENANT, timeline=_tl(timeline), pages=[
                pageserver_pb2.PageRequestItem(
                    request_id=blk, key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=blk)),
                    lsn=_at(lsn)) for blk in range(start, min(start + 64, nblocks))])

    got: dict[int, tuple[bytes, int]] = {}
    for resp in stub.GetPages(batches(), timeout=120):
        for item in resp.pages:
            assert item.WhichOneof("result") == "page", (rel, item.request_id, item.error.message)
            got[item.request_id] = (bytes(item.page.page), item.page.page_lsn)
    return [got[b] for b in range(nblocks)]


def _backup(stub: pageserver_pb2_grpc.PageServerStub, timeline: str, lsn: int) -> dict[str, Any]:
    """Every member of a base backup; pg_control and the WAL it points at without the clock time in them."""
    chunks = list(stub.Basebackup(pageserver_pb2.BasebackupRequest(tenant=TENANT, timeline=_tl(timeline), lsn=lsn),
                                  timeout=300))
    out: dict[str, Any] = {"lsn": chunks[0].lsn}
    with tarfile.open(fileobj=io.BytesIO(b"".join(c.data for c in chunks))) as tar:
        for m in tar:
            f = tar.extractfile(m)
            data = f.read() if f is not None else b"<dir>"
            if m.name == "global/pg_control":
                cf = parse_control_file(data)
                data = dataclasses.replace(cf, time=0, crc=0,
                                           checkpoint_copy=dataclasses.replace(cf.checkpoint_copy, time=0))
            elif m.name.startswith("pg_wal/"):
                data = len(data)  # holds the checkpoint record, whose time field is now
            out[m.name] = data
    return out


@dataclass
class Snapshot:
    """Everything a timeline serves at a few LSNs."""

    pages: dict[tuple[str, int, str], list[tuple[bytes, int]]] = field(default_factory=dict)
    sizes: dict[tuple[str, int, str], int] = field(default_factory=dict)
    db_sizes: dict[str, int] = field(default_factory=dict)
    slru: dict[str, bytes] = field(default_factory=dict)
    doomed_exists: dict[str, bool] = field(default_factory=dict)


def _snapshot(stub: pageserver_pb2_grpc.PageServerStub, h: History, timeline: str, lsns: list[int | None],
              rels: tuple[str, ...] = RELATIONS) -> Snapshot:
    snap = Snapshot()
    for lsn in lsns:
        where = "latest" if lsn is None else format_lsn(lsn)
        for name in rels:
            for fork in (0, VM_FORK) if name == "pgbench_accounts" else (0,):
                rel = _fork(h.rels[name], fork)
                n = stub.RelSize(pageserver_pb2.RelSizeRequest(tenant=TENANT, timeline=_tl(timeline), rel=rel,
                                                               lsn=_at(lsn))).nblocks
                snap.sizes[(name, fork, where)] = n
                snap.pages[(name, fork, where)] = _pages(stub, timeline, rel, n, lsn)
        snap.db_sizes[where] = stub.DbSize(pageserver_pb2.DbSizeRequest(
            tenant=TENANT, timeline=_tl(timeline), db_oid=h.db_oid, lsn=_at(lsn))).size_bytes
        snap.slru[where] = stub.GetSlruSegment(pageserver_pb2.GetSlruSegmentRequest(
            tenant=TENANT, timeline=_tl(timeline), kind=common_pb2.SLRU_KIND_CLOG, segno=0, lsn=_at(lsn))).segment
        snap.doomed_exists[where] = stub.RelExists(pageserver_pb2.RelExistsRequest(
            tenant=TENANT, timeline=_tl(timeline), rel=h.doomed, lsn=_at(lsn))).exists
    return snap


def _layers(repo: Path, timeline: str) -> dict[str, int]:
    """Layer file name -> size, as the timeline's manifest lists them (read-only)."""
    store = DiskLayerStore(repo / "tenants" / DEFAULT_TENANT / "timelines" / timeline, create=False, clean=False)
    manifest = load_manifest(store)
    assert manifest is not None
    return dict(manifest.layers)


def _doomed_versions(repo: Path, h: History) -> int:
    """Versions of the dropped table's pages in the live layers of MAIN."""
    d = h.doomed
    lo = rel_page_key(d.spc_oid, d.db_oid, d.rel_number, 0, 0)
    hi = rel_page_key(d.spc_oid, d.db_oid, d.rel_number + 1, 0, 0)
    store = DiskLayerStore(repo / "tenants" / DEFAULT_TENANT / "timelines" / MAIN, create=False, clean=False)
    count = 0
    for name in _layers(repo, MAIN):
        cls = DeltaLayerReader if name.endswith(".delta") else ImageLayerReader
        with cls.open(store, name) as reader:
            count += sum(1 for _ in reader.iter_encoded((lo, hi)))
    return count


def _writing_a_layer(tl_dir: Path) -> bool:
    return any(p.name.startswith(".tmp-") and "manifest" not in p.name for p in tl_dir.iterdir())


def _gc(stub: pageserver_pb2_grpc.PageServerStub, timeline: str, horizon: int) -> Any:
    return stub.Gc(pageserver_pb2.GcRequest(tenant=TENANT, timeline=_tl(timeline), horizon_lsn=horizon), timeout=600)


def _code(call: Any, req: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        r = call(req, timeout=60)
        if not isinstance(r, Message):
            list(r)  # a stream: the error comes with the first message
    return ei.value.code(), ei.value.details() or ""


@dataclass
class Collected:
    repo: Path
    before_main: Snapshot
    before_child: Snapshot
    backups_before: dict[str, dict[str, Any]]
    layers_before: dict[str, int]
    doomed_before: int
    response: Any
    seconds: float


@pytest.fixture(scope="module")
def collected(history: History, tmp_path_factory: pytest.TempPathFactory) -> Collected:
    """A copy of the history with a child branched below the cutoff, then GC of main at the cutoff."""
    repo = _copy(history, tmp_path_factory.mktemp("collected") / "repo")
    ps = RunningPageServer(repo, compaction=False)
    try:
        ps.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=TENANT, new_timeline=_tl(CHILD), ancestor_timeline=_tl(MAIN), ancestor_lsn=history.branch_lsn,
            name="child"))
        lsns: list[int | None] = [history.cutoff, history.mid, None]
        before_main = _snapshot(ps.stub, history, MAIN, lsns)
        before_child = _snapshot(ps.stub, history, CHILD, [None], ("kv", "kv_pkey", "pgbench_branches", "pg_class"))
        backups = {"main@cutoff": _backup(ps.stub, MAIN, history.cutoff), "child": _backup(ps.stub, CHILD, 0)}
        layers = _layers(repo, MAIN)
        doomed = _doomed_versions(repo, history)
        t0 = time.monotonic()
        response = _gc(ps.stub, MAIN, history.cutoff)
        seconds = time.monotonic() - t0
    finally:
        ps.close()
    return Collected(repo, before_main, before_child, backups, layers, doomed, response, seconds)


def test_gc_removes_history_and_reports_it(history: History, collected: Collected) -> None:
    r = collected.response
    assert r.gc_cutoff_lsn == history.cutoff and r.previous_gc_cutoff_lsn == 0
    assert list(r.retained_branch_lsns) == [history.branch_lsn]
    after = _layers(collected.repo, MAIN)
    removed = set(collected.layers_before) - set(after)
    # An image layer at the cutoff let the layers wholly below it go, but for those the child's
    # branch point and the WAL a base backup at the cutoff scans still need.
    assert r.image_layers_written == 1
    assert set(after) - set(collected.layers_before) == {n for n in after if n.endswith(f"__{history.cutoff:016X}.image")}
    assert r.layers_removed == len(removed) > 2, (r, sorted(removed))
    assert r.bytes_removed == sum(collected.layers_before[n] for n in removed) > 0
    # The dropped table's versions went with the layers that held them; what is left of it is in
    # layers kept for the WAL they hold (none of it is in the image at the cutoff).
    assert collected.doomed_before > 20 and _doomed_versions(collected.repo, history) < collected.doomed_before


def test_reads_at_and_above_the_cutoff_are_unchanged(history: History, collected: Collected) -> None:
    ps = RunningPageServer(collected.repo, compaction=False)  # also a restart: the cutoff and the images are on disk
    try:
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=TENANT, timeline=_tl(MAIN)))
        assert info.gc_cutoff_lsn == history.cutoff
        after = _snapshot(ps.stub, history, MAIN, [history.cutoff, history.mid, None])
        for k, pages in collected.before_main.pages.items():
            assert len(after.pages[k]) == len(pages) > 0, k
            for blk, (page, got) in enumerate(zip(pages, after.pages[k], strict=True)):
                assert page == got, f"{k} block {blk}"
        assert after == collected.before_main
        assert sum(len(p) for p in after.pages.values()) > 5000
        assert not after.doomed_exists[format_lsn(history.cutoff)]
        assert _backup(ps.stub, MAIN, history.cutoff) == collected.backups_before["main@cutoff"]
        # The child reads its parent at its branch point, below the parent's cutoff: kept.
        child = _snapshot(ps.stub, history, CHILD, [None], ("kv", "kv_pkey", "pgbench_branches", "pg_class"))
        assert child == collected.before_child
        assert _backup(ps.stub, CHILD, 0) == collected.backups_before["child"]
    finally:
        ps.close()


def test_reads_and_branches_below_the_cutoff_are_out_of_range(history: History, collected: Collected) -> None:
    ps = RunningPageServer(collected.repo, compaction=False)
    try:
        below = history.branch_lsn + 8  # above the child's branch point, below the cutoff
        tl = _tl(MAIN)
        rel = history.rels["kv"]
        key = common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=0))
        requests = [
            (ps.stub.GetPage, pageserver_pb2.GetPageRequest(tenant=TENANT, timeline=tl, key=key, lsn=_at(below))),
            (ps.stub.RelSize, pageserver_pb2.RelSizeRequest(tenant=TENANT, timeline=tl, rel=rel, lsn=_at(below))),
            (ps.stub.RelExists, pageserver_pb2.RelExistsRequest(tenant=TENANT, timeline=tl, rel=rel, lsn=_at(below))),
            (ps.stub.DbSize, pageserver_pb2.DbSizeRequest(tenant=TENANT, timeline=tl, db_oid=history.db_oid,
                                                          lsn=_at(below))),
            (ps.stub.GetSlruSegment, pageserver_pb2.GetSlruSegmentRequest(
                tenant=TENANT, timeline=tl, kind=common_pb2.SLRU_KIND_CLOG, segno=0, lsn=_at(below))),
            (ps.stub.Basebackup, pageserver_pb2.BasebackupRequest(tenant=TENANT, timeline=tl, lsn=below)),
            (ps.stub.CreateTimeline, pageserver_pb2.CreateTimelineRequest(
                tenant=TENANT, new_timeline=_tl("3" * 32), ancestor_timeline=tl, ancestor_lsn=below)),
        ]
        for call, req in requests:
            code, details = _code(call, req)
            assert code == grpc.StatusCode.OUT_OF_RANGE, (type(req).__name__, code, details)
            assert format_lsn(below) in details and format_lsn(history.cutoff) in details, details
        # GetPages reports it per item; the stream goes on.
        resp = next(ps.stub.GetPages(iter([pageserver_pb2.GetPagesRequest(tenant=TENANT, timeline=tl, pages=[
            pageserver_pb2.PageRequestItem(request_id=1, key=key, lsn=_at(below)),
            pageserver_pb2.PageRequestItem(request_id=2, key=key, lsn=_at(history.cutoff))])]), timeout=60))
        by_id = {p.request_id: p for p in resp.pages}
        assert by_id[1].error.code == grpc.StatusCode.OUT_OF_RANGE.value[0]
        assert by_id[2].WhichOneof("result") == "page"
        # Reading the child below its own start goes to main at that LSN: refused as well.
        code, _ = _code(ps.stub.GetPage, pageserver_pb2.GetPageRequest(
            tenant=TENANT, timeline=_tl(CHILD), key=key, lsn=_at(history.branch_lsn - 4096)))
        assert code == grpc.StatusCode.OUT_OF_RANGE
        # Branching at the cutoff works, and the branch sees main as of the cutoff.
        ps.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=TENANT, new_timeline=_tl("4" * 32), ancestor_timeline=tl, ancestor_lsn=history.cutoff))
        at_cutoff = collected.before_main.pages[("kv", 0, format_lsn(history.cutoff))]
        assert _pages(ps.stub, "4" * 32, rel, 5, None) == at_cutoff[:5]
    finally:
        ps.close()


def test_gc_again_changes_nothing(history: History, collected: Collected) -> None:
    ps = RunningPageServer(collected.repo, compaction=False)
    try:
        layers = _layers(collected.repo, MAIN)
        for horizon in (history.cutoff, history.branch_lsn):  # the cutoff never moves back
            r = _gc(ps.stub, MAIN, horizon)
            assert r.gc_cutoff_lsn == r.previous_gc_cutoff_lsn == history.cutoff
            assert (r.layers_removed, r.bytes_removed, r.image_layers_written) == (0, 0, 0)
        assert _layers(collected.repo, MAIN) == layers
        with pytest.raises(grpc.RpcError) as ei:
            ps.stub.Gc(pageserver_pb2.GcRequest(tenant=TENANT, timeline=_tl(MAIN)), timeout=60)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        ps.close()


def test_zctl_gc_and_branches(history: History, collected: Collected, tmp_path: Path) -> None:
    """`zctl gc`, `zctl branch list --json` and a branch below the cutoff, against a running page server."""
    repo = _copy(history, tmp_path / "repo")
    ps = RunningPageServer(repo, compaction=False)
    try:
        cli = tmp_path / "cli"
        cli.mkdir()
        port = int(ps.server.address.rsplit(":", 1)[1])
        (cli / "config.json").write_text(
            f'{{"host": "127.0.0.1", "ports": {{"redo": {free_port()}, "pageserver": {port}, '
            f'"walreceiver": {free_port()}}}, "redo_workers": 1}}')
        out = zctl(cli, "gc", "--branch", MAIN, "--horizon", format_lsn(history.branch_lsn)).stdout
        assert f"cutoff moved from {format_lsn(0)} to {format_lsn(history.branch_lsn)}" in out, out
        assert "layer files" in out and "removed" in out
        rows = {r["timeline_id"]: r for r in json.loads(zctl(cli, "branch", "list", "--json").stdout)}
        assert rows[MAIN]["gc_cutoff_lsn"] == format_lsn(history.branch_lsn)
        proc = zctl(cli, "branch", "create", "old", "--parent", MAIN, "--at", format_lsn(history.branch_lsn - 8),
                    check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "below the GC cutoff" in proc.stderr and format_lsn(history.branch_lsn) in proc.stderr, proc.stderr
        keep = history.end - history.mid
        report = json.loads(zctl(cli, "gc", "--branch", MAIN, "--keep-bytes", str(keep), "--json").stdout)
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=TENANT, timeline=_tl(MAIN)))
        assert report["gc_cutoff_lsn"] == format_lsn(info.last_record_lsn - keep) == format_lsn(info.gc_cutoff_lsn)
        assert report["layers_removed"] > 0 and report["bytes_removed"] > 0
        zctl(cli, "branch", "create", "recent", "--parent", MAIN, "--at", report["gc_cutoff_lsn"])
    finally:
        ps.close()


def test_page_server_killed_during_gc_comes_back_whole(history: History, tmp_path: Path) -> None:
    """SIGKILL while GC writes its image layer: reads at and above the cutoff unchanged, and a second
    GC finishes the job."""
    repo = _copy(history, tmp_path / "repo")
    rels = ("kv", "pgbench_branches", "pgbench_accounts")
    ps = RunningPageServer(repo, compaction=False)
    try:
        before = _snapshot(ps.stub, history, MAIN, [history.cutoff, None], rels)
    finally:
        ps.close()
    layers_before = _layers(repo, MAIN)
    tl_dir = repo / "tenants" / DEFAULT_TENANT / "timelines" / MAIN

    proc, stub, channel = _spawn_pageserver(repo)
    try:
        errors: list[grpc.RpcError] = []

        def run_gc() -> None:
            try:
                _gc(stub, MAIN, history.cutoff)
            except grpc.RpcError as e:
                errors.append(e)

        gc_thread = threading.Thread(target=run_gc)
        gc_thread.start()
        deadline = time.monotonic() + 60
        while not _writing_a_layer(tl_dir):
            assert time.monotonic() < deadline and gc_thread.is_alive(), "GC finished before it could be killed"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        gc_thread.join(timeout=30)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert _layers(repo, MAIN) == layers_before  # the manifest never named the half-written layer
    ps = RunningPageServer(repo, compaction=False)
    try:
        assert not _writing_a_layer(tl_dir)  # its file went at the restart
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=TENANT, timeline=_tl(MAIN)))
        assert info.gc_cutoff_lsn == history.cutoff  # made durable before any layer was written
        assert _snapshot(ps.stub, history, MAIN, [history.cutoff, None], rels) == before
        r = _gc(ps.stub, MAIN, history.cutoff)
        assert r.image_layers_written == 1 and r.layers_removed > 0  # the run that was cut short left work
        assert _snapshot(ps.stub, history, MAIN, [history.cutoff, None], rels) == before
        r = _gc(ps.stub, MAIN, history.cutoff)
        assert (r.image_layers_written, r.layers_removed) == (0, 0)
    finally:
        ps.close()


def _spawn_pageserver(repo: Path) -> tuple[subprocess.Popen[str], pageserver_pb2_grpc.PageServerStub, grpc.Channel]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.pageserver.main", "--repo", str(repo),
                             "--listen", f"127.0.0.1:{port}", "--log-level", "warning", "--compaction-threshold", "0",
                             "--insecure"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return proc, pageserver_pb2_grpc.PageServerStub(channel), channel
