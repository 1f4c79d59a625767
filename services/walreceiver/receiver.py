"""The WAL receiver: a physical replica of a Postgres primary whose WAL is durable here first.

One `WalReceiver` per attached (tenant, timeline) runs two threads:

- the **primary side** connects to the primary as a physical replica through
  psycopg's libpq binding (IDENTIFY_SYSTEM, SHOW wal_segment_size,
  optionally CREATE_REPLICATION_SLOT, START_REPLICATION SLOT .. PHYSICAL),
  writes the WAL it streams into segment files laid out as in pg_wal
  (walstore.py), reassembles and CRC-checks the records as they arrive, and
  fsyncs when the stream goes quiet (as walreceiver.c does). It reports
  flush = the end of the last complete record made durable, so a
  synchronous commit waits for one write and one fsync here, as with a
  vanilla standby; the slot's restart_lsn follows it. It streams from the
  end of the local WAL (after a restart: the end of the last valid record
  that survived), or for a new attachment from the end of the page
  server's WAL, linking the first record to the one before by xl_prev.
- the **feeder** (feeder.py) sends the durable WAL, decoded, to the page
  server and learns what the page server made durable; segments below
  that are removed by the primary side.

Failures of either side end that side's session and a new one starts after
an exponential backoff; the other side goes on. The same error ending
session after session of the primary side with no progress makes the
attachment FAILING (commits waiting on it do not complete), and a WARNING
in the primary's log says why.
"""

from __future__ import annotations

import enum
import logging
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import grpc
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgformat.errors import FormatError
from pgformat.lsn import format_lsn
from pgformat.xlogreader import WalStreamReader
from services.auth import ClientSecurity
from zproto import pageserver_pb2, pageserver_pb2_grpc

from .errors import FatalError, PageServerError, ReplicationError, Stopped, WalReceiverError
from .feeder import Feed, check_writer, get_timeline
from .protocol import (
    Keepalive,
    PrimaryConnection,
    ReplicationConnection,
    application_name,
    parse_copy_message,
    parse_size_setting,
    pg_now_us,
    redact_conninfo,
    replication_conninfo,
    standby_status_update,
)
from .walstore import TimelineWal, WalMeta, WalStoreError, page_start

log = logging.getLogger("zenith.walreceiver")

DEFAULT_TENANT: Final = "00000000000000000000000000000000"

# The primary side fsyncs at the latest after this much unsynced WAL, even if the stream never pauses.
_SYNC_BYTES: Final = 8 << 20

Connector = Callable[[str, threading.Event, float], PrimaryConnection]


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
    max_inflight: int = 8  # Ingest batches sent and not yet acknowledged
    status_interval: float = 1.0  # wal_receiver_status_interval
    receiver_timeout: float = 60.0  # wal_receiver_timeout: silence from the primary before reconnecting
    connect_timeout: float = 10.0
    rpc_timeout: float = 10.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    drain_timeout: float = 5.0  # how long a closing feed session waits for outstanding acks
    # Sessions in a row ending with the same error and no progress before the attachment is
    # reported FAILING (and a warning goes to the primary's log).
    failing_after: int = 4
    # The token (ingest scope) and CA the page server is called with.
    pageserver_security: ClientSecurity = field(default_factory=ClientSecurity)
    # Hosts (names, addresses, networks) Attach may name as a primary; empty: any TCP host.
    allowed_primary_hosts: tuple[str, ...] = ()


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
    received_lsn: int  # WAL received from the primary
    durable_lsn: int  # end of the last record fsynced here: reported to the primary as flushed
    primary_lsn: int
    last_error: str
    last_error_time_us: int  # Unix time
    reconnects: int
    repeated_errors: int = 0  # sessions in a row that ended with last_error and made no progress
    pageserver_lsn: int = 0  # end of the last record the page server acknowledged
    pageserver_durable_lsn: int = 0  # what the page server made durable (local WAL below it is removed)
    pageserver_error: str = ""  # the feeder's last error, empty once it feeds again
    writer_epoch: int = 0

    @property
    def lag_bytes(self) -> int:
        return max(0, self.primary_lsn - self.durable_lsn) if self.primary_lsn else 0

    def line(self) -> str:
        """One human-readable status line."""
        text = (f"{self.tenant}/{self.timeline} {self.state.value}: received {format_lsn(self.received_lsn)}, "
                f"durable {format_lsn(self.durable_lsn)}, primary {format_lsn(self.primary_lsn)}, "
                f"lag {self.lag_bytes} bytes, page server at {format_lsn(self.pageserver_lsn)} "
                f"(durable {format_lsn(self.pageserver_durable_lsn)}), {self.reconnects} reconnects")
        if self.repeated_errors > 1:
            text += f", the same error {self.repeated_errors} times in a row"
        text += f"; last error: {self.last_error}" if self.last_error else ""
        return text + (f"; page server: {self.pageserver_error}" if self.pageserver_error else "")


class WalReceiver:
    """Streams one primary's WAL into local segment files and from there into one page server timeline."""

    def __init__(self, config: AttachConfig, pageserver: str, wal_dir: Path, options: ReceiverOptions | None = None,
                 connect: Connector | None = None) -> None:
        self.config = config
        self.pageserver = pageserver
        self.wal_dir = Path(wal_dir)
        self.options = options or ReceiverOptions()
        self._connect: Connector = connect or ReplicationConnection.connect
        self._conninfo = replication_conninfo(config.conninfo, config.timeline)
        self.application_name = application_name(self._conninfo)
        self._stop = threading.Event()  # everything
        self._stop_primary = threading.Event()  # the primary side only (a draining Detach)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._status = ReceiverStatus(
            tenant=config.tenant, timeline=config.timeline, conninfo=redact_conninfo(config.conninfo),
            slot_name=config.slot_name, state=State.CONNECTING, received_lsn=0, durable_lsn=0, primary_lsn=0,
            last_error="", last_error_time_us=0, reconnects=0, writer_epoch=config.writer_epoch,
        )
        # The local WAL and where its durable records end; the feeder waits on `_changed`.
        self._changed = threading.Condition()
        self._wal: TimelineWal | None = None
        self._local_end = 0  # end of the last complete record written locally
        self._local_last_start = 0  # start of that record
        self._durable_end = 0  # end of the last complete record fsynced
        self._fatal: FatalError | None = None
        self._thread = threading.Thread(target=self._run, name=f"walreceiver-{config.timeline[:8]}", daemon=True)
        self._feed_thread = threading.Thread(target=self._run_feed, name=f"feeder-{config.timeline[:8]}",
                                             daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._feed_thread.start()

    def stop(self, timeout: float = 30.0) -> ReceiverStatus:
        """Stop both sides now; the local WAL stays (a restarted walreceiver resumes from it)."""
        self._stop.set()
        self._stop_primary.set()
        self._wake()
        with self._changed:
            self._changed.notify_all()
        for t in (self._thread, self._feed_thread):
            if t.is_alive():
                t.join(timeout)
        self._close_wal()
        return self.status()

    def drain(self, timeout: float) -> bool:
        """Stop the primary side, then wait until the page server durably holds every record kept
        here; True if it does (the local WAL is then removed and everything stopped). On False the
        feeder still runs: the caller decides (stop(), or start a new receiver)."""
        self._stop_primary.set()
        self._wake()
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._wal is not None:  # nothing kept here: nothing to drain
                st = self._status
                if self._durable_end and st.pageserver_durable_lsn >= self._durable_end:
                    break
                if self._fatal is not None or not self._feed_thread.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))
        self.stop(timeout)
        shutil.rmtree(self.wal_dir, ignore_errors=True)
        return True

    @property
    def running(self) -> bool:
        return self._thread.is_alive() or self._feed_thread.is_alive()

    def status(self) -> ReceiverStatus:
        with self._lock:
            return self._status

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    def _set_state(self, state: State) -> None:
        """A session's progress; a FAILING attachment stays FAILING until WAL gets through again."""
        with self._lock:
            if self._status.state not in (State.FAILING, State.FAILED):
                self._status = replace(self._status, state=state)

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

    def _fail(self, e: FatalError) -> None:
        """Retrying cannot help: both sides stop, the attachment is FAILED."""
        log.error("timeline %s: walreceiver failed: %s", self.config.timeline, e)
        with self._changed:
            if self._fatal is None:
                self._fatal = e
            self._changed.notify_all()
        self._update(state=State.FAILED, last_error=str(e), last_error_time_us=time.time_ns() // 1000)
        self._stop.set()
        self._stop_primary.set()
        self._wake()
        self._warn_primary(f"replication stopped ({e}); commits waiting for this synchronous standby do not "
                           "complete")

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

    def _channel(self) -> grpc.Channel:
        return self.options.pageserver_security.channel(self.pageserver, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
        ])

    def _close_wal(self) -> None:
        with self._changed:
            if self._wal is not None:
                self._wal.close()

    # -- the primary side ------------------------------------------------------------------------

    def _supervise(self, session: Callable[[], None], stop: threading.Event, progress: Callable[[], int],
                   failed: Callable[[str, float], None], what: str) -> None:
        """Run `session` again and again until `stop`, with exponential backoff between failures; a
        session that made `progress` or lived long resets the backoff. A FatalError fails the attachment."""
        opts = self.options
        delay = opts.backoff_initial
        while not stop.is_set():
            started = time.monotonic()
            before = progress()
            try:
                session()
            except Stopped:
                return
            except FatalError as e:
                self._fail(e)
                return
            except (WalReceiverError, FormatError, WalStoreError) as e:
                failed(str(e), delay)
            except Exception as e:
                log.exception("BUG: unexpected error %s for timeline %s", what, self.config.timeline)
                failed(f"internal error: {type(e).__name__}: {e}", delay)
            if progress() > before or time.monotonic() - started > opts.backoff_max * 2:
                delay = opts.backoff_initial
            if stop.wait(delay):
                return
            delay = min(delay * 2, opts.backoff_max)

    def _run(self) -> None:
        first = True

        def session() -> None:
            nonlocal first
            if not first:
                self._update(reconnects=self.status().reconnects + 1)
            first = False
            self._set_state(State.CONNECTING)
            self._session()

        try:
            try:
                self._open_existing()
            except WalStoreError as e:
                self._fail(FatalError(f"the WAL kept for this timeline cannot be used: {e}"))
                return
            self._supervise(session, self._stop_primary, lambda: self._durable_end, self._session_failed,
                            "streaming from the primary")
        finally:
            if self.status().state is not State.FAILED:
                self._update(state=State.STOPPED)
            self._wake_r.close()
            self._wake_w.close()

    def _session(self) -> None:
        opts = self.options
        cfg = self.config
        info = self._pageserver_info(required=self._wal is None)
        conn = self._connect(self._conninfo, self._stop_primary, opts.connect_timeout)
        try:
            sysid, tli, primary_flush = conn.identify_system(self._stop_primary, opts.rpc_timeout)
            if info is not None and info.system_identifier and info.system_identifier != sysid:
                raise FatalError(f"the primary's system identifier {sysid} differs from the timeline's "
                                 f"({info.system_identifier})")
            seg_size = parse_size_setting(conn.show("wal_segment_size", self._stop_primary, opts.rpc_timeout))
            wal, resume, prev = self._open_local(info, WalMeta(seg_size, tli, sysid))
            if cfg.create_slot and conn.create_physical_slot(cfg.slot_name, self._stop_primary, opts.rpc_timeout):
                log.info("created replication slot %s", cfg.slot_name)
            begin = self._start_replication(conn, wal, resume)
            self._set_state(State.STREAMING)
            self._update(primary_lsn=max(self.status().primary_lsn, primary_flush))
            log.info("timeline %s: streaming from %s (primary system %d, timeline %d, slot %s)",
                     cfg.timeline, format_lsn(resume), sysid, tli, cfg.slot_name)
            self._pump(conn, wal, resume, prev, begin)
        finally:
            conn.close()

    def _start_replication(self, conn: PrimaryConnection, wal: TimelineWal, resume: int) -> int:
        """START_REPLICATION before `resume`, so that the local segments have what pg_waldump needs:
        from the start of the segment when it is new here (its long page header), as Postgres's
        walreceiver does, else (or when the primary no longer has that) from the start of the page.
        The reader takes records from `resume` on; returns where the stream starts."""
        seg_start = resume - resume % wal.meta.seg_size
        if seg_start < page_start(resume) and not wal.has_header(seg_start):
            try:
                conn.start_replication(self.config.slot_name, seg_start, self._stop_primary, self.options.rpc_timeout)
                return seg_start
            except ReplicationError as e:
                log.info("timeline %s: streaming from the segment start %s: %s; from the page start instead",
                         self.config.timeline, format_lsn(seg_start), e)
        conn.start_replication(self.config.slot_name, page_start(resume), self._stop_primary,
                               self.options.rpc_timeout)
        return page_start(resume)

    def _pageserver_info(self, required: bool) -> pageserver_pb2.TimelineInfo | None:
        """The timeline as the page server sees it (writer epoch checked); None if unreachable and
        not `required`: with WAL kept here, the primary side does not need the page server."""
        with self._channel() as channel:
            try:
                info = get_timeline(pageserver_pb2_grpc.PageServerStub(channel), self.config.tenant,
                                    self.config.timeline, self.pageserver, self.options.rpc_timeout)
            except PageServerError:
                if required:
                    raise
                return None
        check_writer(info, self.config.writer_epoch)
        return info

    def _open_existing(self) -> None:
        """Take up the WAL kept here by an earlier run, if any: its valid records are durable."""
        wal = TimelineWal.open(self.wal_dir)
        if wal is None:
            return
        end, last_start = wal.valid_end(*wal.scan_start())
        log.info("timeline %s: the WAL kept in %s is valid up to %s", self.config.timeline, self.wal_dir,
                 format_lsn(end))
        self._use_wal(wal, end, last_start)

    def _use_wal(self, wal: TimelineWal, end: int, last_start: int) -> None:
        with self._changed:
            self._wal = wal
            self._local_end = self._durable_end = end
            self._local_last_start = last_start
            self._changed.notify_all()
        self._update(durable_lsn=end, received_lsn=end)

    def _open_local(self, info: pageserver_pb2.TimelineInfo | None, meta: WalMeta) -> tuple[TimelineWal, int, int]:
        """The local WAL (made now if there is none), where streaming resumes (a record boundary)
        and the start of the record before it (0 if unknown)."""
        cfg = self.config
        with self._changed:
            wal = self._wal
        if wal is not None:
            if (wal.meta.seg_size, wal.meta.system_id) != (meta.seg_size, meta.system_id):
                raise FatalError(f"the WAL kept in {self.wal_dir} is of system {wal.meta.system_id} with "
                                 f"{wal.meta.seg_size}-byte segments; the primary is system {meta.system_id} "
                                 f"with {meta.seg_size}-byte segments")
        else:
            assert info is not None  # required when there is no local WAL
            last = info.last_record_lsn
            if cfg.start_lsn and last and cfg.start_lsn > last:
                raise FatalError(
                    f"the attach start LSN {format_lsn(cfg.start_lsn)} is beyond the end of the timeline's WAL "
                    f"({format_lsn(last)}): streaming from there would leave a gap")
            end = last or cfg.start_lsn or 0
            if end == 0:
                raise FatalError("the timeline has no WAL position yet (not imported); attach with start_lsn")
            last_start = info.prev_record_lsn if last else 0
            wal = TimelineWal.create(self.wal_dir, replace(meta, origin_lsn=end, origin_prev=last_start))
            self._use_wal(wal, end, last_start)
        with self._changed:
            return wal, self._local_end, self._local_last_start

    def _pump(self, conn: PrimaryConnection, wal: TimelineWal, resume: int, prev: int, begin: int) -> None:
        """The streaming loop: receive, write, verify, fsync when the stream pauses, report."""
        opts = self.options
        stop = self._stop_primary
        reader = WalStreamReader(resume, wal.meta.seg_size, expect_sysid=wal.meta.system_id, prev_lsn=prev or None)
        write_pos = begin  # where the next XLogData must start
        unsynced = 0
        healthy_after = time.monotonic() + 2 * opts.backoff_max  # streaming this long without an error
        primary_lsn = self.status().primary_lsn
        reported_flush = -1
        last_reply = 0.0
        last_heard = time.monotonic()
        ping_sent = False
        wake = self._wake_r

        def reply(now: float, request: bool = False) -> None:
            nonlocal reported_flush, last_reply
            durable = self._durable_end
            applied = min(self.status().pageserver_lsn, durable)
            conn.send(standby_status_update(max(write_pos, durable), durable, applied, pg_now_us(), request),
                      stop, opts.rpc_timeout)
            reported_flush, last_reply = durable, now

        def sync() -> None:
            nonlocal unsynced
            wal.sync()
            unsynced = 0
            with self._changed:
                progress = self._local_end > self._durable_end
                self._durable_end = self._local_end
                self._changed.notify_all()
                removable = min(self.status().pageserver_durable_lsn, self._durable_end)
            self._update(durable_lsn=self._durable_end)
            if progress:
                self._recovered()
            if removable:
                wal.remove_before(removable)

        while True:
            if stop.is_set():
                raise Stopped()
            now = time.monotonic()
            if self._durable_end != reported_flush or now - last_reply >= opts.status_interval:
                reply(now)
                if now >= healthy_after:
                    self._recovered()

            # Take in what has arrived.
            drained = False
            n = 0
            while n < 64:
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
                if msg.start != write_pos:
                    raise ReplicationError(f"the primary sent WAL at {format_lsn(msg.start)}, "
                                           f"expected {format_lsn(write_pos)}")
                wal.write(msg.start, msg.data)
                write_pos += len(msg.data)
                unsynced += len(msg.data)
                primary_lsn = max(primary_lsn, msg.wal_end, write_pos)
                skip = max(0, reader.position - msg.start)  # bytes before `resume`: kept, not parsed
                reader.feed(msg.data[skip:])
                last = None
                try:
                    for last in reader.records():  # raises before yielding a bad record
                        pass
                except FormatError:
                    if last is not None:
                        self._local_end, self._local_last_start = last.end_lsn, last.lsn
                    sync()  # the records before the bad one are good: durable and reported
                    reply(time.monotonic())
                    raise
                if last is not None:
                    # Only this thread reads these (sync(), the next session's resume): no lock.
                    self._local_end, self._local_last_start = last.end_lsn, last.lsn
                if unsynced >= _SYNC_BYTES:
                    break
            if n:
                self._update(received_lsn=write_pos, primary_lsn=primary_lsn)
            if unsynced and (drained or unsynced >= _SYNC_BYTES):
                sync()
                continue
            if not drained:
                continue  # more is buffered already

            # Wait for the socket or a timer.
            timeout = last_reply + opts.status_interval - now
            silence = now - last_heard
            if silence >= opts.receiver_timeout:
                raise ReplicationError(f"no message from the primary for {silence:.0f} s")
            if silence >= opts.receiver_timeout / 2 and not ping_sent:
                reply(now, request=True)
                ping_sent = True
            timeout = max(0.0, min(timeout, opts.receiver_timeout - silence))
            sock = conn.socket
            r, w, _ = select.select([wake, sock], [sock] if conn.wants_write else [], [], timeout)
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

    # -- the feeder -------------------------------------------------------------------------------

    def _run_feed(self) -> None:
        def failed(message: str, delay: float) -> None:
            self._update(pageserver_error=message)
            log.warning("timeline %s: feeding the page server: %s; again in %.2f s", self.config.timeline, message,
                        delay)

        self._supervise(self._feed_session, self._stop, lambda: self.status().pageserver_lsn, failed,
                        "feeding the page server")

    def _on_ack(self, received: int, durable: int) -> None:
        with self._changed:
            with self._lock:
                st = self._status
                self._status = replace(st, pageserver_lsn=max(st.pageserver_lsn, received),
                                       pageserver_durable_lsn=max(st.pageserver_durable_lsn, durable))
            self._changed.notify_all()
        self._wake()  # the primary side reports the new apply position and may remove segments

    def _feed_session(self) -> None:
        opts = self.options
        cfg = self.config
        with self._changed:
            while self._wal is None:
                if self._stop.is_set():
                    raise Stopped()
                self._changed.wait(0.5)
            wal = self._wal
        with self._channel() as channel:
            stub = pageserver_pb2_grpc.PageServerStub(channel)
            info = get_timeline(stub, cfg.tenant, cfg.timeline, self.pageserver, opts.rpc_timeout)
            check_writer(info, cfg.writer_epoch)
            start = info.last_record_lsn
            kept = wal.scan_start()[0]
            if start < kept:
                raise FatalError(f"the page server's WAL of timeline {cfg.timeline} ends at {format_lsn(start)}, "
                                 f"but the WAL kept here begins at {format_lsn(kept)}: the records between are lost")
            self._on_ack(start, info.durable_lsn)
            feed = Feed(stub, cfg.tenant, cfg.timeline, wal, start, cfg.writer_epoch, self._on_ack,
                        opts.max_batch_records, opts.max_batch_bytes, opts.max_inflight)
            self._update(pageserver_error="")
            graceful = False
            try:
                while True:
                    if self._stop.is_set():
                        graceful = True
                        raise Stopped()
                    with self._changed:
                        durable_end = self._durable_end
                    if not feed.step(durable_end, draining=self._stop_primary.is_set()):
                        with self._changed:
                            self._changed.wait(0.2)
            finally:
                feed.close(graceful, opts.drain_timeout)
