"""zctl's unpacking of a base backup stream: what tar itself would make of it, and nothing outside
the data directory whatever the stream says."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import lz4.frame
import pytest

from pgformat.lz4stream import Lz4FrameStream, Lz4StreamError
from pgformat.tarstream import TAR_END, tar_padding, ustar_header
from zctl.extract import DataDirectoryWriter, ExtractError

FILES = {"PG_VERSION": b"15\n", "base/1/1259": os.urandom(3 * 8192), "global/pg_control": os.urandom(8192),
         "pg_wal/000000010000000000000001": bytes(16 << 20), "empty": b""}


def _archive() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in ("base", "base/1", "global", "pg_wal", "pg_notify"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _unpack(stream: bytes, root: Path, *, lz4: bool = False, piece: int = 7777) -> DataDirectoryWriter:
    root.mkdir(exist_ok=True)
    writer = DataDirectoryWriter(root, lz4=lz4)
    try:
        for i in range(0, len(stream), piece):
            writer.feed(stream[i:i + piece])
        writer.close()
    finally:
        writer.abort()
    return writer


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "lz4"])
def test_unpacks_what_tar_packed(tmp_path: Path, compressed: bool) -> None:
    archive = _archive()
    # Several frames, split across pieces anywhere: what the page server sends.
    stream = b"".join(lz4.frame.compress(archive[i:i + 100_000]) for i in range(0, len(archive), 100_000)) \
        if compressed else archive
    writer = _unpack(stream, tmp_path / "d", lz4=compressed)
    assert writer.files == len(FILES) and writer.bytes == sum(map(len, FILES.values()))
    for name, data in FILES.items():
        path = tmp_path / "d" / name
        assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d" / "pg_notify").is_dir() and (tmp_path / "d" / "pg_notify").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "base/../../escape", "base//x", "./x"])
def test_names_outside_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    stream = ustar_header(name, 4, mode=0o600, mtime=0) + b"evil" + tar_padding(4) + TAR_END
    with pytest.raises(ExtractError, match="not a path inside"):
        _unpack(stream, tmp_path / "d")
    assert not (tmp_path / "escape").exists() and not Path("/etc/escape").exists()


def test_links_and_truncation_are_refused(tmp_path: Path) -> None:
    link = ustar_header("pg_tblspc/16384", 0, mode=0o777, mtime=0, kind="symlink", linkname="/etc") + TAR_END
    with pytest.raises(ExtractError, match="symlink"):
        _unpack(link, tmp_path / "a")
    archive = _archive()
    with pytest.raises(ExtractError, match="stopped early"):
        _unpack(archive[: len(archive) // 2], tmp_path / "b")
    frames = lz4.frame.compress(archive)
    with pytest.raises(ExtractError, match="stopped early"):
        _unpack(frames[:-10], tmp_path / "c", lz4=True)
    corrupt = bytearray(frames)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(ExtractError):
        _unpack(bytes(corrupt), tmp_path / "d", lz4=True)
    with pytest.raises(ExtractError, match="corrupt"):
        _unpack(b"this is no lz4 stream at all", tmp_path / "e", lz4=True)


def test_write_errors_surface(tmp_path: Path) -> None:
    """A directory where a file must go: the error reaches the caller, nothing hangs."""
    (tmp_path / "d" / "PG_VERSION").mkdir(parents=True)
    with pytest.raises((ExtractError, OSError)):
        _unpack(_archive(), tmp_path / "d")


def test_lz4_stream_decoder_edges() -> None:
    frames = Lz4FrameStream()
    data = lz4.frame.compress(b"a" * 1000) + lz4.frame.compress(b"b" * 10)
    out = b"".join(b"".join(frames.feed(data[i:i + 3])) for i in range(0, len(data), 3))
    frames.close()
    assert out == b"a" * 1000 + b"b" * 10 and frames.frames == 2
    half = Lz4FrameStream()
    half.feed(data[:20])
    with pytest.raises(Lz4StreamError, match="inside LZ4 frame 1"):
        half.close()
