"""The root of the format library's error hierarchy.

Every parser raises a subclass of `FormatError` for bad input, never a bare
`struct.error`, `IndexError` or `AssertionError`. Errors that concern a place
in the WAL carry its LSN.
"""

from __future__ import annotations

from .lsn import format_lsn


class FormatError(ValueError):
    """Bytes that do not follow a Postgres format."""


class WalError(FormatError):
    """Bad WAL at a known position."""

    def __init__(self, lsn: int, reason: str) -> None:
        self.lsn = lsn
        self.reason = reason
        super().__init__(f"invalid WAL at {format_lsn(lsn)}: {reason}")


class WalPageHeaderError(WalError):
    """A WAL page header that is not what the page's position requires."""


class WalRecordError(WalError):
    """A record whose header or contents are inconsistent."""


class WalCrcError(WalRecordError):
    """A record whose CRC-32C does not match its contents."""


class WalEndOfData(WalRecordError):
    """Zeroes where a record should start: the end of written WAL in a file."""


class TarFormatError(FormatError):
    """A tar stream that is not a well-formed archive, or a member a tar header cannot hold.

    `offset` is the position in the stream (bytes fed so far) where the
    problem was found; None for errors of the writer side.
    """

    def __init__(self, reason: str, offset: int | None = None) -> None:
        self.reason = reason
        self.offset = offset
        where = "" if offset is None else f" at offset {offset}"
        super().__init__(f"invalid tar archive{where}: {reason}")


class ManifestError(FormatError):
    """Input a backup manifest cannot hold, or the builder's calls out of order."""
