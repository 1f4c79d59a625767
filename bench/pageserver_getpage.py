"""GetPage latency and throughput, and page server memory against database size.

    .venv/bin/python bench/pageserver_getpage.py [--scale 10]

Builds a pgbench database on a fresh Postgres 15, imports a base backup of it
into a page server running as its own process (`zenith-pageserver`, redo in
process), ingests the pgbench run's WAL, then measures from a client process:
- GetPage unary: p50/p99 latency and pages/s, at latest and at an old LSN;
- GetPages streamed (batches of 32): pages/s at latest;
- the same pages read from the primary with pageinspect (get_raw_page through
  psycopg, one query per page) as the anchor;
- page server RSS after import, after ingest and after the reads, next to the
  database size.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchutil import percentile, scratch_primary  # noqa: E402

from pageserver_util import import_backup, push_wal, rel_key, take_base_backup  # noqa: E402

from zctl.postgres import free_port  # noqa: E402
from zctl.supervisor import health_check  # noqa: E402
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc  # noqa: E402

TIMELINE = "b" * 32
TENANT = common_pb2.TenantId(id="0" * 32)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0



def unary(stub: pageserver_pb2_grpc.PageServerStub, rel: common_pb2.RelTag, blocks: list[int], lsn: int | None) -> tuple[list[float], float]:
    lat = []
    t0 = time.perf_counter()
    for blk in blocks:
        req_lsn = common_pb2.RequestLsn(latest=True) if lsn is None else common_pb2.RequestLsn(lsn=lsn)
        s = time.perf_counter()
        stub.GetPage(pageserver_pb2.GetPageRequest(
            tenant=TENANT, timeline=common_pb2.TimelineId(id=TIMELINE),
            key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=blk)), lsn=req_lsn))
        lat.append(time.perf_counter() - s)
    return lat, len(blocks) / (time.perf_counter() - t0)


def streamed(stub: pageserver_pb2_grpc.PageServerStub, rel: common_pb2.RelTag, blocks: list[int]) -> float:
    def batches():  # type: ignore[no-untyped-def]
        for i in range(0, len(blocks), 32):
            yield pageserver_pb2.GetPagesRequest(tenant=TENANT, timeline=common_pb2.TimelineId(id=TIMELINE), pages=[
                pageserver_pb2.PageRequestItem(request_id=b, key=common_pb2.PageKey(
                    rel_block=common_pb2.RelBlock(rel=rel, blkno=b)), lsn=common_pb2.RequestLsn(latest=True))
                for b in blocks[i:i + 32]])

    t0 = time.perf_counter()
    n = sum(len(r.pages) for r in stub.GetPages(batches()))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--pages", type=int, default=2000, help="pages read per measurement")
    args = ap.parse_args()
    with scratch_primary() as (node, work):
        node.execute("CREATE EXTENSION pageinspect")
        node.pgbench("-i", "-s", str(args.scale), "-q")
        backup = take_base_backup(node, work / "backup")
        db_mb = node.sql("SELECT pg_database_size('postgres')")[0][0] / 1e6
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "services.pageserver.main", "--repo", str(work / "repo"),
                                 "--listen", f"127.0.0.1:{port}", "--log-level", "warning", "--insecure"])
        try:
            while not health_check(f"127.0.0.1:{port}", "zenith.v1.PageServer"):
                time.sleep(0.1)
            stub = pageserver_pb2_grpc.PageServerStub(grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]))
            rss_start = rss_mb(proc.pid)
            import_backup(stub, backup, TIMELINE)
            rss_import = rss_mb(proc.pid)
            node.pgbench("-c", "4", "-j", "2", "-t", "1000", "-n")
            old_lsn = node.current_lsn()
            node.pgbench("-c", "4", "-j", "2", "-t", "1000", "-n")
            push_wal(stub, node.waldir, TIMELINE, 0, node.current_lsn())
            rss_ingest = rss_mb(proc.pid)

            rel = rel_key(node, "pgbench_accounts")
            nblocks = node.sql("SELECT pg_relation_size('pgbench_accounts') / 8192")[0][0]
            step = max(1, nblocks // args.pages)
            blocks = list(range(0, nblocks, step))[: args.pages]
            lat_latest, rate_latest = unary(stub, rel, blocks, None)
            lat_old, rate_old = unary(stub, rel, blocks, old_lsn)
            rate_stream = streamed(stub, rel, blocks)
            rss_reads = rss_mb(proc.pid)

            with node.connect() as conn:
                t0 = time.perf_counter()
                for blk in blocks:
                    conn.execute("SELECT get_raw_page('pgbench_accounts', %s)", (blk,)).fetchone()
                anchor_rate = len(blocks) / (time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait()

    ms = 1000
    print(f"database {db_mb:.0f} MB (pgbench scale {args.scale}); {len(blocks)} pages of pgbench_accounts per run")
    print(f"{'':34} {'p50 ms':>8} {'p99 ms':>8} {'pages/s':>9}")
    print(f"{'GetPage unary @latest':34} {statistics.median(lat_latest) * ms:8.2f} {percentile(lat_latest, .99) * ms:8.2f} {rate_latest:9.0f}")
    print(f"{'GetPage unary @old LSN':34} {statistics.median(lat_old) * ms:8.2f} {percentile(lat_old, .99) * ms:8.2f} {rate_old:9.0f}")
    print(f"{'GetPages stream x32 @latest':34} {'':8} {'':8} {rate_stream:9.0f}")
    print(f"{'anchor: get_raw_page via psycopg':34} {'':8} {'':8} {anchor_rate:9.0f}")
    print(f"ratio streamed GetPages / get_raw_page: {rate_stream / anchor_rate:.2f}x")
    print(f"page server RSS: {rss_start:.0f} MB idle, {rss_import:.0f} MB after import, "
          f"{rss_ingest:.0f} MB after ingest, {rss_reads:.0f} MB after reads (database {db_mb:.0f} MB)")


if __name__ == "__main__":
    main()
