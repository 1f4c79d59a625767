"""deploy/: the compose file and Dockerfile checked statically (no Docker engine here), and the
container entry points run for real as processes.

Static checks: the compose file parses; every command and health check runs a
real program whose real argument parser accepts the flags; every host:port a
service dials is a compose service listening on that port; volumes and
dependencies are declared; redo scales (no fixed name or host port); every
Dockerfile COPY source exists. `docker compose config` runs where the plugin
exists.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from zctl_util import make_repo, zctl

from zctl.postgres import free_port, make_pg_owned_dir, pg_bindir

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from services.computefs.main import build_parser as computefs
    from services.pageserver.main import build_parser as pageserver
    from services.pgshim.main import build_parser as pgshim
    from services.redo.main import build_parser as redo
    from services.walreceiver.main import build_parser as walreceiver
    from zctl.main import build_parser as zctl_parser

    return {"zenith-pageserver": pageserver(), "zenith-pgshim": pgshim(), "zenith-redo": redo(),
            "zenith-walreceiver": walreceiver(), "zenith-computefs": computefs(), "zctl": zctl_parser()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _listen_port(service: dict[str, Any]) -> int:
    cmd = service["command"]
    if "--listen" in cmd:
        return int(cmd[cmd.index("--listen") + 1].rsplit(":", 1)[1])
    return int(cmd[cmd.index("--port") + 1])


def test_every_command_is_a_real_entry_point_with_real_flags(compose: dict[str, Any]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    parsers = _parsers()
    assert set(parsers) == set(scripts)
    for name, service in compose["services"].items():
        program, *argv = service["command"]
        assert program in scripts, f"{name}: {program} is not an entry point"
        try:
            parsers[program].parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: {program} rejects {argv}")
        health = service.get("healthcheck", {}).get("test")
        if health:
            assert health[0] == "CMD"
            if health[1] in scripts:
                parsers[health[1]].parse_args(health[2:])
            else:
                assert (pg_bindir() / health[1]).exists(), f"{name}: health check runs unknown {health[1]}"


def test_addresses_ports_volumes_and_dependencies_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    one_shot = ("bootstrap", "keys")
    listening = {name: _listen_port(s) for name, s in services.items() if name not in one_shot}
    for name, service in services.items():
        text = " ".join(service["command"])
        for host, port in re.findall(r"(?:dns:///)?([a-z][\w-]*):(\d+)", text):
            assert host in services, f"{name} dials unknown service {host}"
            assert listening[host] == int(port), f"{name} dials {host}:{port}, but {host} listens on {listening[host]}"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], f"{name}: volume {volume} is not declared"
        for mapping in service.get("ports", []):
            # HOST_IP:HOST_PORT:CONTAINER_PORT; the services trust their network, so loopback only.
            host_ip, _host_port, container_port = mapping.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {mapping} beyond loopback"
            assert int(container_port) == listening[name], f"{name} publishes a port it does not listen on"
    assert "container_name" not in services["redo"] and "ports" not in services["redo"], "redo must scale"
    assert "dns:///redo:6401" in services["pageserver"]["command"]  # round-robin over every redo replica
    assert services["compute"]["hostname"] in services["compute"]["command"]  # --advertise-host
    # zctl pg run leaves the postmaster to PID 1 (pg_ctl daemonizes it), and its clean stop waits for
    # the page server to hold the shutdown checkpoint: an init, and more than Docker's 10 s to stop.
    assert services["compute"].get("init") is True
    grace = re.fullmatch(r"(\d+)s", services["compute"].get("stop_grace_period", "10s"))
    assert grace and int(grace.group(1)) >= 40


def test_every_service_checks_tokens_over_tls_and_every_caller_presents_one(compose: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """Security on in containers too: the gRPC services check tokens against the `keys` volume's public
    key and serve TLS; whatever dials a service presents the token of its role and trusts the CA; the
    files named are the ones `zctl keys` makes (run here), for the names the services are dialed by."""
    services = compose["services"]
    roles = {"pageserver": "redo.jwt", "walreceiver": "ingest.jwt", "shim": "shim.jwt", "bootstrap": "admin.jwt",
             "compute": "admin.jwt"}
    keys_cmd = services["keys"]["command"]
    hosts = [keys_cmd[i + 1] for i, a in enumerate(keys_cmd) if a == "--host"]
    assert keys_cmd[:3] == ["zctl", "keys", "/keys"]
    zctl(tmp_path / "unused", "keys", str(tmp_path / "keys"), *keys_cmd[3:])
    made = {str(p.relative_to(tmp_path)).replace("keys/", "/keys/", 1) for p in (tmp_path / "keys").rglob("*")}
    assert oct((tmp_path / "keys" / "signing_key.pem").stat().st_mode & 0o777) == "0o600"
    for name, service in services.items():
        cmd = service["command"]
        assert "--insecure" not in cmd, name
        if cmd[0] in ("zenith-redo", "zenith-pageserver", "zenith-walreceiver"):
            assert {"--auth-public-key", "--tls-cert", "--tls-key"} <= set(cmd), name
            assert name in hosts, f"{name} is dialed by its service name, which its certificate must carry"
        if name in roles:
            assert cmd[cmd.index("--token-file") + 1] == f"/keys/tokens/{roles[name]}", name
            assert "--tls-ca" in cmd, name
        for path in [a for a in cmd if a.startswith("/keys/")]:
            assert path in made, f"{name} reads {path}, which `zctl keys` does not make"
            assert "keys:/keys:ro" in service.get("volumes", []), f"{name} reads /keys without mounting it"
    # The services wait for the keys: redo directly, the others through redo and the page server.
    assert services["redo"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"


def test_dockerfile_copies_what_exists_and_installs_postgres() -> None:
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M)
    assert copies
    for line in copies:
        for src in line.split():
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
    assert "postgresql-15" in text and "pip install" in text and "grpc_tools.protoc" in text


def _compose_cli() -> list[str] | None:
    """`docker compose` (the v2 plugin) or Debian's `docker-compose`; neither needs an engine for `config`."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def test_docker_compose_config_where_available() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed here")
    out = subprocess.run([*cli, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_pg_run_foreground_compute_and_bootstrap(tmp_path: Path, pg_base_dir: Path) -> None:
    """The compose `bootstrap` and `compute` commands as processes against services on loopback."""
    repo = make_repo(make_pg_owned_dir(pg_base_dir / f"deploy-{tmp_path.name}") / "services")
    compute_repo = make_pg_owned_dir(pg_base_dir / f"deploy-{tmp_path.name}") / "compute"
    zctl(repo, "start")
    try:
        ports = json.loads((repo / "config.json").read_text())["ports"]
        # As compose's containers do: the services' addresses, the admin token and CA from a shared volume.
        remote = ["--pageserver", f"127.0.0.1:{ports['pageserver']}", "--walreceiver", f"127.0.0.1:{ports['walreceiver']}",
                  "--token-file", str(repo / "security" / "tokens" / "admin.jwt"),
                  "--tls-ca", str(repo / "security" / "tls" / "ca.pem")]
        assert zctl(repo, "health", f"127.0.0.1:{ports['pageserver']}", "--service", "zenith.v1.PageServer").returncode == 0
        assert zctl(repo, "health", f"127.0.0.1:{free_port()}", check=False).returncode == 1
        boot = compute_repo.parent / "boot"
        assert "created" in zctl(boot, *remote, "bootstrap", "--branch", "main").stdout
        assert "nothing to do" in zctl(boot, *remote, "bootstrap", "--branch", "main").stdout  # idempotent
        port = free_port()

        def run_compute() -> subprocess.Popen[str]:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zctl.main", "--repo", str(compute_repo), *remote, "pg", "run", "main",
                 "--branch", "main", "--port", str(port), "--listen-addresses", "*", "--advertise-host", "127.0.0.1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "running on branch main" in line, line + (proc.stderr.read() if proc.stderr else "")
            return proc

        proc = run_compute()
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)")
            assert conn.execute("SHOW synchronous_standby_names").fetchone()[0].startswith("zenith_walreceiver_")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "stopped (SIGTERM)" in out, out + err
        # The container restarts: the compute is rebuilt from the page server alone.
        proc = run_compute()
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as conn:
                assert conn.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
        assert proc.returncode == 0
    finally:
        zctl(repo, "stop", check=False)



def test_redo_replicas_share_the_page_servers_load() -> None:
    """What `--scale redo=N` relies on: the page server's redo client round-robins over every address of
    the target (compose resolves `dns:///redo:6401` to all replicas; here two real redo services)."""
    from pgformat.page import page_init
    from services.pageserver.keys import rel_page_key
    from services.pageserver.redo_client import RemoteRedo
    from services.redo.pool import RedoPool
    from services.redo.server import SERVICE_NAME, RedoServicer
    from services.runtime import GrpcEndpoint
    from zproto import redo_pb2_grpc

    pools, endpoints = [], []
    try:
        for _ in range(2):
            pool = RedoPool(1)
            pool.start()
            pools.append(pool)
            servicer = RedoServicer(pool)
            endpoint = GrpcEndpoint("127.0.0.1:0", [SERVICE_NAME],
                                    lambda server, s=servicer: redo_pb2_grpc.add_RedoServicer_to_server(s, server))
            endpoint.start()
            endpoints.append(endpoint)
        client = RemoteRedo("ipv4:" + ",".join(e.address for e in endpoints))
        page = bytearray(8192)
        page_init(page)
        key = rel_page_key(1663, 5, 16384, 0, 0)
        for _ in range(20):
            assert client.redo(key, bytes(page), []) == bytes(page)
        client.close()
        served = [sum(s["jobs_done"] for s in pool.stats()) for pool in pools]
        assert sum(served) == 20 and min(served) >= 5, served
    finally:
        for endpoint in endpoints:
            endpoint.stop(0)
        for pool in pools:
            pool.close()


def test_redo_recycles_connections_so_clients_re_resolve() -> None:
    """`--max-connection-age`: the redo server closes each connection after that age (GOAWAY); the
    client reconnects, which is when a `dns:///` target is resolved again and new replicas join."""
    import threading

    import grpc

    from services.pageserver.redo_client import RemoteRedo
    from zproto import redo_pb2

    proc = subprocess.Popen([sys.executable, "-m", "services.redo.main", "--listen", "127.0.0.1:0", "--workers", "1",
                             "--max-connection-age", "1", "--insecure"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        client = RemoteRedo("dns:///" + line.split()[-1])
        states: list[grpc.ChannelConnectivity] = []
        changed = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            changed.set()

        client._channel.subscribe(watch, try_to_connect=True)
        try:  # any answer will do: it is the connection we watch
            client._stub.ApplyRecords(redo_pb2.ApplyRecordsRequest(), timeout=10)
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.UNAVAILABLE, e

        def recycled() -> bool:
            ready = [i for i, st in enumerate(states) if st == grpc.ChannelConnectivity.READY]
            # After GOAWAY the round-robin policy reconnects at once (and asks for re-resolution).
            return bool(ready) and grpc.ChannelConnectivity.CONNECTING in states[ready[0]:]

        deadline = time.monotonic() + 10
        while not recycled():
            assert time.monotonic() < deadline, f"the connection was never recycled: {states}"
            changed.wait(0.5)
            changed.clear()
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

