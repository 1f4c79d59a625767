"""`zenith-pageserver`: serve a repository over gRPC."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any
from pathlib import Path

from services.auth import (ClientSecurity, SecurityConfigError, ServerSecurity, add_security_arguments,
                           client_security, server_security)
from services.metrics import Metrics, add_metrics_argument, gauge, serve_and_announce
from services.runtime import GrpcEndpoint, ShutdownSignal, configure_logging
from zproto import pageserver_pb2_grpc

from .imager import DEFAULT_INTERVAL, DEFAULT_MIN_WAL, ImageLayerMaker
from .repository import DEFAULT_CHECKPOINT_TIMEOUT, DEFAULT_TENANT, LocalRedo, PageRedo, Repository, RepositoryError
from .storage.errors import StorageError
from .storage.compaction import COMPACT_L0_AT
from .storage.timeline_layers import DEFAULT_CHECKPOINT_DISTANCE
from .service import PageServerServicer

log = logging.getLogger("zenith.pageserver")


class Syncer:
    """Every `interval` seconds, writes out the frozen layers and the open layers older than the
    checkpoint timeout (Repository.checkpoint): disk_consistent_lsn moves up, and the walreceivers
    may drop their WAL below it. Ingest itself never waits for a layer file."""

    def __init__(self, repo: Repository, interval: float = 1.0) -> None:
        self.repo = repo
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pageserver-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.repo.checkpoint()
            except Exception:  # the next pass tries again; the log says what went wrong
                log.exception("periodic checkpoint of the repository failed")


class PageServer:
    """A repository plus its gRPC server; start() binds, stop() drains."""

    def __init__(self, repo_dir: Path, listen: str = "127.0.0.1:6402", redo_address: str | None = None,
                 threads: int = 16, lsn_wait_timeout: float = 30.0, image_layer_interval: float = 0.0,
                 image_layer_min_wal: int = DEFAULT_MIN_WAL,
                 checkpoint_distance: int = DEFAULT_CHECKPOINT_DISTANCE,
                 checkpoint_timeout: float = DEFAULT_CHECKPOINT_TIMEOUT,
                 compaction_threshold: int = COMPACT_L0_AT, security: ServerSecurity | None = None,
                 redo_security: ClientSecurity | None = None) -> None:
        """`security`: how callers are checked (default: not at all, for tests in one process);
        `redo_security`: the token and CA the redo service is called with."""
        security = security or ServerSecurity()
        redo: PageRedo
        if redo_address:
            from .redo_client import RemoteRedo

            redo = RemoteRedo(redo_address, security=redo_security or ClientSecurity())
        else:
            redo = LocalRedo()
        # A predecessor killed a moment ago may still be exiting: its lock goes with it.
        self.repo = Repository(repo_dir, redo=redo, checkpoint_distance=checkpoint_distance,
                               checkpoint_timeout=checkpoint_timeout, compaction_threshold=compaction_threshold,
                               lock_wait=5.0)
        self.repo.ensure_tenant(DEFAULT_TENANT)
        # Off unless asked for (the command line asks by default): tests drive layers themselves.
        self.image_layers = (ImageLayerMaker(self.repo, image_layer_interval, image_layer_min_wal)
                             if image_layer_interval > 0 else None)
        self.syncer = Syncer(self.repo)
        self.metrics = Metrics("pageserver")
        self.metrics.add_collector(self._timeline_gauges)
        self.servicer = PageServerServicer(self.repo, lsn_wait_timeout=lsn_wait_timeout,
                                           ingested=self.metrics.counter(
                                               "zenith_pageserver_ingested_records",
                                               "WAL records stored by Ingest, by timeline", ["timeline"]))
        self.endpoint = GrpcEndpoint(
            listen, ["zenith.v1.PageServer"],
            lambda server: pageserver_pb2_grpc.add_PageServerServicer_to_server(self.servicer, server),
            threads=threads, thread_name="pageserver-grpc",
            interceptors=[self.metrics.interceptor(), *security.interceptors()], credentials=security.credentials())

    def _timeline_gauges(self) -> list[Any]:
        tls = [t for tenant in self.repo.list_tenants() for t in self.repo.list_timelines(tenant)]
        labels = ("tenant", "timeline", "name")
        return [
            gauge("zenith_pageserver_last_record_lsn", "End of the last WAL record ingested (GetPage@latest "
                  "answers there)", labels, [((t.tenant, t.timeline, t.name or ""), t.last_record_lsn) for t in tls]),
            gauge("zenith_pageserver_disk_consistent_lsn", "Everything up to here is in layer files; walreceivers "
                  "keep the WAL above it", labels, [((t.tenant, t.timeline, t.name or ""), t.disk_consistent_lsn)
                                               for t in tls]),
            gauge("zenith_pageserver_unsynced_bytes", "WAL ingested but only in open layers", labels,
                  [((t.tenant, t.timeline, t.name or ""), t.last_record_lsn - t.disk_consistent_lsn) for t in tls]),
            gauge("zenith_pageserver_image_layers", "Image layers kept", labels,
                  [((t.tenant, t.timeline, t.name or ""), len(self.repo.image_layers(t))) for t in tls]),
        ]

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def port(self) -> int:
        return self.endpoint.port

    def start(self) -> None:
        self.syncer.start()
        self.endpoint.start()
        if self.image_layers is not None:
            self.image_layers.start()
        log.info("page server listening", extra={"address": self.address})

    def stop(self, grace: float = 2.0) -> None:
        self.endpoint.stop(grace)
        if self.image_layers is not None:
            self.image_layers.stop()
        self.syncer.stop()
        self.repo.sync()
        self.repo.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zenith-pageserver", description=__doc__)
    p.add_argument("--repo", required=True, type=Path, help="repository directory")
    p.add_argument("--listen", default="127.0.0.1:6402", help="host:port (port 0: any free port)")
    p.add_argument("--redo", default=None, help="redo service address (default: redo in this process)")
    p.add_argument("--lsn-wait-timeout", type=float, default=30.0, help="seconds a read waits for its LSN")
    p.add_argument("--image-layer-interval", type=float, default=DEFAULT_INTERVAL,
                   help="seconds between checks for timelines due a new image layer (0: never make them "
                        "in the background)")
    p.add_argument("--image-layer-min-wal", type=int, default=DEFAULT_MIN_WAL,
                   help="bytes of WAL above the newest image layer (and at least a quarter of its size) "
                        "that make a timeline due a new one")
    p.add_argument("--checkpoint-distance", type=int, default=DEFAULT_CHECKPOINT_DISTANCE,
                   help="bytes an open layer takes before it is written out as a delta layer")
    p.add_argument("--checkpoint-timeout", type=float, default=DEFAULT_CHECKPOINT_TIMEOUT,
                   help="seconds after which an open layer is written out however small (the WAL "
                        "walreceivers keep for this page server covers about this much)")
    p.add_argument("--compaction-threshold", type=int, default=COMPACT_L0_AT,
                   help="L0 delta layers of a timeline that make a compaction into L1 layers due (0: never)")
    add_metrics_argument(p)
    add_security_arguments(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        security, redo_security = server_security(args), client_security(args, dict(os.environ))
    except SecurityConfigError as e:
        print(f"zenith-pageserver: {e}", file=sys.stderr)
        return 2
    if security.verifier is None:
        log.warning("--insecure: calls are not authenticated (development only)")
    shutdown = ShutdownSignal()
    try:
        server = PageServer(args.repo, args.listen, args.redo, lsn_wait_timeout=args.lsn_wait_timeout,
                            image_layer_interval=args.image_layer_interval,
                            image_layer_min_wal=args.image_layer_min_wal,
                            checkpoint_distance=args.checkpoint_distance, checkpoint_timeout=args.checkpoint_timeout,
                            compaction_threshold=args.compaction_threshold, security=security,
                            redo_security=redo_security)
    except (RepositoryError, StorageError) as e:  # a repository this server cannot open: say why, no traceback
        log.error("cannot open the repository: %s", e)
        return 1
    server.start()
    print(f"page server listening on {server.address}", flush=True)
    serve_and_announce(server.metrics, args.listen, args.metrics_listen)
    shutdown.wait(log)
    server.metrics.stop()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
