"""Run zctl as a user would: a subprocess, a repository directory, free loopback ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc

from zctl.postgres import free_port
from zctl.supervisor import LocalCluster


def make_repo(path: Path) -> Path:
    """A repository whose services listen on free ports (so tests never collide)."""
    path.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("redo", "pageserver", "walreceiver", "shim", "redo_metrics",
                                            "pageserver_metrics", "walreceiver_metrics", "shim_metrics")}
    (path / "config.json").write_text(json.dumps({"host": "127.0.0.1", "ports": ports, "redo_workers": 2}))
    return path


def zctl(repo: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ZENITH_REPO"}
    env["COLUMNS"] = "200"
    proc = subprocess.run([sys.executable, "-m", "zctl.main", "--repo", str(repo), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"zctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def service_channel(repo: Path, service: str, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
    """A channel to one of the repository's services as zctl opens it: its admin token, over TLS."""
    return LocalCluster(repo).channel(service, options)


def shim_conninfo(repo: Path, **extra: str) -> str:
    """libpq parameters for the repository's shim as its operator: user postgres with the password zctl
    made (SCRAM), TLS verified against the repository's CA."""
    config = json.loads((repo / "config.json").read_text())
    sec = repo / "security"
    parts = {"host": "127.0.0.1", "port": str(config["ports"]["shim"]), "user": "postgres", "dbname": "postgres",
             "password": (sec / "shim_password").read_text().strip(), "sslmode": "verify-full",
             "sslrootcert": str(sec / "tls" / "ca.pem"), **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())
