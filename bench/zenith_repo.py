"""A zctl repository holding a pgbench database, loaded the way an operator would load it.

Shared by bench/branch_create.py and bench/compute_start.py. Two ways in:

- "wal" (default): `zctl init` (services, branch main, compute main), then
  `pgbench -i -s SCALE` against compute main. Every byte reaches the page
  server as WAL: the compute streams it to the walreceiver, which is its
  synchronous standby, so pgbench's commits return only once the page server
  holds them. Pages are stored as WAL records; the page server redoes them
  when they are read.
- "attach": a stock primary of our own, `pgbench -i -s SCALE` on it, then
  `zctl start` + `zctl attach` (pg_basebackup of the primary imported as
  branch main, then its WAL followed). Pages are stored as images.

In both, `primary` is a stock Postgres 15 server holding the same database
as branch main: compute main, or the attached primary. It is the anchor's
vanilla primary.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pageserver_ingest import flush_lsn, log, pageserver_lsn  # noqa: E402
from polling import wait_for  # noqa: E402
from zctl_util import make_repo, service_channel, zctl  # noqa: E402

from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir  # noqa: E402
from zctl.supervisor import LocalCluster  # noqa: E402
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc  # noqa: E402

TENANT = common_pb2.TenantId(id="0" * 32)
LOADS = ("wal", "attach")


@dataclass
class BenchRepo:
    """A running zctl repository whose branch main holds a pgbench database."""

    workdir: Path
    repo: Path
    load: str
    scale: int
    primary: PostgresNode
    stub: pageserver_pb2_grpc.PageServerStub
    main: pageserver_pb2.TimelineInfo = field(init=False)
    lsn_before_load: int = 0  # main's last LSN before pgbench -i: a past branch point
    load_seconds: float = 0.0  # pgbench -i (wal) or zctl attach (attach), until the page server holds it all
    db_bytes: int = 0  # pg_database_size('postgres') on the primary
    layer_seconds: float = 0.0  # from the end of the load until the page server's image layer covered it
    layer_forced: bool = False  # the bench asked for it (CreateImageLayer): the background one did not cover it

    def zctl(self, *args: str, timeout: float = 300) -> str:
        return zctl(self.repo, *args, timeout=timeout).stdout

    def refresh_main(self) -> pageserver_pb2.TimelineInfo:
        tls = self.stub.ListTimelines(pageserver_pb2.ListTimelinesRequest(tenant=TENANT), timeout=10).timelines
        self.main = next(t for t in tls if t.name == "main")
        return self.main

    def repository_bytes(self) -> int:
        """Bytes on disk under the page server's directory (SQLite database, its WAL, image layers)."""
        return sum(f.stat().st_size for f in (self.repo / "pageserver").rglob("*") if f.is_file())

    def pageserver_log_size(self) -> int:
        path = self.repo / "logs" / "pageserver.log"
        return path.stat().st_size if path.exists() else 0

    def close(self, keep: bool = False) -> None:
        zctl(self.repo, "stop", check=False, timeout=120)  # computes first, then the services
        if self.load == "attach":
            self.primary.stop(mode="immediate")
        if keep:
            log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def build(workdir: Path, scale: int, load: str = "wal") -> BenchRepo:
    """A repository under `workdir` (made reachable for the postgres OS user) with pgbench scale `scale` on main."""
    if load not in LOADS:
        raise ValueError(f"load must be one of {LOADS}, got {load!r}")
    make_pg_owned_dir(workdir)
    repo = make_repo(workdir / "repo")
    LocalCluster(repo).security.ensure()  # the keys zctl init would make, so the channel has its token now
    stub = pageserver_pb2_grpc.PageServerStub(service_channel(repo, "pageserver"))
    if load == "wal":
        log(f"zctl init ({repo})")
        zctl(repo, "init", "--pg-port", str(free_port()))
        port = next(c["port"] for c in json.loads(zctl(repo, "pg", "list", "--json").stdout) if c["name"] == "main")
        primary = PostgresNode(repo / "computes" / "main" / "pgdata", port)
        br = BenchRepo(workdir, repo, load, scale, primary, stub)
        br.lsn_before_load = br.refresh_main().last_record_lsn
        log(f"pgbench -i -s {scale} against compute main (WAL -> walreceiver -> page server)")
        t0 = time.perf_counter()
        primary.pgbench("-i", "-s", str(scale), "-q")
        target = flush_lsn(primary)
        wait_for(lambda: pageserver_lsn(stub, br.main.timeline.id) >= target, 3600, "the page server to catch up")
        br.load_seconds = time.perf_counter() - t0
    else:
        primary = PostgresNode(make_pg_owned_dir(workdir / "primary") / "data", free_port())
        primary.initdb()
        primary.configure({"autovacuum": "off", "max_wal_size": "4GB"})
        primary.start()
        log(f"pgbench -i -s {scale} on a stock primary")
        primary.pgbench("-i", "-s", str(scale), "-q")
        log("zctl start + zctl attach (pg_basebackup imported as main)")
        zctl(repo, "start")
        t0 = time.perf_counter()
        zctl(repo, "attach", "--primary", primary.connstr(), "--branch", "main", timeout=7200)
        br = BenchRepo(workdir, repo, load, scale, primary, stub)
        primary.sql("SELECT txid_current()")  # one more record, so the page server's LSN can pass the flush LSN
        target = flush_lsn(primary)
        wait_for(lambda: pageserver_lsn(stub, br.refresh_main().timeline.id) >= target, 3600,
                 "the page server to catch up")
        br.load_seconds = time.perf_counter() - t0
        br.lsn_before_load = br.main.start_lsn
    br.db_bytes = int(primary.sql("SELECT pg_database_size('postgres')")[0][0])
    # Made in the background (zenith-pageserver --image-layer-interval), as after any large load. A tail
    # of the load too small to make a timeline due again is left to the CreateImageLayer call.
    log("waiting for the page server's image layer to cover the load")
    t0 = time.perf_counter()
    try:
        wait_for(lambda: br.refresh_main().image_layer_lsn >= target, 120, "the background image layer")
    except AssertionError:  # wait_for's timeout
        log("the background image layer does not cover the load's tail: CreateImageLayer")
        br.layer_forced = True
        stub.CreateImageLayer(pageserver_pb2.CreateImageLayerRequest(tenant=TENANT, timeline=br.main.timeline),
                              timeout=3600)
    br.layer_seconds = time.perf_counter() - t0
    return br
