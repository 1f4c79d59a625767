"""The walreceiver's errors: what a session ends with, and whether retrying can help."""

from __future__ import annotations


class WalReceiverError(Exception):
    """Base of the walreceiver's errors."""


class ReplicationError(WalReceiverError):
    """The primary connection failed or spoke out of protocol; retrying may help."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class PageServerError(WalReceiverError):
    """The page server failed or refused; retrying may help."""


class FatalError(WalReceiverError):
    """An error that retrying cannot fix: the attachment stops in FAILED."""


class Stopped(Exception):
    """Raised inside a session when the receiver is asked to stop."""
