"""Supervise one stock PostgreSQL 15 server: initdb, configure, start, stop, query.

Used by zctl (computes, `zctl init`) and by the test harness. Postgres refuses
to run as root, so when we are root every Postgres binary runs as the
`postgres` OS user through `runuser`, and the data directory is chowned to it.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

DEFAULT_PGBIN = Path("/usr/lib/postgresql/15/bin")
PG_OS_USER = "postgres"


class PostgresError(RuntimeError):
    """A Postgres process could not be created, started or stopped."""


def pg_bindir() -> Path:
    """Where the Postgres 15 binaries live (Debian's layout, else PATH)."""
    if (DEFAULT_PGBIN / "postgres").exists():
        return DEFAULT_PGBIN
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise PostgresError(
        "PostgreSQL 15 binaries not found; install them with "
        "`apt-get install postgresql-15` (or run `make install`)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _running_as_root() -> bool:
    return os.geteuid() == 0


def make_pg_owned_dir(path: Path) -> Path:
    """Create `path` (and parents) so the postgres OS user can own and traverse it."""
    path.mkdir(parents=True, exist_ok=True)
    if _running_as_root():
        pw = pwd.getpwnam(PG_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    path.chmod(0o755)
    return path


def unreachable_ancestor(path: Path) -> Path | None:
    """The first folder above `path` the postgres OS user cannot traverse, if any (root only)."""
    if not _running_as_root():
        return None
    pg_uid = pwd.getpwnam(PG_OS_USER).pw_uid
    for folder in reversed(Path(path).resolve().parents):
        if not folder.exists():
            break  # we create the rest ourselves, traversable
        st = folder.stat()
        if st.st_uid != pg_uid and not st.st_mode & 0o001:
            return folder
    return None


def pg_user_argv(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """`argv`, run as the postgres OS user when we are root."""
    cmd = [str(a) for a in argv]
    return ["runuser", "-u", PG_OS_USER, "--", *cmd] if _running_as_root() else cmd


def run_as_pg_user(argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a Postgres binary, as the postgres OS user when we are root."""
    cmd = pg_user_argv(argv)
    kwargs.setdefault("check", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("capture_output", True)
    try:
        return subprocess.run(cmd, **kwargs)
    except subprocess.CalledProcessError as e:
        raise PostgresError(
            f"{' '.join(cmd)} failed with exit code {e.returncode}: {(e.stderr or e.stdout or '').strip()}"
        ) from None


@dataclass
class PostgresNode:
    """One Postgres server: a data directory, a port and the binaries to run it."""

    datadir: Path
    port: int
    host: str = "127.0.0.1"
    bindir: Path = field(default_factory=pg_bindir)
    user: str = PG_OS_USER

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / f"{self.datadir.name}.log"

    @property
    def waldir(self) -> Path:
        return self.datadir / "pg_wal"

    def bin(self, name: str) -> Path:
        return self.bindir / name

    # -- creation and configuration ---------------------------------------

    def initdb(self, extra_args: Sequence[str] = ()) -> None:
        """Create the cluster with trust auth for loopback and replication allowed."""
        make_pg_owned_dir(self.datadir.parent)
        run_as_pg_user(
            [self.bin("initdb"), "-D", self.datadir, "-U", self.user, "--auth=trust",
             "--no-sync", "-E", "UTF8", "--locale=C", *extra_args]
        )
        hba = self.datadir / "pg_hba.conf"
        with hba.open("a") as f:
            f.write("\n# zenith: replication from loopback\n")
            f.write("host replication all 127.0.0.1/32 trust\n")
        self.configure(
            {
                "listen_addresses": self.host,
                "port": self.port,
                "unix_socket_directories": "",
                "wal_level": "replica",
                "max_wal_senders": 10,
                "max_replication_slots": 10,
                "wal_keep_size": "1GB",
                "fsync": "off",
                "logging_collector": "off",
                "log_min_messages": "warning",
            },
            filename="zenith.conf",
        )

    def configure(self, gucs: Mapping[str, object], filename: str = "zenith.conf") -> None:
        """Append GUCs to an included config file (later settings win)."""
        conf = self.datadir / filename
        main = self.datadir / "postgresql.conf"
        include_line = f"include_if_exists = '{filename}'\n"
        if include_line not in main.read_text():
            with main.open("a") as f:
                f.write(include_line)
        with conf.open("a") as f:
            for name, value in gucs.items():
                f.write(f"{name} = {_guc_literal(value)}\n")
        if _running_as_root():
            pw = pwd.getpwnam(PG_OS_USER)
            os.chown(conf, pw.pw_uid, pw.pw_gid)

    # -- process control ---------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        if self.logfile.exists() and _running_as_root():
            pw = pwd.getpwnam(PG_OS_USER)
            os.chown(self.logfile, pw.pw_uid, pw.pw_gid)
        run_as_pg_user(
            [self.bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-w",
             "-t", str(int(timeout)), "start"],
            timeout=timeout + 10,
        )
        log.info("postgres started", extra={"datadir": str(self.datadir), "port": self.port})

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server; fall back to SIGKILL so no process outlives us."""
        if not self.is_running():
            return
        try:
            run_as_pg_user(
                [self.bin("pg_ctl"), "-D", self.datadir, "-m", mode, "-w",
                 "-t", str(int(timeout)), "stop"],
                timeout=timeout + 10,
            )
        except (PostgresError, subprocess.TimeoutExpired):
            log.warning("pg_ctl stop failed; killing postmaster", extra={"datadir": str(self.datadir)})
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster (crash simulation); return once it and its port are gone.

        "Gone" means reaped, not a zombie: a new postmaster refuses to start
        while the old pid in postmaster.pid still exists.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not _pid_exists(pid) and not _port_open(self.host, self.port):
                return
            time.sleep(0.05)

    def postmaster_pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            first = pidfile.read_text().split("\n", 1)[0].strip()
            return int(first)
        except (FileNotFoundError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and pid_alive(pid)

    # -- clients ------------------------------------------------------------

    def connstr(self, dbname: str = "postgres", replication: bool = False) -> str:
        s = f"host={self.host} port={self.port} user={self.user} dbname={dbname}"
        if replication:
            s += " replication=true"
        return s

    def connect(self, dbname: str = "postgres", autocommit: bool = True) -> psycopg.Connection[Any]:
        import psycopg  # not at module level: zctl's commands start faster without it

        return psycopg.connect(self.connstr(dbname), autocommit=autocommit)

    def sql(self, query: str, params: Sequence[Any] | None = None, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; return its rows (empty if none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query.encode() if params is None else query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def execute(self, script: str, dbname: str = "postgres") -> None:
        """Run a multi-statement script (simple query protocol)."""
        with self.connect(dbname) as conn:
            conn.execute(script.encode())

    def current_lsn(self) -> int:
        from pgformat.lsn import parse_lsn

        return parse_lsn(self.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0])

    def flush_lsn(self) -> int:
        from pgformat.lsn import parse_lsn

        return parse_lsn(self.sql("SELECT pg_current_wal_flush_lsn()::text")[0][0])

    def psql(self, *args: str, dbname: str = "postgres") -> str:
        out = run_as_pg_user([self.bin("psql"), "-X", "-h", self.host, "-p", str(self.port),
                              "-U", self.user, "-d", dbname, "-v", "ON_ERROR_STOP=1", *args])
        return out.stdout

    def pgbench(self, *args: str, dbname: str = "postgres") -> str:
        out = run_as_pg_user([self.bin("pgbench"), "-h", self.host, "-p", str(self.port),
                              "-U", self.user, *args, dbname])
        return out.stdout + out.stderr


def _guc_literal(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("'", "''")
    return f"'{text}'"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pid_exists(pid: int) -> bool:
    """True while the process exists at all, zombies included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0
