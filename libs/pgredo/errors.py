"""Redo errors. Each names the record (LSN, rmgr, info) so an operator can find it."""

from __future__ import annotations

from pgformat.lsn import format_lsn
from pgformat.rmgr import record_type_name, rmgr_name


def describe_record(rmid: int, info: int) -> str:
    try:
        return f"{rmgr_name(rmid)}/{record_type_name(rmid, info)} (rmgr {rmid}, info 0x{info:02X})"
    except ValueError:
        return f"rmgr {rmid}, info 0x{info:02X}"


class RedoError(Exception):
    """Redo could not produce a page."""


class BadRecordError(RedoError):
    """Record contents an rmgr cannot apply to the page it was given.

    Raised by rmgr code, which does not know the record's position; the
    engine turns it into a RedoFailedError naming LSN, rmgr and block.
    """


class UnsupportedRecordError(RedoError):
    """A record type we have no redo for: never guess a page."""

    def __init__(self, lsn: int, rmid: int, info: int, detail: str = "") -> None:
        self.lsn, self.rmid, self.info = lsn, rmid, info
        msg = f"no redo for {describe_record(rmid, info)} at {format_lsn(lsn)}"
        super().__init__(msg + (f": {detail}" if detail else ""))


class RedoFailedError(RedoError):
    """A supported record that cannot be applied to the page it was given."""

    def __init__(self, lsn: int, rmid: int, info: int, reason: str) -> None:
        self.lsn, self.rmid, self.info = lsn, rmid, info
        super().__init__(f"redo of {describe_record(rmid, info)} at {format_lsn(lsn)} failed: {reason}")
