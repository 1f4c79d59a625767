"""The harness itself: a real server comes up, answers, and goes away cleanly."""

from __future__ import annotations

from conftest import PgFactory

from zctl.postgres import PostgresNode, _port_open


def test_primary_answers_and_allows_replication(pg: PostgresNode) -> None:
    assert pg.sql("SELECT 1 + 1") == [(2,)]
    assert pg.sql("SHOW wal_level") == [("replica",)]
    rows = pg.sql("SELECT pg_is_in_recovery()")
    assert rows == [(False,)]
    # A replication connection is accepted from loopback.
    import psycopg

    with psycopg.connect(pg.connstr(replication=True), autocommit=True) as conn:
        ident = conn.execute(b"IDENTIFY_SYSTEM").fetchone()
    assert ident is not None and int(ident[0]) > 0


def test_extra_gucs_and_teardown(pg_factory: PgFactory) -> None:
    node = pg_factory(wal_consistency_checking="all", wal_compression="lz4")
    assert node.sql("SHOW wal_consistency_checking") == [("all",)]
    assert node.sql("SHOW wal_compression") == [("lz4",)]
    node.stop()
    assert not node.is_running()
    assert not _port_open(node.host, node.port)


def test_kill_leaves_no_process(pg: PostgresNode) -> None:
    pid = pg.postmaster_pid()
    assert pid is not None
    pg.kill()
    assert not pg.is_running()
    assert not _port_open(pg.host, pg.port)
