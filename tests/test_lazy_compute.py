"""Lazy computes end to end: stock Postgres on a FUSE data directory served by GetPage@LSN.

Oracles: a full-copy compute of the same LSN (its relation files byte for byte,
masked where Postgres may set hint bits, and the answers to the same queries
after the same DDL), pg_amcheck --heapallindexed, pgbench, row counts across
stop/start and kill -9. One zctl repository serves the whole module;
the slow tests add a pgbench database to its branch main.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from zctl_util import make_repo, zctl

from pgformat.bufmask import heap_mask, mask_page_hint_bits, mask_page_lsn_and_checksum
from pgformat.constants import BLCKSZ
from pgformat.datadir import parse_relation_path
from pgformat.page import PageError
from services.computefs.main import FuseUnavailableError, check_fuse
from zctl.postgres import free_port, pg_bindir

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine")


class Repo:
    def __init__(self, path: Path) -> None:
        self.path = path

    def zctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return zctl(self.path, *args, check=check)

    def computes(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in json.loads(self.zctl("pg", "list", "--json").stdout)}

    def port(self, compute: str) -> int:
        return int(self.computes()[compute]["port"])

    def conn(self, compute: str, db: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(f"host=127.0.0.1 port={self.port(compute)} user=postgres dbname={db}", autocommit=True)

    def sql(self, compute: str, query: str, db: str = "postgres") -> list[tuple[Any, ...]]:
        with self.conn(compute, db) as c:
            cur = c.execute(query.encode())
            return cur.fetchall() if cur.description else []

    def create(self, name: str, branch: str, *, lazy: bool, lsn: str | None = None) -> None:
        args = ["pg", "create", name, "--branch", branch, "--port", str(free_port())]
        if lsn:
            args += ["--lsn", lsn]
        if lazy:
            args.append("--lazy")
        self.zctl(*args)

    def start(self, name: str, branch: str, *, lazy: bool, lsn: str | None = None) -> None:
        self.create(name, branch, lazy=lazy, lsn=lsn)
        self.zctl("pg", "start", name)

    def datadir(self, compute: str) -> Path:
        return self.path / "computes" / compute / "pgdata"

    def pgbench(self, compute: str, *args: str) -> str:
        out = subprocess.run([str(pg_bindir() / "pgbench"), "-h", "127.0.0.1", "-p", str(self.port(compute)),
                              "-U", "postgres", *args, "postgres"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"pgbench {args}: {out.stdout}{out.stderr}"
        return out.stdout

    def amcheck(self, compute: str) -> None:
        self.sql(compute, "CREATE EXTENSION IF NOT EXISTS amcheck")
        out = subprocess.run([str(pg_bindir() / "pg_amcheck"), "-h", "127.0.0.1", "-p", str(self.port(compute)),
                              "-U", "postgres", "--heapallindexed", "--install-missing", "--all"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"pg_amcheck on {compute}: {out.stdout}{out.stderr}"


@pytest.fixture(scope="module")
def repo(pg_base_dir: Path) -> Iterator[Repo]:
    r = Repo(make_repo(pg_base_dir / "repo-lazy"))
    out = zctl(r.path, "init", "--pg-port", str(free_port()), check=False)
    if out.returncode != 0:
        zctl(r.path, "stop", check=False)
        raise AssertionError(f"zctl init failed: {out.stdout}{out.stderr}")
    r.sql("main", "CREATE TABLE marker (id int PRIMARY KEY, note text)")
    r.sql("main", "INSERT INTO marker SELECT g, 'before' FROM generate_series(1, 10) g")
    r.sql("main", "CREATE TABLE filler (id int PRIMARY KEY, v text)")
    r.sql("main", "INSERT INTO filler SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    yield r
    for name, spec in r.computes().items():
        if spec["status"] == "running":
            zctl(r.path, "pg", "stop", name, check=False)
    zctl(r.path, "stop", check=False)
    assert not any("computefs" in line for line in Path("/proc/mounts").read_text().splitlines()
                   if str(r.path) in line), "a lazy compute's mount was left behind"


@pytest.fixture(scope="module")
def pgbench_repo(repo: Repo) -> Repo:
    """The module's repository with a pgbench database (scale 1) on branch main."""
    if not repo.sql("main", "SELECT to_regclass('pgbench_accounts') IS NOT NULL")[0][0]:
        repo.pgbench("main", "-i", "-s", "1", "-q")
    return repo


def _lsn(repo: Repo, compute: str) -> str:
    return str(repo.sql(compute, "SELECT pg_current_wal_lsn()::text")[0][0])


def _relation_files(datadir: Path) -> dict[str, Path]:
    out = {}
    for top in ("base", "global"):
        for dirpath, _, files in os.walk(datadir / top, followlinks=True):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), datadir)
                if parse_relation_path(rel) is not None:
                    out[rel] = Path(dirpath) / f
    return out


def _masked(page: bytes, blkno: int) -> bytes:
    p = bytearray(page)
    mask_page_lsn_and_checksum(p)
    mask_page_hint_bits(p)
    with contextlib.suppress(PageError):  # not a heap page: the generic masks only
        heap_mask(p, blkno)
    return bytes(p)


def test_relation_files_equal_a_full_copy_and_old_lsn_shows_old_data(repo: Repo) -> None:
    lsn = _lsn(repo, "main")
    repo.sql("main", "UPDATE marker SET note = 'after'")
    repo.sql("main", "INSERT INTO marker SELECT g, 'after' FROM generate_series(11, 20) g")
    repo.start("old_lazy", "main", lazy=True, lsn=lsn)
    repo.start("old_full", "main", lazy=False, lsn=lsn)
    try:
        # Read-only at the old LSN: the data as of then, while main has moved on.
        assert repo.sql("old_lazy", "SELECT count(*), min(note), max(note), pg_is_in_recovery() FROM marker") \
            == [(10, "before", "before", True)]
        assert repo.sql("main", "SELECT count(*), min(note) FROM marker") == [(20, "after")]

        lazy_files = _relation_files(repo.datadir("old_lazy"))
        full_files = _relation_files(repo.datadir("old_full"))
        assert (repo.datadir("old_lazy") / "base").is_symlink()
        assert set(lazy_files) == set(full_files)
        assert any(p.stat().st_size >= 1 << 20 for p in full_files.values())  # table filler is there
        masked = 0
        for rel, full_path in sorted(full_files.items()):
            a, b = lazy_files[rel].read_bytes(), full_path.read_bytes()
            assert len(a) == len(b), rel
            if a == b:
                continue
            first = parse_relation_path(rel).first_block  # type: ignore[union-attr]
            for i in range(0, len(a), BLCKSZ):
                if a[i:i + BLCKSZ] != b[i:i + BLCKSZ]:
                    blk = first + i // BLCKSZ
                    assert _masked(a[i:i + BLCKSZ], blk) == _masked(b[i:i + BLCKSZ], blk), f"{rel} block {blk}"
                    masked += 1
        assert masked <= 20, f"{masked} pages differ beyond hint bits"
        st = (repo.datadir("old_lazy") / "global" / "pg_control").stat()
        assert st.st_uid == (repo.datadir("old_full") / "global" / "pg_control").stat().st_uid
    finally:
        repo.zctl("pg", "stop", "old_lazy")
        repo.zctl("pg", "stop", "old_full")
    assert not (repo.path / "computes" / "old_lazy" / "lazy" / "mnt" / "base").exists()  # unmounted


def _kill_postmaster(repo: Repo, compute: str) -> None:
    pid = int((repo.datadir(compute) / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_writes_survive_stop_start_and_kill(repo: Repo) -> None:
    repo.zctl("branch", "create", "writes", "--parent", "main")
    repo.start("writes_lazy", "writes", lazy=True)
    assert repo.computes()["writes_lazy"]["lazy"] is True
    repo.sql("writes_lazy", "UPDATE filler SET v = 'changed' WHERE id % 100 = 0")
    repo.sql("writes_lazy", "INSERT INTO filler SELECT g, 'new' FROM generate_series(20001, 21000) g")
    repo.sql("writes_lazy", "CHECKPOINT")  # the written blocks reach the overlay, and are read back from it
    overlay = repo.path / "computes" / "writes_lazy" / "lazy" / "overlay"
    assert any(f.name.endswith(".map") for f in overlay.rglob("*"))
    expected = [(21000, 200, 1000)]
    query = "SELECT count(*), count(*) FILTER (WHERE v = 'changed'), count(*) FILTER (WHERE v = 'new') FROM filler"
    assert repo.sql("writes_lazy", query) == expected
    repo.zctl("pg", "stop", "writes_lazy")
    repo.zctl("pg", "start", "writes_lazy")
    assert repo.sql("writes_lazy", query) == expected
    repo.sql("writes_lazy", "DELETE FROM filler WHERE v = 'new'")
    _kill_postmaster(repo, "writes_lazy")
    repo.zctl("pg", "start", "writes_lazy")  # cleans the mount the killed compute left
    assert repo.sql("writes_lazy", query) == [(20000, 200, 0)]
    assert repo.sql("main", query) == [(20000, 0, 0)]  # the parent never saw any of it
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if "writes_lazy" in line]
    assert len(mounts) == 1, mounts
    repo.zctl("pg", "stop", "writes_lazy")


@pytest.mark.slow
def test_pgbench_amcheck_and_rows_survive_stop_start_and_kill(pgbench_repo: Repo) -> None:
    repo = pgbench_repo
    repo.zctl("branch", "create", "bench", "--parent", "main")
    repo.start("bench_lazy", "bench", lazy=True)
    repo.amcheck("bench_lazy")
    repo.pgbench("bench_lazy", "-n", "-c", "2", "-T", "5")
    repo.sql("bench_lazy", "INSERT INTO marker SELECT g, 'lazy' FROM generate_series(100, 199) g")
    repo.amcheck("bench_lazy")
    expected = repo.sql("bench_lazy", "SELECT count(*), sum(abalance) FROM pgbench_accounts")
    history = repo.sql("bench_lazy", "SELECT count(*) FROM pgbench_history")[0][0]
    assert history > 0

    repo.zctl("pg", "stop", "bench_lazy")
    repo.zctl("pg", "start", "bench_lazy")
    assert repo.sql("bench_lazy", "SELECT count(*) FROM marker WHERE note = 'lazy'") == [(100,)]
    assert repo.sql("bench_lazy", "SELECT count(*), sum(abalance) FROM pgbench_accounts") == expected

    # kill -9: every acknowledged commit is there at the next start, which cleans the mount up.
    repo.sql("bench_lazy", "INSERT INTO marker SELECT g, 'killed' FROM generate_series(200, 299) g")
    _kill_postmaster(repo, "bench_lazy")
    repo.zctl("pg", "start", "bench_lazy")
    assert repo.sql("bench_lazy", "SELECT note, count(*) FROM marker WHERE id >= 100 GROUP BY note ORDER BY note") \
        == [("killed", 100), ("lazy", 100)]
    assert repo.sql("bench_lazy", "SELECT count(*) FROM pgbench_history")[0][0] == history
    repo.amcheck("bench_lazy")
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if "bench_lazy" in line]
    assert len(mounts) == 1, mounts


_DDL = [
    "CREATE TABLE t1 (id int PRIMARY KEY, v text)",
    "INSERT INTO t1 SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
    "CREATE INDEX t1_v ON t1 (v)",
    "CREATE TABLE t2 AS SELECT * FROM pgbench_branches",
    "DROP TABLE t2",
    "DROP INDEX t1_v",
    "CREATE INDEX t1_v2 ON t1 (v, id)",
    "UPDATE pgbench_accounts SET abalance = aid % 7 WHERE aid % 10 = 0",
    "VACUUM FULL pgbench_accounts",
    "TRUNCATE pgbench_history",
    ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT 1, 1, g, g, '2026-01-01' "
     "FROM generate_series(1, 500) g"),
    "DELETE FROM t1 WHERE id % 3 = 0",
    "VACUUM t1",
    "CREATE DATABASE other",
]
_CHECKS = [
    ("SELECT count(*), sum(abalance), md5(string_agg(aid::text || ':' || abalance, ',' ORDER BY aid)) "
     "FROM pgbench_accounts"),
    "SELECT count(*), md5(string_agg(id::text || v, ',' ORDER BY id)) FROM t1",
    "SELECT count(*), sum(delta) FROM pgbench_history",
    "SELECT relname FROM pg_class WHERE relname LIKE 't%' AND relnamespace = 'public'::regnamespace ORDER BY 1",
    "SELECT datname FROM pg_database ORDER BY 1",
    "SELECT count(*) FROM t1 WHERE v > 'a'",
]


@pytest.mark.slow
def test_ddl_matches_a_full_copy(pgbench_repo: Repo) -> None:
    repo = pgbench_repo
    lsn = _lsn(repo, "main")
    repo.zctl("branch", "create", "ddl_lazy", "--parent", "main", "--at", lsn)
    repo.zctl("branch", "create", "ddl_full", "--parent", "main", "--at", lsn)
    repo.start("ddl_l", "ddl_lazy", lazy=True)
    repo.start("ddl_f", "ddl_full", lazy=False)
    for compute in ("ddl_l", "ddl_f"):
        for stmt in _DDL:
            repo.sql(compute, stmt)
        repo.sql(compute, "CREATE TABLE o (x int)", db="other")
        repo.sql(compute, "INSERT INTO o SELECT generate_series(1, 1000)", db="other")
        repo.sql(compute, "CHECKPOINT")
    answers = {c: [repo.sql(c, q) for q in _CHECKS] for c in ("ddl_l", "ddl_f")}
    assert answers["ddl_l"] == answers["ddl_f"]
    assert repo.sql("ddl_l", "SELECT count(*), sum(x) FROM o", db="other") == [(1000, 500500)]
    repo.amcheck("ddl_l")
    # The lazy compute's changes came back from the page server, not from its (discarded) overlay.
    repo.zctl("pg", "stop", "ddl_l")
    repo.zctl("pg", "start", "ddl_l")
    assert [repo.sql("ddl_l", q) for q in _CHECKS] == answers["ddl_f"]
    assert repo.sql("ddl_l", "SELECT count(*), sum(x) FROM o", db="other") == [(1000, 500500)]
    repo.sql("ddl_l", "DROP DATABASE other")
    assert repo.sql("ddl_l", "SELECT count(*) FROM pg_database WHERE datname = 'other'") == [(0,)]
    repo.amcheck("ddl_l")
    for c in ("ddl_l", "ddl_f"):
        repo.zctl("pg", "stop", c)


def test_fuse_unavailable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FuseUnavailableError, match="does not exist.*full-copy compute"):
        check_fuse(str(tmp_path / "no-fuse-here"))
    check_fuse()  # this machine has it

