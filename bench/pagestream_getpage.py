"""GetPage through the libpq shim's pagestream vs the page server's gRPC, same run, same pages.

    .venv/bin/python bench/pagestream_getpage.py [--scale 10] [--pages 4000]

Builds a pgbench database on a fresh Postgres 15, imports its base backup into
a page server process and ingests a pgbench run's WAL, starts the libpq shim
(`zenith-pgshim`) in front, warms the page server's cache, then reads the same
pages of pgbench_accounts four ways from one client process:
- gRPC GetPage unary, one at a time: latency p50/p99 (the anchor for latency);
- pagestream_v3 one at a time (send, wait for the answer): latency p50/p99;
- gRPC GetPages streamed, batches of 32: pages/s (the anchor for throughput);
- pagestream_v3 pipelined: a sliding window of 32 requests in flight, and
  bursts of 32 (send 32, flush, read 32 — how a compute's prefetch sends): pages/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchutil import percentile, scratch_primary  # noqa: E402

from pageserver_util import import_backup, push_wal, rel_key, take_base_backup  # noqa: E402
from psycopg import pq  # noqa: E402
from shim_util import PageServerProcess, RunningShim  # noqa: E402

from pgformat import pagestream as ps  # noqa: E402
from zproto import common_pb2, pageserver_pb2  # noqa: E402

TIMELINE = "c" * 32
TENANT = "0" * 32
WINDOW = 32



class Pagestream:
    def __init__(self, host: str, port: int) -> None:
        self.conn = pq.PGconn.connect(f"host={host} port={port} user=bench dbname=bench".encode())
        self.conn.send_query(f"pagestream_v3 {TENANT} {TIMELINE}".encode())
        res = self.conn.get_result()
        assert res is not None and res.status == pq.ExecStatus.COPY_BOTH
        self.reqid = 0

    def send(self, rel: common_pb2.RelTag, blk: int, lsn: int) -> None:
        self.reqid += 1
        self.conn.put_copy_data(ps.build_request(3, ps.RequestTag.GET_PAGE, lsn, lsn, reqid=self.reqid,
                                                 spc=rel.spc_oid, db=rel.db_oid, rel=rel.rel_number, blkno=blk))

    def receive(self) -> bytes:
        self.conn.flush()
        n, data = self.conn.get_copy_data(0)
        assert n > 0, self.conn.error_message
        resp = ps.parse_response(bytes(data), 3, ps.RequestTag.GET_PAGE)
        assert resp.tag == ps.ResponseTag.GET_PAGE, resp.error
        return resp.page

    def close(self) -> None:
        self.conn.put_copy_end()
        self.conn.flush()
        self.conn.finish()


def latencies(blocks: list[int], read: Callable[[int], object]) -> list[float]:
    """Seconds each read took, one at a time."""
    lat = []
    for blk in blocks:
        s = time.perf_counter()
        read(blk)
        lat.append(time.perf_counter() - s)
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--pages", type=int, default=4000, help="pages read per measurement")
    args = ap.parse_args()
    with scratch_primary() as (node, work):
        node.pgbench("-i", "-s", str(args.scale), "-q")
        backup = take_base_backup(node, work / "backup")
        server = PageServerProcess(work / "repo")
        shim = None
        try:
            stub = server.stub
            import_backup(stub, backup, TIMELINE)
            node.pgbench("-c", "4", "-j", "2", "-t", "1000", "-n")
            lsn = push_wal(stub, node.waldir, TIMELINE, 0, node.current_lsn())
            shim = RunningShim(server.address)
            rel = rel_key(node, "pgbench_accounts")
            nblocks = node.sql("SELECT pg_relation_size('pgbench_accounts') / 8192")[0][0]
            blocks = list(range(0, nblocks, max(1, nblocks // args.pages)))[: args.pages]
            ids = dict(tenant=common_pb2.TenantId(id=TENANT), timeline=common_pb2.TimelineId(id=TIMELINE))

            def grpc_get(blk: int) -> bytes:
                return bytes(stub.GetPage(pageserver_pb2.GetPageRequest(
                    key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=blk)),
                    lsn=common_pb2.RequestLsn(lsn=lsn), **ids)).page)

            stream = Pagestream(shim.host, shim.port)

            def pagestream_get(blk: int) -> bytes:
                stream.send(rel, blk, lsn)
                return stream.receive()

            for blk in blocks:  # warm the page server's cache; check both paths agree
                assert grpc_get(blk) == pagestream_get(blk)
            lat_grpc = latencies(blocks, grpc_get)
            lat_ps = latencies(blocks, pagestream_get)

            def batches():  # type: ignore[no-untyped-def]
                for i in range(0, len(blocks), WINDOW):
                    yield pageserver_pb2.GetPagesRequest(pages=[pageserver_pb2.PageRequestItem(
                        request_id=b, key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=b)),
                        lsn=common_pb2.RequestLsn(lsn=lsn)) for b in blocks[i:i + WINDOW]], **ids)

            t0 = time.perf_counter()
            n = sum(len(r.pages) for r in stub.GetPages(batches()))
            rate_grpc_stream = n / (time.perf_counter() - t0)

            t0 = time.perf_counter()
            inflight = 0
            for blk in blocks:
                stream.send(rel, blk, lsn)
                inflight += 1
                if inflight == WINDOW:
                    stream.receive()
                    inflight -= 1
            while inflight:
                stream.receive()
                inflight -= 1
            rate_ps_pipe = len(blocks) / (time.perf_counter() - t0)

            # Bursts, as a compute's prefetch sends them: 32 requests, one flush, 32 answers.
            t0 = time.perf_counter()
            for i in range(0, len(blocks), WINDOW):
                burst = blocks[i:i + WINDOW]
                for blk in burst:
                    stream.send(rel, blk, lsn)
                for _ in burst:
                    stream.receive()
            rate_ps_burst = len(blocks) / (time.perf_counter() - t0)
            stream.close()
        finally:
            if shim is not None:
                shim.close()
            server.close()

    ms = 1000
    print(f"pgbench scale {args.scale}; {len(blocks)} pages of pgbench_accounts per run, cache warm")
    print(f"{'':40} {'p50 ms':>8} {'p99 ms':>8} {'pages/s':>9}")
    print(f"{'anchor: gRPC GetPage unary':40} {statistics.median(lat_grpc) * ms:8.2f} "
          f"{percentile(lat_grpc, .99) * ms:8.2f} {1 / statistics.mean(lat_grpc):9.0f}")
    print(f"{'pagestream_v3 one at a time':40} {statistics.median(lat_ps) * ms:8.2f} "
          f"{percentile(lat_ps, .99) * ms:8.2f} {1 / statistics.mean(lat_ps):9.0f}")
    print(f"{'anchor: gRPC GetPages stream x32':40} {'':8} {'':8} {rate_grpc_stream:9.0f}")
    print(f"{'pagestream_v3 sliding window of 32':40} {'':8} {'':8} {rate_ps_pipe:9.0f}")
    print(f"{'pagestream_v3 bursts of 32 (prefetch)':40} {'':8} {'':8} {rate_ps_burst:9.0f}")
    print(f"latency ratio pagestream/gRPC p50 {statistics.median(lat_ps) / statistics.median(lat_grpc):.2f}x, "
          f"p99 {percentile(lat_ps, .99) / percentile(lat_grpc, .99):.2f}x; "
          f"throughput ratio pagestream/gRPC stream: bursts {rate_ps_burst / rate_grpc_stream:.2f}x, "
          f"sliding window {rate_ps_pipe / rate_grpc_stream:.2f}x")


if __name__ == "__main__":
    main()
