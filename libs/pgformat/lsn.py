"""LSNs are ints inside; text only at the edges (`parse_lsn` / `format_lsn`)."""

from __future__ import annotations


class LsnFormatError(ValueError):
    """Text that is not an LSN of the form X/X."""


def format_lsn(lsn: int) -> str:
    """Format as Postgres does (`%X/%08X`), e.g. 0/016B3748."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:08X}"


def parse_lsn(text: str) -> int:
    """Parse 'X/X' (hex halves) into an int; raise LsnFormatError otherwise."""
    hi, sep, lo = text.strip().partition("/")
    if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
        raise LsnFormatError(f"invalid LSN {text!r}: expected X/X in hex")
    try:
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise LsnFormatError(f"invalid LSN {text!r}: expected X/X in hex") from None
