"""Who a shim session is and which tenants it sees.

A client authenticates one of two ways (Postgres's own methods, chosen by user name):
- a user in the password file: SCRAM-SHA-256 against the secret kept there (lines
  `user SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> tenant[,tenant...]`, `*` for
  every tenant; `zctl init` writes one for `postgres`);
- anyone else: a token (JWT) as the password, as Neon's computes authenticate to its page server:
  sent in clear text, so only over TLS; the token's `tenant:<id>` scopes are the tenants it sees
  (`admin`: every tenant).
With `--insecure` every client is trusted and sees every tenant.

`TenantView` is the page server client a session uses: every call naming a tenant the session may
not see is refused (42501) before it reaches the page server, and `tenants()` lists only its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgformat.scram import ScramError, ScramVerifier
from pgformat.wire import SqlState

from services.auth import parse_password_line

from .client import PageServerClient
from .errors import ShimError

class PasswordFileError(ValueError):
    """A password file line that cannot be used; the message names the line."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated client: its name (for logs) and its tenants (None: every tenant)."""

    name: str
    tenants: frozenset[str] | None

    def may_read(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


@dataclass(frozen=True, slots=True)
class ShimUser:
    name: str
    secret: ScramVerifier
    tenants: frozenset[str] | None


def read_password_file(path: Path) -> dict[str, ShimUser]:
    users: dict[str, ShimUser] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        try:
            parsed = parse_password_line(raw)
        except ValueError as e:
            raise PasswordFileError(f"{path}:{n}: {e}") from None
        if parsed is not None:
            name, secret, tenants = parsed
            try:
                verifier = ScramVerifier.parse(secret)
            except ScramError as e:
                raise PasswordFileError(f"{path}:{n}: {e}") from None
            users[name] = ShimUser(name, verifier, tenants)
    return users


def _denied(tenant: str, principal: Principal) -> ShimError:
    return ShimError(SqlState.INSUFFICIENT_PRIVILEGE, f"permission denied for tenant {tenant}",
                     detail=f"{principal.name} may read only its own tenants")


class TenantView:
    """`PageServerClient` as one session may use it."""

    def __init__(self, client: PageServerClient, principal: Principal) -> None:
        self._client = client
        self.principal = principal
        self.stub = client.stub  # used only after resolve_timeline() checked the tenant
        self.rpc_timeout = client.rpc_timeout
        self.ids = client.ids

    def check(self, tenant: str) -> None:
        if not self.principal.may_read(tenant):
            raise _denied(tenant, self.principal)

    async def tenants(self) -> list[str]:
        if self.principal.tenants is None:
            return await self._client.tenants()
        return sorted(self.principal.tenants)

    async def timelines(self, tenant: str) -> list[Any]:
        self.check(tenant)
        return await self._client.timelines(tenant)

    async def timeline(self, tenant: str, timeline: str) -> Any:
        self.check(tenant)
        return await self._client.timeline(tenant, timeline)

    async def resolve_timeline(self, tenant: str, name_or_id: str) -> Any:
        self.check(tenant)
        return await self._client.resolve_timeline(tenant, name_or_id)

    def basebackup(self, tenant: str, timeline: str, lsn: int) -> Any:
        self.check(tenant)
        return self._client.basebackup(tenant, timeline, lsn)

    async def basebackup_chunks(self, tenant: str, timeline: str, lsn: int) -> AsyncIterator[Any]:
        self.check(tenant)
        async for chunk in self._client.basebackup_chunks(tenant, timeline, lsn):
            yield chunk


__all__ = ["PasswordFileError", "Principal", "ShimUser", "TenantView", "read_password_file"]
