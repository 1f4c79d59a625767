"""GiST and SP-GiST redo (libs/pgredo/gist.py, spgist.py) against PostgreSQL 15's own images.

A real primary with wal_consistency_checking=all runs workloads that make
every GiST and SP-GiST record type with a page effect; each registered block
is redone by our code and compared, after gist_mask / spg_mask, with the page
image Postgres attached. A second, wal_level=minimal node makes GiST's
ASSIGN_LSN records (written only for a relation created in the same
transaction, whose changes skip WAL).
"""

from __future__ import annotations

import struct
from collections import Counter

import pytest
from conftest import PgFactory
from walcorpus import (
    CHECKED_WAL_GUCS,
    NO_CHECKPOINT_GUCS,
    WalCorpus,
    assert_rmgr_verified,
    assert_unknown_info_unsupported,
    corpus_fixture,
    corpus_fixtures,
    decoded_records,
    execute_all,
)

from pgformat.bufmask import gist_mask, mask_for_rmgr, spg_mask
from pgformat.constants import BLCKSZ
from pgformat.page import new_page, page_add_item_extended
from pgformat.rmgr import RM_GIST_ID, RM_SPGIST_ID, record_type_name
from pgformat.xlogrecord import DecodedRecord
from pgredo import gist, spgist
from pgredo.verify import VerifyReport, verify_records
from zctl.postgres import PostgresError

# Deterministic, well-spread coordinates (no random(): the WAL must not vary run to run).
_X = "((i::int8 * 7919) % 10007)::float8 / 10"
_Y = "((i::int8 * 104729) % 10009)::float8 / 10"

# Each entry is one transaction (VACUUM needs its own).
GIST_WORKLOAD: list[str] = [
    # Points inserted into an empty index: PAGE_UPDATE on leaves, PAGE_SPLIT of
    # leaves and of the root (several levels), downlink PAGE_UPDATEs that clear
    # F_FOLLOW_RIGHT on the left child (block 1).
    "CREATE TABLE gpt (id int, p point)",
    "CREATE INDEX gpt_p ON gpt USING gist (p)",
    f"INSERT INTO gpt SELECT i, point({_X}, {_Y}) FROM generate_series(1, 12000) i",
    # Boxes and ranges: other opclasses, other tuple sizes; a wide multicolumn key.
    "CREATE TABLE gbox (id int, b box, r int4range)",
    "CREATE INDEX gbox_b ON gbox USING gist (b)",
    "CREATE INDEX gbox_r ON gbox USING gist (r, b)",
    f"INSERT INTO gbox SELECT i, box(point({_X}, {_Y}), point({_X} + i % 17, {_Y} + i % 13)),"
    " int4range(i % 5000, i % 5000 + 1 + i % 40) FROM generate_series(1, 6000) i",
    # An exclusion constraint: every insert searches, and violations roll back.
    "CREATE EXTENSION IF NOT EXISTS btree_gist",
    "CREATE TABLE resv (room int, during int4range, EXCLUDE USING gist (room WITH =, during WITH &&))",
    "INSERT INTO resv SELECT i % 50, int4range((i / 50) * 10, (i / 50) * 10 + 5) FROM generate_series(1, 4000) i",
    # Wide keys (btree_gist text ranges of ~224 random hex characters): few
    # downlinks fit an internal page, so internal pages split while inserting a
    # child's downlink: PAGE_SPLIT with the left child as block 0.
    "CREATE TABLE gwide (id int, t text)",
    "CREATE INDEX gwide_t ON gwide USING gist (t)",
    "INSERT INTO gwide SELECT i, " + " || ".join(f"md5((i + {k})::text)" for k in range(7))
    + " FROM generate_series(1, 3000) i",
    # Vacuum: PAGE_UPDATE deleting tuples (F_TUPLES_DELETED), then empty leaf
    # pages are unlinked: PAGE_DELETE (leaf + parent downlink).
    "DELETE FROM gpt WHERE p[0] < 600",
    "DELETE FROM gpt WHERE id % 3 = 0",
    "DELETE FROM gbox WHERE id % 4 = 0",
    "DELETE FROM resv WHERE room < 20",
    "VACUUM gpt",
    "VACUUM gbox",
    "VACUUM resv",
    # Later transactions let the deleted pages' deleteXid age out; the next
    # vacuums put them in the FSM, and new inserts recycle them: PAGE_REUSE.
    *["SELECT txid_current()"] * 3,
    "VACUUM gpt",
    "VACUUM gpt",
    f"INSERT INTO gpt SELECT i, point({_X} / 2, {_Y}) FROM generate_series(20001, 26000) i",
    # Microvacuum: index scans mark dead entries LP_DEAD (F_HAS_GARBAGE); inserts
    # into those full pages prune them first: DELETE.
    "CREATE TABLE gmv (id int, p point)",
    "CREATE INDEX gmv_p ON gmv USING gist (p)",
    f"INSERT INTO gmv SELECT i, point({_X}, {_Y}) FROM generate_series(1, 8000) i",
    "DELETE FROM gmv WHERE id % 2 = 0",
    "SET enable_seqscan = off; SET enable_bitmapscan = off;"
    " SELECT count(*) FROM gmv WHERE p <@ box '((0,0),(1001,1001))'",
    "SET enable_seqscan = off; SET enable_bitmapscan = off;"
    " SELECT count(*) FROM gmv WHERE p <@ box '((0,0),(1001,1001))'",
    f"INSERT INTO gmv SELECT i, point({_X}, {_Y}) FROM generate_series(8001, 16000) i",
]

SPGIST_WORKLOAD: list[str] = [
    # Quad tree on points: ADD_LEAF, MOVE_LEAFS, PICKSPLIT (the root leaf splits
    # first: isRootSplit), NULLs in the nulls tree.
    "CREATE TABLE spt (id int, p point)",
    "CREATE INDEX spt_p ON spt USING spgist (p)",
    f"INSERT INTO spt SELECT i, point({_X}, {_Y}) FROM generate_series(1, 10000) i",
    "INSERT INTO spt SELECT i, NULL FROM generate_series(10001, 10600) i",
    # Radix tree on text sharing prefixes: SPLIT_TUPLE (prefix mismatch) and
    # ADD_NODE (a new label at an inner tuple).
    "CREATE TABLE stx (id int, t text)",
    "CREATE INDEX stx_t ON stx USING spgist (t)",
    "INSERT INTO stx SELECT i, 'http://www.example' || (i % 7) || '.com/path/' || (i % 113) || '/item' || i"
    " FROM generate_series(1, 4000) i",
    "INSERT INTO stx SELECT i, 'http://www.exa' || chr(65 + i % 26) || 'mple/' || i FROM generate_series(4001, 5000) i",
    "INSERT INTO stx SELECT i, 'ftp://' || md5(i::text) FROM generate_series(5001, 6000) i",
    "INSERT INTO stx SELECT i, 'http://' || chr(65 + i % 40) || '/' || i FROM generate_series(6001, 7000) i",
    # 600-character prefixes make inner tuples so large that inner pages fill
    # up: a tuple growing by a node moves to another page (ADD_NODE with a new
    # page, parent fixed on block 0 or 2). After a vacuum, inserts land on DEAD
    # chain heads (ADD_LEAF replacing a dead tuple).
    "CREATE TABLE stx3 (id int, t text)",
    "CREATE INDEX stx3_t ON stx3 USING spgist (t)",
    "INSERT INTO stx3 SELECT i, repeat(chr(65 + i % 26), 600) || chr(48 + (i / 26) % 10) || md5(i::text)"
    " FROM generate_series(1, 5200) i",
    "INSERT INTO stx3 SELECT i, repeat(chr(65 + i % 26), 600) || chr(80 + (i / 26) % 20) || md5(i::text)"
    " FROM generate_series(1, 2600) i",
    "DELETE FROM stx3 WHERE id % 4 <> 0",
    "VACUUM stx3",
    "INSERT INTO stx3 SELECT i, repeat(chr(65 + i % 26), 600) || chr(48 + (i / 26) % 40) || md5(i::text)"
    " FROM generate_series(1, 5200) i",
    # inet (kd tree over prefixes) and ranges.
    "CREATE TABLE snet (id int, a inet, r int4range)",
    "CREATE INDEX snet_a ON snet USING spgist (a)",
    "CREATE INDEX snet_r ON snet USING spgist (r)",
    "INSERT INTO snet SELECT i, ('10.' || (i % 256) || '.' || ((i * 7) % 256) || '.' || (i % 251))::inet,"
    " int4range(i % 3000, i % 3000 + i % 50 + 1) FROM generate_series(1, 6000) i",
    # Vacuum: VACUUM_LEAF (dead / placeholder tuples, moved chain heads,
    # re-chaining).
    "DELETE FROM spt WHERE id % 3 = 0 OR p[0] < 200",
    "DELETE FROM stx WHERE id % 2 = 0",
    "DELETE FROM snet WHERE id % 5 < 3",
    "VACUUM spt",
    "VACUUM stx",
    "VACUUM snet",
    # A root that is also a leaf: VACUUM_ROOT.
    "CREATE TABLE ssmall (id int, p point)",
    "CREATE INDEX ssmall_p ON ssmall USING spgist (p)",
    "INSERT INTO ssmall SELECT i, point(i, i) FROM generate_series(1, 50) i",
    "DELETE FROM ssmall WHERE id % 2 = 0",
    "VACUUM ssmall",
    # Redirects left by MOVE_LEAFS / PICKSPLIT / ADD_NODE become removable once
    # later transactions pass their xid: VACUUM_REDIRECT.
    f"INSERT INTO spt SELECT i, point({_X} / 3, {_Y} / 3) FROM generate_series(20001, 24000) i",
    "INSERT INTO stx SELECT i, 'http://www.example' || (i % 3) || '.org/x/' || i FROM generate_series(7001, 9000) i",
    *["SELECT txid_current()"] * 3,
    "VACUUM spt",
    "VACUUM stx",
    "VACUUM snet",
]

# wal_level=minimal: a GiST index created in the same transaction skips WAL,
# and gistGetFakeLSN writes ASSIGN_LSN to get distinct LSNs.
ASSIGN_LSN_WORKLOAD: list[str] = [
    "BEGIN; CREATE TABLE gmin (p point); CREATE INDEX gmin_p ON gmin USING gist (p);"
    f" INSERT INTO gmin SELECT point({_X}, {_Y}) FROM generate_series(1, 2000) i;"
    f" INSERT INTO gmin SELECT point({_Y}, {_X}) FROM generate_series(1, 2000) i; COMMIT",
]

GIST_CHECKED = {"PAGE_UPDATE", "PAGE_SPLIT", "PAGE_DELETE", "DELETE"}
# PAGE_REUSE and ASSIGN_LSN register no block: there is no page to check.
GIST_PRESENT = GIST_CHECKED | {"PAGE_REUSE"}
SPGIST_CHECKED = {
    "ADD_LEAF", "MOVE_LEAFS", "ADD_NODE", "SPLIT_TUPLE", "PICKSPLIT",
    "VACUUM_LEAF", "VACUUM_ROOT", "VACUUM_REDIRECT",
}

# Without a checkpoint mid-workload VACUUM_LEAF's pages are left to check.
GUCS = {**CHECKED_WAL_GUCS, **NO_CHECKPOINT_GUCS}
corpus, records, report = corpus_fixtures(
    "", lambda node: execute_all(node, GIST_WORKLOAD, SPGIST_WORKLOAD, ["CHECKPOINT"]), GUCS)
assign_lsn_corpus = corpus_fixture(
    "assign_lsn_corpus", lambda node: execute_all(node, ASSIGN_LSN_WORKLOAD),
    {**GUCS, "wal_level": "minimal", "max_wal_senders": 0})


def test_gist_redo_matches_consistency_images(records: list[DecodedRecord], report: VerifyReport) -> None:
    assert_rmgr_verified(records, report, RM_GIST_ID, GIST_PRESENT, GIST_CHECKED)


def test_spgist_redo_matches_consistency_images(records: list[DecodedRecord], report: VerifyReport) -> None:
    assert_rmgr_verified(records, report, RM_SPGIST_ID, SPGIST_CHECKED, SPGIST_CHECKED)


def test_gist_assign_lsn(assign_lsn_corpus: WalCorpus) -> None:
    recs = decoded_records(assign_lsn_corpus)
    assign = [r for r in recs if r.rmid == RM_GIST_ID and record_type_name(r.rmid, r.info) == "ASSIGN_LSN"]
    assert assign and all(not r.blocks for r in assign)
    rep = verify_records(recs)
    assert rep.mismatched == 0 and rep.unsupported == 0, rep.as_json()


def test_workload_shapes(records: list[DecodedRecord]) -> None:
    """The workload reaches the rarer branches of gistxlog.c / spgxlog.c, not just each type."""
    shapes: Counter[str] = Counter()
    for rec in records:
        name = record_type_name(rec.rmid, rec.info)
        if rec.rmid == RM_GIST_ID:
            if name == "PAGE_SPLIT":
                shapes["gist split"] += 1
                if rec.block(1) is not None and rec.block(1).blkno == 0:  # type: ignore[union-attr]
                    shapes["gist root split"] += 1
                if rec.block(0) is not None:
                    shapes["gist split clearing follow-right"] += 1
            elif name == "PAGE_UPDATE" and rec.block(1) is not None:
                shapes["gist downlink clearing follow-right"] += 1
        elif rec.rmid == RM_SPGIST_ID:
            if name == "PICKSPLIT":
                if rec.main_data[0]:
                    shapes["spg root pick split"] += 1
                if rec.block(1) is not None:
                    shapes["spg pick split with dest"] += 1
            elif name == "ADD_NODE":
                shapes["spg add node in place" if rec.block(1) is None else "spg add node moved"] += 1
            elif name == "ADD_LEAF":
                offnum_leaf, offnum_head = struct.unpack_from("<HH", rec.main_data, 2)
                shapes["spg nulls tree"] += rec.main_data[1]
                shapes["spg add leaf replacing dead"] += offnum_leaf == offnum_head
            elif name == "SPLIT_TUPLE":
                shapes["spg split tuple postfix elsewhere"] += rec.main_data[5] == 0
                shapes["spg split tuple postfix same page"] += rec.main_data[5] != 0
            elif name == "VACUUM_REDIRECT":
                shapes["spg vacuum redirect trims placeholders"] += struct.unpack_from("<H", rec.main_data, 2)[0] != 0
            elif name == "VACUUM_LEAF":
                n_dead, n_placeholder, n_move, n_chain = struct.unpack_from("<4H", rec.main_data)
                shapes["spg vacuum leaf moves"] += n_move > 0
                shapes["spg vacuum leaf chains"] += n_chain > 0
    for shape in (
        "gist root split", "gist split clearing follow-right", "gist downlink clearing follow-right",
        "spg root pick split", "spg pick split with dest", "spg add node moved", "spg add node in place",
        "spg nulls tree", "spg add leaf replacing dead", "spg split tuple postfix elsewhere",
        "spg split tuple postfix same page", "spg vacuum leaf moves", "spg vacuum leaf chains",
        "spg vacuum redirect trims placeholders",
    ):
        assert shapes[shape] > 0, f"workload never made: {shape} ({dict(shapes)})"


def test_postgres_own_redo_of_gist_delete_fails_its_consistency_check(pg_factory: PgFactory) -> None:
    """Why gist_delete_redo leaves F_TUPLES_DELETED alone (see its docstring).

    PostgreSQL 15's gistRedoDeleteRecord sets F_TUPLES_DELETED, gistprunepage
    on the primary does not, and gist_mask keeps that bit: crash recovery
    with wal_consistency_checking stops at the first Gist/DELETE. If this
    starts passing recovery, upstream changed, and gist_delete_redo should
    follow.
    """
    node = pg_factory(**GUCS)
    first = GIST_WORKLOAD.index("CREATE TABLE gmv (id int, p point)")
    node.execute("CHECKPOINT")
    execute_all(node, GIST_WORKLOAD[first:])
    node.stop(mode="immediate")
    with pytest.raises(PostgresError):
        node.start(timeout=30)
    log = node.logfile.read_text()
    assert "FATAL:  inconsistent page found" in log
    assert "for Gist/DELETE" in log


# --- unit tests ---------------------------------------------------------------------


def test_masks_registered() -> None:
    assert mask_for_rmgr(RM_GIST_ID) is gist_mask
    assert mask_for_rmgr(RM_SPGIST_ID) is spg_mask


def test_gist_mask_hides_nsn_follow_right_garbage_and_leaf_lp_flags() -> None:
    a = bytearray(BLCKSZ)
    gist.gist_init_page(a, gist.F_LEAF)
    assert page_add_item_extended(a, bytes(16), 0, 0) == 1
    b = bytearray(a)
    special = BLCKSZ - gist.SIZE_OF_GIST_PAGE_OPAQUE
    struct.pack_into("<II", b, special, 1, 2)  # NSN
    flags = gist.F_LEAF | gist.F_FOLLOW_RIGHT | gist.F_HAS_GARBAGE
    struct.pack_into("<H", b, special + 12, flags)
    raw = struct.unpack_from("<I", b, 24)[0]
    struct.pack_into("<I", b, 24, raw | (3 << 15))  # LP_DEAD
    gist_mask(a, 1)
    gist_mask(b, 1)
    assert a == b


def test_gist_restored_image_fixup(records: list[DecodedRecord]) -> None:
    """gistRedoClearFollowRight also runs on a page restored from an image."""
    rec = next(
        r for r in records
        if r.rmid == RM_GIST_ID and record_type_name(r.rmid, r.info) == "PAGE_UPDATE" and r.block(1) is not None
    )
    child = rec.block(1)
    assert child is not None and child.image is not None
    page = bytearray(child.image.page())
    special = BLCKSZ - gist.SIZE_OF_GIST_PAGE_OPAQUE
    struct.pack_into("<H", page, special + 12, struct.unpack_from("<H", page, special + 12)[0] | gist.F_FOLLOW_RIGHT)
    assert gist.gist_restored_image_fixup(rec, child, page)
    assert not struct.unpack_from("<H", page, special + 12)[0] & gist.F_FOLLOW_RIGHT
    hi, lo = struct.unpack_from("<II", page, special)
    assert (hi << 32) | lo == rec.end_lsn
    target = rec.block(0)
    assert target is not None
    assert not gist.gist_restored_image_fixup(rec, target, bytearray(page))


def test_spg_dead_tuple_layout() -> None:
    redirect = spgist.spg_form_dead_tuple(spgist.SPGIST_REDIRECT, 0x12345, 7, 999)
    assert len(redirect) == spgist.SGDTSIZE
    word, t_info, hi, lo, posid, xid = struct.unpack("<IHHHHI", redirect)
    assert (word & 3, word >> 2, t_info, (hi << 16) | lo, posid, xid) == (1, 16, 0, 0x12345, 7, 999)
    placeholder = spgist.spg_form_dead_tuple(spgist.SPGIST_PLACEHOLDER, 5, 5, 999)
    assert struct.unpack("<IHHHHI", placeholder) == (3 | 16 << 2, 0, 0xFFFF, 0xFFFF, 0, 0)


def test_spg_update_node_link() -> None:
    page = new_page(spgist.SIZE_OF_SPGIST_PAGE_OPAQUE)
    # Inner tuple: 3 nodes, 8-byte prefix; each node an 8-byte IndexTuple.
    nodes = b"".join(struct.pack("<HHHH", 0xFFFF, 0xFFFF, 0, 8) for _ in range(3))
    size = 8 + 8 + len(nodes)
    inner = struct.pack("<IH2x", (3 << 3) | (8 << 16), size) + b"PREFIX!!" + nodes
    assert page_add_item_extended(page, inner, 0, 0) == 1
    spgist.spg_update_node_link(page, 1, 2, 0x10002, 9)
    off = struct.unpack_from("<I", page, 24)[0] & 0x7FFF
    assert struct.unpack_from("<HHH", page, off + 16 + 16) == (1, 2, 9)
    assert struct.unpack_from("<HHH", page, off + 16) == (0xFFFF, 0xFFFF, 0)


def test_unknown_info_is_unsupported(records: list[DecodedRecord]) -> None:
    assert_unknown_info_unsupported(records, RM_GIST_ID, 0xF0, gist.gist_redo)
    assert_unknown_info_unsupported(records, RM_SPGIST_ID, 0xF0, spgist.spg_redo)
