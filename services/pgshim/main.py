"""`zenith-pgshim`: the page server over the Postgres wire protocol."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from services.auth import SecurityConfigError, add_security_arguments, client_security
from services.metrics import Metrics, add_metrics_argument, gauge, serve_and_announce
from services.runtime import configure_logging

from zauth.tokens import TokenError, TokenVerifier

from .auth import PasswordFileError, read_password_file
from .server import ShimConfig, ShimServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zenith-pgshim", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:6400", help="host:port (port 0: any free port)")
    p.add_argument("--pageserver", default="127.0.0.1:6402", help="page server gRPC address host:port")
    auth = p.add_argument_group("client authentication (at least one, or --insecure)")
    auth.add_argument("--password-file", type=Path, default=None,
                      help="SCRAM-SHA-256 users: lines `user SCRAM-SHA-256$... tenant[,tenant]` (`*`: every tenant)")
    auth.add_argument("--auth-public-key", type=Path, default=None, metavar="PEM",
                      help="accept tokens signed by this key as the password (over TLS only); their tenant "
                           "scopes are what the session sees")
    auth.add_argument("--insecure", action="store_true",
                      help="trust every client, every tenant visible (development only)")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="certificate (PEM): TLS, required of every client when set")
    p.add_argument("--tls-key", type=Path, default=None, help="private key (PEM) of --tls-cert")
    p.add_argument("--max-connections", type=int, default=100)
    p.add_argument("--startup-timeout", type=float, default=10.0,
                   help="seconds a client has to finish connecting and authenticating")
    add_metrics_argument(p)
    add_security_arguments(p, server=False)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if not args.insecure and args.password_file is None and args.auth_public_key is None:
        p.error("give --password-file and/or --auth-public-key (how clients authenticate) or, for development "
                "only, --insecure")
    if args.insecure and (args.password_file is not None or args.auth_public_key is not None):
        p.error("--insecure excludes --password-file and --auth-public-key")
    return args


def config_from_args(args: argparse.Namespace) -> ShimConfig:
    host, _, port = args.listen.rpartition(":")
    try:
        security = client_security(args, dict(os.environ))
        users = read_password_file(args.password_file) if args.password_file is not None else {}
        verifier = TokenVerifier(args.auth_public_key.read_bytes()) if args.auth_public_key is not None else None
    except (SecurityConfigError, PasswordFileError, TokenError, ValueError) as e:
        raise SystemExit(f"zenith-pgshim: {e}") from None
    except OSError as e:
        raise SystemExit(f"zenith-pgshim: cannot read {e.filename}: {e.strerror}") from None
    return ShimConfig(pageserver=args.pageserver, host=host or "127.0.0.1", port=int(port), insecure=args.insecure,
                      users=users, verifier=verifier, tls_cert=args.tls_cert, tls_key=args.tls_key,
                      max_connections=args.max_connections, startup_timeout=args.startup_timeout,
                      pageserver_security=security)


async def serve(config: ShimConfig, listen: str = "127.0.0.1:0", metrics_listen: str | None = None) -> None:
    server = ShimServer(config)
    await server.start()
    print(f"libpq shim listening on {server.address}", flush=True)
    metrics = Metrics("shim")
    metrics.add_collector(lambda: [
        gauge("zenith_shim_sessions", "Client sessions open", (), [((), len(server.sessions))]),
        gauge("zenith_shim_max_sessions", "Sessions allowed (--max-connections)", (), [((), config.max_connections)]),
    ])
    serve_and_announce(metrics, listen, metrics_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    metrics.stop()
    await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(serve(config_from_args(args), args.listen, args.metrics_listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
