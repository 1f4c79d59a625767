"""The libpq shim as a real process in front of a page server, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class RunningShim:
    """`zenith-pgshim` on a free loopback port; close() stops it."""

    def __init__(self, pageserver: str, extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        """Trusting every client (--insecure) unless `extra_args` say how clients authenticate."""
        if not {"--password-file", "--auth-public-key", "--insecure"} & set(extra_args):
            extra_args = [*extra_args, "--insecure"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.pgshim.main", "--listen", "127.0.0.1:0", "--pageserver", pageserver,
             *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
            env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self.host = "127.0.0.1"
                return
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError(f"shim did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> str:
        """Stop the shim; return what it logged."""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


class PageServerProcess:
    """`zenith-pageserver` as its own process (a libpq client blocking in this process must not stall it)."""

    def __init__(self, repo_dir: Path, lsn_wait_timeout: float = 5.0) -> None:
        import grpc

        from zproto import pageserver_pb2_grpc

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.pageserver.main", "--repo", str(repo_dir), "--listen", "127.0.0.1:0",
             "--lsn-wait-timeout", str(lsn_wait_timeout), "--log-level", "warning", "--insecure"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (\S+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"page server did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.address = m.group(1)
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        self.stub = pageserver_pb2_grpc.PageServerStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
