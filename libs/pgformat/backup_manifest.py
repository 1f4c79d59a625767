"""The backup_manifest a PG15 server sends with a base backup, byte for byte.

Layout from src/backend/backup/backup_manifest.c: a version line, one JSON
object per file (path, size, mtime, checksum), the WAL ranges, then a
SHA-256 over all of that text. Checksums are computed as in
src/common/checksum_helper.c: CRC-32C is hex of its four bytes in memory
order (little-endian), the SHA-2 family hex of the digest.
pg_verifybackup reads it back.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Any, Final

import google_crc32c

CHECKSUM_ALGORITHMS: Final = ("NONE", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512")


class _Crc32c:
    def __init__(self) -> None:
        self._crc = google_crc32c.Checksum()

    def update(self, data: bytes) -> None:
        self._crc.update(data)

    def digest(self) -> bytes:
        return struct.pack("<I", int.from_bytes(self._crc.digest(), "big"))


def _new_checksum(algorithm: str) -> Any:
    if algorithm == "CRC32C":
        return _Crc32c()
    if algorithm == "NONE":
        return None
    return hashlib.new(algorithm.lower())


_JSON_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                        "\t": "\\t"}


def _escape_json(s: str) -> str:
    """Postgres's escape_json (src/backend/utils/adt/json.c): short escapes, \\u00XX for other controls."""
    out = ['"']
    for ch in s:
        if ch in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class ManifestBuilder:
    """Add files (streamed or whole) and WAL ranges, then `render()` the manifest."""

    def __init__(self, checksum: str = "CRC32C", *, force_encode: bool = False) -> None:
        checksum = checksum.upper()
        if checksum not in CHECKSUM_ALGORITHMS:
            raise ValueError(f"unknown manifest checksum algorithm {checksum!r}")
        self.checksum = checksum
        self.force_encode = force_encode
        self._files: list[str] = []
        self._wal: list[str] = []
        self._open: tuple[str, int] | None = None
        self._size = 0
        self._ctx: Any = None

    def begin_file(self, path: str, mtime: int) -> None:
        if self._open is not None:
            raise RuntimeError(f"begin_file({path!r}) while {self._open[0]!r} is open")
        self._open = (path, mtime)
        self._size = 0
        self._ctx = _new_checksum(self.checksum)

    def update(self, data: bytes) -> None:
        if self._open is None:
            raise RuntimeError("update() without begin_file()")
        self._size += len(data)
        if self._ctx is not None:
            self._ctx.update(data)

    def end_file(self) -> None:
        if self._open is None:
            raise RuntimeError("end_file() without begin_file()")
        path, mtime = self._open
        raw = path.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
            valid_utf8 = True
        except UnicodeDecodeError:
            valid_utf8 = False
        if valid_utf8 and not self.force_encode:
            entry = "{ \"Path\": " + _escape_json(path) + ", "
        else:
            entry = "{ \"Encoded-Path\": \"" + raw.hex() + "\", "
        entry += f"\"Size\": {self._size}, "
        entry += "\"Last-Modified\": \"" + time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(mtime)) + "\""
        if self._ctx is not None:
            entry += f", \"Checksum-Algorithm\": \"{self.checksum}\", \"Checksum\": \"{self._ctx.digest().hex()}\""
        entry += " }"
        self._files.append(entry)
        self._open, self._ctx = None, None

    def add_file(self, path: str, data: bytes, mtime: int) -> None:
        self.begin_file(path, mtime)
        self.update(data)
        self.end_file()

    def add_wal_range(self, timeline: int, start_lsn: int, end_lsn: int) -> None:
        self._wal.append(f"{{ \"Timeline\": {timeline}, \"Start-LSN\": \"{_lsn(start_lsn)}\", "
                         f"\"End-LSN\": \"{_lsn(end_lsn)}\" }}")

    def render(self) -> bytes:
        if self._open is not None:
            raise RuntimeError(f"render() while {self._open[0]!r} is open")
        text = "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": ["
        text += "".join(("\n" if i == 0 else ",\n") + f for i, f in enumerate(self._files))
        text += "\n],\n\"WAL-Ranges\": [\n" + ",\n".join(self._wal) + "\n],\n"
        body = text.encode("utf-8", "surrogateescape")
        return body + b"\"Manifest-Checksum\": \"" + hashlib.sha256(body).hexdigest().encode() + b"\"}\n"


def _lsn(lsn: int) -> str:
    """%X/%X without zero padding, as the manifest writes LSNs."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"

