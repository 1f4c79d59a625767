"""One client connection: startup, authentication and the query loop.

The protocol state machine of src/backend/tcop/postgres.c (PostgresMain),
reduced to what the shim's commands need: simple query, the extended
protocol without parameters (what psycopg sends), COPY OUT / COPY BOTH
driven by the commands themselves, CancelRequest and Terminate. A client
that breaks the protocol gets an ErrorResponse and the connection closes;
other sessions are not affected.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgformat import scram, wire
from pgformat.lsn import LsnFormatError, parse_lsn
from pgformat.wire import ProtocolError, SqlState

from zauth.tokens import TokenError

from .auth import Principal, TenantView
from .client import DEFAULT_TENANT, Target
from .commands import Command, Result, parse_command
from .errors import ClientGone, ShimError

if TYPE_CHECKING:
    from .server import ShimServer

log = logging.getLogger("zenith.pgshim")

SERVER_VERSION = "15.0"  # what clients see; pg_basebackup picks its protocol by it


@dataclass(slots=True)
class Portal:
    command: Command
    result: Result | None = None  # computed at Describe time for non-streaming commands
    described: bool = False


@dataclass(slots=True)
class Startup:
    user: str
    database: str
    replication: bool
    application_name: str
    settings: dict[str, str] = field(default_factory=dict)


class Session:
    """A client connection; `run()` serves it until it ends."""

    def __init__(self, server: ShimServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.pid = server.allocate_pid()
        self.secret = secrets.randbits(32)
        self.parser = wire.MessageParser(server.config.max_message_length)
        self.pending: deque[tuple[bytes, bytes]] = deque()
        self.peer = writer.get_extra_info("peername")
        self.startup: Startup | None = None
        self.requested: tuple[str, str, int | None] = (DEFAULT_TENANT, "main", None)  # from startup options
        self.target: Target | None = None  # `requested`, resolved at the page server on first use
        self._statements: dict[str, str] = {}
        self._portals: dict[str, Portal] = {}
        self._command_task: asyncio.Task[None] | None = None
        self._cancelled = False
        self.temp_slots: set[str] = set()
        self.tls = False
        self.principal = Principal("-", frozenset())  # nobody until authenticated
        self.client = TenantView(server.client, self.principal)

    # -- I/O -----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ClientGone()
        self.writer.write(data)

    async def flush(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise ClientGone() from e

    async def _fill(self) -> None:
        try:
            data = await self.reader.read(1 << 16)
        except (ConnectionError, OSError) as e:
            raise ClientGone() from e
        if not data:
            raise ClientGone()
        self.pending.extend(self.parser.feed(data))

    async def recv(self) -> tuple[bytes, bytes]:
        """The next frontend message."""
        while not self.pending:
            await self._fill()
        return self.pending.popleft()

    async def recv_batch(self) -> list[tuple[bytes, bytes]]:
        """Every message received so far (at least one): lets callers batch work."""
        while not self.pending:
            await self._fill()
        out = list(self.pending)
        self.pending.clear()
        return out

    def error(self, err: ShimError) -> None:
        self.send(wire.error_response(err.fields()))

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        try:
            started = await asyncio.wait_for(self._startup(), self.server.config.startup_timeout)
            if started:
                await self._serve()
        except ClientGone:
            pass
        except asyncio.TimeoutError:
            self._fatal(ShimError(SqlState.PROTOCOL_VIOLATION, "startup did not complete in time", fatal=True))
        except ProtocolError as e:
            self._fatal(ShimError(SqlState.PROTOCOL_VIOLATION, str(e), fatal=True))
        except ShimError as e:
            e.fatal = True
            self._fatal(e)
        except Exception as e:  # a bug: tell the client, keep serving others
            log.exception("session failed", extra={"pid": self.pid, "peer": self.peer})
            self._fatal(ShimError(SqlState.INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}", fatal=True))
        finally:
            self.server.forget(self)
            try:
                self.writer.close()
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass

    def _fatal(self, err: ShimError) -> None:
        log.info("closing session", extra={"pid": self.pid, "peer": self.peer, "reason": err.message})
        try:
            if not self.writer.is_closing():
                self.writer.write(wire.error_response(err.fields()))
        except Exception:  # noqa: BLE001
            pass

    async def _read_exact(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise ClientGone() from e

    async def _startup(self) -> bool:
        """Negotiate TLS, read the startup message, authenticate. False: the connection is done."""
        while True:
            length = wire.startup_packet_length(await self._read_exact(4))
            packet = wire.parse_startup_packet(await self._read_exact(length))
            if isinstance(packet, wire.SSLRequest):
                tls = self.server.tls_context
                if tls is None or self.tls:
                    self.send(wire.SSL_REFUSED)
                    continue
                # Bytes the client sent before the handshake would be read as if they had come
                # through TLS (CVE-2021-23214): refused, as Postgres does.
                if self.reader._buffer:  # asyncio keeps what it read ahead here; nothing else tells
                    raise ShimError(SqlState.PROTOCOL_VIOLATION, "received unencrypted data after SSL request")
                self.send(wire.SSL_ACCEPTED)
                await self.flush()
                await self.writer.start_tls(tls)
                self.tls = True
                continue
            if isinstance(packet, wire.GSSEncRequest):
                self.send(wire.SSL_REFUSED)  # 'N': no GSSAPI encryption
                continue
            if isinstance(packet, wire.CancelRequest):
                self.server.cancel(packet.pid, packet.secret)
                return False
            break
        if self.server.tls_context is not None and not self.tls:
            raise ShimError(SqlState.INVALID_AUTHORIZATION, "this server accepts TLS connections only",
                            hint="connect with sslmode=require (or prefer, libpq's default)")
        params = packet.params
        settings = wire.parse_options(params.get("options", ""))
        replication = params.get("replication", "false").lower()
        if replication not in ("true", "on", "yes", "1", "database", "false", "off", "no", "0"):
            raise ShimError(SqlState.INVALID_PARAMETER_VALUE,
                            f"invalid value for parameter \"replication\": \"{params['replication']}\"")
        self.startup = Startup(
            user=params["user"], database=params.get("database", params["user"]),
            replication=replication not in ("false", "off", "no", "0"),
            application_name=params.get("application_name", ""), settings=settings)
        self.requested = self._requested_target(settings)
        self.principal = await self._authenticate(self.startup.user)
        self.client = TenantView(self.server.client, self.principal)
        if not self.server.admit(self):
            raise ShimError(SqlState.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        self.send(wire.AUTH_OK)
        for name, value in (("server_version", SERVER_VERSION), ("server_encoding", "UTF8"),
                            ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("TimeZone", "UTC"),
                            ("integer_datetimes", "on"), ("standard_conforming_strings", "on"),
                            ("IntervalStyle", "postgres"), ("is_superuser", "on"),
                            ("session_authorization", self.startup.user),
                            ("application_name", self.startup.application_name)):
            self.send(wire.parameter_status(name, value))
        self.send(wire.backend_key_data(self.pid, self.secret))
        self.send(wire.ready_for_query())
        await self.flush()
        log.info("session started", extra={"pid": self.pid, "peer": self.peer, "user": self.startup.user,
                                           "principal": self.principal.name, "tls": self.tls,
                                           "replication": self.startup.replication})
        return True

    @staticmethod
    def _requested_target(settings: dict[str, str]) -> tuple[str, str, int | None]:
        tenant = settings.get("zenith.tenant", "") or DEFAULT_TENANT
        branch = settings.get("zenith.branch", "") or "main"
        lsn_text = settings.get("zenith.lsn", "")
        try:
            lsn = parse_lsn(lsn_text) if lsn_text and lsn_text != "latest" else None
        except LsnFormatError as e:
            raise ShimError(SqlState.INVALID_PARAMETER_VALUE, f"zenith.lsn: {e}") from None
        return tenant, branch, lsn

    async def _authenticate(self, user: str) -> Principal:
        """Trust (--insecure), SCRAM-SHA-256 for a user of the password file, else a token as the
        password (TLS only: it travels in clear text). See auth.py."""
        config = self.server.config
        if config.insecure:
            return Principal(user, None)
        known = config.users.get(user)
        if known is not None:
            await self._scram(known.secret, user)
            return Principal(user, known.tenants)
        if config.verifier is None:
            raise ShimError(SqlState.INVALID_PASSWORD, f"password authentication failed for user \"{user}\"")
        if not self.tls:
            raise ShimError(SqlState.INVALID_AUTHORIZATION,
                            "a token is accepted as the password over TLS only (it would travel in clear text)",
                            hint="connect with sslmode=require")
        self.send(wire.AUTH_CLEARTEXT_PASSWORD)
        await self.flush()
        kind, body = await self.recv()
        if kind != b"p":
            raise ProtocolError(f"expected a password message, got message type {kind!r}")
        try:
            claims = config.verifier.verify(wire.parse_password(body))
        except TokenError as e:
            log.warning("authentication failed", extra={"pid": self.pid, "peer": self.peer, "user": user,
                                                        "reason": str(e)})
            raise ShimError(SqlState.INVALID_PASSWORD, f"password authentication failed for user \"{user}\"") from None
        return Principal(claims.subject, None if claims.is_admin else claims.tenants)

    async def _scram(self, secret: scram.ScramVerifier, user: str) -> None:
        failed = ShimError(SqlState.INVALID_PASSWORD, f"password authentication failed for user \"{user}\"")
        self.send(wire.auth_sasl([scram.MECHANISM]))
        await self.flush()
        kind, body = await self.recv()
        if kind != b"p":
            raise ProtocolError(f"expected a SASLInitialResponse message, got message type {kind!r}")
        mechanism, first = wire.parse_sasl_initial_response(body)
        if mechanism != scram.MECHANISM:
            raise ShimError(SqlState.PROTOCOL_VIOLATION, f"client selected an invalid SASL authentication "
                                                         f"mechanism {mechanism!r}")
        exchange = scram.ScramServer(secret)
        try:
            self.send(wire.auth_sasl_continue(exchange.first(first)))
            await self.flush()
            kind, body = await self.recv()
            if kind != b"p":
                raise ProtocolError(f"expected a SASLResponse message, got message type {kind!r}")
            self.send(wire.auth_sasl_final(exchange.final(body)))
        except scram.ScramError as e:
            log.warning("authentication failed", extra={"pid": self.pid, "peer": self.peer, "user": user,
                                                        "reason": str(e)})
            raise failed from None

    async def resolve_target(self) -> Target:
        """The branch/LSN chosen at startup (zenith.branch, zenith.lsn), checked against the page server."""
        if self.target is None:
            tenant, branch, lsn = self.requested
            info = await self.client.resolve_timeline(tenant, branch)
            self.target = Target(tenant, info.timeline.id, lsn)
        return self.target

    # -- query loop ----------------------------------------------------------------

    async def _serve(self) -> None:
        skipping = False  # after an error in extended protocol: discard until Sync
        while True:
            kind, body = await self.recv()
            if kind == b"X":
                return
            if kind == b"S":
                skipping = False
                self.send(wire.ready_for_query())
                await self.flush()
                continue
            if kind == b"H":
                await self.flush()
                continue
            if kind in (b"d", b"c", b"f"):
                continue  # stray copy messages outside COPY are ignored, as Postgres does
            if kind == b"Q":
                await self._simple_query(wire.parse_query(body))
                continue
            if kind not in (b"P", b"B", b"D", b"E", b"C"):
                raise ProtocolError(f"invalid frontend message type {kind[0]}")
            if skipping:
                continue
            try:
                await self._extended(kind, body)
            except ShimError as e:
                if e.fatal:
                    raise
                self.error(e)
                skipping = True
            await self.flush()

    async def _simple_query(self, text: str) -> None:
        try:
            command = parse_command(text)
            if command is None:
                self.send(wire.EMPTY_QUERY_RESPONSE)
            else:
                result = await self._execute(command)
                if result is not None:
                    self.send(result.encode(with_description=True))
        except ShimError as e:
            if e.fatal:
                raise
            self.error(e)
        self.send(wire.ready_for_query())
        await self.flush()

    async def _extended(self, kind: bytes, body: bytes) -> None:
        if kind == b"P":
            p = wire.parse_parse(body)
            if p.param_types:
                raise ShimError(SqlState.FEATURE_NOT_SUPPORTED, "the shim's commands take no parameters")
            parse_command(p.query)  # syntax errors belong to Parse
            self._statements[p.statement] = p.query
            self.send(wire.PARSE_COMPLETE)
        elif kind == b"B":
            b = wire.parse_bind(body)
            if b.params:
                raise ShimError(SqlState.FEATURE_NOT_SUPPORTED, "the shim's commands take no parameters")
            if b.statement not in self._statements:
                raise ShimError("26000", f"prepared statement \"{b.statement}\" does not exist")
            command = parse_command(self._statements[b.statement])
            if command is None:
                raise ShimError(SqlState.SYNTAX_ERROR, "empty query")
            self._portals[b.portal] = Portal(command)
            self.send(wire.BIND_COMPLETE)
        elif kind == b"D":
            what, name = wire.parse_describe_or_close(body, "Describe")
            if what == b"S":
                if name not in self._statements:
                    raise ShimError("26000", f"prepared statement \"{name}\" does not exist")
                self.send(wire.parameter_description())
                command = parse_command(self._statements[name])
                pure = command is not None and command.pure
                result = await self._execute(command) if pure and command is not None else None
                self.send(result.describe() if result is not None else wire.NO_DATA)
            else:
                portal = self._portal(name)
                if not portal.command.streaming and portal.result is None:
                    portal.result = await self._execute(portal.command)
                portal.described = True
                self.send(portal.result.describe() if portal.result is not None else wire.NO_DATA)
        elif kind == b"E":
            name, _maxrows = wire.parse_execute(body)
            portal = self._portal(name)
            result = portal.result if portal.result is not None else await self._execute(portal.command)
            if result is not None:
                self.send(result.encode(with_description=False))
            portal.result = None
        else:  # Close
            what, name = wire.parse_describe_or_close(body, "Close")
            (self._statements if what == b"S" else self._portals).pop(name, None)
            self.send(wire.CLOSE_COMPLETE)

    def _portal(self, name: str) -> Portal:
        portal = self._portals.get(name)
        if portal is None:
            raise ShimError("34000", f"portal \"{name}\" does not exist")
        return portal

    async def _execute(self, command: Command) -> Result | None:
        """Run a command as a task a CancelRequest can cancel."""
        self._cancelled = False
        task = asyncio.ensure_future(command.run(self))
        self._command_task = task  # type: ignore[assignment]
        try:
            return await task
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
            raise ShimError(SqlState.QUERY_CANCELED, "canceling statement due to user request") from None
        finally:
            self._command_task = None

    def cancel(self) -> None:
        """A CancelRequest named this session: stop its running command."""
        if self._command_task is not None and not self._command_task.done():
            self._cancelled = True
            self._command_task.cancel()
