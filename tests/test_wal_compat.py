"""Our WAL reader and decoder against pg_waldump, record by record, on real workloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PgFactory
from walcorpus import WalCorpus, capture_corpus, pg_waldump_records, run_workload

from pgformat.constants import BLCKSZ, fork_name
from pgformat.lsn import format_lsn, parse_lsn
from pgformat.rmgr import record_type_name, rmgr_name
from pgformat.xlogrecord import DecodedRecord
from zctl.postgres import pg_bindir
from zctl.waldump import iter_file_records

CONFIGS = {
    "pglz": {"wal_compression": "pglz"},
    "lz4": {"wal_compression": "lz4"},
    "zstd": {"wal_compression": "zstd"},
    "nocompress": {"wal_compression": "off"},
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def corpus(request: pytest.FixtureRequest, pg_session_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory) -> WalCorpus:
    """WAL of pgbench plus the SQL workload with wal_consistency_checking=all."""
    gucs = {"wal_consistency_checking": "all", "max_prepared_transactions": 5, **CONFIGS[request.param]}
    node = pg_session_factory(**gucs)
    start = node.current_lsn()
    run_workload(node)
    c = capture_corpus(node, tmp_path_factory.mktemp(f"wal-{request.param}") / "pg_wal", start)
    c.gucs = gucs
    return c


_decoded: dict[Path, dict[str, DecodedRecord]] = {}


def _ours(corpus: WalCorpus) -> dict[str, DecodedRecord]:
    """Our decoding of the corpus, keyed by LSN text (decoded once per corpus)."""
    if corpus.waldir not in _decoded:
        _decoded[corpus.waldir] = {format_lsn(r.lsn): r.decode() for r in iter_file_records([corpus.waldir])}
    return _decoded[corpus.waldir]


def test_every_record_agrees_with_pg_waldump(corpus: WalCorpus) -> None:
    theirs = pg_waldump_records(pg_bindir() / "pg_waldump", corpus)
    ours = _ours(corpus)
    assert len(theirs) > 5000
    first_lsn = parse_lsn(theirs[0].lsn)
    ours_in_range = [lsn for lsn, r in ours.items() if r.lsn >= first_lsn]
    assert ours_in_range == [t.lsn for t in theirs]

    images = 0
    compressed = 0
    for t in theirs:
        r = ours[t.lsn]
        where = f"record at {t.lsn}"
        assert format_lsn(r.prev) == t.prev, where
        assert rmgr_name(r.rmid) == t.rmgr, where
        assert record_type_name(r.rmid, r.info) == t.type_name, where
        assert r.xid == t.xid, where
        assert r.tot_len == t.tot_len, where
        fpi_len = sum(len(b.image.data) for b in r.blocks if b.image is not None)
        assert r.tot_len - fpi_len == t.rec_len, where
        assert len(r.blocks) == len(t.blocks), where
        for b, tb in zip(r.blocks, t.blocks):
            ours_b = {
                "id": b.block_id, "spc": b.rnode.spc, "db": b.rnode.db, "rel": b.rnode.rel,
                "fork": fork_name(b.forknum), "blk": b.blkno,
                "has_image": b.has_image, "apply_image": b.apply_image,
                "hole_offset": b.image.hole_offset if b.image else None,
                "hole_length": b.image.hole_length if b.image else None,
                "saved": BLCKSZ - b.image.hole_length - len(b.image.data) if b.image and b.image.compression else None,
                "method": b.image.compression if b.image else None,
            }
            assert ours_b == tb, f"{where} block {b.block_id}"
            if b.image is not None:
                images += 1
                compressed += b.image.compression is not None
                page = b.image.page()
                assert len(page) == BLCKSZ
    assert images > 1000  # wal_consistency_checking=all puts an image on every block
    if corpus.gucs["wal_compression"] != "off":
        assert compressed > 100


def test_record_types_cover_the_workload(corpus: WalCorpus) -> None:
    """The corpus really exercises what the acceptance criteria name."""
    names = {f"{rmgr_name(r.rmid)}/{record_type_name(r.rmid, r.info)}" for r in _ours(corpus).values()}
    for expected in ["Heap/INSERT", "Heap/HOT_UPDATE", "Heap/UPDATE", "Heap/DELETE", "Heap2/PRUNE",
                     "Heap2/VACUUM", "Heap2/VISIBLE", "Heap2/MULTI_INSERT+INIT", "Btree/INSERT_LEAF", "Btree/SPLIT_L",
                     "Hash/INIT_META_PAGE", "Gin/CREATE_PTREE", "Gist/PAGE_SPLIT", "SPGist/ADD_LEAF",
                     "BRIN/CREATE_INDEX", "Sequence/LOG", "Transaction/PREPARE", "Transaction/COMMIT_PREPARED",
                     "Transaction/ABORT_PREPARED", "Database/CREATE_WAL_LOG", "Database/CREATE_FILE_COPY",
                     "Storage/TRUNCATE", "XLOG/FPI", "XLOG/CHECKPOINT_ONLINE"]:
        assert expected in names, f"{expected} not in the corpus; have {sorted(names)}"


def test_zctl_wal_dump_json(corpus: WalCorpus, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from zctl.main import main

    assert main(["wal", "dump", "--json", str(corpus.waldir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = _ours(corpus)
    assert len(lines) == len(ours)
    objs = [json.loads(line) for line in lines]
    for o in objs[:: max(1, len(objs) // 500)]:
        r = ours[o["lsn"]]
        assert o["prev"] == format_lsn(r.prev)
        assert o["rmgr"] == rmgr_name(r.rmid)
        assert o["info"] == r.info and o["xid"] == r.xid and o["tot_len"] == r.tot_len
        assert [(b["id"], b["rel"], b["fork"], b["blk"], b["has_image"], b["apply_image"]) for b in o["blocks"]] == [
            (b.block_id, b.rnode.rel, fork_name(b.forknum), b.blkno, b.has_image, b.apply_image) for b in r.blocks
        ]


def test_redo_verify_is_clean_on_the_whole_workload(corpus: WalCorpus) -> None:
    """Every page-touching record of every rmgr, redone by us, equals Postgres's image (masked)."""
    if corpus.gucs["wal_compression"] not in ("off", "pglz"):
        pytest.skip("one uncompressed and one compressed corpus are enough for redo")
    from pgredo.verify import verify_records

    report = verify_records(_ours(corpus).values())
    assert report.mismatched == 0, [str(m) for m in report.mismatches[:10]]
    assert report.unsupported == 0, report.unsupported_types
    for rmgr in ("Heap", "Heap2", "Btree", "Hash", "Gin", "Gist", "SPGist", "BRIN", "Sequence"):
        assert report.per_rmgr[rmgr].blocks_checked > 0, rmgr
    assert report.checked > 20000


def test_compiled_redo_matches_python_on_the_whole_workload(corpus: WalCorpus) -> None:
    """pgformat._native and the pure-Python reference give the same page for every block of every
    record of every rmgr (and the same pglz output for every compressed image)."""
    if corpus.gucs["wal_compression"] not in ("off", "pglz"):
        pytest.skip("one uncompressed and one pglz corpus are enough")
    from pgformat import native

    if not native.available():
        pytest.skip("pgformat._native is not built (make install)")
    from walcorpus import compare_compiled_with_python

    cmp = compare_compiled_with_python(list(_ours(corpus).values()))
    assert cmp.differences == []
    assert cmp.records > 5000
    assert cmp.blocks > 20000
    if corpus.gucs["wal_compression"] == "pglz":
        assert cmp.pglz_images > 1000
