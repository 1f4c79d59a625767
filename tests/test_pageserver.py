"""The page server against a real primary: import a base backup, ingest its WAL, serve pages.

Oracle: the primary's own pages (pageinspect's get_raw_page), masked with the
rmgr's mask as wal_consistency_checking does, at the latest LSN and at an
earlier LSN captured while the primary was quiet.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import PgFactory
from pageserver_util import (
    FSM_TABLE_KEEP,
    RunningPageServer,
    create_fsm_table,
    current_lsn,
    get_page,
    masked_page,
    import_backup,
    push_wal,
    raw_fsm_pages,
    rel_key,
    take_base_backup,
    truncate_fsm_table,
    user_relations,
)

from pgformat.constants import BLCKSZ
from pgformat.fsm import fsm_nodes, fsm_slots
from pgformat.xlogrecord import decode_record
from services.pageserver.keys import rel_page_key
from services.pageserver.repository import DEFAULT_TENANT, WRITER_PRIMARY, Repository, RepositoryError
from zctl.waldump import iter_file_records
from zproto import common_pb2, pageserver_pb2

TIMELINE = "11111111111111111111111111111111"

WORKLOAD = [
    "CREATE TABLE items (id serial PRIMARY KEY, name text, qty int, note text)",
    "CREATE INDEX items_name ON items (name)",
    "INSERT INTO items (name, qty, note) SELECT 'item' || i, i % 97, repeat('n', i % 300) FROM generate_series(1, 5000) i",
    "UPDATE items SET qty = qty + 1 WHERE id % 4 = 0",
    "UPDATE items SET name = name || '-renamed' WHERE id % 9 = 0",
    "DELETE FROM items WHERE id % 11 = 0",
    "CREATE TABLE docs (id int, body text)",
    "INSERT INTO docs SELECT i, repeat(md5(i::text), 200) FROM generate_series(1, 40) i",
]


def _raw_page(node, relname: str, blk: int) -> bytes:  # type: ignore[no-untyped-def]
    return bytes(node.sql("SELECT get_raw_page(%s, 'main', %s)", (relname, blk))[0][0])


@pytest.fixture
def primary(pg_factory: PgFactory):  # type: ignore[no-untyped-def]
    node = pg_factory(autovacuum="off", max_prepared_transactions=5)
    node.execute("CREATE EXTENSION pageinspect")
    node.pgbench("-i", "-s", "1", "-q")
    return node


def test_pages_equal_the_primarys_at_latest_and_at_an_old_lsn(primary, tmp_path: Path, pg_base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    backup = take_base_backup(primary, pg_base_dir / f"backup-{tmp_path.name}")
    primary.pgbench("-c", "2", "-t", "200", "-n")
    for stmt in WORKLOAD[:5]:
        primary.execute(stmt)
    primary.sql("VACUUM items")

    # A quiet moment: capture pages and the LSN they are current at.
    old_lsn = current_lsn(primary)
    old_pages = {blk: _raw_page(primary, "items", blk) for blk in range(4)}

    for stmt in WORKLOAD[5:]:
        primary.execute(stmt)
    primary.pgbench("-c", "2", "-t", "200", "-n")
    primary.execute("BEGIN; INSERT INTO docs VALUES (-1, 'prepared'); PREPARE TRANSACTION 'p1'")
    primary.sql("COMMIT PREPARED 'p1'")
    primary.sql("SELECT pg_switch_wal()")
    end_lsn = current_lsn(primary)

    ps = RunningPageServer(tmp_path / "repo")
    try:
        summary = import_backup(ps.stub, backup, TIMELINE)
        assert summary.pages > 100
        durable = push_wal(ps.stub, primary.waldir, TIMELINE, summary.start_lsn, end_lsn)
        assert durable >= end_lsn - 16 * 1024 * 1024  # up to the switch record's segment end
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE)))
        assert info.last_record_lsn == durable

        compared = 0
        for relname, rmid in user_relations(primary):
            rel = rel_key(primary, relname)
            nblocks = primary.sql("SELECT pg_relation_size(%s) / 8192", (relname,))[0][0]
            size = ps.stub.RelSize(pageserver_pb2.RelSizeRequest(
                tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE),
                rel=rel, lsn=common_pb2.RequestLsn(latest=True))).nblocks
            assert size == nblocks, relname
            for blk in range(nblocks):
                ours = get_page(ps.stub, TIMELINE, rel, blk)
                theirs = _raw_page(primary, relname, blk)
                assert masked_page(ours, rmid, blk) == masked_page(theirs, rmid, blk), f"{relname} block {blk}"
                compared += 1
        assert compared > 50

        items = rel_key(primary, "items")
        for blk, page in old_pages.items():
            ours = get_page(ps.stub, TIMELINE, items, blk, lsn=old_lsn)
            assert masked_page(ours, 10, blk) == masked_page(page, 10, blk), f"items block {blk} at the old LSN"
    finally:
        ps.close()


def test_errors_map_to_status_codes(primary, tmp_path: Path, pg_base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    backup = take_base_backup(primary, pg_base_dir / f"backup-{tmp_path.name}")
    ps = RunningPageServer(tmp_path / "repo")
    try:
        summary = import_backup(ps.stub, backup, TIMELINE)
        rel = rel_key(primary, "pgbench_accounts")
        tenant = common_pb2.TenantId(id=DEFAULT_TENANT)
        tl = common_pb2.TimelineId(id=TIMELINE)

        def code(call, req):  # type: ignore[no-untyped-def]
            with pytest.raises(grpc.RpcError) as ei:
                call(req, timeout=30)
            return ei.value.code()

        key = common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=0))
        # Beyond what was ingested: waits (5 s in this server), then DEADLINE_EXCEEDED.
        assert code(ps.stub.GetPage, pageserver_pb2.GetPageRequest(
            tenant=tenant, timeline=tl, key=key, lsn=common_pb2.RequestLsn(lsn=summary.start_lsn + 10**9))) \
            == grpc.StatusCode.DEADLINE_EXCEEDED
        assert code(ps.stub.GetPage, pageserver_pb2.GetPageRequest(
            tenant=tenant, timeline=common_pb2.TimelineId(id="2" * 32), key=key,
            lsn=common_pb2.RequestLsn(latest=True))) == grpc.StatusCode.NOT_FOUND
        missing = common_pb2.RelTag(spc_oid=1663, db_oid=5, rel_number=999999, fork=0)
        assert code(ps.stub.RelSize, pageserver_pb2.RelSizeRequest(
            tenant=tenant, timeline=tl, rel=missing, lsn=common_pb2.RequestLsn(latest=True))) == grpc.StatusCode.NOT_FOUND
        assert code(ps.stub.GetPage, pageserver_pb2.GetPageRequest(
            tenant=tenant, timeline=tl, key=common_pb2.PageKey(), lsn=common_pb2.RequestLsn(latest=True))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        bad_fork = common_pb2.RelTag(spc_oid=1663, db_oid=5, rel_number=rel.rel_number, fork=9)
        assert code(ps.stub.RelExists, pageserver_pb2.RelExistsRequest(
            tenant=tenant, timeline=tl, rel=bad_fork, lsn=common_pb2.RequestLsn(latest=True))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        assert code(ps.stub.GetPage, pageserver_pb2.GetPageRequest(
            tenant=tenant, timeline=tl, key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=10**6)),
            lsn=common_pb2.RequestLsn(latest=True))) == grpc.StatusCode.NOT_FOUND
        # A CRC-bad record is rejected before anything is stored.
        from pageserver_util import record_proto

        from zctl.waldump import iter_file_records

        raw = next(r for r in iter_file_records([primary.waldir]) if r.lsn >= summary.start_lsn)
        proto = record_proto(raw)
        proto.raw = proto.raw[:-1] + bytes([proto.raw[-1] ^ 1])
        with pytest.raises(grpc.RpcError) as ei:
            list(ps.stub.Ingest(iter([pageserver_pb2.IngestRequest(tenant=tenant, timeline=tl, batch_seq=1,
                                                                    records=[proto])])))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "checksum" in (ei.value.details() or "")
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=tenant, timeline=tl))
        assert info.last_record_lsn == summary.start_lsn
        # The whole batch or nothing: a good record followed by a bad one stores neither.
        good = record_proto(raw)
        with pytest.raises(grpc.RpcError):
            list(ps.stub.Ingest(iter([pageserver_pb2.IngestRequest(tenant=tenant, timeline=tl, batch_seq=1,
                                                                    records=[good, proto])])))
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=tenant, timeline=tl))
        assert info.last_record_lsn == summary.start_lsn
        # WAL that does not continue the timeline (a record skipped: a gap) is refused, nothing stored.
        after = [r for r in iter_file_records([primary.waldir]) if r.lsn >= summary.start_lsn][:3]
        with pytest.raises(grpc.RpcError) as ei:
            list(ps.stub.Ingest(iter([pageserver_pb2.IngestRequest(
                tenant=tenant, timeline=tl, batch_seq=1, records=[record_proto(after[0]), record_proto(after[2])])])))
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "gap" in (ei.value.details() or "")
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=tenant, timeline=tl))
        assert info.last_record_lsn == summary.start_lsn
        assert len(get_page(ps.stub, TIMELINE, rel, 0)) == BLCKSZ
    finally:
        ps.close()


@pytest.fixture(scope="module")
def ingested(pg_session_factory: PgFactory, pg_base_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A repository holding an imported primary plus its WAL, and the primary still running."""
    node = pg_session_factory(autovacuum="off")
    node.execute("CREATE EXTENSION pageinspect")
    node.pgbench("-i", "-s", "1", "-q")
    tmp = tmp_path_factory.mktemp("ingested")
    backup = take_base_backup(node, pg_base_dir / f"backup-{tmp.name}")
    node.pgbench("-c", "2", "-t", "100", "-n")
    old_lsn = current_lsn(node)
    old_page = _raw_page(node, "pgbench_branches", 0)
    global QUIET_MOMENT
    QUIET_MOMENT = node.sql("SELECT clock_timestamp()::text")[0][0]
    time.sleep(0.05)
    node.pgbench("-c", "2", "-t", "100", "-n")
    end = current_lsn(node)
    repo_dir = tmp / "repo"
    ps = RunningPageServer(repo_dir)
    try:
        import_backup(ps.stub, backup, TIMELINE)
        push_wal(ps.stub, node.waldir, TIMELINE, 0, end)
    finally:
        ps.close()
    return node, repo_dir, old_lsn, old_page, end


QUIET_MOMENT = ""


def test_find_lsn_by_timestamp(ingested) -> None:  # type: ignore[no-untyped-def]
    from zctl.compute_cmds import parse_branch_point

    node, repo_dir, old_lsn, old_page, end = ingested
    ps = RunningPageServer(repo_dir)
    try:
        kind, ts = parse_branch_point(QUIET_MOMENT)
        assert kind == "timestamp"
        found = ps.stub.FindLsnByTimestamp(pageserver_pb2.FindLsnByTimestampRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE),
            timestamp_us=ts))
        assert found.lsn <= old_lsn and found.commit_timestamp_us <= ts
        # Nothing committed between that commit and the quiet moment: same page.
        rel = rel_key(node, "pgbench_branches")
        assert masked_page(get_page(ps.stub, TIMELINE, rel, 0, lsn=found.lsn), 10, 0) == masked_page(old_page, 10, 0)
        with pytest.raises(grpc.RpcError) as ei:
            ps.stub.FindLsnByTimestamp(pageserver_pb2.FindLsnByTimestampRequest(
                tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE),
                timestamp_us=0))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ps.close()


def test_restart_reopens_without_reingesting(ingested) -> None:  # type: ignore[no-untyped-def]
    node, repo_dir, old_lsn, old_page, end = ingested
    ps = RunningPageServer(repo_dir)
    try:
        info = ps.stub.GetTimeline(pageserver_pb2.GetTimelineRequest(
            tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE)))
        assert info.last_record_lsn >= end - 8192
        rel = rel_key(node, "pgbench_branches")
        ours = get_page(ps.stub, TIMELINE, rel, 0, lsn=old_lsn)
        assert masked_page(ours, 10, 0) == masked_page(old_page, 10, 0)
    finally:
        ps.close()


def test_a_crash_loses_only_the_open_layer_and_the_wal_resent_goes_on(ingested, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Ingest without a flush, then a "crash" (the repository closed without writing its open layer
    out): it reopens at its disk_consistent_lsn with the right xl_prev, takes the same WAL again
    (continuity checked against that xl_prev) and serves the primary's pages."""
    node, repo_dir, old_lsn, old_page, end = ingested
    shutil.copytree(repo_dir, tmp_path / "repo")
    node.pgbench("-c", "1", "-t", "50", "-n")
    later = current_lsn(node)
    records = [decode_record(r.data, r.lsn, r.end_lsn) for r in iter_file_records([node.waldir])
               if r.lsn >= end and r.end_lsn <= later]
    repo = Repository(tmp_path / "repo")
    tl = repo.timeline(DEFAULT_TENANT, TIMELINE)
    durable, prev = tl.disk_consistent_lsn, tl.prev_record_lsn
    assert tl.last_record_lsn == durable >= end - 8192
    todo = [r for r in records if r.end_lsn > durable]
    assert repo.ingest(tl, todo) == todo[-1].end_lsn and tl.disk_consistent_lsn == durable
    repo.close()  # no flush: the open layer is gone with the process

    repo = Repository(tmp_path / "repo")
    tl = repo.timeline(DEFAULT_TENANT, TIMELINE)
    assert (tl.last_record_lsn, tl.prev_record_lsn, tl.disk_consistent_lsn) == (durable, prev, durable)
    assert repo.ingest(tl, todo) == todo[-1].end_lsn
    repo.sync()
    assert tl.disk_consistent_lsn == todo[-1].end_lsn
    rel = rel_key(node, "pgbench_branches")
    page, _ = repo.get_page(tl, rel_page_key(rel.spc_oid, rel.db_oid, rel.rel_number, 0, 0), later)
    assert masked_page(page, 10, 0) == masked_page(_raw_page(node, "pgbench_branches", 0), 10, 0)
    repo.close()


def test_a_second_page_server_on_one_repository_is_refused(tmp_path: Path) -> None:
    first = Repository(tmp_path / "repo")
    with pytest.raises(RepositoryError, match=rf"in use by another page server \(pid {os.getpid()}\)"):
        Repository(tmp_path / "repo")
    proc = subprocess.run([sys.executable, "-m", "services.pageserver.main", "--repo", str(tmp_path / "repo"),
                           "--listen", "127.0.0.1:0", "--insecure"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "in use by another page server" in proc.stderr, proc.stderr[-2000:]
    first.close()
    Repository(tmp_path / "repo").close()  # the lock went with the first


def test_an_import_does_not_hold_up_other_timelines(tmp_path: Path) -> None:
    """Each timeline has its own ingest lock: while one imports, another ingests and changes writer."""
    repo = Repository(tmp_path / "repo")
    repo.ensure_tenant()
    importing = repo.create_timeline(DEFAULT_TENANT, "a" * 32)
    other = repo.create_timeline(DEFAULT_TENANT, "b" * 32, start_lsn=0x1000000)
    done = threading.Event()

    def meanwhile() -> None:
        repo.ingest(other, [])
        repo.claim_timeline(other, WRITER_PRIMARY, "primary")
        done.set()

    with repo.import_transaction(importing, 0x2000000, 0, 1, 15):
        worker = threading.Thread(target=meanwhile)
        worker.start()
        assert done.wait(10), "ingest of another timeline waited for the import"
    worker.join()
    assert other.writer_epoch == 1 and importing.last_record_lsn == 0x2000000
    repo.close()


def test_getpages_stream_matches_unary_and_reports_item_errors(ingested) -> None:  # type: ignore[no-untyped-def]
    node, repo_dir, old_lsn, old_page, end = ingested
    ps = RunningPageServer(repo_dir)
    try:
        rel = rel_key(node, "pgbench_accounts")
        nblocks = node.sql("SELECT pg_relation_size('pgbench_accounts') / 8192")[0][0]
        tenant, tl = common_pb2.TenantId(id=DEFAULT_TENANT), common_pb2.TimelineId(id=TIMELINE)

        def batches():  # type: ignore[no-untyped-def]
            for start in range(0, nblocks + 1, 32):
                items = [pageserver_pb2.PageRequestItem(
                    request_id=blk, key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=blk)),
                    lsn=common_pb2.RequestLsn(latest=True)) for blk in range(start, min(start + 32, nblocks + 1))]
                yield pageserver_pb2.GetPagesRequest(tenant=tenant, timeline=tl, pages=items)

        got = {}
        errors = {}
        for resp in ps.stub.GetPages(batches()):
            for item in resp.pages:
                if item.WhichOneof("result") == "page":
                    got[item.request_id] = item.page.page
                else:
                    errors[item.request_id] = item.error
        assert sorted(got) == list(range(nblocks))
        assert list(errors) == [nblocks]  # one past the end: an item error, the stream goes on
        assert errors[nblocks].code == grpc.StatusCode.NOT_FOUND.value[0]
        for blk in (0, nblocks // 2, nblocks - 1):
            assert got[blk] == get_page(ps.stub, TIMELINE, rel, blk)
    finally:
        ps.close()


def test_branch_reads_parent_pages_as_of_branch_point(ingested) -> None:  # type: ignore[no-untyped-def]
    node, repo_dir, old_lsn, old_page, end = ingested
    ps = RunningPageServer(repo_dir)
    try:
        tenant = common_pb2.TenantId(id=DEFAULT_TENANT)
        child = "33333333333333333333333333333333"
        import time

        t0 = time.perf_counter()
        info = ps.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=tenant, new_timeline=common_pb2.TimelineId(id=child),
            ancestor_timeline=common_pb2.TimelineId(id=TIMELINE), ancestor_lsn=old_lsn, name="old"))
        assert time.perf_counter() - t0 < 1.0
        assert info.ancestor_lsn == old_lsn and info.last_record_lsn == old_lsn and info.name == "old"
        rel = rel_key(node, "pgbench_branches")
        ours = get_page(ps.stub, child, rel, 0)  # latest on the child = the branch point
        assert masked_page(ours, 10, 0) == masked_page(old_page, 10, 0)
        # Branching beyond the parent's last record is a clear error.
        with pytest.raises(grpc.RpcError) as ei:
            ps.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
                tenant=tenant, new_timeline=common_pb2.TimelineId(id="4" * 32),
                ancestor_timeline=common_pb2.TimelineId(id=TIMELINE), ancestor_lsn=end + 10**9))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "beyond the last record" in (ei.value.details() or "")
    finally:
        ps.close()


def test_truncation_clears_visibility_map_bits_past_the_new_end(primary, tmp_path: Path, pg_base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """VACUUM truncating a heap clears VM bits without WAL-logging the VM page (smgr_redo)."""
    backup = take_base_backup(primary, pg_base_dir / f"backup-{tmp_path.name}")
    primary.execute("CREATE TABLE shrink (id int, pad text)")
    primary.execute("INSERT INTO shrink SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g")
    primary.sql("VACUUM shrink")  # every page all-visible: VM bits set
    primary.execute("DELETE FROM shrink WHERE id > 1000")
    primary.sql("VACUUM shrink")  # truncates the heap: XLOG_SMGR_TRUNCATE with SMGR_TRUNCATE_VM
    heap_blocks = primary.sql("SELECT pg_relation_size('shrink') / 8192")[0][0]
    assert 0 < heap_blocks % 4  # the cut lands inside a VM byte: the partial-byte rule is exercised
    primary.sql("SELECT pg_switch_wal()")
    end = current_lsn(primary)
    ps = RunningPageServer(tmp_path / "repo")
    try:
        import_backup(ps.stub, backup, TIMELINE)
        push_wal(ps.stub, primary.waldir, TIMELINE, 0, end)
        rel = rel_key(primary, "shrink")
        vm = common_pb2.RelTag(spc_oid=rel.spc_oid, db_oid=rel.db_oid, rel_number=rel.rel_number, fork=2)
        ours = get_page(ps.stub, TIMELINE, vm, 0)
        theirs = bytes(primary.sql("SELECT get_raw_page('shrink', 'vm', 0)")[0][0])
        assert ours[24:] == theirs[24:]  # the map itself, byte for byte
        assert any(ours[24:]) and not any(ours[24 + heap_blocks // 4 + 1:])
    finally:
        ps.close()


def test_truncation_cuts_the_free_space_map(primary, tmp_path: Path, pg_base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """VACUUM truncating a heap cuts the FSM fork and clears the kept last page's tail (smgr_redo).

    The FSM is not WAL-logged: the page server's copy is what the base backup
    had, and only the truncation's implied changes move it. The table's FSM is
    imported with two bottom-level pages; the cut falls inside the first one.
    """
    create_fsm_table(primary, "spacious")
    backup = take_base_backup(primary, pg_base_dir / f"backup-{tmp_path.name}")
    truncate_fsm_table(primary, "spacious")
    theirs = raw_fsm_pages(primary, "spacious")
    primary.sql("SELECT pg_switch_wal()")
    end = current_lsn(primary)
    ps = RunningPageServer(tmp_path / "repo")
    try:
        import_backup(ps.stub, backup, TIMELINE)
        rel = rel_key(primary, "spacious")
        fsm = common_pb2.RelTag(spc_oid=rel.spc_oid, db_oid=rel.db_oid, rel_number=rel.rel_number, fork=1)

        def fsm_size() -> int:
            return int(ps.stub.RelSize(pageserver_pb2.RelSizeRequest(
                tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE),
                rel=fsm, lsn=common_pb2.RequestLsn(latest=True))).nblocks)

        assert fsm_size() == 4
        leaf = 2  # the bottom-level page of heap blocks 0..4068
        assert any(fsm_slots(get_page(ps.stub, TIMELINE, fsm, leaf))[FSM_TABLE_KEEP:])  # imported, before the cut
        push_wal(ps.stub, primary.waldir, TIMELINE, 0, end)
        assert fsm_size() == len(theirs) == 3
        ours = [get_page(ps.stub, TIMELINE, fsm, blk) for blk in range(3)]
        assert not any(fsm_slots(ours[leaf])[FSM_TABLE_KEEP:])
        # The whole tree of each page equals the primary's (see test_fsm.py for why the primary,
        # whose VACUUM leaves the kept slots alone, is the oracle for the page server's copy).
        for blk in range(3):
            assert fsm_nodes(ours[blk]) == fsm_nodes(theirs[blk]), blk
    finally:
        ps.close()


@pytest.mark.parametrize("strategy", ["file_copy", "wal_log"])
def test_create_database_strategies(primary, tmp_path: Path, pg_base_dir: Path, strategy: str) -> None:  # type: ignore[no-untyped-def]
    """CREATE DATABASE: FILE_COPY copies the template's pages at the record, WAL_LOG logs them."""
    backup = take_base_backup(primary, pg_base_dir / f"backup-{tmp_path.name}")
    primary.sql(f"CREATE DATABASE copied STRATEGY = {strategy}")
    primary.execute("CREATE EXTENSION pageinspect", dbname="copied")
    primary.sql("SELECT pg_switch_wal()")
    end = current_lsn(primary)
    ps = RunningPageServer(tmp_path / "repo")
    try:
        import_backup(ps.stub, backup, TIMELINE)
        push_wal(ps.stub, primary.waldir, TIMELINE, 0, end)
        dboid = primary.sql("SELECT oid FROM pg_database WHERE datname = 'copied'")[0][0]
        compared = 0
        for relname in ("pg_class", "pg_attribute", "pg_proc", "pg_class_oid_index"):
            filenode = primary.sql("SELECT pg_relation_filenode(%s)", (relname,), dbname="copied")[0][0]
            rel = common_pb2.RelTag(spc_oid=1663, db_oid=dboid, rel_number=filenode, fork=0)
            nblocks = primary.sql("SELECT pg_relation_size(%s) / 8192", (relname,), dbname="copied")[0][0]
            rmid = 11 if relname.endswith("_index") else 10
            for blk in range(0, nblocks, max(1, nblocks // 4)):
                ours = get_page(ps.stub, TIMELINE, rel, blk)
                theirs = bytes(primary.sql("SELECT get_raw_page(%s, %s)", (relname, blk), dbname="copied")[0][0])
                assert masked_page(ours, rmid, blk) == masked_page(theirs, rmid, blk), f"{relname} block {blk}"
                compared += 1
        assert compared >= 8
    finally:
        ps.close()
