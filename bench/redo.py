"""Redo throughput: our redo (in-process, and through the redo pool service) vs a Postgres standby.

    .venv/bin/python bench/redo.py [--scale 5] [--transactions 1000] [--workers 2]

One run, one WAL stream, three replays:

1. A stock Postgres 15 primary; pg_basebackup of it (before any pgbench);
   then pgbench -i and pgbench -c 4 -t N; clean shutdown.
2. standby: a copy of the base backup with standby.signal and the
   primary's WAL copied into its pg_wal, started with pg_ctl; we poll
   pg_last_wal_replay_lsn() until it reaches the end of the WAL. Reported
   twice: from pg_ctl start (postmaster startup included), and from the first
   accepted connection (hot standby opens at the backup's end, so this is
   replay alone).
3. zenith, 1 worker in-process: every record from the backup's start LSN,
   decoded with its CRC checked, applied to every block it references and to
   the visibility-map pages it clears (pgredo.engine), pages kept in a dict.
   Once with the compiled page operations (pgformat._native), once in pure
   Python (the reference implementation), on the same records.
4. zenith pool: `zenith-redo --workers N` over gRPC. The records are grouped
   by page (a chain per page, starting at a full-page image or an
   initializing record, as the page server asks for pages); the chains go
   over one ApplyRecordsStream in batches of 32 and every page comes back.
   The final pages are compared with the in-process replay's.

Prints records/s for each (best of --repeat runs) and our/Postgres ratios.
Records/s counts WAL records of the stream (the standby replays the same
records).

    .venv/bin/python bench/redo.py --profile [--scale 5] [--transactions 1000]

makes the same WAL and, instead of the comparison, profiles the in-process
replay: seconds per record type (decode + redo of each record, timed one by
one) and cProfile's top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg

from pgformat import native
from pgformat.lsn import format_lsn, parse_lsn
from pgformat.rmgr import record_type_name, rmgr_name
from pgformat.xlogreader import RawRecord, iter_segment_records
from pgformat.xlogrecord import decode_record
from pgredo.engine import BufferTag, apply_block, apply_record, implied_tags
from pgredo.errors import RedoError
from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir, run_as_pg_user
from zctl.waldump import collect_segment_files, read_segments
from zproto import common_pb2, redo_pb2, redo_pb2_grpc

BATCH = 32


@dataclass
class Wal:
    waldir: Path
    standby_dir: Path
    start_lsn: int  # the base backup's redo start
    records: list[RawRecord]

    @property
    def end_lsn(self) -> int:
        return self.records[-1].end_lsn


def make_wal(scale: int, transactions: int, workdir: Path) -> Wal:
    primary = PostgresNode(make_pg_owned_dir(workdir / "primary") / "data", free_port())
    primary.initdb()
    primary.configure({"wal_compression": "off", "max_wal_size": "4GB", "checkpoint_timeout": "1h"})
    primary.start()
    standby_dir = make_pg_owned_dir(workdir / "standby") / "data"
    try:
        run_as_pg_user([primary.bin("pg_basebackup"), "-h", primary.host, "-p", str(primary.port),
                        "-U", primary.user, "-D", standby_dir, "-X", "fetch", "-c", "fast"])
        primary.pgbench("-i", "-s", str(scale), "-q")
        primary.pgbench("-c", "4", "-j", "2", "-t", str(transactions), "-n")
    finally:
        primary.stop()
    label = (standby_dir / "backup_label").read_text()
    m = re.search(r"START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+)", label)
    assert m, label
    start = parse_lsn(m[1])
    files = collect_segment_files([primary.waldir])
    records = [r for r in iter_segment_records(read_segments(files)) if r.lsn >= start]
    # The standby reads the same segments from its pg_wal.
    run_as_pg_user(["cp", "-f", *map(str, files), str(standby_dir / "pg_wal")])
    return Wal(primary.waldir, standby_dir, start, records)


def time_standby(wal: Wal, workdir: Path) -> tuple[float, float | None]:
    """(start to caught up, first connection to caught up) for a fresh copy of the standby.

    The second is None when replay had finished before the first connection.
    """
    datadir = make_pg_owned_dir(Path(tempfile.mkdtemp(prefix="standby-", dir=workdir))) / "data"
    run_as_pg_user(["cp", "-a", str(wal.standby_dir), str(datadir)])
    node = PostgresNode(datadir, free_port())
    node.configure({"port": node.port, "hot_standby": True})
    run_as_pg_user(["touch", str(datadir / "standby.signal")])
    t0 = time.perf_counter()
    # pg_ctl without -w: we poll ourselves, finer than pg_ctl's 100 ms.
    run_as_pg_user([node.bin("pg_ctl"), "-D", datadir, "-l", node.logfile, "start"])
    try:
        first_connect: float | None = None
        deadline = t0 + 300
        while time.perf_counter() < deadline:
            try:
                lsn = node.sql("SELECT pg_last_wal_replay_lsn()::text")[0][0]
            except psycopg.OperationalError:
                time.sleep(0.002)
                continue
            now = time.perf_counter()
            if first_connect is None:
                first_connect = now
            if lsn is not None and parse_lsn(lsn) >= wal.end_lsn:
                return now - t0, (now - first_connect) if now > first_connect else None
            time.sleep(0.002)
        raise RuntimeError(f"standby did not catch up; see {node.logfile}")
    finally:
        node.stop(mode="immediate")
        run_as_pg_user(["rm", "-rf", str(datadir)])


def replay_in_process(wal: Wal) -> tuple[float, dict[BufferTag, bytearray], int]:
    """Decode (CRC checked) and redo every record; (seconds, final pages, blocks without a base)."""
    pages: dict[BufferTag, bytearray] = {}
    missing = 0
    t0 = time.perf_counter()
    for raw in wal.records:
        rec = decode_record(raw.data, raw.lsn, raw.end_lsn, verify_crc=True)
        for tag in implied_tags(rec):
            page = pages.get(tag)
            if page is not None:
                pages[tag] = apply_record(tag, page, rec)
        for block in rec.blocks:
            tag = BufferTag(block.rnode, block.forknum, block.blkno)
            base = pages.get(tag)
            if base is None and not block.will_init and not block.apply_image:
                missing += 1
                continue
            try:
                pages[tag] = apply_block(block, base, rec)
            except RedoError as e:
                print(f"redo failed: {e}", file=sys.stderr)
                pages.pop(tag, None)
    return time.perf_counter() - t0, pages, missing


def page_chains(wal: Wal) -> list[tuple[BufferTag, list[RawRecord]]]:
    """Per page, runs of records each starting at an image or an initializing record."""
    done: list[tuple[BufferTag, list[RawRecord]]] = []
    open_chains: dict[BufferTag, list[RawRecord]] = {}
    for raw in wal.records:
        rec = raw.decode()
        for tag in implied_tags(rec):
            chain = open_chains.get(tag)
            if chain is not None:
                chain.append(raw)
        for block in rec.blocks:
            tag = BufferTag(block.rnode, block.forknum, block.blkno)
            if block.will_init or block.apply_image:
                old = open_chains.pop(tag, None)
                if old:
                    done.append((tag, old))
                open_chains[tag] = [raw]
            elif tag in open_chains:
                open_chains[tag].append(raw)
    done.extend(open_chains.items())
    return done


def chain_requests(chains: list[tuple[BufferTag, list[RawRecord]]]) -> list[redo_pb2.ApplyRecordsStreamRequest]:
    msgs = []
    for i in range(0, len(chains), BATCH):
        items = []
        for j in range(i, min(i + BATCH, len(chains))):
            tag, recs = chains[j]
            items.append(redo_pb2.ApplyRecordsItem(request_id=j, request=redo_pb2.ApplyRecordsRequest(
                key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(
                    rel=common_pb2.RelTag(spc_oid=tag.rnode.spc, db_oid=tag.rnode.db, rel_number=tag.rnode.rel,
                                          fork=tag.forknum),
                    blkno=tag.blkno)),
                records=[redo_pb2.RedoRecord(lsn=r.lsn, end_lsn=r.end_lsn, raw=r.data) for r in recs],
                pg_version=15,
            )))
        msgs.append(redo_pb2.ApplyRecordsStreamRequest(items=items))
    return msgs


def start_service(workers: int) -> tuple[subprocess.Popen[str], str]:
    script = Path(sys.executable).parent / "zenith-redo"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "services.redo.main"]
    proc = subprocess.Popen([*cmd, "--listen", "127.0.0.1:0", "--workers", str(workers), "--log-level", "warning",
                             "--insecure"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"zenith-redo listening on (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"zenith-redo did not start: {line!r}")
    return proc, m[1]


def replay_through_pool(
    workers: int, chains: list[tuple[BufferTag, list[RawRecord]]], msgs: list[redo_pb2.ApplyRecordsStreamRequest],
    repeat: int,
) -> tuple[float, dict[int, redo_pb2.ApplyRecordsResultItem]]:
    """Best wall time of `repeat` streams of every chain, and the last run's answers."""
    proc, address = start_service(workers)
    try:
        opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
        with grpc.insecure_channel(address, options=opts) as ch:
            stub = redo_pb2_grpc.RedoStub(ch)
            # Warm up: one small stream so connection setup is not measured.
            list(stub.ApplyRecordsStream(iter(msgs[:1])))
            best = float("inf")
            answers: dict[int, redo_pb2.ApplyRecordsResultItem] = {}
            for _ in range(repeat):
                answers = {}

                def requests() -> Iterator[redo_pb2.ApplyRecordsStreamRequest]:
                    yield from msgs

                t0 = time.perf_counter()
                for resp in stub.ApplyRecordsStream(requests()):
                    for item in resp.items:
                        answers[item.request_id] = item
                best = min(best, time.perf_counter() - t0)
                assert len(answers) == len(chains), (len(answers), len(chains))
        return best, answers
    finally:
        proc.terminate()
        proc.wait(30)


def profile_in_process(wal: Wal, top: int = 30) -> None:
    """Print where the in-process replay spends its time: per record type, then per function."""
    per_type: dict[str, list[float]] = {}  # type -> [records, seconds, block applications]
    pages: dict[BufferTag, bytearray] = {}
    clock = time.perf_counter
    t_all = clock()
    for raw in wal.records:
        t0 = clock()
        rec = decode_record(raw.data, raw.lsn, raw.end_lsn, verify_crc=True)
        for tag in implied_tags(rec):
            page = pages.get(tag)
            if page is not None:
                pages[tag] = apply_record(tag, page, rec)
        nblocks = 0
        for block in rec.blocks:
            tag = BufferTag(block.rnode, block.forknum, block.blkno)
            base = pages.get(tag)
            if base is None and not block.will_init and not block.apply_image:
                continue
            nblocks += 1
            try:
                pages[tag] = apply_block(block, base, rec)
            except RedoError:
                pages.pop(tag, None)
        name = f"{rmgr_name(rec.rmid)}/{record_type_name(rec.rmid, rec.info)}"
        if any(b.apply_image for b in rec.blocks):
            name += " +FPI"
        entry = per_type.setdefault(name, [0, 0.0, 0])
        entry[0] += 1
        entry[1] += clock() - t0
        entry[2] += nblocks
    total = clock() - t_all
    print(f"per record type (decode with CRC + redo of every block; timed one by one, total {total:.2f} s)")
    print(f"{'record type':40} {'records':>8} {'blocks':>8} {'seconds':>8} {'share':>6} {'us/record':>10}")
    for name, (count, secs, nblocks) in sorted(per_type.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:40} {int(count):8d} {int(nblocks):8d} {secs:8.3f} {100 * secs / total:5.1f}% "
              f"{1e6 * secs / count:10.1f}")
    prof = cProfile.Profile()
    prof.enable()
    replay_in_process(wal)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print("\ncProfile of replay_in_process, by own time")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()
                    and not line.startswith(("   Ordered by", "   List reduced"))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--transactions", type=int, default=1000, help="pgbench transactions per client (4 clients)")
    ap.add_argument("--workers", default=str(os.cpu_count() or 1),
                    help="pool sizes to measure, comma-separated (default: CPUs)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each replay; the best is reported")
    ap.add_argument("--profile", action="store_true", help="profile the in-process replay instead of comparing")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zenith-bench-", dir="/tmp") as tmp:
        workdir = make_pg_owned_dir(Path(tmp))
        wal = make_wal(args.scale, args.transactions, workdir)
        if args.profile:
            print(f"WAL: {len(wal.records)} records, {sum(len(r.data) for r in wal.records) / 1e6:.1f} MB "
                  f"(pgbench -i -s {args.scale}, 4 clients x {args.transactions} transactions)")
            profile_in_process(wal)
            return
        n = len(wal.records)
        mb = sum(len(r.data) for r in wal.records) / 1e6
        standby_runs = [time_standby(wal, workdir) for _ in range(args.repeat)]
        standby_s = min(total for total, _ in standby_runs)
        standby_replay_s = min((r for _, r in standby_runs if r is not None), default=None)
        single_s = pure_s = float("inf")
        for _ in range(args.repeat):
            s, pages, missing = replay_in_process(wal)
            single_s = min(single_s, s)
        if native.available():
            native.use_compiled(False)
            for _ in range(args.repeat):
                s, pure_pages, _ = replay_in_process(wal)
                pure_s = min(pure_s, s)
            native.use_compiled(True)
            assert pure_pages == pages, "pure Python and compiled redo disagree"
        chains = page_chains(wal)
        msgs = chain_requests(chains)
        applications = sum(len(c) for _, c in chains)
        pool_runs = []
        for w in (int(x) for x in args.workers.split(",")):
            pool_s, answers = replay_through_pool(w, chains, msgs, args.repeat)
            # Each page's last chain must give the page the in-process replay ended with.
            last: dict[BufferTag, int] = {}
            for i, (tag, _) in enumerate(chains):
                last[tag] = i
            errors = sum(1 for a in answers.values() if a.WhichOneof("result") != "page")
            same = sum(1 for tag, i in last.items()
                       if answers[i].WhichOneof("result") == "page" and tag in pages
                       and answers[i].page.page == bytes(pages[tag]))
            pool_runs.append((w, pool_s, errors, same, len(last)))
    print(f"WAL: {n} records, {mb:.1f} MB, {format_lsn(wal.start_lsn)}..{format_lsn(wal.end_lsn)} "
          f"(pgbench -i -s {args.scale}, 4 clients x {args.transactions} transactions)")
    print(f"pages: {len(pages)}; blocks without a base (skipped): {missing}; "
          f"page chains: {len(chains)} ({applications} record applications)")
    print(f"best of {args.repeat} runs each")
    print(f"{'':34} {'seconds':>8} {'records/s':>11} {'vs standby':>11} {'vs replay only':>15}")
    rate = n / standby_s
    replay_rate = n / standby_replay_s if standby_replay_s else None

    def row(label: str, seconds: float, extra: str = "") -> None:
        r = n / seconds
        vs_replay = f"{r / replay_rate:14.2f}x" if replay_rate else f"{'n/a':>15}"
        print(f"{label:34} {seconds:8.2f} {r:11.0f} {r / rate:10.2f}x {vs_replay}{extra}")

    row("postgres standby, start->caught up", standby_s)
    if standby_replay_s:
        row("postgres standby, replay only", standby_replay_s)
    else:
        print("postgres standby, replay only: n/a (replay done before the first connection; use more WAL)")
    row("zenith in-process, 1 worker", single_s, "" if native.available() else "   (pgformat._native not built)")
    if pure_s != float("inf"):
        row("zenith in-process, pure Python", pure_s, "   (pgformat._native switched off; same pages)")
    for w, s, errors, same, total in pool_runs:
        row(f"zenith pool, {w} worker{'s' if w > 1 else ''} (gRPC)", s,
            f"   errors {errors}, final pages equal {same}/{total}")


if __name__ == "__main__":
    main()
