"""The tar stream reader/writer and the backup manifest builder against Postgres's own output.

Oracles: a real `pg_basebackup` of a real Postgres 15 — its backup_manifest
must come out byte-identical from our builder, its base.tar must parse to
what Python's tarfile reads — and pg_verifybackup on a manifest we wrote.
"""

from __future__ import annotations

import calendar
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from conftest import PgFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from pgformat.backup_manifest import ManifestBuilder
from pgformat.lsn import parse_lsn
from pgformat.tarstream import (
    TAR_END,
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarFormatError,
    TarStreamParser,
    tar_padding,
    ustar_header,
)
from zctl.postgres import PostgresNode, make_pg_owned_dir, run_as_pg_user


@pytest.fixture(scope="module")
def backups(pg_session_factory: PgFactory, pg_base_dir: Path) -> tuple[PostgresNode, Path, Path]:
    """A plain and a tar pg_basebackup of the same small cluster."""
    node = pg_session_factory("manifestsrc")
    node.execute("CREATE TABLE t (id int, s text); INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 3000) i")
    work = make_pg_owned_dir(Path(tempfile.mkdtemp(prefix="manifest-", dir=pg_base_dir)))
    for fmt in ("p", "t"):
        run_as_pg_user([node.bin("pg_basebackup"), "-h", node.host, "-p", str(node.port), "-U", node.user,
                        "-D", work / fmt, f"-F{fmt}", "-X", "fetch", "-c", "fast", "--no-sync"])
    return node, work / "p", work / "t" / "base.tar"


def _events(parser: TarStreamParser, data: bytes, cuts: list[int]) -> list[object]:
    out: list[object] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += parser.feed(data[prev:cut])
        prev = cut
    return out + parser.close()


def _members(events: list[object]) -> list[tuple[str, str, bytes]]:
    """(name, kind, content) per member, from parser events."""
    out: list[tuple[str, str, bytes]] = []
    current: MemberStart | None = None
    content = bytearray()
    for ev in events:
        if isinstance(ev, MemberStart):
            current, content = ev, bytearray()
        elif isinstance(ev, MemberData):
            content += ev.data
        elif isinstance(ev, MemberEnd):
            assert current is not None
            out.append((current.name, current.kind, bytes(content)))
            current = None
    assert isinstance(events[-1], ArchiveEnd)
    return out


def _tarfile_members(data: bytes) -> list[tuple[str, str, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            kind = "dir" if m.isdir() else "symlink" if m.issym() else "file"
            f = tar.extractfile(m) if m.isfile() else None
            out.append((m.name.rstrip("/"), kind, f.read() if f else b""))
    return out


def test_manifest_is_byte_identical_to_postgres(backups: tuple[PostgresNode, Path, Path]) -> None:
    _, plain, _ = backups
    theirs = (plain / "backup_manifest").read_bytes()
    parsed = json.loads(theirs)
    ours = ManifestBuilder("CRC32C")
    for f in parsed["Files"]:
        mtime = calendar.timegm(time.strptime(f["Last-Modified"], "%Y-%m-%d %H:%M:%S GMT"))
        ours.add_file(f["Path"], (plain / f["Path"]).read_bytes(), mtime)
    for r in parsed["WAL-Ranges"]:
        ours.add_wal_range(r["Timeline"], parse_lsn(r["Start-LSN"]), parse_lsn(r["End-LSN"]))
    assert ours.render() == theirs


def test_pg_verifybackup_reads_our_manifest(backups: tuple[PostgresNode, Path, Path], pg_base_dir: Path) -> None:
    node, plain, _ = backups
    parsed = json.loads((plain / "backup_manifest").read_bytes())
    for algorithm in ("SHA256", "NONE", "CRC32C"):
        ours = ManifestBuilder(algorithm, force_encode=algorithm == "NONE")  # Encoded-Path read back too
        for f in parsed["Files"]:
            ours.add_file(f["Path"], (plain / f["Path"]).read_bytes(), 0)
        for r in parsed["WAL-Ranges"]:
            ours.add_wal_range(r["Timeline"], parse_lsn(r["Start-LSN"]), parse_lsn(r["End-LSN"]))
        path = Path(tempfile.mkdtemp(dir=pg_base_dir)) / "manifest"
        path.write_bytes(ours.render())
        os.chmod(path.parent, 0o755)
        out = run_as_pg_user([node.bin("pg_verifybackup"), "-m", path, plain], check=False)
        assert out.returncode == 0, (algorithm, out.stderr)
    # ... and tells when a file does not match what we recorded.
    ours = ManifestBuilder("CRC32C")
    first = parsed["Files"][0]["Path"]
    for f in parsed["Files"]:
        data = (plain / f["Path"]).read_bytes()
        ours.add_file(f["Path"], data + b"x" if f["Path"] == first else data, 0)
    path.write_bytes(ours.render())
    out = run_as_pg_user([node.bin("pg_verifybackup"), "-n", "-m", path, plain], check=False)
    assert out.returncode != 0 and first in out.stderr


def test_parser_reads_postgres_and_python_tars(backups: tuple[PostgresNode, Path, Path]) -> None:
    _, _, base_tar = backups
    pg_tar = base_tar.read_bytes()
    assert _members(_events(TarStreamParser(), pg_tar, [])) == _tarfile_members(pg_tar)
    buf = io.BytesIO()
    long_name = "deep/" * 30 + "file.bin"  # > 100 bytes: pax header
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("PG_VERSION", b"15\n"), (long_name, os.urandom(70000)), ("empty", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("global")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    py_tar = buf.getvalue()
    assert _members(_events(TarStreamParser(), py_tar, [])) == _tarfile_members(py_tar)
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(long_name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert _members(_events(TarStreamParser(), gnu.getvalue(), [])) == [(long_name, "file", b"abc")]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 80_000), max_size=8))
def test_parser_any_chunking(cuts: list[int]) -> None:
    data = _sample_archive()
    cuts = [c for c in cuts if c <= len(data)]
    assert _members(_events(TarStreamParser(), data, cuts)) == _members(_events(TarStreamParser(), data, []))


_SAMPLE: list[bytes] = []


def _sample_archive() -> bytes:
    if not _SAMPLE:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for i, size in enumerate((0, 1, 511, 512, 513, 20000)):
                info = tarfile.TarInfo(f"f{i}" if i != 3 else "x" * 120)
                info.size = size
                tar.addfile(info, io.BytesIO(bytes([i]) * size))
        _SAMPLE.append(buf.getvalue())
    return _SAMPLE[0]


def test_writer_round_trips_through_tarfile() -> None:
    members = [("PG_VERSION", "file", b"15\n"), ("base", "dir", b""), ("base/1/1259", "file", os.urandom(8192 * 3)),
               ("pg_tblspc/16400", "symlink", b"")]
    out = bytearray()
    for name, kind, data in members:
        out += ustar_header(name, len(data), mode=0o600, mtime=1_700_000_000, kind=kind,
                            linkname="/srv/ts" if kind == "symlink" else "")
        out += data + tar_padding(len(data))
    out += TAR_END
    assert _tarfile_members(bytes(out)) == members
    assert _members(_events(TarStreamParser(), bytes(out), [])) == members
    with pytest.raises(TarFormatError, match="too long"):
        ustar_header("x" * 100, 0, mode=0o600, mtime=0)


def test_hostile_tar_input() -> None:
    good = _sample_archive()
    header_flip = bytearray(good)
    header_flip[10] ^= 0xFF  # a name byte: checksum no longer matches
    lying = bytearray(ustar_header("f", 5000, mode=0o600, mtime=0)) + b"short"
    bad_size = bytearray(ustar_header("f", 0, mode=0o600, mtime=0))
    bad_size[124:136] = b"9999999999 \0"
    bad_size[148:156] = b"%06o\0 " % (sum(bad_size[:148]) + 256 + sum(bad_size[156:]))
    for data, why in ((bytes(header_flip), "checksum"), (good[:700], "truncated"), (bytes(lying), "truncated"),
                      (bytes(bad_size), "octal"), (good + b"garbage", "after the end"),
                      (os.urandom(512), "checksum")):
        with pytest.raises(TarFormatError, match=why):
            _events(TarStreamParser(), data, [])
