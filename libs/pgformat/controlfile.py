"""pg_control (ControlFileData) and the CheckPoint struct of PostgreSQL 15.

Layouts from src/include/catalog/pg_control.h as a C compiler lays them out
on x86-64 (little-endian, 8-byte alignment for 64-bit fields and double);
the file handling follows WriteControlFile / ReadControlFile in
src/backend/access/transam/xlog.c: the struct is followed by zeroes up to
PG_CONTROL_FILE_SIZE, and `crc` is the CRC-32C of every byte before it.

Field names are the C names in snake_case (`checkPointCopy` ->
`checkpoint_copy`, `ThisTimeLineID` -> `this_timeline_id`). Padding bytes
are written as zeroes, as Postgres's own zero-initialized structs have them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Final

import google_crc32c

from .errors import FormatError

PG_CONTROL_VERSION: Final = 1300
PG_CONTROL_FILE_SIZE: Final = 8192
MOCK_AUTH_NONCE_LEN: Final = 32
FLOATFORMAT_VALUE: Final = 1234567.0

# DBState
DB_STARTUP: Final = 0
DB_SHUTDOWNED: Final = 1
DB_SHUTDOWNED_IN_RECOVERY: Final = 2
DB_SHUTDOWNING: Final = 3
DB_IN_CRASH_RECOVERY: Final = 4
DB_IN_ARCHIVE_RECOVERY: Final = 5
DB_IN_PRODUCTION: Final = 6

# WalLevel (xlog.h)
WAL_LEVEL_MINIMAL: Final = 0
WAL_LEVEL_REPLICA: Final = 1
WAL_LEVEL_LOGICAL: Final = 2

# CheckPoint: redo @0, ThisTimeLineID @8, PrevTimeLineID @12, fullPageWrites @16,
# nextXid (FullTransactionId, 8-aligned) @24, nextOid @32, nextMulti @36,
# nextMultiOffset @40, oldestXid @44, oldestXidDB @48, oldestMulti @52,
# oldestMultiDB @56, time (pg_time_t, 8-aligned) @64, oldestCommitTsXid @72,
# newestCommitTsXid @76, oldestActiveXid @80; sizeof 88.
_CHECKPOINT = struct.Struct("<QII?7xQIIIIIII4xqIII4x")
SIZEOF_CHECKPOINT: Final = _CHECKPOINT.size

# ControlFileData up to checkPointCopy: system_identifier @0, pg_control_version @8,
# catalog_version_no @12, state @16, time @24, checkPoint @32; checkPointCopy @40.
_CONTROL_HEAD = struct.Struct("<QIIi4xqQ")
# After checkPointCopy (@128): unloggedLSN, minRecoveryPoint, minRecoveryPointTLI @144,
# backupStartPoint @152, backupEndPoint @160, backupEndRequired @168, wal_level @172,
# wal_log_hints @176, MaxConnections @180, max_worker_processes, max_wal_senders,
# max_prepared_xacts, max_locks_per_xact @196, track_commit_timestamp @200,
# maxAlign @204, floatFormat @208, blcksz @216, relseg_size, xlog_blcksz, xlog_seg_size,
# nameDataLen, indexMaxKeys, toast_max_chunk_size, loblksize @244, float8ByVal @248,
# data_checksum_version @252, mock_authentication_nonce @256, crc @288; sizeof 296.
_CONTROL_TAIL = struct.Struct("<QQI4xQQ?3xi?3xiiiii?3xIdIIIIIIII?3xI32s")
_CHECKPOINT_OFFSET: Final = _CONTROL_HEAD.size
_TAIL_OFFSET: Final = _CHECKPOINT_OFFSET + SIZEOF_CHECKPOINT
CRC_OFFSET: Final = _TAIL_OFFSET + _CONTROL_TAIL.size  # offsetof(ControlFileData, crc)
SIZEOF_CONTROL_FILE_DATA: Final = (CRC_OFFSET + 4 + 7) & ~7
_U32 = struct.Struct("<I")


class ControlFileError(FormatError):
    """A pg_control or CheckPoint image that is not what PostgreSQL 15 writes."""


@dataclass(frozen=True, slots=True)
class CheckPoint:
    """struct CheckPoint: the main data of a checkpoint record and pg_control's checkPointCopy."""

    redo: int
    this_timeline_id: int
    prev_timeline_id: int
    full_page_writes: bool
    next_xid: int  # FullTransactionId: epoch << 32 | xid
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    time: int
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    oldest_active_xid: int

    @property
    def next_xid_epoch(self) -> int:
        return self.next_xid >> 32

    @property
    def next_xid32(self) -> int:
        """XidFromFullTransactionId(nextXid)."""
        return self.next_xid & 0xFFFFFFFF


def parse_checkpoint(buf: bytes | memoryview, offset: int = 0) -> CheckPoint:
    """Read a CheckPoint (88 bytes) at `offset`."""
    if len(buf) - offset < SIZEOF_CHECKPOINT:
        raise ControlFileError(f"CheckPoint needs {SIZEOF_CHECKPOINT} bytes, got {len(buf) - offset}")
    return CheckPoint(*_CHECKPOINT.unpack_from(buf, offset))


def write_checkpoint(ckpt: CheckPoint) -> bytes:
    """The 88-byte image of a CheckPoint, padding zeroed."""
    try:
        return _CHECKPOINT.pack(*(getattr(ckpt, f.name) for f in fields(ckpt)))
    except struct.error as e:
        raise ControlFileError(f"CheckPoint field out of range: {e}") from None


@dataclass(frozen=True, slots=True)
class ControlFileData:
    """struct ControlFileData (pg_control_version 1300)."""

    system_identifier: int
    pg_control_version: int
    catalog_version_no: int
    state: int
    time: int
    checkpoint: int  # checkPoint: LSN of the last checkpoint record
    checkpoint_copy: CheckPoint
    unlogged_lsn: int
    min_recovery_point: int
    min_recovery_point_tli: int
    backup_start_point: int
    backup_end_point: int
    backup_end_required: bool
    wal_level: int
    wal_log_hints: bool
    max_connections: int
    max_worker_processes: int
    max_wal_senders: int
    max_prepared_xacts: int
    max_locks_per_xact: int
    track_commit_timestamp: bool
    max_align: int
    float_format: float
    blcksz: int
    relseg_size: int
    xlog_blcksz: int
    xlog_seg_size: int
    name_data_len: int
    index_max_keys: int
    toast_max_chunk_size: int
    loblksize: int
    float8_by_val: bool
    data_checksum_version: int
    mock_authentication_nonce: bytes
    crc: int = 0


_HEAD_FIELDS: Final = 6  # fields of _CONTROL_HEAD


def control_file_crc(image: bytes | memoryview) -> int:
    """CRC-32C of the bytes before `crc`, as WriteControlFile computes it."""
    return int(google_crc32c.value(bytes(image[:CRC_OFFSET])))


def parse_control_file(image: bytes | memoryview, verify_crc: bool = True) -> ControlFileData:
    """Read global/pg_control; checks the size, the version and (unless told not to) the CRC."""
    if len(image) < SIZEOF_CONTROL_FILE_DATA:
        raise ControlFileError(f"pg_control is {len(image)} bytes, expected at least {SIZEOF_CONTROL_FILE_DATA}")
    head = _CONTROL_HEAD.unpack_from(image, 0)
    version = head[1]
    if version != PG_CONTROL_VERSION:
        hint = " (wrong byte order?)" if version % 65536 == 0 and version // 65536 != 0 else ""
        raise ControlFileError(f"pg_control version {version}, expected {PG_CONTROL_VERSION}{hint}")
    crc = _U32.unpack_from(image, CRC_OFFSET)[0]
    if verify_crc and control_file_crc(image) != crc:
        raise ControlFileError(f"incorrect checksum in pg_control: {control_file_crc(image):08X}, stored {crc:08X}")
    ckpt = parse_checkpoint(image, _CHECKPOINT_OFFSET)
    tail = _CONTROL_TAIL.unpack_from(image, _TAIL_OFFSET)
    return ControlFileData(*head, ckpt, *tail, crc)  # type: ignore[arg-type]


def write_control_file(cf: ControlFileData) -> bytes:
    """PG_CONTROL_FILE_SIZE bytes: the struct with a freshly computed CRC, then zeroes.

    The `crc` field of `cf` is ignored.
    """
    values = [getattr(cf, f.name) for f in fields(cf)]
    if len(cf.mock_authentication_nonce) != MOCK_AUTH_NONCE_LEN:
        raise ControlFileError(f"mock_authentication_nonce must be {MOCK_AUTH_NONCE_LEN} bytes")
    try:
        body = b"".join((
            _CONTROL_HEAD.pack(*values[:_HEAD_FIELDS]),
            write_checkpoint(cf.checkpoint_copy),
            _CONTROL_TAIL.pack(*values[_HEAD_FIELDS + 1 : -1]),
        ))
    except struct.error as e:
        raise ControlFileError(f"pg_control field out of range: {e}") from None
    image = bytearray(PG_CONTROL_FILE_SIZE)
    image[: len(body)] = body
    _U32.pack_into(image, CRC_OFFSET, control_file_crc(image))
    return bytes(image)
