"""Compute start on a branch of a ~1 GB database vs pg_basebackup of a vanilla primary plus boot.

    .venv/bin/python bench/compute_start.py [--scale 70] [--runs 3] [--load wal|attach] [--sync] [--quick]
                                            [--lazy [--pgbench-seconds 20]]

One zctl repository holding pgbench scale SCALE on branch main, loaded as an
operator would (see bench/zenith_repo.py; by default `zctl init` and
`pgbench -i` against compute main, so the page server got it all as WAL).
The vanilla primary is the stock Postgres holding the same database: compute
main itself (or, with --load attach, the primary branch main was attached
from). Then RUNS times, one of each, ours first in odd runs and second in
even ones (whichever writes second may find memory the first freed: each copy
is deleted, untimed, after its run):

- ours: `zctl branch create` + `zctl pg create` (not timed), then the clock
  runs from launching `zctl pg start NAME` (base backup streamed from the
  page server and unpacked, configuration, pg_ctl start -w, walreceiver
  attached) until the first query on the compute has answered. A
  CHECKPOINT on compute main beforehand, as for vanilla below. The page
  server's log line for the base backup splits this into "base backup" (from
  the launch, so zctl's own start-up of about 0.3 s included, until the page
  server has sent its last byte) and "rest" (unpacking the tail, Postgres
  boot, walreceiver attach, the query);
- vanilla: the clock runs from launching `pg_basebackup -X stream -c fast`
  of the primary (--no-sync unless --sync: zctl pg start does not fsync the
  data directory either) until the first query on the copy, booted with
  pg_ctl start -w, has answered. A CHECKPOINT on the primary beforehand keeps
  the backup's checkpoint cheap, as it would be on a primary at rest.

Before the runs, the bench waits until the page server's background image
layer covers the load (reported as "image layer N s later"), as it would
have long before on a server that has been up a while.

With --lazy, every run also starts a lazy compute (`zctl pg create --lazy`,
timed the same way as ours: launch of `zctl pg start` -> first answer; its
slim base backup has no relation files) right after the full copy, and the
medians compare lazy / full copy (goal < 1 s whatever the size). Then, once,
on a new lazy and a new full-copy compute (one at a time): the first full scan
of pgbench_accounts (`SELECT count(*), sum(abalance)`, cold: the lazy
compute fetches every page from the page server), `pgbench -n -c 2 -T N`
once warm (every pgbench table and index read once with pg_prewarm, untimed;
TPS; goal lazy >= 0.8x full), and the local disk the lazy compute's
overlay takes after it (about the pages written, not the database).

The first query is `SELECT sum(bbalance) FROM pgbench_branches`; after each
run, untimed, both copies must agree on count(*) and sum(abalance) of
pgbench_accounts. Prints every run, the medians and the ratio ours / vanilla
(target: ours no slower, ratio <= 1).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

from zenith_repo import LOADS, BenchRepo, build, log

from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir, run_as_pg_user

MB = 1 << 20
FIRST_QUERY = "SELECT sum(bbalance) FROM pgbench_branches"
CHECK_QUERY = "SELECT count(*), sum(abalance) FROM pgbench_accounts"


@dataclass
class Run:
    ours_total: float
    ours_basebackup: float | None  # launch -> the page server finished sending the base backup
    vanilla_total: float
    vanilla_basebackup: float  # pg_basebackup alone


def first_query(port: int) -> object:
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        return conn.execute(FIRST_QUERY).fetchone()


def check(port: int) -> object:
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        return conn.execute(CHECK_QUERY).fetchone()


def basebackup_end(br: BenchRepo, log_offset: int) -> float | None:
    """Wall-clock time of the page server's 'base backup written' log line after `log_offset`."""
    with (br.repo / "logs" / "pageserver.log").open("rb") as f:
        f.seek(log_offset)
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if "base backup written" in line:
            # logging's default asctime: local time, "2026-11-26 21:04:37,378".
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def run_ours(br: BenchRepo, i: int, lazy: bool = False) -> tuple[float, float | None, object]:
    name = f"{'lazy' if lazy else 'start'}{i}"
    port = free_port()
    br.zctl("branch", "create", name, "--parent", "main")
    br.zctl("pg", "create", name, "--branch", name, "--port", str(port), *(["--lazy"] if lazy else []))
    br.primary.execute("CHECKPOINT")  # as before the vanilla run: both start with the primary at rest
    offset = br.pageserver_log_size()
    wall0, t0 = time.time(), time.perf_counter()
    br.zctl("pg", "start", name, timeout=7200)
    answer = first_query(port)
    total = time.perf_counter() - t0
    end = basebackup_end(br, offset)
    checked = check(port)
    br.zctl("pg", "stop", name)
    shutil.rmtree(br.repo / "computes" / name / "pgdata")  # as vanilla's copy: each run writes into freed memory
    return total, (end - wall0 if end is not None else None), (answer, checked)


@dataclass
class Workload:
    scan_seconds: float  # first full scan of pgbench_accounts after start
    tps: float  # pgbench -n -c 2 -T N, once warm
    overlay_bytes: int  # local disk of the lazy compute's overlay after pgbench (0 for a full copy)


def run_workload(br: BenchRepo, lazy: bool, seconds: int) -> Workload:
    """A new compute on a new branch: cold first scan, then pgbench; the overlay's disk after it."""
    name = f"work{'lazy' if lazy else 'full'}"
    port = free_port()
    br.zctl("branch", "create", name, "--parent", "main")
    br.zctl("pg", "create", name, "--branch", name, "--port", str(port), *(["--lazy"] if lazy else []))
    br.zctl("pg", "start", name, timeout=7200)
    try:
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            t0 = time.perf_counter()
            conn.execute(CHECK_QUERY).fetchone()
            scan = time.perf_counter() - t0
            # Warm, untimed: every block of the pgbench tables and indexes read once (into the kernel's
            # page cache; for the lazy compute, that is every page fetched from the page server).
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
            conn.execute("SELECT pg_prewarm(oid::regclass, 'read') FROM pg_class "
                         "WHERE relname LIKE 'pgbench%' AND relkind IN ('r', 'i')").fetchall()
        node = PostgresNode(br.repo / "computes" / name / "pgdata", port)
        out = node.pgbench("-n", "-c", "2", "-j", "2", "-T", str(seconds))
        tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
        node.sql("CHECKPOINT")  # what the compute wrote reaches its files (the overlay, if lazy)
        overlay = br.repo / "computes" / name / "lazy" / "overlay"
        used = sum(f.stat().st_blocks * 512 for f in overlay.rglob("*") if f.is_file()) if lazy else 0
    finally:
        br.zctl("pg", "stop", name)
    return Workload(scan, tps, used)


def run_vanilla(br: BenchRepo, workdir: Path, i: int, sync: bool) -> tuple[float, float, object]:
    br.primary.execute("CHECKPOINT")
    datadir = make_pg_owned_dir(workdir / f"vanilla{i}") / "data"
    copy = PostgresNode(datadir, free_port())
    argv: list[str | Path] = [br.primary.bin("pg_basebackup"), "-d", br.primary.connstr(), "-D", datadir,
                              "-X", "stream", "-c", "fast"]
    if not sync:
        argv.append("--no-sync")
    try:
        t0 = time.perf_counter()
        run_as_pg_user(argv)
        t_backup = time.perf_counter() - t0
        # The copy inherits the primary's settings: its own port, and no synchronous standby to wait for.
        copy.configure({"port": copy.port, "synchronous_standby_names": ""}, filename="vanilla.conf")
        copy.start(timeout=600)
        answer = first_query(copy.port)
        total = time.perf_counter() - t0
        checked = check(copy.port)
    finally:
        copy.stop(mode="immediate")
        shutil.rmtree(datadir.parent, ignore_errors=True)
    return total, t_backup, (answer, checked)


def fmt(seconds: float | None) -> str:
    return f"{seconds:9.2f}" if seconds is not None else f"{'?':>9}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=70, help="pgbench scale (default 70, ~1 GB)")
    ap.add_argument("--runs", type=int, default=3, help="starts of each kind (default 3)")
    ap.add_argument("--load", choices=LOADS, default="wal", help="how the data gets in (default: wal)")
    ap.add_argument("--sync", action="store_true", help="let pg_basebackup fsync the copy (default: --no-sync)")
    ap.add_argument("--quick", action="store_true", help="smoke run: scale 1, one run")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--lazy", action="store_true", help="also lazy computes: start, first scan, pgbench, disk")
    ap.add_argument("--pgbench-seconds", type=int, default=20,
                    help="pgbench duration with --lazy (default 20; 0: no first scan, pgbench or disk use)")
    args = ap.parse_args()
    if args.quick:
        args.scale, args.runs = 1, 1

    workdir = Path(tempfile.mkdtemp(prefix="bench-compute-", dir="/tmp"))
    br = build(workdir, args.scale, args.load)
    runs: list[Run] = []
    lazy_runs: list[float] = []
    work: dict[str, Workload] = {}
    try:
        for i in range(args.runs):
            if i % 2 == 0:
                log(f"run {i + 1}/{args.runs}: zctl pg start on a new branch, then pg_basebackup + boot")
                ours, ours_bb, ours_answer = run_ours(br, i)
                vanilla, vanilla_bb, vanilla_answer = run_vanilla(br, workdir, i, args.sync)
            else:
                log(f"run {i + 1}/{args.runs}: pg_basebackup + boot, then zctl pg start on a new branch")
                vanilla, vanilla_bb, vanilla_answer = run_vanilla(br, workdir, i, args.sync)
                ours, ours_bb, ours_answer = run_ours(br, i)
            log(f"run {i + 1}/{args.runs}: ours {ours:.2f} s, vanilla {vanilla:.2f} s")
            if ours_answer != vanilla_answer:
                raise RuntimeError(f"the copies disagree: ours {ours_answer}, vanilla {vanilla_answer}")
            runs.append(Run(ours, ours_bb, vanilla, vanilla_bb))
            if args.lazy:
                lazy, _, lazy_answer = run_ours(br, i, lazy=True)
                log(f"run {i + 1}/{args.runs}: lazy {lazy:.2f} s")
                if lazy_answer != vanilla_answer:
                    raise RuntimeError(f"the copies disagree: lazy {lazy_answer}, vanilla {vanilla_answer}")
                lazy_runs.append(lazy)
        if args.lazy and args.pgbench_seconds > 0:
            for kind in ("lazy", "full"):
                log(f"{kind} compute: first full scan, then pgbench for {args.pgbench_seconds} s")
                work[kind] = run_workload(br, kind == "lazy", args.pgbench_seconds)
        repo_mb = br.repository_bytes() / MB
    finally:
        br.close(keep=args.keep)

    print(f"compute start: pgbench scale {args.scale}, database {br.db_bytes / MB:.0f} MB, data loaded by "
          f"{args.load!r} in {br.load_seconds:.1f} s, image layer {br.layer_seconds:.1f} s later"
          f"{' (asked for)' if br.layer_forced else ''} (page server files "
          f"{repo_mb:.0f} MB); "
          f"pg_basebackup {'with' if args.sync else 'without'} fsync; 2 cores shared with other work")
    print()
    print(f"{'':6} {'ours: zctl pg start -> first answer':>44}   {'vanilla: pg_basebackup + boot -> first answer':>46}")
    print(f"{'run':6} {'total s':>9} {'base backup':>12} {'rest':>9} {'MB/s':>9}   "
          f"{'total s':>9} {'pg_basebackup':>14} {'boot+query':>11} {'MB/s':>9}   ratio")
    for i, r in enumerate(runs, 1):
        rest = r.ours_total - r.ours_basebackup if r.ours_basebackup is not None else None
        print(f"{i:<6} {fmt(r.ours_total)} {fmt(r.ours_basebackup):>12} {fmt(rest)} "
              f"{br.db_bytes / MB / r.ours_total:9.1f}   {fmt(r.vanilla_total)} {fmt(r.vanilla_basebackup):>14} "
              f"{fmt(r.vanilla_total - r.vanilla_basebackup):>11} {br.db_bytes / MB / r.vanilla_total:9.1f}   "
              f"{r.ours_total / r.vanilla_total:5.2f}x")
    ours_med = statistics.median(r.ours_total for r in runs)
    vanilla_med = statistics.median(r.vanilla_total for r in runs)
    print()
    print(f"anchor: median time to first answer, ours {ours_med:.2f} s / vanilla {vanilla_med:.2f} s = "
          f"{ours_med / vanilla_med:.2f}x (target <= 1)")
    if lazy_runs:
        lazy_med = statistics.median(lazy_runs)
        print()
        print("lazy compute, zctl pg start -> first answer, per run: "
              + ", ".join(f"{t:.2f}" for t in lazy_runs) + " s")
        print(f"lazy: median {lazy_med:.2f} s vs full copy {ours_med:.2f} s = {lazy_med / ours_med:.2f}x "
              f"(goal < 1 s)")
    if work:
        lz, fc = work["lazy"], work["full"]
        print(f"first full scan of pgbench_accounts: lazy {lz.scan_seconds:.2f} s, full copy {fc.scan_seconds:.2f} s "
              f"= {lz.scan_seconds / fc.scan_seconds:.1f}x")
        print(f"pgbench -c 2 -T {args.pgbench_seconds}: lazy {lz.tps:.0f} TPS, full copy {fc.tps:.0f} TPS "
              f"= {lz.tps / fc.tps:.2f}x (goal >= 0.8)")
        print(f"lazy compute's overlay after pgbench: {lz.overlay_bytes / MB:.1f} MB on disk "
              f"(database {br.db_bytes / MB:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
