"""The free space map: address arithmetic, page tree, and what a heap truncation does to the last FSM page.

Oracles: FSM pages a real Postgres wrote (their inner nodes are what
fsm_rebuild_page computes; after VACUUM truncates a table the primary's own
leaf page has every slot past the new end zeroed) and the page server's FSM
fork size against the primary's file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PgFactory
from pageserver_util import RunningPageServer, get_page, import_backup, push_wal, rel_key, take_base_backup

from pgformat import fsm
from pgformat.constants import BLCKSZ
from services.pageserver.repository import DEFAULT_TENANT
from zproto import common_pb2, pageserver_pb2

TIMELINE = "66666666666666666666666666666666"
_INNER = slice(28, 28 + fsm.NON_LEAF_NODES_PER_PAGE)  # fp_nodes start after the header and fp_next_slot


def test_address_arithmetic() -> None:
    assert fsm.SLOTS_PER_PAGE == 4069 and fsm.TREE_DEPTH == 3
    # Depth-first layout: root, first level-1 page, its 4069 leaves, second level-1 page, ...
    assert fsm.logical_to_physical(0, level=2) == 0
    assert fsm.logical_to_physical(0, level=1) == 1
    assert [fsm.logical_to_physical(n) for n in (0, 1, 4068)] == [2, 3, 4070]
    assert fsm.logical_to_physical(1, level=1) == 4071 and fsm.logical_to_physical(4069) == 4072
    assert fsm.heap_block_location(4100) == (1, 31)
    # Blocks kept by a truncation: the leaf page of the new end (if it keeps a slot) and all before it.
    assert fsm.blocks_after_truncate(10) == 3
    assert fsm.blocks_after_truncate(4069) == 3
    assert fsm.blocks_after_truncate(4070) == 4


@pytest.fixture(scope="module")
def truncated(pg_session_factory: PgFactory, pg_base_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A table whose FSM is imported full, then a VACUUM that truncates it; WAL ingested."""
    primary = pg_session_factory("fsmsrc", autovacuum="off", wal_keep_size="256MB")
    primary.execute("CREATE TABLE t (id int, pad text) WITH (fillfactor = 50);"
                    "INSERT INTO t SELECT i, repeat('x', 200) FROM generate_series(1, 6000) i")
    primary.execute("DELETE FROM t WHERE id % 2 = 0")
    primary.execute("VACUUM t")  # every page gets free space: a full FSM leaf page
    primary.execute("CHECKPOINT")
    before = primary.sql("SELECT pg_relation_size('t') / 8192")[0][0]
    backup = take_base_backup(primary, pg_base_dir / "fsm-backup" / "b")
    primary.execute("DELETE FROM t WHERE id > 1500")
    primary.execute("VACUUM t")  # truncates the heap, its VM and FSM
    primary.execute("CHECKPOINT")
    after = primary.sql("SELECT pg_relation_size('t') / 8192")[0][0]
    assert 0 < after < before
    primary.sql("SELECT pg_switch_wal()")
    ps = RunningPageServer(tmp_path_factory.mktemp("fsmrepo"))
    summary = import_backup(ps.stub, backup, TIMELINE)
    push_wal(ps.stub, primary.waldir, TIMELINE, summary.start_lsn)
    rel = rel_key(primary, "t")
    fsm_rel = common_pb2.RelTag(spc_oid=rel.spc_oid, db_oid=rel.db_oid, rel_number=rel.rel_number, fork=1)
    fsm_file = primary.datadir / (primary.sql("SELECT pg_relation_filepath('t')")[0][0] + "_fsm")
    imported = (backup / f"base/{rel.db_oid}/{rel.rel_number}_fsm").read_bytes()
    yield ps, fsm_rel, after, fsm_file.read_bytes(), imported
    ps.close()


def test_rebuild_matches_postgres_pages(truncated) -> None:  # type: ignore[no-untyped-def]
    _, _, _, _, imported = truncated
    leaf = bytearray(imported[2 * BLCKSZ:3 * BLCKSZ])
    assert any(fsm.slot_values(leaf))
    scratch = bytearray(leaf)
    scratch[_INNER] = bytes(fsm.NON_LEAF_NODES_PER_PAGE)
    assert fsm.rebuild_page(scratch)
    assert scratch == leaf  # Postgres's inner nodes are exactly the max-tree of its leaves
    assert not fsm.rebuild_page(scratch)


def test_truncation_zeroes_the_slots_past_the_new_end(truncated) -> None:  # type: ignore[no-untyped-def]
    ps, fsm_rel, new_heap_blocks, primary_fsm, imported = truncated
    size = ps.stub.RelSize(pageserver_pb2.RelSizeRequest(
        tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=TIMELINE), rel=fsm_rel,
        lsn=common_pb2.RequestLsn(latest=True))).nblocks
    assert size == len(primary_fsm) // BLCKSZ
    ours = get_page(ps.stub, TIMELINE, fsm_rel, 2)
    theirs = primary_fsm[2 * BLCKSZ:3 * BLCKSZ]
    before = imported[2 * BLCKSZ:3 * BLCKSZ]
    cut = new_heap_blocks
    assert any(fsm.slot_values(before)[cut:]), "the imported page had free space past the new end"
    assert not any(fsm.slot_values(ours)[cut:]) and not any(fsm.slot_values(theirs)[cut:])
    assert fsm.slot_values(ours)[:cut] == fsm.slot_values(before)[:cut]  # FSM updates are not WAL-logged
    check = bytearray(ours)
    assert not fsm.rebuild_page(check), "inner nodes consistent with the leaves"
    assert ours[28] == max(fsm.slot_values(ours))  # the root is the largest category left
