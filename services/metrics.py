"""Prometheus metrics of a service: its own registry, an HTTP endpoint, and gRPC call metrics.

Each service makes one `Metrics` (no module-level registry: two services in
one process, as tests run them, keep theirs apart), registers what it
measures on `metrics.registry`, and serves it with `serve()` on its
`--metrics-listen` address (GET /metrics, the Prometheus text format). The
gRPC server interceptor counts every call by method and status code and
times it (`zenith_grpc_calls_total`, `zenith_grpc_call_seconds`); streams
are timed until their last message.

Values that already live in a service's state (LSNs per timeline, lags,
sessions) are read at scrape time by a collector callback
(`add_collector`), so nothing on a hot path updates them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("zenith.metrics")

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _CallbackCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must not take the service down; the log says why
            log.exception("metrics collector failed")


class Metrics:
    """One service's metrics."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.grpc_calls = Counter("zenith_grpc_calls", "gRPC calls served, by method and status code",
                                  ["method", "code"], registry=self.registry)
        self.grpc_seconds = Histogram("zenith_grpc_call_seconds", "gRPC call duration (streams: until the last "
                                      "message), by method", ["method"], buckets=_BUCKETS, registry=self.registry)
        self.address = ""
        self._server: Any = None

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: Iterable[str] = ()) -> Histogram:
        return Histogram(name, doc, list(labels), buckets=_BUCKETS, registry=self.registry)

    def add_collector(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Gauges computed at scrape time from the service's state."""
        self.registry.register(_CallbackCollector(collect))

    def serve(self, listen: str) -> str:
        """Serve GET /metrics on `listen` (host:port, port 0: any free one); return the address."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._server = server
        self.address = f"{host or '127.0.0.1'}:{server.server_port}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def interceptor(self) -> grpc.ServerInterceptor:
        return _GrpcMetrics(self)


class _GrpcMetrics(grpc.ServerInterceptor):
    """Counts and times every call; the code is what the handler set (OK when it set none)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        calls, seconds = self.metrics.grpc_calls, self.metrics.grpc_seconds

        def done(context: grpc.ServicerContext, started: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            calls.labels(method, name).inc()
            seconds.labels(method).observe(time.monotonic() - started)

        def unary(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.monotonic()
                failed = True
                try:
                    result = behavior(request, context)
                    failed = False
                    return result
                finally:
                    done(context, started, failed)
            return wrapped

        def streaming(behavior: Callable[[Any, Any], Iterator[Any]]) -> Callable[[Any, Any], Iterator[Any]]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.monotonic()
                failed = True
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:
                    done(context, started, failed)
            return wrapped

        kinds = (
            ("unary_unary", unary, grpc.unary_unary_rpc_method_handler),
            ("stream_unary", unary, grpc.stream_unary_rpc_method_handler),
            ("unary_stream", streaming, grpc.unary_stream_rpc_method_handler),
            ("stream_stream", streaming, grpc.stream_stream_rpc_method_handler),
        )
        for attr, wrap, make in kinds:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make(wrap(behavior), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


def add_metrics_argument(parser: Any) -> None:
    """--metrics-listen, the same for every service."""
    parser.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: the --listen host, "
                             "its port + 1000; port 0: any free port)")


def serve_and_announce(metrics: Metrics, listen: str, given: str | None) -> None:
    """Serve the metrics and print where, as services print where they listen."""
    print(f"metrics on http://{metrics.serve(metrics_listen(listen, given))}/metrics", flush=True)


def metrics_listen(listen: str, given: str | None) -> str:
    """The --metrics-listen address: as given, or the gRPC listen address's host with its port + 1000
    (port 0 stays 0: any free port)."""
    if given:
        return given
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1000 if int(port) else 0}"


def gauge(name: str, doc: str, labels: Iterable[str], samples: Iterable[tuple[Iterable[str], float]]) \
        -> GaugeMetricFamily:
    """A gauge family for a collector: one sample per label values."""
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


__all__ = ["Metrics", "add_metrics_argument", "gauge", "metrics_listen", "serve_and_announce"]
