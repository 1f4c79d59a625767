"""`make run` / `zctl demo`: the embedded default, end to end.

All three services run as local processes; a stock Postgres 15 compute runs
on branch `main` with its data in the page server; the demo writes rows,
branches `main` as it was before the last write, starts a compute on the
branch, and shows both. Run it again and it reuses the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
from rich.console import Console

from .cluster_cmds import CommandError
from .supervisor import LocalCluster


def _zctl(repo: Path, *args: str) -> int:
    from .main import main

    rc = main(["--repo", str(repo), *args])
    if rc != 0:
        raise CommandError(f"zctl {' '.join(args)} failed")
    return rc


def _computes(repo: Path) -> dict[str, dict[str, object]]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _zctl(repo, "pg", "list", "--json")
    return {c["name"]: c for c in json.loads(buf.getvalue())}


def run_demo(repo: Path) -> int:
    console = Console()
    if not (repo / "pageserver").exists():
        console.rule("zctl init: repository, services, branch main, compute main")
        _zctl(repo, "init")
    else:
        console.rule(f"reusing {repo}")
        _zctl(repo, "start")
        if _computes(repo)["main"]["status"] != "running":
            _zctl(repo, "pg", "start", "main")

    main_port = _computes(repo)["main"]["port"]
    with psycopg.connect(f"host=127.0.0.1 port={main_port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS demo (id serial PRIMARY KEY, note text, at timestamptz DEFAULT now())")
        conn.execute("INSERT INTO demo (note) SELECT 'row ' || g FROM generate_series(1, 1000) g")
        before = conn.execute("SELECT pg_current_wal_lsn()::text, count(*) FROM demo").fetchone()
        assert before is not None
        conn.execute("INSERT INTO demo (note) SELECT 'later row ' || g FROM generate_series(1, 500) g")
        main_count = conn.execute("SELECT count(*) FROM demo").fetchone()
    console.print(f"compute main: {main_count[0] if main_count else '?'} rows in demo; "
                  f"{before[1]} of them were there at {before[0]}")

    branch = f"demo_{before[0].replace('/', '_').lower()}"
    console.rule(f"branch {branch} at {before[0]} (copy-on-write, nothing copied)")
    _zctl(repo, "branch", "create", branch, "--parent", "main", "--at", before[0])
    _zctl(repo, "pg", "create", branch, "--branch", branch)
    _zctl(repo, "pg", "start", branch)
    branch_port = _computes(repo)[branch]["port"]
    with psycopg.connect(f"host=127.0.0.1 port={branch_port} user=postgres dbname=postgres", autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM demo").fetchone()
    console.print(f"compute {branch}: {row[0] if row else '?'} rows in demo (as of {before[0]})")

    console.rule("branches")
    _zctl(repo, "branch", "list")
    console.rule("connect")
    for name, c in _computes(repo).items():
        if c["status"] == "running":
            console.print(f"  {name:24} psql -h 127.0.0.1 -p {c['port']} -U postgres postgres")
    cluster = LocalCluster(repo)
    shim_port = cluster.load_config().ports["shim"]
    # The shim's user postgres authenticates with SCRAM (password in security/shim_password), over TLS.
    login = (f'PGPASSWORD="$(cat {cluster.security.shim_password})" ' if cluster.load_config().auth else "")
    console.print(f"  {'libpq shim':24} {login}psql -h 127.0.0.1 -p {shim_port} -U postgres -c status")
    console.print(f"  {'':24} {login}pg_basebackup -h 127.0.0.1 -p {shim_port} -U postgres -D DIR", highlight=False)
    console.print(f"\nStop computes and services with: .venv/bin/zctl --repo {repo} stop")
    return 0
