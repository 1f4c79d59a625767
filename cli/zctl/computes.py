"""Computes: stock Postgres 15 servers whose data comes from the page server.

A compute is stateless: `zctl pg start` fetches a base backup of its branch
from the page server (at the latest LSN, or at a fixed LSN for a read-only
compute), writes its configuration and starts Postgres. A writable compute
then tells the walreceiver to stream its WAL into the branch ("callmemaybe"),
and names the walreceiver in synchronous_standby_names so that a commit
returns only once the page server holds it.

A *lazy* compute (`zctl pg create --lazy`) gets a slim base backup instead
(no relation files) and its base/ and global/ come from a FUSE filesystem
(services/computefs, started and stopped by lazy_mount.py) that reads relation
pages from the page server at the backup's LSN on demand and keeps what the
compute writes in a local overlay: its start does not grow with the database.
Like a full copy it starts from the page server every time (a fresh overlay at
the branch's latest LSN), so a crash loses nothing the walreceiver acknowledged.

Layout under the repository: computes/<name>/compute.json,
computes/<name>/pgdata (owned by the postgres OS user) and, for a lazy
compute, computes/<name>/lazy (see lazy_mount.py).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psycopg
from psycopg.conninfo import make_conninfo

from pgformat.autoconf import format_auto_conf
from pgformat.lsn import format_lsn, parse_lsn
from pgformat.scram import make_verifier
from services.auth import ClientSecurity
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc, walreceiver_pb2, walreceiver_pb2_grpc

from .compute_config import ComputeConfigError, check_hba_line, read_back, updated
from .extract import DataDirectoryWriter, ExtractError
from .lazy_mount import LazyMountError, LazyPaths, PendingMount, mount, prestart, unmount
from .postgres import PG_OS_USER, PostgresNode, free_port, make_pg_owned_dir, pid_alive
from .supervisor import write_file_atomically

DEFAULT_TENANT = "0" * 32
# The role the walreceiver replicates a compute as (the only one pg_hba lets replicate).
REPLICATION_ROLE = "zenith_walreceiver"
FIRST_COMPUTE_PORT = 55432


class ComputeError(RuntimeError):
    """A compute operation that cannot be done; the message says why and what to do."""


def walreceiver_application_name(timeline: str) -> str:
    """The application_name the walreceiver uses for a timeline (see walreceiver.proto)."""
    return f"zenith_walreceiver_{timeline}"


def replication_slot_name(timeline: str) -> str:
    return f"zenith_{timeline[:24]}"


def attachment_of(walreceiver: walreceiver_pb2_grpc.WalReceiverStub, timeline: str,
                  tenant: str = DEFAULT_TENANT) -> walreceiver_pb2.AttachmentStatus | None:
    """The walreceiver's attachment of a timeline; None if there is none or it cannot be asked."""
    try:
        found = walreceiver.Status(walreceiver_pb2.StatusRequest(
            tenant=common_pb2.TenantId(id=tenant), timeline=common_pb2.TimelineId(id=timeline)),
            timeout=10).attachments
    except grpc.RpcError:
        return None
    return found[0] if found else None


def check_writable(branch: str, info: pageserver_pb2.TimelineInfo) -> None:
    """ComputeError if a writable compute on the branch would fork the WAL of its writer."""
    w = info.writer
    if w.kind == pageserver_pb2.WRITER_KIND_PRIMARY:
        raise ComputeError(
            f"branch {branch!r} follows the external primary {w.name}: a writable compute on it would fork it "
            f"silently. Use a read-only compute at an LSN (`zctl pg create NAME --branch {branch} --lsn LSN`), "
            f"a new branch of it (`zctl branch create dev --parent {branch}`), or stop following the primary "
            f"first (`zctl detach --branch {branch}`)")


@dataclass
class ComputeSpec:
    name: str
    branch: str
    timeline: str
    port: int
    lsn: str | None  # read-only at this LSN; None = writable at the branch's head
    created_at: float
    listen_addresses: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"  # where the walreceiver reaches this compute
    # What survives the data directory (compute_config.py): postgresql.auto.conf's settings and
    # the extra pg_hba.conf / pg_ident.conf lines.
    settings: dict[str, str] = field(default_factory=dict)
    hba: list[str] = field(default_factory=list)
    ident: list[str] = field(default_factory=list)
    tenant: str = DEFAULT_TENANT
    lazy: bool = False  # relation files served on demand by a FUSE mount instead of a full copy

    @property
    def loopback_only(self) -> bool:
        return self.listen_addresses in ("127.0.0.1", "localhost")


class Computes:
    def __init__(self, repo: Path, pageserver: pageserver_pb2_grpc.PageServerStub,
                 walreceiver: walreceiver_pb2_grpc.WalReceiverStub, *, pageserver_address: str = "",
                 pageserver_security: ClientSecurity | None = None) -> None:
        self.warnings: list[str] = []  # from the last start or stop: ALTER SYSTEM settings dropped
        self.root = repo / "computes"
        self.pageserver = pageserver
        self.walreceiver = walreceiver
        self.pageserver_address = pageserver_address  # for a lazy compute's filesystem process
        self.pageserver_security = pageserver_security or ClientSecurity()

    # -- metadata --------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.root / name

    def spec(self, name: str) -> ComputeSpec:
        path = self._dir(name) / "compute.json"
        if not path.exists():
            raise ComputeError(f"no compute named {name!r}; create it with `zctl pg create {name} --branch B`")
        return ComputeSpec(**json.loads(path.read_text()))

    def exists(self, name: str) -> bool:
        return (self._dir(name) / "compute.json").exists()

    def list(self) -> list[ComputeSpec]:
        if not self.root.exists():
            return []
        return [self.spec(d.name) for d in sorted(self.root.iterdir()) if (d / "compute.json").exists()]

    def node(self, spec: ComputeSpec) -> PostgresNode:
        return PostgresNode(datadir=self._dir(spec.name) / "pgdata", port=spec.port)

    def is_running(self, spec: ComputeSpec) -> bool:
        pid = self.node(spec).postmaster_pid()
        return pid is not None and pid_alive(pid)

    def _save(self, spec: ComputeSpec) -> None:
        write_file_atomically(self._dir(spec.name) / "compute.json", json.dumps(asdict(spec), indent=2).encode())

    def create(self, name: str, branch: str, timeline: str, lsn: int | None, port: int | None, *,
               listen_addresses: str = "127.0.0.1", advertise_host: str = "127.0.0.1",
               settings: dict[str, str] | None = None, tenant: str = DEFAULT_TENANT,
               lazy: bool = False) -> ComputeSpec:
        if not name or "/" in name or name.startswith("."):
            raise ComputeError(f"invalid compute name {name!r}")
        if (self._dir(name) / "compute.json").exists():
            raise ComputeError(f"compute {name!r} already exists")
        used = {c.port for c in self.list()}
        if port is None:
            port = FIRST_COMPUTE_PORT
            while port in used or not _port_free(port):
                port += 1
        elif port in used:
            raise ComputeError(f"port {port} is already used by another compute")
        try:
            kept = updated({}, settings or {}, [])
        except ComputeConfigError as e:
            raise ComputeError(str(e)) from None
        spec = ComputeSpec(name, branch, timeline, port, format_lsn(lsn) if lsn is not None else None, time.time(),
                           listen_addresses, advertise_host, kept, tenant=tenant, lazy=lazy)
        self._save(spec)
        return spec

    # -- configuration that outlives the data directory -------------------------------------

    def read_back(self, spec: ComputeSpec) -> list[str]:
        """Keep what ALTER SYSTEM wrote into the compute's data directory; the warnings to show."""
        auto_conf = self.node(spec).datadir / "postgresql.auto.conf"
        try:
            text = auto_conf.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return []
        settings, warnings = read_back(text)
        if settings != spec.settings:
            spec.settings = settings
            self._save(spec)
        return warnings

    def configure_settings(self, name: str, set_: dict[str, str], reset: list[str],
                           hba: tuple[list[str], list[str]] = ([], []),
                           ident: tuple[list[str], list[str]] = ([], [])) -> tuple[ComputeSpec, list[str]]:
        """Change a compute's kept settings and pg_hba / pg_ident lines ((added, removed) each). A
        running compute gets them now (ALTER SYSTEM, which also checks the values; a reload)."""
        spec = self.spec(name)
        try:
            settings = updated(spec.settings, set_, reset)
            hba_lines = _edit_lines(spec.hba, *hba)
            ident_lines = _edit_lines(spec.ident, *ident)
        except ComputeConfigError as e:
            raise ComputeError(str(e)) from None
        warnings: list[str] = []
        if self.is_running(spec):
            import psycopg  # not at module level: zctl's commands start faster without it
            from psycopg import sql

            node = self.node(spec)
            try:
                with node.connect() as conn:
                    for key in reset:
                        conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(key.lower())))
                    for key, value in set_.items():
                        conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                            sql.Identifier(key.lower()), sql.Literal(value)))
                    spec.hba, spec.ident = hba_lines, ident_lines
                    self._write_hba(spec, node)
                    conn.execute("SELECT pg_reload_conf()")
            except psycopg.Error as e:
                raise ComputeError(f"compute {name!r}: {e.diag.message_primary or e}") from None
            warnings = self.read_back(spec)
        else:
            spec.settings = settings
        spec.hba, spec.ident = hba_lines, ident_lines
        self._save(spec)
        return spec, warnings

    # -- start / stop -------------------------------------------------------------------

    def start(self, name: str) -> tuple[ComputeSpec, int]:
        spec = self.spec(name)
        if self.is_running(spec):
            raise ComputeError(f"compute {name!r} is already running on port {spec.port}")
        if spec.lsn is None:
            for other in self.list():
                if other.name != name and other.timeline == spec.timeline and other.lsn is None and self.is_running(other):
                    raise ComputeError(
                        f"branch {spec.branch!r} already has a running writable compute {other.name!r} "
                        f"(port {other.port}); stop it first or create a read-only compute with --lsn"
                    )
        node = self.node(spec)
        epoch = 0
        self.unmount(spec)  # a lazy compute killed last time left its filesystem behind
        try:
            # A lazy compute's filesystem process starts first: its start-up overlaps what follows.
            pending = self._prestart(spec) if spec.lazy else None
            if spec.lsn is None:
                # What the walreceiver kept of an earlier writer of the branch (a compute killed,
                # say) goes to the page server first: the base backup must include every commit
                # acknowledged to it. Then this compute claims the branch, fencing any earlier writer.
                takeover = self._claimable(spec)
                self._detach(spec, required=True)
                epoch = self._claim(spec, takeover)
            warnings = self.read_back(spec)  # a compute killed last time: its ALTER SYSTEM settings are still there
            lsn = self._fetch_basebackup(spec, node.datadir, slim=spec.lazy)
            if pending is not None:
                self._mount(spec, pending, node.datadir, lsn)
            self._configure(spec, node)
            node.start()
            self.warnings = warnings
            if spec.lsn is None:
                password = self._replication_password(spec, node)
                self._attach_walreceiver(spec, node, lsn, epoch, password)
        except BaseException:
            if spec.lazy and not self.is_running(spec):
                self.unmount(spec)
            raise
        return spec, lsn

    def lazy_paths(self, spec: ComputeSpec) -> LazyPaths:
        return LazyPaths(self._dir(spec.name) / "lazy")

    def _prestart(self, spec: ComputeSpec) -> PendingMount:
        """The filesystem process, started before the base backup is fetched (its start-up overlaps it)."""
        if not self.pageserver_address:
            raise ComputeError("a lazy compute needs the page server's address")
        try:
            return prestart(self.lazy_paths(spec), pageserver=self.pageserver_address, tenant=spec.tenant,
                            timeline=spec.timeline, token=self.pageserver_security.token,
                            tls_ca=self.pageserver_security.tls_ca)
        except LazyMountError as e:
            raise ComputeError(f"compute {spec.name!r}: {e}") from None

    def _mount(self, spec: ComputeSpec, pending: PendingMount, datadir: Path, lsn: int) -> None:
        try:
            mount(pending, datadir, format_lsn(lsn))
        except LazyMountError as e:
            raise ComputeError(f"compute {spec.name!r}: {e}") from None

    def unmount(self, spec: ComputeSpec) -> None:
        """Stop a lazy compute's filesystem process and detach its mount (nothing to do for a full copy)."""
        paths = self.lazy_paths(spec)
        if not paths.root.exists():
            return
        try:
            unmount(paths)
        except LazyMountError as e:
            raise ComputeError(f"compute {spec.name!r}: {e}") from None

    def _timeline_request(self, spec: ComputeSpec) -> tuple[common_pb2.TenantId, common_pb2.TimelineId]:
        return common_pb2.TenantId(id=spec.tenant), common_pb2.TimelineId(id=spec.timeline)

    def _claimable(self, spec: ComputeSpec) -> bool:
        """ComputeError unless this compute may claim its branch; whether that takes over a claim.

        A claim of this compute (an earlier incarnation, killed) or of another compute of this
        repository that is not running is taken over (the claim fences it); a primary's, or an
        unknown or running compute's, is refused.
        """
        tenant, timeline = self._timeline_request(spec)
        try:
            info = self.pageserver.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=tenant, timeline=timeline),
                                               timeout=10)
        except grpc.RpcError as e:
            raise ComputeError(f"branch {spec.branch!r}: {e.details()}") from None
        check_writable(spec.branch, info)
        w = info.writer
        if w.kind != pageserver_pb2.WRITER_KIND_COMPUTE:
            return False
        if w.name == spec.name:
            return True
        if self.exists(w.name):
            holder = self.spec(w.name)
            if holder.timeline == spec.timeline and not self.is_running(holder):
                return True
        raise ComputeError(f"branch {spec.branch!r} is written by compute {w.name!r} (epoch {w.epoch}), which is "
                           f"running or not a compute of this repository; stop it (`zctl pg stop {w.name}`) first")

    def _epoch_file(self, spec: ComputeSpec) -> Path:
        return self._dir(spec.name) / "writer_epoch"

    def _claim(self, spec: ComputeSpec, takeover: bool) -> int:
        """Make this compute its branch's writer; the new writer epoch (kept beside its spec)."""
        tenant, timeline = self._timeline_request(spec)
        try:
            info = self.pageserver.ClaimTimeline(pageserver_pb2.ClaimTimelineRequest(
                tenant=tenant, timeline=timeline, kind=pageserver_pb2.WRITER_KIND_COMPUTE, name=spec.name,
                takeover=takeover), timeout=10)
        except grpc.RpcError as e:
            raise ComputeError(f"compute {spec.name!r} cannot write branch {spec.branch!r}: {e.details()}") from None
        epoch = int(info.writer.epoch)
        write_file_atomically(self._epoch_file(spec), str(epoch).encode())
        return epoch

    def _epoch(self, spec: ComputeSpec) -> int:
        try:
            return int(self._epoch_file(spec).read_text())
        except (OSError, ValueError):
            return 0

    def _release(self, spec: ComputeSpec) -> None:
        """Give up the branch's writer claim if this incarnation still holds it (the page server
        refuses a stale epoch: a newer incarnation's claim stays)."""
        tenant, timeline = self._timeline_request(spec)
        epoch = self._epoch(spec)
        if epoch:
            try:
                self.pageserver.ReleaseTimeline(pageserver_pb2.ReleaseTimelineRequest(
                    tenant=tenant, timeline=timeline, epoch=epoch), timeout=10)
            except grpc.RpcError:
                pass  # fenced meanwhile, or the page server is away: the next start takes the claim over
        self._epoch_file(spec).unlink(missing_ok=True)

    def _attachment(self, spec: ComputeSpec) -> walreceiver_pb2.AttachmentStatus | None:
        return attachment_of(self.walreceiver, spec.timeline, spec.tenant)

    def _fetch_basebackup(self, spec: ComputeSpec, datadir: Path, *, slim: bool = False) -> int:
        """Stream the page server's base backup (LZ4 frames of a tar) into the data directory as it
        arrives (a base backup can be far larger than memory); _configure hands it to postgres.
        `slim`: without relation files (a lazy compute's)."""
        if datadir.exists() or datadir.is_symlink():
            shutil.rmtree(datadir)
        make_pg_owned_dir(datadir.parent)
        make_pg_owned_dir(datadir).chmod(0o700)
        request = pageserver_pb2.BasebackupRequest(
            tenant=common_pb2.TenantId(id=spec.tenant), timeline=common_pb2.TimelineId(id=spec.timeline),
            lsn=parse_lsn(spec.lsn) if spec.lsn else 0, compression=pageserver_pb2.BASEBACKUP_COMPRESSION_LZ4,
            omit_relations=slim)
        writer = DataDirectoryWriter(datadir, lz4=True)
        lsn = 0
        try:
            for chunk in self.pageserver.Basebackup(request, timeout=3600):
                if chunk.lsn:
                    lsn = chunk.lsn
                if chunk.data:
                    writer.feed(chunk.data)
            writer.close()
        except grpc.RpcError as e:
            raise ComputeError(f"base backup of branch {spec.branch!r} failed: {e.details()}") from None
        except (ExtractError, OSError) as e:
            raise ComputeError(f"unpacking the base backup of branch {spec.branch!r} into {datadir} failed: {e}") from None
        finally:
            writer.abort()
        datadir.chmod(0o700)
        return lsn

    def _configure(self, spec: ComputeSpec, node: PostgresNode) -> None:
        gucs: dict[str, object] = {
            "listen_addresses": spec.listen_addresses,
            "port": spec.port,
            "unix_socket_directories": "",
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "wal_keep_size": "256MB",
            "max_prepared_transactions": 10,
            "logging_collector": "off",
        }
        if spec.lsn is None:
            gucs["synchronous_standby_names"] = walreceiver_application_name(spec.timeline)
            gucs["synchronous_commit"] = "on"
        else:
            gucs["hot_standby"] = "on"
            (node.datadir / "standby.signal").touch()
        node.configure(gucs, filename="compute.conf")
        # The settings kept for the compute; postgresql.auto.conf is read last, as after ALTER SYSTEM.
        (node.datadir / "postgresql.auto.conf").write_text(format_auto_conf(spec.settings))
        self._write_hba(spec, node)
        _chown_tree(node.datadir)

    def _write_hba(self, spec: ComputeSpec, node: PostgresNode) -> None:
        """pg_hba.conf: the walreceiver's access first (zctl's), then the compute's own lines, then
        the defaults; pg_ident.conf: the compute's own lines."""
        # Replication is the walreceiver's role only, with the password of this start (SCRAM): a
        # process that connects with the walreceiver's application_name cannot acknowledge commits.
        walreceiver = [f"host replication {REPLICATION_ROLE} 127.0.0.1/32 scram-sha-256"]
        defaults = ["local all all trust", "host all all 127.0.0.1/32 trust"]
        if not spec.loopback_only:
            # A compute in a container network: its peers (walreceiver, clients) are on the same subnets.
            walreceiver.append(f"host replication {REPLICATION_ROLE} samenet scram-sha-256")
            defaults.append("host all all samenet trust")
        for path, lines in ((node.datadir / "pg_hba.conf", walreceiver + spec.hba + defaults),
                            (node.datadir / "pg_ident.conf", spec.ident)):
            path.write_text("".join(f"{line}\n" for line in lines))
            if os.geteuid() == 0:
                pw = pwd.getpwnam(PG_OS_USER)
                os.chown(path, pw.pw_uid, pw.pw_gid)

    @staticmethod
    def _replication_password(spec: ComputeSpec, node: PostgresNode) -> str:
        """A new password for the walreceiver's role, set (as a SCRAM secret: the password itself is
        never in a statement or a log) before the walreceiver is attached; the commit does not wait for
        the synchronous standby that is not there yet."""
        password = secrets.token_urlsafe(24)
        secret = make_verifier(password).text()
        try:
            node.execute(
                "SET synchronous_commit = local; "
                f"DO $zenith$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{REPLICATION_ROLE}') THEN "
                f"CREATE ROLE {REPLICATION_ROLE}; END IF; END $zenith$; "
                f"ALTER ROLE {REPLICATION_ROLE} WITH LOGIN REPLICATION PASSWORD '{secret}'")
        except psycopg.Error as e:
            node.stop(mode="immediate")
            raise ComputeError(f"compute {spec.name!r}: cannot set up the walreceiver's role: {e}") from None
        return password

    def _attach_walreceiver(self, spec: ComputeSpec, node: PostgresNode, lsn: int, epoch: int, password: str) -> None:
        tenant, timeline = self._timeline_request(spec)
        conninfo = make_conninfo("", host=spec.advertise_host, port=spec.port, user=REPLICATION_ROLE,
                                 password=password, dbname="postgres",
                                 application_name=walreceiver_application_name(spec.timeline))
        try:
            self.walreceiver.Attach(walreceiver_pb2.AttachRequest(
                tenant=tenant, timeline=timeline,
                primary_conninfo=conninfo,
                slot_name=replication_slot_name(spec.timeline), create_slot=True, start_lsn=lsn,
                writer_epoch=epoch), timeout=30)
        except grpc.RpcError as e:
            node.stop(mode="immediate")
            raise ComputeError(f"could not attach the walreceiver to compute {spec.name!r}: {e.details()}") from None
        try:
            self._wait_streaming(spec, node)
        except ComputeError:
            self._detach(spec)
            self._release(spec)
            node.stop(mode="immediate")
            raise

    def _wait_streaming(self, spec: ComputeSpec, node: PostgresNode, timeout: float = 60.0) -> None:
        """Return once the walreceiver durably holds the compute's WAL as of now, so that its commits
        complete; ComputeError with the walreceiver's error if that does not happen."""
        target = node.flush_lsn()
        tenant, timeline = self._timeline_request(spec)
        request = walreceiver_pb2.StatusRequest(tenant=tenant, timeline=timeline)
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            try:
                attachments = self.walreceiver.Status(request, timeout=10).attachments
            except grpc.RpcError as e:
                raise ComputeError(f"walreceiver: {e.details()}") from None
            if attachments:
                a = attachments[0]
                last_error = a.last_error
                if a.durable_lsn >= target:
                    return
                if a.state in (walreceiver_pb2.ATTACHMENT_STATE_FAILED, walreceiver_pb2.ATTACHMENT_STATE_FAILING):
                    break
            if time.monotonic() > deadline:
                last_error = f"its WAL did not reach the page server within {timeout:g} s" + (
                    f"; last error: {last_error}" if last_error else "")
                break
            time.sleep(0.05)
        raise ComputeError(f"compute {spec.name!r} was stopped: the walreceiver cannot store its WAL, so its "
                           f"commits would never complete: {last_error}")

    def _detach(self, spec: ComputeSpec, required: bool = False) -> bool:
        """Detach the branch's walreceiver attachment once the page server holds all the WAL it kept;
        False (ComputeError if `required`) when that cannot be done now. No attachment: True."""
        tenant, timeline = self._timeline_request(spec)
        try:
            self.walreceiver.Detach(walreceiver_pb2.DetachRequest(tenant=tenant, timeline=timeline), timeout=120)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return True
            if required:
                raise ComputeError(f"branch {spec.branch!r}: {e.details()}") from None
            return False
        return True

    def stop(self, name: str, wait_for_pageserver: float = 30.0) -> ComputeSpec:
        spec = self.spec(name)
        node = self.node(spec)
        if not self.is_running(spec):
            raise ComputeError(f"compute {name!r} is not running")
        end_lsn = node.current_lsn() if spec.lsn is None else 0
        node.stop(mode="fast")
        self.unmount(spec)
        self.warnings = self.read_back(spec)
        if spec.lsn is None:
            attachment = self._attachment(spec)
            if attachment is not None and attachment.writer_epoch != self._epoch(spec):
                return spec  # fenced: the branch's attachment is a newer writer's, not ours to end
            # Everything committed is already durable (synchronous commit); wait
            # briefly for the tail (the shutdown checkpoint) so a restart starts after it.
            deadline = time.monotonic() + wait_for_pageserver
            while time.monotonic() < deadline and self._branch_lsn(spec) < end_lsn:
                if attachment is not None and attachment.state == walreceiver_pb2.ATTACHMENT_STATE_FAILED:
                    break
                time.sleep(0.1)
                attachment = self._attachment(spec)
            if self._detach(spec):
                self._release(spec)
            else:
                # The walreceiver keeps the compute's last WAL and delivers it when it can; the
                # claim stays, so no other writer forks the branch before that.
                raise ComputeError(f"compute {name!r} stopped, but the page server does not hold all its WAL "
                                   f"yet (see `zctl status`); the walreceiver delivers it once it can")
        return spec

    def _branch_lsn(self, spec: ComputeSpec) -> int:
        tenant, timeline = self._timeline_request(spec)
        info = self.pageserver.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=tenant, timeline=timeline),
                                           timeout=10)
        return int(info.last_record_lsn)

    def destroy(self, name: str) -> None:
        spec = self.spec(name)
        if self.is_running(spec):
            raise ComputeError(f"compute {name!r} is running; stop it first")
        self.unmount(spec)
        shutil.rmtree(self._dir(name))


def _edit_lines(lines: list[str], add: list[str], remove: list[str]) -> list[str]:
    out = list(lines)
    for line in remove:
        text = check_hba_line(line)
        if text not in out:
            raise ComputeConfigError(f"no such line: {text!r}")
        out.remove(text)
    for line in add:
        text = check_hba_line(line)
        if text not in out:
            out.append(text)
    return out


def _chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(PG_OS_USER)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


__all__ = ["ComputeError", "ComputeSpec", "Computes", "attachment_of", "check_writable", "free_port"]
