"""Versioned values: what one (key, LSN) of a layer holds, and its compact binary encoding.

A value is one of the page server's version kinds (keys.py): a page image, a WAL record
to apply on the version before it (or one that initializes the page, `will_init`), a whole
small file, or a deletion marker. Encoding: one kind byte, then for records the record's
start LSN (8 bytes, big-endian; 0 when unknown) and the raw record bytes, for images and
files the bytes themselves, for a deletion nothing. The LSN of the version (the record's
end LSN) is not part of the value: the layer stores it beside the key.

Neon's counterpart is `Value` / `NeonWalRecord` in pageserver/src/repository.rs.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from ..keys import KIND_DELETED, KIND_FILE, KIND_IMAGE, KIND_RECORD, KIND_RECORD_INIT
from .errors import ValueFormatError

_START_LSN = struct.Struct(">Q")
_KIND_NAMES: Final = {
    KIND_IMAGE: "image",
    KIND_RECORD_INIT: "record(will_init)",
    KIND_RECORD: "record",
    KIND_FILE: "file",
    KIND_DELETED: "deleted",
}
_RECORD_KINDS: Final = frozenset((KIND_RECORD, KIND_RECORD_INIT))
_RECORD_PREFIX: Final = {k: bytes([k]) for k in _RECORD_KINDS}


class Value(NamedTuple):
    """One version of a key. `data` is the page, the raw WAL record or the file; `start_lsn` is
    the record's start LSN (records only, 0 when unknown: it only names the record in errors)."""

    kind: int
    data: bytes = b""
    start_lsn: int = 0

    @classmethod
    def image(cls, page: bytes) -> Value:
        return cls(KIND_IMAGE, bytes(page))

    @classmethod
    def record(cls, raw: bytes, will_init: bool = False, start_lsn: int = 0) -> Value:
        return cls(KIND_RECORD_INIT if will_init else KIND_RECORD, bytes(raw), start_lsn)

    @classmethod
    def file(cls, data: bytes) -> Value:
        return cls(KIND_FILE, bytes(data))

    @classmethod
    def deleted(cls) -> Value:
        return cls(KIND_DELETED)

    @property
    def is_record(self) -> bool:
        return self.kind in _RECORD_KINDS

    @property
    def will_init(self) -> bool:
        """A record that initializes the page: nothing older is needed."""
        return self.kind == KIND_RECORD_INIT

    @property
    def complete(self) -> bool:
        """Whether this version stands alone (everything but a plain record): a read of the key
        needs no older version."""
        return self.kind != KIND_RECORD

    def describe(self) -> str:
        return f"{_KIND_NAMES.get(self.kind, f'kind {self.kind}')} of {len(self.data)} bytes"


def encode_value(value: Value) -> bytes:
    """The bytes of `value` (see the module docstring); raises ValueFormatError on a bad value."""
    kind, data, start_lsn = value
    if kind in _RECORD_KINDS:
        if not 0 <= start_lsn < 1 << 64:
            raise ValueFormatError(f"record start LSN {start_lsn} out of range")
        return _RECORD_PREFIX[kind] + _START_LSN.pack(start_lsn) + data
    if kind == KIND_IMAGE or kind == KIND_FILE:
        return bytes((kind,)) + data
    if kind == KIND_DELETED:
        if data:
            raise ValueFormatError("a deletion marker carries no data")
        return bytes((KIND_DELETED,))
    raise ValueFormatError(f"unknown value kind {kind}")


def decode_value(buf: bytes) -> Value:
    """The value encoded in `buf` (all of it); raises ValueFormatError on anything else."""
    if not buf:
        raise ValueFormatError("empty value")
    kind = buf[0]
    if kind == KIND_IMAGE or kind == KIND_FILE:
        return Value(kind, buf[1:])
    if kind in _RECORD_KINDS:
        if len(buf) < 9:
            raise ValueFormatError(f"record value of {len(buf)} bytes has no start LSN")
        return Value(kind, buf[9:], _START_LSN.unpack_from(buf, 1)[0])
    if kind == KIND_DELETED:
        if len(buf) != 1:
            raise ValueFormatError(f"deletion marker with {len(buf) - 1} bytes of data")
        return Value(KIND_DELETED)
    raise ValueFormatError(f"unknown value kind {kind}")


def value_kind(buf: bytes) -> int:
    """The kind of an encoded value without decoding it (for scans that only filter)."""
    if not buf:
        raise ValueFormatError("empty value")
    return buf[0]
