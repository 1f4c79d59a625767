"""Tests for pgformat.tarstream (tar as src/port/tar.c and bbstreamer_tar.c see it).

Oracles: Python's tarfile reads every archive we parse (a real PG15
`pg_basebackup -Ft` base.tar, and tarfile's own PAX / GNU / USTAR output with
long names, long link targets, non-UTF-8 names, large members), and reads back
every archive we write. Our headers are compared byte for byte with the ones
the PG15 server wrote for the same members, and re-emitting PG's base.tar
member by member gives the very same bytes. Hostile input (truncation, flipped
bytes, sizes that lie, garbage) only ever raises TarFormatError.
"""

from __future__ import annotations

import io
import math
import os
import random
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest
from backup_oracle import ODD_FILES, oracle_primary, pg_basebackup
from conftest import PgFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgformat.errors import FormatError
from pgformat.tarstream import (
    MAX_EXTENDED_HEADER,
    TAR_BLOCK_SIZE,
    TAR_END,
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarEvent,
    TarFormatError,
    TarStreamParser,
    iter_tar,
    tar_padding,
    ustar_header,
)
from zctl.postgres import PostgresNode

# (name, size, mode, mtime, kind, linkname, contents)
Member = tuple[str, int, int, int, str, str, bytes]

slow_settings = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def chunked(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    return [data[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def parse(chunks: Iterable[bytes]) -> list[TarEvent]:
    """All events, with each member's MemberData joined into one (chunking decides how data splits)."""
    out: list[TarEvent] = []
    for ev in iter_tar(chunks):
        assert not isinstance(ev, MemberData) or ev.data, "empty MemberData"
        if isinstance(ev, MemberData) and out and isinstance(out[-1], MemberData):
            out[-1] = MemberData(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def members_of_events(events: list[TarEvent]) -> list[Member]:
    out: list[Member] = []
    start: MemberStart | None = None
    data = b""
    for ev in events:
        if isinstance(ev, MemberStart):
            assert start is None
            start, data = ev, b""
        elif isinstance(ev, MemberData):
            assert start is not None and start.kind == "file"
            data += ev.data
        elif isinstance(ev, MemberEnd):
            assert start is not None and len(data) == start.size
            out.append((start.name, start.size, start.mode, start.mtime, start.kind, start.linkname, data))
            start = None
    assert start is None and isinstance(events[-1], ArchiveEnd)
    assert sum(isinstance(ev, ArchiveEnd) for ev in events) == 1
    return out


def members_by_tarfile(data: bytes) -> list[Member]:
    out: list[Member] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for ti in tf:
            kind = "file" if ti.isreg() else "dir" if ti.isdir() else "symlink" if ti.issym() else "?"
            f = tf.extractfile(ti) if ti.isreg() else None
            contents = f.read() if f is not None else b""
            out.append((ti.name.rstrip("/") if kind != "file" else ti.name, ti.size, ti.mode & 0o7777,
                        math.floor(ti.mtime), kind, ti.linkname if kind == "symlink" else "", contents))
    return out


def emit(members: Iterable[Member], **ids: int) -> bytes:
    out = bytearray()
    for name, size, mode, mtime, kind, link, contents in members:
        out += ustar_header(name, size, mode=mode, mtime=mtime, kind=kind, linkname=link, **ids)  # type: ignore[arg-type]
        out += contents + tar_padding(size)
    return bytes(out + TAR_END)


def expect_error(data: bytes, cuts: Iterable[int] = ()) -> TarFormatError:
    parser = TarStreamParser()
    with pytest.raises(TarFormatError) as info:
        for chunk in chunked(data, cuts):
            parser.feed(chunk)
        parser.close()
    # A dead parser stays dead.
    with pytest.raises(TarFormatError):
        parser.feed(b"")
    return info.value


def set_field(header: bytes, start: int, value: bytes) -> bytes:
    """Overwrite a header field and fix the checksum, so only the field is wrong."""
    h = bytearray(header)
    h[start:start + len(value)] = value
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


# -- archives tarfile writes -----------------------------------------------------

LONG_DIR = "base/" + "d" * 120
RNG = random.Random(15)
BIG = bytes(RNG.getrandbits(8) for _ in range(1 << 16)) * 40 + b"tail"  # 2.5 MiB, not a multiple of 512


def tarfile_archive(fmt: int, *, pax_global: bool = False) -> bytes:
    buf = io.BytesIO()
    pax = {"comment": "global header, ignored"} if pax_global else None
    with tarfile.open(fileobj=buf, mode="w|", format=fmt, pax_headers=pax) as tf:
        def add(name: str, kind: bytes, data: bytes = b"", link: str = "", mtime: float = 1_700_000_000,
                mode: int = 0o600) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.size, ti.linkname, ti.mtime, ti.mode = kind, len(data), link, mtime, mode
            ti.uid, ti.gid, ti.uname, ti.gname = 105, 111, "postgres", "postgres"
            tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("base", tarfile.DIRTYPE, mode=0o700)
        add(LONG_DIR, tarfile.DIRTYPE, mode=0o700)
        add(LONG_DIR + "/16384", tarfile.REGTYPE, bytes(8192))
        add("PG_VERSION", tarfile.REGTYPE, b"15\n")
        add("empty", tarfile.REGTYPE, b"")
        add("big", tarfile.REGTYPE, BIG)
        long_link = fmt != tarfile.USTAR_FORMAT  # ustar has no room for one
        add("pg_tblspc/16385", tarfile.SYMTYPE, link="/srv/" + "t" * (150 if long_link else 50))
        if fmt != tarfile.USTAR_FORMAT:
            add("caf\u00e9/\u2713 nonascii", tarfile.REGTYPE, b"utf-8 name")
            add("bad\udcff", tarfile.REGTYPE, b"non-UTF-8 name", mtime=1_700_000_000.75)
    return buf.getvalue()


ARCHIVES = {
    "pax": tarfile_archive(tarfile.PAX_FORMAT),
    "pax-global": tarfile_archive(tarfile.PAX_FORMAT, pax_global=True),
    "gnu": tarfile_archive(tarfile.GNU_FORMAT),
    "ustar": tarfile_archive(tarfile.USTAR_FORMAT),  # the long names go through the prefix field
}


@pytest.mark.parametrize("fmt", sorted(ARCHIVES))
def test_tarfile_archives(fmt: str) -> None:
    data = ARCHIVES[fmt]
    expected = members_by_tarfile(data)
    assert any(len(m[0]) > 100 for m in expected)
    assert any(len(m[5]) > 100 for m in expected) == (fmt != "ustar")
    assert members_of_events(parse([data])) == expected
    assert members_of_events(parse(chunked(data, range(0, len(data), 511)))) == expected


@slow_settings
@given(st.sampled_from(sorted(ARCHIVES)), st.lists(st.integers(1, 3 << 20), max_size=30),
       st.lists(st.integers(1, 2000), max_size=30))
def test_any_chunking_gives_the_same_events(fmt: str, far: list[int], near: list[int]) -> None:
    data = ARCHIVES[fmt]
    # Cuts everywhere, plus a cluster in the headers at the start where the state changes often.
    assert parse(chunked(data, far + near)) == parse([data])


def test_events_in_detail() -> None:
    events = parse([ARCHIVES["pax"]])
    starts = [ev for ev in events if isinstance(ev, MemberStart)]
    assert starts[0] == MemberStart("base", 0, 0o700, 1_700_000_000, "dir")
    assert starts[-1] == MemberStart("bad\udcff", 14, 0o600, 1_700_000_000, "file")
    assert os.fsencode(starts[-1].name) == b"bad\xff"
    assert isinstance(events[-1], ArchiveEnd)
    # Zero-size members: start and end, no data.
    i = events.index(MemberStart("empty", 0, 0o600, 1_700_000_000, "file"))
    assert isinstance(events[i + 1], MemberEnd)


def test_data_events_are_bounded_by_chunks() -> None:
    """Memory stays bounded: a member's contents come in pieces no bigger than what was fed."""
    data = ARCHIVES["pax"]
    parser = TarStreamParser()
    biggest = 0
    for chunk in chunked(data, range(0, len(data), 4096)):
        for ev in parser.feed(chunk):
            if isinstance(ev, MemberData):
                biggest = max(biggest, len(ev.data))
    parser.close()
    assert biggest == 4096


# -- the real server's tar -------------------------------------------------------


@pytest.fixture(scope="module")
def pg_tar(pg_session_factory: PgFactory, pg_base_dir: Path) -> bytes:
    primary: PostgresNode = oracle_primary(pg_session_factory)
    backup = pg_basebackup(primary, pg_base_dir / "tarstream" / "backup", "-Ft")
    return (backup / "base.tar").read_bytes()


def test_pg_base_tar_matches_tarfile(pg_tar: bytes) -> None:
    expected = members_by_tarfile(pg_tar)
    names = {os.fsencode(m[0]) for m in expected}
    assert set(ODD_FILES) <= names and "global/pg_control" in {m[0] for m in expected}
    assert any(m[4] == "dir" for m in expected) and any(m[0].startswith("pg_wal/0") for m in expected)
    rng = random.Random(1)
    cuts = [rng.randrange(len(pg_tar)) for _ in range(200)] + list(range(0, 20_000, 97))
    assert members_of_events(parse(chunked(pg_tar, cuts))) == expected


def test_our_headers_are_the_servers(pg_tar: bytes) -> None:
    """ustar_header gives the bytes tarCreateHeader wrote; re-emitting PG's base.tar gives base.tar."""
    with tarfile.open(fileobj=io.BytesIO(pg_tar), mode="r:") as tf:
        infos = tf.getmembers()
    uid, gid = infos[0].uid, infos[0].gid
    for ti in infos:
        raw = pg_tar[ti.offset:ti.offset + TAR_BLOCK_SIZE]
        kind = "dir" if ti.isdir() else "symlink" if ti.issym() else "file"
        ours = ustar_header(ti.name, ti.size, mode=ti.mode, mtime=int(ti.mtime), kind=kind,  # type: ignore[arg-type]
                            linkname=ti.linkname, uid=ti.uid, gid=ti.gid)
        assert ours == raw, ti.name
    members = members_of_events(parse([pg_tar]))
    assert emit(members, uid=uid, gid=gid) == pg_tar


# -- the writer ---------------------------------------------------------------------


ROUND_TRIP: list[Member] = [
    ("base", 0, 0o700, 1_700_000_000, "dir", "", b""),
    ("base/1/1259", 8192 * 3, 0o600, 1_700_000_001, "file", "", RNG.randbytes(8192 * 3).replace(b"\0", b"\1")),
    ("backup_label", 220, 0o600, 1_700_000_002, "file", "", b"START WAL LOCATION".ljust(220, b"\n")),
    ("empty", 0, 0o644, 0, "file", "", b""),
    ("pg_tblspc/16385", 0, 0o777, 1_700_000_003, "symlink", "/srv/tblspc", b""),
    ("caf\u00e9 \"q\"\\\n", 3, 0o600, 5, "file", "", b"abc"),
    ("bad\udcff\udcfe", 1, 0o600, 2**33, "file", "", b"x"),  # non-UTF-8 name; mtime in base-256
    ("x" * 99, 1000, 0o600, 7, "file", "", RNG.randbytes(1000)),
    ("y" * 98, 0, 0o700, 7, "dir", "", b""),
]


def test_written_archive_reads_back() -> None:
    data = emit(ROUND_TRIP)
    assert len(data) % TAR_BLOCK_SIZE == 0 and data.endswith(TAR_END)
    assert members_by_tarfile(data) == ROUND_TRIP
    assert members_of_events(parse(chunked(data, range(0, len(data), 100)))) == ROUND_TRIP
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        first = tf.next()
        assert first is not None and (first.uname, first.gname, first.uid) == ("postgres", "postgres", 0)
        links = [(ti.name, ti.linkname) for ti in tf.getmembers() if ti.issym()]
        assert links == [("pg_tblspc/16385/", "/srv/tblspc")]  # with Postgres's trailing slash


def test_header_fields_as_postgres_prints_them() -> None:
    h = ustar_header("base/1/1234", 8192, mode=0o100600, mtime=1_700_000_000, uid=105, gid=111)
    assert h[:12] == b"base/1/1234\x00" and h[100:156] == (
        b"0000600 0000151 0000157 00000020000 14524770400 0014557 ")
    assert h[156:157] == b"0" and h[257:265] == b"ustar\x0000" and h[265:274] == b"postgres\x00"
    assert h[329:345] == b"0000000 0000000 " and h[345:] == bytes(167)
    big = ustar_header("huge", 1 << 40, mode=0o600, mtime=0)
    assert big[124:136] == b"\x80" + (1 << 40).to_bytes(11, "big")
    assert tarfile.TarInfo.frombuf(big, "utf-8", "surrogateescape").size == 1 << 40
    d = ustar_header("base/1", 0, mode=0o40700, mtime=0, kind="dir")
    assert d[:8] == b"base/1/\x00" and d[156:157] == b"5" and d[100:108] == b"0000700 "
    s = ustar_header("pg_tblspc/1", 0, mode=0o777, mtime=0, kind="symlink", linkname="/t")
    assert s[:13] == b"pg_tblspc/1/\x00" and s[156:160] == b"2/t\x00"
    assert [len(tar_padding(n)) for n in (0, 1, 511, 512, 513, 8192)] == [0, 511, 1, 0, 511, 0]
    assert TAR_END == bytes(1024)


@pytest.mark.parametrize(("args", "kwargs"), [
    (("n" * 100, 0), {}),  # PG reads the name as a C string from the 100-byte field
    (("\u00e9" * 50, 0), {}),  # 100 bytes of UTF-8
    (("d" * 99, 0), {"kind": "dir"}),  # 99 + '/'
    (("l", 0), {"kind": "symlink", "linkname": "t" * 100}),
    (("l", 0), {"kind": "symlink"}),
    (("f", 0), {"linkname": "t"}),
    (("d", 1), {"kind": "dir"}),
    (("", 0), {}),
    (("a\x00b", 0), {}),
    (("f", -1), {}),
    (("f", 1 << 88), {}),
    (("f", 0), {"mtime": -1}),
    (("f", 0), {"kind": "hardlink"}),
])
def test_writer_refuses(args: tuple[str, int], kwargs: dict[str, object]) -> None:
    kw: dict[str, object] = {"mode": 0o600, "mtime": 0, **kwargs}
    with pytest.raises(TarFormatError):
        ustar_header(*args, **kw)  # type: ignore[arg-type]


def test_writer_limits_are_tight() -> None:
    ustar_header("n" * 99, 0, mode=0o600, mtime=0)
    ustar_header("d" * 98, 0, mode=0o700, mtime=0, kind="dir")
    ustar_header("l", 0, mode=0o777, mtime=0, kind="symlink", linkname="t" * 99)


# -- hostile input -------------------------------------------------------------------


# dir "base", "base/1/1259" (24576 bytes, none zero), "backup_label", "empty", end.
SMALL = emit(ROUND_TRIP[:4])


def test_every_truncation_is_an_error() -> None:
    """Cut anywhere before the end of the first zero block: an error, at feed() or close()."""
    end_marker = len(SMALL) - len(TAR_END) + TAR_BLOCK_SIZE
    for cut in range(0, end_marker, 7):
        expect_error(SMALL[:cut], [cut // 3])
    # The pax and GNU extended headers at the start of tarfile's archives.
    for fmt in ("pax", "gnu"):
        for cut in range(0, 4096):
            expect_error(ARCHIVES[fmt][:cut], [cut // 2])
    # From the end marker on, the rest is optional zeros.
    assert parse([SMALL[:end_marker]]) == parse([SMALL])


def test_truncation_mid_member_names_the_spot() -> None:
    err = expect_error(SMALL[:TAR_BLOCK_SIZE * 2 + 5])
    assert "truncated" in err.reason and err.offset == TAR_BLOCK_SIZE * 2 + 5


def test_flipped_header_bytes() -> None:
    # Every byte of a header is covered by the checksum (the checksum field by its value).
    for i in range(TAR_BLOCK_SIZE):
        data = bytearray(SMALL)
        data[TAR_BLOCK_SIZE + i] ^= 0x01  # the second header ("base/1/1259")
        err = expect_error(bytes(data))
        assert err.offset == TAR_BLOCK_SIZE, i


def test_sizes_that_lie() -> None:
    header = SMALL[TAR_BLOCK_SIZE:2 * TAR_BLOCK_SIZE]  # base/1/1259, 24576 random bytes
    rest = SMALL[2 * TAR_BLOCK_SIZE:]
    for size in (8192 * 3 - 512, 8192 * 3 + 512, 8192 * 3 - 1, 8192 * 3 - 700, 10**9):
        lying = set_field(header, 124, b"%011o\x00" % size)
        expect_error(SMALL[:TAR_BLOCK_SIZE] + lying + rest)
    # A pax size that lies (tarfile writes one only past 8 GiB; forge one).
    ti = tarfile.TarInfo("f")
    ti.size = 10
    forged = ti.tobuf(tarfile.USTAR_FORMAT)
    record = b"16 size=1000000\n"
    ext = tarfile.TarInfo("././@PaxHeader")
    ext.type, ext.size = tarfile.XHDTYPE, len(record)
    forged = ext.tobuf(tarfile.USTAR_FORMAT) + record + tar_padding(len(record)) + forged
    expect_error(forged + b"0123456789" + tar_padding(10) + TAR_END)


def test_bad_fields() -> None:
    header = SMALL[TAR_BLOCK_SIZE:2 * TAR_BLOCK_SIZE]
    rest = SMALL[2 * TAR_BLOCK_SIZE:]
    for start, value in ((124, b"0000006000x\x00"), (100, b"0000600\x09"), (136, b"9" * 11), (124, b"\xff" + bytes(11)),
                         (0, bytes(100)), (156, b"1"), (156, b"3"), (156, b"S")):
        err = expect_error(SMALL[:TAR_BLOCK_SIZE] + set_field(header, start, value) + rest)
        assert err.offset == TAR_BLOCK_SIZE, (start, value)
    # Directories and symbolic links carry no data: a size there is a lie.
    dir_header = SMALL[:TAR_BLOCK_SIZE]
    err = expect_error(set_field(dir_header, 124, b"%011o\x00" % 512) + bytes(512) + SMALL[TAR_BLOCK_SIZE:])
    assert "size" in err.reason and err.offset == 0
    link = ustar_header("l", 0, mode=0o777, mtime=0, kind="symlink", linkname="t")
    expect_error(set_field(link, 157, b"\x00") + TAR_END)
    with pytest.raises(TarFormatError, match="non-octal checksum"):
        TarStreamParser().feed(header[:148] + b"0x" + header[150:])


def test_bad_extended_headers() -> None:
    def ext(kind: bytes, body: bytes, size: int | None = None) -> bytes:
        ti = tarfile.TarInfo("././@PaxHeader")
        ti.type, ti.size = kind, len(body) if size is None else size
        return ti.tobuf(tarfile.USTAR_FORMAT) + body + tar_padding(len(body))

    member = ustar_header("f", 0, mode=0o600, mtime=0)
    for body in (b"15 path=abc\n", b"x path=abc\n", b"11 pathabc\n", b"12 path=abc!", b"99 path=abc\n",
                 b"20 GNU.sparse.map=1\n", b"15 mtime=1.2.3\n", b"11 size=-1\n", b"8 \xff=abc\n",
                 b"5 =a\n"):
        expect_error(ext(tarfile.XHDTYPE, body) + member + TAR_END)
    expect_error(ext(tarfile.XHDTYPE, b"", MAX_EXTENDED_HEADER + 1) + member + TAR_END)
    # An extended header must be followed by a member, not by the end.
    expect_error(ext(tarfile.XHDTYPE, b"12 path=abc\n") + TAR_END)
    expect_error(ext(tarfile.GNUTYPE_LONGNAME, b"long\x00") + TAR_END)
    # Valid ones, for contrast.
    assert parse([ext(tarfile.XHDTYPE, b"12 path=abc\n") + member + TAR_END])[0].name == "abc"  # type: ignore[union-attr]
    assert parse([ext(tarfile.GNUTYPE_LONGNAME, b"long\x00") + member + TAR_END])[0].name == "long"  # type: ignore[union-attr]
    assert parse([ext(tarfile.XGLTYPE, b"12 path=abc\n") + member + TAR_END])[0].name == "f"  # type: ignore[union-attr]


def test_after_the_end() -> None:
    assert parse([SMALL + bytes(5000)]) == parse([SMALL])
    err = expect_error(SMALL + bytes(700) + b"x")
    assert err.offset == len(SMALL) + 700
    expect_error(SMALL[:-1024] + b"\x00" * 511 + b"\x01")  # a first zero block that is not all zero...
    parser = TarStreamParser()
    parser.feed(SMALL)
    parser.close()
    with pytest.raises(TarFormatError, match="after close"):
        parser.feed(b"")


@slow_settings
@given(st.binary(min_size=0, max_size=3000), st.lists(st.integers(0, 3000), max_size=5))
def test_garbage_raises_only_tar_errors(data: bytes, cuts: list[int]) -> None:
    try:
        list(iter_tar(chunked(data, cuts)))
    except TarFormatError:
        pass


@slow_settings
@given(st.lists(st.tuples(st.integers(0, len(SMALL) - 1), st.integers(1, 255)), min_size=1, max_size=4),
       st.lists(st.integers(0, len(SMALL)), max_size=5))
def test_corrupted_archive_raises_only_tar_errors(flips: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(SMALL)
    for at, xor in flips:
        data[at] ^= xor
    try:
        events = parse(chunked(bytes(data), cuts))
    except TarFormatError as e:
        assert isinstance(e, FormatError) and e.offset is not None
    else:
        members_of_events(events)  # whatever got through is still a consistent event stream
