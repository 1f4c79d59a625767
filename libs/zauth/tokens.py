"""JWTs that say what a caller may do: EdDSA (Ed25519) signatures, scopes as a list of strings.

Scopes:
- `tenant:<32 hex>`: read and branch that tenant's timelines (a tenant's user, a compute, the shim);
- `ingest`: send WAL to the page server (the walreceiver);
- `redo`: use the redo pool (the page server);
- `admin`: manage any tenant (create tenants and root timelines, Import, Gc, claims, image layers,
  Attach/Detach) and read any tenant.

A token is `{"sub": who, "scope": [...], "iat": t, "exp": t}` (`exp` absent: it does not expire).
Verifying checks the signature against the one public key, the expiry, and the claims' shape;
every failure is a `TokenError` whose message never contains the token.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ADMIN = "admin"
INGEST = "ingest"
REDO = "redo"
TENANT_PREFIX = "tenant:"
# common.proto: an empty tenant id selects this one.
DEFAULT_TENANT = "0" * 32
ALGORITHM = "EdDSA"

_TENANT_ID = re.compile(r"^[0-9a-f]{32}$")
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenError(ValueError):
    """A token that is missing, malformed, expired or not signed by our key (the message says which)."""


class ScopeError(ValueError):
    """A scope that is not one of the known kinds."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants."""

    subject: str
    scopes: frozenset[str]
    expires: float | None = None

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(s[len(TENANT_PREFIX):] for s in self.scopes if s.startswith(TENANT_PREFIX))

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def may_read(self, tenant: str) -> bool:
        """A tenant's data: its own token or an admin's."""
        return self.is_admin or (tenant or DEFAULT_TENANT) in self.tenants


def tenant_scope(tenant: str) -> str:
    return TENANT_PREFIX + (tenant or DEFAULT_TENANT)


def check_scope(scope: str) -> str:
    """`scope` if it is one we know (tenant ids: 32 lowercase hex), else ScopeError."""
    if scope in (ADMIN, INGEST, REDO):
        return scope
    if scope.startswith(TENANT_PREFIX) and _TENANT_ID.match(scope[len(TENANT_PREFIX):]):
        return scope
    raise ScopeError(f"unknown scope {scope!r} (admin, ingest, redo or tenant:<32 hex digits>)")


def parse_duration(text: str) -> int:
    """'90', '90s', '15m', '12h', '30d', '2w' -> seconds; '0' means no expiry."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError(f"a duration is a number with an optional unit s, m, h, d or w (e.g. 12h), got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The private key that signs tokens (kept by zctl only)."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TokenError("the signing key is not an Ed25519 private key")
        return cls(key)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def issue(self, subject: str, scopes: Iterable[str], ttl: float | None = None, now: float | None = None) -> str:
        """A token for `subject` with `scopes`, valid for `ttl` seconds (None or 0: no expiry)."""
        issued = int(time.time() if now is None else now)
        payload: dict[str, object] = {"sub": subject, "scope": sorted({check_scope(s) for s in scopes}),
                                      "iat": issued}
        if ttl:
            payload["exp"] = issued + int(ttl)
        return jwt.encode(payload, self.private, algorithm=ALGORITHM)


class TokenVerifier:
    """Checks tokens against one public key."""

    def __init__(self, public_pem: bytes) -> None:
        key = serialization.load_pem_public_key(public_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise TokenError("the public key is not an Ed25519 key")
        self._key = key

    def verify(self, token: str) -> Claims:
        if not token:
            raise TokenError("no token")
        try:
            payload = jwt.decode(token, self._key, algorithms=[ALGORITHM], options={"require": ["sub", "scope"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenError("the token is not signed by this deployment's key") from None
        except jwt.InvalidTokenError as e:
            # PyJWT's messages name claims and formats, never the token itself.
            raise TokenError(f"malformed token: {e}") from None
        scopes, subject = payload["scope"], payload["sub"]
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes) or not isinstance(subject, str):
            raise TokenError("malformed token: sub must be a string and scope a list of strings")
        exp = payload.get("exp")
        return Claims(subject, frozenset(scopes), float(exp) if exp is not None else None)


__all__ = ["ADMIN", "DEFAULT_TENANT", "INGEST", "REDO", "Claims", "ScopeError", "SigningKey", "TokenError",
           "TokenVerifier", "check_scope", "parse_duration", "tenant_scope"]
