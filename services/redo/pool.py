"""A pool of redo worker processes behind duplex pipes.

The redo of a page is CPU-bound pure Python, so the pool runs it in N
worker processes (multiprocessing with spawn or forkserver; never plain fork,
the parent has gRPC threads. spawn is the default: a forkserver killed by a
group-wide SIGTERM would take every worker's exit-status pipe with it).
Each worker owns one duplex Pipe. Jobs wait in one shared queue; every
worker slot has a sender thread that takes a fair share of the queue as one
batch (one pipe message) whenever the worker has a free in-flight slot, and a
receiver thread that reads results, watches the process sentinel and replaces
a worker that dies or runs one job past the deadline. After each job a
worker sends the results it holds if PARTIAL_FLUSH_SECONDS have passed since
its last answer, so a long batch does not hold back every result to its end.
Jobs in flight on a lost worker fail with UNAVAILABLE (DEADLINE_EXCEEDED for
the job that overran); nothing waits forever.

Wire format (pickled tuples, nothing else crosses the pipe):

    parent -> worker  (batch_id, [(request, hook, kind), ...]) or None to stop
                      kind KIND_PAGE: request = a serialized
                      zenith.v1.ApplyRecordsRequest (one page);
                      kind KIND_GROUP: request = a serialized
                      ApplyRecordsStreamRequest (many pages, answered
                      together as one serialized ApplyRecordsStreamResponse);
                      hook = 0, or a test hook honored only by workers
                      started with test_hooks (HOOK_CRASH: exit at once;
                      HOOK_HANG: sleep forever)
    worker -> parent  ("ready", pid) once, then for each batch one or more
                      (batch_id, offset, [result, ...], final): the results
                      of jobs offset.. of the batch, sent whenever the batch
                      has run PARTIAL_FLUSH_SECONDS since the last answer
                      and at its end
                      result = (True, page, page_lsn)
                             | (False, code, message, lsn, rmid, info)
                             | (GROUP, serialized ApplyRecordsStreamResponse)

`code` is a gRPC status code name; this module does not import grpc (it
reads the request messages with protobuf).

A group job is how a stream's message reaches the workers: the gRPC process
forwards the message's bytes and the answer's bytes, so its per-page work is
nothing (see server.py); the worker redoes the group's pages one after the
other and builds the answer.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Final

from google.protobuf.message import DecodeError

from pgformat.constants import BLCKSZ
from pgformat.errors import FormatError
from pgformat.lsn import format_lsn
from pgformat.page import page_get_lsn
from pgformat.rmgr import rmgr_name
from pgformat.xlogrecord import DecodedBlock, DecodedRecord, RelFileNode, decode_record
from pgredo.engine import BufferTag, apply_block, apply_record, find_block, implied_tags
from pgredo.errors import RedoFailedError, UnsupportedRecordError
from pgredo.slru import SLRU_PAGES_PER_SEGMENT, SlruKind, SlruPageTag, slru_redo_page, slru_tags_for_record
from zproto import common_pb2, redo_pb2

log = logging.getLogger(__name__)

# Status code names (grpc.StatusCode member names).
INVALID_ARGUMENT: Final = "INVALID_ARGUMENT"
UNIMPLEMENTED: Final = "UNIMPLEMENTED"
FAILED_PRECONDITION: Final = "FAILED_PRECONDITION"
UNAVAILABLE: Final = "UNAVAILABLE"
DEADLINE_EXCEEDED: Final = "DEADLINE_EXCEEDED"
CANCELLED: Final = "CANCELLED"
INTERNAL: Final = "INTERNAL"

# (spc, db, rel, fork, blkno) for a relation block; (pgredo.slru.SlruKind, segno, pageno) for an SLRU page.
RelKey = tuple[int, int, int, int, int]
SlruKey = tuple[int, int, int]
PageKey = RelKey | SlruKey
WireRecord = tuple[int, int, bytes]
WireJob = tuple[bytes, int, int]

KIND_PAGE: Final = 0
KIND_GROUP: Final = 1
GROUP: Final = "group"  # the first element of a group job's result

# A worker answers the finished part of a batch at least this often.
PARTIAL_FLUSH_SECONDS: Final = 0.02

# Test hooks (honored only when the pool runs with test_hooks=True).
HOOK_NONE: Final = 0
HOOK_CRASH: Final = 1
HOOK_HANG: Final = 2

# Modules the forkserver imports once, so each new worker starts warm.
_PRELOAD: Final = ["services.redo.pool", "pgredo.engine", "pgredo.rmgrs", "pgformat.xlogrecord"]


@dataclass(frozen=True, slots=True)
class PageResult:
    """The reconstructed page and its pd_lsn."""

    page: bytes
    page_lsn: int


@dataclass(frozen=True, slots=True)
class JobError:
    """Why a job produced no page: a gRPC status code name and a description of the record."""

    code: str
    message: str
    lsn: int = 0
    rmid: int = 0
    info: int = 0


@dataclass(frozen=True, slots=True)
class GroupResult:
    """A group job's answer: a serialized zenith.v1.ApplyRecordsStreamResponse, one item per request."""

    response: bytes


JobResult = PageResult | JobError | GroupResult


class CancelToken:
    """Shared by the jobs of one RPC: once cancelled, queued jobs are dropped (answered CANCELLED)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Job:
    """One page reconstruction, or with `pages` > 0 a group of that many (a serialized
    ApplyRecordsStreamRequest, answered by a GroupResult). `callback` is called exactly
    once, from a pool thread."""

    __slots__ = ("wire", "callback", "token", "nbytes", "weight", "_done")

    def __init__(
        self,
        request: bytes,
        callback: Callable[[JobResult], None],
        token: CancelToken | None = None,
        hook: int = HOOK_NONE,
        pages: int = 0,
    ) -> None:
        self.wire: WireJob = (request, hook, KIND_GROUP if pages else KIND_PAGE)
        self.callback = callback
        self.token = token
        self.nbytes = len(request)
        self.weight = max(pages, 1)  # pages of work, for sharing the queue among the workers
        self._done = False

    def finish(self, result: JobResult) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.callback(result)
        except Exception:  # a broken callback must not take a pool thread down
            log.exception("BUG: redo job callback raised")


class PoolError(RuntimeError):
    """The pool could not start (or restart) its workers."""


# -- the worker process ---------------------------------------------------------


def worker_main(conn: Connection, test_hooks: bool) -> None:
    """Entry point of a worker process: read job batches, answer result batches, until EOF."""
    # Ctrl-C in a terminal reaches the whole process group: let the parent stop us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (e.g. sent to the whole group): finish the batch at hand, answer it, then exit.
    busy = False
    terminating = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal terminating
        if not busy:
            raise SystemExit(0)
        terminating = True

    signal.signal(signal.SIGTERM, on_sigterm)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    from pgredo import rmgrs  # noqa: F401  (registers every rmgr's redo)

    conn.send_bytes(pickle.dumps(("ready", os.getpid()), protocol=pickle.HIGHEST_PROTOCOL))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent went away
        busy = True
        msg = pickle.loads(data)
        if msg is None:
            return
        batch_id, jobs = msg
        results: list[tuple[Any, ...]] = []
        offset = 0
        flushed = time.monotonic()
        try:
            for n, (request, hook, kind) in enumerate(jobs, 1):
                if hook and test_hooks:
                    if hook == HOOK_CRASH:
                        os._exit(70)  # die like a segfaulting worker would
                    if hook == HOOK_HANG:
                        while True:  # spin like a worker stuck in a loop would
                            time.sleep(3600)
                results.append(run_group(request) if kind == KIND_GROUP else run_request(request))
                now = time.monotonic()
                if n == len(jobs) or now - flushed >= PARTIAL_FLUSH_SECONDS:
                    # Answer what is done: a slow job must not hold up its batch mates.
                    conn.send_bytes(pickle.dumps((batch_id, offset, results, n == len(jobs)),
                                                 protocol=pickle.HIGHEST_PROTOCOL))
                    offset, results, flushed = n, [], now
        except (EOFError, OSError):
            return
        busy = False
        if terminating:
            return


def _failure(code: str, message: str, lsn: int = 0, rmid: int = 0, info: int = 0) -> tuple[Any, ...]:
    return (False, code, message, lsn, rmid, info)


def record_label(rmid: int, info: int) -> str:
    """`rmgr=Heap2(9) info=0x60`, as the Redo API's error messages name a record.

    The info shown is the rmgr's part of xl_info (XLR_INFO_MASK's flag bits
    dropped); RedoFailure.info carries the whole byte.
    """
    try:
        name = rmgr_name(rmid)
    except ValueError:
        name = "invalid"
    return f"rmgr={name}({rmid}) info=0x{info & 0xF0:02X}"


# -- requests ------------------------------------------------------------------

SUPPORTED_PG_VERSIONS: Final = frozenset({0, 15})  # 0: unset, means 15
INVALID_BLOCK_NUMBER: Final = 0xFFFFFFFF
MAX_FORKNUM: Final = 3
SIZE_OF_XLOG_RECORD: Final = 24
_TENANT_ID = re.compile(r"^[0-9a-f]{32}$")
_SLRU_KINDS: Final = {
    common_pb2.SLRU_KIND_CLOG: SlruKind.CLOG,
    common_pb2.SLRU_KIND_MULTIXACT_OFFSETS: SlruKind.MULTIXACT_OFFSETS,
    common_pb2.SLRU_KIND_MULTIXACT_MEMBERS: SlruKind.MULTIXACT_MEMBERS,
    common_pb2.SLRU_KIND_COMMIT_TS: SlruKind.COMMIT_TS,
}


class RequestError(Exception):
    """A malformed or unsupported request (found in the worker, before any redo)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_request(req: redo_pb2.ApplyRecordsRequest) -> tuple[PageKey, bytes | None, list[WireRecord]]:
    """The page key, base image and records of a request, or RequestError (INVALID_ARGUMENT / UNIMPLEMENTED).

    Runs in the workers: the gRPC process only forwards the serialized
    request, so per-record work never queues behind its one GIL.
    """
    if req.HasField("tenant") and req.tenant.id and not _TENANT_ID.match(req.tenant.id):
        raise RequestError(INVALID_ARGUMENT, f"tenant id {req.tenant.id!r} is not 32 lowercase hex digits")
    if req.pg_version not in SUPPORTED_PG_VERSIONS:
        raise RequestError(UNIMPLEMENTED, f"records of PostgreSQL {req.pg_version} are not supported (15 only)")
    which = req.key.WhichOneof("key")
    if which is None:
        raise RequestError(INVALID_ARGUMENT, "request has no page key")
    key: PageKey
    if which == "slru_page":
        sp = req.key.slru_page
        kind = _SLRU_KINDS.get(sp.kind)
        if kind is None:
            raise RequestError(INVALID_ARGUMENT, f"invalid SLRU kind {sp.kind}")
        if sp.rpageno >= SLRU_PAGES_PER_SEGMENT:
            raise RequestError(INVALID_ARGUMENT, f"SLRU page {sp.rpageno} is beyond a segment's "
                                                 f"{SLRU_PAGES_PER_SEGMENT} pages")
        key = (int(kind), sp.segno, sp.rpageno)
    else:
        rb = req.key.rel_block
        rel = rb.rel
        if rel.spc_oid == 0 or rel.rel_number == 0:
            raise RequestError(INVALID_ARGUMENT, f"invalid relation {rel.spc_oid}/{rel.db_oid}/{rel.rel_number}")
        if rel.fork > MAX_FORKNUM:
            raise RequestError(INVALID_ARGUMENT, f"invalid fork number {rel.fork}")
        if rb.blkno == INVALID_BLOCK_NUMBER:
            raise RequestError(INVALID_ARGUMENT, "invalid block number 4294967295")
        key = (rel.spc_oid, rel.db_oid, rel.rel_number, rel.fork, rb.blkno)
    base: bytes | None = None
    if req.HasField("base_image"):
        base = req.base_image
        if len(base) != BLCKSZ:
            raise RequestError(INVALID_ARGUMENT, f"base image is {len(base)} bytes, not {BLCKSZ}")
    records: list[WireRecord] = [(r.lsn, r.end_lsn, r.raw) for r in req.records]
    prev_end = 0
    for i, (lsn, end_lsn, raw) in enumerate(records):
        n = len(raw)
        if n < SIZE_OF_XLOG_RECORD:
            raise RequestError(INVALID_ARGUMENT, f"record #{i} is {n} bytes, shorter than a record header")
        if end_lsn - lsn < n or lsn == 0:
            raise RequestError(
                INVALID_ARGUMENT, f"record #{i}: lsn {lsn:X} / end_lsn {end_lsn:X} cannot hold its {n} bytes",
            )
        if lsn < prev_end:
            raise RequestError(INVALID_ARGUMENT, f"records are not in LSN order: record #{i} starts at {lsn:X}, "
                                                 f"before the end of the previous one ({prev_end:X})")
        prev_end = end_lsn
    if base is None and not records:
        raise RequestError(INVALID_ARGUMENT, "no base image and no records")
    return key, base, records


def _decode(records: Sequence[WireRecord]) -> list[DecodedRecord] | tuple[Any, ...]:
    """The records decoded (CRC checked), or an INVALID_ARGUMENT result."""
    decoded: list[DecodedRecord] = []
    for i, (lsn, end_lsn, raw) in enumerate(records):
        try:
            decoded.append(decode_record(raw, lsn, end_lsn, verify_crc=True))
        except FormatError as e:
            return _failure(INVALID_ARGUMENT, f"record #{i} at {format_lsn(lsn)} is not a valid WAL record: {e}", lsn)
    return decoded


def _redo_failure(e: Exception) -> tuple[Any, ...]:
    """The result for an exception of the redo code."""
    if isinstance(e, UnsupportedRecordError):
        return _failure(UNIMPLEMENTED, f"unsupported record {record_label(e.rmid, e.info)} "
                        f"at {format_lsn(e.lsn)}: {e}", e.lsn, e.rmid, e.info)
    if isinstance(e, RedoFailedError):
        return _failure(FAILED_PRECONDITION, f"cannot apply record {record_label(e.rmid, e.info)} "
                        f"at {format_lsn(e.lsn)}: {e}", e.lsn, e.rmid, e.info)
    if isinstance(e, FormatError):  # e.g. a base image whose page header is corrupt
        return _failure(FAILED_PRECONDITION, f"cannot apply the records to this page: {e}")
    log.error("BUG: redo raised %s\n%s", type(e).__name__, "".join(traceback.format_exception(e)))
    return _failure(INTERNAL, f"redo raised {type(e).__name__}: {e}")


def run_request(data: bytes) -> tuple[Any, ...]:
    """A serialized ApplyRecordsRequest in, a result tuple of the wire format out."""
    try:
        req = redo_pb2.ApplyRecordsRequest.FromString(data)
    except DecodeError as e:
        return _failure(INVALID_ARGUMENT, f"request does not parse: {e}")
    return run_parsed_request(req)


def run_parsed_request(req: redo_pb2.ApplyRecordsRequest) -> tuple[Any, ...]:
    """An ApplyRecordsRequest in, a result tuple of the wire format out."""
    try:
        key, base, records = check_request(req)
    except RequestError as e:
        return _failure(e.code, e.message)
    return run_job(key, base, records)


# gRPC status code numbers (grpc.StatusCode values; doc/statuscodes.md), for answers a worker builds.
_STATUS_NUMBERS: Final = {CANCELLED: 1, INVALID_ARGUMENT: 3, DEADLINE_EXCEEDED: 4, FAILED_PRECONDITION: 9,
                          UNIMPLEMENTED: 12, INTERNAL: 13, UNAVAILABLE: 14}


def redo_failure(code: str, message: str, lsn: int = 0, rmid: int = 0, info: int = 0) -> redo_pb2.RedoFailure:
    """The RedoFailure message of a failed page (rmgr named when the failure names a record)."""
    try:
        name = rmgr_name(rmid) if lsn else ""
    except ValueError:
        name = ""
    return redo_pb2.RedoFailure(code=_STATUS_NUMBERS.get(code, 2), message=message, lsn=lsn, rmid=rmid,
                                rmgr_name=name, info=info)


def run_group(data: bytes) -> tuple[Any, ...]:
    """A serialized ApplyRecordsStreamRequest in; (GROUP, serialized ApplyRecordsStreamResponse) out,
    one item per request, in order."""
    try:
        msg = redo_pb2.ApplyRecordsStreamRequest.FromString(data)
    except DecodeError as e:
        return _failure(INVALID_ARGUMENT, f"stream message does not parse: {e}")
    resp = redo_pb2.ApplyRecordsStreamResponse()
    for item in msg.items:
        res = run_parsed_request(item.request)
        out = resp.items.add(request_id=item.request_id)
        if res[0]:
            out.page.page = res[1]
            out.page.page_lsn = res[2]
        else:
            out.error.CopyFrom(redo_failure(*res[1:]))
    return (GROUP, resp.SerializeToString())


def run_job(key: PageKey, base: bytes | None, records: Sequence[WireRecord]) -> tuple[Any, ...]:
    """Decode (CRC checked) and apply `records` to `base`; a result tuple of the wire format."""
    if len(key) == 3:
        return run_slru_job(key, base, records)  # type: ignore[arg-type]
    spc, db, rel, fork, blkno = key  # type: ignore[misc]
    tag = BufferTag(RelFileNode(spc, db, rel), fork, blkno)
    decoded = _decode(records)
    if isinstance(decoded, tuple):
        return decoded
    blocks: list[DecodedBlock | None] = []
    for i, rec in enumerate(decoded):
        lsn = rec.lsn
        block = find_block(rec, tag)
        blocks.append(block)
        if block is None and tag not in implied_tags(rec):
            return _failure(
                INVALID_ARGUMENT,
                f"record #{i} at {format_lsn(lsn)} ({record_label(rec.rmid, rec.info)}) does not change "
                f"rel {tag.rnode} fork {fork} blk {blkno}",
                lsn, rec.rmid, rec.info,
            )
        # A page changed only by implied records may start from zeroes (a map page made
        # without WAL; see pgredo.engine.apply_record); a registered block may not.
        if i == 0 and base is None and block is not None and not (block.will_init or block.apply_image):
            return _failure(
                INVALID_ARGUMENT,
                f"no base image, and the first record at {format_lsn(lsn)} ({record_label(rec.rmid, rec.info)}) "
                f"does not initialize rel {tag.rnode} fork {fork} blk {blkno}",
                lsn, rec.rmid, rec.info,
            )
    if base is None and not decoded:
        return _failure(INVALID_ARGUMENT, f"no base image and no records for rel {tag.rnode} fork {fork} blk {blkno}")
    try:
        # redo_page, with the block of each record found once above.
        page = bytearray(base) if base is not None else None
        for rec, block in zip(decoded, blocks):
            page = apply_record(tag, page, rec) if block is None else apply_block(block, page, rec)
    except Exception as e:
        return _redo_failure(e)
    if page is None or len(page) != BLCKSZ:
        return _failure(INTERNAL, f"BUG: redo produced a {0 if page is None else len(page)}-byte page")
    return (True, bytes(page), page_get_lsn(page))


def run_slru_job(key: SlruKey, base: bytes | None, records: Sequence[WireRecord]) -> tuple[Any, ...]:
    """An SLRU page: no base means an all-zero page; the page LSN is the last record's end."""
    kind, segno, pageno = key
    tag = SlruPageTag(SlruKind(kind), segno, pageno)
    decoded = _decode(records)
    if isinstance(decoded, tuple):
        return decoded
    try:
        for i, rec in enumerate(decoded):
            # Asked for, a commit_ts page is one the commit_ts module keeps.
            if tag not in slru_tags_for_record(rec, track_commit_ts=True):
                return _failure(
                    INVALID_ARGUMENT,
                    f"record #{i} at {format_lsn(rec.lsn)} ({record_label(rec.rmid, rec.info)}) does not change "
                    f"SLRU page {tag}", rec.lsn, rec.rmid, rec.info,
                )
        page = slru_redo_page(tag, base if base is not None else bytes(BLCKSZ), decoded)
    except Exception as e:
        return _redo_failure(e)
    if len(page) != BLCKSZ:
        return _failure(INTERNAL, f"BUG: SLRU redo produced a {len(page)}-byte page")
    return (True, bytes(page), decoded[-1].end_lsn if decoded else 0)


# -- the parent side -----------------------------------------------------------


class _Batch:
    """Jobs sent to a worker as one message; `done` of them are answered."""

    __slots__ = ("jobs", "sent", "progress", "done")

    def __init__(self, jobs: list[Job], sent: float) -> None:
        self.jobs = jobs
        self.sent = sent
        self.progress = sent  # when the worker last answered part of it
        self.done = 0


class _Slot:
    """One worker position: its current process, pipe and in-flight batches."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: BaseProcess | None = None
        self.conn: Connection | None = None
        self.alive = False
        self.restarts = 0
        self.jobs_done = 0
        self.inflight: dict[int, _Batch] = {}
        self.threads: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class RedoPool:
    """N redo worker processes fed from one queue. Thread-safe; use `start()` then `submit*()`."""

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str = "spawn",
        test_hooks: bool = False,
        job_timeout: float = 60.0,
        max_batch: int = 32,
        max_batch_bytes: int = 4 << 20,
        max_inflight_batches: int = 2,
        start_timeout: float = 60.0,
    ) -> None:
        n = workers if workers is not None else (os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"a redo pool needs at least one worker, not {n}")
        if start_method not in multiprocessing.get_all_start_methods():
            start_method = "spawn"
        if start_method == "fork":
            raise ValueError("the fork start method is unsafe next to gRPC threads; use forkserver or spawn")
        self._ctx: BaseContext = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(_PRELOAD)  # type: ignore[attr-defined]
        self.start_method = start_method
        self.test_hooks = test_hooks
        self.job_timeout = job_timeout
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.max_inflight = max_inflight_batches
        self.start_timeout = start_timeout
        self._slots = [_Slot(i) for i in range(n)]
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._queued_weight = 0  # pages of work in the queue (a group job counts its pages)
        self._batch_ids = itertools.count(1)
        self._started = False
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._slots)

    def worker_pids(self) -> list[int | None]:
        with self._cond:
            return [s.pid if s.alive else None for s in self._slots]

    def stats(self) -> list[dict[str, Any]]:
        with self._cond:
            return [
                {"worker": s.index, "pid": s.pid, "alive": s.alive, "restarts": s.restarts,
                 "inflight_batches": len(s.inflight), "jobs_done": s.jobs_done}
                for s in self._slots
            ]

    def start(self) -> None:
        """Start every worker and wait until each has imported the redo code."""
        if self._started:
            raise PoolError("pool already started")
        self._started = True
        t0 = time.monotonic()
        pending: list[tuple[_Slot, BaseProcess, Connection]] = []
        try:
            for slot in self._slots:
                pending.append((slot, *self._launch(slot)))
            for slot, proc, conn in pending:
                self._await_ready(slot, proc, conn)
        except BaseException:
            for _, proc, conn in pending:  # the ones not yet adopted by a slot
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
                conn.close()
            self.close()
            raise
        for slot in self._slots:
            for role, target in (("send", self._sender), ("recv", self._receiver)):
                t = threading.Thread(target=target, args=(slot,), name=f"redo-{role}-{slot.index}", daemon=True)
                slot.threads.append(t)
                t.start()
        log.info("redo workers ready", extra={"workers": self.size, "pids": self.worker_pids(),
                                              "start_method": self.start_method,
                                              "seconds": round(time.monotonic() - t0, 3)})

    def _launch(self, slot: _Slot) -> tuple[BaseProcess, Connection]:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_main, args=(child_conn, self.test_hooks),
            name=f"zenith-redo-worker-{slot.index}", daemon=True,
        )
        proc.start()
        child_conn.close()
        return proc, parent_conn

    def _await_ready(self, slot: _Slot, proc: BaseProcess, conn: Connection) -> None:
        ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout=self.start_timeout)
        msg: Any = None
        if conn in ready:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                msg = None
        if not (isinstance(msg, tuple) and msg[0] == "ready"):
            proc.kill()
            proc.join(5)
            conn.close()
            raise PoolError(f"redo worker {slot.index} did not start (exit code {proc.exitcode})")
        with self._cond:
            slot.proc, slot.conn, slot.alive = proc, conn, True
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting work, fail what is queued, stop every worker (politely, then by force).

        The slot threads are stopped first, so that only this thread waits for
        (reaps) the worker processes. An idle worker gets the stop message; a
        busy one (the gRPC server's grace period is over) is killed.
        """
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            self._queued_weight = 0
            self._cond.notify_all()
        for job in queued:
            job.finish(JobError(UNAVAILABLE, "the redo pool is shutting down"))
        for slot in self._slots:
            for t in slot.threads:
                t.join(5)
        for slot in self._slots:
            if slot.proc is None:
                continue
            with self._cond:
                idle = slot.alive and not slot.inflight
            try:
                if idle and slot.conn is not None:
                    slot.conn.send_bytes(pickle.dumps(None))
                else:
                    slot.proc.kill()
            except (OSError, ValueError):
                slot.proc.kill()
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if slot.proc is None:
                continue
            slot.proc.join(max(0.1, deadline - time.monotonic()))
            if slot.proc.is_alive():
                log.warning("redo worker did not stop; killing it", extra={"worker": slot.index, "pid": slot.pid})
                slot.proc.kill()
                slot.proc.join(5)
            with self._cond:
                leftover = [j for b in slot.inflight.values() for j in b.jobs[b.done:]]
                slot.inflight.clear()
                slot.alive = False
            for job in leftover:
                job.finish(JobError(UNAVAILABLE, "the redo pool is shutting down"))
            if slot.conn is not None:
                slot.conn.close()
        log.info("redo workers stopped", extra={"workers": self.size})

    def __enter__(self) -> RedoPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting work ------------------------------------------------------

    def submit_many(self, jobs: Iterable[Job]) -> None:
        """Queue jobs; each job's callback gets its result later, from a pool thread."""
        batch = list(jobs)
        if not batch:
            return
        with self._cond:
            if not self._stopping and self._started:
                self._queue.extend(batch)
                self._queued_weight += sum(job.weight for job in batch)
                self._cond.notify_all()
                return
        for job in batch:
            job.finish(JobError(UNAVAILABLE, "the redo pool is not running"))

    def submit(self, job: Job) -> None:
        self.submit_many((job,))

    def apply(
        self, request: redo_pb2.ApplyRecordsRequest | bytes, hook: int = HOOK_NONE,
        token: CancelToken | None = None,
    ) -> Future[JobResult]:
        """One job; a Future of its PageResult or JobError."""
        data = request if isinstance(request, bytes) else request.SerializeToString()
        fut: Future[JobResult] = Future()
        self.submit(Job(data, fut.set_result, token, hook))
        return fut

    # -- per-worker threads ----------------------------------------------------

    def _take_batch_locked(self) -> list[Job]:
        """A fair share of the queue for one worker (called with the lock held)."""
        alive = sum(1 for s in self._slots if s.alive) or 1
        share = min(self.max_batch, max(1, math.ceil(self._queued_weight / alive)))
        jobs: list[Job] = []
        nbytes = weight = 0
        dropped: list[Job] = []
        while self._queue and weight < share and (not jobs or nbytes < self.max_batch_bytes):
            job = self._queue.popleft()
            self._queued_weight -= job.weight
            if job.token is not None and job.token.cancelled:
                dropped.append(job)
                continue
            jobs.append(job)
            nbytes += job.nbytes
            weight += job.weight
        for job in dropped:  # cheap: the callback only queues a CANCELLED answer
            job.finish(JobError(CANCELLED, "the request was cancelled"))
        return jobs

    def _sender(self, slot: _Slot) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._stopping and not (
                    slot.alive and self._queue and len(slot.inflight) < self.max_inflight
                ):
                    cond.wait()
                if self._stopping:
                    return
                jobs = self._take_batch_locked()
                if not jobs:
                    continue
                batch_id = next(self._batch_ids)
                slot.inflight[batch_id] = _Batch(jobs, time.monotonic())
                conn, proc = slot.conn, slot.proc
            assert conn is not None and proc is not None
            try:
                conn.send_bytes(pickle.dumps((batch_id, [j.wire for j in jobs]), protocol=pickle.HIGHEST_PROTOCOL))
            except (OSError, ValueError) as e:
                # The worker is gone; its receiver fails the batch. Make sure it is really gone.
                log.warning("sending to redo worker failed", extra={"worker": slot.index, "pid": proc.pid,
                                                                    "error": str(e)})
                proc.kill()

    def _receiver(self, slot: _Slot) -> None:
        while not self._stopping:
            conn, proc = slot.conn, slot.proc
            assert conn is not None and proc is not None
            try:
                ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout=0.25)
            except (OSError, ValueError):
                ready = [proc.sentinel]
            if conn in ready:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    proc.join(1)
                    code = proc.exitcode
                    self._replace(slot, "closed its pipe" if code is None else f"exited with code {code}")
                    continue
                self._deliver(slot, data)
                continue
            if proc.sentinel in ready:
                proc.join(1)
                self._replace(slot, f"exited with code {proc.exitcode}")
                continue
            with self._cond:
                progress = [b.progress for b in slot.inflight.values()]
            if progress and time.monotonic() - min(progress) > self.job_timeout:
                proc.kill()
                proc.join(5)
                self._replace(slot, f"was killed: a job ran longer than {self.job_timeout:g} s", overran=True)

    def _deliver(self, slot: _Slot, data: bytes) -> None:
        try:
            batch_id, offset, results, final = pickle.loads(data)
        except Exception:
            log.exception("BUG: unreadable message from redo worker", extra={"worker": slot.index})
            return
        with self._cond:
            batch = slot.inflight.get(batch_id)
            if batch is None:
                return
            batch.done = offset + len(results)
            batch.progress = time.monotonic()
            slot.jobs_done += len(results)
            if final:
                del slot.inflight[batch_id]
                for waiting in slot.inflight.values():  # the worker starts on the next batch now
                    waiting.progress = batch.progress
                self._cond.notify_all()
        for job, res in zip(batch.jobs[offset:offset + len(results)], results):
            if res[0] is True:
                job.finish(PageResult(res[1], res[2]))
            elif res[0] == GROUP:
                job.finish(GroupResult(res[1]))
            else:
                job.finish(JobError(res[1], res[2], res[3], res[4], res[5]))

    def _replace(self, slot: _Slot, reason: str, overran: bool = False) -> None:
        """Fail the lost worker's in-flight jobs, then start a new process in its slot."""
        with self._cond:
            slot.alive = False
            lost = sorted(slot.inflight.values(), key=lambda b: b.sent)
            slot.inflight.clear()
            self._cond.notify_all()
        old_pid = slot.pid
        if slot.proc is not None and slot.proc.is_alive():
            slot.proc.kill()
            slot.proc.join(5)
        if slot.conn is not None:
            slot.conn.close()
        nlost = sum(len(b.jobs) - b.done for b in lost)
        if self._stopping:
            for batch in lost:
                for job in batch.jobs[batch.done:]:
                    job.finish(JobError(UNAVAILABLE, "the redo pool is shutting down"))
            return
        log.warning("redo worker lost; replacing it", extra={"worker": slot.index, "pid": old_pid,
                                                            "reason": reason, "failed_jobs": nlost})
        for n, batch in enumerate(lost):
            for i, job in enumerate(batch.jobs[batch.done:]):
                # The oldest batch's first unanswered job is the one that overran.
                code = DEADLINE_EXCEEDED if overran and n == 0 and i == 0 else UNAVAILABLE
                job.finish(JobError(code, f"redo worker {slot.index} (pid {old_pid}) {reason}; "
                                          f"the request was not completed"))
        delay = 0.05
        while not self._stopping:
            try:
                proc, conn = self._launch(slot)
                self._await_ready(slot, proc, conn)
            except (PoolError, OSError) as e:
                log.error("cannot restart redo worker", extra={"worker": slot.index, "error": str(e)})
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._stopping:  # close() began while we restarted: do not leave this one behind
                assert slot.proc is not None
                slot.proc.kill()
                slot.proc.join(5)
                return
            slot.restarts += 1
            log.info("redo worker restarted", extra={"worker": slot.index, "pid": slot.pid})
            return
