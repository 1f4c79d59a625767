"""Branch creation time against database size, and compute start against pg_basebackup + boot.

    .venv/bin/python bench/branches_and_computes.py [--scales 1,70] [--branches 20]

For each pgbench scale (1 ~ 16 MB, 70 ~ 1 GB) a vanilla Postgres 15 primary is
filled, then taken into a zctl repository the way an operator does it
(`zctl start`, `zctl attach --primary ...`: pg_basebackup, import, WAL
following), and measured:
- branch creation: CreateTimeline on the page server (what `zctl branch
  create` calls), N times, median and p90; the ratio largest / smallest size
  should be about 1 (branching copies nothing);
- compute start, largest size only: `zctl pg start` of a compute on a branch
  until its first query is answered, vs the anchor measured in the same run:
  `pg_basebackup -X stream` of the same primary, then starting that copy
  until its first query is answered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchutil import percentile, scratch_primary  # noqa: E402
from zctl_util import make_repo, zctl  # noqa: E402

import psycopg  # noqa: E402
from pgformat.lsn import parse_lsn  # noqa: E402
from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir, run_as_pg_user  # noqa: E402
from zproto import common_pb2, pageserver_pb2  # noqa: E402

TENANT = common_pb2.TenantId(id="0" * 32)


def first_query(port: int, deadline: float = 600) -> None:
    """Wait until `SELECT count(*) FROM pgbench_branches` is answered on the port."""
    stop = time.monotonic() + deadline
    while True:
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", connect_timeout=2) as c:
                c.execute("SELECT count(*) FROM pgbench_branches").fetchone()
                return
        except psycopg.OperationalError:
            if time.monotonic() > stop:
                raise
            time.sleep(0.02)


def measure(scale: int, branches: int, computes: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    with scratch_primary(wal_keep_size="4GB") as (primary, work):
        primary.pgbench("-i", "-s", str(scale), "-q")
        out["db_mb"] = primary.sql("SELECT pg_database_size('postgres')")[0][0] / 1e6
        repo = make_repo(make_pg_owned_dir(work / "zenith"))
        zctl(repo, "start")
        try:
            t0 = time.perf_counter()
            zctl(repo, "attach", "--primary", primary.connstr(), "--branch", "db", timeout=3600)
            out["attach_s"] = time.perf_counter() - t0
            target = primary.current_lsn()
            while parse_lsn(zctl(repo, "lsn", "--branch", "db").stdout.strip()) < target:
                time.sleep(0.2)
            from zctl.cluster_cmds import _pageserver, find_branch
            from zctl.supervisor import LocalCluster

            stub = _pageserver(LocalCluster(repo))
            parent = find_branch(stub, "db").timeline
            times = []
            for i in range(branches):
                t0 = time.perf_counter()
                stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
                    tenant=TENANT, ancestor_timeline=parent, name=f"b{i}"), timeout=60)
                times.append(time.perf_counter() - t0)
            out["branch_median_ms"] = statistics.median(times) * 1000
            out["branch_p90_ms"] = percentile(times, 0.9) * 1000
            t0 = time.perf_counter()
            zctl(repo, "branch", "create", "cli", "--parent", "db")
            out["branch_cli_ms"] = (time.perf_counter() - t0) * 1000
            if computes:
                port = free_port()
                zctl(repo, "pg", "create", "c", "--branch", "b0", "--port", str(port))
                t0 = time.perf_counter()
                zctl(repo, "pg", "start", "c", timeout=3600)
                first_query(port)
                out["compute_start_s"] = time.perf_counter() - t0
                zctl(repo, "pg", "stop", "c")
                copy = PostgresNode(make_pg_owned_dir(work / "anchor") / "data", free_port())
                t0 = time.perf_counter()
                run_as_pg_user([primary.bin("pg_basebackup"), "-h", primary.host, "-p", str(primary.port), "-U",
                                primary.user, "-D", copy.datadir, "-X", "stream", "-c", "fast"], timeout=3600)
                out["anchor_basebackup_s"] = time.perf_counter() - t0
                copy.configure({"port": copy.port, "listen_addresses": copy.host})
                subprocess.run(["chown", "-R", "postgres:postgres", str(copy.datadir)], check=True)
                copy.start()
                first_query(copy.port)
                out["anchor_s"] = time.perf_counter() - t0
                copy.stop()
        finally:
            zctl(repo, "stop", check=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,70", help="pgbench scales, comma-separated (default 1,70: ~16 MB, ~1 GB)")
    ap.add_argument("--branches", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke run: scales 1,3 and 5 branches")
    args = ap.parse_args()
    scales = [1, 3] if args.quick else [int(s) for s in args.scales.split(",")]
    branches = 5 if args.quick else args.branches
    results = {s: measure(s, branches, computes=s == max(scales)) for s in scales}
    print(json.dumps(results, indent=1), file=sys.stderr)
    print(f"{'database':>10} {'attach s':>9} {'branch median ms':>17} {'p90 ms':>8} {'zctl branch create ms':>22}")
    for s, r in results.items():
        print(f"{r['db_mb']:8.0f}MB {r['attach_s']:9.1f} {r['branch_median_ms']:17.1f} {r['branch_p90_ms']:8.1f} "
              f"{r['branch_cli_ms']:22.0f}")
    lo, hi = results[min(scales)], results[max(scales)]
    print(f"branch creation, largest / smallest database (median): {hi['branch_median_ms'] / lo['branch_median_ms']:.2f}x")
    print(f"compute start on a branch of the {hi['db_mb']:.0f} MB database, to the first query answered:")
    print(f"  zctl pg start                     {hi['compute_start_s']:7.1f} s")
    print(f"  anchor: pg_basebackup + boot      {hi['anchor_s']:7.1f} s  (pg_basebackup alone "
          f"{hi['anchor_basebackup_s']:.1f} s)")
    print(f"  ratio zenith / anchor: {hi['compute_start_s'] / hi['anchor_s']:.2f}x")


if __name__ == "__main__":
    main()
