"""Storage keys of the page server.

A key names one versioned value of a timeline: a relation page, an SLRU page,
a relmapper file, a two-phase state file, or a piece of cluster metadata.
Keys are fixed-width big-endian bytes, so byte order = (kind, spc, db, rel,
fork, block) order and all pages of a relation or a database form one
contiguous key range (Neon's Key in pageserver/src/key.rs has the same idea).
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple


class KeyKind(enum.IntEnum):
    REL_PAGE = 0x00
    SLRU_PAGE = 0x01
    RELMAP_FILE = 0x02
    TWOPHASE_FILE = 0x03
    CHECKPOINT = 0x04
    CONTROL_FILE = 0x05
    # Timeline metadata kept as versioned keys beside the pages, so layers hold all of a timeline:
    REL_SIZE = 0x06  # a relation fork's size in blocks (a file value), deleted when dropped
    COMMIT_TIME = 0x07  # one key: a version per commit record, the commit timestamp (find-LSN-by-time)
    WAL_RECORD = 0x08  # one key: a version per WAL record, the raw record (record boundaries, base backups)


_KEY = struct.Struct(">BIIIBI")  # kind, spc/slru kind, db/segno, rel, fork, block/page
KEY_SIZE: Final = _KEY.size
_REL = struct.Struct(">IIIB")
_REL_PAGE: Final = int(KeyKind.REL_PAGE)  # a plain int packs faster than the enum member


class RelTag(NamedTuple):
    """A relation fork: (tablespace, database, relfilenode, fork). A tuple: ingest hashes one
    for nearly every record, and a tuple's hash and equality are the interpreter's own."""

    spc: int
    db: int
    rel: int
    fork: int

    def encode(self) -> bytes:
        return _REL.pack(self.spc, self.db, self.rel, self.fork)

    @classmethod
    def decode(cls, b: bytes) -> RelTag:
        return cls(*_REL.unpack(b))

    def page_key(self, blkno: int) -> bytes:
        return _KEY.pack(_REL_PAGE, self.spc, self.db, self.rel, self.fork, blkno)

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.rel} fork {self.fork}"


def rel_page_key(spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
    return _KEY.pack(_REL_PAGE, spc, db, rel, fork, blkno)


def slru_page_key(kind: int, segno: int, pageno: int) -> bytes:
    return _KEY.pack(KeyKind.SLRU_PAGE, kind, segno, 0, 0, pageno)


def relmap_key(spc: int, db: int) -> bytes:
    return _KEY.pack(KeyKind.RELMAP_FILE, spc, db, 0, 0, 0)


def twophase_key(xid: int) -> bytes:
    return _KEY.pack(KeyKind.TWOPHASE_FILE, 0, 0, 0, 0, xid)


def rel_size_key(rel: RelTag) -> bytes:
    return _KEY.pack(KeyKind.REL_SIZE, rel.spc, rel.db, rel.rel, rel.fork, 0)


def rel_of_size_key(key: bytes) -> RelTag:
    _, spc, db, rel, fork, _ = _KEY.unpack(key)
    return RelTag(spc, db, rel, fork)


def kind_range(kind: KeyKind) -> tuple[bytes, bytes]:
    """[start, end) of every key of one kind."""
    return bytes([kind]) + bytes(KEY_SIZE - 1), bytes([kind + 1]) + bytes(KEY_SIZE - 1)


# What a version of a key holds (storage/values.py encodes it). A key has at most one version per LSN.
KIND_IMAGE: Final = 0  # a full 8192-byte page
KIND_RECORD_INIT: Final = 1  # a WAL record that initializes the page (will_init): a chain ends here
KIND_RECORD: Final = 2  # a WAL record to apply on the version before it
KIND_FILE: Final = 3  # whole-file value (relmapper, two-phase state, checkpoint)
KIND_DELETED: Final = 4  # the file is gone from this LSN on

CHECKPOINT_KEY: Final = _KEY.pack(KeyKind.CHECKPOINT, 0, 0, 0, 0, 0)
CONTROL_FILE_KEY: Final = _KEY.pack(KeyKind.CONTROL_FILE, 0, 0, 0, 0, 0)
COMMIT_TIME_KEY: Final = _KEY.pack(KeyKind.COMMIT_TIME, 0, 0, 0, 0, 0)
WAL_RECORD_KEY: Final = _KEY.pack(KeyKind.WAL_RECORD, 0, 0, 0, 0, 0)


def decode_key(key: bytes) -> tuple[int, int, int, int, int, int]:
    return _KEY.unpack(key)


def rel_range(rel: RelTag) -> tuple[bytes, bytes]:
    """[start, end) of the page keys of one relation fork."""
    return rel.page_key(0), rel.page_key(0xFFFFFFFF) + b"\xff"
