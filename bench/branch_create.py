"""Branch creation time against database size: a small and a ~1 GB pgbench database.

    .venv/bin/python bench/branch_create.py [--small-scale 1] [--large-scale 70] [--branches 20]
                                            [--load wal|attach] [--quick]

For each size, a fresh zctl repository loaded as an operator would (see
bench/zenith_repo.py: by default `zctl init`, then `pgbench -i` against
compute main, so the data reaches the page server as WAL). Then, per size,
BRANCHES branches of main each way:

- CreateTimeline @head: the gRPC call `zctl branch create` makes (its
  ListTimelines lookup of the parent done once), on a warm channel, at main's
  last LSN;
- CreateTimeline @past LSN: the same at main's LSN from before pgbench -i;
- zctl in-process: `zctl branch create NAME --parent main` through zctl's own
  main() in this process (new channel, parent lookup, CreateTimeline);
- zctl subprocess: the same as a new process, what an operator types; this
  adds Python's start-up and imports, measured alone as `zctl --help`.

Prints median / p90 / max per way and size, and the ratio large / small of
the medians (target: about 1, and under 50 ms). A branch copies nothing: the
page server's files are measured before and after the branches.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pageserver_getpage import percentile
from zenith_repo import LOADS, TENANT, BenchRepo, build, log

from pgformat.lsn import format_lsn
from zctl import main as zctl_main
from zproto import common_pb2, pageserver_pb2

MB = 1 << 20
WAYS = ("CreateTimeline @head", "CreateTimeline @past LSN", "zctl in-process", "zctl subprocess")


@dataclass
class SizeResult:
    scale: int
    db_bytes: int
    load_seconds: float
    repo_before: int = 0
    repo_after: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)  # way -> seconds per branch
    cli_startup: list[float] = field(default_factory=list)  # `zctl --help` subprocess


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def create_timeline(br: BenchRepo, name: str, lsn: int) -> Callable[[], object]:
    """The request cmd_branch_create sends, for a parent already looked up."""
    def call() -> None:
        info = br.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=TENANT, new_timeline=common_pb2.TimelineId(id=uuid.uuid4().hex),
            ancestor_timeline=br.main.timeline, ancestor_lsn=lsn, name=name), timeout=30)
        want = lsn or br.main.last_record_lsn
        if info.ancestor_lsn != want:
            raise RuntimeError(f"branch {name} is at {format_lsn(info.ancestor_lsn)}, asked for {format_lsn(want)}")
    return call


def zctl_in_process(br: BenchRepo, name: str) -> Callable[[], object]:
    def call() -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = zctl_main.main(["--repo", str(br.repo), "branch", "create", name, "--parent", "main"])
        if rc != 0:
            raise RuntimeError(f"zctl branch create {name} failed: {out.getvalue()}")
    return call


def zctl_subprocess(br: BenchRepo, *args: str) -> Callable[[], object]:
    def call() -> None:
        proc = subprocess.run([sys.executable, "-m", "zctl.main", "--repo", str(br.repo), *args],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"zctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return call


def measure(br: BenchRepo, n: int, label: str) -> SizeResult:
    res = SizeResult(br.scale, br.db_bytes, br.load_seconds)
    res.repo_before = br.repository_bytes()
    main_lsn = br.refresh_main().last_record_lsn
    log(f"{label}: {n} branches each way (main at {format_lsn(main_lsn)}, "
        f"past LSN {format_lsn(br.lsn_before_load)})")
    res.times[WAYS[0]] = [timed(create_timeline(br, f"head{i}", 0)) for i in range(n)]
    res.times[WAYS[1]] = [timed(create_timeline(br, f"past{i}", br.lsn_before_load)) for i in range(n)]
    res.times[WAYS[2]] = [timed(zctl_in_process(br, f"inproc{i}")) for i in range(n)]
    res.times[WAYS[3]] = [timed(zctl_subprocess(br, "branch", "create", f"cli{i}", "--parent", "main"))
                          for i in range(n)]
    res.cli_startup = [timed(zctl_subprocess(br, "--help")) for _ in range(max(3, n // 4))]
    res.repo_after = br.repository_bytes()
    listed = len(br.stub.ListTimelines(pageserver_pb2.ListTimelinesRequest(tenant=TENANT), timeout=10).timelines)
    if listed != 1 + 4 * n:
        raise RuntimeError(f"expected {1 + 4 * n} timelines, the page server lists {listed}")
    return res


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def report(small: SizeResult, large: SizeResult, args: argparse.Namespace) -> None:
    print(f"branch creation; data loaded by {args.load!r}; {args.branches} branches per way and size; "
          "2 cores shared with other work")
    for name, r in (("small", small), ("large", large)):
        print(f"  {name}: pgbench scale {r.scale}, database {r.db_bytes / MB:.0f} MB, loaded in {r.load_seconds:.1f} s; "
              f"page server files {r.repo_before / MB:.0f} MB before the branches, {r.repo_after / MB:.0f} MB after")
    print()
    print(f"{'':28} {'small (ms)':>26}   {'large (ms)':>26}   ratio")
    print(f"{'':28} {'median':>8} {'p90':>8} {'max':>8}   {'median':>8} {'p90':>8} {'max':>8}   large/small")
    for way in WAYS:
        a, b = small.times[way], large.times[way]
        print(f"{way:28} {ms(statistics.median(a))} {ms(percentile(a, .9))} {ms(max(a))}   "
              f"{ms(statistics.median(b))} {ms(percentile(b, .9))} {ms(max(b))}   "
              f"{statistics.median(b) / statistics.median(a):6.2f}x")
    print(f"{'zctl --help (start-up only)':28} {ms(statistics.median(small.cli_startup))} {'':17}   "
          f"{ms(statistics.median(large.cli_startup))}")
    head_s, head_l = statistics.median(small.times[WAYS[0]]), statistics.median(large.times[WAYS[0]])
    print()
    print(f"anchor: CreateTimeline median, {large.db_bytes / MB:.0f} MB / {small.db_bytes / MB:.0f} MB database: "
          f"{head_l / head_s:.2f}x (target about 1); {head_l * 1000:.1f} ms on the large one (target < 50 ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-scale", type=int, default=1, help="pgbench scale of the small database (default 1)")
    ap.add_argument("--large-scale", type=int, default=70, help="pgbench scale of the large one (default 70, ~1 GB)")
    ap.add_argument("--branches", type=int, default=20, help="branches per way and size (default 20)")
    ap.add_argument("--load", choices=LOADS, default="wal", help="how the data gets in (default: wal)")
    ap.add_argument("--quick", action="store_true", help="smoke run: scales 1 and 2, 5 branches")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    args = ap.parse_args()
    if args.quick:
        args.small_scale, args.large_scale, args.branches = 1, 2, 5

    results = []
    for label, scale in (("small", args.small_scale), ("large", args.large_scale)):
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-branch-{label}-", dir="/tmp"))
        br = build(workdir, scale, args.load)
        try:
            results.append(measure(br, args.branches, label))
        finally:
            br.close(keep=args.keep)
    report(results[0], results[1], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
