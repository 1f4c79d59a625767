"""A repository's keys, tokens and certificates (`zctl init` makes them; every service start uses them).

Layout under the repository (directory mode 0700, secrets 0600):

    security/signing_key.pem     Ed25519 private key: signs tokens (zctl only)
    security/public_key.pem      its public key: every service checks tokens against it
    security/tokens/admin.jwt    zctl's own token (scope admin)
    security/tokens/ingest.jwt   the walreceiver's, for the page server (scope ingest)
    security/tokens/redo.jwt     the page server's, for the redo pool (scope redo)
    security/tokens/shim.jwt     the libpq shim's, for the page server
    security/shim_users          the libpq shim's password file (SCRAM-SHA-256 secrets; user postgres,
                                 every tenant)
    security/shim_password       user postgres's password for the shim
    security/tls/ca.pem          the deployment's CA certificate: clients trust it
    security/tls/server.pem      the services' certificate (signed by the CA), server.key its key

Service tokens do not expire (they are files only the operator can read; to replace everything,
stop the services, delete the directory and `zctl start` makes new ones); tokens printed by
`zctl token` do, by default.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pgformat.scram import make_verifier
from services.auth import ClientSecurity, format_password_line
from zauth.certs import DEFAULT_HOSTS, make_tls_files
from zauth.tokens import ADMIN, INGEST, REDO, SigningKey

SHIM_USER = "postgres"
SERVICE_TOKENS = {"admin": [ADMIN], "ingest": [INGEST], "redo": [REDO], "shim": [ADMIN]}


class SecurityError(RuntimeError):
    """Keys or tokens missing or unreadable; the message says which file."""


def write_secret(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` with `mode` from the start (never readable by others, even briefly), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SecurityDir:
    """The files of one deployment's security (see the module doc)."""

    root: Path

    @property
    def signing_key(self) -> Path:
        return self.root / "signing_key.pem"

    @property
    def public_key(self) -> Path:
        return self.root / "public_key.pem"

    def token_file(self, name: str) -> Path:
        return self.root / "tokens" / f"{name}.jwt"

    @property
    def shim_users(self) -> Path:
        return self.root / "shim_users"

    @property
    def shim_password(self) -> Path:
        return self.root / "shim_password"

    @property
    def ca(self) -> Path:
        return self.root / "tls" / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "tls" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "tls" / "server.key"

    def exists(self) -> bool:
        return self.signing_key.exists() or self.public_key.exists()

    def ensure(self, hosts: Sequence[str] = DEFAULT_HOSTS) -> bool:
        """Make whatever is missing (keys, service tokens, TLS files); True if anything was made."""
        made = False
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        if not self.signing_key.exists():
            key = SigningKey.generate()
            write_secret(self.signing_key, key.private_pem())
            write_secret(self.public_key, key.public_pem(), 0o644)
            for name in SERVICE_TOKENS:  # tokens of an older key would not verify any more
                self.token_file(name).unlink(missing_ok=True)
            made = True
        key = self.key()
        for name, scopes in SERVICE_TOKENS.items():
            if not self.token_file(name).exists():
                write_secret(self.token_file(name), key.issue(name, scopes).encode())
                made = True
        if not self.shim_users.exists():
            password = secrets.token_urlsafe(18)
            write_secret(self.shim_password, f"{password}\n".encode())
            write_secret(self.shim_users, format_password_line(SHIM_USER, make_verifier(password).text(), None).encode())
            made = True
        if not self.server_cert.exists():
            tls = make_tls_files(list(dict.fromkeys([*DEFAULT_HOSTS, *hosts])))
            write_secret(self.ca, tls.ca_cert, 0o644)
            write_secret(self.server_key, tls.server_key)
            write_secret(self.server_cert, tls.server_cert, 0o644)
            made = True
        return made

    def key(self) -> SigningKey:
        try:
            return SigningKey.from_pem(self.signing_key.read_bytes())
        except OSError as e:
            raise SecurityError(f"cannot read the signing key {self.signing_key}: {e.strerror}") from None

    def token(self, name: str) -> str:
        try:
            return self.token_file(name).read_text().strip()
        except OSError as e:
            raise SecurityError(f"cannot read token {self.token_file(name)}: {e.strerror}") from None

    def client(self, name: str = "admin", tls: bool = True) -> ClientSecurity:
        """What zctl (or a service) presents when calling: its token, and the CA when TLS is on."""
        return ClientSecurity(self.token(name), self.ca.read_bytes() if tls else None)


__all__ = ["SERVICE_TOKENS", "SecurityDir", "SecurityError", "write_secret"]
