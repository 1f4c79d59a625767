"""SCRAM-SHA-256 as Postgres speaks it (RFC 5802 / RFC 7677), without I/O.

- `make_verifier`: the secret a server keeps, in pg_authid's text form
  `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (src/common/scram-common.c,
  scram_build_secret; src/backend/libpq/auth-scram.c, parse_scram_secret). Postgres accepts it
  as an already-hashed password in `ALTER ROLE ... PASSWORD '<verifier>'`.
- `ScramServer`: the server side of one exchange (auth-scram.c): client-first -> server-first,
  client-final -> server-final, or ScramError when the proof does not match. Channel binding
  (SCRAM-SHA-256-PLUS) is not offered: a client that has TLS says so with the `y` flag, one that
  asks for binding (`p=`) is refused.

Passwords are used as UTF-8 bytes; SASLprep normalization (src/common/saslprep.c) is not applied,
which differs from Postgres only for passwords with non-ASCII characters it would normalize.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .errors import FormatError

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # scram-common.h SCRAM_DEFAULT_ITERATIONS
SALT_LEN = 16  # SCRAM_DEFAULT_SALT_LEN
RAW_NONCE_LEN = 18  # SCRAM_RAW_NONCE_LEN


class ScramError(FormatError):
    """A malformed SCRAM message or secret, or a proof that does not match."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ScramError(f"invalid base64 in {what}") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def text(self) -> str:
        return (f"{MECHANISM}${self.iterations}:{_b64(self.salt)}$"
                f"{_b64(self.stored_key)}:{_b64(self.server_key)}")

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        try:
            mech, params, keys = text.strip().split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            if mech != MECHANISM or int(iterations) <= 0:
                raise ValueError
        except ValueError:
            raise ScramError("not a SCRAM-SHA-256 secret (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)") \
                from None
        v = cls(int(iterations), _unb64(salt, "salt"), _unb64(stored, "StoredKey"), _unb64(server, "ServerKey"))
        if len(v.stored_key) != 32 or len(v.server_key) != 32:
            raise ScramError("a SCRAM-SHA-256 key is 32 bytes")
        return v


def make_verifier(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> ScramVerifier:
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return ScramVerifier(iterations, salt, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed attribute {part[:20]!r} in {what}")
        out.append((part[0], part[2:]))
    return out


class ScramServer:
    """One authentication exchange against `verifier` (messages as bytes, as SASL carries them)."""

    def __init__(self, verifier: ScramVerifier, nonce: bytes | None = None) -> None:
        self.verifier = verifier
        self._server_nonce = _b64(secrets.token_bytes(RAW_NONCE_LEN) if nonce is None else nonce)
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""
        self._nonce = ""

    def first(self, client_first: bytes) -> bytes:
        """client-first-message -> server-first-message."""
        try:
            text = client_first.decode()
        except UnicodeDecodeError:
            raise ScramError("client-first-message is not UTF-8") from None
        flag, _, rest = text.partition(",")
        authzid, _, bare = rest.partition(",")
        if flag.startswith("p="):
            raise ScramError("channel binding was requested, but the server does not offer SCRAM-SHA-256-PLUS")
        if flag not in ("n", "y") or (authzid and not authzid.startswith("a=")) or not bare:
            raise ScramError("malformed client-first-message")
        attrs = _attributes(bare, "client-first-message")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            raise ScramError("client-first-message lacks n= and r=")
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = attrs[1][1] + self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64(self.verifier.salt)},i={self.verifier.iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        """client-final-message -> server-final-message; ScramError if the proof is wrong."""
        if not self._server_first:
            raise ScramError("client-final-message before client-first-message")
        try:
            text = client_final.decode()
        except UnicodeDecodeError:
            raise ScramError("client-final-message is not UTF-8") from None
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise ScramError("client-final-message has no proof")
        attrs = dict(_attributes(without_proof, "client-final-message"))
        if _unb64(attrs.get("c", ""), "channel binding") != self._gs2_header.encode():
            raise ScramError("channel binding data does not match the client-first-message")
        if attrs.get("r") != self._nonce:
            raise ScramError("nonce mismatch")
        proof = _unb64(proof_text, "proof")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self.verifier.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.verifier.stored_key):
            raise ScramError("password does not match")
        return f"v={_b64(_hmac(self.verifier.server_key, auth_message))}".encode()


__all__ = ["DEFAULT_ITERATIONS", "MECHANISM", "ScramError", "ScramServer", "ScramVerifier", "make_verifier"]
