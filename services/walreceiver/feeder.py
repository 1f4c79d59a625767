"""The page server side of an attachment: the walreceiver's durable WAL, decoded, on an Ingest stream.

The feeder runs on a thread of its own, apart from the primary's stream:
commits on the primary wait only for the walreceiver's own fsync, never for
the page server. It asks the page server where the timeline's WAL ends
(GetTimeline: the end of its last record, a record boundary), reads the
local segment files from there up to what the primary side made durable,
and sends the records in batches on one Ingest stream with a bounded number
of batches in flight. Acks tell what the page server received and what it
made durable (`disk_consistent_lsn`); the primary side removes the local
segments below the latter. Any failure ends the feed session; the next one
starts again from the page server's end, which skips nothing and repeats
nothing the page server keeps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

import grpc

from pgformat.lsn import format_lsn
from pgformat.xlogreader import RawRecord, WalStreamReader
from pgformat.xlogrecord import parse_record_header
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

from .errors import FatalError, PageServerError
from .walstore import TimelineWal

log = logging.getLogger("zenith.walreceiver")

_READ_CHUNK: Final = 1 << 20


def record_to_proto(raw: RawRecord) -> common_pb2.DecodedRecord:
    """A CRC-checked record as Ingest takes it: its bytes and header fields. The block references
    are left out: the page server decodes `raw` itself (it is authoritative), so decoding them here
    would only cost the walreceiver CPU (and the primary's commits GIL time)."""
    hdr = raw.header if raw.header is not None else parse_record_header(raw.data, raw.lsn)
    return common_pb2.DecodedRecord(lsn=raw.lsn, end_lsn=raw.end_lsn, prev_lsn=hdr.prev, xid=hdr.xid, rmid=hdr.rmid,
                                    info=hdr.info, total_len=hdr.tot_len, raw=raw.data)


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


def get_timeline(stub: pageserver_pb2_grpc.PageServerStub, tenant: str, timeline: str, address: str,
                 timeout: float) -> pageserver_pb2.TimelineInfo:
    """GetTimeline; FatalError if the page server does not know the timeline, PageServerError otherwise."""
    request = pageserver_pb2.GetTimelineRequest(tenant=common_pb2.TenantId(id=tenant),
                                                timeline=common_pb2.TimelineId(id=timeline))
    try:
        info: pageserver_pb2.TimelineInfo = stub.GetTimeline(request, timeout=timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            raise FatalError(f"page server: {e.details()}") from None
        raise PageServerError(f"page server {address}: GetTimeline: {e.code().name}: {e.details()}") from None
    return info


# While idle, how often the page server is asked how far it has written out what it received.
_POLL_DURABLE: Final = 1.0


class IngestStream:
    """One Ingest call: batches go out through a queue, acks are read on a thread of their own."""

    def __init__(self, stub: pageserver_pb2_grpc.PageServerStub, tenant: str, timeline: str,
                 durable_lsn: int, on_ack: Callable[[int, int], None], writer_epoch: int = 0) -> None:
        self._tenant = common_pb2.TenantId(id=tenant)
        self._timeline = common_pb2.TimelineId(id=timeline)
        self._writer_epoch = writer_epoch
        self._queue: queue.SimpleQueue[pageserver_pb2.IngestRequest | None] = queue.SimpleQueue()
        self._on_ack = on_ack
        self._lock = threading.Lock()
        self.durable_lsn = durable_lsn
        self.received_lsn = durable_lsn
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
                    self.received_lsn = max(self.received_lsn, ack.received_lsn, self.durable_lsn)
                    received, durable = self.received_lsn, self.durable_lsn
                self._on_ack(received, durable)
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
            self._on_ack(self.received_lsn, self.durable_lsn)

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


class Feed:
    """One feed session: from the page server's end up to the local durable end, batch after batch."""

    def __init__(self, stub: pageserver_pb2_grpc.PageServerStub, tenant: str, timeline: str, wal: TimelineWal,
                 start: int, writer_epoch: int, on_ack: Callable[[int, int], None],
                 max_batch_records: int, max_batch_bytes: int, max_inflight: int) -> None:
        self.wal = wal
        self.position = start  # end of the last record handed to the page server
        self._read_pos = start
        self._reader = WalStreamReader(start, wal.meta.seg_size, verify_crc=False)
        self._ingest = IngestStream(stub, tenant, timeline, start, on_ack, writer_epoch)
        self._max_records = max_batch_records
        self._max_bytes = max_batch_bytes
        self._max_inflight = max_inflight
        self._batch: list[common_pb2.DecodedRecord] = []
        self._batch_bytes = 0
        self._flush_asked = False
        self._sent_at = time.monotonic()

    def step(self, durable_end: int, draining: bool = False) -> bool:
        """Read and send what the local WAL holds durably up to `durable_end`; False if there was
        nothing to do now (caught up, or too many batches in flight).

        The page server writes what it received out on its own schedule (its checkpoint
        distance and timeout); only `draining` (a Detach handing everything over) asks it to
        flush once caught up, so the local WAL can go at once."""
        self._ingest.check()
        if self._ingest.inflight >= self._max_inflight:
            return False
        if self._read_pos >= durable_end:
            behind = self._ingest.durable_lsn < self.position
            if draining and not self._flush_asked and behind:
                self._flush_asked = True
                self._send(flush=True)
                return True
            if behind and time.monotonic() - self._sent_at >= _POLL_DURABLE:
                # Idle, and the page server has not yet written everything out: an empty batch
                # brings its durable LSN back in the ack, so the local WAL below it can go.
                self._send(flush=False)
                return True
            return False
        chunk = self.wal.read(self._read_pos, min(_READ_CHUNK, durable_end - self._read_pos))
        if not chunk:
            raise PageServerError(f"local WAL at {format_lsn(self._read_pos)} could not be read")
        self._read_pos += len(chunk)
        self._reader.feed(chunk)
        for raw in self._reader.records():
            self._batch.append(record_to_proto(raw))
            self._batch_bytes += len(raw.data)
            self.position = raw.end_lsn
            if len(self._batch) >= self._max_records or self._batch_bytes >= self._max_bytes:
                self._send(flush=False)
        if self._read_pos >= durable_end and self._batch:
            self._flush_asked = draining
            self._send(flush=draining)
        return True

    def _send(self, flush: bool) -> None:
        self._ingest.send(self._batch, self.position, flush)
        self._batch, self._batch_bytes = [], 0
        self._sent_at = time.monotonic()

    def close(self, graceful: bool, timeout: float) -> None:
        if graceful and self._ingest.error is None:
            self._ingest.close(timeout)
        else:
            self._ingest.abort()
