"""`zenith-walreceiver`: stream primaries' WAL, keep it durably, feed it to the page server.

    zenith-walreceiver --data-dir DIR [--listen 127.0.0.1:6403] [--pageserver 127.0.0.1:6402]
                       [--state-file PATH] [--log-level info]

Serves zenith.v1.WalReceiver (Attach / Detach / Status) and grpc.health.v1
on the listen address; prints `zenith-walreceiver listening on HOST:PORT`
once it serves (port 0: any free port). Each attachment keeps the WAL it
receives in DIR/wal/<tenant>/<timeline> (segment files as in pg_wal) and
reports it flushed to the primary once fsynced there; the page server gets
it from there. SIGTERM or SIGINT: health goes NOT_SERVING, every attachment
stops (replication slots and the WAL kept are left, so a restarted
walreceiver resumes where its WAL ends), then the server exits.

With --state-file, Attach and Detach persist the set of attachments there
(atomically, before they answer) and start-up brings every saved attachment
back, so they survive a restart or a kill -9. A state file that cannot be
read or parsed stops start-up with exit code 1: attachments are never
dropped silently.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.auth import (SecurityConfigError, ServerSecurity, add_security_arguments, client_security,
                           server_security)
from services.metrics import Metrics, add_metrics_argument, gauge, serve_and_announce
from services.runtime import GrpcEndpoint, ShutdownSignal, configure_logging
from zproto import walreceiver_pb2_grpc

from .receiver import ReceiverOptions, ReceiverStatus, State
from .server import StateFileError, WalReceiverServicer

log = logging.getLogger("zenith.walreceiver")

SERVICE_NAME = "zenith.v1.WalReceiver"


class WalReceiverServer:
    """The servicer plus its gRPC server; start() binds and serves, stop() detaches everything."""

    def __init__(self, listen: str, pageserver: str, data_dir: Path, options: ReceiverOptions | None = None,
                 threads: int = 16, state_file: Path | None = None, security: ServerSecurity | None = None) -> None:
        """`security`: how callers are checked (default: not at all); the page server is called with
        `options.pageserver_security`."""
        security = security or ServerSecurity()
        self.servicer = WalReceiverServicer(pageserver, data_dir, options, state_file)
        self.metrics = Metrics("walreceiver")
        self.metrics.add_collector(self._attachment_gauges)
        self.endpoint = GrpcEndpoint(
            listen, [SERVICE_NAME], lambda server: walreceiver_pb2_grpc.add_WalReceiverServicer_to_server(
                self.servicer, server), threads=threads, thread_name="walreceiver-grpc",
            interceptors=[self.metrics.interceptor(), *security.interceptors()], credentials=security.credentials())

    def _attachment_gauges(self) -> list[Any]:
        statuses = self.servicer.statuses()
        labels = ("tenant", "timeline")

        def each(value: Callable[[ReceiverStatus], float]) -> list[tuple[tuple[str, str], float]]:
            return [((s.tenant, s.timeline), value(s)) for s in statuses]

        return [
            gauge("zenith_walreceiver_durable_lsn", "End of the WAL fsynced here (reported to the primary as "
                  "flushed)", labels, each(lambda s: s.durable_lsn)),
            gauge("zenith_walreceiver_primary_lsn", "The primary's WAL end as last reported", labels,
                  each(lambda s: s.primary_lsn)),
            gauge("zenith_walreceiver_lag_bytes", "Primary's WAL end minus the WAL durable here", labels,
                  each(lambda s: s.lag_bytes)),
            gauge("zenith_walreceiver_pageserver_lag_bytes", "WAL durable here the page server has not "
                  "acknowledged yet", labels, each(lambda s: max(0, s.durable_lsn - s.pageserver_lsn))),
            gauge("zenith_walreceiver_streaming", "1 while streaming from the primary", labels,
                  each(lambda s: 1.0 if s.state is State.STREAMING else 0.0)),
            gauge("zenith_walreceiver_reconnects", "Reconnects to the primary since the attachment", labels,
                  each(lambda s: s.reconnects)),
        ]

    @property
    def address(self) -> str:
        return self.endpoint.address

    def start(self) -> None:
        restored = self.servicer.restore()
        self.endpoint.start()
        log.info("walreceiver listening", extra={"address": self.address, "pageserver": self.servicer.pageserver,
                                                 "restored_attachments": restored})

    def stop(self, grace: float = 2.0) -> None:
        self.endpoint.health.enter_graceful_shutdown()
        self.servicer.stop_all()
        self.endpoint.stop(grace)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zenith-walreceiver",
                                description="The zenith WAL receiver service (zenith.v1.WalReceiver).")
    p.add_argument("--listen", default="127.0.0.1:6403", help="host:port to serve on (port 0: any free port)")
    p.add_argument("--pageserver", default="127.0.0.1:6402", help="page server address host:port")
    p.add_argument("--status-interval", type=float, default=1.0,
                   help="seconds between standby status updates to the primary")
    p.add_argument("--max-backoff", type=float, default=5.0, help="longest wait between reconnects, seconds")
    p.add_argument("--data-dir", type=Path, required=True, metavar="DIR",
                   help="where each attachment keeps its WAL (segment files as in pg_wal) until the page server has "
                        "stored it durably")
    p.add_argument("--state-file", type=Path, default=None, metavar="PATH",
                   help="keep the attachments in this JSON file, so they survive a restart (default: in memory only)")
    p.add_argument("--allow-primary-host", action="append", default=[], metavar="HOST|NETWORK",
                   help="Attach may name only these primaries (names, addresses or networks like 10.0.0.0/8; "
                        "repeatable; default: any TCP host)")
    add_metrics_argument(p)
    add_security_arguments(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    # The primary side answers a synchronous commit right after its fsync; with the default 5 ms
    # switch interval it could wait that long for the GIL behind the feeder's decoding.
    sys.setswitchinterval(0.0005)
    if args.status_interval <= 0 or args.max_backoff <= 0:
        print("zenith-walreceiver: --status-interval and --max-backoff must be positive", file=sys.stderr)
        return 2
    try:
        security = server_security(args)
        options = ReceiverOptions(status_interval=args.status_interval, backoff_max=args.max_backoff,
                                  pageserver_security=client_security(args, dict(os.environ)),
                                  allowed_primary_hosts=tuple(args.allow_primary_host))
    except SecurityConfigError as e:
        print(f"zenith-walreceiver: {e}", file=sys.stderr)
        return 2
    if security.verifier is None:
        log.warning("--insecure: calls are not authenticated (development only)")
    try:
        server = WalReceiverServer(args.listen, args.pageserver, args.data_dir, options, state_file=args.state_file,
                                   security=security)
    except (OSError, RuntimeError, StateFileError) as e:
        print(f"zenith-walreceiver: {e}", file=sys.stderr)
        return 1
    shutdown = ShutdownSignal()
    server.start()
    print(f"zenith-walreceiver listening on {server.address}", flush=True)
    serve_and_announce(server.metrics, args.listen, args.metrics_listen)
    shutdown.wait(log)
    server.metrics.stop()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
