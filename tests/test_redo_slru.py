"""SLRU redo against the SLRU files of a real primary, byte for byte.

A primary with track_commit_timestamp = on and prepared transactions enabled
runs commits, aborts, subtransactions (SAVEPOINT / ROLLBACK TO, PL/pgSQL
exception blocks: 40000 of them, so the clog and many commit_ts pages are
zeroed by WAL), two-phase commit and abort, a commit with a replication origin,
concurrent row locks that create multixacts (enough to fill more than one
offsets page and several members pages), and a database-wide VACUUM FREEZE
that truncates pg_commit_ts and logs a multixact truncation. Then it
checkpoints and stops cleanly, so every SLRU page is on disk.

The SLRU directories copied right after the first start (and a checkpoint)
are the base: initdb creates the first pages of pg_xact, pg_multixact and
pg_commit_ts without WAL. Every page the WAL touched is rebuilt by replaying
all records from the start of WAL: from zeroes at the last ZEROPAGE record of
that page, else from the base copy. The rebuilt page must equal the page in
the stopped server's files exactly; pages nobody touched must still equal the
base; segments the truncation records remove must be gone.

There is no legitimate difference to tolerate: clog holds only 2-bit
statuses and both the primary and redo write the final status of every
transaction tree (SUB_COMMITTED is never left behind by a finished commit);
a transaction still in progress (the prepared transaction left open) is 0
on both sides.
"""

from __future__ import annotations

import datetime as dt
import shutil
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import PgFactory

from pgformat.constants import BLCKSZ
from pgformat.rmgr import (
    CLOG_TRUNCATE,
    CLOG_ZEROPAGE,
    COMMIT_TS_TRUNCATE,
    COMMIT_TS_ZEROPAGE,
    RM_CLOG_ID,
    RM_COMMIT_TS_ID,
    RM_MULTIXACT_ID,
    RM_XACT_ID,
    XLOG_MULTIXACT_CREATE_ID,
    XLOG_MULTIXACT_TRUNCATE_ID,
    XLOG_MULTIXACT_ZERO_MEM_PAGE,
    XLOG_MULTIXACT_ZERO_OFF_PAGE,
    XLOG_XACT_ABORT,
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
)
from pgformat.xlogrecord import DecodedRecord, XLogRecordHeader
from pgredo.errors import RedoFailedError, UnsupportedRecordError
from pgredo.slru import (
    CLOG_XACTS_PER_PAGE,
    SLRU_PAGES_PER_SEGMENT,
    TRANSACTION_STATUS_ABORTED,
    TRANSACTION_STATUS_COMMITTED,
    TRANSACTION_STATUS_IN_PROGRESS,
    SlruKind,
    SlruPageTag,
    clog_get_status,
    clog_page_for_xid,
    commit_ts_get_entry,
    commit_ts_page_for_xid,
    multixact_get_member,
    multixact_get_offset,
    multixact_members_page_for_offset,
    multixact_offsets_page_for_multi,
    parse_multixact_create,
    slru_record_will_init,
    slru_redo,
    slru_redo_page,
    slru_segments_to_delete,
    slru_tags_for_record,
    slru_truncations,
    track_commit_timestamp_change,
    xact_completion,
)
from zctl.postgres import PostgresNode
from zctl.waldump import iter_file_records

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
ORIGIN_TIME = dt.datetime(2021, 6, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SLRU_KINDS = tuple(SlruKind)


@dataclass
class Outcome:
    """Xids the workload knows the fate of, read back from the server before it stops."""

    committed: list[int] = field(default_factory=list)
    aborted: list[int] = field(default_factory=list)
    in_progress: list[int] = field(default_factory=list)
    commit_ts: dict[int, dt.datetime] = field(default_factory=dict)
    origin_xid: int = 0
    origin_id: int = 0


@dataclass
class Run:
    datadir: Path
    base: Path
    records: list[DecodedRecord]
    outcome: Outcome


def _xid(conn: object) -> int:
    return int(conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0])  # type: ignore[attr-defined]


def _workload(node: PostgresNode) -> Outcome:
    out = Outcome()
    node.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    node.execute("CREATE TABLE m (id int PRIMARY KEY, v int)")
    node.execute("INSERT INTO m SELECT i, 0 FROM generate_series(1, 3000) i")
    node.execute("CREATE TABLE many (i int)")

    with node.connect() as c:
        # Plain commit and abort.
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (1, 1)")
        out.committed.append(_xid(c))
        c.execute("COMMIT")
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (2, 2)")
        out.aborted.append(_xid(c))
        c.execute("ROLLBACK")
        # Subtransactions: one rolled back, one released, then commit.
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (3, 3)")
        out.committed.append(_xid(c))
        c.execute("SAVEPOINT a")
        c.execute("INSERT INTO t VALUES (4, 4)")
        c.execute("ROLLBACK TO a")
        c.execute("SAVEPOINT b")
        c.execute("INSERT INTO t VALUES (5, 5)")
        c.execute("RELEASE b")
        c.execute("COMMIT")
        # A top-level abort with a subtransaction under it.
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (6, 6)")
        out.aborted.append(_xid(c))
        c.execute("SAVEPOINT s")
        c.execute("INSERT INTO t VALUES (7, 7)")
        c.execute("ROLLBACK")
        # Two-phase commit and abort, with subtransactions.
        for gid, finish in (("c1", "COMMIT PREPARED"), ("a1", "ROLLBACK PREPARED")):
            c.execute("BEGIN")
            c.execute("INSERT INTO t VALUES (%s, 0)", (10 + len(out.committed) + len(out.aborted),))
            xid = _xid(c)
            c.execute("SAVEPOINT s")
            c.execute("INSERT INTO t VALUES (%s, 0)", (100 + len(out.committed) + len(out.aborted),))
            c.execute(f"PREPARE TRANSACTION '{gid}'")
            c.execute(f"{finish} '{gid}'")
            (out.committed if finish.startswith("COMMIT") else out.aborted).append(xid)

    # 40000 subtransactions in one transaction, every 100th rolled back: xids
    # cross clog page 1 and ~50 commit_ts pages.
    node.execute(
        """DO $$ BEGIN
             FOR i IN 1..40000 LOOP
               BEGIN
                 INSERT INTO many VALUES (i);
                 IF i % 100 = 0 THEN RAISE EXCEPTION 'roll back %', i; END IF;
               EXCEPTION WHEN raise_exception THEN NULL;
               END;
             END LOOP;
           END $$"""
    )

    # Multixacts. A share-locks rows 11..; D then locks each of rows 21..3000
    # in its own subtransaction (an exception block): a distinct member set
    # each time, so a new multixact per row -- more than one offsets page and
    # several members pages. B and C join A on a few rows; C key-share locks
    # rows 1..10, on which E takes FOR NO KEY UPDATE (6..10) and updates (1..5);
    # F upgrades its own key-share lock in a subtransaction.
    conns = [node.connect() for _ in range(6)]
    a, b, cc, d, e, f = conns
    try:
        for conn in conns:
            conn.execute("BEGIN")
        a.execute("SELECT id FROM m WHERE id > 10 FOR SHARE").fetchall()
        b.execute("SELECT id FROM m WHERE id BETWEEN 11 AND 20 FOR SHARE").fetchall()
        cc.execute("SELECT id FROM m WHERE id BETWEEN 11 AND 15 FOR KEY SHARE").fetchall()
        cc.execute("SELECT id FROM m WHERE id <= 10 FOR KEY SHARE").fetchall()
        e.execute("SELECT id FROM m WHERE id BETWEEN 6 AND 10 FOR NO KEY UPDATE").fetchall()
        e.execute("UPDATE m SET v = v + 1 WHERE id <= 5")
        d.execute(
            """DO $$ BEGIN
                 FOR i IN 21..3000 LOOP
                   BEGIN
                     IF i <= 2610 THEN PERFORM 1 FROM m WHERE id = i FOR SHARE;
                     ELSE PERFORM 1 FROM m WHERE id = i FOR KEY SHARE;
                     END IF;
                   EXCEPTION WHEN others THEN NULL;
                   END;
                 END LOOP;
               END $$"""
        )
        f.execute("INSERT INTO t VALUES (500, 0), (501, 0)")
        f.execute("SELECT * FROM t WHERE id IN (500, 501) FOR KEY SHARE").fetchall()
        f.execute("SAVEPOINT up")
        f.execute("SELECT * FROM t WHERE id = 500 FOR UPDATE").fetchall()
        f.execute("DELETE FROM t WHERE id = 501")
        f.execute("RELEASE up")
        for conn in conns:
            out.committed.append(_xid(conn))
            conn.execute("COMMIT")
    finally:
        for conn in conns:
            conn.close()

    # A commit carrying a replication origin: its commit timestamp is the origin's.
    out.origin_id = int(node.sql("SELECT pg_replication_origin_create('slru_test')")[0][0])
    with node.connect() as c:
        c.execute("SELECT pg_replication_origin_session_setup('slru_test')")
        c.execute("BEGIN")
        c.execute("SELECT pg_replication_origin_xact_setup('0/12345678', %s)", (ORIGIN_TIME,))
        c.execute("INSERT INTO t VALUES (1000, 0)")
        out.origin_xid = _xid(c)
        c.execute("COMMIT")
        c.execute("SELECT pg_replication_origin_session_reset()")
    out.committed.append(out.origin_xid)

    # Commit timestamps as the server reports them (before the freeze truncates them away).
    for xid in out.committed:
        ts = node.sql("SELECT pg_xact_commit_timestamp(%s::text::xid)", (str(xid),))[0][0]
        if ts is not None:
            out.commit_ts[xid] = ts

    # Freeze every database: pg_commit_ts segment 0 goes, multixacts are truncated.
    node.sql("UPDATE pg_database SET datallowconn = true WHERE datname = 'template0'")
    for db in ("template0", "template1", "postgres"):
        node.sql("VACUUM FREEZE", dbname=db)
    node.sql("UPDATE pg_database SET datallowconn = false WHERE datname = 'template0'")

    # Left prepared at shutdown: in progress on both sides.
    with node.connect() as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (2000, 0)")
        out.in_progress.append(_xid(c))
        c.execute("PREPARE TRANSACTION 'dangling'")

    return out


@pytest.fixture(scope="module")
def run(pg_session_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory) -> Run:
    node = pg_session_factory(track_commit_timestamp=True, max_prepared_transactions=5, autovacuum=False)
    node.execute("CHECKPOINT")
    base = tmp_path_factory.mktemp("slru-base")
    for kind in SLRU_KINDS:
        shutil.copytree(node.datadir / kind.dirname, base / kind.dirname)
    outcome = _workload(node)
    node.execute("CHECKPOINT")
    node.stop(mode="fast")
    records = [raw.decode() for raw in iter_file_records([node.waldir])]
    return Run(node.datadir, base, records, outcome)


def _read_page(root: Path, tag: SlruPageTag) -> bytes | None:
    path = root / tag.path
    if not path.exists():
        return None
    with path.open("rb") as f:
        f.seek(tag.file_offset)
        page = f.read(BLCKSZ)
    return page if len(page) == BLCKSZ else None


def _segments(root: Path, kind: SlruKind) -> set[int]:
    d = root / kind.dirname
    return {int(p.name, 16) for p in d.iterdir() if p.is_file()} if d.exists() else set()


@dataclass
class Replay:
    history: dict[SlruPageTag, list[DecodedRecord]]
    deleted: dict[SlruKind, set[int]]
    commit_ts_switched_on: bool


def _replay(run: Run) -> Replay:
    """File every record under the pages it changes; simulate the truncations on the final segment sets."""
    history: dict[SlruPageTag, list[DecodedRecord]] = defaultdict(list)
    track = False  # initdb leaves track_commit_timestamp off in pg_control
    switched_on = False
    existing = {k: _segments(run.base, k) for k in SLRU_KINDS}
    deleted: dict[SlruKind, set[int]] = {k: set() for k in SLRU_KINDS}
    for rec in run.records:
        change = track_commit_timestamp_change(rec)
        if change is not None:
            switched_on |= change and not track
            track = change
        for tag in slru_tags_for_record(rec, track_commit_ts=track):
            history[tag].append(rec)
            existing[tag.kind].add(tag.segno)
        for trunc in slru_truncations(rec):
            gone = slru_segments_to_delete(trunc, existing[trunc.kind])
            existing[trunc.kind] -= set(gone)
            deleted[trunc.kind] |= set(gone)
    return Replay(history, deleted, switched_on)


def test_workload_wrote_every_slru_record_type(run: Run) -> None:
    assert run.records[0].prev == 0, "replay must start at the first record of the cluster (initdb's)"
    seen = {(r.rmid, r.info & (XLOG_XACT_OPMASK if r.rmid == RM_XACT_ID else 0xF0)) for r in run.records}
    expected = {
        (RM_XACT_ID, XLOG_XACT_COMMIT), (RM_XACT_ID, XLOG_XACT_ABORT),
        (RM_XACT_ID, XLOG_XACT_COMMIT_PREPARED), (RM_XACT_ID, XLOG_XACT_ABORT_PREPARED),
        (RM_CLOG_ID, CLOG_ZEROPAGE),
        (RM_MULTIXACT_ID, XLOG_MULTIXACT_ZERO_OFF_PAGE), (RM_MULTIXACT_ID, XLOG_MULTIXACT_ZERO_MEM_PAGE),
        (RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID), (RM_MULTIXACT_ID, XLOG_MULTIXACT_TRUNCATE_ID),
        (RM_COMMIT_TS_ID, COMMIT_TS_ZEROPAGE), (RM_COMMIT_TS_ID, COMMIT_TS_TRUNCATE),
    }
    assert expected <= seen, expected - seen
    # Statuses beyond COMMITTED / ABORTED, commit with origin, many members.
    creates = [parse_multixact_create(r) for r in run.records
               if r.rmid == RM_MULTIXACT_ID and r.info & 0xF0 == XLOG_MULTIXACT_CREATE_ID]
    assert len(creates) > 2048
    assert {s for c in creates for _, s in c.members} == {0, 1, 2, 3, 4, 5}
    assert any(len(c.members) >= 3 for c in creates)


def test_slru_pages_match_data_directory(run: Run) -> None:
    replay = _replay(run)
    assert replay.commit_ts_switched_on
    kinds_checked: dict[SlruKind, int] = defaultdict(int)
    zero_started = 0
    gone = 0
    mismatches: list[str] = []
    for tag, recs in sorted(replay.history.items()):
        start = max((i for i, r in enumerate(recs) if slru_record_will_init(tag, r)), default=None)
        if start is None:
            base = _read_page(run.base, tag)
        else:
            base, recs = None, recs[start:]
            zero_started += 1
        ours = slru_redo_page(tag, base, recs)
        theirs = _read_page(run.datadir, tag)
        if theirs is None:
            assert tag.segno in replay.deleted[tag.kind], f"{tag} is missing but no truncation removed it"
            gone += 1
            continue
        assert tag.segno not in replay.deleted[tag.kind], f"{tag} should have been truncated away"
        kinds_checked[tag.kind] += 1
        if ours != theirs:
            first = next(i for i in range(BLCKSZ) if ours[i] != theirs[i])
            mismatches.append(f"{tag}: first difference at byte {first}: ours {ours[first]:#x} file {theirs[first]:#x}")
    assert not mismatches, mismatches[:20]
    assert kinds_checked[SlruKind.CLOG] >= 2
    assert kinds_checked[SlruKind.MULTIXACT_OFFSETS] >= 2
    assert kinds_checked[SlruKind.MULTIXACT_MEMBERS] >= 4
    assert kinds_checked[SlruKind.COMMIT_TS] >= 15
    assert zero_started >= 20
    assert gone >= 1 and replay.deleted[SlruKind.COMMIT_TS] == {0}


def test_untouched_pages_and_segments_are_as_before(run: Run) -> None:
    """Pages no record changed are byte for byte the base; no segment appears or vanishes unexplained."""
    replay = _replay(run)
    touched = set(replay.history)
    for kind in SLRU_KINDS:
        final = _segments(run.datadir, kind)
        expected = (_segments(run.base, kind) | {t.segno for t in touched if t.kind == kind}) - replay.deleted[kind]
        assert final == expected, kind
        for segno in final:
            size = (run.datadir / f"{kind.dirname}/{segno:04X}").stat().st_size
            assert size % BLCKSZ == 0
            for pageno in range(size // BLCKSZ):
                tag = SlruPageTag(kind, segno, pageno)
                if tag not in touched:
                    assert _read_page(run.datadir, tag) == _read_page(run.base, tag), tag


def test_statuses_and_timestamps_agree_with_the_server(run: Run) -> None:
    """Decode our pages: the fates and commit timestamps the server reported."""
    replay = _replay(run)
    cache: dict[SlruPageTag, bytes] = {}

    def page(tag: SlruPageTag) -> bytes:
        if tag not in cache:
            recs = replay.history.get(tag, [])
            start = max((i for i, r in enumerate(recs) if slru_record_will_init(tag, r)), default=None)
            base = _read_page(run.base, tag) if start is None else None
            cache[tag] = bytes(slru_redo_page(tag, base, recs[start or 0 :])) if recs else base or bytes(BLCKSZ)
        return cache[tag]

    out = run.outcome
    for xids, status in ((out.committed, TRANSACTION_STATUS_COMMITTED), (out.aborted, TRANSACTION_STATUS_ABORTED),
                         (out.in_progress, TRANSACTION_STATUS_IN_PROGRESS)):
        for xid in xids:
            tag = SlruPageTag(SlruKind.CLOG, *clog_page_for_xid(xid))
            assert clog_get_status(page(tag), xid) == status, (xid, status)
    assert len(out.commit_ts) == len(out.committed)
    for xid, ts in out.commit_ts.items():
        tag = SlruPageTag(SlruKind.COMMIT_TS, *commit_ts_page_for_xid(xid))
        if tag.segno in replay.deleted[SlruKind.COMMIT_TS]:
            continue
        micros, nodeid = commit_ts_get_entry(page(tag), xid)
        assert PG_EPOCH + dt.timedelta(microseconds=micros) == ts, xid
        assert nodeid == (out.origin_id if xid == out.origin_xid else 0)
    assert out.commit_ts[out.origin_xid] == ORIGIN_TIME

    # Every subtransaction of the 40000-exception-block transaction: committed but every 100th.
    big = max((c for r in run.records if (c := xact_completion(r)) is not None), key=lambda c: len(c.subxacts))
    assert big.committed and len(big.subxacts) == 40000 - 400
    last_page_xid = max(big.subxacts)
    assert last_page_xid >= CLOG_XACTS_PER_PAGE
    for xid in big.xids:
        tag = SlruPageTag(SlruKind.CLOG, *clog_page_for_xid(xid))
        assert clog_get_status(page(tag), xid) == TRANSACTION_STATUS_COMMITTED

    # Multixact members read back through offsets.
    creates = [parse_multixact_create(r) for r in run.records
               if r.rmid == RM_MULTIXACT_ID and r.info & 0xF0 == XLOG_MULTIXACT_CREATE_ID]
    for c in creates[:: max(1, len(creates) // 200)]:
        off_tag = SlruPageTag(SlruKind.MULTIXACT_OFFSETS, *multixact_offsets_page_for_multi(c.mid))
        assert multixact_get_offset(page(off_tag), c.mid) == c.moff
        nxt_tag = SlruPageTag(SlruKind.MULTIXACT_OFFSETS, *multixact_offsets_page_for_multi(c.next_multi))
        assert multixact_get_offset(page(nxt_tag), c.next_multi) == c.next_offset
        for off, member in zip(c.member_offsets(), c.members):
            mem_tag = SlruPageTag(SlruKind.MULTIXACT_MEMBERS, *multixact_members_page_for_offset(off))
            assert multixact_get_member(page(mem_tag), off) == member


def test_tags_are_consistent(run: Run) -> None:
    """Every tag a record reports is one it changes, and page numbering round-trips."""
    for rec in run.records[-3000:]:
        for tag in slru_tags_for_record(rec):
            assert 0 <= tag.pageno < SLRU_PAGES_PER_SEGMENT
            assert SlruPageTag.for_page(tag.kind, tag.abs_pageno) == tag
            slru_redo_page(tag, bytes(BLCKSZ), [rec])  # raises if the record does not change it


def _synthetic(rmid: int, info: int, data: bytes) -> DecodedRecord:
    return DecodedRecord(0x2000000, 0x2000040, XLogRecordHeader(24 + len(data), 0, 0, info, rmid, 0), [], data)


def test_clog_truncate_removes_whole_segments_before_the_cutoff() -> None:
    """CLOG TRUNCATE needs a million xids to happen for real; check SimpleLruTruncate's rule directly."""
    rec = _synthetic(RM_CLOG_ID, CLOG_TRUNCATE, struct.pack("<iII", 2 * SLRU_PAGES_PER_SEGMENT + 5, 0, 1))
    assert slru_tags_for_record(rec) == []
    (trunc,) = slru_truncations(rec)
    assert trunc.kind == SlruKind.CLOG
    assert slru_segments_to_delete(trunc, [0, 1, 2, 3]) == [0, 1]
    # PagePrecedes compares xids modulo 2^32: the last segment (just before
    # xid wraparound) is older than the cutoff; one less than 2^31 xids
    # ahead of it is newer and stays.
    last_seg = (0xFFFFFFFF // CLOG_XACTS_PER_PAGE) // SLRU_PAGES_PER_SEGMENT
    assert slru_segments_to_delete(trunc, [last_seg]) == [last_seg]
    ahead = (0x80000000 // CLOG_XACTS_PER_PAGE) // SLRU_PAGES_PER_SEGMENT - 5
    assert slru_segments_to_delete(trunc, [ahead]) == []
    with pytest.raises(RedoFailedError):
        slru_redo(SlruPageTag(SlruKind.CLOG, 0, 0), bytearray(BLCKSZ), rec)


def test_zeropage_and_unknown_records() -> None:
    rec = _synthetic(RM_CLOG_ID, CLOG_ZEROPAGE, struct.pack("<i", 33))
    tag = SlruPageTag(SlruKind.CLOG, 1, 1)
    assert slru_tags_for_record(rec) == [tag]
    assert slru_record_will_init(tag, rec)
    assert slru_redo(tag, bytearray(b"\xff" * BLCKSZ), rec) == bytes(BLCKSZ)
    with pytest.raises(RedoFailedError):
        slru_redo(SlruPageTag(SlruKind.CLOG, 1, 2), bytearray(BLCKSZ), rec)
    with pytest.raises(UnsupportedRecordError):
        slru_tags_for_record(_synthetic(RM_CLOG_ID, 0x70, struct.pack("<i", 1)))
