"""zctl branch ... and zctl pg ...: branches of the page server's timelines, and computes on them."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from pgformat.autoconf import quote_value
from pgformat.lsn import LsnFormatError, format_lsn, parse_lsn
from services.runtime import ShutdownSignal
from zproto import common_pb2, pageserver_pb2

from .cluster_cmds import (DEFAULT_TENANT, CommandError, _cluster, _pageserver, _rpc_error, _walreceiver,
                           add_tenant_argument, find_branch, tenant_of)
from .compute_config import ComputeConfigError, parse_assignment
from .computes import ComputeError, Computes, attachment_of, check_writable
from .importer import import_requests, scan_stopped_datadir
from .postgres import PG_OS_USER, PostgresNode, make_pg_owned_dir, unreachable_ancestor
from .supervisor import SupervisorError

# TimestampTz counts microseconds from 2000-01-01 00:00:00 UTC.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def parse_branch_point(text: str) -> tuple[str, int]:
    """--at: 'X/X' -> ("lsn", lsn); a timestamp with a zone -> ("timestamp", TimestampTz)."""
    try:
        return "lsn", parse_lsn(text)
    except LsnFormatError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(f"--at must be an LSN like 0/16B3748 or a timestamp like '2026-11-26 17:00:00+00', got {text!r}") from None
    if moment.tzinfo is None:
        raise CommandError(f"timestamp {text!r} needs a time zone, e.g. '{text}+00'")
    delta = moment - _PG_EPOCH
    return "timestamp", (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _acknowledged_lsn(cluster: Any, timeline: str, tenant: str = DEFAULT_TENANT) -> int:
    """Where the WAL a walreceiver acknowledged to the branch's writer ends (0 if not attached): the
    page server may still be catching up with it, and 'latest' must include every commit."""
    found = attachment_of(_walreceiver(cluster), timeline, tenant)
    return found.durable_lsn if found is not None else 0


def _wait_ingested(stub: Any, timeline: str, lsn: int, timeout: float = 60.0, tenant: str = DEFAULT_TENANT) -> None:
    request = pageserver_pb2.GetTimelineRequest(tenant=common_pb2.TenantId(id=tenant),
                                                timeline=common_pb2.TimelineId(id=timeline))
    deadline = time.monotonic() + timeout
    while (last := stub.GetTimeline(request, timeout=10).last_record_lsn) < lsn:
        if time.monotonic() > deadline:
            raise CommandError(f"the page server has WAL up to {format_lsn(last)} only, not yet up to "
                               f"{format_lsn(lsn)}; see `zctl status`")
        time.sleep(0.05)


def cmd_branch_create(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    stub = _pageserver(cluster)
    parent = find_branch(stub, args.parent, tenant_of(args))
    tenant = common_pb2.TenantId(id=tenant_of(args))
    acknowledged = _acknowledged_lsn(cluster, parent.timeline.id, tenant_of(args))
    lsn = acknowledged  # latest: every commit acknowledged so far (the page server waits for it)
    kind = ""
    if args.at:
        kind, value = parse_branch_point(args.at)
        if kind == "lsn":
            lsn = value
            known = max(acknowledged, parent.last_record_lsn)
            if lsn > known:  # nobody has that WAL yet: say so now rather than after the page server's wait
                raise CommandError(f"branch point {format_lsn(lsn)} is beyond the last record of "
                                   f"{args.parent} ({format_lsn(known)})")
        else:
            _wait_ingested(stub, parent.timeline.id, acknowledged, tenant=tenant_of(args))
            try:
                lsn = stub.FindLsnByTimestamp(pageserver_pb2.FindLsnByTimestampRequest(
                    tenant=tenant, timeline=parent.timeline, timestamp_us=value), timeout=30).lsn
            except grpc.RpcError as e:
                raise _rpc_error(e, f"finding the LSN of {args.at}") from None
    try:
        info = stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
            tenant=tenant, new_timeline=common_pb2.TimelineId(id=uuid.uuid4().hex),
            ancestor_timeline=parent.timeline, ancestor_lsn=lsn, name=args.name), timeout=90)  # the page server may wait for the LSN
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.OUT_OF_RANGE:
            raise CommandError(f"creating branch {args.name!r}: {e.details()}; `zctl branch list` shows each "
                               f"branch's gc_cutoff_lsn") from None
        raise _rpc_error(e, f"creating branch {args.name!r}") from None
    print(f"branch {args.name} created from {args.parent} at {format_lsn(info.ancestor_lsn)} (timeline {info.timeline.id})")
    if args.at and kind == "lsn" and info.ancestor_lsn != lsn:
        print(f"note: {format_lsn(lsn)} is not the end of a WAL record; the branch starts at "
              f"{format_lsn(info.ancestor_lsn)}, the end of the last record before it")
    return 0


def _branch_rows(stub: Any, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
    try:
        tls = stub.ListTimelines(pageserver_pb2.ListTimelinesRequest(tenant=common_pb2.TenantId(id=tenant)),
                                 timeout=10).timelines
    except grpc.RpcError as e:
        raise _rpc_error(e, "listing branches") from None
    names = {t.timeline.id: (t.name or t.timeline.id) for t in tls}
    return [
        {"name": names[t.timeline.id], "timeline_id": t.timeline.id,
         "parent": names.get(t.ancestor_timeline.id) if t.ancestor_timeline.id else None,
         "branch_lsn": format_lsn(t.ancestor_lsn) if t.ancestor_timeline.id else None,
         "start_lsn": format_lsn(t.start_lsn), "last_lsn": format_lsn(t.last_record_lsn),
         "gc_cutoff_lsn": format_lsn(t.gc_cutoff_lsn), "writer": _writer_text(t.writer)}
        for t in tls
    ]


def _writer_text(w: Any) -> str | None:
    if w.kind == pageserver_pb2.WRITER_KIND_PRIMARY:
        return f"follows primary {w.name}"
    if w.kind == pageserver_pb2.WRITER_KIND_COMPUTE:
        return f"written by compute {w.name}"
    return None


def cmd_branch_list(args: argparse.Namespace) -> int:
    rows = _branch_rows(_pageserver(_cluster(args)), tenant_of(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    children: dict[str | None, list[dict[str, Any]]] = {}
    for r in rows:
        children.setdefault(r["parent"], []).append(r)
    tree = Tree("[bold]branches[/bold]")

    def add(node: Tree, parent: str | None) -> None:
        for r in sorted(children.get(parent, []), key=lambda r: r["branch_lsn"] or ""):
            at = f" @ {r['branch_lsn']}" if r["branch_lsn"] else ""
            gc = f"  gc cutoff {r['gc_cutoff_lsn']}" if r["gc_cutoff_lsn"] != format_lsn(0) else ""
            writer = f"  ({r['writer']})" if r["writer"] else ""
            sub = node.add(f"[bold]{r['name']}[/bold]{at}  last {r['last_lsn']}{gc}{writer}  "
                           f"[dim]{r['timeline_id']}[/dim]")
            add(sub, r["name"])

    add(tree, None)
    Console().print(tree)
    return 0


# -- computes ------------------------------------------------------------------------------


def _computes(args: argparse.Namespace) -> Computes:
    cluster = _cluster(args)
    return Computes(cluster.repo, _pageserver(cluster), _walreceiver(cluster),
                    pageserver_address=cluster.load_config().address("pageserver"),
                    pageserver_security=cluster.client_security())


def cmd_pg_create(args: argparse.Namespace) -> int:
    computes = _computes(args)
    branch = find_branch(computes.pageserver, args.branch, tenant_of(args))
    lsn = parse_lsn(args.lsn) if args.lsn else None
    try:
        if lsn is None:
            check_writable(args.branch, branch)
        settings = dict(parse_assignment(c) for c in args.setting or [])
        spec = computes.create(args.name, args.branch, branch.timeline.id, lsn, args.port, settings=settings,
                               tenant=tenant_of(args), lazy=args.lazy)
    except (ComputeError, ComputeConfigError) as e:
        raise CommandError(str(e)) from None
    mode = f"read-only at {spec.lsn}" if spec.lsn else "writable"
    if spec.lazy:
        mode += ", lazy"
    print(f"compute {spec.name} created on branch {spec.branch} ({mode}), port {spec.port}")
    return 0


def cmd_pg_start(args: argparse.Namespace) -> int:
    computes = _computes(args)
    try:
        with Console().status(f"fetching a base backup and starting compute {args.name}"):
            spec, lsn = computes.start(args.name)
    except ComputeError as e:
        raise CommandError(str(e)) from None
    _print_warnings(computes.warnings)
    print(f"compute {spec.name} running on branch {spec.branch} from {format_lsn(lsn)}; connect with:")
    print(f"  psql -h 127.0.0.1 -p {spec.port} -U postgres postgres")
    return 0


def cmd_pg_stop(args: argparse.Namespace) -> int:
    computes = _computes(args)
    try:
        spec = computes.stop(args.name)
    except ComputeError as e:
        raise CommandError(str(e)) from None
    _print_warnings(computes.warnings)
    print(f"compute {spec.name} stopped")
    return 0


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def cmd_pg_config(args: argparse.Namespace) -> int:
    """Show or change the settings and pg_hba / pg_ident lines a compute keeps across restarts."""
    computes = _computes(args)
    try:
        set_ = dict(parse_assignment(a) for a in args.set or [])
        changing = set_ or args.reset or args.hba_add or args.hba_remove or args.ident_add or args.ident_remove
        if changing:
            spec, warnings = computes.configure_settings(
                args.name, set_, args.reset or [], (args.hba_add or [], args.hba_remove or []),
                (args.ident_add or [], args.ident_remove or []))
            _print_warnings(warnings)
        else:
            spec = computes.spec(args.name)
    except (ComputeError, ComputeConfigError) as e:
        raise CommandError(str(e)) from None
    if args.json:
        print(json.dumps({"settings": spec.settings, "hba": spec.hba, "ident": spec.ident}, indent=2))
        return 0
    for name, value in spec.settings.items():
        print(f"{name} = {quote_value(value)}")
    for line in spec.hba:
        print(f"pg_hba: {line}")
    for line in spec.ident:
        print(f"pg_ident: {line}")
    if changing and not computes.is_running(spec):
        print(f"(compute {spec.name} is stopped: this applies from its next start)")
    return 0


def cmd_pg_list(args: argparse.Namespace) -> int:
    computes = _computes(args)
    rows = [{"name": c.name, "branch": c.branch, "timeline_id": c.timeline, "port": c.port,
             "status": "running" if computes.is_running(c) else "stopped", "lsn": c.lsn, "settings": c.settings,
             "lazy": c.lazy}
            for c in computes.list()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="computes")
    for col in ("name", "branch", "port", "status", "lsn", "data", "settings"):
        table.add_column(col)
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        table.add_row(r["name"], r["branch"], str(r["port"]), r["status"], r["lsn"] or "(writable)",
                      "lazy" if r["lazy"] else "full copy", settings)
    Console().print(table)
    return 0


def import_new_cluster(stub: Any, workdir: Path, branch: str, console: Console,
                       tenant: str = DEFAULT_TENANT) -> tuple[str, Any]:
    """initdb a fresh cluster in `workdir`, import it into the page server as a new root branch."""
    seed = PostgresNode(datadir=make_pg_owned_dir(workdir) / "seed", port=0)
    try:
        with console.status("initdb"):
            seed.initdb()
        summary = scan_stopped_datadir(seed.datadir)
        timeline = uuid.uuid4().hex
        try:
            stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
                tenant=common_pb2.TenantId(id=tenant), new_timeline=common_pb2.TimelineId(id=timeline),
                name=branch), timeout=10)
            with console.status(f"importing the new cluster as branch {branch}"):
                stub.Import(import_requests(seed.datadir, tenant, timeline, summary), timeout=600)
        except grpc.RpcError as e:
            raise _rpc_error(e, "importing the new cluster") from None
    finally:
        shutil.rmtree(seed.datadir.parent, ignore_errors=True)
    return timeline, summary


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """Give a page server running elsewhere its first branch, once: what `zctl init` does, minus the services."""
    cluster = _cluster(args)
    stub = _pageserver(cluster)
    console = Console()
    _wait_for(cluster, ["pageserver"], args.wait)
    try:
        existing = find_branch(stub, args.branch, tenant_of(args))
        console.print(f"branch {args.branch} exists ({existing.timeline.id}); nothing to do")
        return 0
    except CommandError:
        pass
    blocked = unreachable_ancestor(cluster.repo.resolve() / "tmp")
    if blocked is not None:
        raise CommandError(f"Postgres runs as the '{PG_OS_USER}' OS user, which cannot enter {blocked}")
    timeline, summary = import_new_cluster(stub, cluster.repo / "tmp", args.branch, console, tenant_of(args))
    console.print(f"branch [bold]{args.branch}[/bold] ({timeline}) created at {format_lsn(summary.start_lsn)}")
    return 0


def _wait_for(cluster: Any, services: list[str], timeout: float) -> None:
    """Wait until the named gRPC services answer health checks (containers start in any order)."""
    from .supervisor import HEALTH_NAMES, health_check

    config = cluster.load_config()
    ca = cluster.client_security().tls_ca
    deadline = time.monotonic() + timeout
    for name in services:
        while not health_check(config.address(name), HEALTH_NAMES[name], ca=ca):
            if time.monotonic() > deadline:
                raise CommandError(f"{name} at {config.address(name)} is not serving after {timeout:g}s")
            time.sleep(0.5)


def cmd_pg_run(args: argparse.Namespace) -> int:
    """A compute in the foreground (a container's main process): start, then supervise until SIGTERM."""
    cluster = _cluster(args)
    _wait_for(cluster, ["pageserver"] if args.lsn else ["pageserver", "walreceiver"], args.wait)
    computes = Computes(cluster.repo, _pageserver(cluster), _walreceiver(cluster),
                        pageserver_address=cluster.load_config().address("pageserver"),
                        pageserver_security=cluster.client_security())
    branch = find_branch(computes.pageserver, args.branch, tenant_of(args))
    try:
        if computes.exists(args.name):
            computes.destroy(args.name)  # a container restart starts over from the page server
        computes.create(args.name, args.branch, branch.timeline.id, parse_lsn(args.lsn) if args.lsn else None,
                        args.port, listen_addresses=args.listen_addresses, advertise_host=args.advertise_host,
                        tenant=tenant_of(args), lazy=args.lazy)
        spec, lsn = computes.start(args.name)
    except ComputeError as e:
        raise CommandError(str(e)) from None
    print(f"compute {spec.name} running on branch {spec.branch} from {format_lsn(lsn)}, port {spec.port}", flush=True)
    shutdown = ShutdownSignal()
    while not shutdown.wait_for(1.0):
        if not computes.is_running(spec):
            raise CommandError(f"postgres of compute {spec.name} exited; see {computes.node(spec).logfile}")
    computes.stop(spec.name)
    print(f"compute {spec.name} stopped ({shutdown.name})", flush=True)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 if the gRPC service at ADDRESS reports SERVING (for container health checks)."""
    from .supervisor import health_check

    ca = _cluster(args).client_security().tls_ca  # --tls-ca, else the repository's CA when TLS is on
    if health_check(args.address, args.service, timeout=args.timeout, ca=ca):
        return 0
    print(f"zctl: {args.address} ({args.service or 'server'}) is not serving", file=sys.stderr)
    return 1


def cmd_init(args: argparse.Namespace) -> int:
    """New repository: initdb, import it as branch main, start the services and compute main."""
    cluster = _cluster(args)
    if (cluster.repo / "pageserver").exists():
        raise CommandError(f"{cluster.repo} already holds a repository; use another --repo or `zctl start`")
    console = Console()
    blocked = unreachable_ancestor(cluster.repo.resolve() / "computes")
    if blocked is not None:
        raise CommandError(f"Postgres runs as the '{PG_OS_USER}' OS user, which cannot enter {blocked}; "
                           f"choose a --repo it can reach (e.g. under /tmp or /srv) or `chmod o+x {blocked}`")
    config = cluster.load_config()
    config.auth = config.tls = not args.insecure
    if args.insecure:
        console.print("[red]--insecure: the services accept calls without a token and without TLS "
                      "(development only)[/red]")
    if args.base_port:
        config.ports = {"redo": args.base_port, "pageserver": args.base_port + 1, "walreceiver": args.base_port + 2,
                        "shim": args.base_port + 3}
    cluster.save_config(config)
    with console.status("starting the redo pool, page server, walreceiver and libpq shim"):
        try:
            cluster.start()
        except SupervisorError as e:
            raise CommandError(str(e)) from None
    stub = _pageserver(cluster)
    timeline, summary = import_new_cluster(stub, cluster.repo / "tmp", "main", console)
    console.print(f"branch [bold]main[/bold] created at {format_lsn(summary.start_lsn)} ({summary.pages} pages)")
    computes = Computes(cluster.repo, stub, _walreceiver(cluster))
    try:
        computes.create("main", "main", timeline, None, args.pg_port)
        with console.status("starting compute main"):
            spec, lsn = computes.start("main")
    except ComputeError as e:
        raise CommandError(str(e)) from None
    console.print(f"compute [bold]main[/bold] running; connect with: psql -h 127.0.0.1 -p {spec.port} -U postgres postgres")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("init", help="create a repository: initdb, branch main, services and compute main")
    p.add_argument("--base-port", type=int, default=None, help="ports for redo, page server, walreceiver, libpq shim (N .. N+3)")
    p.add_argument("--pg-port", type=int, default=None, help="port of compute main")
    p.add_argument("--insecure", action="store_true",
                   help="no tokens, no TLS (development only; `zctl status` says so)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("bootstrap", help="create the first branch on a page server running elsewhere "
                                         "(initdb + import; does nothing if the branch exists)")
    p.add_argument("--branch", default="main")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the page server to serve")
    add_tenant_argument(p)
    p.set_defaults(func=cmd_bootstrap)
    p = sub.add_parser("health", help="exit 0 if a gRPC service reports SERVING (container health checks)")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--service", default="", help="health service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=cmd_health)

    branch = sub.add_parser("branch", help="branches: copy-on-write copies as of any LSN").add_subparsers(
        dest="branch_command", required=True)
    p = branch.add_parser("create", help="create a branch of a parent at an LSN or a moment (O(1))")
    add_tenant_argument(p)
    p.add_argument("name")
    p.add_argument("--parent", default="main")
    p.add_argument("--at", default=None, metavar="LSN|TIMESTAMP",
                   help="X/X, or 'YYYY-MM-DD HH:MM:SS+TZ' (default: the parent's last LSN)")
    p.set_defaults(func=cmd_branch_create)
    p = branch.add_parser("list", help="the branch tree")
    add_tenant_argument(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_branch_list)

    pg = sub.add_parser("pg", help="computes: stock Postgres on a branch").add_subparsers(dest="pg_command", required=True)
    p = pg.add_parser("create", help="define a compute on a branch")
    add_tenant_argument(p)
    p.add_argument("name")
    p.add_argument("--branch", default="main")
    p.add_argument("--lsn", default=None, metavar="X/X", help="read-only at this LSN")
    p.add_argument("--lazy", action="store_true",
                   help="relation files served on demand from the page server (a FUSE mount) instead of a "
                        "full copy: starts in O(1) at any database size")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("-c", dest="setting", action="append", metavar="NAME=VALUE",
                   help="a Postgres setting the compute keeps (as ALTER SYSTEM would); repeatable")
    p.set_defaults(func=cmd_pg_create)
    p = pg.add_parser("start", help="fetch a base backup from the page server and start Postgres")
    p.add_argument("name")
    p.set_defaults(func=cmd_pg_start)
    p = pg.add_parser("stop", help="stop a compute (its data stays in the page server)")
    p.add_argument("name")
    p.set_defaults(func=cmd_pg_stop)
    p = pg.add_parser("run", help="create (or re-create) and run a compute in the foreground until SIGTERM "
                                  "(for containers)")
    add_tenant_argument(p)
    p.add_argument("name")
    p.add_argument("--branch", default="main")
    p.add_argument("--lsn", default=None, metavar="X/X", help="read-only at this LSN")
    p.add_argument("--port", type=int, default=5432)
    p.add_argument("--lazy", action="store_true", help="relation files served on demand (needs /dev/fuse)")
    p.add_argument("--listen-addresses", default="*", help="Postgres listen_addresses (default: all)")
    p.add_argument("--advertise-host", default=socket.gethostname(),
                   help="host name the walreceiver connects to (default: this host's name)")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the services to serve")
    p.set_defaults(func=cmd_pg_run)
    p = pg.add_parser("config", help="show or change the settings and pg_hba/pg_ident lines a compute keeps "
                                     "across restarts (ALTER SYSTEM inside it is kept too)")
    p.add_argument("name")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="set a setting (repeatable)")
    p.add_argument("--reset", action="append", metavar="NAME", help="remove a setting (repeatable)")
    p.add_argument("--hba-add", action="append", metavar="LINE", help="add a pg_hba.conf line (before the defaults)")
    p.add_argument("--hba-remove", action="append", metavar="LINE", help="remove a pg_hba.conf line added before")
    p.add_argument("--ident-add", action="append", metavar="LINE", help="add a pg_ident.conf line")
    p.add_argument("--ident-remove", action="append", metavar="LINE", help="remove a pg_ident.conf line")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pg_config)
    p = pg.add_parser("list", help="list computes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pg_list)


