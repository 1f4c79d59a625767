"""zctl: the operator's tool."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import logging
import sys
from collections.abc import Sequence

from pgformat.errors import FormatError

from . import cluster_cmds, compute_cmds, security_cmds, waldump
from .postgres import PostgresError


def _cmd_wal_dump(args: argparse.Namespace) -> int:
    n = waldump.dump(args.paths, sys.stdout, as_json=args.json)
    if not args.json:
        print(f"# {n} records", file=sys.stderr)
    return 0


def _cmd_redo_verify(args: argparse.Namespace) -> int:
    from pgredo.verify import verify_records

    report = verify_records(raw.decode() for raw in waldump.iter_file_records(args.paths))
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="redo verification against wal_consistency_checking images")
        for col in ("rmgr", "records", "blocks checked", "matched", "mismatched", "unsupported", "no base"):
            table.add_column(col, justify="left" if col == "rmgr" else "right")
        for name, t in sorted(report.per_rmgr.items()):
            table.add_row(name, str(t.records), str(t.blocks_checked), str(t.matched), str(t.mismatched),
                          str(t.unsupported), str(t.no_base))
        console = Console()
        console.print(table)
        for m in report.mismatches[:50]:
            console.print(f"[red]MISMATCH[/red] {m}")
        for name, count in sorted(report.unsupported_types.items()):
            console.print(f"[yellow]unsupported[/yellow] {name}: {count} blocks")
        console.print(f"checked {report.checked}, mismatched {report.mismatched}, unsupported {report.unsupported}")
    return 1 if report.mismatched else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.repo))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zctl", description="Operate the zenith storage layer for stock PostgreSQL.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    p.add_argument("--repo", default=os.environ.get("ZENITH_REPO", "./.zenith"), metavar="DIR",
                   help="repository directory (default: $ZENITH_REPO or ./.zenith)")
    p.add_argument("--pageserver", default=os.environ.get("ZENITH_PAGESERVER"), metavar="HOST:PORT",
                   help="a page server running elsewhere (default: $ZENITH_PAGESERVER, else the repository's own)")
    p.add_argument("--walreceiver", default=os.environ.get("ZENITH_WALRECEIVER"), metavar="HOST:PORT",
                   help="a walreceiver running elsewhere (default: $ZENITH_WALRECEIVER, else the repository's own)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="token to present to the services (default: $ZENITH_TOKEN, else the repository's admin token)")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="call the services over TLS trusting this CA (default: the repository's, when TLS is on)")
    sub = p.add_subparsers(dest="command", required=True)
    cluster_cmds.add_commands(sub)
    compute_cmds.add_commands(sub)
    security_cmds.add_commands(sub)

    wal = sub.add_parser("wal", help="inspect WAL").add_subparsers(dest="wal_command", required=True)
    d = wal.add_parser("dump", help="print the records of WAL segment files or pg_wal directories")
    d.add_argument("paths", nargs="+", metavar="PATH", help="segment files or a pg_wal directory")
    d.add_argument("--json", action="store_true", help="one JSON object per record")
    d.set_defaults(func=_cmd_wal_dump)

    redo = sub.add_parser("redo", help="our redo engine").add_subparsers(dest="redo_command", required=True)
    v = redo.add_parser("verify", help="replay WAL written with wal_consistency_checking=all and compare pages")
    v.add_argument("paths", nargs="+", metavar="PATH", help="segment files or a pg_wal directory")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.set_defaults(func=_cmd_redo_verify)

    demo = sub.add_parser("demo", help="run the embedded demo (what `make run` does)")
    demo.set_defaults(func=_cmd_demo)
    _accept_repo_anywhere(p)
    return p


def _accept_repo_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let `--repo DIR` also follow the subcommand (`zctl pg list --repo DIR`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--repo" not in sub._option_string_actions:
                    sub.add_argument("--repo", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _accept_repo_anywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (FormatError, waldump.WalFilesError, cluster_cmds.CommandError, PostgresError) as e:
        print(f"zctl: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
