"""Synchronous commit through the page server, and WAL ingest throughput, against a vanilla standby.

    .venv/bin/python bench/pageserver_ingest.py [--scale 10] [--duration 15] [--backlog-mb 200] [--fsync on]

One primary (stock Postgres 15), one run, two parts:

(a) Synchronous commit. pgbench -c 4 -j 2 -T DURATION (the built-in TPC-B-like
    script), three times on the same primary:
    - no synchronous standby (context only);
    - synchronous_standby_names = our walreceiver (`zctl start` + `zctl
      attach`; commits wait until the walreceiver has fsynced the commit
      record into its segment files; the page server gets it from there);
    - synchronous_standby_names = a vanilla hot standby (pg_basebackup -R,
      started, streaming), with our services stopped.
    Prints TPS of each and the ratio ours / vanilla.

(b) Ingest throughput over a backlog. With the walreceiver detached from the
    branch (Detach over gRPC; its replication slot keeps the WAL) and a base
    backup taken for a new vanilla standby (and the page server caught up to
    just after it), pgbench generates BACKLOG MB of WAL.
    Then:
    - ours: Attach again; time until the walreceiver's durable WAL reaches
      the primary's flush LSN (receipt, CRC check, write, fsync), and until
      the page server's last record does, i.e. GetPage at latest answers
      there (plus decoding, gRPC, storing; no page is materialized);
    - vanilla: start the standby from the base backup; time until its replay
      LSN reaches the same LSN (receipt, write, fsync and redo of every record;
      the clock includes its start-up).
    Prints MB/s of each (over the same WAL range, from where the page server
    resumes; the standby starts a few records earlier, at its backup's
    checkpoint) and records/s (each over its own range), and the ratio.

Both standbys run on the same machine as the primary and the benchmark (2
cores here), so every number includes sharing the CPUs with the primary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from polling import wait_for  # noqa: E402
from zctl_util import make_repo, service_channel, zctl  # noqa: E402

from pgformat.lsn import format_lsn, parse_lsn  # noqa: E402
from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir, run_as_pg_user  # noqa: E402
from zctl.waldump import iter_file_records  # noqa: E402
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc, walreceiver_pb2, walreceiver_pb2_grpc  # noqa: E402

TENANT = common_pb2.TenantId(id="0" * 32)
VANILLA_APP = "vanilla_standby"
MB = 1 << 20


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)



def flush_lsn(node: PostgresNode) -> int:
    return parse_lsn(node.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0])


def pgbench_tps(node: PostgresNode, duration: int) -> float:
    out = node.pgbench("-n", "-c", "4", "-j", "2", "-T", str(duration))
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if not m:
        raise RuntimeError(f"no tps in pgbench output:\n{out}")
    return float(m.group(1))


def set_sync(node: PostgresNode, app: str | None) -> None:
    if app is None:
        node.execute("ALTER SYSTEM RESET synchronous_standby_names")
    else:
        node.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{app}'")
    node.sql("SELECT pg_reload_conf()")
    if app is not None:
        wait_for(lambda: node.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                                  (app,)) == [("sync",)], 60, f"{app} to be the synchronous standby")


def make_standby(primary: PostgresNode, workdir: Path, name: str, gucs: dict[str, object]) -> PostgresNode:
    """pg_basebackup -R (application_name in the conninfo it writes) into a new, stopped standby."""
    datadir = make_pg_owned_dir(workdir / name) / "data"
    conninfo = f"host={primary.host} port={primary.port} user={primary.user} application_name={VANILLA_APP}"
    run_as_pg_user([primary.bin("pg_basebackup"), "-d", conninfo, "-D", datadir, "-X", "stream", "-c", "fast", "-R"])
    node = PostgresNode(datadir, free_port())
    node.configure({**gucs, "port": node.port, "hot_standby": True})
    return node


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_records(waldir: Path, start: int, end: int) -> int:
    return sum(1 for r in iter_file_records([waldir]) if start <= r.lsn and r.end_lsn <= end)


def pageserver_lsn(stub: pageserver_pb2_grpc.PageServerStub, timeline: str) -> int:
    """The end of the page server's last record: GetPage at latest answers there."""
    info = stub.GetTimeline(pageserver_pb2.GetTimelineRequest(
        tenant=TENANT, timeline=common_pb2.TimelineId(id=timeline)), timeout=10)
    return int(info.last_record_lsn)


def walreceiver_lsn(stub: walreceiver_pb2_grpc.WalReceiverStub, timeline: str) -> int:
    """The end of the WAL the walreceiver holds durably (what it reports flushed)."""
    attachments = stub.Status(walreceiver_pb2.StatusRequest(
        tenant=TENANT, timeline=common_pb2.TimelineId(id=timeline)), timeout=10).attachments
    return int(attachments[0].durable_lsn) if attachments else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale (default 10)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per pgbench TPS run (default 15)")
    ap.add_argument("--backlog-mb", type=int, default=200, help="WAL backlog to catch up, MB (default 200)")
    ap.add_argument("--fsync", choices=("on", "off"), default="on", help="fsync on the primary and the vanilla "
                    "standby (the walreceiver and the page server always fsync; default on)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    workdir = make_pg_owned_dir(Path(tempfile.mkdtemp(prefix="bench-ingest-", dir="/tmp")))
    gucs: dict[str, object] = {"fsync": args.fsync, "autovacuum": "off", "max_wal_size": "4GB",
                               "wal_keep_size": "4GB", "checkpoint_timeout": "1h"}
    primary = PostgresNode(make_pg_owned_dir(workdir / "primary") / "data", free_port())
    repo = make_repo(workdir / "repo")
    standbys: list[PostgresNode] = []
    try:
        primary.initdb()
        primary.configure(gucs)
        primary.start()
        log(f"pgbench -i -s {args.scale}")
        primary.pgbench("-i", "-s", str(args.scale), "-q")
        db_mb = primary.sql("SELECT pg_database_size('postgres')")[0][0] / MB

        # -- (a) synchronous commit ---------------------------------------------------------
        log("zctl start + attach")
        zctl(repo, "start")
        zctl(repo, "attach", "--primary", primary.connstr(), "--branch", "main")
        status = json.loads(zctl(repo, "status", "--json").stdout)
        timeline = status["attachments"][0]["timeline"]
        ps = pageserver_pb2_grpc.PageServerStub(service_channel(repo, "pageserver"))
        wr = walreceiver_pb2_grpc.WalReceiverStub(service_channel(repo, "walreceiver"))
        target = flush_lsn(primary)
        wait_for(lambda: pageserver_lsn(ps, timeline) >= target, 300, "the page server to catch up after attach")

        log(f"pgbench -T {args.duration}: no synchronous standby")
        tps_async = pgbench_tps(primary, args.duration)
        log(f"pgbench -T {args.duration}: synchronous standby = our walreceiver")
        set_sync(primary, f"zenith_walreceiver_{timeline}")
        tps_ours = pgbench_tps(primary, args.duration)
        set_sync(primary, None)

        # Our services stay up but idle (detached) while the vanilla standby is measured.
        slot = wr.Status(walreceiver_pb2.StatusRequest(all_tenants=True), timeout=10).attachments[0].slot_name
        wr.Detach(walreceiver_pb2.DetachRequest(tenant=TENANT, timeline=common_pb2.TimelineId(id=timeline)),
                  timeout=60)
        log("vanilla standby: pg_basebackup -R, start")
        standby = make_standby(primary, workdir, "standby-a", gucs)
        standbys.append(standby)
        standby.start()
        set_sync(primary, VANILLA_APP)
        log(f"pgbench -T {args.duration}: synchronous standby = vanilla hot standby")
        tps_vanilla = pgbench_tps(primary, args.duration)
        set_sync(primary, None)
        standby.stop()

        # -- (b) ingest throughput over a backlog --------------------------------------------------
        # Both start from about the same LSN: the base backup's checkpoint, and the page server
        # caught up to just after it and detached again.
        log("vanilla standby for the backlog: pg_basebackup -R (not started)")
        standby_b = make_standby(primary, workdir, "standby-b", gucs)
        standbys.append(standby_b)
        epoch = ps.GetTimeline(pageserver_pb2.GetTimelineRequest(
            tenant=TENANT, timeline=common_pb2.TimelineId(id=timeline)), timeout=10).writer.epoch
        attach = walreceiver_pb2.AttachRequest(tenant=TENANT, timeline=common_pb2.TimelineId(id=timeline),
                                               primary_conninfo=primary.connstr(), slot_name=slot,
                                               writer_epoch=epoch)
        wr.Attach(attach, timeout=60)
        primary.sql("SELECT txid_current()")
        caught_up = flush_lsn(primary)
        wait_for(lambda: pageserver_lsn(ps, timeline) >= caught_up, 600, "the page server to catch up")
        wr.Detach(walreceiver_pb2.DetachRequest(tenant=TENANT, timeline=common_pb2.TimelineId(id=timeline)),
                  timeout=60)
        ours_from = pageserver_lsn(ps, timeline)
        vanilla_from = parse_lsn((standby_b.datadir / "backup_label").read_text().split("START WAL LOCATION: ")[1]
                                 .split()[0])
        log(f"generating {args.backlog_mb} MB of pgbench WAL")
        begin = flush_lsn(primary)
        while flush_lsn(primary) - begin < args.backlog_mb * MB:
            primary.pgbench("-n", "-c", "4", "-j", "2", "-T", "5")
        primary.sql("SELECT txid_current()")
        target = flush_lsn(primary)

        log("ours: Attach; waiting for the walreceiver and the page server to reach the primary's flush LSN")
        pids = {s["name"]: s["pid"] for s in status["services"]}
        cpu0 = {name: cpu_seconds(pids[name]) for name in ("walreceiver", "pageserver")}
        t0 = time.perf_counter()
        wr.Attach(attach, timeout=60)
        wal_s = 0.0
        deadline = t0 + 3600
        while pageserver_lsn(ps, timeline) < target:
            if not wal_s and walreceiver_lsn(wr, timeline) >= target:
                wal_s = time.perf_counter() - t0
            if time.perf_counter() > deadline:
                raise RuntimeError("the page server did not catch up within an hour")
            time.sleep(0.02)
        ours_s = time.perf_counter() - t0
        wal_s = wal_s or ours_s
        cpu = {name: cpu_seconds(pids[name]) - cpu0[name] for name in cpu0}

        log("vanilla: start the standby; waiting for its replay LSN to reach the same LSN")
        t0 = time.perf_counter()
        standby_b.start(timeout=3600)
        wait_for(lambda: parse_lsn(standby_b.sql("SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')::text")[0][0])
                 >= target, 3600, "the vanilla standby to catch up")
        vanilla_s = time.perf_counter() - t0
        standby_b.stop()

        # MB/s over the same range for both (the standby also replays the few records between its
        # backup's start and the page server's start, and skips the segment switch there).
        ours_mb = vanilla_mb = (target - ours_from) / MB
        ours_n, vanilla_n = count_records(primary.waldir, ours_from, target), \
            count_records(primary.waldir, vanilla_from, target)
        print(f"primary: pgbench scale {args.scale} ({db_mb:.0f} MB), fsync={args.fsync}, 2 cores shared by all")
        print()
        print(f"(a) pgbench -c 4 -j 2 -T {args.duration}, TPC-B-like       tps")
        print(f"    no synchronous standby                  {tps_async:8.1f}")
        print(f"    sync standby: zenith walreceiver        {tps_ours:8.1f}")
        print(f"    sync standby: vanilla hot standby       {tps_vanilla:8.1f}")
        print(f"    ratio zenith / vanilla: {tps_ours / tps_vanilla:.2f}x")
        print()
        print(f"(b) catching up a pgbench WAL backlog up to {format_lsn(target)}")
        print("                                         MB   records   seconds     MB/s   records/s")
        print(f"    zenith walreceiver (-> fsynced) {ours_mb:8.1f}  {ours_n:8d}  {wal_s:8.1f}  {ours_mb / wal_s:7.1f}"
              f"  {ours_n / wal_s:10.0f}")
        print(f"    zenith (Attach -> GetPage@latest) {ours_mb:6.1f}  {ours_n:8d}  {ours_s:8.1f}  "
              f"{ours_mb / ours_s:7.1f}  {ours_n / ours_s:10.0f}")
        print(f"    vanilla (start -> replayed)     {vanilla_mb:8.1f}  {vanilla_n:8d}  {vanilla_s:8.1f}"
              f"  {vanilla_mb / vanilla_s:7.1f}  {vanilla_n / vanilla_s:10.0f}")
        print(f"    ratio zenith / vanilla (MB/s): walreceiver {(ours_mb / wal_s) / (vanilla_mb / vanilla_s):.2f}x, "
              f"page server {(ours_mb / ours_s) / (vanilla_mb / vanilla_s):.2f}x")
        print(f"    zenith CPU while catching up: walreceiver {cpu['walreceiver']:.1f} s, "
              f"page server {cpu['pageserver']:.1f} s")
    finally:
        for node in standbys:
            node.stop(mode="immediate")
        zctl(repo, "stop", check=False)
        primary.stop(mode="immediate")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
