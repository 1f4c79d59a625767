"""pgformat.rmgr: rmgr ids and names, info codes, rm_identify names.

The expected values are read off PostgreSQL 15's rmgrlist.h, the *_xlog.h
headers and src/backend/access/rmgrdesc/*desc.c; the compat test asks the
real pg_waldump for its rmgr list.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pgformat import rmgr
from pgformat.rmgr import (
    InvalidRmgrIdError,
    RmgrId,
    identify,
    record_type_name,
    rmgr_id_from_name,
    rmgr_name,
)

PG_WALDUMP = Path("/usr/lib/postgresql/15/bin/pg_waldump")

# rmgrlist.h, in order.
EXPECTED_NAMES: list[tuple[RmgrId, str]] = [
    (RmgrId.XLOG, "XLOG"),
    (RmgrId.TRANSACTION, "Transaction"),
    (RmgrId.STORAGE, "Storage"),
    (RmgrId.CLOG, "CLOG"),
    (RmgrId.DATABASE, "Database"),
    (RmgrId.TABLESPACE, "Tablespace"),
    (RmgrId.MULTIXACT, "MultiXact"),
    (RmgrId.RELMAP, "RelMap"),
    (RmgrId.STANDBY, "Standby"),
    (RmgrId.HEAP2, "Heap2"),
    (RmgrId.HEAP, "Heap"),
    (RmgrId.BTREE, "Btree"),
    (RmgrId.HASH, "Hash"),
    (RmgrId.GIN, "Gin"),
    (RmgrId.GIST, "Gist"),
    (RmgrId.SEQUENCE, "Sequence"),
    (RmgrId.SPGIST, "SPGist"),
    (RmgrId.BRIN, "BRIN"),
    (RmgrId.COMMIT_TS, "CommitTs"),
    (RmgrId.REPLORIGIN, "ReplicationOrigin"),
    (RmgrId.GENERIC, "Generic"),
    (RmgrId.LOGICALMSG, "LogicalMessage"),
]


# --- rmgr ids and names ------------------------------------------------------


def test_ids_are_dense_and_in_rmgrlist_order() -> None:
    assert [int(m) for m in RmgrId] == list(range(22))
    assert rmgr.RM_MAX_BUILTIN_ID == 21 == max(RmgrId)
    assert rmgr.RM_N_BUILTIN_IDS == 22
    assert (rmgr.RM_MIN_CUSTOM_ID, rmgr.RM_MAX_CUSTOM_ID, rmgr.RM_N_CUSTOM_IDS) == (128, 255, 128)
    assert rmgr.RM_EXPERIMENTAL_ID == 128


@pytest.mark.parametrize(("rmid", "name"), EXPECTED_NAMES)
def test_every_builtin_rmgr_has_its_waldump_name(rmid: RmgrId, name: str) -> None:
    assert rmgr_name(rmid) == name
    assert rmgr_name(int(rmid)) == name
    assert rmgr_id_from_name(name) == rmid
    assert rmgr_id_from_name(name.upper()) == rmid


def test_c_symbol_aliases() -> None:
    assert rmgr.RM_XLOG_ID == RmgrId.XLOG
    assert rmgr.RM_XACT_ID == RmgrId.TRANSACTION == 1
    assert rmgr.RM_SMGR_ID == 2
    assert rmgr.RM_DBASE_ID == 4
    assert rmgr.RM_TBLSPC_ID == 5
    assert rmgr.RM_HEAP2_ID == 9
    assert rmgr.RM_HEAP_ID == 10
    assert rmgr.RM_SEQ_ID == 15
    assert rmgr.RM_LOGICALMSG_ID == 21


@pytest.mark.parametrize(("rmid", "name"), [(128, "custom128"), (200, "custom200"), (255, "custom255")])
def test_custom_rmgrs_get_pg_waldump_generated_names(rmid: int, name: str) -> None:
    assert rmgr_name(rmid) == name
    assert rmgr_id_from_name(name) == rmid


def test_every_valid_id_has_a_name() -> None:
    for rmid in range(256):
        assert rmgr.rmgr_id_is_valid(rmid) == (rmid <= 21 or rmid >= 128)
        if rmgr.rmgr_id_is_valid(rmid):
            assert rmgr_name(rmid)


@pytest.mark.parametrize("rmid", [-1, 22, 100, 127, 256, 1000])
def test_invalid_ids_raise_domain_error(rmid: int) -> None:
    with pytest.raises(InvalidRmgrIdError):
        rmgr_name(rmid)
    with pytest.raises(InvalidRmgrIdError):
        record_type_name(rmid, 0)
    assert issubclass(InvalidRmgrIdError, ValueError)


@pytest.mark.parametrize("name", ["nosuch", "custom127", "custom256", "custom", ""])
def test_unknown_names_raise_domain_error(name: str) -> None:
    with pytest.raises(InvalidRmgrIdError):
        rmgr_id_from_name(name)


# --- info-code constants --------------------------------------------------------

# A sample of (name, value) as the PG15 headers define them.
HEADER_VALUES: list[tuple[str, int]] = [
    # access/xlogrecord.h
    ("XLR_INFO_MASK", 0x0F),
    ("XLR_RMGR_INFO_MASK", 0xF0),
    ("XLR_SPECIAL_REL_UPDATE", 0x01),
    ("XLR_CHECK_CONSISTENCY", 0x02),
    # catalog/pg_control.h
    ("XLOG_CHECKPOINT_SHUTDOWN", 0x00),
    ("XLOG_CHECKPOINT_ONLINE", 0x10),
    ("XLOG_SWITCH", 0x40),
    ("XLOG_FPI_FOR_HINT", 0xA0),
    ("XLOG_FPI", 0xB0),
    ("XLOG_OVERWRITE_CONTRECORD", 0xD0),
    # access/xact.h
    ("XLOG_XACT_COMMIT", 0x00),
    ("XLOG_XACT_ASSIGNMENT", 0x50),
    ("XLOG_XACT_INVALIDATIONS", 0x60),
    ("XLOG_XACT_OPMASK", 0x70),
    ("XLOG_XACT_HAS_INFO", 0x80),
    # catalog/storage_xlog.h
    ("XLOG_SMGR_CREATE", 0x10),
    ("XLOG_SMGR_TRUNCATE", 0x20),
    # access/clog.h, access/commit_ts.h
    ("CLOG_ZEROPAGE", 0x00),
    ("CLOG_TRUNCATE", 0x10),
    ("COMMIT_TS_TRUNCATE", 0x10),
    # commands/dbcommands_xlog.h, commands/tablespace.h, commands/sequence.h
    ("XLOG_DBASE_CREATE_FILE_COPY", 0x00),
    ("XLOG_DBASE_CREATE_WAL_LOG", 0x10),
    ("XLOG_DBASE_DROP", 0x20),
    ("XLOG_TBLSPC_DROP", 0x10),
    ("XLOG_SEQ_LOG", 0x00),
    # access/multixact.h, utils/relmapper.h, storage/standbydefs.h
    ("XLOG_MULTIXACT_TRUNCATE_ID", 0x30),
    ("XLOG_RELMAP_UPDATE", 0x00),
    ("XLOG_STANDBY_LOCK", 0x00),
    ("XLOG_RUNNING_XACTS", 0x10),
    ("XLOG_INVALIDATIONS", 0x20),
    # access/heapam_xlog.h
    ("XLOG_HEAP_INSERT", 0x00),
    ("XLOG_HEAP_HOT_UPDATE", 0x40),
    ("XLOG_HEAP_INPLACE", 0x70),
    ("XLOG_HEAP_OPMASK", 0x70),
    ("XLOG_HEAP_INIT_PAGE", 0x80),
    ("XLOG_HEAP2_REWRITE", 0x00),
    ("XLOG_HEAP2_PRUNE", 0x10),
    ("XLOG_HEAP2_MULTI_INSERT", 0x50),
    ("XLOG_HEAP2_NEW_CID", 0x70),
    # access/nbtxlog.h
    ("XLOG_BTREE_INSERT_LEAF", 0x00),
    ("XLOG_BTREE_INSERT_POST", 0x50),
    ("XLOG_BTREE_MARK_PAGE_HALFDEAD", 0xB0),
    ("XLOG_BTREE_META_CLEANUP", 0xE0),
    # access/hash_xlog.h
    ("XLOG_HASH_INIT_META_PAGE", 0x00),
    ("XLOG_HASH_VACUUM_ONE_PAGE", 0xC0),
    # access/ginxlog.h
    ("XLOG_GIN_CREATE_PTREE", 0x10),
    ("XLOG_GIN_DELETE_LISTPAGE", 0x80),
    ("XLOG_GIN_VACUUM_DATA_LEAF_PAGE", 0x90),
    # access/gistxlog.h
    ("XLOG_GIST_PAGE_SPLIT", 0x30),
    ("XLOG_GIST_PAGE_DELETE", 0x60),
    ("XLOG_GIST_ASSIGN_LSN", 0x70),
    # access/spgxlog.h
    ("XLOG_SPGIST_ADD_LEAF", 0x10),
    ("XLOG_SPGIST_VACUUM_REDIRECT", 0x80),
    # access/brin_xlog.h
    ("XLOG_BRIN_CREATE_INDEX", 0x00),
    ("XLOG_BRIN_DESUMMARIZE", 0x50),
    ("XLOG_BRIN_OPMASK", 0x70),
    ("XLOG_BRIN_INIT_PAGE", 0x80),
    # replication/origin.h, replication/message.h
    ("XLOG_REPLORIGIN_SET", 0x00),
    ("XLOG_REPLORIGIN_DROP", 0x10),
    ("XLOG_LOGICAL_MESSAGE", 0x00),
]


@pytest.mark.parametrize(("name", "value"), HEADER_VALUES)
def test_constant_matches_header(name: str, value: int) -> None:
    assert getattr(rmgr, name) == value


def test_info_codes_fit_the_rmgr_bits() -> None:
    prefixes = ("XLOG_", "CLOG_", "COMMIT_TS_")
    for name in dir(rmgr):
        if name.startswith(prefixes):
            value = getattr(rmgr, name)
            assert isinstance(value, int)
            assert value & rmgr.XLR_INFO_MASK == 0, name
            assert 0 <= value <= 0xF0, name


# --- record type names (rm_identify) ----------------------------------------

X, T, S, C = RmgrId.XLOG, RmgrId.TRANSACTION, RmgrId.STORAGE, RmgrId.CLOG
D, TS, MX, RM = RmgrId.DATABASE, RmgrId.TABLESPACE, RmgrId.MULTIXACT, RmgrId.RELMAP
SB, H2, H, BT = RmgrId.STANDBY, RmgrId.HEAP2, RmgrId.HEAP, RmgrId.BTREE
HA, GI, GS, SQ = RmgrId.HASH, RmgrId.GIN, RmgrId.GIST, RmgrId.SEQUENCE
SP, BR, CT, RO = RmgrId.SPGIST, RmgrId.BRIN, RmgrId.COMMIT_TS, RmgrId.REPLORIGIN
GE, LM = RmgrId.GENERIC, RmgrId.LOGICALMSG

# Every case of every identify function, then what falls through to NULL.
IDENTIFY_TABLE: list[tuple[int, int, str]] = [
    # xlogdesc.c
    (X, 0x00, "CHECKPOINT_SHUTDOWN"),
    (X, 0x10, "CHECKPOINT_ONLINE"),
    (X, 0x20, "NOOP"),
    (X, 0x30, "NEXTOID"),
    (X, 0x40, "SWITCH"),
    (X, 0x50, "BACKUP_END"),
    (X, 0x60, "PARAMETER_CHANGE"),
    (X, 0x70, "RESTORE_POINT"),
    (X, 0x80, "FPW_CHANGE"),
    (X, 0x90, "END_OF_RECOVERY"),
    (X, 0xA0, "FPI_FOR_HINT"),
    (X, 0xB0, "FPI"),
    (X, 0xC0, "UNKNOWN (c0)"),
    (X, 0xD0, "OVERWRITE_CONTRECORD"),
    (X, 0xE0, "UNKNOWN (e0)"),
    (X, 0xF0, "UNKNOWN (f0)"),
    (X, 0xB2, "FPI"),  # XLR_CHECK_CONSISTENCY is masked off
    (X, 0xC3, "UNKNOWN (c0)"),  # and not printed either
    # xactdesc.c: masked with XLOG_XACT_OPMASK
    (T, 0x00, "COMMIT"),
    (T, 0x10, "PREPARE"),
    (T, 0x20, "ABORT"),
    (T, 0x30, "COMMIT_PREPARED"),
    (T, 0x40, "ABORT_PREPARED"),
    (T, 0x50, "ASSIGNMENT"),
    (T, 0x60, "INVALIDATION"),
    (T, 0x70, "UNKNOWN (70)"),
    (T, 0x80, "COMMIT"),  # XLOG_XACT_HAS_INFO
    (T, 0xA0, "ABORT"),
    (T, 0xB0, "COMMIT_PREPARED"),
    (T, 0xE0, "INVALIDATION"),
    (T, 0xF0, "UNKNOWN (f0)"),  # the UNKNOWN text keeps the HAS_INFO bit
    (T, 0x81, "COMMIT"),
    # smgrdesc.c
    (S, 0x00, "UNKNOWN (0)"),
    (S, 0x10, "CREATE"),
    (S, 0x20, "TRUNCATE"),
    (S, 0x21, "TRUNCATE"),  # with XLR_SPECIAL_REL_UPDATE, as written
    (S, 0x30, "UNKNOWN (30)"),
    # clogdesc.c
    (C, 0x00, "ZEROPAGE"),
    (C, 0x10, "TRUNCATE"),
    (C, 0x20, "UNKNOWN (20)"),
    # dbasedesc.c
    (D, 0x00, "CREATE_FILE_COPY"),
    (D, 0x10, "CREATE_WAL_LOG"),
    (D, 0x20, "DROP"),
    (D, 0x30, "UNKNOWN (30)"),
    # tblspcdesc.c
    (TS, 0x00, "CREATE"),
    (TS, 0x10, "DROP"),
    (TS, 0x20, "UNKNOWN (20)"),
    # mxactdesc.c
    (MX, 0x00, "ZERO_OFF_PAGE"),
    (MX, 0x10, "ZERO_MEM_PAGE"),
    (MX, 0x20, "CREATE_ID"),
    (MX, 0x30, "TRUNCATE_ID"),
    (MX, 0x40, "UNKNOWN (40)"),
    # relmapdesc.c
    (RM, 0x00, "UPDATE"),
    (RM, 0x10, "UNKNOWN (10)"),
    # standbydesc.c
    (SB, 0x00, "LOCK"),
    (SB, 0x10, "RUNNING_XACTS"),
    (SB, 0x20, "INVALIDATIONS"),
    (SB, 0x30, "UNKNOWN (30)"),
    # heapdesc.c heap2_identify: only MULTI_INSERT has +INIT
    (H2, 0x00, "REWRITE"),
    (H2, 0x10, "PRUNE"),
    (H2, 0x20, "VACUUM"),
    (H2, 0x30, "FREEZE_PAGE"),
    (H2, 0x40, "VISIBLE"),
    (H2, 0x50, "MULTI_INSERT"),
    (H2, 0xD0, "MULTI_INSERT+INIT"),
    (H2, 0x60, "LOCK_UPDATED"),
    (H2, 0x70, "NEW_CID"),
    (H2, 0x80, "UNKNOWN (80)"),
    (H2, 0x90, "UNKNOWN (90)"),
    (H2, 0xF0, "UNKNOWN (f0)"),
    # heapdesc.c heap_identify: +INIT for INSERT, UPDATE, HOT_UPDATE only
    (H, 0x00, "INSERT"),
    (H, 0x80, "INSERT+INIT"),
    (H, 0x10, "DELETE"),
    (H, 0x90, "UNKNOWN (90)"),
    (H, 0x20, "UPDATE"),
    (H, 0xA0, "UPDATE+INIT"),
    (H, 0x30, "TRUNCATE"),
    (H, 0x31, "TRUNCATE"),
    (H, 0xB0, "UNKNOWN (b0)"),
    (H, 0x40, "HOT_UPDATE"),
    (H, 0xC0, "HOT_UPDATE+INIT"),
    (H, 0x50, "HEAP_CONFIRM"),
    (H, 0xD0, "UNKNOWN (d0)"),
    (H, 0x60, "LOCK"),
    (H, 0xE0, "UNKNOWN (e0)"),
    (H, 0x70, "INPLACE"),
    (H, 0xF0, "UNKNOWN (f0)"),
    (H, 0x82, "INSERT+INIT"),
    # nbtdesc.c
    (BT, 0x00, "INSERT_LEAF"),
    (BT, 0x10, "INSERT_UPPER"),
    (BT, 0x20, "INSERT_META"),
    (BT, 0x30, "SPLIT_L"),
    (BT, 0x40, "SPLIT_R"),
    (BT, 0x50, "INSERT_POST"),
    (BT, 0x60, "DEDUP"),
    (BT, 0x70, "DELETE"),
    (BT, 0x80, "UNLINK_PAGE"),
    (BT, 0x90, "UNLINK_PAGE_META"),
    (BT, 0xA0, "NEWROOT"),
    (BT, 0xB0, "MARK_PAGE_HALFDEAD"),
    (BT, 0xC0, "VACUUM"),
    (BT, 0xD0, "REUSE_PAGE"),
    (BT, 0xE0, "META_CLEANUP"),
    (BT, 0xF0, "UNKNOWN (f0)"),
    # hashdesc.c
    (HA, 0x00, "INIT_META_PAGE"),
    (HA, 0x10, "INIT_BITMAP_PAGE"),
    (HA, 0x20, "INSERT"),
    (HA, 0x30, "ADD_OVFL_PAGE"),
    (HA, 0x40, "SPLIT_ALLOCATE_PAGE"),
    (HA, 0x50, "SPLIT_PAGE"),
    (HA, 0x60, "SPLIT_COMPLETE"),
    (HA, 0x70, "MOVE_PAGE_CONTENTS"),
    (HA, 0x80, "SQUEEZE_PAGE"),
    (HA, 0x90, "DELETE"),
    (HA, 0xA0, "SPLIT_CLEANUP"),
    (HA, 0xB0, "UPDATE_META_PAGE"),
    (HA, 0xC0, "VACUUM_ONE_PAGE"),
    (HA, 0xD0, "UNKNOWN (d0)"),
    # gindesc.c
    (GI, 0x00, "UNKNOWN (0)"),
    (GI, 0x10, "CREATE_PTREE"),
    (GI, 0x20, "INSERT"),
    (GI, 0x30, "SPLIT"),
    (GI, 0x40, "VACUUM_PAGE"),
    (GI, 0x50, "DELETE_PAGE"),
    (GI, 0x60, "UPDATE_META_PAGE"),
    (GI, 0x70, "INSERT_LISTPAGE"),
    (GI, 0x80, "DELETE_LISTPAGE"),
    (GI, 0x90, "VACUUM_DATA_LEAF_PAGE"),
    (GI, 0xA0, "UNKNOWN (a0)"),
    # gistdesc.c
    (GS, 0x00, "PAGE_UPDATE"),
    (GS, 0x10, "DELETE"),
    (GS, 0x20, "PAGE_REUSE"),
    (GS, 0x30, "PAGE_SPLIT"),
    (GS, 0x40, "UNKNOWN (40)"),
    (GS, 0x50, "UNKNOWN (50)"),
    (GS, 0x60, "PAGE_DELETE"),
    (GS, 0x70, "ASSIGN_LSN"),
    (GS, 0x80, "UNKNOWN (80)"),
    # seqdesc.c
    (SQ, 0x00, "LOG"),
    (SQ, 0x10, "UNKNOWN (10)"),
    # spgdesc.c
    (SP, 0x00, "UNKNOWN (0)"),
    (SP, 0x10, "ADD_LEAF"),
    (SP, 0x20, "MOVE_LEAFS"),
    (SP, 0x30, "ADD_NODE"),
    (SP, 0x40, "SPLIT_TUPLE"),
    (SP, 0x50, "PICKSPLIT"),
    (SP, 0x60, "VACUUM_LEAF"),
    (SP, 0x70, "VACUUM_ROOT"),
    (SP, 0x80, "VACUUM_REDIRECT"),
    (SP, 0x90, "UNKNOWN (90)"),
    # brindesc.c: +INIT for INSERT and UPDATE only
    (BR, 0x00, "CREATE_INDEX"),
    (BR, 0x80, "UNKNOWN (80)"),
    (BR, 0x10, "INSERT"),
    (BR, 0x90, "INSERT+INIT"),
    (BR, 0x20, "UPDATE"),
    (BR, 0xA0, "UPDATE+INIT"),
    (BR, 0x30, "SAMEPAGE_UPDATE"),
    (BR, 0xB0, "UNKNOWN (b0)"),
    (BR, 0x40, "REVMAP_EXTEND"),
    (BR, 0x50, "DESUMMARIZE"),
    (BR, 0x60, "UNKNOWN (60)"),
    # committsdesc.c: switches on the raw info, flag bits included
    (CT, 0x00, "ZEROPAGE"),
    (CT, 0x10, "TRUNCATE"),
    (CT, 0x20, "UNKNOWN (20)"),
    (CT, 0x01, "UNKNOWN (0)"),
    (CT, 0x12, "UNKNOWN (10)"),
    # replorigindesc.c: switches on the raw info, flag bits included
    (RO, 0x00, "SET"),
    (RO, 0x10, "DROP"),
    (RO, 0x20, "UNKNOWN (20)"),
    (RO, 0x02, "UNKNOWN (0)"),
    # genericdesc.c: always "Generic"
    (GE, 0x00, "Generic"),
    (GE, 0x10, "Generic"),
    (GE, 0xFF, "Generic"),
    # logicalmsgdesc.c
    (LM, 0x00, "MESSAGE"),
    (LM, 0x01, "MESSAGE"),
    (LM, 0x10, "UNKNOWN (10)"),
    # custom rmgrs: pg_waldump's default_identify returns NULL
    (128, 0x00, "UNKNOWN (0)"),
    (255, 0x5F, "UNKNOWN (50)"),
]


@pytest.mark.parametrize(("rmid", "info", "expected"), IDENTIFY_TABLE)
def test_record_type_name(rmid: int, info: int, expected: str) -> None:
    assert record_type_name(rmid, info) == expected
    if expected.startswith("UNKNOWN"):
        assert identify(rmid, info) is None
    else:
        assert identify(rmid, info) == expected


def test_table_covers_every_identify_branch() -> None:
    """Every name an identify function can return appears in the table."""
    covered = {(rmid, name) for rmid, _, name in IDENTIFY_TABLE}
    for rmid in RmgrId:
        for info in range(256):
            name = identify(rmid, info)
            if name is not None:
                assert (int(rmid), name) in covered, (rmgr_name(rmid), hex(info), name)


def test_unknown_text_is_the_masked_info_in_lowercase_hex() -> None:
    for rmid in [*RmgrId, 128]:
        for info in range(256):
            name = record_type_name(rmid, info)
            if identify(rmid, info) is None:
                assert name == "UNKNOWN (%x)" % (info & 0xF0)


def test_low_bits_never_change_the_name_of_masked_rmgrs() -> None:
    raw = {RmgrId.COMMIT_TS, RmgrId.REPLORIGIN}
    for rmid in RmgrId:
        if rmid in raw:
            continue
        for info in range(0, 256, 16):
            base = record_type_name(rmid, info)
            for low in range(1, 16):
                assert record_type_name(rmid, info | low) == base


@pytest.mark.parametrize("info", [-1, 256])
def test_info_must_be_a_byte(info: int) -> None:
    with pytest.raises(ValueError):
        record_type_name(RmgrId.HEAP, info)


# --- compat: the real pg_waldump --------------------------------------------


def _pg_waldump() -> Path:
    if PG_WALDUMP.exists():
        return PG_WALDUMP
    found = shutil.which("pg_waldump")
    if found is None:
        pytest.skip("pg_waldump (PostgreSQL 15) not installed")
    return Path(found)


def test_rmgr_list_matches_pg_waldump() -> None:
    waldump = _pg_waldump()
    version = subprocess.run([waldump, "--version"], capture_output=True, text=True, check=True, timeout=30)
    if " 15." not in version.stdout:
        pytest.skip(f"not PostgreSQL 15: {version.stdout.strip()}")
    listed = subprocess.run([waldump, "--rmgr=list"], capture_output=True, text=True, check=True, timeout=30)
    names = listed.stdout.split()
    assert names == [rmgr_name(rmid) for rmid in RmgrId]
    assert set(names) == {name for _, name in EXPECTED_NAMES}
