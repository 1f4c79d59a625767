"""A compute keeps its configuration across restarts although its data directory is rebuilt each time:
ALTER SYSTEM, `zctl pg config`, `-c` at create, pg_hba lines; zctl's own settings are refused or
dropped with a warning. postgresql.auto.conf is read and written as Postgres does (a real server is
the oracle)."""

from __future__ import annotations

import json
import os
import signal
import time

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_computes import Cluster, cluster  # noqa: F401  (the fixture)
from zctl_util import zctl

from pgformat.autoconf import AutoConfError, format_auto_conf, parse_auto_conf
from zctl.postgres import PostgresNode

_TRICKY = {"log_line_prefix": "%m [%p] 'q' ", "application_name": "it's a \\ backslash",
           "work_mem": "77MB", "cluster_name": "ünïcode and 'quotes'"}


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,12}(\.[a-z_][a-z0-9_]{0,8})?", fullmatch=True),
                       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"),
                               max_size=30), max_size=8))
def test_format_then_parse_round_trips(settings: dict[str, str]) -> None:
    assert parse_auto_conf(format_auto_conf(settings)) == settings


def test_parse_takes_what_postgres_takes() -> None:
    text = ("# comment\nwork_mem = '4MB'\nWORK_MEM='8MB'  # later wins, names fold\n"
            "shared_buffers 128MB\nx.y = 'a''b\\\\c\\n\\101'\n")
    assert parse_auto_conf(text) == {"work_mem": "8MB", "shared_buffers": "128MB", "x.y": "a'b\\c\nA"}
    for bad in ("work_mem = 'unterminated\n", "= 'x'\n", "work mem = 1\n"):
        with pytest.raises(AutoConfError):
            parse_auto_conf(bad)


def test_a_real_servers_alter_system_file(pg: PostgresNode) -> None:
    """What ALTER SYSTEM writes parses to the values set; what we write, the server reads back."""
    with pg.connect() as conn:
        for name, value in _TRICKY.items():
            conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
    assert parse_auto_conf((pg.datadir / "postgresql.auto.conf").read_text()) == _TRICKY
    ours = {"work_mem": "5MB", "application_name": "o'k \\ too", "myext.note": "x"}
    (pg.datadir / "postgresql.auto.conf").write_text(format_auto_conf(ours))
    pg.stop()
    pg.start()
    for name, value in ours.items():
        assert pg.sql(f"SHOW {name}")[0][0] == value
    assert parse_auto_conf((pg.datadir / "postgresql.auto.conf").read_text()) == ours


def _show(c: Cluster, name: str) -> str:
    return str(c.sql("main", f"SHOW {name}")[0][0])


def test_settings_survive_restarts_and_kill9(cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    c.sql("main", "ALTER SYSTEM SET work_mem = '77MB'")
    c.sql("main", "SELECT pg_reload_conf()")
    c.zctl("pg", "stop", "main")
    c.zctl("pg", "start", "main")
    assert _show(c, "work_mem") == "77MB"

    # Changed through zctl while running: effective now (ALTER SYSTEM checks the value), kept after.
    c.zctl("pg", "config", "main", "--set", "statement_timeout=12s", "--set", "application_name=it's mine")
    time.sleep(0.5)
    assert _show(c, "statement_timeout") == "12s"
    bad = c.zctl("pg", "config", "main", "--set", "work_mem=lots", check=False)
    assert bad.returncode == 1 and "work_mem" in bad.stderr
    # zctl's own settings are refused, with the reason.
    bad = c.zctl("pg", "config", "main", "--set", "port=1", check=False)
    assert bad.returncode == 1 and "cannot be set for a compute" in bad.stderr
    # ALTER SYSTEM of one of them is dropped when read back, with a warning; the compute stays whole.
    c.sql("main", "ALTER SYSTEM SET synchronous_standby_names = ''")

    node_pid = int((c.repo / "computes" / "main" / "pgdata" / "postmaster.pid").read_text().split()[0])
    os.kill(node_pid, signal.SIGKILL)
    time.sleep(1.0)
    out = c.zctl("pg", "start", "main")
    assert "synchronous_standby_names cannot be set" in out.stderr, out.stderr
    assert _show(c, "work_mem") == "77MB" and _show(c, "statement_timeout") == "12s"
    assert _show(c, "application_name") == "it's mine"
    assert _show(c, "synchronous_standby_names").startswith("zenith_walreceiver_")
    with c.conn("main") as conn:  # a commit completes: the walreceiver is still the synchronous standby
        conn.execute("SET statement_timeout = '20s'")
        conn.execute("CREATE TABLE kept (x int)")

    c.zctl("pg", "config", "main", "--reset", "work_mem")
    listed = {r["name"]: r for r in json.loads(c.zctl("pg", "list", "--json").stdout)}
    assert listed["main"]["settings"] == {"statement_timeout": "12s", "application_name": "it's mine"}
    c.zctl("pg", "stop", "main")
    c.zctl("pg", "start", "main")
    assert _show(c, "work_mem") == "4MB"


def test_create_settings_and_hba_lines_survive(cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    c.sql("main", "CREATE ROLE alice LOGIN")
    c.zctl("pg", "stop", "main")
    c.zctl("pg", "config", "main", "--hba-add", "host all alice 127.0.0.1/32 reject")
    c.zctl("pg", "start", "main")
    port = c.computes()["main"]["port"]
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
        psycopg.connect(f"host=127.0.0.1 port={port} user=alice dbname=postgres").close()
    c.zctl("pg", "config", "main", "--hba-remove", "host all alice 127.0.0.1/32 reject")
    psycopg.connect(f"host=127.0.0.1 port={port} user=alice dbname=postgres").close()  # reloaded
    c.zctl("pg", "stop", "main")
    name = "withsettings"
    out = zctl(c.repo, "pg", "create", name, "--branch", "main", "--lsn",
               c.zctl("lsn", "--branch", "main").stdout.strip(), "-c", "work_mem=9MB", "-c", "port=5", check=False)
    assert out.returncode == 1 and "port cannot be set" in out.stderr
    c.zctl("pg", "create", name, "--branch", "main", "--lsn", c.zctl("lsn", "--branch", "main").stdout.strip(),
           "-c", "work_mem=9MB")
    c.zctl("pg", "start", name)
    assert str(c.sql(name, "SHOW work_mem")[0][0]) == "9MB"
    c.zctl("pg", "stop", name)
