"""`zenith-pageserver`: serve a repository over gRPC."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from zproto import pageserver_pb2_grpc

from .repository import DEFAULT_TENANT, LocalRedo, PageRedo, Repository
from .service import PageServerServicer

log = logging.getLogger("zenith.pageserver")


class PageServer:
    """A repository plus its gRPC server; start() binds, stop() drains."""

    def __init__(self, repo_dir: Path, listen: str = "127.0.0.1:6402", redo_address: str | None = None,
                 threads: int = 16, lsn_wait_timeout: float = 30.0) -> None:
        redo: PageRedo
        if redo_address:
            from .redo_client import RemoteRedo

            redo = RemoteRedo(redo_address)
        else:
            redo = LocalRedo()
        self.repo = Repository(repo_dir, redo=redo)
        self.repo.ensure_tenant(DEFAULT_TENANT)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads),
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.servicer = PageServerServicer(self.repo, lsn_wait_timeout=lsn_wait_timeout)
        pageserver_pb2_grpc.add_PageServerServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"could not listen on {listen}")
        self.host = listen.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        for name in ("", "zenith.v1.PageServer"):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("page server listening", extra={"address": self.address})

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.repo.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zenith-pageserver", description=__doc__)
    p.add_argument("--repo", required=True, type=Path, help="repository directory")
    p.add_argument("--listen", default="127.0.0.1:6402", help="host:port (port 0: any free port)")
    p.add_argument("--redo", default=None, help="redo service address (default: redo in this process)")
    p.add_argument("--lsn-wait-timeout", type=float, default=30.0, help="seconds a read waits for its LSN")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = PageServer(args.repo, args.listen, args.redo, lsn_wait_timeout=args.lsn_wait_timeout)
    server.start()
    print(f"page server listening on {server.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
