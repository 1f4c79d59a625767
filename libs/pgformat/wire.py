"""The Postgres frontend/backend protocol, version 3: framing and messages.

No I/O: `MessageParser` turns received bytes into (type, body) pairs and the
`parse_*` functions decode bodies; the builder functions return the bytes of
one backend message. Layouts follow the protocol chapter of the Postgres
documentation ("Message Formats") and src/backend/libpq/pqformat.c; the
SQLSTATE codes are those of src/backend/utils/errcodes.txt.

Integers on the wire are big-endian; strings are NUL-terminated.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from .errors import FormatError

PROTOCOL_V3: Final = 3 << 16  # 196608
# Special "protocol versions" a client sends instead of a startup message
# (src/include/libpq/pqcomm.h).
CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680

# Postgres refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET_LENGTH: Final = 10000

# Type OIDs used in RowDescriptions (src/include/catalog/pg_type.dat).
BOOL_OID: Final = 16
INT8_OID: Final = 20
INT4_OID: Final = 23
TEXT_OID: Final = 25
OID_OID: Final = 26

# ReadyForQuery transaction states.
TX_IDLE: Final = b"I"


class ProtocolError(FormatError):
    """Bytes from a client that break the protocol (SQLSTATE 08P01)."""


# --------------------------------------------------------------- startup phase


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first message of a session: protocol version and parameters."""

    protocol: int
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS before the startup message."""


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    """The client asks for GSSAPI encryption before the startup message."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Sent on a fresh connection: cancel what the session (pid, key) is running."""

    pid: int
    secret: int


StartupPacket = StartupMessage | SSLRequest | GSSEncRequest | CancelRequest


def startup_packet_length(header: bytes) -> int:
    """The body length announced by a startup packet's 4-byte length word."""
    if len(header) != 4:
        raise ProtocolError("truncated startup packet")
    (length,) = struct.unpack("!I", header)
    if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolError(f"invalid length of startup packet: {length}")
    return length - 4


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Decode a startup-phase packet body (everything after the length word)."""
    if len(body) < 4:
        raise ProtocolError("truncated startup packet")
    (code,) = struct.unpack_from("!I", body)
    if code == SSL_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolError("SSLRequest with a body")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolError("GSSENCRequest with a body")
        return GSSEncRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            raise ProtocolError("CancelRequest of the wrong length")
        pid, secret = struct.unpack_from("!iI", body, 4)
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0")
    # Name/value pairs, each NUL-terminated, ended by an empty name.
    parts = body[4:].split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("startup packet is not NUL-terminated")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolError("startup packet has a parameter name without a value")
    params: dict[str, str] = {}
    for i in range(0, len(items), 2):
        name, value = _text(items[i]), _text(items[i + 1])
        if not name:
            raise ProtocolError("startup packet has an empty parameter name")
        params[name] = value
    if "user" not in params:
        raise ProtocolError("no PostgreSQL user name specified in startup packet")
    return StartupMessage(code, params)


def parse_options(options: str) -> dict[str, str]:
    """GUC settings from the startup `options` parameter (PGOPTIONS).

    Words are separated by whitespace; a backslash escapes the next character
    (pg_split_opts in src/backend/utils/init/postinit.c). Settings are
    `-c name=value`, `-cname=value` or `--name=value`; '-' in a name is '_'.
    """
    words: list[str] = []
    cur: list[str] = []
    in_word = escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
            in_word = True
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        else:
            cur.append(ch)
            in_word = True
    if escaped:
        raise ProtocolError("options end with a lone backslash")
    if in_word:
        words.append("".join(cur))
    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c":
            if i + 1 >= len(words):
                raise ProtocolError("option -c without a setting")
            setting, i = words[i + 1], i + 2
        elif w.startswith("-c"):
            setting, i = w[2:], i + 1
        elif w.startswith("--"):
            setting, i = w[2:], i + 1
        else:
            raise ProtocolError(f"invalid command-line argument for server process: {w}")
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise ProtocolError(f"invalid setting {setting!r}: expected name=value")
        settings[name.replace("-", "_").lower()] = value
    return settings


# ------------------------------------------------------------- regular messages


class MessageParser:
    """Splits a byte stream into (type, body) messages; bounded, no I/O."""

    def __init__(self, max_length: int = 1 << 20) -> None:
        self.max_length = max_length
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add received bytes; return every message now complete."""
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 5:
            (length,) = struct.unpack_from("!I", buf, pos + 1)
            if length < 4:
                raise ProtocolError(f"invalid message length {length}")
            if length - 4 > self.max_length:
                raise ProtocolError(f"message of {length} bytes exceeds the limit of {self.max_length}")
            end = pos + 1 + length
            if end > len(buf):
                break
            out.append((bytes(buf[pos:pos + 1]), bytes(buf[pos + 5:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole message."""
        return len(self._buf)


def _text(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8 in a protocol string") from None


class _Body:
    """A cursor over one message body; every overrun is a ProtocolError."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError(f"truncated {self.what} message")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def byte(self) -> bytes:
        return self.take(1)

    def int16(self) -> int:
        return struct.unpack("!h", self.take(2))[0]

    def int32(self) -> int:
        return struct.unpack("!i", self.take(4))[0]

    def count(self, what: str) -> int:
        """An int16 element count, which must not be negative."""
        n = self.int16()
        if n < 0:
            raise ProtocolError(f"negative {what} count in {self.what} message")
        return n

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError(f"unterminated string in {self.what} message")
        s = self.data[self.pos:end]
        self.pos = end + 1
        return _text(s)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} trailing bytes in {self.what} message")


def parse_query(body: bytes) -> str:
    """Query ('Q'): the SQL text."""
    b = _Body(body, "Query")
    q = b.cstring()
    b.done()
    return q


def parse_password(body: bytes) -> str:
    """PasswordMessage ('p'): the password or md5 hash."""
    b = _Body(body, "PasswordMessage")
    pw = b.cstring()
    b.done()
    return pw


@dataclass(frozen=True, slots=True)
class Parse:
    """Parse ('P'): prepare a statement."""

    statement: str
    query: str
    param_types: tuple[int, ...]


def parse_parse(body: bytes) -> Parse:
    b = _Body(body, "Parse")
    name, query = b.cstring(), b.cstring()
    types = tuple(b.int32() for _ in range(b.count("parameter")))
    b.done()
    return Parse(name, query, types)


@dataclass(frozen=True, slots=True)
class Bind:
    """Bind ('B'): a portal from a prepared statement and parameter values."""

    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


def parse_bind(body: bytes) -> Bind:
    b = _Body(body, "Bind")
    portal, stmt = b.cstring(), b.cstring()
    fmts = tuple(b.int16() for _ in range(b.count("format")))
    params: list[bytes | None] = []
    for _ in range(b.count("parameter")):
        n = b.int32()
        params.append(None if n == -1 else b.take(n))
    res = tuple(b.int16() for _ in range(b.count("result format")))
    b.done()
    return Bind(portal, stmt, fmts, tuple(params), res)


def parse_describe_or_close(body: bytes, what: str) -> tuple[bytes, str]:
    """Describe ('D') / Close ('C'): ('S' statement | 'P' portal, name)."""
    b = _Body(body, what)
    kind = b.byte()
    if kind not in (b"S", b"P"):
        raise ProtocolError(f"invalid {what} kind {kind!r}")
    name = b.cstring()
    b.done()
    return kind, name


def parse_execute(body: bytes) -> tuple[str, int]:
    """Execute ('E'): (portal, max rows; 0 = all)."""
    b = _Body(body, "Execute")
    portal = b.cstring()
    maxrows = b.int32()
    b.done()
    return portal, maxrows


def parse_copy_fail(body: bytes) -> str:
    b = _Body(body, "CopyFail")
    msg = b.cstring()
    b.done()
    return msg


# ------------------------------------------------------------- backend messages


def message(kind: bytes, body: bytes = b"") -> bytes:
    """One backend message: type byte, length (self-inclusive), body."""
    return kind + struct.pack("!I", len(body) + 4) + body


def _cstr(s: str) -> bytes:
    b = s.encode("utf-8")
    if b"\0" in b:
        raise ValueError("protocol strings cannot contain NUL")
    return b + b"\0"


AUTH_OK: Final = message(b"R", struct.pack("!I", 0))
AUTH_CLEARTEXT_PASSWORD: Final = message(b"R", struct.pack("!I", 3))
PARSE_COMPLETE: Final = message(b"1")
BIND_COMPLETE: Final = message(b"2")
CLOSE_COMPLETE: Final = message(b"3")
NO_DATA: Final = message(b"n")
EMPTY_QUERY_RESPONSE: Final = message(b"I")
COPY_DONE: Final = message(b"c")
SSL_REFUSED: Final = b"N"
SSL_ACCEPTED: Final = b"S"


def auth_sasl(mechanisms: list[str]) -> bytes:
    """AuthenticationSASL (10): the mechanisms offered, each a C string, then an empty one."""
    return message(b"R", struct.pack("!I", 10) + b"".join(_cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    """AuthenticationSASLContinue (11): the mechanism's next message (SCRAM's server-first)."""
    return message(b"R", struct.pack("!I", 11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    """AuthenticationSASLFinal (12): the mechanism's outcome data (SCRAM's server-final)."""
    return message(b"R", struct.pack("!I", 12) + data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse ('p'): the mechanism chosen and its first message (length -1: none)."""
    b = _Body(body, "SASLInitialResponse")
    mechanism = b.cstring()
    n = b.int32()
    data = b.take(n) if n >= 0 else b""
    b.done()
    return mechanism, data


def auth_md5_password(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    return message(b"R", struct.pack("!I", 5) + salt)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!iI", pid, secret))


def ready_for_query(status: bytes = TX_IDLE) -> bytes:
    return message(b"Z", status)


def command_complete(tag: str) -> bytes:
    return message(b"C", _cstr(tag))


def parameter_description(types: Sequence[int] = ()) -> bytes:
    return message(b"t", struct.pack("!h", len(types)) + b"".join(struct.pack("!I", t) for t in types))


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a RowDescription."""

    name: str
    type_oid: int = TEXT_OID
    type_len: int = -1


def row_description(columns: Sequence[Column]) -> bytes:
    parts = [struct.pack("!h", len(columns))]
    for c in columns:
        # table oid, attnum, type oid, typlen, typmod, format (text)
        parts.append(_cstr(c.name) + struct.pack("!IhIhih", 0, 0, c.type_oid, c.type_len, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: Sequence[str | bytes | None]) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for v in values:
        if v is None:
            parts.append(struct.pack("!i", -1))
        else:
            b = v.encode("utf-8") if isinstance(v, str) else v
            parts.append(struct.pack("!i", len(b)) + b)
    return message(b"D", b"".join(parts))


def copy_out_response(ncolumns: int = 0) -> bytes:
    """CopyOutResponse ('H'), binary overall format (as BASE_BACKUP sends it)."""
    return message(b"H", struct.pack("!bh", 0, ncolumns))


def copy_both_response() -> bytes:
    """CopyBothResponse ('W') with no columns (START_REPLICATION, pagestream)."""
    return message(b"W", struct.pack("!bh", 0, 0))


def copy_data(data: bytes) -> bytes:
    return message(b"d", data)


# ErrorResponse / NoticeResponse fields (protocol "Error and Notice Message Fields").
@dataclass(frozen=True, slots=True)
class ErrorFields:
    """What an ErrorResponse says: severity, SQLSTATE, message, optional detail/hint."""

    sqlstate: str
    message: str
    severity: str = "ERROR"
    detail: str | None = None
    hint: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def error_response(err: ErrorFields, *, notice: bool = False) -> bytes:
    fields: list[tuple[bytes, str]] = [(b"S", err.severity), (b"V", err.severity), (b"C", err.sqlstate),
                                       (b"M", err.message)]
    if err.detail:
        fields.append((b"D", err.detail))
    if err.hint:
        fields.append((b"H", err.hint))
    body = b"".join(code + _cstr(_no_nul(text)) for code, text in fields) + b"\0"
    return message(b"N" if notice else b"E", body)


def _no_nul(s: str) -> str:
    return s.replace("\0", "\\0")


def result_set(columns: Sequence[Column], rows: Iterable[Sequence[str | bytes | None]], tag: str) -> bytes:
    """RowDescription, the DataRows and CommandComplete of one result."""
    return row_description(columns) + b"".join(data_row(r) for r in rows) + command_complete(tag)


# SQLSTATE codes used by the shim (src/backend/utils/errcodes.txt).
class SqlState:
    PROTOCOL_VIOLATION: Final = "08P01"
    FEATURE_NOT_SUPPORTED: Final = "0A000"
    INVALID_PASSWORD: Final = "28P01"
    INVALID_AUTHORIZATION: Final = "28000"
    INSUFFICIENT_PRIVILEGE: Final = "42501"
    SYNTAX_ERROR: Final = "42601"
    UNDEFINED_OBJECT: Final = "42704"
    INVALID_PARAMETER_VALUE: Final = "22023"
    QUERY_CANCELED: Final = "57014"
    ADMIN_SHUTDOWN: Final = "57P01"
    OBJECT_NOT_IN_PREREQUISITE_STATE: Final = "55000"
    TOO_MANY_CONNECTIONS: Final = "53300"
    CONNECTION_FAILURE: Final = "08006"
    DATA_EXCEPTION: Final = "22000"
    INTERNAL_ERROR: Final = "XX000"
    UNDEFINED_FILE: Final = "58P01"
    IO_ERROR: Final = "58030"
