"""Every RPC of every gRPC service refuses callers its token does not grant, and changes nothing.

The three services run in this process with authentication on (one signing key); each method is
called through a generic channel built from the service descriptors, so an RPC added to a .proto
is covered here without anyone listing it (and is refused until services.auth.POLICIES grants it).
For each method: no token, a malformed token, an expired one and one signed by another key give
UNAUTHENTICATED; a token of another tenant and a token with every scope but the granting ones give
PERMISSION_DENIED; the state the services expose (tenants, timelines with their LSNs and writers,
attachments, redo jobs done) is the same afterwards. A token that does grant the method gets past
the check (a control: the refusals are not the server failing for other reasons).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from services.auth import POLICIES, ClientSecurity, ServerSecurity, bearer_token
from services.pageserver.main import PageServer
from services.redo.pool import RedoPool
from services.redo.server import SERVICE_NAME as REDO_SERVICE
from services.redo.server import RedoServicer, add_to_server
from services.runtime import GrpcEndpoint
from services.walreceiver.main import WalReceiverServer
from services.walreceiver.receiver import ReceiverOptions
from zauth.tokens import ADMIN, INGEST, REDO, SigningKey, TokenError, TokenVerifier, tenant_scope
from zproto import common_pb2, pageserver_pb2, redo_pb2, walreceiver_pb2

TENANT_A = "a" * 32  # the tenant every request names
TENANT_B = "b" * 32  # the other tenant

# Who may call what, written down independently of services.auth.POLICIES (which must agree):
# "tenant" = a token of the tenant the request names.
EXPECTED: dict[str, dict[str, set[str]]] = {
    "zenith.v1.PageServer": {
        **{m: {ADMIN, "tenant"} for m in ("GetPage", "GetPages", "RelSize", "RelExists", "ListRelations", "DbSize", "GetSlruSegment",
                                          "Basebackup", "ListTimelines", "FindLsnByTimestamp")},
        "GetTimeline": {ADMIN, INGEST, "tenant"},
        "CreateTimeline": {ADMIN, "tenant"},  # the request below is a branch; a root timeline is admin only
        **{m: {ADMIN} for m in ("CreateTenant", "ListTenants", "Gc", "ClaimTimeline", "ReleaseTimeline",
                                "CreateImageLayer", "Checkpoint", "Import")},
        "Ingest": {INGEST},
    },
    "zenith.v1.Redo": {"ApplyRecords": {REDO}, "ApplyRecordsStream": {REDO}},
    "zenith.v1.WalReceiver": {"Attach": {ADMIN}, "Detach": {ADMIN}, "Status": {ADMIN}},
}
ALL_SCOPES = {ADMIN, INGEST, REDO, tenant_scope(TENANT_A), tenant_scope(TENANT_B)}


def _descriptors() -> list[ServiceDescriptor]:
    return [s for module in (pageserver_pb2, redo_pb2, walreceiver_pb2) for s in module.DESCRIPTOR.services_by_name.values()]


def _methods() -> list[tuple[ServiceDescriptor, MethodDescriptor]]:
    return [(s, m) for s in _descriptors() for m in s.methods]


@dataclass
class Cluster:
    key: SigningKey
    pageserver: PageServer
    walreceiver: WalReceiverServer
    redo: GrpcEndpoint
    pool: RedoPool
    timeline_a: str
    timeline_b: str

    def address(self, service: str) -> str:
        return {"zenith.v1.PageServer": self.pageserver.address, "zenith.v1.WalReceiver": self.walreceiver.address,
                "zenith.v1.Redo": self.redo.address}[service]

    def token(self, *scopes: str, ttl: float | None = 600) -> str:
        return self.key.issue("test", scopes, ttl=ttl)

    def state(self) -> dict[str, Any]:
        """What the services expose, read with an admin token."""
        admin = ClientSecurity(self.token(ADMIN))
        ps = admin.channel(self.pageserver.address)
        list_tenants = ps.unary_unary("/zenith.v1.PageServer/ListTenants",
                                      pageserver_pb2.ListTenantsRequest.SerializeToString,
                                      pageserver_pb2.ListTenantsResponse.FromString)
        list_timelines = ps.unary_unary("/zenith.v1.PageServer/ListTimelines",
                                        pageserver_pb2.ListTimelinesRequest.SerializeToString,
                                        pageserver_pb2.ListTimelinesResponse.FromString)
        tenants = [t.id for t in list_tenants(pageserver_pb2.ListTenantsRequest(), timeout=10).tenants]
        timelines = {t: list_timelines(pageserver_pb2.ListTimelinesRequest(tenant=common_pb2.TenantId(id=t)),
                                       timeout=10).SerializeToString(deterministic=True) for t in tenants}
        wr = admin.channel(self.walreceiver.address)
        status = wr.unary_unary("/zenith.v1.WalReceiver/Status", walreceiver_pb2.StatusRequest.SerializeToString,
                                walreceiver_pb2.StatusResponse.FromString)(
            walreceiver_pb2.StatusRequest(all_tenants=True), timeout=10)
        ps.close()
        wr.close()
        return {"tenants": tenants, "timelines": timelines, "attachments": status.SerializeToString(deterministic=True),
                "redo_jobs": sum(s["jobs_done"] for s in self.pool.stats())}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base: Path = tmp_path_factory.mktemp("auth")
    key = SigningKey.generate()
    security = ServerSecurity(TokenVerifier(key.public_pem()))
    pool = RedoPool(1)
    pool.start()
    servicer = RedoServicer(pool)
    redo = GrpcEndpoint("127.0.0.1:0", [REDO_SERVICE], lambda server: add_to_server(servicer, server),
                        interceptors=security.interceptors())
    redo.start()
    ps = PageServer(base / "ps", "127.0.0.1:0", redo_address=redo.address, security=security,
                    redo_security=ClientSecurity(key.issue("pageserver", [REDO])))
    ps.start()
    wr = WalReceiverServer("127.0.0.1:0", ps.address, base / "wr",
                           ReceiverOptions(pageserver_security=ClientSecurity(key.issue("walreceiver", [INGEST]))),
                           security=security)
    wr.start()
    timelines = []
    admin = ClientSecurity(key.issue("setup", [ADMIN])).channel(ps.address)
    for tenant in (TENANT_A, TENANT_B):
        admin.unary_unary("/zenith.v1.PageServer/CreateTenant", pageserver_pb2.CreateTenantRequest.SerializeToString,
                          pageserver_pb2.CreateTenantResponse.FromString)(
            pageserver_pb2.CreateTenantRequest(tenant=common_pb2.TenantId(id=tenant)), timeout=10)
        tl = uuid.uuid4().hex
        admin.unary_unary("/zenith.v1.PageServer/CreateTimeline",
                          pageserver_pb2.CreateTimelineRequest.SerializeToString,
                          pageserver_pb2.TimelineInfo.FromString)(
            pageserver_pb2.CreateTimelineRequest(tenant=common_pb2.TenantId(id=tenant),
                                                 new_timeline=common_pb2.TimelineId(id=tl), name="main", pg_version=15),
            timeout=10)
        timelines.append(tl)
    admin.close()
    c = Cluster(key, ps, wr, redo, pool, *timelines)
    yield c
    wr.stop(0)
    ps.stop(0)
    redo.stop(0)
    pool.close()


def _request(method: MethodDescriptor, cluster: Cluster) -> Any:
    """A plausible request of the method's type aimed at tenant A (a branch for CreateTimeline)."""
    cls = message_factory.GetMessageClass(method.input_type)
    fields = cls.DESCRIPTOR.fields_by_name
    req = cls()
    if "tenant" in fields:
        req.tenant.id = TENANT_A
    if "timeline" in fields:
        req.timeline.id = cluster.timeline_a
    if method.name == "CreateTimeline":
        req.new_timeline.id = uuid.uuid4().hex
        req.ancestor_timeline.id = cluster.timeline_a
    if method.name == "Import":
        req.begin.tenant.id = TENANT_A
        req.begin.timeline.id = cluster.timeline_a
    if method.name == "Attach":
        req.primary_conninfo = "host=127.0.0.1 port=1 user=postgres"
        req.slot_name = "zenith_test"
    if method.name == "Gc":
        req.keep_bytes = 0
    return req


def _call(cluster: Cluster, service: ServiceDescriptor, method: MethodDescriptor, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    req = _request(method, cluster)
    out = message_factory.GetMessageClass(method.output_type)
    path = f"/{service.full_name}/{method.name}"
    with grpc.insecure_channel(cluster.address(service.full_name)) as ch:
        kind = (method.client_streaming, method.server_streaming)
        try:
            if kind == (False, False):
                ch.unary_unary(path, type(req).SerializeToString, out.FromString)(req, timeout=10, metadata=metadata)
            elif kind == (False, True):
                list(ch.unary_stream(path, type(req).SerializeToString, out.FromString)(req, timeout=10,
                                                                                       metadata=metadata))
            elif kind == (True, False):
                ch.stream_unary(path, type(req).SerializeToString, out.FromString)(iter([req]), timeout=10,
                                                                                   metadata=metadata)
            else:
                list(ch.stream_stream(path, type(req).SerializeToString, out.FromString)(iter([req]), timeout=10,
                                                                                        metadata=metadata))
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_every_rpc_has_a_rule_and_it_is_the_expected_one() -> None:
    described = {(s.full_name, m.name) for s, m in _methods()}
    assert described == {(s, m) for s, methods in EXPECTED.items() for m in methods}, "a new RPC: add it to EXPECTED"
    assert described == {(s, m) for s, rules in POLICIES.items() for m in rules}, "services.auth.POLICIES is stale"


@pytest.mark.parametrize(("service", "method"), _methods(), ids=lambda x: x.name)
def test_refused_without_a_granting_token_and_nothing_changes(cluster: Cluster, service: ServiceDescriptor,
                                                               method: MethodDescriptor) -> None:
    granting = EXPECTED[service.full_name][method.name]
    granting_scopes = {tenant_scope(TENANT_A) if s == "tenant" else s for s in granting}
    other_key = SigningKey.generate()
    refusals = {
        "no token": (None, grpc.StatusCode.UNAUTHENTICATED),
        "malformed": ("not-a-jwt", grpc.StatusCode.UNAUTHENTICATED),
        "expired": (cluster.key.issue("old", ALL_SCOPES, ttl=60, now=1_000_000), grpc.StatusCode.UNAUTHENTICATED),
        "other key": (other_key.issue("forged", ALL_SCOPES, ttl=600), grpc.StatusCode.UNAUTHENTICATED),
        "other tenant": (cluster.token(tenant_scope(TENANT_B)), grpc.StatusCode.PERMISSION_DENIED),
        "wrong scope": (cluster.token(*(ALL_SCOPES - granting_scopes)), grpc.StatusCode.PERMISSION_DENIED),
    }
    before = cluster.state()
    got = {name: _call(cluster, service, method, token) for name, (token, _) in refusals.items()}
    assert got == {name: code for name, (_, code) in refusals.items()}
    assert cluster.state() == before
    # Control: each granting scope alone gets past the check (whatever the call then answers).
    for scope in granting_scopes:
        code = _call(cluster, service, method, cluster.token(scope))
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (scope, code)


def test_a_tenant_cannot_branch_another_tenants_timeline(cluster: Cluster) -> None:
    """A branch lives in the tenant the request names, and its ancestor is looked up there: tenant B's
    token naming tenant A's timeline as ancestor finds nothing."""
    stub = ClientSecurity(cluster.token(tenant_scope(TENANT_B))).channel(cluster.pageserver.address)
    create = stub.unary_unary("/zenith.v1.PageServer/CreateTimeline", pageserver_pb2.CreateTimelineRequest.SerializeToString,
                              pageserver_pb2.TimelineInfo.FromString)
    before = cluster.state()
    with pytest.raises(grpc.RpcError) as e:
        create(pageserver_pb2.CreateTimelineRequest(tenant=common_pb2.TenantId(id=TENANT_B),
                                                    new_timeline=common_pb2.TimelineId(id=uuid.uuid4().hex),
                                                    ancestor_timeline=common_pb2.TimelineId(id=cluster.timeline_a)),
               timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # An empty root timeline in its own tenant is an admin's business too.
    with pytest.raises(grpc.RpcError) as e:
        create(pageserver_pb2.CreateTimelineRequest(tenant=common_pb2.TenantId(id=TENANT_B), pg_version=15,
                                                    new_timeline=common_pb2.TimelineId(id=uuid.uuid4().hex)), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cluster.state() == before
    stub.close()


def test_a_tenant_reads_its_own_timelines_and_a_getpages_stream_cannot_switch_tenant(cluster: Cluster) -> None:
    ch = ClientSecurity(cluster.token(tenant_scope(TENANT_A))).channel(cluster.pageserver.address)
    list_timelines = ch.unary_unary("/zenith.v1.PageServer/ListTimelines",
                                    pageserver_pb2.ListTimelinesRequest.SerializeToString,
                                    pageserver_pb2.ListTimelinesResponse.FromString)
    mine = list_timelines(pageserver_pb2.ListTimelinesRequest(tenant=common_pb2.TenantId(id=TENANT_A)), timeout=10)
    ids = {t.timeline.id for t in mine.timelines}  # the controls above may have branched tenant A
    assert cluster.timeline_a in ids and cluster.timeline_b not in ids
    get_pages = ch.stream_stream("/zenith.v1.PageServer/GetPages", pageserver_pb2.GetPagesRequest.SerializeToString,
                                 pageserver_pb2.GetPagesResponse.FromString)
    own = pageserver_pb2.GetPagesRequest(tenant=common_pb2.TenantId(id=TENANT_A),
                                         timeline=common_pb2.TimelineId(id=cluster.timeline_a))
    other = pageserver_pb2.GetPagesRequest(tenant=common_pb2.TenantId(id=TENANT_B),
                                           timeline=common_pb2.TimelineId(id=cluster.timeline_b))
    answers = []
    with pytest.raises(grpc.RpcError) as e:
        for resp in get_pages(iter([own, other]), timeout=10):
            answers.append(resp)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(answers) == 1  # the first batch, its own tenant's, was answered
    ch.close()


def test_refusals_are_logged_with_method_and_subject_never_the_token(cluster: Cluster,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    token = cluster.token(tenant_scope(TENANT_B))
    forged = SigningKey.generate().issue("mallory", [ADMIN], ttl=60)
    service = pageserver_pb2.DESCRIPTOR.services_by_name["PageServer"]
    with caplog.at_level("WARNING", logger="zenith.auth"):
        assert _call(cluster, service, service.methods_by_name["Gc"], token) == grpc.StatusCode.PERMISSION_DENIED
        assert _call(cluster, service, service.methods_by_name["Gc"], forged) == grpc.StatusCode.UNAUTHENTICATED
    refused = [r for r in caplog.records if r.name == "zenith.auth"]
    assert [(r.method, r.subject, r.code) for r in refused] == [  # type: ignore[attr-defined]
        ("/zenith.v1.PageServer/Gc", "test", "PERMISSION_DENIED"), ("/zenith.v1.PageServer/Gc", "-", "UNAUTHENTICATED")]
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in refused)
    assert token not in text and forged not in text and forged.split(".")[1] not in text


def test_tokens_and_metadata() -> None:
    key = SigningKey.generate()
    verifier = TokenVerifier(key.public_pem())
    claims = verifier.verify(key.issue("zctl", [ADMIN, tenant_scope("")], ttl=0))
    assert claims.subject == "zctl" and claims.expires is None and claims.tenants == {"0" * 32}
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(key.issue("x", [ADMIN], ttl=1, now=1000))
    with pytest.raises(ValueError, match="unknown scope"):
        key.issue("x", ["tenant:nothex"])
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == "" and bearer_token(None) == ""


def test_attach_takes_only_allowed_connection_options(cluster: Cluster) -> None:
    """The walreceiver refuses a primary conninfo whose options would make libpq read this host's files
    (or reach its sockets), before it connects anywhere or keeps anything."""
    ch = ClientSecurity(cluster.token(ADMIN)).channel(cluster.walreceiver.address)
    attach = ch.unary_unary("/zenith.v1.WalReceiver/Attach", walreceiver_pb2.AttachRequest.SerializeToString,
                            walreceiver_pb2.AttachResponse.FromString)
    before = cluster.state()
    for extra in ("passfile=/etc/passwd", "sslkey=/etc/shadow", "sslcert=/x", "sslrootcert=/x", "service=prod",
                  "options='-c x=y'", "host=/var/run/postgresql", "sslcrl=/x"):
        with pytest.raises(grpc.RpcError) as e:
            attach(walreceiver_pb2.AttachRequest(
                tenant=common_pb2.TenantId(id=TENANT_A), timeline=common_pb2.TimelineId(id=cluster.timeline_a),
                primary_conninfo=f"host=127.0.0.1 port=1 user=postgres password=hunter2 {extra}"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, extra
        assert "hunter2" not in (e.value.details() or "")
    assert cluster.state() == before
    ch.close()


def test_primary_host_allow_list() -> None:
    from services.auth import check_primary_conninfo

    check_primary_conninfo({"host": "db1", "port": "5432"}, ["db1", "10.0.0.0/8"])
    check_primary_conninfo({"host": "10.1.2.3"}, ["db1", "10.0.0.0/8"])
    for params in ({"host": "db2"}, {"host": "db1,db2"}, {"host": "db1", "hostaddr": "192.168.1.1"}):
        with pytest.raises(ValueError, match="not among"):
            check_primary_conninfo(params, ["db1", "10.0.0.0/8"])
    with pytest.raises(ValueError, match="must name"):
        check_primary_conninfo({"port": "5432"})


def test_tls_port_refuses_plaintext_and_other_cas(tmp_path: Path) -> None:
    """A TLS-configured port speaks TLS only: a plaintext client (gRPC or raw bytes before any handshake)
    gets nothing, nor does one that trusts another CA; the deployment's CA and a token get through."""
    import socket

    from zauth.certs import make_tls_files

    key, tls, other = SigningKey.generate(), make_tls_files(), make_tls_files()
    ps = PageServer(tmp_path / "ps", "127.0.0.1:0", security=ServerSecurity(
        TokenVerifier(key.public_pem()), tls.server_cert, tls.server_key))
    ps.start()
    try:
        def list_tenants(security: ClientSecurity) -> grpc.StatusCode:
            with security.channel(ps.address) as ch:
                try:
                    ch.unary_unary("/zenith.v1.PageServer/ListTenants", pageserver_pb2.ListTenantsRequest.SerializeToString,
                                   pageserver_pb2.ListTenantsResponse.FromString)(pageserver_pb2.ListTenantsRequest(),
                                                                                  timeout=5)
                except grpc.RpcError as e:
                    return e.code()
            return grpc.StatusCode.OK

        token = key.issue("ops", [ADMIN], ttl=60)
        assert list_tenants(ClientSecurity(token, tls.ca_cert)) == grpc.StatusCode.OK
        assert list_tenants(ClientSecurity(token)) == grpc.StatusCode.UNAVAILABLE
        assert list_tenants(ClientSecurity(token, other.ca_cert)) == grpc.StatusCode.UNAVAILABLE
        assert list_tenants(ClientSecurity(None, tls.ca_cert)) == grpc.StatusCode.UNAUTHENTICATED
        host, port = ps.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # HTTP/2 in clear text
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 64)
            sock.settimeout(10)
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
        assert b"HTTP/2" not in data and b"zenith" not in data  # at most a TLS alert; then the server hangs up
    finally:
        ps.stop(0)
