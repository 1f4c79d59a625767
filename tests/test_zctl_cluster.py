"""zctl start / attach / lsn / getpage / status / stop against a real primary, services as processes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PgFactory
from zctl_util import make_repo, zctl

from pgformat.bufmask import heap_mask
from pgformat.lsn import parse_lsn
from zctl.postgres import pid_alive


@pytest.fixture
def repo(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = make_repo(tmp_path / "repo")
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
    shim_port = json.loads((repo / "config.json").read_text())["ports"]["shim"]
    listed = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(shim_port), "-U", "postgres",
                             "-c", "status"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("|")[2] for line in listed.stdout.splitlines()] == ["main"]

    bad = zctl(repo, "getpage", "--branch", "nosuch", "--rel", "1663/5/1", "--blk", "0", "-o", str(page_file), check=False)
    assert bad.returncode == 1 and "no branch named 'nosuch'" in bad.stderr
    bad = zctl(repo, "getpage", "--branch", "main", "--rel", "1663/5", "--blk", "0", "-o", str(page_file), check=False)
    assert bad.returncode == 1 and "SPC/DB/RELFILENODE" in bad.stderr

    check_security_commands(repo, status)

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
    bogus = repo / "bogus.jwt"
    bogus.write_text(token[:-4] + "AAAA")
    refused = zctl(repo, "--token-file", str(bogus), "branch", "list", check=False)
    assert refused.returncode == 1 and "authentication failed" in refused.stderr
