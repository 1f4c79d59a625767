"""The backup_manifest file of PostgreSQL 15, byte for byte as the server writes it.

Follows src/backend/backup/backup_manifest.c (`InitializeBackupManifest`,
`AddFileToBackupManifest`, `AddWALInfoToBackupManifest`,
`SendBackupManifest`) and src/common/checksum_helper.c:

- the text is built by appending fixed fragments; files are separated by
  ",\\n", WAL ranges likewise;
- a path that is valid UTF-8 is written as a JSON string with `escape_json`
  (src/backend/utils/adt/json.c: only '"', '\\\\' and bytes below 0x20 are
  escaped; every other byte is copied), any other path as "Encoded-Path" in
  lower-case hex;
- Last-Modified is the file's mtime in GMT, "%Y-%m-%d %H:%M:%S GMT";
- a file's checksum is hex of `pg_checksum_final`'s output: for CRC-32C the
  four bytes of the finished CRC in the server's byte order (little-endian
  on every platform we run), for SHA-2 the digest;
- LSNs are "%X/%X" (no zero padding, unlike `format_lsn`);
- "Manifest-Checksum" is SHA-256 over every byte before it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final, Protocol

import google_crc32c

from .errors import ManifestError

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "ManifestBuilder",
    "ManifestError",
    "ManifestFile",
    "format_manifest_time",
]

# pg_checksum_type_name() spellings, in pg_checksum_type order.
CHECKSUM_ALGORITHMS: Final = ("NONE", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512")

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MAX_U32: Final = 0xFFFFFFFF
_MAX_U64: Final = 0xFFFFFFFFFFFFFFFF

# escape_json's table: the five short escapes, other control bytes as \u00xx.
_JSON_ESCAPES: Final = {
    0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t",
    0x22: b'\\"', 0x5C: b"\\\\",
}


class _Checksum(Protocol):
    def update(self, data: bytes) -> None: ...

    def digest(self) -> bytes: ...


class _NoChecksum:
    def update(self, data: bytes) -> None:
        pass

    def digest(self) -> bytes:
        return b""


class _Crc32c:
    """CRC-32C as checksum_helper.c keeps it: INIT/COMP/FIN_CRC32C, then memcpy of the uint32."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes) -> None:
        self._crc = google_crc32c.extend(self._crc, data)

    def digest(self) -> bytes:
        return int(self._crc).to_bytes(4, "little")


def _new_checksum(algorithm: str) -> _Checksum:
    if algorithm == "NONE":
        return _NoChecksum()
    if algorithm == "CRC32C":
        return _Crc32c()
    return hashlib.new(algorithm.lower())


def _escape_json(raw: bytes) -> bytes:
    """escape_json() of src/backend/utils/adt/json.c, over bytes."""
    out = bytearray(b'"')
    for byte in raw:
        esc = _JSON_ESCAPES.get(byte)
        if esc is not None:
            out += esc
        elif byte < 0x20:
            out += b"\\u%04x" % byte
        else:
            out.append(byte)
    out += b'"'
    return bytes(out)


def _is_utf8(raw: bytes) -> bool:
    # pg_verify_mbstr(PG_UTF8, ...) accepts exactly well-formed UTF-8
    # (pg_utf8_islegal: no overlongs, no surrogates, nothing above
    # U+10FFFF) without NUL bytes, which is what Python's strict codec
    # accepts; NULs are refused before we get here.
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def format_manifest_time(mtime: int) -> str:
    """pg_strftime("%Y-%m-%d %H:%M:%S %Z", pg_gmtime(&mtime)), e.g. "2024-01-31 12:00:00 GMT"."""
    try:
        t = _EPOCH + timedelta(seconds=mtime)
    except OverflowError:
        raise ManifestError(f"mtime {mtime} out of range") from None
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}:{t.second:02d} GMT"


def _format_lsn(lsn: int) -> bytes:
    # LSN_FORMAT_ARGS with "%X/%X": upper-case hex halves, no padding.
    return b"%X/%X" % (lsn >> 32, lsn & _MAX_U32)


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One "Files" entry as written."""

    path: bytes
    size: int
    mtime: int
    checksum: bytes  # raw checksum bytes; empty for NONE


class ManifestBuilder:
    """Build a backup_manifest as a PG15 server would for the same files and WAL range.

    Files go in the order they are added (the server adds them in the order
    it sends them); then one or more WAL ranges, newest timeline first as
    the server lists them; then `render()`. A file's contents can be
    streamed (`begin_file`, `update`..., `end_file`) or given whole
    (`add_file`). Paths are relative to the data directory, as `str` (non
    UTF-8 bytes as surrogate escapes, like os.fsdecode) or `bytes`.
    `force_encode=True` is the MANIFEST 'force-encode' option: every path
    becomes an Encoded-Path.
    """

    def __init__(self, checksum: str = "CRC32C", *, force_encode: bool = False) -> None:
        algorithm = checksum.upper()  # pg_checksum_parse_type is case-insensitive
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise ManifestError(f"unknown manifest checksum algorithm {checksum!r}")
        self.checksum_algorithm = algorithm
        self.force_encode = force_encode
        self._parts: list[bytes] = [b'{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [']
        self._files = 0
        self._wal_ranges = 0
        self._open: tuple[bytes, int] | None = None
        self._size = 0
        self._checksum: _Checksum = _NoChecksum()

    @property
    def file_count(self) -> int:
        return self._files

    # -- files -------------------------------------------------------------

    def begin_file(self, path: str | bytes, mtime: int) -> None:
        if self._open is not None:
            raise ManifestError(f"begin_file({path!r}) while {self._open[0]!r} is still open")
        if self._wal_ranges:
            raise ManifestError("files must be added before the WAL ranges")
        raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
        if not raw or b"\x00" in raw:
            raise ManifestError(f"invalid manifest path {raw!r}")
        if not isinstance(mtime, int):
            raise ManifestError(f"mtime must be whole seconds, got {mtime!r}")
        format_manifest_time(mtime)  # range check now, not at end_file
        self._open = (raw, mtime)
        self._size = 0
        self._checksum = _new_checksum(self.checksum_algorithm)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._open is None:
            raise ManifestError("update() without begin_file()")
        self._size += len(data)
        # google_crc32c takes read-only bytes only.
        self._checksum.update(data if isinstance(data, bytes) else bytes(data))

    def end_file(self) -> ManifestFile:
        if self._open is None:
            raise ManifestError("end_file() without begin_file()")
        raw, mtime = self._open
        self._open = None
        entry = ManifestFile(path=raw, size=self._size, mtime=mtime, checksum=self._checksum.digest())
        self._parts.append(self._file_line(entry))
        self._files += 1
        return entry

    def add_file(self, path: str | bytes, data: bytes, mtime: int) -> ManifestFile:
        self.begin_file(path, mtime)
        self.update(data)
        return self.end_file()

    def _file_line(self, entry: ManifestFile) -> bytes:
        # AddFileToBackupManifest: the separator ends the previous line.
        out = bytearray(b"\n" if self._files == 0 else b",\n")
        if not self.force_encode and _is_utf8(entry.path):
            out += b'{ "Path": ' + _escape_json(entry.path) + b", "
        else:
            out += b'{ "Encoded-Path": "' + entry.path.hex().encode() + b'", '
        out += b'"Size": %d, ' % entry.size
        out += b'"Last-Modified": "' + format_manifest_time(entry.mtime).encode() + b'"'
        if self.checksum_algorithm != "NONE":
            out += b', "Checksum-Algorithm": "' + self.checksum_algorithm.encode() + b'", "Checksum": "'
            out += entry.checksum.hex().encode() + b'"'
        out += b" }"
        return bytes(out)

    # -- WAL and the end ---------------------------------------------------

    def add_wal_range(self, timeline: int, start_lsn: int, end_lsn: int) -> None:
        """One "WAL-Ranges" entry; call once per timeline, newest first (AddWALInfoToBackupManifest)."""
        if self._open is not None:
            raise ManifestError(f"add_wal_range() while {self._open[0]!r} is still open")
        if not 1 <= timeline <= _MAX_U32:
            raise ManifestError(f"invalid timeline {timeline}")
        if not 0 <= start_lsn <= end_lsn <= _MAX_U64:
            raise ManifestError(f"invalid WAL range {start_lsn:#x}..{end_lsn:#x}")
        if self._wal_ranges == 0:
            self._parts.append(b'\n],\n"WAL-Ranges": [\n')
        self._parts.append(
            b'%s{ "Timeline": %d, "Start-LSN": "%s", "End-LSN": "%s" }'
            % (b",\n" if self._wal_ranges else b"", timeline, _format_lsn(start_lsn), _format_lsn(end_lsn))
        )
        self._wal_ranges += 1

    def render(self) -> bytes:
        """The whole manifest, ending in its SHA-256 "Manifest-Checksum" and a newline."""
        if self._open is not None:
            raise ManifestError(f"render() while {self._open[0]!r} is still open")
        if not self._wal_ranges:
            # The server always writes at least the backup's own timeline.
            raise ManifestError("render() before add_wal_range()")
        body = b"".join(self._parts) + b"\n],\n"
        digest = hashlib.sha256(body).hexdigest().encode()
        return body + b'"Manifest-Checksum": "' + digest + b'"}\n'
