"""Tests for pgformat.backup_manifest (src/backend/backup/backup_manifest.c).

Oracles: the backup_manifest a real PG15 server writes for pg_basebackup,
rebuilt byte for byte from the backup's own files (plain format) and from the
tar stream (tar format, where member mtimes are the server's own), for every
checksum algorithm and with force-encode; and pg_verifybackup, which accepts
a backup whose manifest we wrote from our own directory walk and rejects it
once a file changed.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import pytest
from backup_oracle import ODD_FILES, oracle_primary, parse_manifest, pg_basebackup
from conftest import PgFactory
from hypothesis import given
from hypothesis import strategies as st

from pgformat.backup_manifest import (
    CHECKSUM_ALGORITHMS,
    ManifestBuilder,
    ManifestError,
    ManifestFile,
    format_manifest_time,
)
from pgformat.errors import FormatError
from pgformat.tarstream import MemberData, MemberEnd, MemberStart, TarStreamParser
from zctl.postgres import PostgresError, PostgresNode, run_as_pg_user

WAL_SEGMENT = re.compile(rb"pg_wal/[0-9A-F]{24}")


# -- unit tests: the text, fragment by fragment ------------------------------


def test_empty_backup_layout_and_checksum() -> None:
    b = ManifestBuilder()
    b.add_wal_range(1, 0x2000028, 0x2000100)
    body = (b'{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n],\n'
            b'"WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n],\n')
    assert b.render() == body + b'"Manifest-Checksum": "' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def test_file_lines_crc32c_and_separators() -> None:
    b = ManifestBuilder()
    first = b.add_file("PG_VERSION", b"123456789", 0)
    b.add_file("global/pg_control", b"", 86400 * 365)
    b.add_wal_range(2, 0x1_0000_0000, 0x1_2345_6789)
    b.add_wal_range(1, 0x100, 0x1_0000_0000)
    out = b.render()
    # CRC-32C("123456789") = 0xE3069283, written as the little-endian uint32 bytes.
    assert first == ManifestFile(b"PG_VERSION", 9, 0, bytes.fromhex("839206e3"))
    assert (b'"Files": [\n{ "Path": "PG_VERSION", "Size": 9, "Last-Modified": "1970-01-01 00:00:00 GMT", '
            b'"Checksum-Algorithm": "CRC32C", "Checksum": "839206e3" },\n'
            b'{ "Path": "global/pg_control", "Size": 0, "Last-Modified": "1971-01-01 00:00:00 GMT", '
            b'"Checksum-Algorithm": "CRC32C", "Checksum": "00000000" }\n],\n') in out
    assert (b'"WAL-Ranges": [\n{ "Timeline": 2, "Start-LSN": "1/0", "End-LSN": "1/23456789" },\n'
            b'{ "Timeline": 1, "Start-LSN": "0/100", "End-LSN": "1/0" }\n],\n"Manifest-Checksum"') in out


def test_path_escaping_and_encoding() -> None:
    b = ManifestBuilder("none")
    b.add_file('a"b\\c\td\ne\x08\x0c\r\x01\x1f\x7fé', b"", 0)
    b.add_file(b"bad\xff", b"", 0)
    b.add_file("bad\udcff", b"", 0)  # the same bytes as os.fsdecode gives them
    b.add_wal_range(1, 1, 2)
    out = b.render()
    assert b'{ "Path": "a\\"b\\\\c\\td\\ne\\b\\f\\r\\u0001\\u001f\x7f\xc3\xa9", "Size": 0, ' in out
    assert out.count(b'{ "Encoded-Path": "626164ff", "Size": 0, "Last-Modified": "1970-01-01 00:00:00 GMT" }') == 2
    assert b"Checksum-Algorithm" not in out

    forced = ManifestBuilder(force_encode=True)
    forced.add_file("ab", b"", 0)
    forced.add_wal_range(1, 0, 0)
    assert b'{ "Encoded-Path": "6162", ' in forced.render()


def test_manifest_time() -> None:
    assert format_manifest_time(0) == "1970-01-01 00:00:00 GMT"
    assert format_manifest_time(1_700_000_000) == "2023-11-14 22:13:20 GMT"
    assert format_manifest_time(-1) == "1969-12-31 23:59:59 GMT"
    with pytest.raises(ManifestError):
        format_manifest_time(1 << 62)


@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=8),
       algorithm=st.sampled_from(CHECKSUM_ALGORITHMS))
def test_streamed_equals_whole(data: bytes, cuts: list[int], algorithm: str) -> None:
    whole = ManifestBuilder(algorithm)
    whole.add_file("f", data, 5)
    streamed = ManifestBuilder(algorithm)
    streamed.begin_file("f", 5)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for lo, hi in zip(bounds, bounds[1:]):
        streamed.update(memoryview(data)[lo:hi] if lo % 2 else bytearray(data[lo:hi]))
    streamed.end_file()
    for b in (whole, streamed):
        b.add_wal_range(1, 0, 0)
    assert streamed.render() == whole.render()


def test_misuse_raises() -> None:
    b = ManifestBuilder()
    with pytest.raises(ManifestError):
        ManifestBuilder("MD5")
    with pytest.raises(ManifestError):
        b.update(b"x")
    with pytest.raises(ManifestError):
        b.end_file()
    with pytest.raises(ManifestError):
        b.render()  # no WAL range
    for bad in ("", "a\x00b", b""):
        with pytest.raises(ManifestError):
            b.begin_file(bad, 0)
    b.begin_file("x", 0)
    with pytest.raises(ManifestError):
        b.begin_file("y", 0)
    with pytest.raises(ManifestError):
        b.render()
    b.end_file()
    for tli, start, end in ((0, 0, 0), (1, 2, 1), (1 << 32, 0, 0), (1, 0, 1 << 64)):
        with pytest.raises(ManifestError):
            b.add_wal_range(tli, start, end)
    b.add_wal_range(1, 0, 1)
    with pytest.raises(ManifestError):
        b.add_file("late", b"", 0)
    assert issubclass(ManifestError, FormatError)


# -- against the real server ---------------------------------------------------


@pytest.fixture(scope="module")
def primary(pg_session_factory: PgFactory) -> PostgresNode:
    return oracle_primary(pg_session_factory)


def test_plain_backup_manifest_is_rebuilt_byte_for_byte(primary: PostgresNode, pg_base_dir: Path) -> None:
    """pg_basebackup -Fp: the files on disk, in the manifest's order, give PG's manifest back."""
    backup = pg_basebackup(primary, pg_base_dir / "manifest-plain" / "backup", "-Fp")
    theirs = (backup / "backup_manifest").read_bytes()
    parsed = parse_manifest(theirs)
    paths = {f.path for f in parsed.files}
    assert set(ODD_FILES) <= paths, "the odd names must reach the manifest"
    assert any(f.path.endswith(b".done") for f in parsed.files)
    assert theirs.count(b'"Encoded-Path"') == 3 and b'\\u0001' in theirs

    builder = ManifestBuilder("CRC32C")
    for f in parsed.files:
        with open(os.path.join(os.fsencode(backup), f.path), "rb") as fh:
            builder.add_file(f.path, fh.read(), f.mtime)
    for tli, start, end in parsed.wal_ranges:
        builder.add_wal_range(tli, start, end)
    assert builder.render() == theirs


@pytest.mark.parametrize(("algorithm", "extra"), [
    ("CRC32C", ()),
    ("NONE", ("--manifest-force-encode",)),
    ("SHA224", ()),
    ("SHA256", ()),
    ("SHA384", ()),
    ("SHA512", ()),
])
def test_tar_backup_manifest_is_rebuilt_from_the_stream(primary: PostgresNode, pg_base_dir: Path, algorithm: str,
                                                        extra: tuple[str, ...]) -> None:
    """pg_basebackup -Ft: streaming base.tar through the tar parser into the builder gives PG's manifest.

    The member mtimes are the server's stat() of the source files, so nothing
    here is read back from the manifest except the WAL range. The server
    lists every file it sends except the WAL segments of -X fetch.
    """
    label = f"manifest-tar-{algorithm}{'-enc' if extra else ''}"
    backup = pg_basebackup(primary, pg_base_dir / label / "backup", "-Ft", f"--manifest-checksums={algorithm}",
                           *extra)
    theirs = (backup / "backup_manifest").read_bytes()
    parsed = parse_manifest(theirs)

    builder = ManifestBuilder(algorithm, force_encode=bool(extra))
    parser = TarStreamParser()
    rng = random.Random(algorithm)
    member: MemberStart | None = None
    with open(backup / "base.tar", "rb") as f:
        while chunk := f.read(rng.choice((1000, 8192, 65536, 300_000))):
            for ev in parser.feed(chunk):
                if isinstance(ev, MemberStart):
                    raw = os.fsencode(ev.name)
                    member = ev if ev.kind == "file" and not WAL_SEGMENT.fullmatch(raw) else None
                    if member is not None:
                        builder.begin_file(raw, ev.mtime)
                elif isinstance(ev, MemberData) and member is not None:
                    builder.update(ev.data)
                elif isinstance(ev, MemberEnd) and member is not None:
                    builder.end_file()
    parser.close()
    for tli, start, end in parsed.wal_ranges:
        builder.add_wal_range(tli, start, end)
    assert builder.file_count == len(parsed.files)
    ours = builder.render()
    if extra:
        assert b'"Path"' not in ours
    assert ours == theirs


def _walk_files(root: bytes) -> list[bytes]:
    """Every regular file pg_verifybackup will look for, in our own (sorted) order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            path = name if rel == b"." else os.path.join(rel, name)
            if path == b"backup_manifest" or path.startswith(b"pg_wal/"):
                continue
            out.append(path)
    return out


def test_pg_verifybackup_judges_our_manifest(primary: PostgresNode, pg_base_dir: Path) -> None:
    """pg_verifybackup accepts our manifest for a plain backup, then rejects it once a file changes.

    The manifest is built from our walk of the backup (sorted order, mtimes
    and contents from disk), not from Postgres's manifest; only the WAL range
    comes from there (it is not knowable from the files). pg_verifybackup
    also replays that range with pg_waldump.
    """
    backup = pg_basebackup(primary, pg_base_dir / "manifest-verify" / "backup", "-Fp")
    root = os.fsencode(backup)
    wal_ranges = parse_manifest((backup / "backup_manifest").read_bytes()).wal_ranges

    builder = ManifestBuilder()
    for path in _walk_files(root):
        full = os.path.join(root, path)
        builder.begin_file(path, os.stat(full).st_mtime_ns // 1_000_000_000)
        with open(full, "rb") as f:
            while block := f.read(100_000):
                builder.update(block)
        builder.end_file()
    for tli, start, end in wal_ranges:
        builder.add_wal_range(tli, start, end)
    (backup / "backup_manifest").write_bytes(builder.render())

    verify = [primary.bin("pg_verifybackup"), backup]
    out = run_as_pg_user(verify)
    assert "backup successfully verified" in out.stdout

    # Same size, one byte different: only the checksum can tell.
    victim = os.path.join(root, b"zz_surrogate_\xed\xa0\x80")
    with open(victim, "r+b") as f:
        f.seek(500)
        f.write(b"y")
    with pytest.raises(PostgresError, match=r"checksum mismatch for file \"zz_surrogate_"):
        run_as_pg_user(verify, errors="surrogateescape")
