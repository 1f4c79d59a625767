"""Tar archives as a stream of events, and the ustar headers Postgres 15 reads.

Reader: `TarStreamParser` takes a tar stream in chunks of any size and turns
it into events (`MemberStart`, `MemberData`, `MemberEnd`, `ArchiveEnd`).
It holds at most one 512-byte header, or one extended header (bounded by
`MAX_EXTENDED_HEADER`), never a member's contents. It reads ustar headers
(what Postgres's `tarCreateHeader` in src/port/tar.c writes), POSIX pax
extended headers ('x'; global 'g' ones are skipped) and GNU long names
('L' / 'K'): everything Python's `tarfile` writes in PAX, GNU and USTAR
formats for regular files, directories and symbolic links.

Writer: `ustar_header`, `tar_padding` and `TAR_END` produce what the
Postgres 15 client (`bbstreamer_tar_parser` in
src/bin/pg_basebackup/bbstreamer_tar.c) expects from a server: plain ustar
headers whose name fits the 100-byte name field (the client never reads the
prefix field nor pax headers), data padded to 512 bytes, and two zero blocks
at the end of the archive.

Names are `str`; bytes that are not UTF-8 travel as surrogate escapes
(`os.fsdecode` style), so a name read here and passed on to the manifest
builder or the writer turns back into the same bytes.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from .errors import TarFormatError

__all__ = [
    "MAX_EXTENDED_HEADER",
    "TAR_BLOCK_SIZE",
    "TAR_END",
    "ArchiveEnd",
    "MemberData",
    "MemberEnd",
    "MemberKind",
    "MemberStart",
    "TarEvent",
    "TarFormatError",
    "TarStreamParser",
    "iter_tar",
    "tar_padding",
    "ustar_header",
]

TAR_BLOCK_SIZE: Final = 512
# Postgres 15 servers end each archive with two zero blocks (basebackup.c,
# "Properly terminate the tar file"); one zero block is where a reader stops.
TAR_END: Final = bytes(2 * TAR_BLOCK_SIZE)
# The largest pax or GNU long-name body we buffer. Real ones hold a path or
# two; anything bigger is hostile input, not a tar we need to read.
MAX_EXTENDED_HEADER: Final = 1 << 20

MemberKind = Literal["file", "dir", "symlink"]

# Header layout (POSIX ustar; src/port/tar.c fills the same offsets).
_NAME = slice(0, 100)
_MODE = slice(100, 108)
_UID = slice(108, 116)
_GID = slice(116, 124)
_SIZE = slice(124, 136)
_MTIME = slice(136, 148)
_CHKSUM = slice(148, 156)
_TYPEFLAG = 156
_LINKNAME = slice(157, 257)
_MAGIC = slice(257, 263)
_VERSION = slice(263, 265)
_UNAME = slice(265, 297)
_GNAME = slice(297, 329)
_DEVMAJOR = slice(329, 337)
_DEVMINOR = slice(337, 345)
_PREFIX = slice(345, 500)

_POSIX_MAGIC: Final = b"ustar\x00"
_ZERO_BLOCK: Final = bytes(TAR_BLOCK_SIZE)
_SIGNED_BYTES = struct.Struct("148b8x356b")

# Type flags (POSIX and GNU). Postgres writes only '0', '2' and '5'.
_REGULAR_TYPES: Final = frozenset(b"07\x00")
_DIR_TYPE: Final = ord("5")
_SYMLINK_TYPE: Final = ord("2")
_PAX_TYPE: Final = ord("x")
_PAX_GLOBAL_TYPE: Final = ord("g")
_GNU_LONGNAME_TYPE: Final = ord("L")
_GNU_LONGLINK_TYPE: Final = ord("K")
_EXTENSION_TYPES: Final = frozenset((_PAX_TYPE, _PAX_GLOBAL_TYPE, _GNU_LONGNAME_TYPE, _GNU_LONGLINK_TYPE))
_TYPE_NAMES: Final = {
    ord("1"): "hard link",
    ord("3"): "character device",
    ord("4"): "block device",
    ord("6"): "FIFO",
    ord("S"): "GNU sparse file",
    ord("D"): "GNU dump directory",
    ord("M"): "GNU multi-volume continuation",
    ord("V"): "GNU volume label",
}

_PAX_MTIME = re.compile(rb"(-?)(\d+)(?:\.\d*)?")


@dataclass(frozen=True, slots=True)
class MemberStart:
    """A member's header, after any pax or GNU extended header was applied.

    `name` never ends with '/' for directories and symbolic links (Postgres
    writes both with a trailing slash); `size` is 0 for them. `mode` holds
    the permission bits only, `mtime` whole seconds since the epoch.
    """

    name: str
    size: int
    mode: int
    mtime: int
    kind: MemberKind
    linkname: str = ""


@dataclass(frozen=True, slots=True)
class MemberData:
    """Part of the current member's contents (never empty, never padding)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MemberEnd:
    """The current member's contents are complete."""


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    """The first zero block: the archive is over (only zero bytes may follow)."""


TarEvent = MemberStart | MemberData | MemberEnd | ArchiveEnd


def _decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode_name(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")


def _cstring(field: bytes) -> bytes:
    """A NUL-terminated string in a fixed-size field (the field may be full)."""
    end = field.find(0)
    return field if end < 0 else field[:end]


def _read_number(field: bytes, what: str, offset: int) -> int:
    """Read a numeric header field as `read_tar_number` (src/port/tar.c) does, but strictly.

    Octal digits, optionally surrounded by spaces and ended by NUL or space;
    an empty field is 0. A first byte of 0x80 marks GNU base-256 (big-endian
    binary in the remaining bytes), which Postgres and tarfile write for
    values too large for octal. Negative base-256 numbers are refused.
    """
    first = field[0]
    if first & 0x80:
        if first != 0x80:
            raise TarFormatError(f"negative or malformed base-256 {what} field {field!r}", offset)
        return int.from_bytes(field[1:], "big")
    text = _cstring(field).strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise TarFormatError(f"non-octal {what} field {field!r}", offset)
    return int(text, 8)


def _checksum_matches(block: bytes, offset: int) -> bool:
    """POSIX: the sum of the header's bytes with the checksum field read as 8 spaces.

    Old tar implementations summed signed chars; Python's tarfile accepts
    either sum, and so do we.
    """
    stored = _read_number(block[_CHKSUM], "checksum", offset)
    unsigned = sum(block) - sum(block[_CHKSUM]) + 8 * 0x20
    if stored == unsigned:
        return True
    return stored == sum(_SIGNED_BYTES.unpack(block)) + 8 * 0x20


def _parse_pax(body: bytes, offset: int) -> dict[str, bytes]:
    """Records of the form "<length> <keyword>=<value>\\n" (POSIX.1-2001 pax)."""
    records: dict[str, bytes] = {}
    pos = 0
    # Like tarfile, a NUL where a record would start ends the list.
    while pos < len(body) and body[pos] != 0:
        space = body.find(b" ", pos, pos + 20)
        digits = body[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarFormatError(f"malformed pax record length at byte {pos} of the pax header", offset)
        length = int(digits)
        end = pos + length
        if end > len(body) or end <= space + 1 or body[end - 1] != 0x0A:
            raise TarFormatError(f"pax record at byte {pos} overruns its header or lacks its newline", offset)
        keyword, eq, value = body[space + 1:end - 1].partition(b"=")
        if not eq or not keyword:
            raise TarFormatError(f"pax record at byte {pos} has no keyword=value", offset)
        try:
            key = keyword.decode("utf-8")
        except UnicodeDecodeError:
            raise TarFormatError(f"pax keyword {keyword!r} is not UTF-8", offset) from None
        records[key] = value
        pos = end
    return records


def _pax_size(value: bytes, offset: int) -> int:
    if not value.isdigit():
        raise TarFormatError(f"pax size {value!r} is not a decimal number", offset)
    return int(value)


def _pax_mtime(value: bytes, offset: int) -> int:
    """Whole seconds of a pax time ("1700000000.123456"), rounded down like st_mtime."""
    m = _PAX_MTIME.fullmatch(value)
    if m is None:
        raise TarFormatError(f"pax mtime {value!r} is not a decimal number", offset)
    seconds = int(m.group(2))
    if m.group(1):
        fraction = m.group(0)[len(m.group(1)) + len(m.group(2)):]
        return -seconds - (1 if fraction.strip(b".0") else 0)
    return seconds


# Parser states.
_HEADER, _EXTENSION, _DATA, _SKIP, _END = range(5)


class TarStreamParser:
    """Turn a tar stream, fed in chunks of any size, into `TarEvent`s.

    Each member gives `MemberStart`, zero or more `MemberData` (a regular
    file's contents, without padding) and `MemberEnd`; the first zero block
    gives `ArchiveEnd`; after it only zero bytes may follow (tarfile pads
    the archive to a 10 KiB record).

    Padding must be zero bytes, as every writer we know (Postgres, tarfile,
    GNU tar) writes it: a non-zero byte there means a member's size is
    wrong. Bad input raises `TarFormatError` with the stream offset of the
    header (or byte) at fault; so does `close()` when the stream stops
    before `ArchiveEnd`. After an error the parser is dead: every later
    call raises the same error.
    """

    def __init__(self) -> None:
        self._state = _HEADER
        self._buf = bytearray()  # a header block or an extension body, being gathered
        self._need = TAR_BLOCK_SIZE  # how long _buf must get in _HEADER / _EXTENSION
        self._remaining = 0  # data bytes left (_DATA) or bytes to skip (_SKIP)
        self._skip_zeros = True  # whether the bytes _SKIP skips must be zero (padding)
        self._pad = 0  # padding after the current member's data or extension body
        self._ext_type = 0  # typeflag of the extension being gathered
        self._pax: dict[str, bytes] = {}
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._offset = 0  # bytes consumed so far
        self._block_offset = 0  # where the block being gathered started
        self._error: TarFormatError | None = None
        self._closed = False

    @property
    def offset(self) -> int:
        """Bytes fed so far."""
        return self._offset

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[TarEvent]:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise TarFormatError("feed() after close()", self._offset)
        events: list[TarEvent] = []
        view = memoryview(chunk).cast("B")
        try:
            self._consume(view, events)
        except TarFormatError as e:
            self._error = e
            raise
        return events

    def close(self) -> None:
        """Check that the stream ended after the archive's end marker."""
        if self._error is not None:
            raise self._error
        self._closed = True
        if self._state != _END:
            where = {
                _HEADER: "a header" if self._buf else "the next header or the end-of-archive marker",
                _EXTENSION: "an extended header",
                _DATA: "a member's contents",
                _SKIP: "padding",
            }[self._state]
            self._error = TarFormatError(f"stream truncated in {where}", self._offset)
            raise self._error

    # -- the state machine ---------------------------------------------------

    def _consume(self, view: memoryview, events: list[TarEvent]) -> None:
        pos = 0
        n = len(view)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - pos)
                events.append(MemberData(view[pos:pos + take].tobytes()))
                self._advance(take)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    events.append(MemberEnd())
                    self._skip_then_header(self._pad)
            elif state == _SKIP:
                take = min(self._remaining, n - pos)
                if self._skip_zeros:
                    skipped = view[pos:pos + take].tobytes()
                    if skipped.count(0) != take:
                        first = take - len(skipped.lstrip(b"\x00"))
                        raise TarFormatError("non-zero padding after a member (its size is wrong)",
                                             self._offset + first)
                self._advance(take)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._expect_header()
            elif state == _END:
                rest = view[pos:].tobytes()
                nonzero = len(rest) - len(rest.lstrip(b"\x00"))
                if nonzero < len(rest):
                    raise TarFormatError("non-zero data after the end-of-archive marker", self._offset + nonzero)
                self._advance(len(rest))
                pos = n
            else:  # _HEADER or _EXTENSION: gather self._need bytes
                if not self._buf:
                    self._block_offset = self._offset
                take = min(self._need - len(self._buf), n - pos)
                self._buf += view[pos:pos + take]
                self._advance(take)
                pos += take
                if len(self._buf) == self._need:
                    block = bytes(self._buf)
                    self._buf.clear()
                    if state == _HEADER:
                        self._on_header(block, events)
                    else:
                        self._on_extension(block)

    def _advance(self, count: int) -> None:
        self._offset += count

    def _expect_header(self) -> None:
        self._state = _HEADER
        self._need = TAR_BLOCK_SIZE

    def _skip_then_header(self, count: int, *, zeros: bool = True) -> None:
        """Skip `count` bytes (which must be zero padding unless zeros=False), then read a header."""
        if count:
            self._state = _SKIP
            self._remaining = count
            self._skip_zeros = zeros
        else:
            self._expect_header()

    def _pending_extension(self) -> bool:
        return bool(self._pax) or self._long_name is not None or self._long_link is not None

    def _on_header(self, block: bytes, events: list[TarEvent]) -> None:
        at = self._block_offset
        if block == _ZERO_BLOCK:
            if self._pending_extension():
                raise TarFormatError("extended header not followed by a member", at)
            self._state = _END
            events.append(ArchiveEnd())
            return
        if not _checksum_matches(block, at):
            raise TarFormatError("header checksum mismatch (not a tar header, or a corrupt one)", at)
        typeflag = block[_TYPEFLAG]
        size = _read_number(block[_SIZE], "size", at)

        if typeflag in _EXTENSION_TYPES:
            if size > MAX_EXTENDED_HEADER:
                raise TarFormatError(f"extended header of {size} bytes exceeds {MAX_EXTENDED_HEADER}", at)
            pad = -size % TAR_BLOCK_SIZE
            if typeflag == _PAX_GLOBAL_TYPE:
                # Global pax headers (tarfile writes one for pax_headers=...) carry
                # nothing Postgres or we use; skip the body unread.
                self._skip_then_header(size + pad, zeros=False)
                return
            self._ext_type = typeflag
            self._pad = pad
            if size:
                self._state = _EXTENSION
                self._need = size
            else:
                self._on_extension(b"")
            return

        raw_name = _cstring(block[_NAME])
        if block[_MAGIC] == _POSIX_MAGIC:
            prefix = _cstring(block[_PREFIX])
            if prefix:
                raw_name = prefix + b"/" + raw_name
        raw_link = _cstring(block[_LINKNAME])
        mode = _read_number(block[_MODE], "mode", at) & 0o7777
        mtime = _read_number(block[_MTIME], "mtime", at)

        kind: MemberKind
        if typeflag in _REGULAR_TYPES:
            # Old tars mark directories as regular files whose name ends in '/'.
            kind = "dir" if typeflag == 0 and raw_name.endswith(b"/") else "file"
        elif typeflag == _DIR_TYPE:
            kind = "dir"
        elif typeflag == _SYMLINK_TYPE:
            kind = "symlink"
        else:
            what = _TYPE_NAMES.get(typeflag, f"type {bytes([typeflag])!r}")
            raise TarFormatError(f"unsupported member: {what}", at)

        if self._long_name is not None:
            raw_name = self._long_name
        if self._long_link is not None:
            raw_link = self._long_link
        pax = self._pax
        if pax:
            if pax.get("path"):
                raw_name = pax["path"]
            if pax.get("linkpath"):
                raw_link = pax["linkpath"]
            if pax.get("size"):
                size = _pax_size(pax["size"], at)
            if pax.get("mtime"):
                mtime = _pax_mtime(pax["mtime"], at)
            sparse = [k for k in pax if k.startswith("GNU.sparse.")]
            if sparse:
                raise TarFormatError("unsupported member: GNU sparse file (pax)", at)
        self._pax = {}
        self._long_name = self._long_link = None

        if kind != "file":
            raw_name = raw_name.rstrip(b"/")
            if size:
                raise TarFormatError(f"a {kind} header with a size of {size}", at)
        if not raw_name:
            raise TarFormatError("member with an empty name", at)
        if kind == "symlink" and not raw_link:
            raise TarFormatError("symbolic link with an empty target", at)
        events.append(MemberStart(
            name=_decode_name(raw_name), size=size, mode=mode, mtime=mtime, kind=kind,
            linkname=_decode_name(raw_link) if kind == "symlink" else "",
        ))
        if size:
            self._state = _DATA
            self._remaining = size
            self._pad = -size % TAR_BLOCK_SIZE
        else:
            events.append(MemberEnd())
            self._expect_header()

    def _on_extension(self, body: bytes) -> None:
        at = self._block_offset
        if self._ext_type == _PAX_TYPE:
            self._pax.update(_parse_pax(body, at))
        elif self._ext_type == _GNU_LONGNAME_TYPE:
            self._long_name = _cstring(body)
        else:
            self._long_link = _cstring(body)
        self._skip_then_header(self._pad)


def iter_tar(chunks: Iterable[bytes]) -> Iterator[TarEvent]:
    """Events of a whole stream given as chunks; raises TarFormatError if it is cut short."""
    parser = TarStreamParser()
    for chunk in chunks:
        yield from parser.feed(chunk)
    parser.close()


# -- writer ------------------------------------------------------------------


def _print_number(header: bytearray, field: slice, value: int, what: str) -> None:
    """`print_tar_number` (src/port/tar.c): octal with one trailing space, else GNU base-256."""
    length = field.stop - field.start
    if value < 0:
        raise TarFormatError(f"negative {what} {value}")
    if value < 1 << ((length - 1) * 3):
        header[field] = b"%0*o " % (length - 1, value)
    elif value < 1 << ((length - 1) * 8):
        header[field] = b"\x80" + value.to_bytes(length - 1, "big")
    else:
        raise TarFormatError(f"{what} {value} does not fit a tar header")


def ustar_header(
    name: str | bytes,
    size: int,
    *,
    mode: int,
    mtime: int,
    kind: MemberKind = "file",
    linkname: str | bytes = "",
    uid: int = 0,
    gid: int = 0,
) -> bytes:
    """One 512-byte ustar header laid out as `tarCreateHeader` (src/port/tar.c) lays it out.

    Directories and symbolic links get a trailing '/' and size 0, as Postgres
    writes them; `mode` may be a full st_mode (only the permission bits are
    kept). The Postgres 15 client reads the name only from the 100-byte name
    field, as a C string, so a name (with its slash) or link target longer
    than 99 bytes raises TarFormatError rather than being split into the
    prefix field.
    """
    raw_name = _encode_name(name)
    raw_link = _encode_name(linkname)
    if not raw_name:
        raise TarFormatError("empty member name")
    if b"\x00" in raw_name or b"\x00" in raw_link:
        raise TarFormatError(f"NUL byte in member name {raw_name!r} or link target")
    if kind == "file":
        if raw_link:
            raise TarFormatError(f"a link target for regular file {raw_name!r}")
    elif kind in ("dir", "symlink"):
        if size:
            raise TarFormatError(f"{kind} {raw_name!r} with a size of {size}")
        if not raw_name.endswith(b"/"):
            raw_name += b"/"
        if (kind == "symlink") != bool(raw_link):
            raise TarFormatError(f"{kind} {raw_name!r}: a link target is required for symlinks only")
    else:
        raise TarFormatError(f"unknown member kind {kind!r}")
    if len(raw_name) > 99:
        raise TarFormatError(f"member name {raw_name!r} is longer than the 99 bytes Postgres reads")
    if len(raw_link) > 99:
        raise TarFormatError(f"link target {raw_link!r} is longer than the 99 bytes Postgres reads")

    h = bytearray(TAR_BLOCK_SIZE)
    h[0:len(raw_name)] = raw_name
    _print_number(h, _MODE, mode & 0o7777, "mode")
    _print_number(h, _UID, uid, "uid")
    _print_number(h, _GID, gid, "gid")
    _print_number(h, _SIZE, size, "size")
    _print_number(h, _MTIME, mtime, "mtime")
    h[_TYPEFLAG] = {"file": ord("0"), "dir": _DIR_TYPE, "symlink": _SYMLINK_TYPE}[kind]
    h[157:157 + len(raw_link)] = raw_link
    h[_MAGIC] = _POSIX_MAGIC
    h[_VERSION] = b"00"
    # Postgres always names the owner "postgres" (tar.c: "XXX: Do we need to
    # care about setting correct username?").
    h[_UNAME.start:_UNAME.start + 8] = b"postgres"
    h[_GNAME.start:_GNAME.start + 8] = b"postgres"
    _print_number(h, _DEVMAJOR, 0, "devmajor")
    _print_number(h, _DEVMINOR, 0, "devminor")
    h[_CHKSUM] = b" " * 8
    _print_number(h, _CHKSUM, sum(h), "checksum")
    return bytes(h)


def tar_padding(size: int) -> bytes:
    """Zero bytes that pad `size` bytes of contents to a whole block (`tarPaddingBytesRequired`)."""
    return bytes(-size % TAR_BLOCK_SIZE)
