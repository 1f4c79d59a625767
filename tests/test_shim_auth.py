"""The libpq shim's authentication and tenant isolation, judged by libpq itself (psql, pg_basebackup,
psycopg) over real TLS with a CA and certificate made by zauth.certs.

A shim with TLS required, a password file (SCRAM-SHA-256: `postgres` sees every tenant, `alice`
tenant X only) and the deployment's public key (a token is accepted as the password, over TLS
only). The page server behind it holds the default tenant's timelines (test_pgshim's fixture) and
tenant X with one timeline of its own.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from shim_util import RunningShim
from test_pgshim import BRANCH, TIMELINE, ShimEnv, _workdir, env  # noqa: F401  (the fixture)

from pgformat.scram import ScramError, ScramServer, ScramVerifier, make_verifier
from services.auth import format_password_line
from zauth.certs import make_tls_files
from zauth.tokens import ADMIN, SigningKey, tenant_scope
from zctl.postgres import make_pg_owned_dir, run_as_pg_user
from zproto import common_pb2, pageserver_pb2

TENANT_X = "c" * 32
TIMELINE_X = "d" * 32
DEFAULT = "0" * 32


@dataclass
class SecureShim:
    shim: RunningShim
    plain: RunningShim  # no TLS, tokens accepted: it must refuse them in clear text
    key: SigningKey
    ca: Path
    passwords: dict[str, str]

    def conninfo(self, user: str = "postgres", password: str | None = None, sslmode: str = "verify-full",
                 shim: RunningShim | None = None, **extra: str) -> str:
        s = shim or self.shim
        parts = {"host": s.host, "port": str(s.port), "user": user, "dbname": "postgres", "sslmode": sslmode,
                 "sslrootcert": str(self.ca), "connect_timeout": "10", **extra}
        if password is not None:
            parts["password"] = password
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def status(self, user: str, password: str) -> set[tuple[str, str]]:
        with psycopg.connect(self.conninfo(user, password), autocommit=True) as conn:
            return {(r[0], r[1]) for r in conn.execute("status").fetchall()}


@pytest.fixture(scope="module")
def secure(env: ShimEnv) -> Iterator[SecureShim]:  # noqa: F811
    work = make_pg_owned_dir(env.base / "shim-auth")
    tls = make_tls_files()
    for name, data in (("ca.pem", tls.ca_cert), ("server.pem", tls.server_cert), ("server.key", tls.server_key)):
        (work / name).write_bytes(data)
    os.chmod(work / "ca.pem", 0o644)
    key = SigningKey.generate()
    (work / "public.pem").write_bytes(key.public_pem())
    passwords = {"postgres": "operator-secret", "alice": "alice-secret"}
    (work / "users").write_text(format_password_line("postgres", make_verifier(passwords["postgres"]).text(), None)
                                + format_password_line("alice", make_verifier(passwords["alice"]).text(), [TENANT_X]))
    env.ps.stub.CreateTenant(pageserver_pb2.CreateTenantRequest(tenant=common_pb2.TenantId(id=TENANT_X)))
    env.ps.stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
        tenant=common_pb2.TenantId(id=TENANT_X), new_timeline=common_pb2.TimelineId(id=TIMELINE_X), name="xmain",
        pg_version=15))
    auth = ["--password-file", str(work / "users"), "--auth-public-key", str(work / "public.pem")]
    shim = RunningShim(env.ps.address, [*auth, "--tls-cert", str(work / "server.pem"),
                                        "--tls-key", str(work / "server.key")])
    plain = RunningShim(env.ps.address, auth)
    try:
        yield SecureShim(shim, plain, key, work / "ca.pem", passwords)
    finally:
        shim.close()
        plain.close()


def test_psql_with_scram_over_verified_tls(secure: SecureShim) -> None:
    cmd = ["psql", "-X", "-At", secure.conninfo(), "-c", "status", "-c", "\\conninfo"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                        env={**os.environ, "PGPASSWORD": secure.passwords["postgres"]})
    assert ok.returncode == 0, ok.stderr
    assert "SSL connection" in ok.stdout  # psql's own word for it
    assert {(line.split("|")[0], line.split("|")[1]) for line in ok.stdout.splitlines() if "|" in line} == {
        (DEFAULT, TIMELINE), (DEFAULT, BRANCH), (TENANT_X, TIMELINE_X)}
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={**os.environ, "PGPASSWORD": "nope"})
    assert bad.returncode != 0 and "password authentication failed" in bad.stderr
    # Postgres's own client forced to SCRAM: libpq refuses any other method the server might ask for.
    with psycopg.connect(secure.conninfo("alice", secure.passwords["alice"], require_auth="scram-sha-256")
                         if psycopg.pq.version() >= 160000 else secure.conninfo("alice", secure.passwords["alice"]),
                         autocommit=True) as conn:
        assert {(r[0], r[1]) for r in conn.execute("status").fetchall()} == {(TENANT_X, TIMELINE_X)}


def test_pg_basebackup_with_scram_over_tls(secure: SecureShim, env: ShimEnv) -> None:  # noqa: F811
    dest = _workdir(env, "bb-scram") / "tar"
    run_as_pg_user(["cp", secure.ca, dest.parent / "ca.pem"])
    cmd = ["env", f"PGPASSWORD={secure.passwords['postgres']}", str(env.primary.bin("pg_basebackup")),
           "-d", secure.conninfo(sslrootcert=str(dest.parent / "ca.pem")), "-D", str(dest), "-Ft", "-X", "fetch",
           "--no-sync"]
    out = run_as_pg_user(cmd, check=False, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["backup_manifest", "base.tar"]
    # alice's tenant does not hold branch main of the default tenant: refused.
    denied = run_as_pg_user(["env", f"PGPASSWORD={secure.passwords['alice']}", str(env.primary.bin("pg_basebackup")),
                             "-d", secure.conninfo("alice", sslrootcert=str(dest.parent / "ca.pem")),
                             "-D", str(dest.parent / "denied"), "-Ft", "-X", "fetch", "--no-sync"],
                            check=False, timeout=120)
    assert denied.returncode != 0 and "permission denied for tenant" in denied.stderr, denied.stderr


def test_tls_is_required_and_bytes_before_the_handshake_are_refused(secure: SecureShim) -> None:
    with pytest.raises(psycopg.OperationalError, match="TLS connections only"):
        psycopg.connect(secure.conninfo(password=secure.passwords["postgres"], sslmode="disable"))
    # SSLRequest with a startup packet right behind it, before the server's answer: refused in clear.
    params = b"user\0postgres\0database\0postgres\0\0"
    startup = struct.pack("!ii", 8 + len(params), 196608) + params
    with socket.create_connection((secure.shim.host, secure.shim.port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877103) + startup)
        reply = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply[:1] == b"E" and b"unencrypted data after SSL request" in reply, reply


def test_a_token_is_the_password_over_tls_only(secure: SecureShim) -> None:
    token_x = secure.key.issue("bob", [tenant_scope(TENANT_X)], ttl=600)
    assert secure.status("anyone", token_x) == {(TENANT_X, TIMELINE_X)}
    assert secure.status("anyone", secure.key.issue("ops", [ADMIN], ttl=600)) >= {
        (DEFAULT, TIMELINE), (TENANT_X, TIMELINE_X)}
    for bad in (secure.key.issue("bob", [tenant_scope(TENANT_X)], ttl=60, now=1_000_000),
                SigningKey.generate().issue("mallory", [ADMIN], ttl=600), "not-a-token"):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            secure.status("anyone", bad)
    with pytest.raises(psycopg.OperationalError, match="over TLS only"):
        psycopg.connect(secure.conninfo("anyone", token_x, sslmode="disable", shim=secure.plain))
    # SCRAM users need no TLS (the password never travels).
    with psycopg.connect(secure.conninfo("alice", secure.passwords["alice"], sslmode="disable", shim=secure.plain),
                         autocommit=True) as conn:
        assert conn.execute("status").fetchall()


def test_a_tenant_reads_no_other_tenant_through_the_shim(secure: SecureShim) -> None:
    token_x = secure.key.issue("bob", [tenant_scope(TENANT_X)], ttl=600)
    for user, password in (("anyone", token_x), ("alice", secure.passwords["alice"])):
        with psycopg.connect(secure.conninfo(user, password), autocommit=True) as conn:
            for command in (f"pagestream_v2 {DEFAULT} {TIMELINE}", f"pagestream_v3 {DEFAULT} main",
                            f"basebackup {DEFAULT} {TIMELINE}", f"basebackup {DEFAULT} feature"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for tenant"):
                    conn.execute(command)
            assert {r[0] for r in conn.execute("status").fetchall()} == {TENANT_X}
        # BASE_BACKUP of the startup's branch (zenith.branch, the default tenant unless zenith.tenant).
        with psycopg.connect(secure.conninfo(user, password, replication="true",
                                             options="'-c zenith.branch=feature'"), autocommit=True) as conn:
            for command in ("IDENTIFY_SYSTEM", "BASE_BACKUP (CHECKPOINT 'fast')"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(command)
        # Its own tenant's branch through the same paths works.
        with psycopg.connect(secure.conninfo(user, password, replication="true",
                                             options=f"'-c zenith.tenant={TENANT_X} -c zenith.branch=xmain'"),
                             autocommit=True) as conn:
            assert conn.execute("IDENTIFY_SYSTEM").fetchone()


def test_scram_against_the_rfc_7677_example_and_postgres_itself(env: ShimEnv) -> None:  # noqa: F811
    """Our verifier and server against RFC 7677's exchange, and Postgres accepting our verifier as a
    role's password (libpq then logs in with the password)."""
    import base64

    secret = make_verifier("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    server = ScramServer(secret)
    server._server_nonce = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    assert server.first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO") == \
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    assert server.final(final) == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert ScramVerifier.parse(secret.text()) == secret
    wrong = ScramServer(make_verifier("pencil2", secret.salt))
    wrong._server_nonce = server._server_nonce
    wrong.first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    with pytest.raises(ScramError, match="does not match"):
        wrong.final(final)
    primary = env.primary
    primary.execute(f"CREATE ROLE scram_probe LOGIN PASSWORD '{make_verifier('probe-pw').text()}'")
    try:
        assert primary.sql("SELECT rolpassword LIKE 'SCRAM-SHA-256$4096:%' FROM pg_authid "
                           "WHERE rolname = 'scram_probe'") == [(True,)]
        hba = primary.datadir / "pg_hba.conf"
        original = hba.read_text()
        run_as_pg_user(["sh", "-c", f"printf 'host all scram_probe 127.0.0.1/32 scram-sha-256\\n' | "
                                    f"cat - {hba} > {hba}.new && mv {hba}.new {hba}"])
        primary.sql("SELECT pg_reload_conf()")
        try:
            with psycopg.connect(host=primary.host, port=primary.port, user="scram_probe", password="probe-pw",
                                 dbname="postgres") as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("scram_probe",)
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(host=primary.host, port=primary.port, user="scram_probe", password="nope",
                                dbname="postgres")
        finally:
            run_as_pg_user(["sh", "-c", f"cat > {hba}"], input=original)
            primary.sql("SELECT pg_reload_conf()")
    finally:
        primary.execute("DROP ROLE scram_probe")
