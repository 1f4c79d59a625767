"""Resource managers of PostgreSQL 15 and the info codes of their WAL records.

Every WAL record names the resource manager (rmgr) that redoes it and carries
one byte of `xl_info`: the low four bits belong to the WAL machinery
(XLR_INFO_MASK), the high four bits are the rmgr's own record type.

What this module mirrors, all from PostgreSQL 15:

- rmgr ids and names: src/include/access/rmgrlist.h, src/include/access/rmgr.h
  and, for custom rmgrs, src/bin/pg_waldump/rmgrdesc.c;
- the info codes: the headers cited above each group below;
- record type names: the `*_identify` functions of
  src/backend/access/rmgrdesc/*desc.c, with the "UNKNOWN (%x)" fallback of
  XLogDumpDisplayRecord in src/bin/pg_waldump/pg_waldump.c.

No I/O: names and numbers only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, NamedTuple


class InvalidRmgrIdError(ValueError):
    """An rmgr id that is neither built in (0..21) nor custom (128..255)."""


# ---------------------------------------------------------------------------
# Resource manager ids: src/include/access/rmgrlist.h (order = id),
# limits from src/include/access/rmgr.h
# ---------------------------------------------------------------------------


class RmgrId(enum.IntEnum):
    """Built-in resource managers, numbered in rmgrlist.h order."""

    XLOG = 0
    TRANSACTION = 1
    STORAGE = 2
    CLOG = 3
    DATABASE = 4
    TABLESPACE = 5
    MULTIXACT = 6
    RELMAP = 7
    STANDBY = 8
    HEAP2 = 9
    HEAP = 10
    BTREE = 11
    HASH = 12
    GIN = 13
    GIST = 14
    SEQUENCE = 15
    SPGIST = 16
    BRIN = 17
    COMMIT_TS = 18
    REPLORIGIN = 19
    GENERIC = 20
    LOGICALMSG = 21


# The C symbols of rmgrlist.h, for code that mirrors Postgres line by line.
RM_XLOG_ID: Final = RmgrId.XLOG
RM_XACT_ID: Final = RmgrId.TRANSACTION
RM_SMGR_ID: Final = RmgrId.STORAGE
RM_CLOG_ID: Final = RmgrId.CLOG
RM_DBASE_ID: Final = RmgrId.DATABASE
RM_TBLSPC_ID: Final = RmgrId.TABLESPACE
RM_MULTIXACT_ID: Final = RmgrId.MULTIXACT
RM_RELMAP_ID: Final = RmgrId.RELMAP
RM_STANDBY_ID: Final = RmgrId.STANDBY
RM_HEAP2_ID: Final = RmgrId.HEAP2
RM_HEAP_ID: Final = RmgrId.HEAP
RM_BTREE_ID: Final = RmgrId.BTREE
RM_HASH_ID: Final = RmgrId.HASH
RM_GIN_ID: Final = RmgrId.GIN
RM_GIST_ID: Final = RmgrId.GIST
RM_SEQ_ID: Final = RmgrId.SEQUENCE
RM_SPGIST_ID: Final = RmgrId.SPGIST
RM_BRIN_ID: Final = RmgrId.BRIN
RM_COMMIT_TS_ID: Final = RmgrId.COMMIT_TS
RM_REPLORIGIN_ID: Final = RmgrId.REPLORIGIN
RM_GENERIC_ID: Final = RmgrId.GENERIC
RM_LOGICALMSG_ID: Final = RmgrId.LOGICALMSG

RM_MAX_ID: Final = 255
RM_MAX_BUILTIN_ID: Final = 21
RM_MIN_CUSTOM_ID: Final = 128
RM_MAX_CUSTOM_ID: Final = 255
RM_N_IDS: Final = 256
RM_N_BUILTIN_IDS: Final = RM_MAX_BUILTIN_ID + 1
RM_N_CUSTOM_IDS: Final = RM_MAX_CUSTOM_ID - RM_MIN_CUSTOM_ID + 1
# For extensions still in development (rmgr.h).
RM_EXPERIMENTAL_ID: Final = 128

# The second column of rmgrlist.h: what pg_waldump prints as "rmgr:".
_RMGR_NAMES: Final[tuple[str, ...]] = (
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
)


def rmgr_id_is_builtin(rmid: int) -> bool:
    """RmgrIdIsBuiltin (rmgr.h), restricted to the uint8 range."""
    return 0 <= rmid <= RM_MAX_BUILTIN_ID


def rmgr_id_is_custom(rmid: int) -> bool:
    """RmgrIdIsCustom (rmgr.h): ids 128..255, left to extensions."""
    return RM_MIN_CUSTOM_ID <= rmid <= RM_MAX_CUSTOM_ID


def rmgr_id_is_valid(rmid: int) -> bool:
    """RmgrIdIsValid (rmgr.h): what xlogreader accepts in xl_rmid."""
    return rmgr_id_is_builtin(rmid) or rmgr_id_is_custom(rmid)


def _check_rmid(rmid: int) -> None:
    if not rmgr_id_is_valid(rmid):
        raise InvalidRmgrIdError(f"invalid resource manager ID {rmid}")


def rmgr_name(rmid: int) -> str:
    """The rmgr name as pg_waldump prints it in its `rmgr:` column.

    Custom rmgrs get the generated name pg_waldump uses when it cannot load
    the module ("custom%03d", src/bin/pg_waldump/rmgrdesc.c). Ids 22..127 and
    ids outside a uint8 raise InvalidRmgrIdError.
    """
    _check_rmid(rmid)
    if rmgr_id_is_builtin(rmid):
        return _RMGR_NAMES[rmid]
    return f"custom{rmid:03d}"


def rmgr_id_from_name(name: str) -> int:
    """The id for a name given to `pg_waldump --rmgr` (pg_waldump.c main).

    Like pg_waldump: "custom###" names a custom rmgr by number, and built-in
    names compare case-insensitively. Raises InvalidRmgrIdError otherwise.
    """
    if name.startswith("custom") and name[6:].isdigit():
        rmid = int(name[6:])
        if not rmgr_id_is_custom(rmid):
            raise InvalidRmgrIdError(f'custom resource manager "{name}" does not exist')
        return rmid
    folded = name.casefold()
    for rmid, builtin in enumerate(_RMGR_NAMES):
        if builtin.casefold() == folded:
            return rmid
    raise InvalidRmgrIdError(f'resource manager "{name}" does not exist')


# ---------------------------------------------------------------------------
# The xl_info byte: src/include/access/xlogrecord.h
# ---------------------------------------------------------------------------

# Low four bits: for the WAL machinery; high four bits: for the rmgr.
XLR_INFO_MASK: Final = 0x0F
XLR_RMGR_INFO_MASK: Final = 0xF0
# The record changes a relation in a way that is not a block (e.g. truncate).
XLR_SPECIAL_REL_UPDATE: Final = 0x01
# Replay must compare each block with its full-page image (wal_consistency_checking).
XLR_CHECK_CONSISTENCY: Final = 0x02

# ---------------------------------------------------------------------------
# RM_XLOG_ID: src/include/catalog/pg_control.h
# ---------------------------------------------------------------------------

XLOG_CHECKPOINT_SHUTDOWN: Final = 0x00
XLOG_CHECKPOINT_ONLINE: Final = 0x10
XLOG_NOOP: Final = 0x20
XLOG_NEXTOID: Final = 0x30
XLOG_SWITCH: Final = 0x40
XLOG_BACKUP_END: Final = 0x50
XLOG_PARAMETER_CHANGE: Final = 0x60
XLOG_RESTORE_POINT: Final = 0x70
XLOG_FPW_CHANGE: Final = 0x80
XLOG_END_OF_RECOVERY: Final = 0x90
XLOG_FPI_FOR_HINT: Final = 0xA0
XLOG_FPI: Final = 0xB0
# 0xC0 was used by Postgres 9.5-11 (XLOG_FPI_MULTI); free in 15.
XLOG_OVERWRITE_CONTRECORD: Final = 0xD0

# ---------------------------------------------------------------------------
# RM_XACT_ID: src/include/access/xact.h
# ---------------------------------------------------------------------------

XLOG_XACT_COMMIT: Final = 0x00
XLOG_XACT_PREPARE: Final = 0x10
XLOG_XACT_ABORT: Final = 0x20
XLOG_XACT_COMMIT_PREPARED: Final = 0x30
XLOG_XACT_ABORT_PREPARED: Final = 0x40
XLOG_XACT_ASSIGNMENT: Final = 0x50
XLOG_XACT_INVALIDATIONS: Final = 0x60
# 0x70 is a free opcode.
XLOG_XACT_OPMASK: Final = 0x70
# The record carries an xinfo field.
XLOG_XACT_HAS_INFO: Final = 0x80

# ---------------------------------------------------------------------------
# RM_SMGR_ID: src/include/catalog/storage_xlog.h
# ---------------------------------------------------------------------------

XLOG_SMGR_CREATE: Final = 0x10
XLOG_SMGR_TRUNCATE: Final = 0x20

# ---------------------------------------------------------------------------
# RM_CLOG_ID: src/include/access/clog.h
# ---------------------------------------------------------------------------

CLOG_ZEROPAGE: Final = 0x00
CLOG_TRUNCATE: Final = 0x10

# ---------------------------------------------------------------------------
# RM_DBASE_ID: src/include/commands/dbcommands_xlog.h
# ---------------------------------------------------------------------------

XLOG_DBASE_CREATE_FILE_COPY: Final = 0x00
XLOG_DBASE_CREATE_WAL_LOG: Final = 0x10
XLOG_DBASE_DROP: Final = 0x20

# ---------------------------------------------------------------------------
# RM_TBLSPC_ID: src/include/commands/tablespace.h
# ---------------------------------------------------------------------------

XLOG_TBLSPC_CREATE: Final = 0x00
XLOG_TBLSPC_DROP: Final = 0x10

# ---------------------------------------------------------------------------
# RM_MULTIXACT_ID: src/include/access/multixact.h
# ---------------------------------------------------------------------------

XLOG_MULTIXACT_ZERO_OFF_PAGE: Final = 0x00
XLOG_MULTIXACT_ZERO_MEM_PAGE: Final = 0x10
XLOG_MULTIXACT_CREATE_ID: Final = 0x20
XLOG_MULTIXACT_TRUNCATE_ID: Final = 0x30

# ---------------------------------------------------------------------------
# RM_RELMAP_ID: src/include/utils/relmapper.h
# ---------------------------------------------------------------------------

XLOG_RELMAP_UPDATE: Final = 0x00

# ---------------------------------------------------------------------------
# RM_STANDBY_ID: src/include/storage/standbydefs.h
# ---------------------------------------------------------------------------

XLOG_STANDBY_LOCK: Final = 0x00
XLOG_RUNNING_XACTS: Final = 0x10
XLOG_INVALIDATIONS: Final = 0x20

# ---------------------------------------------------------------------------
# RM_HEAP_ID and RM_HEAP2_ID: src/include/access/heapam_xlog.h
# ---------------------------------------------------------------------------

XLOG_HEAP_INSERT: Final = 0x00
XLOG_HEAP_DELETE: Final = 0x10
XLOG_HEAP_UPDATE: Final = 0x20
XLOG_HEAP_TRUNCATE: Final = 0x30
XLOG_HEAP_HOT_UPDATE: Final = 0x40
XLOG_HEAP_CONFIRM: Final = 0x50
XLOG_HEAP_LOCK: Final = 0x60
XLOG_HEAP_INPLACE: Final = 0x70
XLOG_HEAP_OPMASK: Final = 0x70
# First tuple on a fresh page (INSERT, UPDATE, HOT_UPDATE, MULTI_INSERT):
# redo initialises the page instead of reading it.
XLOG_HEAP_INIT_PAGE: Final = 0x80

# Heap2 shares XLOG_HEAP_OPMASK and XLOG_HEAP_INIT_PAGE.
XLOG_HEAP2_REWRITE: Final = 0x00
XLOG_HEAP2_PRUNE: Final = 0x10
XLOG_HEAP2_VACUUM: Final = 0x20
XLOG_HEAP2_FREEZE_PAGE: Final = 0x30
XLOG_HEAP2_VISIBLE: Final = 0x40
XLOG_HEAP2_MULTI_INSERT: Final = 0x50
XLOG_HEAP2_LOCK_UPDATED: Final = 0x60
XLOG_HEAP2_NEW_CID: Final = 0x70

# ---------------------------------------------------------------------------
# RM_BTREE_ID: src/include/access/nbtxlog.h
# ---------------------------------------------------------------------------

XLOG_BTREE_INSERT_LEAF: Final = 0x00
XLOG_BTREE_INSERT_UPPER: Final = 0x10
XLOG_BTREE_INSERT_META: Final = 0x20
XLOG_BTREE_SPLIT_L: Final = 0x30
XLOG_BTREE_SPLIT_R: Final = 0x40
XLOG_BTREE_INSERT_POST: Final = 0x50
XLOG_BTREE_DEDUP: Final = 0x60
XLOG_BTREE_DELETE: Final = 0x70
XLOG_BTREE_UNLINK_PAGE: Final = 0x80
XLOG_BTREE_UNLINK_PAGE_META: Final = 0x90
XLOG_BTREE_NEWROOT: Final = 0xA0
XLOG_BTREE_MARK_PAGE_HALFDEAD: Final = 0xB0
XLOG_BTREE_VACUUM: Final = 0xC0
XLOG_BTREE_REUSE_PAGE: Final = 0xD0
XLOG_BTREE_META_CLEANUP: Final = 0xE0

# ---------------------------------------------------------------------------
# RM_HASH_ID: src/include/access/hash_xlog.h
# ---------------------------------------------------------------------------

XLOG_HASH_INIT_META_PAGE: Final = 0x00
XLOG_HASH_INIT_BITMAP_PAGE: Final = 0x10
XLOG_HASH_INSERT: Final = 0x20
XLOG_HASH_ADD_OVFL_PAGE: Final = 0x30
XLOG_HASH_SPLIT_ALLOCATE_PAGE: Final = 0x40
XLOG_HASH_SPLIT_PAGE: Final = 0x50
XLOG_HASH_SPLIT_COMPLETE: Final = 0x60
XLOG_HASH_MOVE_PAGE_CONTENTS: Final = 0x70
XLOG_HASH_SQUEEZE_PAGE: Final = 0x80
XLOG_HASH_DELETE: Final = 0x90
XLOG_HASH_SPLIT_CLEANUP: Final = 0xA0
XLOG_HASH_UPDATE_META_PAGE: Final = 0xB0
XLOG_HASH_VACUUM_ONE_PAGE: Final = 0xC0

# ---------------------------------------------------------------------------
# RM_GIN_ID: src/include/access/ginxlog.h (0x00 is unused)
# ---------------------------------------------------------------------------

XLOG_GIN_CREATE_PTREE: Final = 0x10
XLOG_GIN_INSERT: Final = 0x20
XLOG_GIN_SPLIT: Final = 0x30
XLOG_GIN_VACUUM_PAGE: Final = 0x40
XLOG_GIN_DELETE_PAGE: Final = 0x50
XLOG_GIN_UPDATE_META_PAGE: Final = 0x60
XLOG_GIN_INSERT_LISTPAGE: Final = 0x70
XLOG_GIN_DELETE_LISTPAGE: Final = 0x80
XLOG_GIN_VACUUM_DATA_LEAF_PAGE: Final = 0x90

# ---------------------------------------------------------------------------
# RM_GIST_ID: src/include/access/gistxlog.h (0x40 and 0x50 are retired)
# ---------------------------------------------------------------------------

XLOG_GIST_PAGE_UPDATE: Final = 0x00
XLOG_GIST_DELETE: Final = 0x10
XLOG_GIST_PAGE_REUSE: Final = 0x20
XLOG_GIST_PAGE_SPLIT: Final = 0x30
XLOG_GIST_PAGE_DELETE: Final = 0x60
XLOG_GIST_ASSIGN_LSN: Final = 0x70

# ---------------------------------------------------------------------------
# RM_SEQ_ID: src/include/commands/sequence.h
# ---------------------------------------------------------------------------

XLOG_SEQ_LOG: Final = 0x00

# ---------------------------------------------------------------------------
# RM_SPGIST_ID: src/include/access/spgxlog.h (0x00 is retired)
# ---------------------------------------------------------------------------

XLOG_SPGIST_ADD_LEAF: Final = 0x10
XLOG_SPGIST_MOVE_LEAFS: Final = 0x20
XLOG_SPGIST_ADD_NODE: Final = 0x30
XLOG_SPGIST_SPLIT_TUPLE: Final = 0x40
XLOG_SPGIST_PICKSPLIT: Final = 0x50
XLOG_SPGIST_VACUUM_LEAF: Final = 0x60
XLOG_SPGIST_VACUUM_ROOT: Final = 0x70
XLOG_SPGIST_VACUUM_REDIRECT: Final = 0x80

# ---------------------------------------------------------------------------
# RM_BRIN_ID: src/include/access/brin_xlog.h
# ---------------------------------------------------------------------------

XLOG_BRIN_CREATE_INDEX: Final = 0x00
XLOG_BRIN_INSERT: Final = 0x10
XLOG_BRIN_UPDATE: Final = 0x20
XLOG_BRIN_SAMEPAGE_UPDATE: Final = 0x30
XLOG_BRIN_REVMAP_EXTEND: Final = 0x40
XLOG_BRIN_DESUMMARIZE: Final = 0x50
XLOG_BRIN_OPMASK: Final = 0x70
# First tuple on a fresh page (INSERT, UPDATE): redo initialises the page.
XLOG_BRIN_INIT_PAGE: Final = 0x80

# ---------------------------------------------------------------------------
# RM_COMMIT_TS_ID: src/include/access/commit_ts.h
# ---------------------------------------------------------------------------

COMMIT_TS_ZEROPAGE: Final = 0x00
COMMIT_TS_TRUNCATE: Final = 0x10

# ---------------------------------------------------------------------------
# RM_REPLORIGIN_ID: src/include/replication/origin.h
# ---------------------------------------------------------------------------

XLOG_REPLORIGIN_SET: Final = 0x00
XLOG_REPLORIGIN_DROP: Final = 0x10

# ---------------------------------------------------------------------------
# RM_GENERIC_ID: src/include/access/generic_xlog.h defines no info codes;
# generic records are written with info 0 (generic_xlog.c GenericXLogFinish).
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# RM_LOGICALMSG_ID: src/include/replication/message.h
# ---------------------------------------------------------------------------

XLOG_LOGICAL_MESSAGE: Final = 0x00


# ---------------------------------------------------------------------------
# Record type names: the rm_identify functions,
# src/backend/access/rmgrdesc/*desc.c
# ---------------------------------------------------------------------------


class _Identify(NamedTuple):
    """One rm_identify: `names[info & mask]`, or NULL when absent."""

    mask: int
    names: Mapping[int, str]


# Most identify functions switch on `info & ~XLR_INFO_MASK`; as a uint8 that
# keeps the high four bits.
_RMGR_BITS: Final = ~XLR_INFO_MASK & 0xFF
# commit_ts_identify and replorigin_identify switch on the raw info byte.
_ALL_BITS: Final = 0xFF

_IDENTIFY: Final[Mapping[int, _Identify]] = {
    # xlogdesc.c xlog_identify
    RmgrId.XLOG: _Identify(
        _RMGR_BITS,
        {
            XLOG_CHECKPOINT_SHUTDOWN: "CHECKPOINT_SHUTDOWN",
            XLOG_CHECKPOINT_ONLINE: "CHECKPOINT_ONLINE",
            XLOG_NOOP: "NOOP",
            XLOG_NEXTOID: "NEXTOID",
            XLOG_SWITCH: "SWITCH",
            XLOG_BACKUP_END: "BACKUP_END",
            XLOG_PARAMETER_CHANGE: "PARAMETER_CHANGE",
            XLOG_RESTORE_POINT: "RESTORE_POINT",
            XLOG_FPW_CHANGE: "FPW_CHANGE",
            XLOG_END_OF_RECOVERY: "END_OF_RECOVERY",
            XLOG_OVERWRITE_CONTRECORD: "OVERWRITE_CONTRECORD",
            XLOG_FPI: "FPI",
            XLOG_FPI_FOR_HINT: "FPI_FOR_HINT",
        },
    ),
    # xactdesc.c xact_identify: masks with XLOG_XACT_OPMASK, so the
    # XLOG_XACT_HAS_INFO bit is ignored. Note "INVALIDATION", singular.
    RmgrId.TRANSACTION: _Identify(
        XLOG_XACT_OPMASK,
        {
            XLOG_XACT_COMMIT: "COMMIT",
            XLOG_XACT_PREPARE: "PREPARE",
            XLOG_XACT_ABORT: "ABORT",
            XLOG_XACT_COMMIT_PREPARED: "COMMIT_PREPARED",
            XLOG_XACT_ABORT_PREPARED: "ABORT_PREPARED",
            XLOG_XACT_ASSIGNMENT: "ASSIGNMENT",
            XLOG_XACT_INVALIDATIONS: "INVALIDATION",
        },
    ),
    # smgrdesc.c smgr_identify
    RmgrId.STORAGE: _Identify(
        _RMGR_BITS,
        {XLOG_SMGR_CREATE: "CREATE", XLOG_SMGR_TRUNCATE: "TRUNCATE"},
    ),
    # clogdesc.c clog_identify
    RmgrId.CLOG: _Identify(
        _RMGR_BITS,
        {CLOG_ZEROPAGE: "ZEROPAGE", CLOG_TRUNCATE: "TRUNCATE"},
    ),
    # dbasedesc.c dbase_identify
    RmgrId.DATABASE: _Identify(
        _RMGR_BITS,
        {
            XLOG_DBASE_CREATE_FILE_COPY: "CREATE_FILE_COPY",
            XLOG_DBASE_CREATE_WAL_LOG: "CREATE_WAL_LOG",
            XLOG_DBASE_DROP: "DROP",
        },
    ),
    # tblspcdesc.c tblspc_identify
    RmgrId.TABLESPACE: _Identify(
        _RMGR_BITS,
        {XLOG_TBLSPC_CREATE: "CREATE", XLOG_TBLSPC_DROP: "DROP"},
    ),
    # mxactdesc.c multixact_identify
    RmgrId.MULTIXACT: _Identify(
        _RMGR_BITS,
        {
            XLOG_MULTIXACT_ZERO_OFF_PAGE: "ZERO_OFF_PAGE",
            XLOG_MULTIXACT_ZERO_MEM_PAGE: "ZERO_MEM_PAGE",
            XLOG_MULTIXACT_CREATE_ID: "CREATE_ID",
            XLOG_MULTIXACT_TRUNCATE_ID: "TRUNCATE_ID",
        },
    ),
    # relmapdesc.c relmap_identify
    RmgrId.RELMAP: _Identify(_RMGR_BITS, {XLOG_RELMAP_UPDATE: "UPDATE"}),
    # standbydesc.c standby_identify
    RmgrId.STANDBY: _Identify(
        _RMGR_BITS,
        {
            XLOG_STANDBY_LOCK: "LOCK",
            XLOG_RUNNING_XACTS: "RUNNING_XACTS",
            XLOG_INVALIDATIONS: "INVALIDATIONS",
        },
    ),
    # heapdesc.c heap2_identify: only MULTI_INSERT has a "+INIT" name.
    RmgrId.HEAP2: _Identify(
        _RMGR_BITS,
        {
            XLOG_HEAP2_PRUNE: "PRUNE",
            XLOG_HEAP2_VACUUM: "VACUUM",
            XLOG_HEAP2_FREEZE_PAGE: "FREEZE_PAGE",
            XLOG_HEAP2_VISIBLE: "VISIBLE",
            XLOG_HEAP2_MULTI_INSERT: "MULTI_INSERT",
            XLOG_HEAP2_MULTI_INSERT | XLOG_HEAP_INIT_PAGE: "MULTI_INSERT+INIT",
            XLOG_HEAP2_LOCK_UPDATED: "LOCK_UPDATED",
            XLOG_HEAP2_NEW_CID: "NEW_CID",
            XLOG_HEAP2_REWRITE: "REWRITE",
        },
    ),
    # heapdesc.c heap_identify: "+INIT" only for INSERT, UPDATE, HOT_UPDATE;
    # CONFIRM is spelled "HEAP_CONFIRM".
    RmgrId.HEAP: _Identify(
        _RMGR_BITS,
        {
            XLOG_HEAP_INSERT: "INSERT",
            XLOG_HEAP_INSERT | XLOG_HEAP_INIT_PAGE: "INSERT+INIT",
            XLOG_HEAP_DELETE: "DELETE",
            XLOG_HEAP_UPDATE: "UPDATE",
            XLOG_HEAP_UPDATE | XLOG_HEAP_INIT_PAGE: "UPDATE+INIT",
            XLOG_HEAP_HOT_UPDATE: "HOT_UPDATE",
            XLOG_HEAP_HOT_UPDATE | XLOG_HEAP_INIT_PAGE: "HOT_UPDATE+INIT",
            XLOG_HEAP_TRUNCATE: "TRUNCATE",
            XLOG_HEAP_CONFIRM: "HEAP_CONFIRM",
            XLOG_HEAP_LOCK: "LOCK",
            XLOG_HEAP_INPLACE: "INPLACE",
        },
    ),
    # nbtdesc.c btree_identify
    RmgrId.BTREE: _Identify(
        _RMGR_BITS,
        {
            XLOG_BTREE_INSERT_LEAF: "INSERT_LEAF",
            XLOG_BTREE_INSERT_UPPER: "INSERT_UPPER",
            XLOG_BTREE_INSERT_META: "INSERT_META",
            XLOG_BTREE_SPLIT_L: "SPLIT_L",
            XLOG_BTREE_SPLIT_R: "SPLIT_R",
            XLOG_BTREE_INSERT_POST: "INSERT_POST",
            XLOG_BTREE_DEDUP: "DEDUP",
            XLOG_BTREE_VACUUM: "VACUUM",
            XLOG_BTREE_DELETE: "DELETE",
            XLOG_BTREE_MARK_PAGE_HALFDEAD: "MARK_PAGE_HALFDEAD",
            XLOG_BTREE_UNLINK_PAGE: "UNLINK_PAGE",
            XLOG_BTREE_UNLINK_PAGE_META: "UNLINK_PAGE_META",
            XLOG_BTREE_NEWROOT: "NEWROOT",
            XLOG_BTREE_REUSE_PAGE: "REUSE_PAGE",
            XLOG_BTREE_META_CLEANUP: "META_CLEANUP",
        },
    ),
    # hashdesc.c hash_identify
    RmgrId.HASH: _Identify(
        _RMGR_BITS,
        {
            XLOG_HASH_INIT_META_PAGE: "INIT_META_PAGE",
            XLOG_HASH_INIT_BITMAP_PAGE: "INIT_BITMAP_PAGE",
            XLOG_HASH_INSERT: "INSERT",
            XLOG_HASH_ADD_OVFL_PAGE: "ADD_OVFL_PAGE",
            XLOG_HASH_SPLIT_ALLOCATE_PAGE: "SPLIT_ALLOCATE_PAGE",
            XLOG_HASH_SPLIT_PAGE: "SPLIT_PAGE",
            XLOG_HASH_SPLIT_COMPLETE: "SPLIT_COMPLETE",
            XLOG_HASH_MOVE_PAGE_CONTENTS: "MOVE_PAGE_CONTENTS",
            XLOG_HASH_SQUEEZE_PAGE: "SQUEEZE_PAGE",
            XLOG_HASH_DELETE: "DELETE",
            XLOG_HASH_SPLIT_CLEANUP: "SPLIT_CLEANUP",
            XLOG_HASH_UPDATE_META_PAGE: "UPDATE_META_PAGE",
            XLOG_HASH_VACUUM_ONE_PAGE: "VACUUM_ONE_PAGE",
        },
    ),
    # gindesc.c gin_identify
    RmgrId.GIN: _Identify(
        _RMGR_BITS,
        {
            XLOG_GIN_CREATE_PTREE: "CREATE_PTREE",
            XLOG_GIN_INSERT: "INSERT",
            XLOG_GIN_SPLIT: "SPLIT",
            XLOG_GIN_VACUUM_PAGE: "VACUUM_PAGE",
            XLOG_GIN_VACUUM_DATA_LEAF_PAGE: "VACUUM_DATA_LEAF_PAGE",
            XLOG_GIN_DELETE_PAGE: "DELETE_PAGE",
            XLOG_GIN_UPDATE_META_PAGE: "UPDATE_META_PAGE",
            XLOG_GIN_INSERT_LISTPAGE: "INSERT_LISTPAGE",
            XLOG_GIN_DELETE_LISTPAGE: "DELETE_LISTPAGE",
        },
    ),
    # gistdesc.c gist_identify
    RmgrId.GIST: _Identify(
        _RMGR_BITS,
        {
            XLOG_GIST_PAGE_UPDATE: "PAGE_UPDATE",
            XLOG_GIST_DELETE: "DELETE",
            XLOG_GIST_PAGE_REUSE: "PAGE_REUSE",
            XLOG_GIST_PAGE_SPLIT: "PAGE_SPLIT",
            XLOG_GIST_PAGE_DELETE: "PAGE_DELETE",
            XLOG_GIST_ASSIGN_LSN: "ASSIGN_LSN",
        },
    ),
    # seqdesc.c seq_identify
    RmgrId.SEQUENCE: _Identify(_RMGR_BITS, {XLOG_SEQ_LOG: "LOG"}),
    # spgdesc.c spg_identify
    RmgrId.SPGIST: _Identify(
        _RMGR_BITS,
        {
            XLOG_SPGIST_ADD_LEAF: "ADD_LEAF",
            XLOG_SPGIST_MOVE_LEAFS: "MOVE_LEAFS",
            XLOG_SPGIST_ADD_NODE: "ADD_NODE",
            XLOG_SPGIST_SPLIT_TUPLE: "SPLIT_TUPLE",
            XLOG_SPGIST_PICKSPLIT: "PICKSPLIT",
            XLOG_SPGIST_VACUUM_LEAF: "VACUUM_LEAF",
            XLOG_SPGIST_VACUUM_ROOT: "VACUUM_ROOT",
            XLOG_SPGIST_VACUUM_REDIRECT: "VACUUM_REDIRECT",
        },
    ),
    # brindesc.c brin_identify: "+INIT" only for INSERT and UPDATE.
    RmgrId.BRIN: _Identify(
        _RMGR_BITS,
        {
            XLOG_BRIN_CREATE_INDEX: "CREATE_INDEX",
            XLOG_BRIN_INSERT: "INSERT",
            XLOG_BRIN_INSERT | XLOG_BRIN_INIT_PAGE: "INSERT+INIT",
            XLOG_BRIN_UPDATE: "UPDATE",
            XLOG_BRIN_UPDATE | XLOG_BRIN_INIT_PAGE: "UPDATE+INIT",
            XLOG_BRIN_SAMEPAGE_UPDATE: "SAMEPAGE_UPDATE",
            XLOG_BRIN_REVMAP_EXTEND: "REVMAP_EXTEND",
            XLOG_BRIN_DESUMMARIZE: "DESUMMARIZE",
        },
    ),
    # committsdesc.c commit_ts_identify: switches on the unmasked info.
    RmgrId.COMMIT_TS: _Identify(
        _ALL_BITS,
        {COMMIT_TS_ZEROPAGE: "ZEROPAGE", COMMIT_TS_TRUNCATE: "TRUNCATE"},
    ),
    # replorigindesc.c replorigin_identify: switches on the unmasked info.
    RmgrId.REPLORIGIN: _Identify(
        _ALL_BITS,
        {XLOG_REPLORIGIN_SET: "SET", XLOG_REPLORIGIN_DROP: "DROP"},
    ),
    # genericdesc.c generic_identify: "Generic" whatever the info (mask 0
    # sends every byte to key 0).
    RmgrId.GENERIC: _Identify(0x00, {0x00: "Generic"}),
    # logicalmsgdesc.c logicalmsg_identify
    RmgrId.LOGICALMSG: _Identify(_RMGR_BITS, {XLOG_LOGICAL_MESSAGE: "MESSAGE"}),
}


def _check_info(info: int) -> None:
    if not 0 <= info <= 0xFF:
        raise ValueError(f"xl_info {info} is not a uint8")


def identify(rmid: int, info: int) -> str | None:
    """What the rmgr's rm_identify returns for `info` (None for C's NULL).

    `info` is the whole xl_info byte; each rmgr masks it as its identify
    function does. Custom rmgrs identify nothing (pg_waldump's
    default_identify).
    """
    _check_rmid(rmid)
    _check_info(info)
    table = _IDENTIFY.get(rmid)
    if table is None:
        return None
    return table.names.get(info & table.mask)


def record_type_name(rmid: int, info: int) -> str:
    """The record type as pg_waldump prints it after `desc:`.

    The rm_identify string, or "UNKNOWN (%x)" of the info without its
    XLR_INFO_MASK bits when identify returns NULL (pg_waldump.c
    XLogDumpDisplayRecord).
    """
    name = identify(rmid, info)
    if name is None:
        return f"UNKNOWN ({info & ~XLR_INFO_MASK & 0xFF:x})"
    return name
