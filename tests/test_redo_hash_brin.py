"""Hash and BRIN redo (libs/pgredo/hashidx.py, brin.py) against PostgreSQL 15's own images.

A real primary with wal_consistency_checking=all runs workloads that make
every Hash and BRIN record type; each registered block is redone by our code
and compared, after hash_mask / brin_mask, with the page image Postgres
attached.

Hash SPLIT_PAGE always carries a forced, applied full-page image
(log_split_page in hashpage.c): redo restores it and there is nothing to
compare, so it is only required to be present.
"""

from __future__ import annotations

import struct
from collections import Counter

import pytest
from walcorpus import CHECKED_WAL_GUCS, NO_CHECKPOINT_GUCS, assert_rmgr_verified, assert_unknown_info_unsupported, corpus_fixtures, execute_all

from pgformat.bufmask import brin_mask, hash_mask, mask_for_rmgr
from pgformat.constants import BLCKSZ
from pgformat.page import page_add_item_extended
from pgformat.rmgr import RM_BRIN_ID, RM_HASH_ID, XLOG_BRIN_INIT_PAGE, XLR_RMGR_INFO_MASK, record_type_name
from pgformat.xlogrecord import DecodedRecord
from pgredo import brin, hashidx
from pgredo.errors import RedoError, RedoFailedError
from pgredo.verify import VerifyReport

_KILL_SCAN = "SET enable_seqscan = off; SET enable_bitmapscan = off; "

# Each entry is one transaction (VACUUM needs its own).
HASH_WORKLOAD: list[str] = [
    # An empty index: INIT_META_PAGE, INIT_BITMAP_PAGE (the bucket pages are XLOG FPIs).
    "CREATE TABLE hs (id int, k int)",
    # fillfactor 10: ~40 tuples a bucket, so the index splits often.
    "CREATE INDEX hs_k ON hs USING hash (k) WITH (fillfactor = 10)",
    # Distinct keys and runs of duplicates: INSERT, SPLIT_ALLOCATE_PAGE (with
    # mask and splitpoint updates), SPLIT_COMPLETE, ADD_OVFL_PAGE (new bitmap
    # bits, bitmap pages found or not); a bucket of duplicates that moves to the
    # new bucket fills its page: SPLIT_PAGE. Splitting a bucket again first
    # removes the tuples its last split moved: DELETE + SPLIT_CLEANUP.
    "INSERT INTO hs SELECT i, CASE WHEN i % 2 = 0 THEN i % 5 ELSE i END FROM generate_series(1, 9000) i",
    "INSERT INTO hs SELECT i, i % 3 + 100 FROM generate_series(9001, 11000) i",
    # One key ten pages long: squeezing it fills several write pages in turn.
    "INSERT INTO hs SELECT i, 7777 FROM generate_series(30001, 34000) i",
    # Vacuum: DELETE per page, squeezing overflow chains: SQUEEZE_PAGE (tuples
    # moved or none, predecessor = write page or not), MOVE_PAGE_CONTENTS (into
    # the primary or an overflow page); split cleanup of the rest:
    # SPLIT_CLEANUP; UPDATE_META_PAGE.
    "DELETE FROM hs WHERE id % 4 <> 0 AND (k < 5 OR k >= 100)",
    "DELETE FROM hs WHERE id % 3 = 0 AND k >= 5 AND k < 100",
    "VACUUM hs",
    # Freed overflow pages are reused (bitmap bit found: bmpage_found).
    "INSERT INTO hs SELECT i, i % 3 + 100 FROM generate_series(20001, 21500) i",
    "DELETE FROM hs WHERE k = 101",
    "VACUUM hs",
    # Microvacuum: a full primary bucket page whose tuples index scans marked
    # LP_DEAD; an insert into it first removes them: VACUUM_ONE_PAGE.
    "CREATE TABLE hv (id int, k int)",
    "CREATE INDEX hv_k ON hv USING hash (k)",
    "INSERT INTO hv SELECT i, 1 FROM generate_series(1, 600) i",
    "DELETE FROM hv WHERE id <= 300",
    _KILL_SCAN + "SELECT count(*) FROM hv WHERE k = 1",
    _KILL_SCAN + "SELECT count(*) FROM hv WHERE k = 1",
    "INSERT INTO hv SELECT i, 1 FROM generate_series(601, 700) i",
    # An unlogged table's index: the same two records for the init fork.
    "CREATE UNLOGGED TABLE hu (k int)",
    "CREATE INDEX hu_k ON hu USING hash (k)",
]

BRIN_WORKLOAD: list[str] = [
    # A small table, ranges of 2 pages: CREATE_INDEX, REVMAP_EXTEND (the first
    # revmap page), INSERT+INIT (the first regular page), INSERT.
    "CREATE TABLE bs (id int, v int, t text)",
    "INSERT INTO bs SELECT i, i, md5(i::text) FROM generate_series(1, 3000) i",
    "CREATE INDEX bs_v ON bs USING brin (v, t) WITH (pages_per_range = 2)",
    # Rows past the summarized ranges, then summarizing them: INSERT of a
    # placeholder, then SAMEPAGE_UPDATE (or UPDATE) with the real summary.
    "INSERT INTO bs SELECT i, i, md5(i::text) FROM generate_series(3001, 5000) i",
    "SELECT brin_summarize_new_values('bs_v')",
    # Holes in summarized ranges, refilled with values outside them: fixed-size
    # minmax tuples widened in place (SAMEPAGE_UPDATE).
    "DELETE FROM bs WHERE id % 7 = 0",
    "VACUUM bs",
    "INSERT INTO bs SELECT 100000 + i, -i, md5(i::text) FROM generate_series(1, 400) i",
    # Desummarize / summarize single ranges: DESUMMARIZE, INSERT, SAMEPAGE_UPDATE.
    "SELECT brin_desummarize_range('bs_v', 0)",
    "SELECT brin_desummarize_range('bs_v', 6)",
    "SELECT brin_summarize_range('bs_v', 0)",
    "SELECT brin_summarize_range('bs_v', 6)",
    # One heap row a page (PLAIN storage), one range a page: more than
    # REVMAP_PAGE_MAXITEMS (1360) ranges, so the revmap grows over a full
    # regular page, which is evacuated first: UPDATE, UPDATE+INIT, REVMAP_EXTEND.
    "CREATE TABLE bb (id int, t text, pad text)",
    "ALTER TABLE bb ALTER COLUMN pad SET STORAGE PLAIN",
    "INSERT INTO bb SELECT i, md5(i::text), repeat('x', 5000) FROM generate_series(1, 1450) i",
    "CREATE INDEX bb_i ON bb USING brin (id, t) WITH (pages_per_range = 1)",
    # Widen summaries with much longer text: tuples that no longer fit their
    # page move elsewhere (UPDATE, UPDATE+INIT).
    "DELETE FROM bb WHERE id % 10 = 0",
    "VACUUM bb",
    "INSERT INTO bb SELECT 100000 + i, repeat('z', 200 + i), repeat('y', 5000) FROM generate_series(1, 140) i",
    "SELECT brin_desummarize_range('bb_i', 5)",
    "SELECT brin_summarize_new_values('bb_i')",
]

HASH_CHECKED = {
    "INIT_META_PAGE", "INIT_BITMAP_PAGE", "INSERT", "ADD_OVFL_PAGE", "SPLIT_ALLOCATE_PAGE",
    "SPLIT_COMPLETE", "MOVE_PAGE_CONTENTS", "SQUEEZE_PAGE", "DELETE", "SPLIT_CLEANUP",
    "UPDATE_META_PAGE", "VACUUM_ONE_PAGE",
}
# SPLIT_PAGE only ever carries an applied image: nothing to compare.
HASH_PRESENT = HASH_CHECKED | {"SPLIT_PAGE"}
BRIN_CHECKED = {
    "CREATE_INDEX", "INSERT", "INSERT+INIT", "UPDATE", "UPDATE+INIT", "SAMEPAGE_UPDATE",
    "REVMAP_EXTEND", "DESUMMARIZE",
}

GUCS = {**CHECKED_WAL_GUCS, **NO_CHECKPOINT_GUCS}
corpus, records, report = corpus_fixtures("", lambda node: execute_all(node, HASH_WORKLOAD, BRIN_WORKLOAD), GUCS)


def test_hash_redo_matches_consistency_images(records: list[DecodedRecord], report: VerifyReport) -> None:
    assert_rmgr_verified(records, report, RM_HASH_ID, HASH_PRESENT, HASH_CHECKED)


def test_brin_redo_matches_consistency_images(records: list[DecodedRecord], report: VerifyReport) -> None:
    assert_rmgr_verified(records, report, RM_BRIN_ID, BRIN_CHECKED, BRIN_CHECKED)


def test_workload_shapes(records: list[DecodedRecord]) -> None:
    """The workload reaches the rarer branches of hash_xlog.c / brin_xlog.c, not just each type."""
    shapes: Counter[str] = Counter()
    for rec in records:
        name = record_type_name(rec.rmid, rec.info)
        if rec.rmid == RM_HASH_ID:
            if name == "INIT_META_PAGE":
                shapes["hash init fork"] += rec.blocks[0].forknum == 3  # INIT_FORKNUM
            elif name == "ADD_OVFL_PAGE":
                # A new bitmap page (block 3) needs 32768 overflow pages first: not made here.
                shapes["hash ovfl recycled page"] += rec.main_data[2] != 0 and rec.block(2) is not None
                shapes["hash ovfl new page"] += rec.main_data[2] == 0
            elif name == "SPLIT_ALLOCATE_PAGE":
                flags = rec.main_data[8]
                shapes["hash split masks"] += bool(flags & 1)
                shapes["hash split splitpoint"] += bool(flags & 2)
            elif name == "SQUEEZE_PAGE":
                _p, _n, ntups, prim_same, prev_same = struct.unpack_from("<IIH??", rec.main_data)
                shapes["hash squeeze with tuples"] += ntups > 0
                shapes["hash squeeze without tuples"] += ntups == 0
                shapes["hash squeeze prev is write page"] += prev_same
                shapes["hash squeeze prev elsewhere"] += rec.block(3) is not None
                shapes["hash squeeze write page is overflow"] += not prim_same
                shapes["hash squeeze meta"] += rec.block(6) is not None
            elif name == "MOVE_PAGE_CONTENTS":
                shapes["hash move to overflow page"] += rec.main_data[2] == 0
            elif name == "DELETE":
                shapes["hash delete on overflow page"] += rec.main_data[1] == 0
        elif rec.rmid == RM_BRIN_ID:
            if name == "REVMAP_EXTEND":
                shapes["brin second revmap page"] += struct.unpack_from("<I", rec.main_data)[0] >= 2
            elif name.startswith("INSERT"):
                heap_blk, pages_per_range, _off = struct.unpack_from("<IIH", rec.main_data)
                shapes["brin entry on second revmap page"] += heap_blk // pages_per_range >= brin.REVMAP_PAGE_MAXITEMS
    for shape in (
        "hash init fork", "hash ovfl recycled page", "hash ovfl new page", "hash split masks", "hash split splitpoint",
        "hash squeeze with tuples", "hash squeeze without tuples", "hash squeeze prev is write page",
        "hash squeeze prev elsewhere", "hash squeeze write page is overflow", "hash squeeze meta",
        "hash move to overflow page", "hash delete on overflow page",
        "brin second revmap page", "brin entry on second revmap page",
    ):
        assert shapes[shape] > 0, f"workload never made: {shape} ({dict(shapes)})"


# --- unit tests ---------------------------------------------------------------------


def test_masks_registered() -> None:
    assert mask_for_rmgr(RM_HASH_ID) is hash_mask
    assert mask_for_rmgr(RM_BRIN_ID) is brin_mask


def test_hash_mask_hides_dead_hints_and_unused_pages() -> None:
    a = bytearray(BLCKSZ)
    hashidx.hash_initbuf(a, 3, 3, hashidx.LH_BUCKET_PAGE)
    assert page_add_item_extended(a, bytes(16), 0, 0) == 1
    b = bytearray(a)
    special = BLCKSZ - hashidx.SIZE_OF_HASH_PAGE_OPAQUE
    struct.pack_into("<H", b, special + 12, hashidx.LH_BUCKET_PAGE | hashidx.LH_PAGE_HAS_DEAD_TUPLES)
    raw = struct.unpack_from("<I", b, 24)[0]
    struct.pack_into("<I", b, 24, raw | (3 << 15))  # LP_DEAD
    hash_mask(a, 1)
    hash_mask(b, 1)
    assert a == b
    # An unused (freed overflow) page: only the header survives masking.
    c = bytearray(BLCKSZ)
    hashidx.hash_initbuf(c, 0, 0, hashidx.LH_UNUSED_PAGE)
    c[100:110] = b"x" * 10
    hash_mask(c, 5)
    assert c[24:] == bytes(BLCKSZ - 24)


def test_brin_mask_hides_evacuate_flag() -> None:
    a = bytearray(BLCKSZ)
    brin.brin_page_init(a, brin.BRIN_PAGETYPE_REGULAR)
    b = bytearray(a)
    struct.pack_into("<H", b, BLCKSZ - 4, brin.BRIN_EVACUATE_PAGE)
    b[1000] = 7  # free space
    brin_mask(a, 2)
    brin_mask(b, 2)
    assert a == b


def test_hash_metapage_layout() -> None:
    page = bytearray(BLCKSZ)
    hashidx.hash_init_metabuffer(page, 2260.0, 450, 307)
    meta = hashidx.hash_read_meta(page)
    assert (meta.magic, meta.version, meta.ntuples, meta.ffactor) == (0x6440640, 4, 0.0, 307)
    assert (meta.bsize, meta.bmsize, meta.bmshift) == (8152, 4096, 15)
    assert (meta.maxbucket, meta.highmask, meta.lowmask, meta.ovflpoint) == (7, 15, 7, 3)
    assert meta.spares[3] == 1 and meta.procid == 450 and meta.nmaps == 0
    assert struct.unpack_from("<H", page, 12)[0] == 24 + hashidx.SIZE_OF_HASH_META_PAGE_DATA == 4568
    assert [hashidx.hash_get_totalbuckets(hashidx.hash_spareindex(n)) for n in (2, 3, 1000, 1100, 5000)] == [
        2, 4, 1024, 1280, 5120,
    ]


def test_brin_revmap_itemptr() -> None:
    page = bytearray(BLCKSZ)
    brin.brin_page_init(page, brin.BRIN_PAGETYPE_REVMAP)
    brin.brin_set_heap_block_itemptr(page, 4, 4 * 1361 + 3, 0x12345, 9)
    assert struct.unpack_from("<HHH", page, 24 + 6) == (1, 0x2345, 9)
    brin.brin_set_heap_block_itemptr(page, 4, 4 * 1361, 0xFFFFFFFF, 0)
    assert struct.unpack_from("<HHH", page, 24 + 6) == (0xFFFF, 0xFFFF, 0)


def test_hash_split_page_needs_its_image(records: list[DecodedRecord]) -> None:
    rec = next(r for r in records if r.rmid == RM_HASH_ID and record_type_name(r.rmid, r.info) == "SPLIT_PAGE")
    with pytest.raises(RedoError):  # BadRecordError here; the engine reports it as RedoFailedError
        hashidx.hash_redo(rec, rec.blocks[0], bytearray(BLCKSZ))


def test_unknown_info_is_unsupported(records: list[DecodedRecord]) -> None:
    for rmid, redo, info in (
        (RM_HASH_ID, hashidx.hash_redo, 0xF0),
        (RM_BRIN_ID, brin.brin_redo, 0x60),
        (RM_BRIN_ID, brin.brin_redo, 0x30 | XLOG_BRIN_INIT_PAGE),
    ):
        assert info & XLR_RMGR_INFO_MASK == info
        assert_unknown_info_unsupported(records, rmid, info, redo)
