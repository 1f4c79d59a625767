"""A lazy compute's filesystem process: start it on a slim base backup, stop it, clean up after a crash.

Layout under computes/<name>/lazy (made anew at every start):

    upper/      the slim backup's base/ and global/ (plain files the mount passes through)
    overlay/    sparse files of the relation segments the compute writes, with their block maps
    mnt/        the FUSE mount (zenith-computefs); pgdata/base and pgdata/global link into it
    computefs.pid, computefs.log

A compute killed with kill -9 leaves the filesystem process running (or, if it
was killed too, a dead mount): `unmount` ends the process and detaches the
mount either way, so the next start begins clean.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .postgres import PG_OS_USER, make_pg_owned_dir, pid_alive

EXIT_NO_FUSE = 2  # zenith-computefs: FUSE is not available here


class LazyMountError(RuntimeError):
    """The filesystem could not be mounted; the message says why and what to do."""


@dataclass(frozen=True)
class LazyPaths:
    root: Path

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def overlay(self) -> Path:
        return self.root / "overlay"

    @property
    def mnt(self) -> Path:
        return self.root / "mnt"

    @property
    def pidfile(self) -> Path:
        return self.root / "computefs.pid"

    @property
    def log(self) -> Path:
        return self.root / "computefs.log"


def is_mounted(path: Path) -> bool:
    """Whether `path` is a mount point, alive or dead (a dead FUSE mount cannot be stat()ed)."""
    target = str(path.resolve(strict=False)) if path.exists() else os.path.abspath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return os.path.ismount(path)
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
            return True
    return False


def unmount(paths: LazyPaths, timeout: float = 20.0) -> None:
    """End the filesystem process if it runs and detach its mount if one is left."""
    try:
        pid = int(paths.pidfile.read_text())
    except (OSError, ValueError):
        pid = 0
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
    paths.pidfile.unlink(missing_ok=True)
    mnt = os.path.abspath(paths.mnt)
    if is_mounted(paths.mnt):
        tool = shutil.which("fusermount3")
        argv = [tool, "-u", "-z", mnt] if tool else ["umount", "-l", mnt]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode != 0 and is_mounted(paths.mnt):
            raise LazyMountError(f"could not unmount the stale mount {mnt}: {out.stderr.strip()}")


@dataclass
class PendingMount:
    """A filesystem process started ahead of its base backup (its start-up overlaps the fetch); it
    waits for the backup's LSN on its standard input."""

    paths: LazyPaths
    proc: subprocess.Popen[bytes]


def prestart(paths: LazyPaths, *, pageserver: str, tenant: str, timeline: str, token: str | None = None,
             tls_ca: bytes | None = None) -> PendingMount:
    """Clean up what an earlier run left and start the filesystem process; `mount` finishes it. It
    calls the page server with `token` (in its environment, never in argv) and trusts `tls_ca`."""
    unmount(paths)
    shutil.rmtree(paths.root, ignore_errors=True)
    for d in (paths.root, paths.upper, paths.overlay, paths.mnt):
        make_pg_owned_dir(d)
    pw = _pg_user()
    argv = [sys.executable, "-m", "services.computefs.main", "--mountpoint", str(paths.mnt.resolve()),
            "--upper", str(paths.upper.resolve()), "--overlay", str(paths.overlay.resolve()),
            "--pageserver", pageserver, "--tenant", tenant, "--timeline", timeline, "--lsn", "-",
            "--uid", str(pw.pw_uid), "--gid", str(pw.pw_gid)]
    env = {k: v for k, v in os.environ.items() if k != "ZENITH_TOKEN"}
    if token:
        env["ZENITH_TOKEN"] = token
    if tls_ca is not None:
        ca = paths.root / "ca.pem"
        ca.write_bytes(tls_ca)
        argv += ["--tls-ca", str(ca.resolve())]
    with paths.log.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                start_new_session=True, env=env)
    paths.pidfile.write_text(f"{proc.pid}\n")
    return PendingMount(paths, proc)


def _pg_user() -> pwd.struct_passwd:
    return pwd.getpwnam(PG_OS_USER) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())


def mount(pending: PendingMount, datadir: Path, lsn: str, timeout: float = 120.0) -> None:
    """Move the slim backup's base/ and global/ out of `datadir`, have the filesystem process serve
    them with the page server's relation files at `lsn`, and link them back into `datadir`."""
    paths, proc = pending.paths, pending.proc
    for name in ("base", "global"):
        os.rename(datadir / name, paths.upper / name)
    assert proc.stdin is not None
    try:
        proc.stdin.write(f"{lsn}\n".encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it exited already: said why in its log, reported below
    pw = _pg_user()
    deadline = time.monotonic() + timeout
    while not is_mounted(paths.mnt):
        code = proc.poll()
        if code is not None:
            tail = _tail(paths.log)
            if code == EXIT_NO_FUSE:
                raise LazyMountError(tail.splitlines()[-1].removeprefix("zenith-computefs: ") if tail else
                                     "FUSE is unavailable; use a full-copy compute")
            raise LazyMountError(f"the lazy compute's filesystem exited ({code}); see {paths.log}:\n{tail}")
        if time.monotonic() > deadline:
            unmount(paths)
            raise LazyMountError(f"the lazy compute's filesystem did not mount within {timeout:g} s; see {paths.log}")
        time.sleep(0.05)
    for name in ("base", "global"):
        link = datadir / name
        link.symlink_to(paths.mnt.resolve() / name)
        if os.geteuid() == 0:
            os.lchown(link, pw.pw_uid, pw.pw_gid)


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
