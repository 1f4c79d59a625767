"""zctl commands that talk to the running services: start/stop/status, attach, lsn, getpage, gc.

The CLI only talks gRPC to the services (and libpq to the primary); it never
reaches into a service's internals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pgformat.constants import FORK_NAMES
from pgformat.lsn import format_lsn, parse_lsn
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc, walreceiver_pb2, walreceiver_pb2_grpc

from services.auth import ClientSecurity, check_primary_conninfo

from .postgres import pg_bindir
from .supervisor import LocalCluster, SupervisorError

DEFAULT_TENANT = "0" * 32
_GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class CommandError(RuntimeError):
    """An error the operator can act on; printed without a traceback."""


def _cluster(args: argparse.Namespace) -> LocalCluster:
    remote = {"pageserver": getattr(args, "pageserver", None), "walreceiver": getattr(args, "walreceiver", None)}
    return LocalCluster(Path(args.repo), remote, _given_security(args))


def _given_security(args: argparse.Namespace) -> ClientSecurity | None:
    """--token-file / $ZENITH_TOKEN and --tls-ca, for services elsewhere; None: the repository's own."""
    token_file, ca = getattr(args, "token_file", None), getattr(args, "tls_ca", None)
    token = os.environ.get("ZENITH_TOKEN") or None
    if token_file is None and ca is None and token is None:
        return None
    try:
        if token_file is not None:
            token = Path(token_file).read_text().strip()
        return ClientSecurity(token, Path(ca).read_bytes() if ca is not None else None)
    except OSError as e:
        raise CommandError(f"cannot read {e.filename}: {e.strerror}") from None


def _pageserver(cluster: LocalCluster) -> pageserver_pb2_grpc.PageServerStub:
    return pageserver_pb2_grpc.PageServerStub(cluster.channel("pageserver", _GRPC_OPTIONS))


def _walreceiver(cluster: LocalCluster) -> walreceiver_pb2_grpc.WalReceiverStub:
    return walreceiver_pb2_grpc.WalReceiverStub(cluster.channel("walreceiver"))


def _rpc_error(e: grpc.RpcError, what: str) -> CommandError:
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return CommandError(f"{what}: the service is not reachable; is it running? (`zctl start`)")
    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
        return CommandError(f"{what}: {e.details()} (zctl presents the repository's security/tokens/admin.jwt, "
                            "or --token-file / $ZENITH_TOKEN)")
    return CommandError(f"{what}: {e.details()}")


def tenant_of(args: argparse.Namespace) -> str:
    """--tenant: 32 hex digits; absent: the default tenant."""
    text = getattr(args, "tenant", None)
    if not text:
        return DEFAULT_TENANT
    t = text.strip().lower()
    if len(t) != 32 or any(c not in "0123456789abcdef" for c in t):
        raise CommandError(f"a tenant id is 32 hex digits (see `zctl tenant list`), got {text!r}")
    return t


def find_branch(stub: pageserver_pb2_grpc.PageServerStub, name: str,
                tenant: str = DEFAULT_TENANT) -> pageserver_pb2.TimelineInfo:
    try:
        tls = stub.ListTimelines(pageserver_pb2.ListTimelinesRequest(tenant=common_pb2.TenantId(id=tenant)),
                                 timeout=10).timelines
    except grpc.RpcError as e:
        raise _rpc_error(e, "listing branches") from None
    for tl in tls:
        if tl.name == name or tl.timeline.id == name:
            return tl
    known = ", ".join(sorted(t.name or t.timeline.id for t in tls)) or "none"
    raise CommandError(f"no branch named {name!r} (branches: {known})")


# -- start / stop / status ----------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    console = Console()
    with console.status("starting redo pool, page server, walreceiver and libpq shim"):
        try:
            statuses = cluster.start()
        except SupervisorError as e:
            raise CommandError(str(e)) from None
    for s in statuses:
        console.print(f"[green]started[/green] {s.name:12} {s.address}  pid {s.pid}  log {s.log}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop running computes first (they need the page server to shut down cleanly), then the services."""
    from .computes import ComputeError, Computes

    cluster = _cluster(args)
    console = Console()
    computes = Computes(cluster.repo, _pageserver(cluster), _walreceiver(cluster))
    for spec in computes.list():
        if computes.is_running(spec):
            try:
                computes.stop(spec.name, wait_for_pageserver=10)
                console.print(f"stopped compute {spec.name}")
            except (ComputeError, grpc.RpcError) as e:
                console.print(f"[yellow]compute {spec.name}: {e}[/yellow]")
        else:
            try:
                computes.unmount(spec)  # a lazy compute that was killed: its filesystem process
            except ComputeError as e:
                console.print(f"[yellow]compute {spec.name}: {e}[/yellow]")
    cluster.stop()
    console.print("stopped services")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    statuses = cluster.status()
    attachments: list[dict[str, Any]] = []
    if any(s.name == "walreceiver" and s.healthy for s in statuses):
        try:
            resp = _walreceiver(cluster).Status(walreceiver_pb2.StatusRequest(all_tenants=True), timeout=5)
            attachments = [
                {"timeline": a.timeline.id, "state": walreceiver_pb2.AttachmentState.Name(a.state),
                 "received_lsn": format_lsn(a.received_lsn), "durable_lsn": format_lsn(a.durable_lsn),
                 "lag_bytes": a.lag_bytes, "last_error": a.last_error,
                 "pageserver_lsn": format_lsn(a.pageserver_lsn),
                 "pageserver_durable_lsn": format_lsn(a.pageserver_durable_lsn),
                 "pageserver_error": a.pageserver_error}
                for a in resp.attachments
            ]
        except grpc.RpcError:
            pass
    config = cluster.load_config()
    security = {"auth": config.auth, "tls": config.tls, "summary": cluster.security_summary()}
    if args.json:
        print(json.dumps({"services": [vars(s) for s in statuses], "attachments": attachments,
                          "security": security}, indent=2))
        return 0
    table = Table(title=f"zenith services ({cluster.repo})")
    for col in ("service", "address", "pid", "state", "log"):
        table.add_column(col)
    for s in statuses:
        state = "[green]healthy[/green]" if s.healthy else ("[yellow]running[/yellow]" if s.running else "[red]stopped[/red]")
        table.add_row(s.name, s.address, str(s.pid or "-"), state, s.log)
    console = Console()
    console.print(table)
    console.print(("[red]" if not config.auth else "") + "security: " + security["summary"]
                  + ("[/red]" if not config.auth else ""), highlight=False)
    for a in attachments:
        failing = a["state"] in ("ATTACHMENT_STATE_FAILED", "ATTACHMENT_STATE_FAILING")
        state = a["state"].removeprefix("ATTACHMENT_STATE_").lower()
        line = (f"walreceiver {a['timeline']}: {'[red]' + state + '[/red]' if failing else state} received "
                f"{a['received_lsn']} durable {a['durable_lsn']} lag {a['lag_bytes']} bytes; page server at "
                f"{a['pageserver_lsn']} (durable {a['pageserver_durable_lsn']})")
        if a["last_error"]:
            line += f"; last error: {a['last_error']}"
        if a["pageserver_error"]:
            line += f"; [yellow]page server: {a['pageserver_error']}[/yellow]"
        console.print(line, highlight=False)
    return 0


# -- attach -------------------------------------------------------------------------------


def cmd_attach(args: argparse.Namespace) -> int:
    """Import a base backup of a running primary as a branch and follow its WAL."""
    import psycopg

    from .importer import import_requests, scan_backup

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    cluster = _cluster(args)
    stub = _pageserver(cluster)
    console = Console()
    try:
        params = conninfo_to_dict(args.primary)
        check_primary_conninfo(params)  # the walreceiver checks the same (and its host allow-list)
    except (psycopg.Error, ValueError) as e:
        raise CommandError(f"--primary: {e}") from None
    # The password goes to pg_basebackup in its environment, never on a command line.
    password = params.pop("password", None)
    conninfo = make_conninfo("", **params)
    timeline = uuid.uuid4().hex
    slot = f"zenith_{timeline[:12]}"
    try:
        with psycopg.connect(args.primary, autocommit=True) as conn:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
    except psycopg.Error as e:
        raise CommandError(f"cannot create replication slot on the primary: {e}") from None

    def drop_slot() -> None:
        try:
            with psycopg.connect(args.primary, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        except psycopg.Error as e:
            console.print(f"[yellow]could not drop replication slot {slot} on the primary ({e}); it retains WAL "
                          f"until dropped: SELECT pg_drop_replication_slot('{slot}')[/yellow]")

    created = False
    workdir = Path(tempfile.mkdtemp(prefix="attach-", dir=cluster.repo))
    try:
        backup = workdir / "backup"
        with console.status("pg_basebackup from the primary"):
            env = {**os.environ, **({"PGPASSWORD": password} if password else {})}
            proc = subprocess.run(
                [str(pg_bindir() / "pg_basebackup"), "-d", conninfo, "-D", str(backup), "-Fp", "-X", "none",
                 "-c", "fast", "--no-sync"], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise CommandError(f"pg_basebackup failed: {proc.stderr.strip()}")
        summary = scan_backup(backup)
        total = sum(f.stat().st_size for f in backup.rglob("*") if f.is_file()) // 8192
        tenant, tl_id = common_pb2.TenantId(id=tenant_of(args)), common_pb2.TimelineId(id=timeline)
        try:
            stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(tenant=tenant, new_timeline=tl_id,
                                                                     name=args.branch), timeout=10)
            created = True
            with Progress(TextColumn("importing"), BarColumn(), TextColumn("{task.completed}/{task.total} pages"),
                          TimeElapsedColumn(), console=console) as progress:
                task = progress.add_task("import", total=total)
                stub.Import(import_requests(backup, tenant_of(args), timeline, summary,
                                            progress=lambda n: progress.advance(task, n)), timeout=3600)
            # The primary is the branch's only writer: no compute may write it while it follows.
            info = stub.GetTimeline(pageserver_pb2.GetTimelineRequest(tenant=tenant, timeline=tl_id), timeout=10)
            info = stub.ClaimTimeline(pageserver_pb2.ClaimTimelineRequest(
                tenant=tenant, timeline=tl_id, kind=pageserver_pb2.WRITER_KIND_PRIMARY,
                name=f"{redacted_conninfo(args.primary)} (system {info.system_identifier})"), timeout=10)
        except grpc.RpcError as e:
            raise _rpc_error(e, "import") from None
    except CommandError as e:
        drop_slot()
        raise _leftover(e, created, args.branch, timeline) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        _walreceiver(cluster).Attach(walreceiver_pb2.AttachRequest(
            tenant=tenant, timeline=tl_id, primary_conninfo=args.primary, slot_name=slot,
            start_lsn=summary.start_lsn, writer_epoch=info.writer.epoch), timeout=30)
    except grpc.RpcError as e:
        drop_slot()
        raise _leftover(_rpc_error(e, "attaching the walreceiver"), created, args.branch, timeline) from None
    console.print(f"branch [bold]{args.branch}[/bold] (timeline {timeline}) imported at "
                  f"{format_lsn(summary.start_lsn)}: {summary.pages} pages; following the primary through slot {slot}")
    return 0


def _leftover(error: CommandError, created: bool, branch: str, timeline: str) -> CommandError:
    """A failed attach: the slot is dropped; the page server has no way to delete a timeline yet, so a
    branch made before the failure stays and is named."""
    if not created:
        return error
    return CommandError(f"{error}; the replication slot was dropped, branch {branch!r} (timeline {timeline}) "
                        "remains on the page server")


def redacted_conninfo(conninfo: str) -> str:
    """A connection string without its password, as it may be shown and stored."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(conninfo)
    params.pop("password", None)
    return make_conninfo("", **params)


def cmd_detach(args: argparse.Namespace) -> int:
    """Stop following an external primary: the branch becomes writable (its WAL forks from here on)."""
    cluster = _cluster(args)
    stub = _pageserver(cluster)
    branch = find_branch(stub, args.branch, tenant_of(args))
    if branch.writer.kind != pageserver_pb2.WRITER_KIND_PRIMARY:
        raise CommandError(f"branch {args.branch!r} does not follow an external primary"
                           + (f" (it is written by compute {branch.writer.name}: `zctl pg stop` it)"
                              if branch.writer.kind == pageserver_pb2.WRITER_KIND_COMPUTE else ""))
    tenant = common_pb2.TenantId(id=tenant_of(args))
    try:
        _walreceiver(cluster).Detach(walreceiver_pb2.DetachRequest(
            tenant=tenant, timeline=branch.timeline, drop_slot=args.drop_slot), timeout=60)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise _rpc_error(e, "detaching the walreceiver") from None
    try:
        info = stub.ReleaseTimeline(pageserver_pb2.ReleaseTimelineRequest(
            tenant=tenant, timeline=branch.timeline, epoch=branch.writer.epoch), timeout=10)
    except grpc.RpcError as e:
        raise _rpc_error(e, f"releasing branch {args.branch!r}") from None
    print(f"branch {args.branch} no longer follows {branch.writer.name}; it ends at "
          f"{format_lsn(info.last_record_lsn)}. A writable compute on it now forks it from there "
          f"(`zctl pg create NAME --branch {args.branch}`).")
    return 0


# -- lsn / getpage ----------------------------------------------------------------------------


def cmd_lsn(args: argparse.Namespace) -> int:
    print(format_lsn(find_branch(_pageserver(_cluster(args)), args.branch, tenant_of(args)).last_record_lsn))
    return 0


def parse_rel_arg(text: str, fork: str) -> common_pb2.RelTag:
    parts = text.split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CommandError(f"--rel must be SPC/DB/RELFILENODE (three numbers), got {text!r}")
    return common_pb2.RelTag(spc_oid=int(parts[0]), db_oid=int(parts[1]), rel_number=int(parts[2]),
                             fork=FORK_NAMES.index(fork))


def cmd_getpage(args: argparse.Namespace) -> int:
    stub = _pageserver(_cluster(args))
    tl = find_branch(stub, args.branch, tenant_of(args))
    lsn = common_pb2.RequestLsn(latest=True) if args.lsn is None else common_pb2.RequestLsn(lsn=parse_lsn(args.lsn))
    try:
        resp = stub.GetPage(pageserver_pb2.GetPageRequest(
            tenant=common_pb2.TenantId(id=tenant_of(args)), timeline=tl.timeline,
            key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=parse_rel_arg(args.rel, args.fork), blkno=args.blk)),
            lsn=lsn), timeout=60)
    except grpc.RpcError as e:
        raise _rpc_error(e, "GetPage") from None
    Path(args.output).write_bytes(resp.page)
    print(f"wrote {len(resp.page)} bytes (page LSN {format_lsn(resp.page_lsn)}, read at {format_lsn(resp.read_lsn)}) "
          f"to {args.output}")
    return 0


# -- gc ---------------------------------------------------------------------------------------

# Neon's default gc_horizon: keep the last 64 MiB of WAL history readable.
DEFAULT_KEEP_BYTES = 64 << 20


def parse_size(text: str) -> int:
    """--keep-bytes: a byte count, optionally with a K/M/G suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in "KMG":
        scale = 1 << {"K": 10, "M": 20, "G": 30}[t[-1]]
        t = t[:-1]
    if not t.isdigit():
        raise CommandError(f"--keep-bytes must be a byte count like 1048576 or 64M, got {text!r}")
    return int(t) * scale


def cmd_gc(args: argparse.Namespace) -> int:
    stub = _pageserver(_cluster(args))
    tl = find_branch(stub, args.branch, tenant_of(args))
    req = pageserver_pb2.GcRequest(tenant=common_pb2.TenantId(id=tenant_of(args)), timeline=tl.timeline)
    if args.horizon is not None:
        try:
            req.horizon_lsn = parse_lsn(args.horizon)
        except ValueError as e:
            raise CommandError(f"--horizon: {e}") from None
    else:
        req.keep_bytes = parse_size(args.keep_bytes) if args.keep_bytes is not None else DEFAULT_KEEP_BYTES
    try:
        r = stub.Gc(req, timeout=3600)
    except grpc.RpcError as e:
        raise _rpc_error(e, f"gc of branch {args.branch!r}") from None
    if args.json:
        print(json.dumps({
            "branch": args.branch, "timeline_id": tl.timeline.id,
            "previous_gc_cutoff_lsn": format_lsn(r.previous_gc_cutoff_lsn),
            "gc_cutoff_lsn": format_lsn(r.gc_cutoff_lsn),
            "retained_branch_lsns": [format_lsn(x) for x in r.retained_branch_lsns],
            "image_layers_written": r.image_layers_written, "layers_removed": r.layers_removed,
            "bytes_removed": r.bytes_removed, "seconds": round(r.elapsed_seconds, 3)}, indent=2))
        return 0
    moved = (f"moved from {format_lsn(r.previous_gc_cutoff_lsn)} to {format_lsn(r.gc_cutoff_lsn)}"
             if r.gc_cutoff_lsn != r.previous_gc_cutoff_lsn else f"stays at {format_lsn(r.gc_cutoff_lsn)}")
    print(f"gc of branch {args.branch}: cutoff {moved} (last record {format_lsn(tl.last_record_lsn)})")
    print(f"  {r.layers_removed} layer files ({r.bytes_removed / (1 << 20):.1f} MiB) removed, "
          f"{r.image_layers_written} image layers written in {r.elapsed_seconds:.2f}s")
    if r.retained_branch_lsns:
        print("  kept for child branches at " + ", ".join(format_lsn(x) for x in r.retained_branch_lsns))
    print(f"  reads and branches below {format_lsn(r.gc_cutoff_lsn)} are refused from now on")
    return 0


def add_tenant_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", default=None, metavar="ID", help="the tenant (default: the default tenant, 0...0)")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("start", help="start the redo pool, page server and walreceiver as local processes")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("stop", help="stop the local services")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("status", help="show the local services")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("attach", help="import a running primary and follow its WAL")
    add_tenant_argument(p)
    p.add_argument("--primary", required=True, metavar="CONNSTR", help="libpq connection string of the primary")
    p.add_argument("--branch", default="main", help="name of the branch to create (default: main)")
    p.set_defaults(func=cmd_attach)
    p = sub.add_parser("detach", help="stop following an external primary; the branch becomes writable")
    add_tenant_argument(p)
    p.add_argument("--branch", required=True, help="the branch that follows the primary")
    p.add_argument("--drop-slot", action="store_true",
                   help="also drop the replication slot on the primary (it stops retaining WAL)")
    p.set_defaults(func=cmd_detach)
    p = sub.add_parser("lsn", help="last ingested record's end LSN of a branch")
    add_tenant_argument(p)
    p.add_argument("--branch", default="main")
    p.set_defaults(func=cmd_lsn)
    p = sub.add_parser("getpage", help="write one 8192-byte page to a file")
    add_tenant_argument(p)
    p.add_argument("--branch", default="main")
    p.add_argument("--rel", required=True, metavar="SPC/DB/RELFILENODE")
    p.add_argument("--fork", default="main", choices=FORK_NAMES)
    p.add_argument("--blk", required=True, type=int)
    p.add_argument("--lsn", default=None, metavar="X/X", help="read as of this LSN (default: latest)")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.set_defaults(func=cmd_getpage)
    p = sub.add_parser("gc", help="garbage-collect a branch's history below a horizon")
    add_tenant_argument(p)
    p.add_argument("--branch", default="main")
    horizon = p.add_mutually_exclusive_group()
    horizon.add_argument("--horizon", default=None, metavar="X/X",
                         help="keep every LSN from this one on (capped at the last record)")
    horizon.add_argument("--keep-bytes", default=None, metavar="N",
                         help="keep the last N bytes of WAL history (K/M/G suffixes; default 64M)")
    p.add_argument("--json", action="store_true", help="print what was done as one JSON object")
    p.set_defaults(func=cmd_gc)
