"""B-tree redo (libs/pgredo/btree.py) against PostgreSQL 15's own consistency images.

A real primary with wal_consistency_checking=all runs workloads that make
every B-tree record type; each registered block is redone by our code and
compared, after btree_mask, with the page image Postgres attached.
"""

from __future__ import annotations

import struct
from collections import Counter

import psycopg
import pytest
from walcorpus import CHECKED_WAL_GUCS, assert_rmgr_verified, assert_unknown_info_unsupported, corpus_fixtures

from pgformat.page import new_page, page_add_item_extended, page_get_item, page_get_max_offset_number
from pgformat.rmgr import RM_BTREE_ID, record_type_name
from pgformat.xlogrecord import DecodedRecord
from pgredo import btree
from pgredo.verify import VerifyReport
from zctl.postgres import PostgresNode

# 500-byte keys (below TOAST_INDEX_TARGET, so never compressed) sharing a long
# prefix: suffix truncation keeps pivots wide too, so ~15 tuples fit a page at
# every level and a thousand rows make a three-level tree.
_ASC = "lpad(lpad({}::text, 8, '0'), 500, 'x')"
_RAND = "lpad(md5({}::text), 500, 'x')"

# Each entry is one transaction (VACUUM needs its own); errors are expected
# where the statement is prefixed with "!".
WORKLOAD: list[str] = [
    # Wide keys, random order: SPLIT_L and SPLIT_R at every level, INSERT_UPPER,
    # NEWROOT (a leaf root on the first insert, then each root split).
    'CREATE TABLE wide_rand (k text COLLATE "C", n int)',
    "CREATE INDEX wide_rand_k ON wide_rand (k)",
    f"INSERT INTO wide_rand SELECT {_RAND.format('i')}, i FROM generate_series(1, 1000) i",
    # Wide keys, ascending: rightmost splits.
    'CREATE TABLE wide_asc (k text COLLATE "C", n int)',
    "CREATE INDEX wide_asc_k ON wide_asc (k)",
    f"INSERT INTO wide_asc SELECT {_ASC.format('i')}, i FROM generate_series(1, 1000) i",
    # Empty whole key ranges: VACUUM, MARK_PAGE_HALFDEAD, UNLINK_PAGE (with
    # internal pages: the half-dead leaf is block 3), META_CLEANUP.
    "DELETE FROM wide_asc WHERE n BETWEEN 100 AND 800",
    "DELETE FROM wide_rand WHERE substr(k, 469, 1) < '8'",
    "VACUUM wide_asc",
    "VACUUM wide_rand",
    # A two-leaf tree losing its left leaf: UNLINK_PAGE_META moves the fast
    # root down; the lone leaf then splits under a root above it: INSERT_META.
    'CREATE TABLE fr (k text COLLATE "C", n int)',
    "CREATE INDEX fr_k ON fr (k)",
    f"INSERT INTO fr SELECT {_ASC.format('i')}, i FROM generate_series(1, 24) i",
    "DELETE FROM fr WHERE n <= 20",
    "VACUUM fr",
    f"INSERT INTO fr SELECT {_ASC.format('i')}, i FROM generate_series(25, 60) i",
    # Duplicates: DEDUP, posting lists; then VACUUM shrinking posting lists
    # (xl_btree_update) and new heap TIDs landing inside posting lists (INSERT_POST).
    "CREATE TABLE dup (k int, n int)",
    "CREATE INDEX dup_k ON dup (k)",
    "INSERT INTO dup SELECT i % 5, i FROM generate_series(1, 4000) i",
    "DELETE FROM dup WHERE n % 3 = 0",
    "VACUUM dup",
    "INSERT INTO dup SELECT i % 5, i FROM generate_series(4001, 5500) i",
    # Leaf pages full of maximal posting lists whose dead TIDs stay (the heap is
    # vacuumed, the index is not): new rows get heap TIDs inside posting lists
    # of full pages, so the posting list split happens in a page split.
    "CREATE TABLE pst (k int, n int)",
    "CREATE INDEX pst_k ON pst (k)",
    "INSERT INTO pst SELECT i % 4, i FROM generate_series(1, 8000) i",
    "DELETE FROM pst WHERE n % 2 = 0",
    "VACUUM (INDEX_CLEANUP OFF) pst",
    "INSERT INTO pst SELECT i % 4, i FROM generate_series(8001, 11000) i",
    # Unique index: violations, ON CONFLICT, dead duplicates.
    "CREATE TABLE u (id int PRIMARY KEY, t text)",
    "INSERT INTO u SELECT i, 'x' FROM generate_series(1, 600) i",
    "!INSERT INTO u VALUES (5, 'dup')",
    "!INSERT INTO u SELECT i, 'y' FROM generate_series(601, 650) i UNION ALL SELECT 10, 'y'",
    "INSERT INTO u SELECT i, 'y' FROM generate_series(550, 700) i ON CONFLICT DO NOTHING",
    "INSERT INTO u SELECT i, 'z' FROM generate_series(690, 720) i ON CONFLICT (id) DO UPDATE SET t = 'upd'",
    "DELETE FROM u WHERE id % 2 = 0",
    "INSERT INTO u SELECT i, 'again' FROM generate_series(2, 600, 2) i",
    # Non-HOT updates that leave the primary key unchanged: bottom-up index
    # deletion (DELETE records) in bu_pkey.
    "CREATE TABLE bu (id int PRIMARY KEY, v int) WITH (fillfactor = 50)",
    "CREATE INDEX bu_v ON bu (v)",
    "INSERT INTO bu SELECT i, 0 FROM generate_series(1, 300) i",
    *["UPDATE bu SET v = v + 1"] * 6,
    # Let deleted pages become recyclable (XIDs move past their safexid),
    # put them in the FSM, then split pages to reuse them: REUSE_PAGE.
    *["SELECT txid_current()"] * 3,
    "DELETE FROM wide_asc WHERE n > 990",
    "DELETE FROM wide_rand WHERE n % 50 = 0",
    "VACUUM (INDEX_CLEANUP ON) wide_asc",
    "VACUUM (INDEX_CLEANUP ON) wide_rand",
    f"INSERT INTO wide_asc SELECT {_ASC.format('i')}, i FROM generate_series(100, 400) i",
    f"INSERT INTO wide_rand SELECT {_RAND.format('i')}, i FROM generate_series(2001, 2300) i",
    "CHECKPOINT",
]

# Record types the workload must make and that registered blocks we checked.
EXPECTED_CHECKED = {
    "INSERT_LEAF", "INSERT_UPPER", "INSERT_META", "SPLIT_L", "SPLIT_R", "INSERT_POST",
    "DEDUP", "DELETE", "UNLINK_PAGE", "UNLINK_PAGE_META", "NEWROOT", "MARK_PAGE_HALFDEAD",
    "VACUUM", "META_CLEANUP",
}
# REUSE_PAGE registers no block: there is no page to check, only the record.
EXPECTED_PRESENT = EXPECTED_CHECKED | {"REUSE_PAGE"}

def run_btree_workload(node: PostgresNode) -> None:
    for stmt in WORKLOAD:
        if stmt.startswith("!"):
            with pytest.raises(psycopg.errors.UniqueViolation):
                node.execute(stmt[1:])
        else:
            node.execute(stmt)


btree_corpus, btree_records, btree_report = corpus_fixtures("btree_", run_btree_workload, CHECKED_WAL_GUCS)


def test_btree_redo_matches_consistency_images(
    btree_records: list[DecodedRecord], btree_report: VerifyReport
) -> None:
    assert_rmgr_verified(btree_records, btree_report, RM_BTREE_ID, EXPECTED_PRESENT, EXPECTED_CHECKED)


def test_btree_workload_shapes(btree_records: list[DecodedRecord]) -> None:
    """The workload reaches the rarer branches of nbtxlog.c, not just each record type."""
    shapes: Counter[str] = Counter()
    for rec in btree_records:
        if rec.rmid != RM_BTREE_ID:
            continue
        name = record_type_name(rec.rmid, rec.info)
        if name in ("SPLIT_L", "SPLIT_R"):
            level, _first, _newoff, postingoff = struct.unpack_from("<IHHH", rec.main_data)
            shapes["upper split"] += level > 0
            shapes["posting list split in a page split"] += postingoff != 0
            shapes["split with a right sibling"] += rec.block(2) is not None
        elif name.startswith("UNLINK_PAGE"):
            shapes["internal page unlinked (leaf is block 3)"] += rec.block(3) is not None
            shapes["leftmost page unlinked"] += rec.block(1) is None
        elif name == "VACUUM":
            shapes["VACUUM shrinking posting lists"] += struct.unpack_from("<HH", rec.main_data)[1] > 0
        elif name == "NEWROOT":
            shapes["root above level 1"] += struct.unpack_from("<II", rec.main_data)[1] >= 2
    missing = [k for k in (
        "upper split", "posting list split in a page split", "split with a right sibling",
        "internal page unlinked (leaf is block 3)", "leftmost page unlinked",
        "VACUUM shrinking posting lists", "root above level 1",
    ) if shapes[k] == 0]
    assert missing == []


# --- unit tests of the posting-list helpers (nbtdedup.c) --------------------------


def _tid(blk: int, off: int) -> bytes:
    return struct.pack("<HHH", blk >> 16, blk & 0xFFFF, off)


def _int_tuple(key: int, blk: int, off: int) -> bytes:
    """An int4 non-pivot index tuple: 8-byte header + 4-byte key, MAXALIGNed to 16."""
    return _tid(blk, off) + struct.pack("<H", 16) + struct.pack("<i", key) + bytes(4)


def test_form_swap_update_posting() -> None:
    base = _int_tuple(7, 1, 1)
    tids = b"".join(_tid(1, o) for o in (1, 3, 5, 7))
    posting = btree._form_posting(base, tids, 4)
    assert len(posting) == 16 + 24
    assert btree._is_posting(posting) and btree._n_posting(posting) == 4
    assert btree._posting_offset(posting) == 16
    assert btree._index_tuple_size(posting) == 40

    newitem = bytearray(_int_tuple(7, 1, 4))
    nposting = btree._swap_posting(newitem, posting, 2)
    assert bytes(nposting[16:40]) == b"".join(_tid(1, o) for o in (1, 3, 4, 5))
    assert bytes(newitem[:6]) == _tid(1, 7)

    shrunk = btree._update_posting(posting, [0, 2])
    assert btree._n_posting(shrunk) == 2 and len(shrunk) == 32
    assert bytes(shrunk[16:28]) == _tid(1, 3) + _tid(1, 7)
    single = btree._update_posting(posting, [0, 1, 3])
    assert len(single) == 16 and not btree._is_posting(single)
    assert bytes(single[:6]) == _tid(1, 5)


def test_restore_page_matches_page_add_item() -> None:
    """_bt_restore_page's verbatim copy equals adding the items in reverse, as C does."""
    items = [_int_tuple(k, 0, k) for k in range(1, 40)]
    blob = b"".join(reversed(items))  # highest item number lowest on the page
    ours = new_page(16)
    btree._bt_restore_page(ours, blob)
    theirs = new_page(16)
    for i in range(len(items)):
        assert page_add_item_extended(theirs, items[i], i + 1, 0) == i + 1
    assert ours == theirs
    assert page_get_max_offset_number(ours) == len(items)
    for off in range(1, len(items) + 1):
        assert bytes(page_get_item(ours, off)) == items[off - 1]


def test_reuse_page_registers_no_block(btree_records: list[DecodedRecord]) -> None:
    reuse = [r for r in btree_records if r.rmid == RM_BTREE_ID and record_type_name(r.rmid, r.info) == "REUSE_PAGE"]
    assert reuse and all(not r.blocks for r in reuse)


def test_unknown_btree_info_is_unsupported(btree_records: list[DecodedRecord]) -> None:
    assert_unknown_info_unsupported(btree_records, RM_BTREE_ID, 0xF0, btree.btree_redo)

