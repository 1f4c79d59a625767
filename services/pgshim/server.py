"""The shim's listening socket and the sessions it serves."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from services.auth import ClientSecurity
from zauth.tokens import TokenVerifier

from .auth import ShimUser
from .client import PageServerClient
from .replication import WalSegments
from .session import Session

log = logging.getLogger("zenith.pgshim")


@dataclass(frozen=True, slots=True)
class ShimConfig:
    """How the shim listens, whom it serves and where the page server is."""

    pageserver: str
    host: str = "127.0.0.1"
    port: int = 6400
    insecure: bool = False  # trust every client (development only)
    users: dict[str, ShimUser] = field(default_factory=dict)  # SCRAM-SHA-256 users of the password file
    verifier: TokenVerifier | None = None  # tokens accepted as the password (over TLS)
    tls_cert: Path | None = None  # TLS required when set
    tls_key: Path | None = None
    max_connections: int = 100
    max_message_length: int = 1 << 20
    startup_timeout: float = 10.0
    pageserver_security: ClientSecurity = field(default_factory=ClientSecurity)  # token and CA for the page server


class ShimServer:
    """Accepts connections and runs one Session per client; cancel requests find sessions here."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.sessions: dict[int, Session] = {}
        self.wal = WalSegments()
        self._pids = itertools.count((os.getpid() & 0xFFFF) << 8)
        self.tls_context: ssl.SSLContext | None = None
        if config.tls_cert is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.load_cert_chain(config.tls_cert, config.tls_key)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.client: PageServerClient

    async def start(self) -> None:
        self.client = PageServerClient(self.config.pageserver, security=self.config.pageserver_security)
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port,
                                                  reuse_address=True)
        log.info("shim listening", extra={"address": self.address, "pageserver": self.config.pageserver})

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await session.run()
        finally:
            if task is not None:
                self._tasks.discard(task)  # type: ignore[arg-type]

    def allocate_pid(self) -> int:
        return next(self._pids) & 0x7FFFFFFF

    def admit(self, session: Session) -> bool:
        if len(self.sessions) >= self.config.max_connections:
            return False
        self.sessions[session.pid] = session
        return True

    def forget(self, session: Session) -> None:
        if self.sessions.get(session.pid) is session:
            del self.sessions[session.pid]

    def cancel(self, pid: int, secret: int) -> None:
        session = self.sessions.get(pid)
        if session is not None and session.secret == secret:
            log.info("cancel request", extra={"pid": pid})
            session.cancel()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()
