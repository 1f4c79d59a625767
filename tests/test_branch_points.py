"""Branches at any LSN: the requested point resolves to a record boundary, and a writable compute on it commits.

pg_waldump is the oracle for where records end: from each record's start and
total length it gives, `record_end` walks the WAL pages the way xlogreader.c
does (page headers, MAXALIGN, XLOG_SWITCH running to its segment's end). A
branch requested at LSN X must start at the end of the last record that ends
at or before X; a compute on it must commit within seconds and see exactly
the rows whose commit records end at or before that point.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from test_computes import Cluster, cluster  # noqa: F401  (the fixture)
from zctl_util import service_channel

from pgformat.lsn import format_lsn, parse_lsn
from zctl.postgres import free_port, pg_bindir
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

XLOG_BLCKSZ = 8192
SEG_SIZE = 16 << 20
TENANT = common_pb2.TenantId(id="0" * 32)

_WALDUMP_LINE = re.compile(
    r"rmgr: (\S+)\s+len \(rec/tot\):\s+\d+/\s*(\d+), tx:\s+(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F/]+, "
    r"desc: (\S+)")


@dataclass(frozen=True)
class Record:
    start: int
    end: int  # EndRecPtr
    rmgr: str
    xid: int
    desc: str


def record_end(start: int, tot_len: int, is_switch: bool) -> int:
    """EndRecPtr of a record of `tot_len` bytes at `start`, crossing page headers as xlogreader.c does."""
    if is_switch:
        return (start // SEG_SIZE + 1) * SEG_SIZE
    pos, left = start, tot_len
    while left:
        if pos % XLOG_BLCKSZ == 0:
            pos += 40 if pos % SEG_SIZE == 0 else 24
        take = min(left, XLOG_BLCKSZ - pos % XLOG_BLCKSZ)
        pos += take
        left -= take
    return (pos + 7) & ~7


def waldump(waldir: Path, start: int, end: int) -> list[Record]:
    out = subprocess.run([str(pg_bindir() / "pg_waldump"), "-p", str(waldir), "-s", format_lsn(start),
                          "-e", format_lsn(end)], capture_output=True, text=True, check=False)
    records = []
    for line in out.stdout.splitlines():
        m = _WALDUMP_LINE.match(line)
        assert m, f"unexpected pg_waldump line: {line}"
        rmgr, tot, xid, lsn, desc = m.groups()
        rec_start = parse_lsn(lsn)
        records.append(Record(rec_start, record_end(rec_start, int(tot), rmgr == "XLOG" and desc == "SWITCH"),
                              rmgr, int(xid), desc))
    assert records, f"pg_waldump found no records: {out.stderr}"
    return records


def resolved(records: list[Record], lsn: int) -> int:
    return max(r.end for r in records if r.end <= lsn)


def rows_at(records: list[Record], xids: dict[int, int], lsn: int) -> list[int]:
    """Ids of the rows whose transaction's commit record ends at or before `lsn`."""
    commit_end = {r.xid: r.end for r in records if r.rmgr == "Transaction" and r.desc == "COMMIT"}
    return sorted(i for i, x in xids.items() if commit_end[x] <= lsn)


class Branches:
    """Branches made through the page server's gRPC API (thousands: zctl's start-up would dominate)."""

    def __init__(self, c: Cluster) -> None:
        self.channel = service_channel(c.repo, "pageserver")
        self.stub = pageserver_pb2_grpc.PageServerStub(self.channel)

    def timeline(self, name: str) -> pageserver_pb2.TimelineInfo:
        for t in self.stub.ListTimelines(pageserver_pb2.ListTimelinesRequest(tenant=TENANT)).timelines:
            if t.name == name or t.timeline.id == name:
                return t
        raise AssertionError(f"no timeline {name}")

    def create(self, parent: str, lsn: int) -> pageserver_pb2.TimelineInfo:
        return self.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=TENANT, new_timeline=common_pb2.TimelineId(id=uuid.uuid4().hex),
            ancestor_timeline=common_pb2.TimelineId(id=parent), ancestor_lsn=lsn))


def commit_on(c: Cluster, branch: str, name: str, new_id: int) -> list[int]:
    """Start a writable compute on `branch`, commit one row (it must return within seconds), stop it;
    the ids it saw after its commit."""
    c.zctl("pg", "create", name, "--branch", branch, "--port", str(free_port()))
    c.zctl("pg", "start", name)
    try:
        with c.conn(name) as conn:
            conn.execute("SET statement_timeout = '20s'")
            conn.execute("INSERT INTO t (id, v) VALUES (%s, 'fork')", (new_id,))
            return [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id").fetchall()]
    finally:
        c.zctl("pg", "stop", name)


def test_branch_at_every_offset(cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    main_tl = Branches(c).timeline("main").timeline.id
    waldir = c.repo / "computes" / "main" / "pgdata" / "pg_wal"
    c.sql("main", "CREATE TABLE t (id int PRIMARY KEY, v text, x bigint DEFAULT txid_current())")
    c.sql("main", "ALTER TABLE t ALTER COLUMN v SET STORAGE PLAIN")  # one big record per big row
    begin = c.lsn("main")
    for i in (1, 2):
        c.sql("main", f"INSERT INTO t (id, v) VALUES ({i}, 'small')")
    # Rows near the page size: their insert records run across WAL page boundaries.
    for i in (3, 4, 5):
        c.sql("main", f"INSERT INTO t (id, v) VALUES ({i}, repeat(md5('{i}'), 250))")
    c.sql("main", "SELECT pg_switch_wal()")
    for i in (6, 7):
        c.sql("main", f"INSERT INTO t (id, v) VALUES ({i}, 'small')")
    end = c.lsn("main")
    xids = dict(c.sql("main", "SELECT id, x FROM t"))
    records = waldump(waldir, begin, end)
    switch = next(r for r in records if r.rmgr == "XLOG" and r.desc == "SWITCH")
    big = [r for r in records if r.rmgr == "Heap" and r.end - r.start > 7000]
    assert len(big) == 3
    # Both kinds of page-boundary crossing are there: a record running over one, and one WAL
    # position on a page boundary (pg_current_wal_lsn()'s answer after a full page was written).
    assert any(r.start // XLOG_BLCKSZ != (r.end - 1) // XLOG_BLCKSZ for r in big)

    branches = Branches(c)
    window = [*range(big[0].start - 64, switch.start + 64, 8), *range(switch.end - 64, end + 1, 8)]
    got: dict[int, pageserver_pb2.TimelineInfo] = {}
    for lsn in window:
        info = branches.create(main_tl, lsn)
        expect = resolved(records, lsn)
        assert (info.ancestor_lsn, info.start_lsn, info.last_record_lsn) == (expect, expect, expect), \
            f"branch at {format_lsn(lsn)} starts at {format_lsn(info.ancestor_lsn)}, expected {format_lsn(expect)}"
        got[lsn] = info

    # Writable computes on the interesting ones: inside a big record, at a page boundary inside
    # a record, at the switch's end (a segment boundary), in the switch's padding, and the end.
    page_boundary = next(x for x in window if x % XLOG_BLCKSZ == 0 and any(r.start < x < r.end for r in big))
    picks = {"mid": (big[1].start + big[1].end) // 2 // 8 * 8, "page": page_boundary, "segment": switch.end,
             "padding": switch.end - 64, "end": end}
    for n, (what, lsn) in enumerate(picks.items()):
        info = got[lsn]
        seen = commit_on(c, info.timeline.id, f"c-{what}", 100 + n)
        assert seen == [*rows_at(records, xids, info.ancestor_lsn), 100 + n], \
            f"branch at {format_lsn(lsn)} ({what}), resolved to {format_lsn(info.ancestor_lsn)}"

    # A branch of a branch, requested inside the last record of the child (its shutdown checkpoint).
    child = branches.timeline(got[picks["mid"]].timeline.id)
    child_wal = waldump(c.repo / "computes" / "c-mid" / "pgdata" / "pg_wal", child.start_lsn, child.last_record_lsn)
    inside = child.last_record_lsn - 8
    grandchild = branches.create(child.timeline.id, inside)
    assert grandchild.ancestor_lsn == resolved(child_wal, inside) < child.last_record_lsn
    seen = commit_on(c, grandchild.timeline.id, "c-grand", 200)
    assert seen == [*rows_at(records, xids, child.start_lsn), 100, 200]


def test_branch_by_timestamp_and_cli_note(cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    c.sql("main", "CREATE TABLE t (id int PRIMARY KEY, v text)")
    c.sql("main", "INSERT INTO t VALUES (1, 'a')")
    moment = c.sql("main", "SELECT clock_timestamp()::text")[0][0]
    c.sql("main", "INSERT INTO t VALUES (2, repeat('b', 3000))")
    c.zctl("branch", "create", "then", "--parent", "main", "--at", moment)
    assert commit_on(c, "then", "c-then", 3) == [1, 3]

    # Inside the big record: zctl says where the branch really starts.
    with c.conn("main") as conn:
        before = parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])  # type: ignore[index]
        conn.execute("INSERT INTO t VALUES (4, repeat('d', 7000))")
        after = parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])  # type: ignore[index]
    inside = (before + after) // 2 // 8 * 8
    out = c.zctl("branch", "create", "mid", "--parent", "main", "--at", format_lsn(inside)).stdout
    assert f"{format_lsn(inside)} is not the end of a WAL record" in out
    assert commit_on(c, "mid", "c-mid", 5) == [1, 2, 5]
    listed = c.zctl("branch", "list", "--json").stdout
    mid = next(b for b in json.loads(listed) if b["name"] == "mid")
    assert parse_lsn(mid["branch_lsn"]) <= before


def test_commits_go_on_without_the_page_server_and_a_stuck_attachment_is_reported(cluster: Cluster) -> None:  # noqa: F811
    """WAL is durable in the walreceiver first: with the page server killed, commits still return and
    the page server catches up when it is back. A replication connection the compute keeps refusing
    is FAILING in zctl status, and the compute's log says why its commits wait."""
    c = cluster
    c.sql("main", "CREATE TABLE t (id int PRIMARY KEY)")
    status = json.loads(c.zctl("status", "--json").stdout)
    pid = next(s["pid"] for s in status["services"] if s["name"] == "pageserver")
    os.kill(pid, signal.SIGKILL)
    with c.conn("main") as conn:
        conn.execute("SET statement_timeout = '20s'")
        conn.execute("INSERT INTO t VALUES (1)")
        flushed = parse_lsn(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])  # type: ignore[index]
    c.zctl("start")  # brings the page server back; the walreceiver feeds it what it kept
    deadline = time.monotonic() + 60
    while parse_lsn(c.zctl("lsn", "--branch", "main").stdout.strip()) < flushed:
        assert time.monotonic() < deadline, "the page server did not catch up"
        time.sleep(0.5)

    # The compute refuses the walreceiver's replication connections from now on.
    hba = c.repo / "computes" / "main" / "pgdata" / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("host replication all 127.0.0.1/32 reject\n" + original)
    c.sql("main", "SELECT pg_reload_conf()")
    c.sql("main", "SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
    deadline = time.monotonic() + 60
    while True:
        attachments = json.loads(c.zctl("status", "--json").stdout)["attachments"]
        if attachments and attachments[0]["state"] == "ATTACHMENT_STATE_FAILING":
            break
        assert time.monotonic() < deadline, f"attachment not reported failing: {attachments}"
        time.sleep(0.5)
    assert "pg_hba.conf rejects replication connection" in attachments[0]["last_error"]
    assert "failing" in c.zctl("status").stdout
    log = c.repo / "computes" / "main" / "pgdata.log"  # zctl's PostgresNode.logfile
    deadline = time.monotonic() + 20
    while "replication is failing" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no warning in the compute's log {log}"
        time.sleep(0.5)
    # Fixed: streaming resumes and a commit completes.
    hba.write_text(original)
    c.sql("main", "SELECT pg_reload_conf()")
    with c.conn("main") as conn:
        conn.execute("SET statement_timeout = '60s'")
        conn.execute("INSERT INTO t VALUES (2)")
    deadline = time.monotonic() + 30
    while json.loads(c.zctl("status", "--json").stdout)["attachments"][0]["state"] != "ATTACHMENT_STATE_STREAMING":
        assert time.monotonic() < deadline, "attachment did not recover"
        time.sleep(0.5)
