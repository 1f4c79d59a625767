"""The Redo gRPC service (protos/zproto/redo.proto) in front of a RedoPool.

This process only routes: each request goes, serialized, to the pool, whose
workers check it (key, base image, LSN order), decode and CRC-check its
records and apply them. The unary RPC waits for its one job; the stream RPC
submits each message's items as one group and sends results back, batched,
as they complete (in any order).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent import futures
from collections.abc import Iterator
from typing import Any, Final

import grpc

from pgformat.rmgr import rmgr_name
from zproto import redo_pb2, redo_pb2_grpc

from .pool import (
    CANCELLED,
    FAILED_PRECONDITION,
    HOOK_CRASH,
    HOOK_HANG,
    HOOK_NONE,
    UNIMPLEMENTED,
    CancelToken,
    Job,
    JobError,
    JobResult,
    PageResult,
    RedoPool,
)

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "zenith.v1.Redo"
FAILURE_METADATA_KEY: Final = "zenith-redo-failure-bin"
# Request metadata honored only when the server runs with test hooks: the
# worker that picks the job exits abruptly, or hangs (crash-recovery tests).
TEST_HOOK_METADATA_KEY: Final = "zenith-test-hook"
_TEST_HOOKS: Final = {"crash-worker": HOOK_CRASH, "hang-worker": HOOK_HANG}

# Failures that carry the structured RedoFailure in trailing metadata.
_FAILURE_METADATA_CODES: Final = frozenset({UNIMPLEMENTED, FAILED_PRECONDITION})
MAX_MESSAGE_BYTES: Final = 256 << 20


def failure_message(err: JobError) -> redo_pb2.RedoFailure:
    try:
        name = rmgr_name(err.rmid) if err.lsn else ""
    except ValueError:
        name = ""
    return redo_pb2.RedoFailure(
        code=grpc.StatusCode[err.code].value[0], message=err.message, lsn=err.lsn,
        rmid=err.rmid, rmgr_name=name, info=err.info,
    )


class RedoServicer(redo_pb2_grpc.RedoServicer):
    """zenith.v1.Redo backed by a RedoPool."""

    def __init__(
        self, pool: RedoPool, *, test_hooks: bool = False, stream_window: int = 1024,
        max_items_per_response: int = 256,
    ) -> None:
        self.pool = pool
        self.test_hooks = test_hooks
        self.stream_window = stream_window
        self.max_items_per_response = max_items_per_response

    # -- unary ------------------------------------------------------------

    def ApplyRecords(
        self, request: redo_pb2.ApplyRecordsRequest, context: grpc.ServicerContext,
    ) -> redo_pb2.ApplyRecordsResponse:
        hook = HOOK_NONE
        if self.test_hooks:
            for k, v in context.invocation_metadata():
                if k == TEST_HOOK_METADATA_KEY:
                    hook = _TEST_HOOKS.get(str(v), HOOK_NONE)
        token = CancelToken()
        context.add_callback(token.cancel)
        fut = self.pool.apply(request.SerializeToString(), hook=hook, token=token)
        remaining = context.time_remaining()
        wait = self.pool.job_timeout + 10.0 if remaining is None else min(remaining, self.pool.job_timeout + 10.0)
        try:
            result = fut.result(timeout=max(wait, 0.0))
        except futures.TimeoutError:
            token.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "redo did not finish in time")
        if isinstance(result, PageResult):
            return redo_pb2.ApplyRecordsResponse(page=result.page, page_lsn=result.page_lsn)
        if result.code in _FAILURE_METADATA_CODES:
            context.set_trailing_metadata(((FAILURE_METADATA_KEY, failure_message(result).SerializeToString()),))
        if result.code != CANCELLED:
            log.info("redo request failed", extra={"code": result.code, "error": result.message})
        context.abort(grpc.StatusCode[result.code], result.message)

    # -- stream -----------------------------------------------------------

    def ApplyRecordsStream(
        self, request_iterator: Iterator[redo_pb2.ApplyRecordsStreamRequest], context: grpc.ServicerContext,
    ) -> Iterator[redo_pb2.ApplyRecordsStreamResponse]:
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        window = threading.Semaphore(self.stream_window)
        token = CancelToken()
        context.add_callback(token.cancel)
        done = object()
        reader = threading.Thread(
            target=self._read_stream, args=(request_iterator, context, out, window, token, done),
            name="redo-stream-reader", daemon=True,
        )
        reader.start()
        expected: int | None = None
        answered = 0
        while expected is None or answered < expected:
            try:
                first = out.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    token.cancel()
                    return
                continue
            items: list[redo_pb2.ApplyRecordsResultItem] = []
            msg: Any = first
            while True:
                if isinstance(msg, tuple) and len(msg) == 2 and msg[0] is done:
                    expected = msg[1]
                else:
                    items.append(_result_item(*msg))
                    answered += 1
                    window.release()
                if len(items) >= self.max_items_per_response:
                    break
                try:
                    msg = out.get_nowait()
                except queue.Empty:
                    break
            if items:
                yield redo_pb2.ApplyRecordsStreamResponse(items=items)

    def _read_stream(
        self, request_iterator: Iterator[redo_pb2.ApplyRecordsStreamRequest], context: grpc.ServicerContext,
        out: queue.SimpleQueue[Any], window: threading.Semaphore, token: CancelToken, done: object,
    ) -> None:
        submitted = 0
        try:
            for msg in request_iterator:
                jobs: list[Job] = []
                for item in msg.items:
                    while not window.acquire(timeout=0.5):
                        if token.cancelled or not context.is_active():
                            self.pool.submit_many(jobs)  # dropped by the pool, answered CANCELLED
                            return
                    submitted += 1
                    rid = item.request_id
                    jobs.append(Job(item.request.SerializeToString(), lambda res, rid=rid: out.put((rid, res)), token))
                self.pool.submit_many(jobs)
        except grpc.RpcError:
            pass  # the client went away; what was submitted still gets answered (or dropped)
        except Exception:
            log.exception("BUG: reading the ApplyRecordsStream requests failed")
        finally:
            out.put((done, submitted))


def _result_item(request_id: int, result: JobResult) -> redo_pb2.ApplyRecordsResultItem:
    if isinstance(result, PageResult):
        return redo_pb2.ApplyRecordsResultItem(
            request_id=request_id, page=redo_pb2.ApplyRecordsResponse(page=result.page, page_lsn=result.page_lsn),
        )
    return redo_pb2.ApplyRecordsResultItem(request_id=request_id, error=failure_message(result))
