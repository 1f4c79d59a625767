"""Tar archives as a stream: an incremental reader and a Postgres-style ustar writer.

The reader accepts what Python's tarfile and Postgres write (ustar, POSIX pax
'x'/'g' extended headers, GNU 'L'/'K' long names) in chunks of any size and
never holds more than one header (or one bounded extended header) in memory.
The writer produces the headers Postgres's own server writes
(src/port/tar.c, tarCreateHeader), which is all pg_basebackup's parser reads
(src/bin/pg_basebackup/bbstreamer_tar.c: the name only from bytes 0..99).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .errors import FormatError

BLOCK: Final = 512
TAR_END: Final = bytes(2 * BLOCK)  # Postgres 15 terminates each archive with two zero blocks
_MAX_EXTENDED: Final = 1 << 20  # bound on pax / GNU long-name payloads we buffer


class TarFormatError(FormatError):
    """Bytes that are not a tar archive we can read."""


@dataclass(frozen=True, slots=True)
class MemberStart:
    name: str
    size: int
    mode: int
    mtime: int
    kind: str  # 'file' | 'dir' | 'symlink'
    linkname: str = ""


@dataclass(frozen=True, slots=True)
class MemberData:
    data: bytes


@dataclass(frozen=True, slots=True)
class MemberEnd:
    pass


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    pass


TarEvent = MemberStart | MemberData | MemberEnd | ArchiveEnd


def padding_length(size: int) -> int:
    return -size % BLOCK


def tar_padding(size: int) -> bytes:
    """Zeros that fill a member of `size` bytes up to the next block."""
    return bytes(padding_length(size))


def _number(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":  # base-256, for values too big for octal
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"tar header {what} is not an octal number: {field!r}") from None


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 0x20 + sum(header[156:])


def _text(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class TarStreamParser:
    """Feed bytes, get events; `close()` checks the archive ended where it should."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "header"  # header | data | pad | extended | ended
        self._remaining = 0
        self._pad = 0
        self._ext_kind = ""
        self._ext = bytearray()
        self._pending: dict[str, str] = {}  # from pax / GNU headers, for the next member

    def feed(self, data: bytes) -> list[TarEvent]:
        events: list[TarEvent] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._state == "data":
                n = min(self._remaining, len(view) - pos)
                events.append(MemberData(bytes(view[pos:pos + n])))
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    events.append(MemberEnd())
                    self._state = "pad" if self._pad else "header"
                continue
            if self._state == "pad":
                n = min(self._pad, len(view) - pos)
                pos += n
                self._pad -= n
                if self._pad == 0:
                    self._state = "header"
                continue
            if self._state == "extended":
                n = min(self._remaining, len(view) - pos)
                self._ext += view[pos:pos + n]
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    self._apply_extended()
                    self._state = "pad" if self._pad else "header"
                continue
            if self._state == "ended":
                rest = view[pos:]
                if any(rest):
                    raise TarFormatError("data after the end of the tar archive")
                break
            need = BLOCK - len(self._buf)
            self._buf += view[pos:pos + need]
            pos += min(need, len(view) - pos)
            if len(self._buf) == BLOCK:
                header = bytes(self._buf)
                self._buf.clear()
                events.extend(self._header(header))
        return events

    def close(self) -> list[TarEvent]:
        """End of input: complete only after a member (or the end-of-archive blocks)."""
        if self._state == "ended":
            return []
        if self._state == "header" and not self._buf and not self._pending:
            self._state = "ended"
            return [ArchiveEnd()]
        raise TarFormatError("tar archive is truncated")

    def _header(self, header: bytes) -> list[TarEvent]:
        if not any(header):
            self._state = "ended"
            return [ArchiveEnd()]
        stored = _number(header[148:156], "checksum")
        if stored != _checksum(header) and stored != _signed_checksum(header):
            raise TarFormatError(f"tar header checksum mismatch for {_text(header[:100])!r}")
        size = _number(header[124:136], "size")
        typeflag = header[156:157]
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > _MAX_EXTENDED:
                raise TarFormatError(f"tar extended header of {size} bytes is too large")
            self._ext_kind = typeflag.decode()
            self._ext = bytearray()
            self._remaining, self._pad = size, padding_length(size)
            if size == 0:
                self._apply_extended()
                return []
            self._state = "extended"
            return []
        name = _text(header[0:100])
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = _text(header[345:500]) + "/" + name
        linkname = _text(header[157:257])
        mtime = _number(header[136:148], "mtime")
        pending, self._pending = self._pending, {}
        name = pending.get("path", name)
        linkname = pending.get("linkpath", linkname)
        if "size" in pending:
            size = _pax_int(pending["size"], "size")
        if "mtime" in pending:
            mtime = int(float(pending["mtime"]))
        if typeflag in (b"0", b"\0", b"7"):
            kind = "file"
        elif typeflag == b"5":
            kind, size = "dir", 0
        elif typeflag == b"2":
            kind, size = "symlink", 0
        else:
            raise TarFormatError(f"unsupported tar member type {typeflag!r} for {name!r}")
        if not name:
            raise TarFormatError("tar member has an empty name")
        start = MemberStart(name.rstrip("/") if kind in ("dir", "symlink") else name, size, _number(header[100:108], "mode"),
                            mtime, kind, linkname)
        if size == 0:
            return [start, MemberEnd()]
        self._state, self._remaining, self._pad = "data", size, padding_length(size)
        return [start]

    def _apply_extended(self) -> None:
        payload = bytes(self._ext)
        kind = self._ext_kind
        if kind == "L":
            self._pending["path"] = _text(payload)
        elif kind == "K":
            self._pending["linkpath"] = _text(payload)
        elif kind == "x":
            self._pending.update(_pax_records(payload))
        # 'g' (global pax header) carries nothing we use


def _signed_checksum(header: bytes) -> int:
    """Old tars summed signed chars; tarfile accepts either, so do we."""
    def s(b: bytes) -> int:
        return sum(x - 256 if x > 127 else x for x in b)
    return s(header[:148]) + 8 * 0x20 + s(header[156:])


def _pax_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TarFormatError(f"pax {what} is not a number: {text!r}") from None
    if value < 0:
        raise TarFormatError(f"pax {what} is negative")
    return value


def _pax_records(payload: bytes) -> dict[str, str]:
    """'<len> <key>=<value>\\n' records (POSIX.1-2001 pax format)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space < 0:
            raise TarFormatError("malformed pax record")
        length = _pax_int(payload[pos:space].decode("ascii", "replace"), "record length")
        record = payload[pos:pos + length]
        if length <= space - pos or len(record) != length or not record.endswith(b"\n"):
            raise TarFormatError("malformed pax record")
        key, eq, value = record[space - pos + 1:-1].partition(b"=")
        if not eq:
            raise TarFormatError("malformed pax record")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _octal(value: int, width: int) -> bytes:
    """Postgres's print_tar_number: octal and a trailing space, or base-256 when too big."""
    if value < 1 << ((width - 1) * 3):
        return f"{value:0{width - 1}o} ".encode()
    return b"\x80" + value.to_bytes(width - 1, "big")


def ustar_header(name: str, size: int, *, mode: int, mtime: int, kind: str = "file", linkname: str = "") -> bytes:
    """A 512-byte ustar header as Postgres writes it (tarCreateHeader)."""
    raw = name.encode("utf-8", "surrogateescape")
    link = linkname.encode("utf-8", "surrogateescape")
    if len(raw) > 99:
        raise TarFormatError(f"file name too long for tar format: {name!r}")
    if len(link) > 99:
        raise TarFormatError(f"symbolic link target too long for tar format: {linkname!r}")
    if kind in ("dir", "symlink"):
        raw += b"/"  # Postgres marks directories (and links to them) with a trailing slash
        size = 0
    typeflag = {"file": b"0", "dir": b"5", "symlink": b"2"}.get(kind)
    if typeflag is None:
        raise ValueError(f"unknown tar member kind {kind!r}")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(mode & 0o7777, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(max(0, mtime), 12)
    h[156:157] = typeflag
    if kind == "symlink":
        h[157:157 + len(link)] = link
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[265:273] = b"postgres"
    h[297:305] = b"postgres"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[148:156] = _octal(_checksum(bytes(h)), 8)
    return bytes(h)
