"""Redo of XLOG, Sequence and Generic records against wal_consistency_checking images.

A real primary with `wal_consistency_checking = all` runs workloads that write
every page-touching record type of the three rmgrs:

- XLOG_FPI (index builds log their pages with log_newpage), XLOG_FPI_FOR_HINT
  (wal_log_hints = on: hint bits set after a checkpoint), plus the XLOG
  records without block references (checkpoints, NEXTOID, SWITCH,
  RESTORE_POINT, BACKUP_END, FPW_CHANGE, PARAMETER_CHANGE);
- Sequence/LOG: CREATE SEQUENCE, nextval past the 32 pre-logged values and
  past CACHE, setval, ALTER SEQUENCE, unlogged sequences (their init fork),
  SET LOGGED, serial columns;
- Generic: the bloom contrib index (full-image and delta records: build,
  inserts, VACUUM).

pgredo.verify replays the WAL and compares our pages with Postgres's images
after masking. XLOG pages never carry verification images (the XLOG rmgr has
no rm_mask), so XLOG is checked here directly: every FPI block's restored page
is its image, and an XLOG_FPI_FOR_HINT without an image (full_page_writes off)
leaves the page and its LSN alone.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import time
from dataclasses import dataclass

import pytest
from conftest import PgFactory

from pgformat.bufmask import seq_mask
from pgformat.constants import BLCKSZ, INIT_FORKNUM, maxalign
from pgformat.page import page_get_lsn, page_set_lsn
from pgformat.rmgr import (
    RM_GENERIC_ID,
    RM_SEQ_ID,
    RM_XLOG_ID,
    XLOG_FPI,
    XLOG_FPI_FOR_HINT,
    XLOG_SEQ_LOG,
    record_type_name,
)
from pgformat.xlogrecord import DecodedRecord, RelFileNode
from pgredo.engine import BufferTag, apply_block, apply_record, implied_tags
from pgredo.errors import RedoFailedError
from pgredo.verify import verify_records
from pgredo.xlog_seq_generic import SEQ_MAGIC
from zctl.postgres import PostgresNode
from zctl.waldump import iter_file_records

SEQUENCE_WORKLOAD = [
    "CREATE SEQUENCE s_plain",
    "SELECT nextval('s_plain') FROM generate_series(1, 100)",  # past the 32 pre-logged values, 3 times
    "CREATE SEQUENCE s_cached CACHE 20 INCREMENT BY 3",
    "SELECT nextval('s_cached') FROM generate_series(1, 70)",
    "SELECT setval('s_plain', 5000)",
    "SELECT setval('s_cached', 42, false)",
    "ALTER SEQUENCE s_plain INCREMENT BY 7 MAXVALUE 1000000",
    "ALTER SEQUENCE s_plain RESTART WITH 10",
    "SELECT nextval('s_plain')",
    "ALTER SEQUENCE s_cached AS smallint",
    "CREATE UNLOGGED SEQUENCE s_unlogged",
    "SELECT nextval('s_unlogged')",
    "ALTER SEQUENCE s_unlogged SET LOGGED",
    "SELECT nextval('s_unlogged') FROM generate_series(1, 40)",
    "CREATE TABLE with_serial (id serial PRIMARY KEY, v text)",
    "INSERT INTO with_serial (v) SELECT 'x' FROM generate_series(1, 200)",
    "CREATE SEQUENCE s_desc INCREMENT BY -1 MINVALUE -100 MAXVALUE 0 START 0 CYCLE",
    "SELECT nextval('s_desc') FROM generate_series(1, 150)",  # wraps around (CYCLE)
    "DROP SEQUENCE s_cached",
]

BLOOM_WORKLOAD = [
    "CREATE EXTENSION bloom",
    "CREATE TABLE tb (a int, b int, c text)",
    "INSERT INTO tb SELECT i, i % 97, md5(i::text) FROM generate_series(1, 3000) i",
    "CREATE INDEX tb_bloom ON tb USING bloom (a, b, c) WITH (length = 80, col1 = 2, col2 = 2, col3 = 4)",
    "INSERT INTO tb SELECT i, i % 13, 'later' FROM generate_series(3001, 6000) i",
    "DELETE FROM tb WHERE a % 4 = 0",
    "VACUUM tb",
    "INSERT INTO tb SELECT i, 1, 'refill' FROM generate_series(6001, 7000) i",
    "CREATE TABLE tb_empty (a int)",
    "CREATE INDEX tb_empty_bloom ON tb_empty USING bloom (a)",
    "INSERT INTO tb_empty VALUES (1), (2), (3)",
]

XLOG_WORKLOAD = [
    "CREATE TABLE hints (i int, t text)",
    "INSERT INTO hints SELECT i, repeat('h', 50) FROM generate_series(1, 5000) i",
    "CREATE INDEX hints_i ON hints (i)",  # btree build: XLOG_FPI for its pages
    "CHECKPOINT",
    "SELECT count(*) FROM hints",  # hint bits after a checkpoint: XLOG_FPI_FOR_HINT with images
    "SELECT pg_create_restore_point('redo-test')",
    "SELECT pg_switch_wal()",
]

# Hint bits set after a checkpoint while full_page_writes is off: XLOG_FPI_FOR_HINT
# without an image.
NO_FPW_WORKLOAD = [
    "CREATE TABLE hints_nofpw (i int)",
    "INSERT INTO hints_nofpw SELECT generate_series(1, 2000)",
    "CHECKPOINT",
    "SELECT count(*) FROM hints_nofpw",
]


def _bloom_available(node: PostgresNode) -> bool:
    return bool(node.sql("SELECT 1 FROM pg_available_extensions WHERE name = 'bloom'"))


def _run(node: PostgresNode, statements: list[str]) -> None:
    for stmt in statements:
        node.execute(stmt)


def _set_full_page_writes(node: PostgresNode, on: bool) -> None:
    """Reload full_page_writes; the checkpointer logs XLOG_FPW_CHANGE before the next checkpoint."""
    node.configure({"full_page_writes": on})
    node.sql("SELECT pg_reload_conf()")
    time.sleep(0.5)
    node.execute("CHECKPOINT")


@dataclass
class Corpus:
    records: list[DecodedRecord]
    bloom: bool


@pytest.fixture(scope="module")
def corpus(pg_session_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    node = pg_session_factory(wal_consistency_checking="all", wal_log_hints="on", autovacuum="off")
    bloom = _bloom_available(node)
    _run(node, SEQUENCE_WORKLOAD)
    if bloom:
        _run(node, BLOOM_WORKLOAD)
    _run(node, XLOG_WORKLOAD)
    with node.connect() as conn:  # a non-exclusive backup lives in one session: BACKUP_END
        conn.execute("SELECT pg_backup_start('redo-test', true)")
        conn.execute("SELECT pg_backup_stop(false)")
    _set_full_page_writes(node, False)
    _run(node, NO_FPW_WORKLOAD)
    _set_full_page_writes(node, True)
    node.stop()
    node.configure({"max_connections": 90})  # PARAMETER_CHANGE at the next start
    node.start()
    node.execute("SELECT nextval('s_plain')")
    node.stop()
    dest = tmp_path_factory.mktemp("xlog-seq-generic") / "pg_wal"
    shutil.copytree(node.waldir, dest, ignore=shutil.ignore_patterns("archive_status"))
    return Corpus([raw.decode() for raw in iter_file_records([dest])], bloom)


def _info(rec: DecodedRecord) -> int:
    return rec.info & 0xF0


def test_verify_sequence_and_generic(corpus: Corpus) -> None:
    report = verify_records(corpus.records)
    for name in ("XLOG", "Sequence") + (("Generic",) if corpus.bloom else ()):
        t = report.per_rmgr[name]
        assert t.mismatched == 0, [str(m) for m in report.mismatches if m.rmgr == name][:10]
        assert t.unsupported == 0, report.unsupported_types
    seq = report.per_rmgr["Sequence"]
    seq_blocks = [b for r in corpus.records if r.rmid == RM_SEQ_ID for b in r.blocks]
    assert seq.blocks_checked == len(seq_blocks) == seq.matched
    assert seq.matched >= 20
    assert any(b.forknum == INIT_FORKNUM for b in seq_blocks), "no unlogged sequence init fork"
    if not corpus.bloom:
        pytest.skip("bloom extension not installed: Generic records not exercised")
    gen = report.per_rmgr["Generic"]
    gen_blocks = [b for r in corpus.records if r.rmid == RM_GENERIC_ID for b in r.blocks]
    deltas = [b for b in gen_blocks if not b.apply_image]
    full = [b for b in gen_blocks if b.apply_image]
    assert deltas and full, (len(deltas), len(full))
    assert all(b.has_data for b in deltas)
    # Every delta block carries a verification image and was compared.
    assert gen.blocks_checked == len(deltas) == gen.matched
    assert gen.matched >= 100


def test_sequence_page_layout(corpus: Corpus) -> None:
    """Our sequence page has the magic special space and the record's tuple at offset 1."""
    recs = [r for r in corpus.records if r.rmid == RM_SEQ_ID]
    assert {_info(r) for r in recs} == {XLOG_SEQ_LOG}
    for rec in recs[:50]:
        (block,) = rec.blocks
        assert block.will_init
        page = apply_block(block, None, rec)
        assert page_get_lsn(page) == rec.end_lsn
        assert struct.unpack_from("<HHH", page, 12) == (28, BLCKSZ - 8 - maxalign(len(rec.main_data) - 12), BLCKSZ - 8)
        assert struct.unpack_from("<I", page, BLCKSZ - 8)[0] == SEQ_MAGIC
        assert block.image is not None
        want = bytearray(block.image.page())
        seq_mask(want, block.blkno)
        seq_mask(page, block.blkno)
        assert page == want


def test_xlog_record_types_and_engine_path(corpus: Corpus) -> None:
    xlog = [r for r in corpus.records if r.rmid == RM_XLOG_ID]
    names = {record_type_name(RM_XLOG_ID, r.info) for r in xlog}
    expected = {"CHECKPOINT_SHUTDOWN", "CHECKPOINT_ONLINE", "NEXTOID", "SWITCH", "RESTORE_POINT",
                "BACKUP_END", "FPW_CHANGE", "PARAMETER_CHANGE", "FPI", "FPI_FOR_HINT"}
    assert expected <= names, expected - names
    for rec in xlog:
        assert implied_tags(rec) == []
        if _info(rec) in (XLOG_FPI, XLOG_FPI_FOR_HINT):
            assert rec.blocks
            continue
        # No block references: the engine refuses to invent a page for them.
        assert rec.blocks == []
        tag = BufferTag(RelFileNode(1663, 5, 1259), 0, 0)
        with pytest.raises(RedoFailedError):
            apply_record(tag, bytearray(BLCKSZ), rec)


def test_xlog_fpi_restores_images(corpus: Corpus) -> None:
    """XLOG_FPI / FPI_FOR_HINT with images: the page is the image with the record's end LSN."""
    restored = {XLOG_FPI: 0, XLOG_FPI_FOR_HINT: 0}
    for rec in corpus.records:
        if rec.rmid != RM_XLOG_ID or _info(rec) not in restored:
            continue
        for block in rec.blocks:
            if block.image is None:
                continue
            assert block.apply_image
            want = bytearray(block.image.page())
            if any(want):
                page_set_lsn(want, rec.end_lsn)
            assert apply_block(block, None, rec) == want
            restored[_info(rec)] += 1
    assert restored[XLOG_FPI] >= 5 and restored[XLOG_FPI_FOR_HINT] >= 5, restored


def test_xlog_fpi_for_hint_without_image_is_a_no_op(corpus: Corpus) -> None:
    """With full_page_writes off the hint record has no image: redo leaves the page alone."""
    latest: dict[BufferTag, bytearray] = {}
    no_image = 0
    for rec in corpus.records:
        for block in rec.blocks:
            tag = BufferTag(block.rnode, block.forknum, block.blkno)
            if rec.rmid == RM_XLOG_ID and _info(rec) == XLOG_FPI_FOR_HINT and block.image is None:
                assert not block.has_data
                base = latest.get(tag)
                assert base is not None, f"no earlier image of {tag}"
                assert page_get_lsn(base) < rec.end_lsn
                assert apply_block(block, bytearray(base), rec) == base
                no_image += 1
            elif block.image is not None:
                latest[tag] = bytearray(block.image.page())
    assert no_image >= 1


def test_xlog_fpi_without_image_fails(corpus: Corpus) -> None:
    rec = next(r for r in corpus.records if r.rmid == RM_XLOG_ID and _info(r) == XLOG_FPI)
    block = rec.blocks[0]
    stripped = dataclasses.replace(block, image=None, flags=block.flags & ~0x10)
    with pytest.raises(RedoFailedError, match="full-page image"):
        apply_block(stripped, bytearray(BLCKSZ), rec)
