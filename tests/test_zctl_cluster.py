"""zctl start / attach / lsn / getpage / status / stop against a real primary, services as processes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import PgFactory
from zctl_util import make_repo, shim_conninfo, zctl

from pgformat.bufmask import heap_mask
from pgformat.lsn import parse_lsn
from zctl.postgres import free_port, make_pg_owned_dir, pid_alive


@pytest.fixture
def repo(tmp_path: Path, pg_base_dir: Path):  # type: ignore[no-untyped-def]
    # Reachable by the postgres OS user: the tests start a compute and initdb in it.
    r = make_repo(make_pg_owned_dir(pg_base_dir / f"zctl-{tmp_path.name}") / "repo")
    yield r
    zctl(r, "stop", check=False)


def test_attach_follow_and_read_pages(repo: Path, pg_factory: PgFactory) -> None:
    primary = pg_factory(autovacuum="off")
    primary.execute("CREATE EXTENSION pageinspect")
    primary.pgbench("-i", "-s", "1", "-q")
    zctl(repo, "start")
    out = zctl(repo, "attach", "--primary", primary.connstr(), "--branch", "main").stdout
    assert "branch main" in out

    primary.pgbench("-c", "2", "-t", "300", "-n")
    target = parse_lsn(primary.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0])
    deadline = time.monotonic() + 60
    while parse_lsn(zctl(repo, "lsn", "--branch", "main").stdout.strip()) < target:
        assert time.monotonic() < deadline, "page server did not catch up with the primary"
        time.sleep(0.2)

    filenode, dboid = primary.sql("SELECT pg_relation_filenode('pgbench_branches'),"
                                  " (SELECT oid FROM pg_database WHERE datname = 'postgres')")[0]
    page_file = repo / "page.bin"
    zctl(repo, "getpage", "--branch", "main", "--rel", f"1663/{dboid}/{filenode}", "--blk", "0", "-o", str(page_file))
    ours = bytearray(page_file.read_bytes())
    theirs = bytearray(primary.sql("SELECT get_raw_page('pgbench_branches', 0)")[0][0])
    heap_mask(ours, 0)
    heap_mask(theirs, 0)
    assert ours == theirs

    status = json.loads(zctl(repo, "status", "--json").stdout)
    assert [(s["name"], s["healthy"]) for s in status["services"]] == [
        ("redo", True), ("pageserver", True), ("walreceiver", True), ("shim", True)]
    assert status["attachments"][0]["state"] == "ATTACHMENT_STATE_STREAMING"
    # The libpq shim `zctl start` runs: psql lists the timelines through it.
    listed = subprocess.run(["psql", "-X", "-At", shim_conninfo(repo), "-c", "status"], capture_output=True, text=True,
                            timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("|")[2] for line in listed.stdout.splitlines()] == ["main"]

    bad = zctl(repo, "getpage", "--branch", "nosuch", "--rel", "1663/5/1", "--blk", "0", "-o", str(page_file), check=False)
    assert bad.returncode == 1 and "no branch named 'nosuch'" in bad.stderr
    bad = zctl(repo, "getpage", "--branch", "main", "--rel", "1663/5", "--blk", "0", "-o", str(page_file), check=False)
    assert bad.returncode == 1 and "SPC/DB/RELFILENODE" in bad.stderr

    check_security_commands(repo, status)

    # A failed attach leaves no replication slot behind; options that read this host's files are refused.
    slots = primary.sql("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
    again = zctl(repo, "attach", "--primary", primary.connstr(), "--branch", "main", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "slot was dropped" not in again.stderr, \
        again.stderr
    assert primary.sql("SELECT slot_name FROM pg_replication_slots ORDER BY 1") == slots
    for bad in ("passfile=/etc/passwd", "sslkey=/etc/shadow", "service=x", "host=/var/run/postgresql"):
        refused = zctl(repo, "attach", "--primary", f"{primary.connstr()} {bad}", "--branch", "x", check=False)
        assert refused.returncode == 1 and "--primary:" in refused.stderr, refused.stderr
    assert primary.sql("SELECT slot_name FROM pg_replication_slots ORDER BY 1") == slots

    pids = [s["pid"] for s in status["services"]]
    zctl(repo, "stop")
    assert not any(pid_alive(p) for p in pids)
    assert all(not s["running"] for s in json.loads(zctl(repo, "status", "--json").stdout)["services"])


def check_security_commands(repo: Path, status: dict[str, object]) -> None:
    """Security on by default: keys and tokens made by zctl (secrets 0600), tenants and tokens through
    zctl, and a tenant's token kept to its tenant by the services."""
    from zauth.tokens import TokenVerifier

    assert status["security"] == {"auth": True, "tls": True, "summary": status["security"]["summary"]}  # type: ignore[index]
    sec = repo / "security"
    for secret in ("signing_key.pem", "tokens/admin.jwt", "tokens/ingest.jwt", "tokens/redo.jwt", "tls/server.key"):
        assert (sec / secret).stat().st_mode & 0o077 == 0, secret
    assert "security: tokens required" in zctl(repo, "status").stdout
    for log in (repo / "logs").glob("*.log"):  # no service was handed a token on its command line or logged one
        assert (sec / "tokens" / "admin.jwt").read_text().strip() not in log.read_text()

    tenant = zctl(repo, "tenant", "create").stdout.strip()
    assert len(tenant) == 32
    listed = zctl(repo, "tenant", "list").stdout
    assert tenant in listed and "0" * 32 + "  (default)" in listed
    token = zctl(repo, "token", "--tenant", tenant, "--ttl", "1h").stdout.strip()
    claims = TokenVerifier((sec / "public_key.pem").read_bytes()).verify(token)
    assert claims.scopes == {f"tenant:{tenant}"} and claims.expires is not None
    assert zctl(repo, "token", "--scope", "nonsense", check=False).returncode == 1

    # That token reads its own tenant (no branches yet) and nothing else.
    token_file = repo / "tenant.jwt"
    token_file.write_text(token)
    as_tenant = ("--token-file", str(token_file))
    refused = zctl(repo, *as_tenant, "branch", "list", check=False)
    assert refused.returncode == 1 and "permission denied" in refused.stderr, refused.stderr
    refused = zctl(repo, *as_tenant, "tenant", "list", check=False)
    assert refused.returncode == 1 and "permission denied" in refused.stderr
    # The shim zctl started takes a token as the password (over TLS) and shows that tenant only.
    with psycopg.connect(shim_conninfo(repo, user="bob", password=token), autocommit=True) as conn:
        assert conn.execute("status").fetchall() == []  # the new tenant has no branches
    admin = (sec / "tokens" / "admin.jwt").read_text().strip()
    with psycopg.connect(shim_conninfo(repo, user="ops", password=admin), autocommit=True) as conn:
        assert [r[2] for r in conn.execute("status").fetchall()] == ["main"]
    # The tenant gets its own first branch, a branch of it (with its own token), and a compute on it.
    zctl(repo, "bootstrap", "--tenant", tenant, "--branch", "tmain")
    zctl(repo, *as_tenant, "branch", "create", "--tenant", tenant, "tchild", "--parent", "tmain")
    mine = {b["name"] for b in json.loads(zctl(repo, *as_tenant, "branch", "list", "--tenant", tenant, "--json").stdout)}
    assert mine == {"tmain", "tchild"}
    assert "tmain" not in zctl(repo, "branch", "list").stdout  # the default tenant's tree
    refused = zctl(repo, *as_tenant, "branch", "create", "--tenant", tenant, "x", "--parent", "main", check=False)
    assert refused.returncode == 1 and "no branch named 'main'" in refused.stderr  # not in its tenant
    port = str(free_port())
    zctl(repo, "pg", "create", "--tenant", tenant, "tc", "--branch", "tchild", "--port", port)
    zctl(repo, "pg", "start", "tc")
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")  # a synchronous commit: the walreceiver has it
    zctl(repo, "pg", "stop", "tc")
    assert json.loads(zctl(repo, "branch", "list", "--tenant", tenant, "--json").stdout)

    bogus = repo / "bogus.jwt"
    bogus.write_text(token[:-4] + "AAAA")
    refused = zctl(repo, "--token-file", str(bogus), "branch", "list", check=False)
    assert refused.returncode == 1 and "authentication failed" in refused.stderr
