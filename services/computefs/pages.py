"""The lazy compute's view of the page server: its relations and their pages at one LSN (gRPC client).

One kernel read (up to 128 KB with readahead) is one GetPages call carrying all
its blocks in one message. Pages get their data checksums here when the
cluster has them on, as a base backup sets them (the page server keeps pages
without). A page server that is briefly away (UNAVAILABLE) is retried for a
bounded time; any other failure is an I/O error for the read that needed it.
Calls carry the token and use the TLS CA given (services/auth.py), as every
other client of the page server does.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from pgformat.checksum import with_checksums
from services.auth import ClientSecurity
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

from .segments import RemoteFork

log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 64 << 20
T = TypeVar("T")


class PageSourceError(RuntimeError):
    """The page server could not answer; carries the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class RelationSize:
    fork: RemoteFork
    nblocks: int


class PageSource:
    """Reads of one timeline at one LSN."""

    def __init__(self, address: str, tenant: str, timeline: str, lsn: int, *, checksums: bool,
                 retry_seconds: float = 30.0, security: ClientSecurity | None = None) -> None:
        self._channel = (security or ClientSecurity()).channel(address, [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)])
        self._stub = pageserver_pb2_grpc.PageServerStub(self._channel)
        self._tenant = common_pb2.TenantId(id=tenant)
        self._timeline = common_pb2.TimelineId(id=timeline)
        self._lsn = common_pb2.RequestLsn(lsn=lsn)
        self._checksums = checksums
        self._retry_seconds = retry_seconds
        self._ids = itertools.count(1)
        self.pages_fetched = 0
        self.calls = 0

    def close(self) -> None:
        self._channel.close()

    def list_relations(self) -> list[RelationSize]:
        """Every relation fork at the LSN with its size."""
        def call() -> pageserver_pb2.ListRelationsResponse:
            return self._stub.ListRelations(pageserver_pb2.ListRelationsRequest(
                tenant=self._tenant, timeline=self._timeline, lsn=self._lsn), timeout=120)

        resp = self._retrying("ListRelations", call)
        return [RelationSize(RemoteFork(r.rel.spc_oid, r.rel.db_oid, r.rel.rel_number, r.rel.fork), r.nblocks)
                for r in resp.rels]

    def get_pages(self, fork: RemoteFork, blknos: Sequence[int]) -> dict[int, bytes]:
        """The pages of `fork` at the LSN, by relation block number, in one GetPages call."""
        if not blknos:
            return {}
        rel = common_pb2.RelTag(spc_oid=fork.spc, db_oid=fork.db, rel_number=fork.rel, fork=fork.fork)
        ids = {next(self._ids): b for b in blknos}
        request = pageserver_pb2.GetPagesRequest(tenant=self._tenant, timeline=self._timeline, pages=[
            pageserver_pb2.PageRequestItem(request_id=i, lsn=self._lsn, key=common_pb2.PageKey(
                rel_block=common_pb2.RelBlock(rel=rel, blkno=b))) for i, b in ids.items()])

        def call() -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            for resp in self._stub.GetPages(iter([request]), timeout=120):
                for item in resp.pages:
                    blk = ids[item.request_id]
                    if item.WhichOneof("result") == "error":
                        raise PageSourceError(f"block {blk} of {fork}: {item.error.message}",
                                              grpc.StatusCode.INTERNAL)
                    out[blk] = item.page.page
                if len(out) == len(ids):
                    break
            if len(out) != len(ids):
                raise PageSourceError(f"GetPages answered {len(out)} of {len(ids)} pages of {fork}",
                                      grpc.StatusCode.INTERNAL)
            return out

        pages = self._retrying("GetPages", call)
        self.calls += 1
        self.pages_fetched += len(pages)
        if self._checksums:
            pages = {b: with_checksums([p], b)[0] for b, p in pages.items()}
        return pages

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        deadline = time.monotonic() + self._retry_seconds
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    log.warning("page server unavailable, retrying", extra={"call": what})
                    time.sleep(0.5)
                    continue
                raise PageSourceError(f"{what}: {e.details()}", code) from None
