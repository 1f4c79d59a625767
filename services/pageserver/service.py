"""The page server's gRPC API over a Repository.

Every error is a typed exception mapped to one status code here:
NOT_FOUND (unknown tenant, timeline, relation), INVALID_ARGUMENT (malformed
request), DEADLINE_EXCEEDED (the request LSN was not ingested in time),
OUT_OF_RANGE (the request LSN or branch point is below the GC cutoff),
ALREADY_EXISTS, FAILED_PRECONDITION (redo could not build the page; a WAL
gap or fork, or a writer that does not hold the timeline).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from pgformat.constants import BLCKSZ
from pgformat.errors import FormatError
from pgformat.lsn import format_lsn
from pgformat.xlogrecord import DecodedRecord, decode_record
from pgredo.errors import RedoError, UnsupportedRecordError
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

from .storage.errors import LayerCorruptError, ManifestError, StorageError
from .keys import CONTROL_FILE_KEY, KeyKind, RelTag, relmap_key, slru_page_key, twophase_key
from .repository import (
    DEFAULT_TENANT,
    AlreadyExistsError,
    ConflictError,
    InvalidRequestError,
    LsnOutOfRangeError,
    LsnTimeoutError,
    NotFoundError,
    Repository,
    RepositoryError,
    Timeline,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# SlruKind in the proto is 1-based (0 = unspecified); pgredo's SlruKind is 0-based.
_SLRU_FROM_PROTO = {
    common_pb2.SLRU_KIND_CLOG: 0,
    common_pb2.SLRU_KIND_MULTIXACT_OFFSETS: 1,
    common_pb2.SLRU_KIND_MULTIXACT_MEMBERS: 2,
    common_pb2.SLRU_KIND_COMMIT_TS: 3,
}
SLRU_PAGES_PER_SEGMENT = 32
MAX_FORKNUM = 3


def _status_for(e: Exception) -> grpc.StatusCode:
    if isinstance(e, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, AlreadyExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(e, ConflictError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, LsnOutOfRangeError):
        return grpc.StatusCode.OUT_OF_RANGE
    if isinstance(e, (InvalidRequestError, FormatError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, LsnTimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(e, UnsupportedRecordError):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(e, RedoError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, (LayerCorruptError, ManifestError)):
        return grpc.StatusCode.DATA_LOSS
    return grpc.StatusCode.INTERNAL


_EXPECTED = (RepositoryError, FormatError, RedoError, StorageError)


def _handle(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except _EXPECTED as e:
        context.abort(_status_for(e), str(e))
    except Exception as e:  # a bug: say so loudly, answer INTERNAL
        log.exception("BUG: unexpected error in page server handler")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
    raise AssertionError("unreachable")  # context.abort raises


def parse_page_key(key: common_pb2.PageKey) -> bytes:
    which = key.WhichOneof("key")
    if which == "rel_block":
        return parse_rel(key.rel_block.rel).page_key(key.rel_block.blkno)
    if which == "slru_page":
        kind = _SLRU_FROM_PROTO.get(key.slru_page.kind)
        if kind is None:
            raise InvalidRequestError(f"unknown SLRU kind {key.slru_page.kind}")
        if key.slru_page.rpageno >= SLRU_PAGES_PER_SEGMENT:
            raise InvalidRequestError(f"SLRU page {key.slru_page.rpageno} out of range 0..31")
        return slru_page_key(kind, key.slru_page.segno, key.slru_page.rpageno)
    raise InvalidRequestError("page key has neither rel_block nor slru_page")


def parse_rel(rel: common_pb2.RelTag) -> RelTag:
    if rel.fork > MAX_FORKNUM:
        raise InvalidRequestError(f"invalid fork number {rel.fork}")
    if rel.rel_number == 0:
        raise InvalidRequestError("relation number 0 is not a relation")
    return RelTag(rel.spc_oid, rel.db_oid, rel.rel_number, rel.fork)


class PageServerServicer(pageserver_pb2_grpc.PageServerServicer):
    def __init__(self, repo: Repository, lsn_wait_timeout: float = 30.0, ingested: Any = None) -> None:
        self.repo = repo
        self.lsn_wait_timeout = lsn_wait_timeout
        self._ingested = ingested  # a prometheus Counter by timeline, or None

    # -- helpers ----------------------------------------------------------------

    def _timeline(self, tenant: common_pb2.TenantId, timeline: common_pb2.TimelineId) -> Timeline:
        if not timeline.id:
            raise InvalidRequestError("timeline id is required")
        return self.repo.timeline(tenant.id or DEFAULT_TENANT, timeline.id)

    def _lsn(self, tl: Timeline, req_lsn: common_pb2.RequestLsn, context: grpc.ServicerContext | None = None) -> int:
        """The LSN to read at (Neon's rules for request LSN + not_modified_since, page_service.rs).

        With a hint the client promises nothing changed between it and the
        request LSN, so any LSN in between gives the same answer: wait only
        for the hint, and read at min(request LSN, last ingested).
        """
        latest = req_lsn.latest or req_lsn.lsn == 0
        hint = req_lsn.not_modified_since
        if hint and not latest and hint > req_lsn.lsn:
            raise InvalidRequestError(
                f"not_modified_since {format_lsn(hint)} is after the request LSN {format_lsn(req_lsn.lsn)}")
        timeout = self.lsn_wait_timeout
        if context is not None and context.time_remaining() is not None:
            timeout = min(timeout, max(0.0, context.time_remaining() - 0.05))
        if hint > tl.last_record_lsn:
            self.repo.resolve_lsn(tl, hint, timeout)
        if latest:
            return tl.last_record_lsn
        if hint:
            return self.repo.resolve_lsn(tl, min(req_lsn.lsn, tl.last_record_lsn), timeout)
        return self.repo.resolve_lsn(tl, req_lsn.lsn, timeout)

    def timeline_info(self, tl: Timeline) -> pageserver_pb2.TimelineInfo:
        parent = self.repo.ancestor_of(tl)
        return pageserver_pb2.TimelineInfo(
            tenant=common_pb2.TenantId(id=tl.tenant),
            timeline=common_pb2.TimelineId(id=tl.timeline),
            ancestor_timeline=common_pb2.TimelineId(id=parent.timeline) if parent else None,
            ancestor_lsn=tl.ancestor_lsn,
            last_record_lsn=tl.last_record_lsn,
            prev_record_lsn=tl.prev_record_lsn,
            durable_lsn=tl.durable_lsn,
            start_lsn=tl.start_lsn,
            gc_cutoff_lsn=tl.gc_cutoff_lsn,
            pg_version=tl.pg_version,
            system_identifier=tl.system_id,
            state=pageserver_pb2.TIMELINE_STATE_ACTIVE,
            name=tl.name or "",
            image_layer_lsn=max((d.lsn_start for d in self.repo.image_layers(tl)), default=0),
            writer=pageserver_pb2.TimelineWriter(kind=pageserver_pb2.WriterKind.Name(tl.writer_kind), name=tl.writer_name,
                                               epoch=tl.writer_epoch),
        )

    def _get_page(self, tl: Timeline, key: bytes, req_lsn: common_pb2.RequestLsn,
                  context: grpc.ServicerContext | None) -> pageserver_pb2.GetPageResponse:
        lsn = self._lsn(tl, req_lsn, context)
        page, page_lsn = self.repo.get_page(tl, key, lsn, wait=False)
        return pageserver_pb2.GetPageResponse(page=page, page_lsn=page_lsn, read_lsn=lsn)

    # -- pages and relations ------------------------------------------------------

    def GetPage(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            return self._get_page(tl, parse_page_key(request.key), request.lsn, context)

        return _handle(context, run)

    def GetPages(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for batch in request_iterator:
            out = pageserver_pb2.GetPagesResponse()
            try:
                tl = self._timeline(batch.tenant, batch.timeline)
            except _EXPECTED as e:
                context.abort(_status_for(e), str(e))
            for item in batch.pages:
                resp = out.pages.add(request_id=item.request_id)
                try:
                    resp.page.CopyFrom(self._get_page(tl, parse_page_key(item.key), item.lsn, None))
                except _EXPECTED as e:
                    resp.error.code = _status_for(e).value[0]
                    resp.error.message = str(e)
            yield out

    def RelSize(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            rel = parse_rel(request.rel)
            lsn = self._lsn(tl, request.lsn, context)
            n = self.repo.rel_size(tl, rel, lsn)
            if n is None:
                raise NotFoundError(f"relation {rel} does not exist at {format_lsn(lsn)}")
            return pageserver_pb2.RelSizeResponse(nblocks=n)

        return _handle(context, run)

    def RelExists(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            lsn = self._lsn(tl, request.lsn, context)
            return pageserver_pb2.RelExistsResponse(exists=self.repo.rel_size(tl, parse_rel(request.rel), lsn) is not None)

        return _handle(context, run)

    def DbSize(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            lsn = self._lsn(tl, request.lsn, context)
            # Every tablespace: DbSize counts the database's relations wherever they live.
            size = sum(
                (self.repo.rel_size(tl, r, lsn) or 0) * BLCKSZ
                for r in self.repo.list_rels(tl, lsn, db=request.db_oid)
            )
            return pageserver_pb2.DbSizeResponse(size_bytes=size)

        return _handle(context, run)

    def ListRelations(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            lsn = self._lsn(tl, request.lsn, context)
            out = pageserver_pb2.ListRelationsResponse(read_lsn=lsn)
            for rel in sorted(self.repo.list_rels(tl, lsn), key=lambda r: (r.spc, r.db, r.rel, r.fork)):
                nblocks = self.repo.rel_size(tl, rel, lsn)
                if nblocks is not None:
                    out.rels.add(rel=common_pb2.RelTag(spc_oid=rel.spc, db_oid=rel.db, rel_number=rel.rel,
                                                       fork=rel.fork), nblocks=nblocks)
            return out

        return _handle(context, run)

    def GetSlruSegment(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            kind = _SLRU_FROM_PROTO.get(request.kind)
            if kind is None:
                raise InvalidRequestError(f"unknown SLRU kind {request.kind}")
            lsn = self._lsn(tl, request.lsn, context)
            pages = []
            for pageno in range(SLRU_PAGES_PER_SEGMENT):
                try:
                    pages.append(self.repo.get_page(tl, slru_page_key(kind, request.segno, pageno), lsn, wait=False)[0])
                except NotFoundError:
                    break  # segments end at their last written page
            if not pages:
                raise NotFoundError(f"SLRU segment {request.segno:04X} not found at {format_lsn(lsn)}")
            return pageserver_pb2.GetSlruSegmentResponse(segment=b"".join(pages))

        return _handle(context, run)

    def Basebackup(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """A tar of the data directory at (timeline, LSN), streamed as it is written."""
        try:
            tl = self._timeline(request.tenant, request.timeline)
            lsn = tl.last_record_lsn if request.lsn == 0 else self.repo.resolve_lsn(tl, request.lsn, self.lsn_wait_timeout)
        except _EXPECTED as e:
            context.abort(_status_for(e), str(e))
        from .basebackup import BasebackupInfo, write_basebackup

        chunks: queue.Queue[bytes | BasebackupInfo | BaseException | None] = queue.Queue(maxsize=16)
        writer = _QueueWriter(chunks)

        def produce() -> None:
            try:
                write_basebackup(self.repo, tl, lsn, writer, on_start=chunks.put,
                                 lz4=request.compression == pageserver_pb2.BASEBACKUP_COMPRESSION_LZ4,
                                 relations=not request.omit_relations)
                writer.flush()
                chunks.put(None)
            except BaseException as e:  # handed to the consumer, which answers with a status
                chunks.put(e)

        threading.Thread(target=produce, name="basebackup", daemon=True).start()
        while True:
            item = chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                if isinstance(item, _EXPECTED):
                    context.abort(_status_for(item), str(item))
                log.error("BUG: base backup failed", exc_info=item)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(item).__name__}: {item}")
            if isinstance(item, BasebackupInfo):
                # The first message: where the backup stands, before any data.
                yield pageserver_pb2.BasebackupChunk(lsn=item.lsn, checkpoint_lsn=item.checkpoint_lsn,
                                                     wal_end_lsn=item.end_lsn)
            else:
                yield pageserver_pb2.BasebackupChunk(data=item)

    # -- tenants and timelines --------------------------------------------------------

    def CreateTenant(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _handle(context, lambda: pageserver_pb2.CreateTenantResponse(
            tenant=common_pb2.TenantId(id=self.repo.create_tenant(request.tenant.id or DEFAULT_TENANT))))

    def ListTenants(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _handle(context, lambda: pageserver_pb2.ListTenantsResponse(
            tenants=[common_pb2.TenantId(id=t) for t in self.repo.list_tenants()]))

    def ListTimelines(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _handle(context, lambda: pageserver_pb2.ListTimelinesResponse(
            timelines=[self.timeline_info(t) for t in self.repo.list_timelines(request.tenant.id or DEFAULT_TENANT)]))

    def CreateTimeline(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tenant = request.tenant.id or DEFAULT_TENANT
            tl = self.repo.create_timeline(
                tenant,
                request.new_timeline.id or None,
                name=request.name or None,
                ancestor=request.ancestor_timeline.id or None,
                ancestor_lsn=request.ancestor_lsn or None,
                pg_version=request.pg_version or 15,
                wait=self.lsn_wait_timeout,
            )
            return self.timeline_info(tl)

        return _handle(context, run)

    def ClaimTimeline(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            return self.timeline_info(self.repo.claim_timeline(tl, request.kind, request.name.strip(),
                                                               takeover=request.takeover))

        return _handle(context, run)

    def ReleaseTimeline(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            return self.timeline_info(self.repo.release_timeline(tl, request.epoch))

        return _handle(context, run)

    def FindLsnByTimestamp(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            lsn, ts = self.repo.find_lsn_by_timestamp(
                self._timeline(request.tenant, request.timeline), request.timestamp_us)
            return pageserver_pb2.FindLsnByTimestampResponse(lsn=lsn, commit_timestamp_us=ts)

        return _handle(context, run)

    def GetTimeline(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _handle(context, lambda: self.timeline_info(self._timeline(request.tenant, request.timeline)))

    def Gc(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            which = request.WhichOneof("horizon")
            if which == "horizon_lsn":
                horizon = request.horizon_lsn
            elif which == "keep_bytes":
                horizon = max(0, tl.last_record_lsn - request.keep_bytes)
            else:
                raise InvalidRequestError("Gc needs horizon_lsn or keep_bytes")
            r = self.repo.gc(tl, horizon)
            return pageserver_pb2.GcResponse(
                gc_cutoff_lsn=r.cutoff, previous_gc_cutoff_lsn=r.previous_cutoff,
                retained_branch_lsns=r.retained_lsns, image_layers_written=r.images_written,
                layers_removed=r.layers_removed, bytes_removed=r.bytes_removed, elapsed_seconds=r.seconds)

        return _handle(context, run)

    def Checkpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            self.repo.sync_timeline(tl)
            return self.timeline_info(tl)

        return _handle(context, run)

    def CreateImageLayer(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            tl = self._timeline(request.tenant, request.timeline)
            self.repo.create_image_layer(tl)
            return self.timeline_info(tl)

        return _handle(context, run)

    # -- import and ingest ----------------------------------------------------------------

    def Import(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return _handle(context, lambda: self._import(request_iterator))

    def _import(self, requests: Iterator[Any]) -> Any:
        first = next(requests, None)
        if first is None or first.WhichOneof("item") != "begin":
            raise InvalidRequestError("an Import stream must start with ImportBegin")
        begin = first.begin
        tl = self._timeline(begin.tenant, begin.timeline)
        sizes: dict[RelTag, int] = {}
        files: dict[bytes, bytes] = {}
        counts = {"pages": 0, "files": 0}
        end_seen: list[Any] = []

        def pages() -> Iterator[tuple[RelTag, int, bytes]]:
            for req in requests:
                which = req.WhichOneof("item")
                if which == "rel_pages":
                    rel = parse_rel(req.rel_pages.rel)
                    sizes[rel] = max(sizes.get(rel, 0), req.rel_pages.rel_nblocks,
                                     req.rel_pages.start_blkno + len(req.rel_pages.pages))
                    for i, page in enumerate(req.rel_pages.pages):
                        counts["pages"] += 1
                        yield rel, req.rel_pages.start_blkno + i, page
                elif which == "slru_segment":
                    kind = _SLRU_FROM_PROTO.get(req.slru_segment.kind)
                    data = req.slru_segment.data
                    if kind is None or len(data) % BLCKSZ or len(data) > SLRU_PAGES_PER_SEGMENT * BLCKSZ:
                        raise InvalidRequestError(f"bad SLRU segment: kind {req.slru_segment.kind}, {len(data)} bytes")
                    for pageno in range(len(data) // BLCKSZ):
                        files[slru_page_key(kind, req.slru_segment.segno, pageno)] = data[pageno * BLCKSZ:(pageno + 1) * BLCKSZ]
                    counts["files"] += 1
                elif which == "file":
                    key = _file_key(req.file.path)
                    if key is not None:
                        files[key] = req.file.data
                    counts["files"] += 1
                elif which == "end":
                    end_seen.append(req.end)
                    return
                else:
                    raise InvalidRequestError(f"unexpected {which} in an Import stream")

        with self.repo.import_transaction(tl, begin.lsn, begin.prev_record_lsn, begin.system_identifier,
                                          begin.pg_version or 15) as importer:
            importer.add_pages(pages())
            if not end_seen:
                raise InvalidRequestError("Import stream ended without ImportEnd")
            end = end_seen[0]
            if end.total_pages != counts["pages"] or end.total_files != counts["files"]:
                raise InvalidRequestError(
                    f"ImportEnd counts {end.total_pages} pages / {end.total_files} files, "
                    f"received {counts['pages']} / {counts['files']}"
                )
            importer.add_sizes(sizes)
            importer.add_files(files)
        return pageserver_pb2.ImportResponse(timeline=self.timeline_info(tl), pages_imported=counts["pages"])

    def Ingest(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for batch in request_iterator:
            try:
                tl = self._timeline(batch.tenant, batch.timeline)
                records = [_decode_ingest_record(r) for r in batch.records]
                received = self.repo.ingest(tl, records, batch.writer_epoch)
                if self._ingested is not None:
                    self._ingested.labels(tl.timeline).inc(len(records))
                if batch.flush:
                    self.repo.sync_timeline(tl)
            except _EXPECTED as e:
                context.abort(_status_for(e), str(e))
            except Exception as e:
                log.exception("BUG: unexpected error during ingest")
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            yield pageserver_pb2.IngestResponse(batch_seq=batch.batch_seq, received_lsn=received,
                                                durable_lsn=tl.disk_consistent_lsn)


class _QueueWriter(io.RawIOBase):
    """A write-only file that hands 1 MiB chunks to a queue (back-pressure: the queue is bounded)."""

    CHUNK = 1 << 20

    def __init__(self, q: queue.Queue[Any]) -> None:
        self._q = q
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._buf += b
        while len(self._buf) >= self.CHUNK:
            self._q.put(bytes(self._buf[: self.CHUNK]))
            del self._buf[: self.CHUNK]
        return len(b)

    def flush(self) -> None:
        if self._buf:
            self._q.put(bytes(self._buf))
            self._buf.clear()


def _decode_ingest_record(r: common_pb2.DecodedRecord) -> DecodedRecord:
    """Re-decode and CRC-check the raw bytes: they, not the summary fields, are authoritative."""
    rec = decode_record(r.raw, r.lsn, r.end_lsn, verify_crc=True)
    if r.end_lsn - r.lsn < rec.tot_len:
        raise InvalidRequestError(f"record at {format_lsn(r.lsn)}: end_lsn {format_lsn(r.end_lsn)} is too close")
    return rec


def _file_key(path: str) -> bytes | None:
    """Where an imported non-relation file is kept, or None for files a compute regenerates."""
    parts = path.split("/")
    if path == "global/pg_filenode.map":
        return relmap_key(1664, 0)
    if len(parts) == 3 and parts[0] == "base" and parts[2] == "pg_filenode.map" and parts[1].isdigit():
        return relmap_key(1663, int(parts[1]))
    if len(parts) == 2 and parts[0] == "pg_twophase":
        try:
            return twophase_key(int(parts[1], 16))
        except ValueError:
            raise InvalidRequestError(f"bad two-phase file name {path!r}") from None
    if path == "global/pg_control":
        return CONTROL_FILE_KEY
    return None


__all__ = ["PageServerServicer", "KeyKind"]
