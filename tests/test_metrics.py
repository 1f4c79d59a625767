"""Every service serves Prometheus metrics at the address `zctl status --json` names, and they move
under load: gRPC calls by method and code, ingest and durability per timeline, the walreceiver's
lags, redo workers, shim sessions."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import psycopg
import pytest
from conftest import PgFactory
from polling import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_zctl_cluster import repo  # noqa: F401  (the fixture)
from zctl_util import service_channel, shim_conninfo, zctl

from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_every_service_serves_metrics_that_move(repo: Path, pg_factory: PgFactory) -> None:  # noqa: F811
    primary = pg_factory(autovacuum="off")
    primary.execute("CREATE TABLE t (x int)")
    zctl(repo, "start")
    zctl(repo, "attach", "--primary", primary.connstr(), "--branch", "main")
    status = json.loads(zctl(repo, "status", "--json").stdout)
    urls = {s["name"]: s["metrics_url"] for s in status["services"]}
    timeline = status["attachments"][0]["timeline"]
    assert sorted(urls) == ["pageserver", "redo", "shim", "walreceiver"]

    def lsns() -> tuple[float, float, float]:
        ps, wr = scrape(urls["pageserver"]), scrape(urls["walreceiver"])
        return (value(ps, "zenith_pageserver_last_record_lsn", timeline=timeline),
                value(ps, "zenith_pageserver_ingested_records_total", timeline=timeline),
                value(wr, "zenith_walreceiver_durable_lsn", timeline=timeline))

    before = lsns()
    primary.execute("INSERT INTO t SELECT generate_series(1, 5000)")
    target = float(int(primary.sql("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn")[0][0]))
    wait_for(lambda: lsns()[0] >= target and lsns()[2] >= target, 30, "metrics to show the new WAL")
    after = lsns()
    assert all(a > b for a, b in zip(after, before)), (before, after)

    # gRPC calls by method and code, failures included.
    config = json.loads((repo / "config.json").read_text())
    stub = pageserver_pb2_grpc.PageServerStub(service_channel(repo, "pageserver"))
    with pytest.raises(grpc.RpcError):
        stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=common_pb2.TenantId(id="0" * 32),
                                                           timeline=common_pb2.TimelineId(id="9" * 32)))
    ps = scrape(urls["pageserver"])
    assert value(ps, "zenith_grpc_calls_total", method="GetTimeline", code="NOT_FOUND") >= 1
    assert value(ps, "zenith_grpc_calls_total", method="GetTimeline", code="OK") >= 1
    assert value(ps, "zenith_grpc_call_seconds_count", method="GetTimeline") >= 2
    wr = scrape(urls["walreceiver"])
    assert value(wr, "zenith_grpc_calls_total", method="Status", code="OK") >= 1
    assert value(wr, "zenith_walreceiver_streaming", timeline=timeline) == 1
    assert value(wr, "zenith_walreceiver_lag_bytes", timeline=timeline) >= 0
    assert value(scrape(urls["redo"]), "zenith_redo_workers") == config["redo_workers"]

    # The shim counts its sessions.
    assert value(scrape(urls["shim"]), "zenith_shim_sessions") == 0
    with psycopg.connect(shim_conninfo(repo),
                         autocommit=True) as conn:
        conn.execute("status")
        assert value(scrape(urls["shim"]), "zenith_shim_sessions") == 1
