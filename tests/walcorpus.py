"""WAL corpora written by a real Postgres 15 under known workloads, and pg_waldump's view of them.

A corpus is a copy of pg_wal taken after a clean shutdown (wal_keep_size keeps
every segment), plus the LSN range the workload covered.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import PgFactory

from pgformat.constants import BLCKSZ
from pgformat.rmgr import record_type_name, rmgr_name
from pgformat.xlogreader import segment_file_name
from pgformat.xlogrecord import DecodedRecord
from pgredo.engine import BlockRedo, BufferTag
from pgredo.errors import UnsupportedRecordError
from pgredo.verify import VerifyReport, verify_records
from zctl.postgres import PostgresNode
from zctl.waldump import iter_file_records

# Every access method, DDL, TOAST, 2PC, sequences, VACUUM, CREATE DATABASE (both strategies).
SQL_WORKLOAD = [
    "CREATE TABLE kv (k int PRIMARY KEY, v text, j jsonb, p point, r int4range, tsv tsvector)",
    """INSERT INTO kv SELECT i, repeat(md5(i::text), 1 + i % 5),
           jsonb_build_object('a', i, 'b', array[i, i + 1]), point(i % 100, i / 100),
           int4range(i, i + 10), to_tsvector('simple', 'word' || (i % 50) || ' other' || (i % 7))
       FROM generate_series(1, 4000) i""",
    "CREATE INDEX kv_v ON kv (v)",
    "CREATE INDEX kv_hash ON kv USING hash (k)",
    "CREATE INDEX kv_gin ON kv USING gin (j)",
    "CREATE INDEX kv_fts ON kv USING gin (tsv) WITH (fastupdate = on)",
    "CREATE INDEX kv_gist ON kv USING gist (p)",
    "CREATE INDEX kv_spgist ON kv USING spgist (p)",
    "CREATE INDEX kv_brin ON kv USING brin (k) WITH (pages_per_range = 2)",
    "UPDATE kv SET v = v || 'x' WHERE k % 3 = 0",
    "UPDATE kv SET r = int4range(k, k + 20) WHERE k % 5 = 0",
    "DELETE FROM kv WHERE k % 7 = 0",
    "INSERT INTO kv SELECT i, 'new', '{}', point(0, 0), int4range(1, 2), '' FROM generate_series(4001, 6000) i",
    "VACUUM kv",
    "CREATE TABLE shrinking AS SELECT generate_series(1, 20000) AS i",
    "DELETE FROM shrinking WHERE i > 100",
    "VACUUM shrinking",
    "CREATE TABLE gt (a int[])",
    "CREATE INDEX gt_a ON gt USING gin (a) WITH (fastupdate = off)",
    "INSERT INTO gt SELECT array[1, 2, i] FROM generate_series(1, 3000) i",
    "CREATE TABLE toasted (id int, doc text)",
    "ALTER TABLE toasted ALTER COLUMN doc SET STORAGE EXTERNAL",
    "INSERT INTO toasted SELECT i, repeat(md5(i::text), 400) FROM generate_series(1, 50) i",
    "UPDATE toasted SET doc = doc || 'tail' WHERE id % 2 = 0",
    "CREATE SEQUENCE s1",
    "SELECT nextval('s1') FROM generate_series(1, 100)",
    "BEGIN; INSERT INTO toasted VALUES (1000, 'prepared'); PREPARE TRANSACTION 'p1'",
    "COMMIT PREPARED 'p1'",
    "BEGIN; INSERT INTO toasted VALUES (1001, 'rolled back'); PREPARE TRANSACTION 'p2'",
    "ROLLBACK PREPARED 'p2'",
    "CREATE DATABASE db_wal_log STRATEGY = wal_log",
    "CREATE DATABASE db_file_copy STRATEGY = file_copy",
    "VACUUM FREEZE kv",
    "TRUNCATE toasted",
    "DROP TABLE toasted",
    "CHECKPOINT",
]


@dataclass
class WalCorpus:
    waldir: Path
    start_lsn: int
    end_lsn: int
    gucs: dict[str, object] = field(default_factory=dict)

    def segment_names(self) -> tuple[str, str]:
        return segment_file_name(1, self.start_lsn), segment_file_name(1, self.end_lsn)


def run_workload(node: PostgresNode, pgbench_transactions: int = 300) -> None:
    node.pgbench("-i", "-s", "1", "-q")
    node.pgbench("-c", "2", "-t", str(pgbench_transactions), "-n")
    for stmt in SQL_WORKLOAD:
        node.execute(stmt)


def capture_corpus(node: PostgresNode, dest: Path, start_lsn: int) -> WalCorpus:
    """Stop the node cleanly and keep a root-owned copy of its WAL."""
    end_lsn = node.current_lsn()
    node.stop()
    shutil.copytree(node.waldir, dest, ignore=shutil.ignore_patterns("archive_status"))
    return WalCorpus(dest, start_lsn, end_lsn)


# -- the per-rmgr corpora (test_redo_<rmgr>.py) ------------------------------------------

# Every block reference carries Postgres's own after-redo image; no autovacuum noise.
CHECKED_WAL_GUCS: dict[str, object] = {
    "wal_consistency_checking": "all",
    "wal_compression": "lz4",
    "autovacuum": "off",
}
# No checkpoint mid-workload: after one, first touches carry applied full-page
# images and nothing would be left to check.
NO_CHECKPOINT_GUCS: dict[str, object] = {"max_wal_size": "8GB", "checkpoint_timeout": "1h"}


def execute_all(node: PostgresNode, *workloads: list[str]) -> None:
    for workload in workloads:
        for stmt in workload:
            node.execute(stmt)


def corpus_fixture(name: str, run: Callable[[PostgresNode], None], gucs: Mapping[str, object]) -> Any:
    """A module-scoped fixture `name`: the WAL a fresh node with `gucs` writes while `run` runs."""

    @pytest.fixture(scope="module", name=name)
    def corpus(pg_session_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory) -> WalCorpus:
        node = pg_session_factory(**gucs)
        start = node.current_lsn()
        run(node)
        return capture_corpus(node, tmp_path_factory.mktemp(f"wal-{name}") / "pg_wal", start)

    return corpus


def corpus_fixtures(prefix: str, run: Callable[[PostgresNode], None], gucs: Mapping[str, object]) -> tuple[Any, Any, Any]:
    """Module-scoped fixtures `<prefix>corpus` (see corpus_fixture), `<prefix>records`
    (its records, decoded) and `<prefix>report` (verify_records over them).
    Assign them to module names so pytest finds them."""
    corpus_name, records_name = f"{prefix}corpus", f"{prefix}records"

    @pytest.fixture(scope="module", name=records_name)
    def records(request: pytest.FixtureRequest) -> list[DecodedRecord]:
        return decoded_records(request.getfixturevalue(corpus_name))

    @pytest.fixture(scope="module", name=f"{prefix}report")
    def report(request: pytest.FixtureRequest) -> VerifyReport:
        return verify_records(request.getfixturevalue(records_name))

    return corpus_fixture(corpus_name, run, gucs), records, report


def assert_unknown_info_unsupported(records: list[DecodedRecord], rmid: int, info: int, redo: BlockRedo) -> None:
    """The rmgr's redo refuses a record whose info byte names no record type: a real
    record of `rmid` with a block, its info replaced by `info`."""
    rec = next(r for r in records if r.rmid == rmid and r.blocks)
    fake = DecodedRecord(rec.lsn, rec.end_lsn, rec.header._replace(info=info), rec.blocks, rec.main_data)
    assert fake.info == info
    with pytest.raises(UnsupportedRecordError):
        redo(fake, rec.blocks[0], bytearray(BLCKSZ))


# -- pg_waldump as the oracle --------------------------------------------------

_RECORD_LINE = re.compile(
    r"^rmgr: (?P<rmgr>\S+)\s+len \(rec/tot\):\s+(?P<rec_len>\d+)/\s*(?P<tot_len>\d+), "
    r"tx:\s+(?P<xid>\d+), lsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+), prev (?P<prev>[0-9A-F]+/[0-9A-F]+), "
    r"desc: (?P<desc>.*)$"
)
_BLOCK_LINE = re.compile(
    r"^\tblkref #(?P<id>\d+): rel (?P<spc>\d+)/(?P<db>\d+)/(?P<rel>\d+) fork (?P<fork>\w+) blk (?P<blk>\d+)"
    r"(?: \((?P<fpw>FPW(?: for WAL verification)?)\); hole: offset: (?P<hole_offset>\d+), length: (?P<hole_length>\d+)"
    r"(?:, compression saved: (?P<saved>\d+), method: (?P<method>\w+))?)?$"
)


@dataclass
class WaldumpRecord:
    rmgr: str
    rec_len: int
    tot_len: int
    xid: int
    lsn: str
    prev: str
    type_name: str
    blocks: list[dict[str, object]] = field(default_factory=list)


def pg_waldump_records(pg_waldump: Path, corpus: WalCorpus) -> list[WaldumpRecord]:
    first, last = corpus.segment_names()
    out = subprocess.run(
        [str(pg_waldump), "-b", "-p", str(corpus.waldir), first, last],
        capture_output=True, text=True, check=False,
    )
    records: list[WaldumpRecord] = []
    for line in out.stdout.splitlines():
        m = _RECORD_LINE.match(line)
        if m:
            desc = m["desc"]
            # rm_identify's name, or "UNKNOWN (x)"; rm_desc follows after a space.
            type_name = desc[: desc.index(")") + 1] if desc.startswith("UNKNOWN (") else desc.split(" ", 1)[0]
            records.append(
                WaldumpRecord(m["rmgr"], int(m["rec_len"]), int(m["tot_len"]), int(m["xid"]),
                              m["lsn"], m["prev"], type_name)
            )
            continue
        b = _BLOCK_LINE.match(line)
        if b:
            records[-1].blocks.append(
                {
                    "id": int(b["id"]), "spc": int(b["spc"]), "db": int(b["db"]), "rel": int(b["rel"]),
                    "fork": b["fork"], "blk": int(b["blk"]),
                    "has_image": b["fpw"] is not None,
                    "apply_image": b["fpw"] == "FPW",
                    "hole_offset": int(b["hole_offset"]) if b["hole_offset"] else None,
                    "hole_length": int(b["hole_length"]) if b["hole_length"] else None,
                    "saved": int(b["saved"]) if b["saved"] else None,
                    "method": b["method"],
                }
            )
        elif line.startswith("\t"):
            raise AssertionError(f"unparsed pg_waldump block line: {line!r}")
    if not records:
        raise AssertionError(f"pg_waldump printed no records: {out.stderr}")
    return records


# -- checking a corpus with `verify_records` --------------------------------------------


def decoded_records(corpus: WalCorpus) -> list[DecodedRecord]:
    """The corpus's records from its workload's start, decoded."""
    return [raw.decode() for raw in iter_file_records([corpus.waldir]) if raw.lsn >= corpus.start_lsn]


def checkable_types(records: list[DecodedRecord], rmid: int) -> Counter[str]:
    """Blocks per record type of `rmid` that verify_records compares (its base rules)."""
    seen: set[BufferTag] = set()
    counts: Counter[str] = Counter()
    for rec in records:
        for b in rec.blocks:
            tag = BufferTag(b.rnode, b.forknum, b.blkno)
            if b.image is not None and not b.image.apply and rec.rmid == rmid:
                if tag in seen or b.will_init:
                    counts[record_type_name(rec.rmid, rec.info)] += 1
            if b.image is not None or b.will_init:
                seen.add(tag)
    return counts


def assert_rmgr_verified(records: list[DecodedRecord], report: VerifyReport, rmid: int,
                         present: set[str], checked: set[str], min_blocks: int = 1000) -> None:
    """Zero mismatches and unsupported for the rmgr, every named record type present and
    compared, and enough blocks compared that the check cannot pass vacuously."""
    rmgr = rmgr_name(rmid)
    tally = report.per_rmgr[rmgr]
    assert [str(m) for m in report.mismatches if m.rmgr == rmgr] == []
    assert tally.mismatched == 0
    assert tally.unsupported == 0
    assert not any(k.startswith(f"{rmgr}/") for k in report.unsupported_types)
    seen = Counter(record_type_name(r.rmid, r.info) for r in records if r.rmid == rmid)
    assert present <= set(seen), f"missing: {present - set(seen)}"
    compared = checkable_types(records, rmid)
    assert checked <= set(compared), f"never checked: {checked - set(compared)}"
    assert tally.blocks_checked == sum(compared.values())
    assert tally.matched == tally.blocks_checked > min_blocks


# -- the compiled page operations against the Python reference -------------------------------


@dataclass
class CompiledComparison:
    records: int = 0  # records decoded both ways
    blocks: int = 0  # block applications run both ways
    errors: int = 0  # of which both raised the same error
    pglz_images: int = 0  # pglz-compressed images decompressed both ways
    differences: list[str] = field(default_factory=list)


def compare_compiled_with_python(records: list[DecodedRecord]) -> CompiledComparison:
    """Redo every block of every record twice, with pgformat._native and with pure Python, on
    copies of the same base page (the last image Postgres logged for it, else our own page), and
    compare the pages byte for byte (or the errors, message included). Decode every record and
    decompress every pglz image both ways too."""
    from pgformat import native
    from pgformat.pglz import pglz_decompress_py
    from pgformat.xlogrecord import BKPIMAGE_COMPRESS_PGLZ, _decode_body, _decode_body_py
    from pgredo.engine import apply_block, apply_record, implied_tags
    from pgredo.errors import RedoError

    assert native.compiled is not None, "pgformat._native is not built"
    out = CompiledComparison()
    pages: dict[BufferTag, bytearray] = {}

    def both(run: Callable[[bytearray | None], bytearray], base: bytearray | None, what: str) -> bytearray | None:
        results: list[tuple[str, bytes]] = []
        for enabled in (True, False):
            native.use_compiled(enabled)
            try:
                page = run(bytearray(base) if base is not None else None)
                results.append(("page", bytes(page)))
            except (RedoError, ValueError) as e:
                results.append((f"{type(e).__name__}: {e}", b""))
        native.use_compiled(True)
        out.blocks += 1
        if results[0] != results[1]:
            out.differences.append(f"{what}: compiled {results[0][0]}, python {results[1][0]}")
        elif results[0][0] != "page":
            out.errors += 1
        return bytearray(results[0][1]) if results[0][0] == "page" else None

    for rec in records:
        where = f"{rmgr_name(rec.rmid)}/{record_type_name(rec.rmid, rec.info)} at {rec.lsn:X}"
        if rec.raw:
            decoded = [f(rec.raw, rec.header, rec.lsn, rec.end_lsn) for f in (_decode_body, _decode_body_py)]
            if decoded[0] != decoded[1]:
                out.differences.append(f"{where}: decoded differently")
            out.records += 1
        for tag in implied_tags(rec):
            if tag in pages:
                page = both(lambda p, tag=tag, rec=rec: apply_record(tag, p, rec), pages[tag], f"{where} {tag}")
                if page is None:
                    del pages[tag]
                else:
                    pages[tag] = page
        for block in rec.blocks:
            tag = BufferTag(block.rnode, block.forknum, block.blkno)
            image = block.image
            if image is not None and image.bimg_info & BKPIMAGE_COMPRESS_PGLZ:
                want = BLCKSZ - image.hole_length
                assert native.compiled.pglz_decompress(image.data, want, True) == pglz_decompress_py(image.data, want)
                out.pglz_images += 1
            base = pages.get(tag)
            if base is not None or block.will_init or block.apply_image:
                page = both(lambda p, block=block, rec=rec: apply_block(block, p, rec), base,
                            f"{where} block {block.block_id}")
                if page is None:
                    pages.pop(tag, None)
                else:
                    pages[tag] = page
            if image is not None and not image.apply:
                pages[tag] = bytearray(image.page())  # continue from Postgres's own page
    return out
