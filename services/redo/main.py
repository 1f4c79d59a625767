"""`zenith-redo`: run the redo pool service.

    zenith-redo [--listen 127.0.0.1:6401] [--workers N] [--log-level info]

Starts N redo worker processes, then serves zenith.v1.Redo and grpc.health.v1
on the listen address. Prints `zenith-redo listening on HOST:PORT` once it
serves (use port 0 for any free port). SIGTERM or SIGINT: health goes
NOT_SERVING, in-flight RPCs get a grace period, workers are stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from services.auth import SecurityConfigError, add_security_arguments, server_security
from services.metrics import Metrics, add_metrics_argument, gauge, serve_and_announce
from services.runtime import GrpcEndpoint, ShutdownSignal, configure_logging
from .pool import PoolError, RedoPool
from .server import MAX_MESSAGE_BYTES, SERVICE_NAME, RedoServicer, add_to_server

log = logging.getLogger("services.redo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zenith-redo", description="The zenith redo pool service (zenith.v1.Redo).")
    p.add_argument("--listen", default="127.0.0.1:6401", help="host:port to serve on (port 0: any free port)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="redo worker processes (default: CPUs)")
    p.add_argument("--grpc-threads", type=int, default=32, help="gRPC handler threads")
    p.add_argument("--job-timeout", type=float, default=60.0,
                   help="seconds a worker may spend on one job before it is killed and replaced")
    p.add_argument("--start-method", choices=("spawn", "forkserver"), default="spawn",
                   help="how worker processes are started")
    p.add_argument("--max-connection-age", type=float, default=0.0, metavar="SECONDS",
                   help="close each client connection after this long (clients reconnect and re-resolve the "
                        "service name: how a page server finds redo replicas added later); 0: never")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight RPCs get at shutdown")
    add_metrics_argument(p)
    add_security_arguments(p, client=False)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--enable-test-hooks", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.workers < 1:
        print("zenith-redo: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        security = server_security(args)
    except SecurityConfigError as e:
        print(f"zenith-redo: {e}", file=sys.stderr)
        return 2
    shutdown = ShutdownSignal()

    pool = RedoPool(args.workers, start_method=args.start_method, test_hooks=args.enable_test_hooks,
                    job_timeout=args.job_timeout)
    try:
        pool.start()
    except PoolError as e:
        log.error("cannot start redo workers", extra={"error": str(e)})
        return 1
    servicer = RedoServicer(pool, test_hooks=args.enable_test_hooks)
    metrics = Metrics("redo")
    metrics.add_collector(lambda: [gauge("zenith_redo_workers", "Redo worker processes", (), [((), pool.size)])])
    try:
        endpoint = GrpcEndpoint(args.listen, [SERVICE_NAME],
                                lambda server: add_to_server(servicer, server),
                                threads=args.grpc_threads, thread_name="redo-grpc", max_message_bytes=MAX_MESSAGE_BYTES,
                                max_connection_age=args.max_connection_age,
                                interceptors=[metrics.interceptor(), *security.interceptors()],
                                credentials=security.credentials())
    except (OSError, RuntimeError) as e:
        log.error("cannot listen", extra={"listen": args.listen, "error": str(e)})
        pool.close()
        return 1
    endpoint.start()
    if security.verifier is None:
        log.warning("--insecure: calls are not authenticated (development only)")
    if args.enable_test_hooks:
        log.warning("test hooks enabled: requests can crash workers on purpose")
    log.info("serving", extra={"listen": endpoint.address, "workers": pool.size, "pids": pool.worker_pids()})
    print(f"zenith-redo listening on {endpoint.address}", flush=True)
    serve_and_announce(metrics, args.listen, args.metrics_listen)
    shutdown.wait(log)
    metrics.stop()
    t0 = time.monotonic()
    endpoint.stop(args.grace)
    pool.close()
    log.info("stopped", extra={"seconds": round(time.monotonic() - t0, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
