"""`pagestream_v2|v3 <tenant> <timeline>`: Neon's page service over CopyBoth.

Requests are answered in order, but not one at a time: everything the
client has sent so far is parsed as one batch, GetPage requests go to the
page server together on one GetPages stream, and the answers are written
back in request order as they complete. Per-request failures (no such
relation, LSN too old) are pagestream Error responses and the stream goes
on; a malformed message is a protocol violation that ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any

import grpc

from pgformat import pagestream as ps
from pgformat import wire
from pgformat.wire import ProtocolError, SqlState
from zproto import common_pb2, pageserver_pb2

from .errors import ClientGone, ShimError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("zenith.pgshim.pagestream")

MAX_IN_FLIGHT = 256  # requests parsed but not yet answered; reading pauses beyond this

# Neon's SLRU kind numbers -> ours.
_SLRU_KIND = {
    ps.SLRU_CLOG: common_pb2.SLRU_KIND_CLOG,
    ps.SLRU_MULTIXACT_MEMBERS: common_pb2.SLRU_KIND_MULTIXACT_MEMBERS,
    ps.SLRU_MULTIXACT_OFFSETS: common_pb2.SLRU_KIND_MULTIXACT_OFFSETS,
}


class _RequestError(Exception):
    """One request failed; answered with a pagestream Error, the stream continues."""


def _request_lsn(req: ps.PagestreamRequest) -> common_pb2.RequestLsn:
    if req.request_lsn == 0:
        raise _RequestError("invalid LSN(0) in request")
    if req.request_lsn != ps.LSN_MAX and req.not_modified_since > req.request_lsn:
        raise _RequestError(f"invalid request with request LSN {req.request_lsn:X} and "
                            f"not_modified_since {req.not_modified_since:X}")
    if req.request_lsn == ps.LSN_MAX:
        return common_pb2.RequestLsn(latest=True, not_modified_since=req.not_modified_since)
    return common_pb2.RequestLsn(lsn=req.request_lsn, not_modified_since=req.not_modified_since)


def _rel(req: ps.PagestreamRequest) -> common_pb2.RelTag:
    return common_pb2.RelTag(spc_oid=req.spc, db_oid=req.db, rel_number=req.rel, fork=req.fork)


class _GetPagesStream:
    """One GetPages call per session; futures resolved by request id."""

    def __init__(self, stub: Any, tenant: str, timeline: str) -> None:
        self.call = stub.GetPages()
        self.ids = {"tenant": common_pb2.TenantId(id=tenant), "timeline": common_pb2.TimelineId(id=timeline)}
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.counter = itertools.count(1)
        self.reader = asyncio.ensure_future(self._read())

    def add(self, items: list[Any], req: ps.PagestreamRequest) -> asyncio.Future[Any]:
        lsn = _request_lsn(req)
        rid = next(self.counter)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        items.append(pageserver_pb2.PageRequestItem(
            request_id=rid, lsn=lsn,
            key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=_rel(req), blkno=req.blkno))))
        return fut

    async def send(self, items: list[Any]) -> None:
        if items:
            await self.call.write(pageserver_pb2.GetPagesRequest(pages=items, **self.ids))

    async def _read(self) -> None:
        try:
            async for resp in self.call:
                for item in resp.pages:
                    fut = self.waiting.pop(item.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(item)
            err: BaseException = ShimError(SqlState.CONNECTION_FAILURE, "page server ended the GetPages stream")
        except grpc.aio.AioRpcError as e:
            err = ShimError(SqlState.CONNECTION_FAILURE, f"page server GetPages stream failed: {e.details()}")
        except asyncio.CancelledError:
            err = ShimError(SqlState.QUERY_CANCELED, "pagestream closed")
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self.waiting.clear()

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


async def _answer_get_page(req: ps.PagestreamRequest, version: int, fut: asyncio.Future[Any]) -> bytes:
    item = await fut
    if item.HasField("error"):
        return ps.error_response(req, version, item.error.message)
    return ps.get_page_response(req, version, item.page.page)


async def _answer_unary(session: Session, req: ps.PagestreamRequest, version: int, tenant: str,
                        timeline: str) -> bytes:
    client = session.client
    ids = client.ids(tenant, timeline)
    stub = client.stub
    try:
        lsn = _request_lsn(req)
        if req.tag == ps.RequestTag.EXISTS:
            r = await stub.RelExists(pageserver_pb2.RelExistsRequest(rel=_rel(req), lsn=lsn, **ids),
                                     timeout=client.rpc_timeout)
            return ps.exists_response(req, version, r.exists)
        if req.tag == ps.RequestTag.NBLOCKS:
            try:
                r = await stub.RelSize(pageserver_pb2.RelSizeRequest(rel=_rel(req), lsn=lsn, **ids),
                                       timeout=client.rpc_timeout)
                return ps.nblocks_response(req, version, r.nblocks)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # Neon answers 0 for a missing fork
                    return ps.nblocks_response(req, version, 0)
                raise
        if req.tag == ps.RequestTag.DB_SIZE:
            r = await stub.DbSize(pageserver_pb2.DbSizeRequest(db_oid=req.db, lsn=lsn, **ids),
                                  timeout=client.rpc_timeout)
            return ps.db_size_response(req, version, r.size_bytes)
        kind = _SLRU_KIND.get(req.slru_kind)
        if kind is None:
            raise _RequestError(f"unknown SLRU kind {req.slru_kind}")
        r = await stub.GetSlruSegment(pageserver_pb2.GetSlruSegmentRequest(kind=kind, segno=req.segno, lsn=lsn, **ids),
                                      timeout=client.rpc_timeout)
        return ps.slru_segment_response(req, version, r.segment)
    except _RequestError as e:
        return ps.error_response(req, version, str(e))
    except grpc.aio.AioRpcError as e:
        return ps.error_response(req, version, f"{req.tag.name}: {e.details()}")


async def serve(session: Session, tenant: str, timeline: str, version: int) -> None:
    """The CopyBoth loop: read request batches, answer them in order."""
    client = session.client
    info = await client.resolve_timeline(tenant, timeline)  # clear error before entering COPY
    timeline = info.timeline.id
    session.send(wire.copy_both_response())
    await session.flush()
    pages = _GetPagesStream(client.stub, tenant, timeline)
    answers: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(MAX_IN_FLIGHT)
    writer = asyncio.ensure_future(_write_answers(session, answers))
    try:
        while True:
            batch = await session.recv_batch()
            items: list[Any] = []
            done = False
            for kind, body in batch:
                if kind == b"d":
                    req = ps.parse_request(body, version)  # PagestreamError is a ProtocolError-like FormatError
                    if req.tag == ps.RequestTag.GET_PAGE:
                        try:
                            fut = pages.add(items, req)
                            answer = asyncio.ensure_future(_answer_get_page(req, version, fut))
                        except _RequestError as e:
                            answer = _ready(ps.error_response(req, version, str(e)))
                    else:
                        answer = asyncio.ensure_future(_answer_unary(session, req, version, tenant, timeline))
                    if answers.full():  # send what is batched before waiting for room
                        await pages.send(items)
                        items = []
                    await answers.put(answer)
                elif kind == b"c":
                    done = True
                    break
                elif kind == b"X":
                    raise ClientGone()
                elif kind == b"f":
                    raise ShimError(SqlState.QUERY_CANCELED, "COPY from the client failed: "
                                    + wire.parse_copy_fail(body))
                else:
                    raise ProtocolError(f"unexpected message type {kind[0]!r} during pagestream COPY")
            await pages.send(items)
            if done:
                await answers.put(None)
                await writer
                session.send(wire.COPY_DONE)
                session.send(wire.command_complete("COPY 0"))
                return
            if writer.done():
                writer.result()  # raises what ended it
    except ps.PagestreamError as e:
        raise ProtocolError(f"malformed pagestream request: {e}") from None
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        await pages.close()


def _ready(data: bytes) -> asyncio.Future[bytes]:
    fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    fut.set_result(data)
    return fut


async def _write_answers(session: Session, answers: asyncio.Queue[asyncio.Future[bytes] | None]) -> None:
    while True:
        fut = await answers.get()
        if fut is None:
            await session.flush()
            return
        session.send(wire.copy_data(await fut))
        if answers.empty():
            await session.flush()
