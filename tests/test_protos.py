"""The gRPC service boundaries in protos/zproto: generated code imports, every
service has the methods (and streaming kinds) the design promises, every
request type survives a wire round trip, every element of the .proto files is
documented, and the generated stubs work over a real channel.

Needs the generated package `zproto` importable (the editable install maps
build/gen/zproto; or run with PYTHONPATH=build/gen after `make proto`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from zproto import common_pb2, pageserver_pb2, redo_pb2, walreceiver_pb2

PROTO_DIR = Path(__file__).resolve().parent.parent / "protos"
PROTO_FILES = ("common", "pageserver", "redo", "walreceiver")

# Streaming kinds, as (client_streaming, server_streaming).
UNARY = (False, False)
SERVER_STREAM = (False, True)
CLIENT_STREAM = (True, False)
BIDI = (True, True)

EXPECTED_SERVICES: dict[tuple[ModuleType, str], dict[str, tuple[bool, bool]]] = {
    (pageserver_pb2, "PageServer"): {
        "GetPage": UNARY,
        "GetPages": BIDI,
        "RelSize": UNARY,
        "RelExists": UNARY,
        "DbSize": UNARY,
        "GetSlruSegment": UNARY,
        "Basebackup": SERVER_STREAM,
        "ListRelations": UNARY,
        "CreateTenant": UNARY,
        "ListTenants": UNARY,
        "ListTimelines": UNARY,
        "CreateTimeline": UNARY,
        "GetTimeline": UNARY,
        "FindLsnByTimestamp": UNARY,
        "Gc": UNARY,
        "CreateImageLayer": UNARY,
        "Checkpoint": UNARY,
        "ClaimTimeline": UNARY,
        "ReleaseTimeline": UNARY,
        "Import": CLIENT_STREAM,
        "Ingest": BIDI,
    },
    (redo_pb2, "Redo"): {
        "ApplyRecords": UNARY,
        "ApplyRecordsStream": BIDI,
    },
    (walreceiver_pb2, "WalReceiver"): {
        "Attach": UNARY,
        "Detach": UNARY,
        "Status": UNARY,
    },
}

PAGE = bytes(range(256)) * 32  # a recognisable 8192-byte page
assert len(PAGE) == 8192

TENANT = common_pb2.TenantId(id="0123456789abcdef0123456789abcdef")
TIMELINE = common_pb2.TimelineId(id="fedcba9876543210fedcba9876543210")
REL = common_pb2.RelTag(spc_oid=1663, db_oid=5, rel_number=16384, fork=0)
REL_KEY = common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=REL, blkno=7))
SLRU_KEY = common_pb2.PageKey(
    slru_page=common_pb2.SlruPage(kind=common_pb2.SLRU_KIND_CLOG, segno=1, rpageno=3)
)
LSN = common_pb2.RequestLsn(lsn=0x1_6B3F28, latest=False, not_modified_since=0x1_600000)


def decoded_record() -> common_pb2.DecodedRecord:
    raw = b"\x42" * 77
    return common_pb2.DecodedRecord(
        lsn=0x1_6B3F28,
        end_lsn=0x1_6B3F28 + 77,
        prev_lsn=0x1_6B3EF0,
        xid=735,
        rmid=10,
        info=0x00,
        total_len=len(raw),
        raw=raw,
        blocks=[
            common_pb2.BlockRef(
                block_id=0,
                rel=REL,
                blkno=7,
                will_init=False,
                has_image=True,
                apply_image=True,
                has_data=True,
            )
        ],
    )


def apply_request(records: list[redo_pb2.RedoRecord], base: bytes | None) -> redo_pb2.ApplyRecordsRequest:
    req = redo_pb2.ApplyRecordsRequest(tenant=TENANT, key=REL_KEY, records=records, pg_version=15)
    if base is not None:
        req.base_image = base
    return req


def example_requests() -> list[Message]:
    """A populated instance of every request type of every service."""
    return [
        # PageServer
        pageserver_pb2.GetPageRequest(tenant=TENANT, timeline=TIMELINE, key=REL_KEY, lsn=LSN),
        pageserver_pb2.GetPagesRequest(
            tenant=TENANT,
            timeline=TIMELINE,
            pages=[
                pageserver_pb2.PageRequestItem(request_id=1, key=REL_KEY, lsn=LSN),
                pageserver_pb2.PageRequestItem(
                    request_id=2, key=SLRU_KEY, lsn=common_pb2.RequestLsn(lsn=5, latest=True)
                ),
            ],
        ),
        pageserver_pb2.RelSizeRequest(tenant=TENANT, timeline=TIMELINE, rel=REL, lsn=LSN),
        pageserver_pb2.RelExistsRequest(tenant=TENANT, timeline=TIMELINE, rel=REL, lsn=LSN),
        pageserver_pb2.DbSizeRequest(tenant=TENANT, timeline=TIMELINE, db_oid=5, lsn=LSN),
        pageserver_pb2.GetSlruSegmentRequest(
            tenant=TENANT,
            timeline=TIMELINE,
            kind=common_pb2.SLRU_KIND_MULTIXACT_MEMBERS,
            segno=2,
            lsn=LSN,
        ),
        pageserver_pb2.BasebackupRequest(tenant=TENANT, timeline=TIMELINE, lsn=0x1_6B3F28),
        pageserver_pb2.ListRelationsRequest(tenant=TENANT, timeline=TIMELINE, lsn=LSN),
        pageserver_pb2.CreateTenantRequest(tenant=TENANT),
        pageserver_pb2.ListTenantsRequest(),
        pageserver_pb2.ListTimelinesRequest(tenant=TENANT),
        pageserver_pb2.CreateTimelineRequest(
            tenant=TENANT,
            new_timeline=common_pb2.TimelineId(id="11" * 16),
            ancestor_timeline=TIMELINE,
            ancestor_lsn=0x1_6B3F28,
            pg_version=15,
        ),
        pageserver_pb2.GetTimelineRequest(tenant=TENANT, timeline=TIMELINE),
        pageserver_pb2.FindLsnByTimestampRequest(tenant=TENANT, timeline=TIMELINE, timestamp_us=817_000_000_000_000),
        pageserver_pb2.GcRequest(tenant=TENANT, timeline=TIMELINE, keep_bytes=64 << 20),
        pageserver_pb2.CreateImageLayerRequest(tenant=TENANT, timeline=TIMELINE),
        pageserver_pb2.CheckpointRequest(tenant=TENANT, timeline=TIMELINE),
        pageserver_pb2.ClaimTimelineRequest(tenant=TENANT, timeline=TIMELINE, kind=pageserver_pb2.WRITER_KIND_COMPUTE,
                                            name="main", takeover=True),
        pageserver_pb2.ReleaseTimelineRequest(tenant=TENANT, timeline=TIMELINE, epoch=3),
        pageserver_pb2.ImportRequest(
            begin=pageserver_pb2.ImportBegin(
                tenant=TENANT,
                timeline=TIMELINE,
                lsn=0x1_6B3F28,
                prev_record_lsn=0x1_6B3EF0,
                pg_version=15,
                system_identifier=7_300_000_000_000_000_001,
            )
        ),
        pageserver_pb2.ImportRequest(
            rel_pages=pageserver_pb2.ImportRelPages(rel=REL, start_blkno=0, pages=[PAGE, PAGE], rel_nblocks=2)
        ),
        pageserver_pb2.ImportRequest(
            slru_segment=pageserver_pb2.ImportSlruSegment(kind=common_pb2.SLRU_KIND_COMMIT_TS, segno=0, data=PAGE)
        ),
        pageserver_pb2.ImportRequest(file=pageserver_pb2.ImportFile(path="global/pg_control", data=b"\x01" * 8192)),
        pageserver_pb2.ImportRequest(end=pageserver_pb2.ImportEnd(total_pages=2, total_files=2)),
        pageserver_pb2.IngestRequest(
            tenant=TENANT,
            timeline=TIMELINE,
            batch_seq=9,
            records=[decoded_record()],
            up_to_lsn=0x1_6B3F28 + 80,
            flush=True,
        ),
        # Redo
        apply_request([redo_pb2.RedoRecord(lsn=100, end_lsn=180, raw=b"r" * 80)], PAGE),
        redo_pb2.ApplyRecordsStreamRequest(
            items=[
                redo_pb2.ApplyRecordsItem(
                    request_id=3,
                    request=apply_request([redo_pb2.RedoRecord(lsn=1, end_lsn=2, raw=b"x")], None),
                )
            ]
        ),
        # WalReceiver
        walreceiver_pb2.AttachRequest(
            tenant=TENANT,
            timeline=TIMELINE,
            primary_conninfo="host=127.0.0.1 port=5432 user=replicator application_name=zenith",
            slot_name="zenith_slot",
            create_slot=True,
            start_lsn=0x1_000000,
        ),
        walreceiver_pb2.DetachRequest(tenant=TENANT, timeline=TIMELINE, drop_slot=True),
        walreceiver_pb2.StatusRequest(tenant=TENANT, timeline=TIMELINE, all_tenants=False),
    ]


# ---------------------------------------------------------------- imports


@pytest.mark.parametrize("name", [f"zproto.{n}{suffix}" for n in PROTO_FILES for suffix in ("_pb2", "_pb2_grpc")])
def test_generated_modules_import(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_package_and_file_names() -> None:
    for module in (common_pb2, pageserver_pb2, redo_pb2, walreceiver_pb2):
        assert module.DESCRIPTOR.package == "zenith.v1"
        assert module.DESCRIPTOR.name.startswith("zproto/")


# ---------------------------------------------------------------- services


@pytest.mark.parametrize(
    ("module", "service"), list(EXPECTED_SERVICES), ids=[s for _, s in EXPECTED_SERVICES]
)
def test_service_methods_and_streaming_kinds(module: ModuleType, service: str) -> None:
    expected = EXPECTED_SERVICES[(module, service)]
    desc = module.DESCRIPTOR.services_by_name[service]
    actual = {m.name: (m.client_streaming, m.server_streaming) for m in desc.methods}
    assert actual == expected

    grpc_module = importlib.import_module(module.__name__ + "_grpc")
    stub_class = getattr(grpc_module, f"{service}Stub")
    servicer_class = getattr(grpc_module, f"{service}Servicer")
    assert callable(getattr(grpc_module, f"add_{service}Servicer_to_server"))
    channel = grpc.insecure_channel("127.0.0.1:1")  # never connected: stubs are lazy
    try:
        stub = stub_class(channel)
        for name in expected:
            assert callable(getattr(stub, name))
            assert callable(getattr(servicer_class, name))
    finally:
        channel.close()


def test_every_request_carries_a_tenant() -> None:
    """Top-level requests name their tenant (Redo's is in each item)."""
    exempt = {"ListTenantsRequest", "ImportRequest", "ApplyRecordsStreamRequest"}
    for module, service in EXPECTED_SERVICES:
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            msg = method.input_type
            if msg.name in exempt:
                continue
            assert "tenant" in msg.fields_by_name, msg.full_name
            assert msg.fields_by_name["tenant"].message_type.full_name == "zenith.v1.TenantId"
    assert "tenant" in pageserver_pb2.ImportBegin.DESCRIPTOR.fields_by_name
    assert "tenant" in redo_pb2.ApplyRecordsRequest.DESCRIPTOR.fields_by_name


def test_lsn_fields_are_uint64() -> None:
    from google.protobuf.descriptor import FieldDescriptor

    seen = 0
    for module in (common_pb2, pageserver_pb2, redo_pb2, walreceiver_pb2):
        for msg in module.DESCRIPTOR.message_types_by_name.values():
            for field in msg.fields:
                if field.name == "lsn" or field.name.endswith("_lsn") or field.name == "not_modified_since":
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        assert field.message_type.name == "RequestLsn", (msg.name, field.name)
                        continue
                    assert field.type == FieldDescriptor.TYPE_UINT64, (msg.name, field.name)
                    seen += 1
    assert seen > 20


# ---------------------------------------------------------------- round trips


def test_examples_cover_every_request_type() -> None:
    wanted = {
        m.input_type.full_name
        for module, service in EXPECTED_SERVICES
        for m in module.DESCRIPTOR.services_by_name[service].methods
    }
    have = {msg.DESCRIPTOR.full_name for msg in example_requests()}
    assert wanted == have


@pytest.mark.parametrize("msg", example_requests(), ids=lambda m: m.DESCRIPTOR.name)
def test_request_round_trip(msg: Message) -> None:
    data = msg.SerializeToString()
    back = type(msg).FromString(data)
    assert back == msg
    assert back.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)


def test_optional_fields_track_presence() -> None:
    req = apply_request([], None)
    assert not req.HasField("base_image")
    req2 = redo_pb2.ApplyRecordsRequest.FromString(apply_request([], b"").SerializeToString())
    assert req2.HasField("base_image") and req2.base_image == b""

    attach = walreceiver_pb2.AttachRequest(tenant=TENANT, timeline=TIMELINE)
    assert not walreceiver_pb2.AttachRequest.FromString(attach.SerializeToString()).HasField("start_lsn")
    attach.start_lsn = 0
    assert walreceiver_pb2.AttachRequest.FromString(attach.SerializeToString()).HasField("start_lsn")


def test_page_key_oneof() -> None:
    assert REL_KEY.WhichOneof("key") == "rel_block"
    assert SLRU_KEY.WhichOneof("key") == "slru_page"
    assert common_pb2.PageKey().WhichOneof("key") is None
    assert common_pb2.SlruKind.Name(common_pb2.SLRU_KIND_MULTIXACT_OFFSETS) == "SLRU_KIND_MULTIXACT_OFFSETS"


# ---------------------------------------------------------------- documentation


def _documented_elements(fd: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    """(source path, name) of every message, field, oneof, enum, enum value,
    service and method in a file (paths per descriptor.proto field numbers)."""

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
        yield path, e.name
        for i, v in enumerate(e.value):
            yield path + (2, i), f"{e.name}.{v.name}"

    def message(
        path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str
    ) -> Iterator[tuple[tuple[int, ...], str]]:
        name = prefix + m.name
        yield path, name
        for i, f in enumerate(m.field):
            yield path + (2, i), f"{name}.{f.name}"
        for i, o in enumerate(m.oneof_decl):
            if not o.name.startswith("_"):  # synthetic oneof of a proto3 `optional`
                yield path + (8, i), f"{name}.{o.name}"
        for i, n in enumerate(m.nested_type):
            yield from message(path + (3, i), n, name + ".")
        for i, e in enumerate(m.enum_type):
            yield from enum(path + (4, i), e)

    for i, m in enumerate(fd.message_type):
        yield from message((4, i), m, "")
    for i, e in enumerate(fd.enum_type):
        yield from enum((5, i), e)
    for i, s in enumerate(fd.service):
        yield (6, i), s.name
        for j, meth in enumerate(s.method):
            yield (6, i, 2, j), f"{s.name}.{meth.name}"


def test_every_element_has_a_comment(tmp_path: Path) -> None:
    grpc_tools_protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "set.pb"
    files = [str(PROTO_DIR / "zproto" / f"{n}.proto") for n in PROTO_FILES]
    rc = grpc_tools_protoc.main(
        ["protoc", f"-I{PROTO_DIR}", "--include_source_info", f"--descriptor_set_out={out}", *files]
    )
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    undocumented: list[str] = []
    for fd in fds.file:
        comments: dict[tuple[int, ...], str] = {
            tuple(loc.path): loc.leading_comments + loc.trailing_comments for loc in fd.source_code_info.location
        }
        for path, name in _documented_elements(fd):
            if not comments.get(path, "").strip():
                undocumented.append(f"{fd.name}: {name}")
    assert undocumented == []


# ---------------------------------------------------------------- live server


class EchoRedo:
    """A stand-in Redo servicer: the page is the base image (or zeros) and
    the page LSN the last record's end LSN. A record whose raw bytes are
    b"unsupported" fails the way the real pool reports unsupported records."""

    @staticmethod
    def _apply(req: Any) -> tuple[Any, Any]:
        for rec in req.records:
            if rec.raw == b"unsupported":
                failure = redo_pb2.RedoFailure(
                    code=grpc.StatusCode.UNIMPLEMENTED.value[0],
                    message=f"unsupported record rmgr=Heap2(9) info=0x60 at {rec.lsn:X}",
                    lsn=rec.lsn,
                    rmid=9,
                    rmgr_name="Heap2",
                    info=0x60,
                )
                return None, failure
        page = req.base_image if req.HasField("base_image") else bytes(8192)
        page_lsn = req.records[-1].end_lsn if req.records else 0
        return redo_pb2.ApplyRecordsResponse(page=page, page_lsn=page_lsn), None

    def ApplyRecords(self, request: Any, context: grpc.ServicerContext) -> Any:
        page, failure = self._apply(request)
        if failure is not None:
            context.set_trailing_metadata((("zenith-redo-failure-bin", failure.SerializeToString()),))
            context.abort(grpc.StatusCode.UNIMPLEMENTED, failure.message)
        return page

    def ApplyRecordsStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for batch in request_iterator:
            out = redo_pb2.ApplyRecordsStreamResponse()
            for item in reversed(batch.items):  # any order is allowed
                page, failure = self._apply(item.request)
                if failure is not None:
                    out.items.add(request_id=item.request_id, error=failure)
                else:
                    out.items.add(request_id=item.request_id, page=page)
            yield out


@pytest.fixture
def redo_channel() -> Iterator[grpc.Channel]:
    from zproto import redo_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    redo_pb2_grpc.add_RedoServicer_to_server(EchoRedo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel
    finally:
        channel.close()
        server.stop(None)


def test_redo_unary_over_real_channel(redo_channel: grpc.Channel) -> None:
    from zproto import redo_pb2_grpc

    stub = redo_pb2_grpc.RedoStub(redo_channel)
    records = [
        redo_pb2.RedoRecord(lsn=0x100, end_lsn=0x150, raw=b"a" * 0x50),
        redo_pb2.RedoRecord(lsn=0x150, end_lsn=0x1A8, raw=b"b" * 0x58),
    ]
    resp = stub.ApplyRecords(apply_request(records, PAGE), timeout=10)
    assert resp.page == PAGE
    assert resp.page_lsn == 0x1A8

    resp = stub.ApplyRecords(apply_request(records[:1], None), timeout=10)
    assert resp.page == bytes(8192)
    assert resp.page_lsn == 0x150


def test_redo_unary_error_carries_failure(redo_channel: grpc.Channel) -> None:
    from zproto import redo_pb2_grpc

    stub = redo_pb2_grpc.RedoStub(redo_channel)
    bad = [redo_pb2.RedoRecord(lsn=0x200, end_lsn=0x240, raw=b"unsupported")]
    with pytest.raises(grpc.RpcError) as info:
        stub.ApplyRecords(apply_request(bad, PAGE), timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert "Heap2" in err.details()  # type: ignore[attr-defined]
    trailers = dict(err.trailing_metadata())  # type: ignore[attr-defined]
    failure = redo_pb2.RedoFailure.FromString(trailers["zenith-redo-failure-bin"])
    assert (failure.rmgr_name, failure.rmid, failure.info, failure.lsn) == ("Heap2", 9, 0x60, 0x200)


def test_redo_stream_over_real_channel(redo_channel: grpc.Channel) -> None:
    from zproto import redo_pb2_grpc

    stub = redo_pb2_grpc.RedoStub(redo_channel)

    def batches() -> Iterator[redo_pb2.ApplyRecordsStreamRequest]:
        for b in range(3):
            req = redo_pb2.ApplyRecordsStreamRequest()
            for i in range(4):
                rid = b * 10 + i
                raw = b"unsupported" if rid == 21 else b"ok"
                rec = redo_pb2.RedoRecord(lsn=rid * 100, end_lsn=rid * 100 + 40, raw=raw)
                req.items.add(request_id=rid, request=apply_request([rec], PAGE if i % 2 else None))
            yield req

    results: dict[int, Any] = {}
    for resp in stub.ApplyRecordsStream(batches(), timeout=10):
        for item in resp.items:
            assert item.request_id not in results
            results[item.request_id] = item
    assert sorted(results) == [b * 10 + i for b in range(3) for i in range(4)]
    for rid, item in results.items():
        if rid == 21:
            assert item.WhichOneof("result") == "error"
            assert item.error.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
            assert item.error.rmgr_name == "Heap2"
        else:
            assert item.WhichOneof("result") == "page"
            assert item.page.page_lsn == rid * 100 + 40
            assert item.page.page == (PAGE if rid % 2 else bytes(8192))
