"""Run the services as local background processes: the embedded default.

Each service gets a pid file and a log file under the repository directory,
and `start` returns only once every service answers gRPC health checks.
Layout of a repository directory:

    config.json          ports and worker counts (written by `zctl start` on first use)
                         services: redo pool, page server, walreceiver (gRPC) and the
                         libpq shim (Postgres wire protocol, default port 6400)
    pageserver/          the page server's data
    security/            keys, tokens and TLS certificates (see security.py); absent with --insecure
    logs/<service>.log
    pids/<service>.pid
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth import ClientSecurity

from .postgres import pid_alive
from .security import SecurityDir

SERVICE_ORDER = ("redo", "pageserver", "walreceiver", "shim")
DEFAULT_PORTS = {"shim": 6400, "redo": 6401, "pageserver": 6402, "walreceiver": 6403}
HEALTH_NAMES = {"redo": "zenith.v1.Redo", "pageserver": "zenith.v1.PageServer", "walreceiver": "zenith.v1.WalReceiver"}


class SupervisorError(RuntimeError):
    """A service could not be started or stopped; the message says what to look at."""


@dataclass
class ClusterConfig:
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    redo_workers: int = max(1, os.cpu_count() or 1)
    # Tokens on every call (and the keys in security/); False only with `zctl init --insecure`.
    auth: bool = True
    # TLS on every gRPC port (the certificate in security/tls).
    tls: bool = True

    # Services that run elsewhere (containers, other hosts): service -> host:port. Not saved.
    remote: dict[str, str] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return self.remote.get(service) or f"{self.host}:{self.ports[service]}"

    def metrics_address(self, service: str) -> str:
        """Where a local service serves its Prometheus metrics (ports `<service>_metrics`, default its
        port + 1000)."""
        return f"{self.host}:{self.ports.get(f'{service}_metrics') or self.ports[service] + 1000}"


@dataclass
class ServiceStatus:
    name: str
    address: str
    pid: int | None
    running: bool
    healthy: bool
    log: str
    metrics_url: str = ""


class LocalCluster:
    def __init__(self, repo: Path, remote: dict[str, str] | None = None, client: ClientSecurity | None = None) -> None:
        """`client`: the token and CA to call the services with (default: the repository's admin token)."""
        self.repo = repo
        self.config_path = repo / "config.json"
        self.remote = {k: v for k, v in (remote or {}).items() if v}
        self.security = SecurityDir(repo / "security")
        self._client = client

    def client_security(self, name: str = "admin") -> ClientSecurity:
        """What a call to the services presents: the token and CA given (`client`), each else the
        repository's (token `name`; none when the repository is insecure or has no keys, as a compose
        bootstrap's has not)."""
        given = self._client or ClientSecurity()
        config = self.load_config()
        own = self.security.exists()
        token = given.token or (self.security.token(name) if own and config.auth else None)
        ca = given.tls_ca or (self.security.ca.read_bytes() if own and config.tls else None)
        return ClientSecurity(token, ca)

    def channel(self, service: str, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
        return self.client_security().channel(self.load_config().address(service), options or [])

    # -- configuration -------------------------------------------------------------

    def load_config(self) -> ClusterConfig:
        if self.config_path.exists():
            raw = json.loads(self.config_path.read_text())
            # Repositories made before a service existed get its default port.
            raw["ports"] = {**DEFAULT_PORTS, **raw.get("ports", {})}
            raw.pop("remote", None)
            return ClusterConfig(**raw, remote=dict(self.remote))
        return ClusterConfig(remote=dict(self.remote))

    def save_config(self, config: ClusterConfig) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        saved = asdict(config)
        saved.pop("remote")
        write_file_atomically(self.config_path, json.dumps(saved, indent=2).encode())

    def _pidfile(self, name: str) -> Path:
        return self.repo / "pids" / f"{name}.pid"

    def _logfile(self, name: str) -> Path:
        return self.repo / "logs" / f"{name}.log"

    def _argv(self, name: str, config: ClusterConfig) -> list[str]:
        return [*self._service_argv(name, config), "--metrics-listen", config.metrics_address(name)]

    def _service_argv(self, name: str, config: ClusterConfig) -> list[str]:
        py = sys.executable
        if name == "redo":
            return [py, "-m", "services.redo.main", "--listen", config.address("redo"),
                    "--workers", str(config.redo_workers), *self._security_argv(name, config, None)]
        if name == "pageserver":
            return [py, "-m", "services.pageserver.main", "--repo", str(self.repo / "pageserver"),
                    "--listen", config.address("pageserver"), "--redo", config.address("redo"),
                    *self._security_argv(name, config, "redo")]
        if name == "walreceiver":
            return [py, "-m", "services.walreceiver.main", "--listen", config.address("walreceiver"),
                    "--pageserver", config.address("pageserver"),
                    "--data-dir", str(self.repo / "walreceiver"),
                    "--state-file", str(self.repo / "walreceiver" / "attachments.json"),
                    *self._security_argv(name, config, "ingest")]
        if name == "shim":
            return [py, "-m", "services.pgshim.main", "--listen", config.address("shim"),
                    "--pageserver", config.address("pageserver"), *self._security_argv(name, config, "shim")]
        raise ValueError(name)

    def _security_argv(self, name: str, config: ClusterConfig, token: str | None) -> list[str]:
        """How a service checks its callers and calls the next one (files only: no secret in argv)."""
        sec = self.security
        argv: list[str] = []
        if name == "shim" and config.auth:  # SCRAM users, and tokens as the password
            argv += ["--password-file", str(sec.shim_users), "--auth-public-key", str(sec.public_key)]
        else:
            argv += ["--auth-public-key", str(sec.public_key)] if config.auth else ["--insecure"]
        if config.tls:
            argv += ["--tls-cert", str(sec.server_cert), "--tls-key", str(sec.server_key)]
        if token is not None and config.auth:
            argv += ["--token-file", str(sec.token_file(token))]
        if token is not None and config.tls:
            argv += ["--tls-ca", str(sec.ca)]
        return argv

    # -- process control -------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self._pidfile(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self, timeout: float = 60.0) -> list[ServiceStatus]:
        config = self.load_config()
        if not self.config_path.exists():
            self.save_config(config)
        for d in ("logs", "pids", "pageserver"):
            (self.repo / d).mkdir(parents=True, exist_ok=True)
        if config.auth or config.tls:
            self.security.ensure([config.host])
        for name in SERVICE_ORDER:
            if self.pid(name) is None:
                log = self._logfile(name).open("ab")
                proc = subprocess.Popen(self._argv(name, config), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.repo)
                log.close()
                write_file_atomically(self._pidfile(name), f"{proc.pid}\n".encode())
            self._wait_healthy(name, config, timeout)
        return self.status()

    def _wait_healthy(self, name: str, config: ClusterConfig, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid(name) is None:
                raise SupervisorError(f"{name} exited during start-up; see {self._logfile(name)}:\n{self._log_tail(name)}")
            if self._healthy(name, config):
                return
            time.sleep(0.1)
        raise SupervisorError(f"{name} did not become healthy within {timeout:g}s; see {self._logfile(name)}")

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self._logfile(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        for name in reversed(SERVICE_ORDER):
            pid = self.pid(name)
            if pid is None:
                self._pidfile(name).unlink(missing_ok=True)
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            self._pidfile(name).unlink(missing_ok=True)

    def status(self) -> list[ServiceStatus]:
        config = self.load_config()
        out = []
        for name in SERVICE_ORDER:
            pid = self.pid(name)
            out.append(ServiceStatus(name, config.address(name), pid, pid is not None,
                                     pid is not None and self._healthy(name, config), str(self._logfile(name)),
                                     f"http://{config.metrics_address(name)}/metrics"))
        return out

    def _healthy(self, name: str, config: ClusterConfig) -> bool:
        if name == "shim":  # a session as zctl: the admin token as the password, over TLS when on
            client = self.client_security()
            return wire_check(config.host, config.ports["shim"], password=client.token,
                              sslmode="require" if config.tls else "prefer")
        return health_check(config.address(name), HEALTH_NAMES[name],
                            ca=self.security.ca.read_bytes() if config.tls and self.security.ca.exists() else None)

    def security_summary(self) -> str:
        config = self.load_config()
        if not config.auth:
            return "INSECURE: no authentication (development only; `zctl init --insecure`)" + \
                (", TLS on" if config.tls else ", no TLS")
        return f"tokens required on every call ({self.security.public_key}), " + \
            ("TLS on every gRPC port" if config.tls else "no TLS")


def health_check(address: str, service: str, timeout: float = 1.0, ca: bytes | None = None) -> bool:
    """The standard health service (open without a token); over TLS trusting `ca` when given."""
    try:
        with ClientSecurity(None, ca).channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def wire_check(host: str, port: int, timeout: float = 2.0, password: str | None = None,
               sslmode: str = "prefer") -> bool:
    """The libpq shim completes a Postgres protocol startup (it speaks no gRPC health)."""
    import psycopg

    try:
        with psycopg.connect(host=host, port=port, user="zctl", dbname="zctl", connect_timeout=int(max(1, timeout)),
                             password=password or "", sslmode=sslmode, autocommit=True):
            return True
    except psycopg.Error:
        return False


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, rename over `path`, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
