"""The WAL receiver: a physical replica of a Postgres primary that stores into the page server.

One `WalReceiver` per attached (tenant, timeline) runs a thread that

1. asks the page server where the timeline's durable WAL ends
   (GetTimeline.last_record_lsn: the MAXALIGNed end of the last stored
   record, i.e. the start of the next one, or a page boundary);
2. connects to the primary as a physical replica through psycopg's libpq
   binding (`psycopg.pq`): IDENTIFY_SYSTEM, SHOW wal_segment_size,
   optionally CREATE_REPLICATION_SLOT, START_REPLICATION SLOT .. PHYSICAL at
   that LSN;
3. reads the COPY_BOTH stream ('w' XLogData, 'k' keepalive; formats in
   walsender.c XLogSendPhysical / WalSndKeepalive), reassembles and
   CRC-checks records with `WalStreamReader` and decodes their block
   references;
4. sends batches of records on one long-lived Ingest stream (bounded number
   of batches in flight), while another thread reads the acks;
5. reports to the primary, in standby status updates ('r', as in
   walreceiver.c XLogWalRcvSendReply), write = WAL received and verified,
   flush = apply = what the page server acknowledged as durable. With
   synchronous_standby_names naming our application_name, a commit returns
   only once the page server holds it.

Any failure (primary or page server gone, bad WAL) tears the session down and
a new one starts after an exponential backoff, from the page server's durable
LSN again: the slot keeps the WAL, the page server skips what it already has.
"""

from __future__ import annotations

import enum
import logging
import queue
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

import grpc
import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgformat.errors import FormatError
from pgformat.lsn import format_lsn, parse_lsn
from pgformat.rmgr import RM_XLOG_ID, XLOG_OVERWRITE_CONTRECORD
from pgformat.xlogreader import RawRecord, WalStreamReader
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

log = logging.getLogger("zenith.walreceiver")

DEFAULT_TENANT: Final = "00000000000000000000000000000000"

# Microseconds between the Unix epoch and Postgres's (2000-01-01), for TimestampTz.
_PG_EPOCH_OFFSET_US: Final = 946_684_800 * 1_000_000

# CopyData payloads of the streaming replication protocol, all big-endian
# (src/backend/replication/walsender.c, walreceiver.c).
_XLOGDATA = struct.Struct(">QQq")  # after 'w': dataStart, walEnd, sendTime
_KEEPALIVE = struct.Struct(">QqB")  # after 'k': walEnd, sendTime, replyRequested
_STANDBY_STATUS = struct.Struct(">cQQQqB")  # 'r', write, flush, apply, sendTime, replyRequested

# A quiet stream's batch is sent at once while fewer batches than this are in flight.
_EAGER_INFLIGHT: Final = 2

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")  # ReplicationSlotValidateName
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")

# SQLSTATEs the slot commands tolerate.
_DUPLICATE_OBJECT: Final = "42710"
_UNDEFINED_OBJECT: Final = "42704"


# -- errors ---------------------------------------------------------------------


class WalReceiverError(Exception):
    """Base of the walreceiver's errors."""


class ReplicationError(WalReceiverError):
    """The primary connection failed or spoke out of protocol; retrying may help."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class PageServerError(WalReceiverError):
    """The page server failed or refused; retrying may help."""


class FatalError(WalReceiverError):
    """An error that retrying cannot fix: the attachment stops in FAILED."""


class _Stopped(Exception):
    """Raised inside a session when the receiver is asked to stop."""


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


# -- attachment configuration and status ---------------------------------------------


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


@dataclass(frozen=True)
class AttachConfig:
    """What an Attach asked for."""

    tenant: str
    timeline: str
    conninfo: str  # as given; replication_conninfo() is applied when connecting
    slot_name: str
    create_slot: bool = False
    start_lsn: int | None = None
    writer_epoch: int = 0  # the page server's epoch of this writer's claim; 0 = the timeline is not fenced


@dataclass(frozen=True)
class ReceiverOptions:
    """Tuning knobs; the defaults suit a loopback deployment."""

    max_batch_records: int = 500
    max_batch_bytes: int = 2 << 20
    max_batch_delay: float = 0.010  # seconds a record may wait for its batch to fill
    max_inflight: int = 8  # Ingest batches sent and not yet acknowledged
    status_interval: float = 1.0  # wal_receiver_status_interval
    receiver_timeout: float = 60.0  # wal_receiver_timeout: silence from the primary before reconnecting
    connect_timeout: float = 10.0
    rpc_timeout: float = 10.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    drain_timeout: float = 5.0  # how long a closing session waits for outstanding acks
    # Sessions in a row ending with the same error and no progress before the attachment is
    # reported FAILING (and a warning goes to the primary's log).
    failing_after: int = 4


class State(enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    STOPPED = "stopped"
    FAILED = "failed"
    FAILING = "failing"  # retrying, but the same error keeps ending every session with no progress


@dataclass(frozen=True)
class ReceiverStatus:
    """A snapshot of one attachment."""

    tenant: str
    timeline: str
    conninfo: str  # password removed
    slot_name: str
    state: State
    received_lsn: int
    durable_lsn: int
    primary_lsn: int
    last_error: str
    last_error_time_us: int  # Unix time
    reconnects: int
    repeated_errors: int = 0  # sessions in a row that ended with last_error and made no progress

    @property
    def lag_bytes(self) -> int:
        return max(0, self.primary_lsn - self.durable_lsn) if self.primary_lsn else 0

    def line(self) -> str:
        """One human-readable status line."""
        text = (f"{self.tenant}/{self.timeline} {self.state.value}: received {format_lsn(self.received_lsn)}, "
                f"durable {format_lsn(self.durable_lsn)}, primary {format_lsn(self.primary_lsn)}, "
                f"lag {self.lag_bytes} bytes, {self.reconnects} reconnects")
        if self.repeated_errors > 1:
            text += f", the same error {self.repeated_errors} times in a row"
        return text + (f"; last error: {self.last_error}" if self.last_error else "")


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
                        raise _Stopped()
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
            raise _Stopped()
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
                raise _Stopped()
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
        try:
            self.command(f"CREATE_REPLICATION_SLOT {validate_slot_name(slot)} PHYSICAL RESERVE_WAL", stop, timeout)
        except ReplicationError as e:
            if e.sqlstate == _DUPLICATE_OBJECT:
                return False
            raise
        return True

    def drop_slot(self, slot: str, stop: threading.Event, timeout: float) -> bool:
        """DROP_REPLICATION_SLOT .. WAIT; False if there was no such slot."""
        try:
            self.command(f"DROP_REPLICATION_SLOT {validate_slot_name(slot)} WAIT", stop, timeout)
        except ReplicationError as e:
            if e.sqlstate == _UNDEFINED_OBJECT:
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


# -- the page server side ---------------------------------------------------------------------


def record_to_proto(raw: RawRecord) -> common_pb2.DecodedRecord:
    """A CRC-checked record plus the summary of its block references."""
    rec = raw.decode()
    blocks = [
        common_pb2.BlockRef(
            block_id=b.block_id,
            rel=common_pb2.RelTag(spc_oid=b.rnode.spc, db_oid=b.rnode.db, rel_number=b.rnode.rel, fork=b.forknum),
            blkno=b.blkno, will_init=b.will_init, has_image=b.has_image, apply_image=b.apply_image,
            has_data=b.has_data,
        )
        for b in rec.blocks
    ]
    return common_pb2.DecodedRecord(
        lsn=raw.lsn, end_lsn=raw.end_lsn, prev_lsn=rec.prev, xid=rec.xid, rmid=rec.rmid, info=rec.info,
        total_len=rec.tot_len, raw=raw.data, blocks=blocks,
    )


class IngestStream:
    """One Ingest call: batches go out through a queue, acks are read on a thread of their own."""

    def __init__(self, stub: pageserver_pb2_grpc.PageServerStub, tenant: str, timeline: str,
                 durable_lsn: int, on_ack: Callable[[int], None], writer_epoch: int = 0) -> None:
        self._tenant = common_pb2.TenantId(id=tenant)
        self._timeline = common_pb2.TimelineId(id=timeline)
        self._writer_epoch = writer_epoch
        self._queue: queue.SimpleQueue[pageserver_pb2.IngestRequest | None] = queue.SimpleQueue()
        self._on_ack = on_ack
        self._lock = threading.Lock()
        self.durable_lsn = durable_lsn
        self.sent_seq = 0
        self.acked_seq = 0
        self.error: Exception | None = None
        self._closing = False
        self._call = stub.Ingest(self._requests())
        self._thread = threading.Thread(target=self._read_acks, name=f"ingest-acks-{timeline[:8]}", daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[pageserver_pb2.IngestRequest]:
        while (item := self._queue.get()) is not None:
            yield item

    def _read_acks(self) -> None:
        try:
            for ack in self._call:
                with self._lock:
                    self.acked_seq = max(self.acked_seq, ack.batch_seq)
                    self.durable_lsn = max(self.durable_lsn, ack.durable_lsn)
                    durable = self.durable_lsn
                self._on_ack(durable)
            if not self._closing:
                self.error = PageServerError("the page server ended the Ingest stream")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # Fenced by a newer writer, or WAL that does not continue the timeline: resending cannot help.
                self.error = FatalError(f"the page server refused the WAL: {e.details()}")
            elif not self._closing or e.code() != grpc.StatusCode.CANCELLED:
                self.error = PageServerError(f"Ingest: {e.code().name}: {e.details()}")
        except Exception as e:  # pragma: no cover - defensive
            log.exception("BUG: Ingest ack reader failed")
            self.error = e
        finally:
            self._on_ack(self.durable_lsn)

    @property
    def inflight(self) -> int:
        with self._lock:
            return self.sent_seq - self.acked_seq

    def send(self, records: list[common_pb2.DecodedRecord], up_to_lsn: int, flush: bool) -> None:
        with self._lock:
            self.sent_seq += 1
            seq = self.sent_seq
        self._queue.put(pageserver_pb2.IngestRequest(
            tenant=self._tenant, timeline=self._timeline, batch_seq=seq, records=records,
            up_to_lsn=up_to_lsn, flush=flush, writer_epoch=self._writer_epoch,
        ))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, timeout: float) -> None:
        """Half-close and wait (bounded) for the outstanding acks; then cancel."""
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._call.cancel()
            self._thread.join()

    def abort(self) -> None:
        self._closing = True
        self._call.cancel()
        self._queue.put(None)
        self._thread.join()


def check_writer(info: pageserver_pb2.TimelineInfo, writer_epoch: int) -> None:
    """FatalError unless an attachment of `writer_epoch` is the timeline's writer (or it was never claimed)."""
    w = info.writer
    if w.epoch == 0:
        return
    if w.kind == pageserver_pb2.WRITER_KIND_NONE:
        raise FatalError(f"timeline {info.timeline.id} has no writer (released at epoch {w.epoch}): "
                         "claim it on the page server before attaching")
    if writer_epoch != w.epoch:
        kind = pageserver_pb2.WriterKind.Name(w.kind).removeprefix("WRITER_KIND_").lower()
        raise FatalError(f"timeline {info.timeline.id} is written by {kind} {w.name!r} (epoch {w.epoch}); "
                         f"this attachment's writer epoch is {writer_epoch}")


# -- one attachment ------------------------------------------------------------------------------


class WalReceiver:
    """Streams one primary's WAL into one page server timeline, on a thread of its own."""

    def __init__(self, config: AttachConfig, pageserver: str, options: ReceiverOptions | None = None,
                 connect: Connector | None = None) -> None:
        self.config = config
        self.pageserver = pageserver
        self.options = options or ReceiverOptions()
        self._connect: Connector = connect or ReplicationConnection.connect
        self._conninfo = replication_conninfo(config.conninfo, config.timeline)
        self.application_name = application_name(self._conninfo)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._status = ReceiverStatus(
            tenant=config.tenant, timeline=config.timeline, conninfo=redact_conninfo(config.conninfo),
            slot_name=config.slot_name, state=State.CONNECTING, received_lsn=0, durable_lsn=0, primary_lsn=0,
            last_error="", last_error_time_us=0, reconnects=0,
        )
        self._thread = threading.Thread(target=self._run, name=f"walreceiver-{config.timeline[:8]}", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> ReceiverStatus:
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return self.status()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> ReceiverStatus:
        with self._lock:
            return self._status

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    def _set_state(self, state: State) -> None:
        """A session's progress; a FAILING attachment stays FAILING until WAL gets through again."""
        with self._lock:
            if self._status.state is not State.FAILING:
                self._status = replace(self._status, state=state)

    def _on_durable(self, durable: int) -> None:
        """The page server acknowledged WAL up to `durable`: progress clears a run of errors."""
        with self._lock:
            progress = durable > self._status.durable_lsn
            self._status = replace(self._status, durable_lsn=durable)
        if progress:
            self._recovered()

    def _recovered(self) -> None:
        """WAL got through, or a session streamed long without an error: not FAILING any more."""
        with self._lock:
            st = self._status
            if not st.repeated_errors:
                return
            self._status = replace(st, repeated_errors=0,
                                   state=State.STREAMING if st.state is State.FAILING else st.state)
        if st.state is State.FAILING:
            log.info("timeline %s: streaming again after %d failed sessions", self.config.timeline,
                     st.repeated_errors)

    def _error(self, message: str, state: State) -> None:
        self._update(state=state, last_error=message, last_error_time_us=time.time_ns() // 1000)

    def _session_failed(self, message: str, delay: float) -> None:
        """A session ended on a retryable error; the same one again and again without progress is FAILING."""
        with self._lock:
            st = self._status
            repeats = st.repeated_errors + 1 if message == st.last_error and st.repeated_errors else 1
            failing = repeats >= self.options.failing_after
            self._status = replace(st, state=State.FAILING if failing else State.BACKOFF, last_error=message,
                                   last_error_time_us=time.time_ns() // 1000, repeated_errors=repeats)
        if failing and repeats == self.options.failing_after:
            log.error("timeline %s: failing: the same error %d times in a row with no progress, retrying every "
                      "%.1f s: %s", self.config.timeline, repeats, self.options.backoff_max, message)
            self._warn_primary(f"replication is failing ({message}); commits waiting for this synchronous "
                               "standby do not complete until the cause is fixed")
        else:
            log.warning("timeline %s: %s; reconnecting in %.2f s", self.config.timeline, message, delay)

    def _warn_primary(self, message: str) -> None:
        """Best effort, on a thread of its own: `message` as a WARNING in the primary's server log,
        where the user of a compute whose commits wait looks first."""
        text = f"zenith walreceiver for timeline {self.config.timeline}: {message}".replace("$", "")
        params = conninfo_to_dict(self.config.conninfo)
        params.pop("replication", None)
        params["connect_timeout"] = "5"
        conninfo = make_conninfo("", **params)

        def run() -> None:
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute("SET statement_timeout = '5s'")
                    conn.execute(sql.SQL("DO $zenith$ BEGIN RAISE WARNING '%', {}; END $zenith$").format(
                        sql.Literal(text)))
            except psycopg.Error as e:
                log.info("timeline %s: could not write the warning into the primary's log: %s",
                         self.config.timeline, str(e).strip())

        threading.Thread(target=run, name=f"warn-primary-{self.config.timeline[:8]}", daemon=True).start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed at the end

    def drop_slot(self) -> bool:
        """DROP_REPLICATION_SLOT on the primary (after stop()); False if it did not exist."""
        never = threading.Event()
        conn = ReplicationConnection.connect(self._conninfo, never, self.options.connect_timeout)
        try:
            return conn.drop_slot(self.config.slot_name, never, self.options.rpc_timeout)
        finally:
            conn.close()

    # -- the supervising loop ------------------------------------------------------------------------

    def _run(self) -> None:
        opts = self.options
        delay = opts.backoff_initial
        first = True
        try:
            while not self._stop.is_set():
                if not first:
                    self._update(reconnects=self.status().reconnects + 1)
                first = False
                self._set_state(State.CONNECTING)
                started = time.monotonic()
                durable_before = self.status().durable_lsn
                try:
                    self._session()
                except _Stopped:
                    break
                except FatalError as e:
                    log.error("timeline %s: walreceiver failed: %s", self.config.timeline, e)
                    self._error(str(e), State.FAILED)
                    self._warn_primary(f"replication stopped ({e}); commits waiting for this synchronous "
                                       "standby do not complete")
                    return
                except (WalReceiverError, FormatError) as e:
                    self._session_failed(str(e), delay)
                except Exception as e:
                    log.exception("BUG: unexpected error in the walreceiver session of timeline %s",
                                  self.config.timeline)
                    self._session_failed(f"internal error: {type(e).__name__}: {e}", delay)
                # A session that made progress or lived long resets the backoff.
                if self.status().durable_lsn > durable_before or time.monotonic() - started > opts.backoff_max * 2:
                    delay = opts.backoff_initial
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, opts.backoff_max)
            self._update(state=State.STOPPED)
        finally:
            if self.status().state not in (State.STOPPED, State.FAILED):
                self._update(state=State.STOPPED)
            self._wake_r.close()
            self._wake_w.close()

    def _session(self) -> None:
        opts = self.options
        cfg = self.config
        channel = grpc.insecure_channel(self.pageserver, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
        ])
        try:
            stub = pageserver_pb2_grpc.PageServerStub(channel)
            info = self._get_timeline(stub)
            check_writer(info, cfg.writer_epoch)
            # Stream from where the page server's WAL ends: the end of its last record (or the
            # timeline's branch point or import LSN), a record boundary, and it holds every
            # record before. Only a timeline with no WAL yet starts at the Attach start LSN.
            last = info.last_record_lsn
            if cfg.start_lsn and last and cfg.start_lsn > last:
                raise FatalError(
                    f"the attach start LSN {format_lsn(cfg.start_lsn)} is beyond the end of the timeline's WAL "
                    f"({format_lsn(last)}): streaming from there would leave a gap")
            resume = last or cfg.start_lsn or 0
            if resume == 0:
                raise FatalError("the timeline has no WAL position yet (not imported); attach with start_lsn")
            # Flushed, for the primary, is only what the page server made durable.
            durable = info.durable_lsn or resume
            self._update(durable_lsn=durable, received_lsn=resume)
            conn = self._connect(self._conninfo, self._stop, opts.connect_timeout)
            try:
                self._stream(conn, stub, info, resume, durable)
            finally:
                conn.close()
        finally:
            channel.close()

    def _get_timeline(self, stub: pageserver_pb2_grpc.PageServerStub) -> pageserver_pb2.TimelineInfo:
        request = pageserver_pb2.GetTimelineRequest(
            tenant=common_pb2.TenantId(id=self.config.tenant), timeline=common_pb2.TimelineId(id=self.config.timeline))
        try:
            info: pageserver_pb2.TimelineInfo = stub.GetTimeline(request, timeout=self.options.rpc_timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise FatalError(f"page server: {e.details()}") from None
            raise PageServerError(
                f"page server {self.pageserver}: GetTimeline: {e.code().name}: {e.details()}") from None
        return info

    def _stream(self, conn: PrimaryConnection, stub: pageserver_pb2_grpc.PageServerStub,
                info: pageserver_pb2.TimelineInfo, resume: int, durable: int) -> None:
        opts = self.options
        cfg = self.config
        stop = self._stop
        sysid, tli, primary_flush = conn.identify_system(stop, opts.rpc_timeout)
        if info.system_identifier and info.system_identifier != sysid:
            raise FatalError(f"the primary's system identifier {sysid} differs from the timeline's "
                             f"({info.system_identifier})")
        seg_size = parse_size_setting(conn.show("wal_segment_size", stop, opts.rpc_timeout))
        if cfg.create_slot and conn.create_physical_slot(cfg.slot_name, stop, opts.rpc_timeout):
            log.info("created replication slot %s", cfg.slot_name)
        reader = WalStreamReader(resume, seg_size, expect_sysid=sysid)
        # The first record must link back to what the page server holds (no gap, no fork).
        expect_prev = info.prev_record_lsn if resume == info.last_record_lsn and info.prev_record_lsn else None

        def on_ack(durable: int) -> None:
            self._on_durable(durable)
            self._wake()

        ingest = IngestStream(stub, cfg.tenant, cfg.timeline, durable, on_ack, cfg.writer_epoch)
        graceful = False
        try:
            conn.start_replication(cfg.slot_name, resume, stop, opts.rpc_timeout)
            self._set_state(State.STREAMING)
            self._update(primary_lsn=max(self.status().primary_lsn, primary_flush))
            log.info("timeline %s: streaming from %s (primary system %d, timeline %d, slot %s)",
                     cfg.timeline, format_lsn(resume), sysid, tli, cfg.slot_name)
            self._pump(conn, ingest, reader, expect_prev)
        except (ReplicationError, FormatError, _Stopped):
            graceful = True  # the page server side is fine: let it finish what it has
            raise
        finally:
            if graceful and ingest.error is None:
                ingest.close(opts.drain_timeout)
            else:
                ingest.abort()

    def _pump(self, conn: PrimaryConnection, ingest: IngestStream, reader: WalStreamReader,
              expect_prev: int | None) -> None:
        """The streaming loop: read, verify, batch, send, report."""
        opts = self.options
        batch = _Batch(expect_prev)
        healthy_after = time.monotonic() + 2 * opts.backoff_max  # streaming this long without an error
        received = reader.position
        primary_lsn = self.status().primary_lsn
        reported_flush = -1
        last_reply = 0.0
        last_heard = time.monotonic()
        ping_sent = False
        wake = self._wake_r

        def reply(now: float, request: bool = False) -> None:
            nonlocal reported_flush, last_reply
            durable = ingest.durable_lsn
            conn.send(standby_status_update(max(received, durable), durable, durable, pg_now_us(), request),
                      self._stop, opts.rpc_timeout)
            reported_flush, last_reply = durable, now

        while True:
            if self._stop.is_set():
                raise _Stopped()
            ingest.check()
            now = time.monotonic()
            if ingest.durable_lsn != reported_flush or now - last_reply >= opts.status_interval:
                reply(now)
                if now >= healthy_after:
                    self._recovered()

            # Read what has arrived, while the batch has room for it.
            drained = False
            n = 0
            while not batch.full(opts) and n < 64:
                payload = conn.read_message()
                if payload is None:
                    drained = True
                    break
                n += 1
                last_heard = now
                ping_sent = False
                msg = parse_copy_message(payload)
                if isinstance(msg, Keepalive):
                    primary_lsn = max(primary_lsn, msg.wal_end)
                    if msg.reply_requested:
                        reply(now)
                    continue
                if msg.start != reader.position:
                    raise ReplicationError(f"the primary sent WAL at {format_lsn(msg.start)}, "
                                           f"expected {format_lsn(reader.position)}")
                primary_lsn = max(primary_lsn, msg.wal_end, msg.start + len(msg.data))
                reader.feed(msg.data)
                try:
                    for raw in reader.records():  # raises before yielding a bad record
                        batch.add(raw, now)
                except FormatError:
                    # The records before the bad one are good: store them, then end the session.
                    if batch.records:
                        ingest.send(batch.take(), batch.end_lsn, flush=True)
                    raise
                received = batch.end_lsn or received
            if n:
                self._update(received_lsn=received, primary_lsn=primary_lsn)

            # Send the batch when it is full or old enough, or at once when the stream went quiet
            # (a commit may be waiting on it) and at most one batch is being stored: one queued
            # behind the page server's fsync keeps commit latency low without an fsync per record.
            inflight = ingest.inflight
            if batch.records and inflight < opts.max_inflight and (
                batch.full(opts) or now - batch.since >= opts.max_batch_delay
                or (drained and inflight < _EAGER_INFLIGHT)
            ):
                ingest.send(batch.take(), batch.end_lsn, flush=drained)
                continue
            room = not batch.full(opts)
            if not drained and room:
                continue  # more is buffered already

            # Wait for the socket, an ack, or a timer.
            if not room:
                last_heard = now  # we are not reading (back-pressure): silence is ours, not the primary's
            timeout = last_reply + opts.status_interval - now
            if batch.records and inflight < opts.max_inflight:
                timeout = min(timeout, batch.since + opts.max_batch_delay - now)
            silence = now - last_heard
            if silence >= opts.receiver_timeout:
                raise ReplicationError(f"no message from the primary for {silence:.0f} s")
            if silence >= opts.receiver_timeout / 2 and not ping_sent:
                reply(now, request=True)
                ping_sent = True
            timeout = max(0.0, min(timeout, opts.receiver_timeout - silence))
            sock = conn.socket
            r, w, _ = select.select([wake, sock] if room else [wake], [sock] if conn.wants_write else [], [],
                                    timeout)
            if sock in r:
                conn.on_readable()
            if w:
                conn.on_writable()
            if wake in r:
                try:
                    while wake.recv(4096):
                        pass
                except BlockingIOError:
                    pass


class _Batch:
    """Records waiting to be sent on the Ingest stream."""

    def __init__(self, expect_prev: int | None) -> None:
        self.records: list[common_pb2.DecodedRecord] = []
        self.nbytes = 0
        self.since = 0.0  # when the oldest record waiting arrived
        self.end_lsn = 0  # end of the last record added
        # The first record must link back to what the page server holds (no gap, no fork).
        self._expect_prev = expect_prev

    def add(self, raw: RawRecord, now: float) -> None:
        if self._expect_prev is not None:
            self._check_link(raw, self._expect_prev)
            self._expect_prev = None
        if not self.records:
            self.since = now
        self.records.append(record_to_proto(raw))
        self.nbytes += len(raw.data)
        self.end_lsn = raw.end_lsn

    @staticmethod
    def _check_link(raw: RawRecord, expect_prev: int) -> None:
        hdr = raw.header if raw.header is not None else raw.decode().header
        # After a crash mid-record the primary overwrote the record's tail (xlog.c
        # CreateOverwriteContrecordRecord); that record links to the aborted record,
        # which the page server never got.
        if hdr.rmid == RM_XLOG_ID and hdr.info & 0xF0 == XLOG_OVERWRITE_CONTRECORD:
            return
        if hdr.prev != expect_prev:
            raise FatalError(
                f"WAL at {format_lsn(raw.lsn)} links back to {format_lsn(hdr.prev)}, but the page server's last "
                f"record starts at {format_lsn(expect_prev)}: the primary's WAL diverged from the timeline")

    def full(self, opts: ReceiverOptions) -> bool:
        return len(self.records) >= opts.max_batch_records or self.nbytes >= opts.max_batch_bytes

    def take(self) -> list[common_pb2.DecodedRecord]:
        records, self.records, self.nbytes = self.records, [], 0
        return records
