"""Test harness: real PostgreSQL 15 servers, started as the `postgres` OS user.

Fixtures:
- `pg_factory(**gucs)`: create, configure and start a fresh primary on a free
  loopback port; every node it made is stopped at teardown, even on failure.
- `pg`: one running primary with the defaults (wal_level=replica, replication
  from loopback allowed).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from zctl.postgres import PostgresNode, free_port, make_pg_owned_dir, pg_bindir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def pg_base_dir() -> Iterator[Path]:
    """A folder the postgres user can traverse (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="zenith-test-", dir="/tmp"))
    make_pg_owned_dir(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


PgFactory = Callable[..., PostgresNode]


@contextlib.contextmanager
def _node_factory(base: Path, label: str) -> Iterator[PgFactory]:
    try:
        pg_bindir()
    except Exception as e:  # pragma: no cover - only on machines without Postgres
        pytest.skip(str(e))
    nodes: list[PostgresNode] = []

    def make(name: str = "primary", start: bool = True, initdb_args: Sequence[str] = (), **gucs: object) -> PostgresNode:
        workdir = make_pg_owned_dir(Path(tempfile.mkdtemp(prefix=f"{label[:40]}-", dir=base)))
        node = PostgresNode(datadir=workdir / name, port=free_port())
        nodes.append(node)
        node.initdb(initdb_args)
        if gucs:
            node.configure(gucs)
        if start:
            node.start()
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.stop(mode="immediate")


@pytest.fixture
def pg_factory(pg_base_dir: Path, request: pytest.FixtureRequest) -> Iterator[PgFactory]:
    """Nodes that live for one test."""
    with _node_factory(pg_base_dir, request.node.name) as make:
        yield make


@pytest.fixture(scope="session")
def pg_session_factory(pg_base_dir: Path) -> Iterator[PgFactory]:
    """Nodes that live for the whole session (for WAL corpora shared by many tests)."""
    with _node_factory(pg_base_dir, "session") as make:
        yield make


@pytest.fixture
def pg(pg_factory: PgFactory) -> PostgresNode:
    return pg_factory()
