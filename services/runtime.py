"""What every service process (and zctl's foreground commands) does the same way; no service's internals.

- `configure_logging`: one line per event, `extra=` fields appended as key=value;
- `GrpcEndpoint`: a gRPC server bound to its listen address, with the standard
  health service (grpc.health.v1) reporting the service's state;
- `ShutdownSignal`: wait for SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# LogRecord attributes that are not `extra=` fields.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class KeyValueFormatter(logging.Formatter):
    """`time level logger[pid]: message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
                  for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS]
        return f"{line} {' '.join(extras)}" if extras else line


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class GrpcEndpoint:
    """A gRPC server on `listen` (port 0: any free port) with health for `service_names`; not started.
    `interceptors` run outermost first; `credentials` (TLS) make the port TLS-only."""

    def __init__(self, listen: str, service_names: Sequence[str], register: Callable[[grpc.Server], None], *,
                 threads: int = 16, thread_name: str = "grpc",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_connection_age: float = 0.0,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None) -> None:
        options: list[tuple[str, int]] = [("grpc.max_receive_message_length", max_message_bytes),
                                          ("grpc.max_send_message_length", max_message_bytes)]
        if max_connection_age > 0:
            # GOAWAY after this long (in-flight calls get as long again to finish): clients reconnect and
            # re-resolve the name, so replicas added behind one DNS name start getting their share.
            age_ms = int(max_connection_age * 1000)
            options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=thread_name), options=options,
            interceptors=list(interceptors))
        register(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.names = ("", *service_names)
        self.set_serving(False)
        # With credentials the port speaks TLS only: a plaintext client fails its handshake.
        self.port = (self.server.add_secure_port(listen, credentials) if credentials is not None
                     else self.server.add_insecure_port(listen))
        if self.port == 0:
            raise OSError(f"could not listen on {listen}")
        self.host = listen.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()
        self.set_serving(True)

    def stop(self, grace: float) -> None:
        """Health goes NOT_SERVING, in-flight RPCs get `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


class ShutdownSignal:
    """SIGTERM / SIGINT handlers, installed at construction; `wait()` blocks until one arrives."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.name = ""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.name = signal.Signals(signum).name
        self._event.set()

    def wait_for(self, timeout: float) -> bool:
        """True once a signal has arrived (waits at most `timeout` seconds)."""
        return self._event.wait(timeout)

    def wait(self, log: logging.Logger) -> None:
        while not self._event.wait(1.0):
            pass
        log.info("signal received; shutting down", extra={"signal": self.name})
