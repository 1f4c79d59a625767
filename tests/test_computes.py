"""Computes and branches end to end: zctl init, branch, pg create/start/stop, with real computes.

Neon's test_branch_behind is the model: a branch at a past LSN shows the old
rows while its parent shows the new ones. Every compute is a stock Postgres 15
booted from a base backup the page server produced; pg_amcheck and row
counts are the oracles.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from zctl_util import make_repo, zctl

from pgformat.lsn import format_lsn, parse_lsn
from zctl.postgres import free_port, pg_bindir


class Cluster:
    """A zctl repository with `zctl init` done; computes by name."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.ports: dict[str, int] = {}

    def zctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return zctl(self.repo, *args, check=check)

    def computes(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in json.loads(self.zctl("pg", "list", "--json").stdout)}

    def conn(self, compute: str) -> psycopg.Connection[Any]:
        port = self.computes()[compute]["port"]
        return psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True)

    def sql(self, compute: str, query: str) -> list[tuple[Any, ...]]:
        with self.conn(compute) as c:
            cur = c.execute(query.encode())
            return cur.fetchall() if cur.description else []

    def lsn(self, compute: str) -> int:
        return parse_lsn(self.sql(compute, "SELECT pg_current_wal_lsn()::text")[0][0])

    def start_compute(self, name: str, branch: str, lsn: str | None = None) -> None:
        args = ["pg", "create", name, "--branch", branch, "--port", str(free_port())]
        if lsn:
            args += ["--lsn", lsn]
        self.zctl(*args)
        self.zctl("pg", "start", name)

    def amcheck(self, compute: str) -> None:
        self.sql(compute, "CREATE EXTENSION IF NOT EXISTS amcheck")
        port = self.computes()[compute]["port"]
        out = subprocess.run([str(pg_bindir() / "pg_amcheck"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                              "--heapallindexed", "--install-missing", "postgres"], capture_output=True, text=True)
        assert out.returncode == 0, f"pg_amcheck on {compute}: {out.stdout}{out.stderr}"


@pytest.fixture
def cluster(pg_base_dir: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    # Computes run as the postgres OS user: the repository must be reachable for it.
    repo = make_repo(pg_base_dir / f"repo-{request.node.name[:40]}")  # services on free ports; init keeps this config
    c = Cluster(repo)
    out = zctl(repo, "init", "--pg-port", str(free_port()), check=False)
    if out.returncode != 0:
        zctl(repo, "stop", check=False)
        raise AssertionError(f"zctl init failed: {out.stdout}{out.stderr}")
    yield c
    for name, spec in c.computes().items():
        if spec["status"] == "running":
            zctl(repo, "pg", "stop", name, check=False)
    zctl(repo, "stop", check=False)


def test_branch_behind_and_read_only_compute(cluster: Cluster) -> None:
    cluster.sql("main", "CREATE TABLE foo (t text)")
    cluster.sql("main", "INSERT INTO foo SELECT 'long string to consume some space' || g FROM generate_series(1, 100) g")
    lsn_a = format_lsn(cluster.lsn("main"))
    cluster.sql("main", "INSERT INTO foo SELECT 'long string to consume some space' || g FROM generate_series(1, 200000) g")
    lsn_b = format_lsn(cluster.lsn("main"))

    cluster.zctl("branch", "create", "hundred", "--parent", "main", "--at", lsn_a)
    cluster.zctl("branch", "create", "more", "--parent", "main", "--at", lsn_b)
    cluster.start_compute("hundred", "hundred")
    cluster.start_compute("more", "more")
    assert cluster.sql("hundred", "SELECT count(*) FROM foo") == [(100,)]
    assert cluster.sql("more", "SELECT count(*) FROM foo") == [(200100,)]
    assert cluster.sql("main", "SELECT count(*) FROM foo") == [(200100,)]

    # The branch is writable and diverges from its parent.
    cluster.sql("hundred", "INSERT INTO foo VALUES ('only on hundred')")
    assert cluster.sql("hundred", "SELECT count(*) FROM foo") == [(101,)]
    assert cluster.sql("main", "SELECT count(*) FROM foo") == [(200100,)]

    # A read-only compute at the past LSN.
    cluster.start_compute("ro", "main", lsn=lsn_a)
    assert cluster.sql("ro", "SELECT count(*), pg_is_in_recovery() FROM foo") == [(100, True)]

    # Branch points that cannot be served are clear errors.
    bad = cluster.zctl("branch", "create", "future", "--parent", "main", "--at", "FF/0", check=False)
    assert bad.returncode == 1 and "beyond the last record" in bad.stderr
    bad = cluster.zctl("branch", "create", "early", "--parent", "main", "--at", "0/10", check=False)
    assert bad.returncode == 1 and "before the parent's start" in bad.stderr

    branches = {b["name"]: b for b in json.loads(cluster.zctl("branch", "list", "--json").stdout)}
    assert branches["hundred"]["parent"] == "main" and branches["hundred"]["branch_lsn"] == lsn_a
    for name in ("main", "hundred", "more"):
        cluster.amcheck(name)
    check_only_the_walreceiver_replicates(cluster, "hundred")


def check_only_the_walreceiver_replicates(cluster: Cluster, compute: str) -> None:
    """A process on loopback posing as the walreceiver (its application_name, as the superuser over
    trust, or as its role with no or a guessed password) cannot replicate the compute, so it cannot
    acknowledge commits; the walreceiver itself streams with a password kept out of logs."""
    port = cluster.computes()[compute]["port"]
    app = cluster.sql(compute, "SHOW synchronous_standby_names")[0][0]
    assert app.startswith("zenith_walreceiver_")
    for user, password in (("postgres", ""), ("zenith_walreceiver", ""), ("zenith_walreceiver", "guess")):
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres",
                            replication="true", application_name=app, connect_timeout=10)
        assert "pg_hba.conf" in str(e.value) or "password" in str(e.value), (user, str(e.value))
    assert cluster.sql(compute, "SELECT usename, application_name, state FROM pg_stat_replication") == [
        ("zenith_walreceiver", app, "streaming")]
    # The password is in the walreceiver's state file (mode 0600) and nowhere else it could leak.
    state = cluster.repo / "walreceiver" / "attachments.json"
    assert state.stat().st_mode & 0o077 == 0
    from psycopg.conninfo import conninfo_to_dict

    passwords = [conninfo_to_dict(a["primary_conninfo"]).get("password") for a in json.loads(state.read_text())["attachments"]]
    assert passwords and all(passwords)
    logs = [p.read_text(errors="replace") for p in cluster.repo.rglob("*.log")]
    status = cluster.zctl("status", "--json").stdout
    argvs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argvs.append(cmdline.read_bytes().decode(errors="replace"))
        except OSError:
            pass  # the process ended
    for pw in passwords:
        assert not any(pw in text for text in logs) and pw not in status
        assert not any(pw in argv for argv in argvs)


def test_three_level_chain_and_timestamp_branch(cluster: Cluster) -> None:
    cluster.sql("main", "CREATE TABLE t (id int PRIMARY KEY, payload text)")
    cluster.sql("main", "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
    moment = cluster.sql("main", "SELECT clock_timestamp()::text")[0][0]
    time.sleep(0.1)
    cluster.sql("main", "INSERT INTO t VALUES (-1, 'after the moment')")
    cluster.zctl("branch", "create", "b1", "--parent", "main")
    cluster.start_compute("b1", "b1")
    cluster.sql("b1", "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(100001, 200000) g")
    cluster.zctl("branch", "create", "b2", "--parent", "b1")
    cluster.start_compute("b2", "b2")
    cluster.sql("b2", "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(200001, 300000) g")
    assert cluster.sql("main", "SELECT count(*) FROM t WHERE id > 0") == [(100000,)]
    assert cluster.sql("b1", "SELECT count(*) FROM t WHERE id > 0") == [(200000,)]
    assert cluster.sql("b2", "SELECT count(*) FROM t WHERE id > 0") == [(300000,)]
    for name in ("main", "b1", "b2"):
        cluster.amcheck(name)

    cluster.zctl("branch", "create", "then", "--parent", "main", "--at", moment)
    cluster.start_compute("then", "then")
    assert cluster.sql("then", "SELECT count(*), min(id) FROM t") == [(100000, 1)]


def test_diverging_pgbench_and_restart_after_kill(cluster: Cluster) -> None:
    port = cluster.computes()["main"]["port"]
    subprocess.run(["runuser", "-u", "postgres", "--", str(pg_bindir() / "pgbench"), "-h", "127.0.0.1", "-p", str(port),
                    "-U", "postgres", "-i", "-s", "1", "-q", "postgres"], check=True, capture_output=True)
    cluster.zctl("branch", "create", "bench", "--parent", "main")
    cluster.start_compute("bench", "bench")

    def run_pgbench(compute: str) -> None:
        p = cluster.computes()[compute]["port"]
        subprocess.run(["runuser", "-u", "postgres", "--", str(pg_bindir() / "pgbench"), "-h", "127.0.0.1",
                        "-p", str(p), "-U", "postgres", "-c", "2", "-t", "150", "-n",
                        # Distinct seeds: pgbench's default seed comes from the current time, which two
                        # runs launched together can share (same updates, same sums: no divergence to see).
                        f"--random-seed={1 if compute == 'main' else 2}", "postgres"],
                       check=True, capture_output=True)

    threads = [threading.Thread(target=run_pgbench, args=(c,)) for c in ("main", "bench")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cluster.sql("main", "SELECT count(*) FROM pgbench_history") == [(300,)]
    assert cluster.sql("bench", "SELECT count(*) FROM pgbench_history") == [(300,)]
    main_sum = cluster.sql("main", "SELECT sum(abalance) FROM pgbench_accounts")
    assert main_sum != cluster.sql("bench", "SELECT sum(abalance) FROM pgbench_accounts") or main_sum == [(0,)]

    # kill -9 the compute after commits: everything committed is in the page server.
    cluster.sql("main", "CREATE TABLE after_kill AS SELECT generate_series(1, 1000) AS i")
    history = cluster.sql("main", "SELECT count(*), sum(delta) FROM pgbench_history")
    pidfile = cluster.repo / "computes" / "main" / "pgdata" / "postmaster.pid"
    subprocess.run(["kill", "-9", pidfile.read_text().split()[0]], check=True)
    deadline = time.monotonic() + 30
    while cluster.computes()["main"]["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.zctl("pg", "start", "main")
    assert cluster.sql("main", "SELECT count(*) FROM after_kill") == [(1000,)]
    assert cluster.sql("main", "SELECT count(*), sum(delta) FROM pgbench_history") == history
    for name in ("main", "bench"):
        cluster.amcheck(name)

    # Only one writable compute per branch.
    cluster.zctl("pg", "create", "second", "--branch", "main", "--port", str(free_port()))
    refused = cluster.zctl("pg", "start", "second", check=False)
    assert refused.returncode == 1 and "already has a running writable compute" in refused.stderr
