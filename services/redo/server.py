"""The Redo gRPC service (protos/zproto/redo.proto) in front of a RedoPool.

This process only routes: each request goes, serialized, to the pool, whose
workers check it (key, base image, LSN order), decode and CRC-check its
records and apply them. The unary RPC waits for its one job.

The stream RPC does no per-page work here: `add_to_server` registers it with
bytes in and bytes out, each message (cut into groups of at most
`group_pages` items) goes to the pool as one group job, and the worker's
answer, a serialized ApplyRecordsStreamResponse, is sent back as it is.
Groups complete in any order; inside a group the items keep their order. A
group the pool could not run (worker lost, cancelled, shutting down) is
answered with that error on each of its items.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent import futures
from collections.abc import Iterator
from typing import Any, Final

import grpc

from zproto import redo_pb2, redo_pb2_grpc

from google.protobuf.message import DecodeError

from .pool import (
    CANCELLED,
    FAILED_PRECONDITION,
    HOOK_CRASH,
    HOOK_HANG,
    HOOK_NONE,
    UNIMPLEMENTED,
    CancelToken,
    GroupResult,
    Job,
    JobError,
    PageResult,
    RedoPool,
    redo_failure,
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
    return redo_failure(err.code, err.message, err.lsn, err.rmid, err.info)


class RedoServicer(redo_pb2_grpc.RedoServicer):
    """zenith.v1.Redo backed by a RedoPool."""

    def __init__(
        self, pool: RedoPool, *, test_hooks: bool = False, stream_window: int = 1024,
        max_items_per_response: int = 256, group_pages: int = 32,
    ) -> None:
        self.pool = pool
        self.test_hooks = test_hooks
        self.stream_window = stream_window
        self.max_items_per_response = max_items_per_response
        self.group_pages = group_pages

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
        if isinstance(result, GroupResult):  # pragma: no cover - a unary job is never a group
            context.abort(grpc.StatusCode.INTERNAL, "BUG: a group answer to a unary request")
        if result.code in _FAILURE_METADATA_CODES:
            context.set_trailing_metadata(((FAILURE_METADATA_KEY, failure_message(result).SerializeToString()),))
        if result.code != CANCELLED:
            log.info("redo request failed", extra={"code": result.code, "error": result.message})
        context.abort(grpc.StatusCode[result.code], result.message)

    # -- stream -----------------------------------------------------------

    def ApplyRecordsStream(
        self, request_iterator: Iterator[redo_pb2.ApplyRecordsStreamRequest], context: grpc.ServicerContext,
    ) -> Iterator[redo_pb2.ApplyRecordsStreamResponse]:
        """The stream with messages in and out (as the generated add_RedoServicer_to_server registers
        it); `add_to_server` registers `apply_records_stream_raw` instead, without these conversions."""
        raw = (msg.SerializeToString() for msg in request_iterator)
        for data in self.apply_records_stream_raw(raw, context):
            yield redo_pb2.ApplyRecordsStreamResponse.FromString(data)

    def apply_records_stream_raw(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """ApplyRecordsStream over serialized messages: serialized ApplyRecordsStreamResponses out."""
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
                msg = out.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    token.cancel()
                    return
                continue
            if msg[0] is done:
                expected = msg[1]
                if msg[2] is not None:
                    token.cancel()
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg[2])
                continue
            ids, result = msg
            answered += len(ids)
            for _ in ids:
                window.release()
            if isinstance(result, GroupResult):
                yield result.response
                continue
            # The whole group failed: every item gets the error.
            assert isinstance(result, JobError), result
            for i in range(0, len(ids), self.max_items_per_response):
                part = ids[i:i + self.max_items_per_response]
                yield redo_pb2.ApplyRecordsStreamResponse(
                    items=[_result_item(rid, result) for rid in part]).SerializeToString()

    def _read_stream(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext,
        out: queue.SimpleQueue[Any], window: threading.Semaphore, token: CancelToken, done: object,
    ) -> None:
        submitted = 0
        error: str | None = None
        group = self.group_pages
        try:
            for data in request_iterator:
                try:
                    msg = redo_pb2.ApplyRecordsStreamRequest.FromString(data)
                except DecodeError as e:
                    error = f"stream message #{submitted} does not parse: {e}"
                    return
                items = msg.items
                n = len(items)
                jobs: list[Job] = []
                for start in range(0, n, group):
                    part = items[start:start + group]
                    ids = [item.request_id for item in part]
                    for _ in ids:
                        while not window.acquire(timeout=0.5):
                            if token.cancelled or not context.is_active():
                                self.pool.submit_many(jobs)  # dropped by the pool, answered CANCELLED
                                return
                    payload = data if n <= group else redo_pb2.ApplyRecordsStreamRequest(items=part).SerializeToString()
                    jobs.append(Job(payload, lambda res, ids=ids: out.put((ids, res)), token, pages=len(ids)))
                    submitted += len(ids)
                self.pool.submit_many(jobs)
        except grpc.RpcError:
            pass  # the client went away; what was submitted still gets answered (or dropped)
        except Exception:
            log.exception("BUG: reading the ApplyRecordsStream requests failed")
        finally:
            out.put((done, submitted, error))


def add_to_server(servicer: RedoServicer, server: grpc.Server) -> None:
    """Register zenith.v1.Redo: ApplyRecords with messages, ApplyRecordsStream with bytes in and
    out (the workers parse the requests and build the responses)."""
    handlers = {
        "ApplyRecords": grpc.unary_unary_rpc_method_handler(
            servicer.ApplyRecords,
            request_deserializer=redo_pb2.ApplyRecordsRequest.FromString,
            response_serializer=redo_pb2.ApplyRecordsResponse.SerializeToString,
        ),
        "ApplyRecordsStream": grpc.stream_stream_rpc_method_handler(servicer.apply_records_stream_raw),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(SERVICE_NAME, handlers)


def _result_item(request_id: int, result: PageResult | JobError) -> redo_pb2.ApplyRecordsResultItem:
    if isinstance(result, PageResult):
        return redo_pb2.ApplyRecordsResultItem(
            request_id=request_id, page=redo_pb2.ApplyRecordsResponse(page=result.page, page_lsn=result.page_lsn),
        )
    return redo_pb2.ApplyRecordsResultItem(request_id=request_id, error=failure_message(result))
