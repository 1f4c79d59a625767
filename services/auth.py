"""Who may call which RPC, checked the same way by every gRPC service; and the client side of it.

- `POLICIES`: for every method of every zenith service, the scopes that grant it, and for tenant
  data the request's tenant whose `tenant:<id>` scope grants it too. A method missing here is
  refused (PERMISSION_DENIED), so a new RPC is closed until someone decides who may call it.
- `AuthInterceptor`: the token comes as call metadata `authorization: Bearer <jwt>`. Missing,
  malformed, expired or signed by another key: UNAUTHENTICATED; valid but not granting the call
  (wrong scope, another tenant): PERMISSION_DENIED. The check runs before the handler sees the
  request (for streams, before it sees each message), so a refused call changes nothing. A refusal
  is logged with the method, the subject and the reason, never the token.
- `ServerSecurity` / `ClientSecurity`: what a service needs to check callers (the public key, its
  TLS certificate) and to call another service (its token, the CA it trusts), from the command line
  (`add_security_arguments`, the same flags for every service).

The health service (grpc.health.v1) stays open: supervisors and container health checks probe it
without a token (it tells nothing but SERVING).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from zauth.tokens import ADMIN, DEFAULT_TENANT, INGEST, REDO, Claims, TokenError, TokenVerifier

log = logging.getLogger("zenith.auth")

METADATA_KEY = "authorization"
OPEN_SERVICES = ("grpc.health.v1.Health",)


def _tenant(request: Any) -> str:
    return request.tenant.id or DEFAULT_TENANT


def _branch_tenant(request: Any) -> str | None:
    """CreateTimeline: a branch of an existing timeline is the tenant's own business; an empty root
    timeline (which Import then fills) is an admin's."""
    return _tenant(request) if request.ancestor_timeline.id else None


@dataclass(frozen=True, slots=True)
class Rule:
    """Any scope in `scopes` grants the call; so does `tenant:<id>` for the id `tenant(request)` gives
    (None: no tenant scope grants it)."""

    scopes: frozenset[str]
    tenant: Callable[[Any], str | None] | None = None

    def allows(self, claims: Claims, request: Any) -> bool:
        if self.scopes & claims.scopes:
            return True
        if self.tenant is None:
            return False
        tenant = self.tenant(request)
        return tenant is not None and tenant in claims.tenants


_ADMIN = Rule(frozenset({ADMIN}))
_READ = Rule(frozenset({ADMIN}), _tenant)

POLICIES: dict[str, dict[str, Rule]] = {
    "zenith.v1.PageServer": {
        **{m: _READ for m in ("GetPage", "GetPages", "RelSize", "RelExists", "ListRelations", "DbSize",
                              "GetSlruSegment", "Basebackup", "ListTimelines", "FindLsnByTimestamp")},
        "GetTimeline": Rule(frozenset({ADMIN, INGEST}), _tenant),  # the walreceiver checks where WAL goes
        "CreateTimeline": Rule(frozenset({ADMIN}), _branch_tenant),
        **{m: _ADMIN for m in ("CreateTenant", "ListTenants", "Gc", "ClaimTimeline", "ReleaseTimeline",
                               "CreateImageLayer", "Checkpoint", "Import")},
        "Ingest": Rule(frozenset({INGEST})),
    },
    "zenith.v1.Redo": {"ApplyRecords": Rule(frozenset({REDO})), "ApplyRecordsStream": Rule(frozenset({REDO}))},
    "zenith.v1.WalReceiver": {m: _ADMIN for m in ("Attach", "Detach", "Status")},
}


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The token in `authorization: Bearer <token>` call metadata ('' when absent)."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _refusal(code: grpc.StatusCode, message: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return refuse


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call against `policies` (service name -> method -> Rule) with `verifier`."""

    def __init__(self, verifier: TokenVerifier, policies: dict[str, dict[str, Rule]] | None = None) -> None:
        self.verifier = verifier
        self.policies = POLICIES if policies is None else policies

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        try:
            claims = self.verifier.verify(bearer_token(details.invocation_metadata))
        except TokenError as e:
            log.warning("call refused: %s", e, extra={"method": details.method, "subject": "-",
                                                      "code": "UNAUTHENTICATED"})
            return _replace(handler, _refusal(grpc.StatusCode.UNAUTHENTICATED, f"authentication failed: {e}"))
        rule = self.policies.get(service, {}).get(method)
        if rule is None:
            return self._deny(handler, details.method, claims, "no rule grants this method to anyone")
        if rule.tenant is None:
            return handler if rule.allows(claims, None) else self._deny(handler, details.method, claims,
                                                                         "missing scope")
        # The request names the tenant: checked before the handler sees it (for a request stream such
        # as GetPages, every message).
        return _replace(handler, None, check=lambda request: self._check(rule, claims, details.method, request),
                        per_message=bool(handler.request_streaming))

    def _check(self, rule: Rule, claims: Claims, method: str, request: Any) -> str | None:
        """None if `rule` grants the call with `request`, else why not."""
        if rule.allows(claims, request):
            return None
        reason = "missing scope" if rule.tenant is None or rule.tenant(request) is None else \
            f"no access to tenant {rule.tenant(request)}"
        log.warning("call refused: %s", reason, extra={"method": method, "subject": claims.subject,
                                                       "code": "PERMISSION_DENIED"})
        return reason

    @staticmethod
    def _deny(handler: Any, method: str, claims: Claims, reason: str) -> Any:
        log.warning("call refused: %s", reason, extra={"method": method, "subject": claims.subject,
                                                       "code": "PERMISSION_DENIED"})
        return _replace(handler, _refusal(grpc.StatusCode.PERMISSION_DENIED,
                                          f"permission denied: {reason} (token subject {claims.subject!r})"))


def _replace(handler: Any, behavior: Callable[[Any, Any], Any] | None, *,
             check: Callable[[Any], str | None] | None = None, per_message: bool = False) -> Any:
    """`handler` with its behavior replaced by `behavior`, or wrapped so `check` vets the request
    (every message of a request stream with `per_message`) before the behavior runs."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attr, make in kinds:
        original = getattr(handler, attr)
        if original is None:
            continue
        if behavior is not None:
            wrapped = behavior
        elif per_message:
            wrapped = _vet_each(original, check)  # type: ignore[arg-type]
        else:
            wrapped = _vet_request(original, check, streaming_response=attr == "unary_stream")  # type: ignore[arg-type]
        return make(wrapped, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    return handler


def _denied(context: grpc.ServicerContext, reason: str) -> None:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, f"permission denied: {reason}")


def _vet_request(original: Callable[[Any, Any], Any], check: Callable[[Any], str | None],
                 streaming_response: bool) -> Callable[[Any, Any], Any]:
    if streaming_response:
        def vetted_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            reason = check(request)
            if reason is not None:
                _denied(context, reason)
            yield from original(request, context)

        return vetted_stream

    def vetted(request: Any, context: grpc.ServicerContext) -> Any:
        reason = check(request)
        if reason is not None:
            _denied(context, reason)
        return original(request, context)

    return vetted


def _vet_each(original: Callable[[Any, Any], Any], check: Callable[[Any], str | None]) -> Callable[[Any, Any], Any]:
    def vetted(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        def each() -> Iterator[Any]:
            for request in requests:
                reason = check(request)
                if reason is not None:
                    _denied(context, reason)
                yield request

        return original(each(), context)

    return vetted


# -- the libpq shim's password file (written by zctl, read by the shim) --------------------------------

ALL_TENANTS = "*"


def format_password_line(user: str, scram_secret: str, tenants: Sequence[str] | None) -> str:
    """`user SCRAM-SHA-256$... tenant[,tenant...]` (`*`: every tenant), as the shim reads it."""
    return f"{user} {scram_secret} {ALL_TENANTS if tenants is None else ','.join(tenants)}\n"


def parse_password_line(line: str) -> tuple[str, str, frozenset[str] | None] | None:
    """(user, SCRAM secret, tenants or None for every tenant); None for blank and comment lines."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split()
    if len(parts) != 3:
        raise ValueError("expected `user SCRAM-SHA-256$... tenant[,tenant...]` (or `*` for every tenant)")
    user, secret, tenants = parts
    return user, secret, None if tenants == ALL_TENANTS else frozenset(tenants.split(","))


# -- what a primary's connection string may ask of the walreceiver's host ---------------------------------

# libpq options a primary's conninfo may carry: where and how to connect. Not those that make libpq
# read files of the host it runs on (passfile, service, sslcert, sslkey, sslrootcert, sslcrl, ...)
# nor `options` (settings for the primary's session).
PRIMARY_CONNINFO_OPTIONS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "connect_timeout", "application_name",
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
    "sslmode", "sslsni", "ssl_min_protocol_version", "ssl_max_protocol_version", "channel_binding",
    "require_auth", "gssencmode", "target_session_attrs", "replication",
})


def check_primary_conninfo(params: dict[str, str], allowed_hosts: Sequence[str] = ()) -> None:
    """ValueError unless a parsed conninfo keeps to PRIMARY_CONNINFO_OPTIONS, names TCP hosts only (a
    socket directory would reach the host's own servers as its OS user) and, with `allowed_hosts`
    (names, addresses or networks like 10.0.0.0/8), only hosts in it. The message never repeats a value."""
    import ipaddress

    refused = sorted(set(params) - PRIMARY_CONNINFO_OPTIONS)
    if refused:
        raise ValueError(f"connection option(s) not allowed for a primary: {', '.join(refused)} (allowed: "
                         f"{', '.join(sorted(PRIMARY_CONNINFO_OPTIONS))})")
    hosts = [h.strip() for key in ("host", "hostaddr") for h in (params.get(key) or "").split(",") if h.strip()]
    if not hosts:
        raise ValueError("the connection string must name the primary's host (host=...)")
    for host in hosts:
        if host.startswith(("/", "@")):
            raise ValueError("a primary is reached over TCP: host must not be a socket directory")
        if allowed_hosts and not _host_allowed(host, allowed_hosts, ipaddress):
            raise ValueError(f"host {host} is not among the walreceiver's allowed primary hosts")


def _host_allowed(host: str, allowed: Sequence[str], ipaddress: Any) -> bool:
    for entry in allowed:
        if host == entry:
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


# -- configuration: what a server checks, what a client presents ------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """A service's side: the key tokens are checked against (None: no authentication, --insecure)
    and its TLS certificate chain and key (PEM; None: plaintext)."""

    verifier: TokenVerifier | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [AuthInterceptor(self.verifier)] if self.verifier is not None else []

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)])


@dataclass(frozen=True)
class ClientSecurity:
    """A caller's side: the token it presents (None: none) and the CA it trusts (None: plaintext)."""

    token: str | None = None
    tls_ca: bytes | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((METADATA_KEY, f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A sync channel to `address` that sends the token with every call."""
        if self.tls_ca is not None:
            ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=self.tls_ca),
                                     options=list(options))
        else:
            ch = grpc.insecure_channel(address, options=list(options))
        return grpc.intercept_channel(ch, _TokenInterceptor(self.metadata())) if self.token else ch

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to `address` that sends the token with every call."""
        interceptors = _aio_interceptors(self.metadata()) if self.token else None
        if self.tls_ca is not None:
            return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=self.tls_ca),
                                           options=list(options), interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def _with_metadata(details: Any, metadata: tuple[tuple[str, str], ...], cls: Any) -> Any:
    merged = [*(details.metadata or ()), *metadata]
    return cls(details.method, details.timeout, merged, details.credentials,
               getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata, _CallDetails), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata, _CallDetails), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata, _CallDetails), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata, _CallDetails), requests)


def _aio_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[Any]:
    def details_with(details: Any) -> Any:
        return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                          grpc.aio.Metadata(*(tuple(details.metadata or ())), *metadata),
                                          details.credentials, details.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(details_with(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(details_with(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
            return await continuation(details_with(details), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
            return await continuation(details_with(details), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


# -- the command line, the same for every service ----------------------------------------------------


def add_security_arguments(parser: argparse.ArgumentParser, *, server: bool = True, client: bool = True) -> None:
    g = parser.add_argument_group("security")
    if server:
        g.add_argument("--auth-public-key", type=Path, default=None, metavar="PEM",
                       help="check every call's token (JWT, EdDSA) against this public key (`zctl init` makes it)")
        g.add_argument("--insecure", action="store_true",
                       help="accept calls without a token (development only; needed when no --auth-public-key)")
        g.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="serve TLS with this certificate chain")
        g.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert")
    if client:
        g.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                       help="token this service presents to the services it calls (env ZENITH_TOKEN otherwise)")
        g.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                       help="call other services over TLS, trusting this CA certificate")


class SecurityConfigError(ValueError):
    """Security flags that do not fit together or files that cannot be read; the message says which."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def server_security(args: argparse.Namespace) -> ServerSecurity:
    """From the flags of `add_security_arguments`: authentication is required unless --insecure."""
    if args.auth_public_key is None and not args.insecure:
        raise SecurityConfigError("give --auth-public-key (tokens are checked against it) or, for development "
                                  "only, --insecure")
    if args.auth_public_key is not None and args.insecure:
        raise SecurityConfigError("--auth-public-key and --insecure exclude each other")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    verifier = None
    if args.auth_public_key is not None:
        try:
            verifier = TokenVerifier(_read(args.auth_public_key, "public key"))
        except (TokenError, ValueError) as e:
            raise SecurityConfigError(f"{args.auth_public_key}: {e}") from None
    return ServerSecurity(verifier, _read(args.tls_cert, "certificate") if args.tls_cert else None,
                          _read(args.tls_key, "private key") if args.tls_key else None)


def client_security(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ClientSecurity:
    token = (environ or {}).get("ZENITH_TOKEN") or None
    if args.token_file is not None:
        token = _read(args.token_file, "token file").decode().strip() or None
    return ClientSecurity(token, _read(args.tls_ca, "CA certificate") if args.tls_ca else None)


__all__ = ["ALL_TENANTS", "POLICIES", "AuthInterceptor", "ClientSecurity", "Rule", "SecurityConfigError", "ServerSecurity",
           "add_security_arguments", "bearer_token", "check_primary_conninfo", "client_security", "format_password_line", "parse_password_line",
           "server_security"]
