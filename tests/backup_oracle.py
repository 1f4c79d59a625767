"""A primary whose data directory holds awkward file names, and pg_basebackup runs against it.

Shared by the tar and backup-manifest tests so one Postgres serves both. The
extra files sit in the data directory root, where the server sends any file
it does not know (basebackup.c sendDir), so its tar writer and its manifest
writer both meet names that need JSON escaping or Encoded-Path.
"""

from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from conftest import PgFactory

from pgformat.lsn import parse_lsn
from zctl.postgres import PG_OS_USER, PostgresNode, make_pg_owned_dir, run_as_pg_user

# name -> contents. Valid UTF-8 with every kind of escape escape_json makes
# (quote, backslash, \t \n \b \f \r, other control bytes, DEL which it does
# not escape), then bytes that are not UTF-8 for PG's pg_verify_mbstr: a
# stray 0xFF, an overlong '/', a UTF-16 surrogate.
ODD_FILES: dict[bytes, bytes] = {
    'zz_odd "q"\\b\tt\nn\x08\x0c\r\x01\x1f\x7f é ✓'.encode(): b"escaped\n",
    b"zz_bad_\xff\xfe": b"not utf-8\n",
    b"zz_overlong_\xc0\xaf": b"",
    b"zz_surrogate_\xed\xa0\x80": b"x" * 1000,
}


@dataclass(frozen=True)
class ManifestEntry:
    """One "Files" entry of a manifest Postgres wrote, with the path as raw bytes."""

    path: bytes
    size: int
    mtime: int
    checksum_algorithm: str
    checksum: str


@dataclass(frozen=True)
class ParsedManifest:
    files: list[ManifestEntry]
    wal_ranges: list[tuple[int, int, int]]  # (timeline, start, end)


def parse_manifest(raw: bytes) -> ParsedManifest:
    doc = json.loads(raw)
    files = []
    for f in doc["Files"]:
        path = f["Path"].encode("utf-8") if "Path" in f else bytes.fromhex(f["Encoded-Path"])
        when = datetime.strptime(f["Last-Modified"], "%Y-%m-%d %H:%M:%S GMT").replace(tzinfo=timezone.utc)
        files.append(ManifestEntry(path, f["Size"], int(when.timestamp()), f.get("Checksum-Algorithm", "NONE"),
                                   f.get("Checksum", "")))
    ranges = [(r["Timeline"], parse_lsn(r["Start-LSN"]), parse_lsn(r["End-LSN"])) for r in doc["WAL-Ranges"]]
    return ParsedManifest(files, ranges)


_primaries: dict[int, PostgresNode] = {}


def oracle_primary(factory: PgFactory) -> PostgresNode:
    """One primary per session factory: a small table, an index and the ODD_FILES."""
    node = _primaries.get(id(factory))
    if node is not None:
        return node
    node = factory("oracle")
    node.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);"
        "INSERT INTO t SELECT g, repeat(md5(g::text), g % 7) FROM generate_series(1, 3000) g;"
        "CHECKPOINT;"
    )
    pw = pwd.getpwnam(PG_OS_USER)
    root = os.fsencode(node.datadir)
    for name, data in ODD_FILES.items():
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(data)
        if os.geteuid() == 0:
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(path, 0o600)
    _primaries[id(factory)] = node
    return node


def pg_basebackup(node: PostgresNode, dest: Path, *args: str) -> Path:
    """Run the real pg_basebackup (-X fetch, so WAL and its .done files are in the backup)."""
    make_pg_owned_dir(dest.parent)
    run_as_pg_user([node.bin("pg_basebackup"), "-h", node.host, "-p", str(node.port), "-U", node.user,
                    "-D", dest, "-X", "fetch", "-c", "fast", "--no-sync", *args])
    return dest
