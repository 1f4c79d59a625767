"""Redo of Heap and Heap2 records against wal_consistency_checking images.

A real primary with `wal_consistency_checking = all` runs workloads that write
every Heap / Heap2 record type Postgres 15 can produce:

- pgbench (-i, then 2 clients x 300 transactions): INSERT, MULTI_INSERT
  (COPY), HOT and non-HOT UPDATE, PRUNE, VACUUM, VISIBLE;
- plain inserts (INSERT+INIT on new pages), COPY (MULTI_INSERT+INIT),
  updates that move rows to other pages and to brand-new pages (UPDATE+INIT),
  deletes, moves between partitions (DELETE with IS_PARTITION_MOVE);
- FOR SHARE / FOR UPDATE from two concurrent transactions (multixact LOCK),
  FOR KEY SHARE over an in-progress non-key update (LOCK_UPDATED), FOR SHARE
  on an all-frozen page (LOCK clearing the VM all-frozen bit);
- INSERT ... ON CONFLICT DO NOTHING / DO UPDATE (speculative insertion and
  HEAP_CONFIRM), and two sessions racing on one key through a slow unique
  index expression, so one of them super-deletes its speculative tuple;
- VACUUM, VACUUM FREEZE (FREEZE_PAGE), TOAST values, VACUUM FULL / CLUSTER;
- VACUUM's pg_class update (INPLACE);
- after a restart with wal_level = logical: DDL (NEW_CID), TRUNCATE (Heap
  TRUNCATE), REPLICA IDENTITY FULL updates, and VACUUM FULL of a user catalog
  table while a logical slot exists (REWRITE).

HOT_UPDATE+INIT cannot happen (a HOT update stays on its page, which is never
new), so it has no corpus entry; its redo shares UPDATE+INIT's code.

The visibility map is checked separately: a VM page is PageInit'ed with
pd_lower = 24 and pd_upper = 8192, so the whole map lies in what heap_mask
treats as free space and zeroes; the wal_consistency_checking comparison is
blind to it. test_implied_vm_clear_matches_postgres replays the VM page from a
VISIBLE record's image through later INSERT / UPDATE / DELETE / LOCK records
and compares it with the page Postgres holds (pageinspect).
"""

from __future__ import annotations

import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PgFactory

from pgformat.constants import BLCKSZ, VISIBILITYMAP_FORKNUM
from pgformat.lsn import format_lsn
from pgformat.page import page_get_lsn, page_init, page_set_lsn
from pgformat.rmgr import (
    RM_HEAP2_ID,
    RM_HEAP_ID,
    XLOG_HEAP2_NEW_CID,
    XLOG_HEAP2_REWRITE,
    XLOG_HEAP_INSERT,
    XLOG_HEAP_LOCK,
    XLOG_HEAP_TRUNCATE,
    XLOG_HEAP_UPDATE,
    record_type_name,
    rmgr_name,
)
from pgformat.xlogrecord import BKPBLOCK_HAS_DATA, DecodedBlock, DecodedRecord, RelFileNode, XLogRecordHeader
from pgredo.engine import BufferTag, apply_block, apply_record, find_block, implied_tags
from pgredo.errors import RedoFailedError
from pgredo.heap import (
    HEAPBLOCKS_PER_PAGE,
    VISIBILITYMAP_ALL_FROZEN,
    VISIBILITYMAP_ALL_VISIBLE,
    heap_implied_tags,
    visibilitymap_clear,
    visibilitymap_set,
)
from pgredo.verify import verify_records
from zctl.postgres import PostgresNode
from zctl.waldump import iter_file_records

# Every record type the corpus must contain and verify (a block checked against its image).
CHECKED_TYPES = [
    "Heap/INSERT", "Heap/INSERT+INIT", "Heap/DELETE", "Heap/UPDATE", "Heap/UPDATE+INIT",
    "Heap/HOT_UPDATE", "Heap/HEAP_CONFIRM", "Heap/LOCK", "Heap/INPLACE",
    "Heap2/PRUNE", "Heap2/VACUUM", "Heap2/FREEZE_PAGE", "Heap2/VISIBLE", "Heap2/MULTI_INSERT",
    "Heap2/MULTI_INSERT+INIT", "Heap2/LOCK_UPDATED",
]
# Record types without a page effect (no block references): present and harmless.
NO_PAGE_TYPES = ["Heap/TRUNCATE", "Heap2/NEW_CID", "Heap2/REWRITE"]

REPLICA_WORKLOAD = [
    # Plain inserts onto new pages, then updates: HOT (same page, no indexed column),
    # non-HOT (indexed column), across pages (pages are full at fillfactor 100).
    "CREATE TABLE h (id int PRIMARY KEY, k int, v text) WITH (autovacuum_enabled = off)",
    "CREATE INDEX h_k ON h (k)",
    "INSERT INTO h SELECT i, i, repeat('v', 40) FROM generate_series(1, 2000) i",
    "UPDATE h SET v = repeat('w', 40) WHERE id % 10 = 0",
    "UPDATE h SET k = -k WHERE id % 15 = 0",
    "UPDATE h SET v = v || 'tail' WHERE id % 7 = 0",
    # Prefix/suffix compression: change one byte in the middle of a long value.
    "UPDATE h SET v = repeat('v', 20) || 'X' || repeat('v', 19) WHERE id % 11 = 0",
    "DELETE FROM h WHERE id % 13 = 0",
    "VACUUM h",
    # After VACUUM the pages are all-visible: DML now clears VM bits (implied redo).
    "INSERT INTO h SELECT i, i, 'after vacuum' FROM generate_series(2001, 2300) i",
    "UPDATE h SET v = 'moved' || repeat('m', 200) WHERE id % 9 = 1",
    "DELETE FROM h WHERE id % 17 = 0",
    "VACUUM FREEZE h",
    "SELECT * FROM h WHERE id < 50 FOR SHARE",  # all-frozen pages: LOCK clears ALL_FROZEN
    "UPDATE h SET v = 'frozen-update' WHERE id % 31 = 0",
    # COPY: MULTI_INSERT (+INIT for new pages).
    "CREATE TABLE c (a int, b text)",
    "COPY c (a) FROM PROGRAM 'seq 1 3000'",
    "INSERT INTO c SELECT i, md5(i::text) FROM generate_series(1, 500) i",
    "VACUUM c",
    "COPY c (a) FROM PROGRAM 'seq 1 200'",  # into all-visible pages: MULTI_INSERT clearing VM
    # COPY FREEZE into a table created in the same transaction: XLH_INSERT_ALL_FROZEN_SET.
    "BEGIN; CREATE TABLE cf (a int); COPY cf FROM PROGRAM 'seq 1 2000' WITH (FREEZE); COMMIT",
    # Partitions: an update moving a row to another partition.
    "CREATE TABLE pt (k int, v text) PARTITION BY RANGE (k)",
    "CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (0) TO (1000)",
    "CREATE TABLE pt2 PARTITION OF pt FOR VALUES FROM (1000) TO (2000)",
    "INSERT INTO pt SELECT i, 'p' FROM generate_series(0, 1999, 3) i",
    "UPDATE pt SET k = k + 1000 WHERE k < 100",
    # ON CONFLICT: speculative insert + confirm; DO UPDATE locks then updates.
    "CREATE TABLE u (k int PRIMARY KEY, n int)",
    "INSERT INTO u SELECT i, 0 FROM generate_series(1, 100) i ON CONFLICT DO NOTHING",
    "INSERT INTO u SELECT i, 1 FROM generate_series(50, 150) i ON CONFLICT (k) DO UPDATE SET n = u.n + 1",
    "INSERT INTO u VALUES (1, 5) ON CONFLICT (k) DO NOTHING",
    # TOAST.
    "CREATE TABLE toasty (id int, doc text)",
    "ALTER TABLE toasty ALTER COLUMN doc SET STORAGE EXTERNAL",
    "INSERT INTO toasty SELECT i, repeat(md5(i::text), 300) FROM generate_series(1, 40) i",
    "UPDATE toasty SET doc = doc || 'x' WHERE id % 3 = 0",
    "DELETE FROM toasty WHERE id % 4 = 0",
    "VACUUM toasty",
]

# After the concurrent sessions: rewrites (log_newpage) and the catalog updates around them.
FINAL_WORKLOAD = [
    "VACUUM FULL c",
    "CLUSTER h USING h_pkey",
    "VACUUM",
    "VACUUM FREEZE pgbench_tellers",
]

LOGICAL_WORKLOAD = [
    "SELECT pg_create_logical_replication_slot('heap_redo_slot', 'test_decoding')",
    "CREATE TABLE rif (id int PRIMARY KEY, v text)",
    "ALTER TABLE rif REPLICA IDENTITY FULL",
    "INSERT INTO rif SELECT i, 'r' || i FROM generate_series(1, 300) i",
    "UPDATE rif SET v = v || '!' WHERE id % 3 = 0",
    "DELETE FROM rif WHERE id % 5 = 0",
    "UPDATE h SET k = k + 1 WHERE id % 50 = 0",  # old key logged with the update
    "TRUNCATE c",
    "CREATE TABLE uc (id int PRIMARY KEY, v text) WITH (user_catalog_table = true)",
    "INSERT INTO uc SELECT i, 'c' FROM generate_series(1, 200) i",
    "UPDATE uc SET v = 'cc' WHERE id % 2 = 0",
    "VACUUM FULL uc",  # logical rewrite mappings: Heap2/REWRITE
    "SELECT pg_drop_replication_slot('heap_redo_slot')",
]


def _concurrent_locks(node: PostgresNode) -> None:
    """Two transactions share-lock the same rows (multixacts), then key-share over an update."""
    a = node.connect()
    b = node.connect()
    try:
        a.execute("BEGIN")
        b.execute("BEGIN")
        a.execute("SELECT * FROM u WHERE k <= 40 FOR SHARE")
        b.execute("SELECT * FROM u WHERE k <= 40 FOR SHARE")
        b.execute("SELECT * FROM u WHERE k BETWEEN 41 AND 60 FOR UPDATE")
        a.execute("COMMIT")
        b.execute("COMMIT")
        # LOCK_UPDATED: a non-key update in progress, another session key-share locks the row
        # and follows the update chain to lock the new version too.
        a.execute("BEGIN")
        a.execute("UPDATE u SET n = n + 100 WHERE k BETWEEN 70 AND 80")
        b.execute("BEGIN")
        b.execute("SELECT * FROM u WHERE k BETWEEN 70 AND 80 FOR KEY SHARE")
        a.execute("COMMIT")
        b.execute("COMMIT")
    finally:
        a.close()
        b.close()


def _speculative_race(node: PostgresNode, keys: Iterable[int]) -> None:
    """Two sessions insert the same key ON CONFLICT DO NOTHING at once.

    The unique index expression sleeps, so both pass the pre-check before either
    inserts its index entry; the loser finds the winner's entry and super-deletes
    its speculative heap tuple (Heap/DELETE with XLH_DELETE_IS_SUPER).
    """
    node.execute(
        """
        CREATE FUNCTION slow_id(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
          $$ BEGIN PERFORM pg_sleep(0.15); RETURN $1; END $$;
        CREATE TABLE spec (k int, note text);
        CREATE UNIQUE INDEX spec_k ON spec (slow_id(k));
        """
    )
    conns = [node.connect(), node.connect()]
    try:
        for key in keys:
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def insert(i: int) -> None:
                try:
                    barrier.wait()
                    conns[i].execute(
                        "INSERT INTO spec VALUES (%s, %s) ON CONFLICT DO NOTHING", (key, f"s{i}")
                    )
                except BaseException as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=insert, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors, errors
    finally:
        for c in conns:
            c.close()


def run_heap_workload(node: PostgresNode) -> None:
    """Everything but the wal_level=logical part (needs a restart)."""
    node.pgbench("-i", "-s", "1", "-q")
    node.pgbench("-c", "2", "-t", "300", "-n")
    for stmt in REPLICA_WORKLOAD:
        node.execute(stmt)
    _concurrent_locks(node)
    _speculative_race(node, range(1, 4))
    for stmt in FINAL_WORKLOAD:
        node.execute(stmt)


def run_logical_workload(node: PostgresNode) -> None:
    node.stop()
    node.configure({"wal_level": "logical"})
    node.start()
    for stmt in LOGICAL_WORKLOAD:
        node.execute(stmt)


@dataclass
class HeapCorpus:
    waldir: Path
    start_lsn: int
    records: list[DecodedRecord]


def _decode(waldir: Path, start_lsn: int) -> list[DecodedRecord]:
    return [r.decode() for r in iter_file_records([waldir]) if r.lsn >= start_lsn]


@pytest.fixture(scope="module")
def heap_corpus(pg_session_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory) -> HeapCorpus:
    node = pg_session_factory(wal_consistency_checking="all", max_wal_size="1GB")
    if not node.sql("SELECT 1 FROM pg_available_extensions WHERE name = 'pageinspect'"):
        pytest.skip("contrib (pageinspect, test_decoding) not installed")
    start = node.current_lsn()
    run_heap_workload(node)
    run_logical_workload(node)
    node.stop()
    dest = tmp_path_factory.mktemp("heap-wal") / "pg_wal"
    shutil.copytree(node.waldir, dest, ignore=shutil.ignore_patterns("archive_status"))
    return HeapCorpus(dest, start, _decode(dest, start))


def _type_name(rec: DecodedRecord) -> str:
    return f"{rmgr_name(rec.rmid)}/{record_type_name(rec.rmid, rec.info)}"


def _checkable_types(records: Iterable[DecodedRecord]) -> dict[str, int]:
    """How many blocks per record type verify_records compares with an image.

    Mirrors its rule: a block with a verification-only image whose page is
    known from an earlier record, or that the record initializes.
    """
    seen: set[BufferTag] = set()
    counts: dict[str, int] = {}
    for rec in records:
        for b in rec.blocks:
            tag = BufferTag(b.rnode, b.forknum, b.blkno)
            if b.image is not None and not b.image.apply and (tag in seen or b.will_init):
                if rec.rmid in (RM_HEAP_ID, RM_HEAP2_ID):
                    name = _type_name(rec)
                    counts[name] = counts.get(name, 0) + 1
            if b.image is not None or b.will_init:
                seen.add(tag)
    return counts


def test_heap_redo_matches_postgres(heap_corpus: HeapCorpus) -> None:
    report = verify_records(heap_corpus.records)
    for rmgr in ("Heap", "Heap2"):
        t = report.per_rmgr[rmgr]
        assert t.unsupported == 0, report.unsupported_types
        assert t.mismatched == 0, [str(m) for m in report.mismatches if m.rmgr == rmgr][:20]
        assert t.matched == t.blocks_checked > 0
    counts = _checkable_types(heap_corpus.records)
    missing = [name for name in CHECKED_TYPES if not counts.get(name)]
    assert not missing, f"not exercised: {missing}; have {sorted(counts)}"


def test_workload_exercises_special_cases(heap_corpus: HeapCorpus) -> None:
    """Flags whose redo paths differ: super-delete, partition move, prefix/suffix, VM clears."""
    names = {_type_name(r) for r in heap_corpus.records}
    for name in NO_PAGE_TYPES:
        assert name in names, f"{name} not in the corpus"
    found = {"super": 0, "partition_move": 0, "prefix": 0, "suffix": 0, "multixact_lock": 0,
             "lock_frozen_cleared": 0, "vm_clear": 0, "update_two_pages": 0, "old_tuple_logged": 0,
             "copy_freeze": 0}
    for r in heap_corpus.records:
        op = r.info & 0x70
        md = r.main_data
        if r.rmid == RM_HEAP_ID and op == 0x10:  # DELETE
            found["super"] += bool(md[7] & 0x08)
            found["partition_move"] += bool(md[7] & 0x10)
        if r.rmid == RM_HEAP_ID and op in (0x20, 0x40):  # UPDATE, HOT_UPDATE
            found["prefix"] += bool(md[7] & 0x20)
            found["suffix"] += bool(md[7] & 0x40)
            found["update_two_pages"] += r.block(1) is not None
            found["old_tuple_logged"] += bool(md[7] & 0x0C)
        if r.rmid == RM_HEAP_ID and op == 0x60:  # LOCK
            found["multixact_lock"] += bool(md[6] & 0x01)
            found["lock_frozen_cleared"] += bool(md[7] & 0x01)
        if r.rmid == RM_HEAP2_ID and op == 0x50:  # MULTI_INSERT
            found["copy_freeze"] += bool(md[0] & 0x20)
        found["vm_clear"] += bool(heap_implied_tags(r))
    assert all(found.values()), found


def test_no_page_records_are_clean_no_ops(heap_corpus: HeapCorpus) -> None:
    """TRUNCATE, NEW_CID and REWRITE register no block and imply no page."""
    for r in heap_corpus.records:
        if _type_name(r) in NO_PAGE_TYPES:
            assert r.blocks == []
            assert implied_tags(r) == []


# --- the implied visibility-map clears, against Postgres's own VM page ----------------

VM_WORKLOAD = [
    "CREATE EXTENSION pageinspect",
    "CREATE TABLE t (id int PRIMARY KEY, v text) WITH (autovacuum_enabled = off, fillfactor = 90)",
    "INSERT INTO t SELECT i, repeat('x', 100) FROM generate_series(1, 3000) i",
    "VACUUM FREEZE t",  # every page all-visible + all-frozen: VISIBLE records with VM images
    "INSERT INTO t VALUES (100000, 'new')",  # INSERT into a page with room: clears its bits
    "UPDATE t SET v = 'same page' WHERE id = 300",  # HOT update (fillfactor room)
    "DELETE FROM t WHERE id = 1000",
    "SELECT * FROM t WHERE id = 2000 FOR SHARE",  # LOCK: clears only all-frozen
    "COPY t (id) FROM PROGRAM 'seq 200000 200010'",  # MULTI_INSERT
    "VACUUM FREEZE t",
    # Too big for the old page's fillfactor reserve, fits the last page: clears old and new bits.
    "UPDATE t SET v = (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 40) i)"
    " WHERE id = 500",
]


def _vm_tag_records(records: list[DecodedRecord], tag: BufferTag) -> Iterator[DecodedRecord]:
    for r in records:
        if find_block(r, tag) is not None or tag in implied_tags(r):
            yield r


def test_implied_vm_clear_matches_postgres(pg_factory: PgFactory, tmp_path: Path) -> None:
    node = pg_factory(wal_consistency_checking="all")
    if not node.sql("SELECT 1 FROM pg_available_extensions WHERE name = 'pageinspect'"):
        pytest.skip("pageinspect not installed")
    start = node.current_lsn()
    for stmt in VM_WORKLOAD:
        node.execute(stmt)
    relfile = node.sql("SELECT pg_relation_filenode('t')")[0][0]
    pg_vm = bytes(node.sql("SELECT get_raw_page('t', 'vm', 0)")[0][0])
    heap_pages = node.sql("SELECT pg_relation_size('t') / 8192")[0][0]
    node.stop()
    records = _decode(node.waldir, start)

    tag = next(
        BufferTag(b.rnode, b.forknum, b.blkno)
        for r in records for b in r.blocks
        if b.rnode.rel == relfile and b.forknum == VISIBILITYMAP_FORKNUM
    )
    assert heap_pages < HEAPBLOCKS_PER_PAGE and tag.blkno == 0
    stream = list(_vm_tag_records(records, tag))
    first = stream[0]
    block = find_block(first, tag)
    assert block is not None and block.image is not None
    base = bytearray(block.image.page())  # the VM page right after the first VISIBLE record
    later = stream[1:]
    implied = [r for r in later if find_block(r, tag) is None]
    kinds = {_type_name(r) for r in implied}
    assert {"Heap/INSERT", "Heap/UPDATE", "Heap/HOT_UPDATE", "Heap/DELETE", "Heap/LOCK",
            "Heap2/MULTI_INSERT"} <= kinds, kinds

    page: bytearray = base
    before_clears = None
    for r in later:
        if find_block(r, tag) is None and before_clears is None:
            before_clears = bytes(page)
        page = apply_record(tag, page, r)
    assert before_clears is not None
    # The clears really changed the map, and our map equals Postgres's byte for byte.
    assert before_clears[24:] != bytes(page[24:])
    assert bytes(page[24:]) == pg_vm[24:]
    # visibilitymap_clear does not bump the LSN: the page keeps the LSN of the last VISIBLE
    # record that set a bit on it, as on the primary. That LSN is the engine's rec.end_lsn
    # (the end of the record's bytes), while Postgres stores the MAXALIGNed end (XLogInsert's
    # EndPos on the primary; EndRecPtr = NextRecPtr during recovery), so the two can differ
    # by up to 7 bytes until the reader reports aligned end LSNs. Everything else in the
    # header (flags, bounds, version, pd_checksum = 0 without data checksums) is identical.
    last_visible = max(r.end_lsn for r in later if find_block(r, tag) is not None)
    assert page_get_lsn(page) == last_visible, format_lsn(page_get_lsn(page))
    assert page_get_lsn(bytearray(pg_vm)) == (last_visible + 7) & ~7
    assert bytes(page[8:24]) == pg_vm[8:24], (bytes(page[:24]).hex(), pg_vm[:24].hex())
    assert len(page) == BLCKSZ


# --- unit checks on synthetic records (no server) -------------------------------------


def _record(rmid: int, info: int, main: bytes, blocks: list[tuple[int, int, int, bytes]]) -> DecodedRecord:
    """A decoded record with (block_id, forknum, blkno, data) block references."""
    rnode = RelFileNode(1663, 5, 16384)
    decoded = [
        DecodedBlock(bid, rnode, fork, blk, BKPBLOCK_HAS_DATA if data else 0, None, data)
        for bid, fork, blk, data in blocks
    ]
    header = XLogRecordHeader(0, 1000, 0, info, rmid, 0)
    return DecodedRecord(0x1000000, 0x1000040, header, decoded, main)


def test_vm_bit_layout_and_blocks() -> None:
    """Two bits per heap block after the 24-byte header; 32672 heap blocks per VM page."""
    assert HEAPBLOCKS_PER_PAGE == (BLCKSZ - 24) * 4 == 32672
    page = bytearray(BLCKSZ)
    assert visibilitymap_set(page, 5, VISIBILITYMAP_ALL_VISIBLE | VISIBILITYMAP_ALL_FROZEN)
    assert page[24 + 1] == 0b11 << 2
    assert not visibilitymap_set(page, 5, 3)  # unchanged: Postgres would not set the LSN
    assert visibilitymap_set(page, 5, VISIBILITYMAP_ALL_VISIBLE)  # differs from 3: LSN set, no change
    assert page[25] == 0b1100
    assert visibilitymap_clear(page, 5, VISIBILITYMAP_ALL_FROZEN) and page[25] == 0b0100
    assert not visibilitymap_clear(page, 5, VISIBILITYMAP_ALL_FROZEN)
    last = HEAPBLOCKS_PER_PAGE - 1
    visibilitymap_set(page, last, 3)
    assert page[BLCKSZ - 1] == 0b11 << 6

    # INSERT at heap block 32672 with ALL_VISIBLE_CLEARED: VM block 1, first map byte.
    insert = _record(RM_HEAP_ID, XLOG_HEAP_INSERT, struct.pack("<HB", 1, 0x01),
                     [(0, 0, HEAPBLOCKS_PER_PAGE, b"\x00" * 8)])
    (tag,) = implied_tags(insert)
    assert (tag.forknum, tag.blkno) == (VISIBILITYMAP_FORKNUM, 1)
    vm = bytearray(BLCKSZ)
    page_init(vm, 0)
    page_set_lsn(vm, 0x500)
    vm[24] = 0xFF
    out = apply_record(tag, vm, insert)
    assert out[24] == 0xFC and page_get_lsn(out) == 0x500  # bits cleared, LSN untouched

    # UPDATE across pages clearing both: two tags when the heap blocks map to different VM pages.
    upd = _record(RM_HEAP_ID, XLOG_HEAP_UPDATE, struct.pack("<IHBBIH", 7, 1, 0, 0x03, 0, 1),
                  [(0, 0, HEAPBLOCKS_PER_PAGE + 3, b""), (1, 0, 2, b"")])
    assert [t.blkno for t in implied_tags(upd)] == [0, 1]
    # LOCK clears only the all-frozen bit.
    lock = _record(RM_HEAP_ID, XLOG_HEAP_LOCK, struct.pack("<IHBB", 7, 1, 0, 0x01), [(0, 0, 1, b"")])
    vm[24] = 0xFF
    apply_record(implied_tags(lock)[0], vm, lock)
    assert vm[24] == 0xFF & ~(0b10 << 2)
    # No flag, no implied page.
    assert implied_tags(_record(RM_HEAP_ID, XLOG_HEAP_INSERT, struct.pack("<HB", 1, 0), [(0, 0, 1, b"x" * 8)])) == []


def test_prefix_suffix_across_pages_is_refused() -> None:
    """log_heap_update compresses only when old and new tuple share a page."""
    upd = _record(RM_HEAP_ID, XLOG_HEAP_UPDATE, struct.pack("<IHBBIH", 7, 1, 0, 0x20, 0, 1),
                  [(0, 0, 3, struct.pack("<H", 4) + struct.pack("<HHB", 2, 0, 24) + b"\x00abc"), (1, 0, 2, b"")])
    page = bytearray(BLCKSZ)
    page_init(page, 0)
    with pytest.raises(RedoFailedError, match="another page"):
        apply_block(upd.blocks[0], page, upd)


def test_records_without_page_effect_leave_pages_alone() -> None:
    page = bytearray(BLCKSZ)
    page_init(page, 0)
    page_set_lsn(page, 0x10)
    for rmid, info in ((RM_HEAP_ID, XLOG_HEAP_TRUNCATE), (RM_HEAP2_ID, XLOG_HEAP2_NEW_CID),
                       (RM_HEAP2_ID, XLOG_HEAP2_REWRITE)):
        rec = _record(rmid, info, b"\x00" * 16, [(0, 0, 0, b"")])
        before = bytes(page)
        assert bytes(apply_block(rec.blocks[0], page, rec)) == before
        assert implied_tags(rec) == []
