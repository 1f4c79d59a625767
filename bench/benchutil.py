"""Shared by the benchmarks: a scratch Postgres 15 primary and percentiles."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir  # noqa: E402


@contextlib.contextmanager
def scratch_primary(**gucs: object) -> Iterator[tuple[PostgresNode, Path]]:
    """A fresh, started primary (autovacuum off, large max_wal_size) and a work folder Postgres can use."""
    with tempfile.TemporaryDirectory(prefix="zenith-bench-", dir="/tmp") as tmp:
        work = make_pg_owned_dir(Path(tmp))
        node = PostgresNode(work / "pg" / "data", free_port())
        make_pg_owned_dir(node.datadir.parent)
        node.initdb()
        node.configure({"autovacuum": "off", "max_wal_size": "4GB", **gucs})
        node.start()
        try:
            yield node, work
        finally:
            node.stop()


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]
