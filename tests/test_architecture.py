"""The layers stay layers: formats (libs/pgformat, no I/O) -> redo (libs/pgredo) -> services -> CLI.

Read from the sources' import statements and calls (ast), so a violation fails here with the
file and line, whatever the code does at run time:
- nothing in libs/ imports a service, the CLI, gRPC or the generated protos;
- libs/pgformat does no I/O: no files, sockets, processes, databases or threads;
- a service imports no other service's modules (they talk gRPC); services.runtime is shared;
- the CLI uses services only through their gRPC APIs (and services.runtime, services.auth: the
  client side of the security every service shares).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("pageserver", "walreceiver", "redo", "pgshim", "computefs")
_NO_IO_MODULES = ("socket", "subprocess", "sqlite3", "shutil", "tempfile", "threading", "multiprocessing",
                  "asyncio", "selectors", "select", "mmap", "pathlib", "io", "glob")


def _sources(*parts: str) -> Iterator[Path]:
    yield from sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative ones resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from services import pageserver` names a module too
                yield node.lineno, f"{module}.{alias.name}"


def _module_of(path: Path) -> str:
    """The import name of a source file (libs/ and cli/ are import roots)."""
    rel = path.relative_to(ROOT)
    parts = rel.with_suffix("").parts
    if parts[0] in ("libs", "cli"):
        parts = parts[1:]
    return ".".join(parts)


def _violations(paths: Iterator[Path], forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    out = []
    for path in paths:
        for line, module in _imports(path):
            hit = next((f for f in forbidden if module == f or module.startswith(f + ".")), None)
            if hit and not any(module == a or module.startswith(a + ".") for a in allowed):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


def test_libs_import_no_service_cli_grpc_or_protos() -> None:
    assert _violations(_sources("libs"), ("services", "zctl", "grpc", "zproto", "psycopg")) == []


def test_pgformat_does_no_io() -> None:
    bad = _violations(_sources("libs", "pgformat"), _NO_IO_MODULES)
    for path in _sources("libs", "pgformat"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id == "open":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} calls open()")
            # os.path.* is string handling; any other os.* call is I/O or process state.
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "os":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} calls os.{f.attr}()")
    assert bad == []


def test_services_do_not_import_each_other() -> None:
    bad = []
    for name in SERVICES:
        others = tuple(f"services.{o}" for o in SERVICES if o != name)
        bad += _violations(_sources("services", name), others)
    assert bad == []


def test_cli_reaches_services_only_through_grpc() -> None:
    assert _violations(_sources("cli"), ("services",), allowed=("services.runtime", "services.auth")) == []


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    """The rules above can fail: a file with each kind of violation is caught."""
    probe = ROOT / "services" / "walreceiver" / "_architecture_probe.py"
    probe.write_text("from ..pageserver import repository\nimport services.redo.pool\n")
    try:
        found = _violations(iter([probe]), ("services.pageserver", "services.redo"))
    finally:
        probe.unlink()
    assert found == [f"{probe.relative_to(ROOT)}:1 imports services.pageserver",
                     f"{probe.relative_to(ROOT)}:1 imports services.pageserver.repository",
                     f"{probe.relative_to(ROOT)}:2 imports services.redo.pool"]
    assert _module_of(ROOT / "libs" / "pgformat" / "lsn.py") == "pgformat.lsn"
