"""Physical streaming replication with a primary, through psycopg's libpq binding.

The CopyData messages of the streaming protocol ('w' XLogData, 'k'
keepalive, 'r' standby status update; formats in walsender.c
XLogSendPhysical / WalSndKeepalive and walreceiver.c XLogWalRcvSendReply),
parsed and built without I/O; connection strings and names as the
walreceiver uses them; and `ReplicationConnection`, a non-blocking
replication connection (IDENTIFY_SYSTEM, SHOW, slots, START_REPLICATION,
the COPY_BOTH stream).
"""

from __future__ import annotations

import re
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgformat.lsn import format_lsn, parse_lsn

from .errors import ReplicationError, Stopped

# Microseconds between the Unix epoch and Postgres's (2000-01-01), for TimestampTz.
_PG_EPOCH_OFFSET_US: Final = 946_684_800 * 1_000_000

# CopyData payloads of the streaming replication protocol, all big-endian
# (src/backend/replication/walsender.c, walreceiver.c).
_XLOGDATA = struct.Struct(">QQq")  # after 'w': dataStart, walEnd, sendTime
_KEEPALIVE = struct.Struct(">QqB")  # after 'k': walEnd, sendTime, replyRequested
_STANDBY_STATUS = struct.Struct(">cQQQqB")  # 'r', write, flush, apply, sendTime, replyRequested

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")  # ReplicationSlotValidateName
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")

# SQLSTATEs the slot commands tolerate.
_DUPLICATE_OBJECT: Final = "42710"
_UNDEFINED_OBJECT: Final = "42704"


# -- the replication protocol, without I/O ---------------------------------------


def pg_now_us() -> int:
    """The current time as a Postgres TimestampTz (microseconds since 2000-01-01)."""
    return time.time_ns() // 1000 - _PG_EPOCH_OFFSET_US


@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': WAL bytes starting at `start`; `wal_end` is the primary's flush position."""

    start: int
    wal_end: int
    send_time: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    """'k': the primary's sent position; `reply_requested` asks for a status update now."""

    wal_end: int
    send_time: int
    reply_requested: bool


def parse_copy_message(buf: bytes | memoryview) -> XLogData | Keepalive:
    """Decode one CopyData payload the walsender sends in physical streaming."""
    mv = memoryview(buf)
    if not mv:
        raise ReplicationError("empty CopyData message from the primary")
    kind = mv[0]
    if kind == 0x77:  # 'w'
        if len(mv) < 1 + _XLOGDATA.size:
            raise ReplicationError(f"XLogData message too short ({len(mv)} bytes)")
        start, wal_end, send_time = _XLOGDATA.unpack_from(mv, 1)
        return XLogData(start, wal_end, send_time, mv[1 + _XLOGDATA.size:])
    if kind == 0x6B:  # 'k'
        if len(mv) != 1 + _KEEPALIVE.size:
            raise ReplicationError(f"keepalive message of {len(mv)} bytes, expected {1 + _KEEPALIVE.size}")
        wal_end, send_time, reply = _KEEPALIVE.unpack_from(mv, 1)
        return Keepalive(wal_end, send_time, bool(reply))
    raise ReplicationError(f"unexpected streaming message type {bytes(mv[:1])!r}")


def standby_status_update(write: int, flush: int, apply: int, now_us: int, reply_requested: bool = False) -> bytes:
    """'r': the standby's positions, as walreceiver.c XLogWalRcvSendReply builds them."""
    return _STANDBY_STATUS.pack(b"r", write, flush, apply, now_us, 1 if reply_requested else 0)


def parse_size_setting(text: str) -> int:
    """A memory-unit GUC as SHOW prints it ('16MB', '1GB', '8192') -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*(B|kB|MB|GB|TB)?\s*", text)
    if not m:
        raise ReplicationError(f"cannot parse size setting {text!r}")
    unit = {None: 1, "B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}[m.group(2)]
    return int(m.group(1)) * unit


# -- connection strings, slot names and ids -----------------------------------------------


def validate_slot_name(name: str) -> str:
    if not _SLOT_NAME.match(name):
        raise ValueError(f"invalid replication slot name {name!r}: use 1-63 lowercase letters, digits, underscores")
    return name


def validate_id(value: str, what: str) -> str:
    if not _HEX_ID.match(value):
        raise ValueError(f"invalid {what} id {value!r}: expected 32 lowercase hex characters")
    return value


def replication_conninfo(conninfo: str, timeline: str) -> str:
    """The primary's conninfo for a physical replication connection.

    Adds replication=true, and application_name 'zenith_walreceiver_<timeline>'
    when none is given (synchronous_standby_names must name it). Raises
    ValueError for a conninfo libpq cannot parse.
    """
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as e:  # libpq's own message
        raise ValueError(f"invalid connection string: {e}") from None
    extra: dict[str, Any] = {"replication": "true"}
    if not params.get("application_name"):
        extra["application_name"] = f"zenith_walreceiver_{timeline}"
    if not params.get("connect_timeout"):
        extra["connect_timeout"] = "10"
    return make_conninfo(conninfo, **extra)


def redact_conninfo(conninfo: str) -> str:
    """The conninfo without its password, for status and logs."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "<unparsable connection string>"
    params.pop("password", None)
    return make_conninfo("", **params)


def application_name(conninfo: str) -> str:
    return str(conninfo_to_dict(conninfo).get("application_name") or "")


# -- the primary connection -------------------------------------------------------------


class PrimaryConnection(Protocol):
    """What a streaming session needs from its connection to the primary.

    `ReplicationConnection` is the real one; tests may stand in a scripted
    walsender.
    """

    @property
    def socket(self) -> int: ...

    @property
    def wants_write(self) -> bool: ...

    def identify_system(self, stop: threading.Event, timeout: float) -> tuple[int, int, int]: ...

    def show(self, name: str, stop: threading.Event, timeout: float) -> str: ...

    def create_physical_slot(self, slot: str, stop: threading.Event, timeout: float) -> bool: ...

    def start_replication(self, slot: str, lsn: int, stop: threading.Event, timeout: float) -> None: ...

    def read_message(self) -> memoryview | None: ...

    def send(self, payload: bytes, stop: threading.Event, timeout: float) -> None: ...

    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...

    def close(self) -> None: ...


Connector = Callable[[str, threading.Event, float], PrimaryConnection]


class ReplicationConnection:
    """A physical replication connection over psycopg's libpq binding, non-blocking."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self.pgconn = pgconn
        self._out_pending = False

    @classmethod
    def connect(cls, conninfo: str, stop: threading.Event, timeout: float) -> ReplicationConnection:
        """PQconnectStart/PQconnectPoll, giving up at `timeout` or when `stop` is set."""
        pgconn = pq.PGconn.connect_start(conninfo.encode())
        deadline = time.monotonic() + timeout
        status = pq.PollingStatus.WRITING
        try:
            while True:
                if pgconn.status == pq.ConnStatus.BAD:
                    raise ReplicationError(f"cannot connect to the primary: {pgconn.get_error_message()}")
                if status == pq.PollingStatus.OK:
                    break
                if status == pq.PollingStatus.FAILED:
                    raise ReplicationError(f"cannot connect to the primary: {pgconn.get_error_message()}")
                while True:
                    if stop.is_set():
                        raise Stopped()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ReplicationError(f"timed out connecting to the primary after {timeout:g} s")
                    fd = pgconn.socket
                    want_read = status == pq.PollingStatus.READING
                    r, w, _ = select.select([fd] if want_read else [], [] if want_read else [fd], [], min(left, 0.2))
                    if r or w:
                        break
                status = pq.PollingStatus(pgconn.connect_poll())
            pgconn.nonblocking = 1
        except psycopg.Error as e:
            pgconn.finish()
            raise ReplicationError(f"cannot connect to the primary: {e}") from None
        except BaseException:
            pgconn.finish()
            raise
        return cls(pgconn)

    def close(self) -> None:
        self.pgconn.finish()

    @property
    def socket(self) -> int:
        try:
            return self.pgconn.socket
        except psycopg.Error as e:
            raise ReplicationError(f"connection to the primary lost: {e}") from None

    # -- commands ------------------------------------------------------------------

    def command(self, query: str, stop: threading.Event, timeout: float) -> pq.abc.PGresult:
        """Run one replication command; return its last result (or the COPY_BOTH result)."""
        try:
            self.pgconn.send_query(query.encode())
        except psycopg.Error as e:
            raise ReplicationError(f"{query}: {e}") from None
        deadline = time.monotonic() + timeout
        last: pq.abc.PGresult | None = None
        while True:
            self._flush_output(stop, deadline)
            if self.pgconn.is_busy():
                self._wait(stop, deadline, query)
                continue
            res = self.pgconn.get_result()
            if res is None:
                break
            if res.status == pq.ExecStatus.COPY_BOTH:
                return res
            last = res
        if last is None:
            raise ReplicationError(f"{query}: no result from the primary")
        if last.status == pq.ExecStatus.FATAL_ERROR:
            sqlstate = last.error_field(pq.DiagnosticField.SQLSTATE)
            raise ReplicationError(f"{query}: {last.get_error_message()}",
                                   sqlstate.decode() if sqlstate else None)
        return last

    def _wait(self, stop: threading.Event, deadline: float, what: str) -> None:
        if stop.is_set():
            raise Stopped()
        left = deadline - time.monotonic()
        if left <= 0:
            raise ReplicationError(f"{what}: no answer from the primary in time")
        r, _, _ = select.select([self.socket], [], [], min(left, 0.2))
        if r:
            self._consume()

    def _consume(self) -> None:
        try:
            self.pgconn.consume_input()
        except psycopg.Error as e:
            raise ReplicationError(f"connection to the primary lost: {e}") from None

    def _flush_output(self, stop: threading.Event, deadline: float) -> None:
        while self._flush():
            if stop.is_set():
                raise Stopped()
            if time.monotonic() > deadline:
                raise ReplicationError("cannot send to the primary: timed out")
            select.select([self.socket], [self.socket], [], 0.2)
            self._consume()

    def _flush(self) -> bool:
        """Push buffered output; True while some is still pending."""
        try:
            self._out_pending = self.pgconn.flush() == 1
        except psycopg.Error as e:
            raise ReplicationError(f"connection to the primary lost: {e}") from None
        return self._out_pending

    @property
    def wants_write(self) -> bool:
        return self._out_pending

    def identify_system(self, stop: threading.Event, timeout: float) -> tuple[int, int, int]:
        """IDENTIFY_SYSTEM -> (system identifier, timeline, current flush LSN)."""
        res = self.command("IDENTIFY_SYSTEM", stop, timeout)
        if res.status != pq.ExecStatus.TUPLES_OK or res.ntuples != 1 or res.nfields < 3:
            raise ReplicationError("IDENTIFY_SYSTEM: unexpected result shape")
        values = [res.get_value(0, i) for i in range(3)]
        if any(v is None for v in values):
            raise ReplicationError("IDENTIFY_SYSTEM: NULL in result")
        sysid, tli, xlogpos = (bytes(v).decode() for v in values if v is not None)
        return int(sysid), int(tli), parse_lsn(xlogpos)

    def show(self, name: str, stop: threading.Event, timeout: float) -> str:
        res = self.command(f"SHOW {name}", stop, timeout)
        value = res.get_value(0, 0) if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples == 1 else None
        if value is None:
            raise ReplicationError(f"SHOW {name}: no value")
        return bytes(value).decode()

    def create_physical_slot(self, slot: str, stop: threading.Event, timeout: float) -> bool:
        """CREATE_REPLICATION_SLOT .. PHYSICAL RESERVE_WAL; False if it already existed."""
        return self._slot_command(f"CREATE_REPLICATION_SLOT {validate_slot_name(slot)} PHYSICAL RESERVE_WAL",
                                  _DUPLICATE_OBJECT, stop, timeout)

    def drop_slot(self, slot: str, stop: threading.Event, timeout: float) -> bool:
        """DROP_REPLICATION_SLOT .. WAIT; False if there was no such slot."""
        return self._slot_command(f"DROP_REPLICATION_SLOT {validate_slot_name(slot)} WAIT", _UNDEFINED_OBJECT,
                                  stop, timeout)

    def _slot_command(self, command: str, tolerated: str, stop: threading.Event, timeout: float) -> bool:
        """Run a slot command; False if it failed with the `tolerated` SQLSTATE (nothing to do)."""
        try:
            self.command(command, stop, timeout)
        except ReplicationError as e:
            if e.sqlstate == tolerated:
                return False
            raise
        return True

    def start_replication(self, slot: str, lsn: int, stop: threading.Event, timeout: float) -> None:
        res = self.command(f"START_REPLICATION SLOT {validate_slot_name(slot)} PHYSICAL {format_lsn(lsn)}",
                           stop, timeout)
        if res.status != pq.ExecStatus.COPY_BOTH:
            raise ReplicationError(f"START_REPLICATION: expected COPY_BOTH, got {res.status.name}")

    # -- streaming -----------------------------------------------------------------------

    def read_message(self) -> memoryview | None:
        """The next CopyData payload already received, or None if none is complete yet."""
        try:
            n, data = self.pgconn.get_copy_data(1)
        except psycopg.Error as e:
            raise ReplicationError(f"connection to the primary lost: {e}") from None
        if n > 0:
            return data
        if n == 0:
            return None
        # -1: the primary ended the COPY (shutdown, timeline switch); collect why.
        msg = "the primary ended streaming"
        while (res := self.pgconn.get_result()) is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                msg += f": {res.get_error_message()}"
        raise ReplicationError(msg)

    def on_readable(self) -> None:
        self._consume()

    def on_writable(self) -> None:
        self._flush()

    def send(self, payload: bytes, stop: threading.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                queued = self.pgconn.put_copy_data(payload) == 1
            except psycopg.Error as e:
                raise ReplicationError(f"connection to the primary lost: {e}") from None
            if queued:
                break
            self._flush_output(stop, deadline)  # libpq's buffer is full: make room
        self._flush()
