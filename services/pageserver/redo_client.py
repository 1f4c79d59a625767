"""GetPage's redo through the redo pool service (the default in `zctl start`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

import grpc

from services.auth import ClientSecurity
from pgformat.xlogrecord import DecodedRecord
from pgredo.errors import RedoError
from zproto import common_pb2, redo_pb2, redo_pb2_grpc

from .keys import KeyKind, decode_key
from .repository import RedoJob

# Jobs per ApplyRecordsStream message.
STREAM_BATCH: Final = 32
_STATUS_BY_NUMBER: Final = {code.value[0]: code for code in grpc.StatusCode}

# pgredo's SlruKind is 0-based; the proto's is 1-based (0 = unspecified).
_SLRU_TO_PROTO = {0: common_pb2.SLRU_KIND_CLOG, 1: common_pb2.SLRU_KIND_MULTIXACT_OFFSETS,
                  2: common_pb2.SLRU_KIND_MULTIXACT_MEMBERS, 3: common_pb2.SLRU_KIND_COMMIT_TS}


class RedoServiceError(RedoError):
    """The redo service refused or failed a request; carries its status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(f"redo service: {code.name}: {message}")


def page_key_proto(key: bytes) -> common_pb2.PageKey:
    kind, a, b, c, fork, blk = decode_key(key)
    if kind == KeyKind.REL_PAGE:
        return common_pb2.PageKey(rel_block=common_pb2.RelBlock(
            rel=common_pb2.RelTag(spc_oid=a, db_oid=b, rel_number=c, fork=fork), blkno=blk))
    if kind == KeyKind.SLRU_PAGE:
        return common_pb2.PageKey(slru_page=common_pb2.SlruPage(kind=_SLRU_TO_PROTO[a], segno=b, rpageno=blk))
    raise ValueError(f"key kind {kind} has no redo")


def redo_channel_options() -> list[tuple[str, object]]:
    """Round-robin over every address the name resolves to: `dns:///redo:6401` reaches each replica of a
    scaled redo service (`docker compose up --scale redo=N`), not just the first."""
    return [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
            ("grpc.lb_policy_name", "round_robin")]


def _request(key: bytes, base: bytes | None, records: Sequence[DecodedRecord]) -> redo_pb2.ApplyRecordsRequest:
    req = redo_pb2.ApplyRecordsRequest(
        key=page_key_proto(key),
        records=[redo_pb2.RedoRecord(lsn=r.lsn, end_lsn=r.end_lsn, raw=r.raw) for r in records],
        pg_version=15,
    )
    if base is not None:
        req.base_image = base
    return req


class RemoteRedo:
    """PageRedo over gRPC to `services.redo`."""

    def __init__(self, address: str, timeout: float = 60.0, security: ClientSecurity | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = (security or ClientSecurity()).channel(address, options=redo_channel_options())
        self._stub = redo_pb2_grpc.RedoStub(self._channel)

    def redo(self, key: bytes, base: bytes | None, records: Sequence[DecodedRecord]) -> bytes:
        try:
            resp = self._stub.ApplyRecords(_request(key, base, records), timeout=self.timeout)
        except grpc.RpcError as e:
            raise RedoServiceError(e.code(), e.details() or "") from None
        return bytes(resp.page)

    def redo_many(self, jobs: Sequence[RedoJob]) -> list[bytes]:
        """Every job over one ApplyRecordsStream, STREAM_BATCH per message: the pool's workers share
        them, where one unary call at a time keeps a single worker busy."""
        if not jobs:
            return []

        def batches() -> Iterator[redo_pb2.ApplyRecordsStreamRequest]:
            for start in range(0, len(jobs), STREAM_BATCH):
                yield redo_pb2.ApplyRecordsStreamRequest(items=[
                    redo_pb2.ApplyRecordsItem(request_id=i, request=_request(*jobs[i]))
                    for i in range(start, min(len(jobs), start + STREAM_BATCH))])

        pages: list[bytes | None] = [None] * len(jobs)
        try:
            for resp in self._stub.ApplyRecordsStream(batches(), timeout=self.timeout + len(jobs) * 0.05):
                for item in resp.items:
                    if item.request_id >= len(jobs):
                        raise RedoServiceError(grpc.StatusCode.INTERNAL, f"answer to unknown request {item.request_id}")
                    if item.HasField("error"):
                        code = _STATUS_BY_NUMBER.get(item.error.code, grpc.StatusCode.UNKNOWN)
                        raise RedoServiceError(code, item.error.message)
                    pages[item.request_id] = bytes(item.page.page)
        except grpc.RpcError as e:
            raise RedoServiceError(e.code(), e.details() or "") from None
        missing = sum(p is None for p in pages)
        if missing:
            raise RedoServiceError(grpc.StatusCode.INTERNAL, f"the stream ended with {missing} pages unanswered")
        return pages  # type: ignore[return-value]

    def close(self) -> None:
        self._channel.close()
