"""Helpers shared by page server tests: a base backup, an in-process page server, WAL pushed over gRPC."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc

from pgformat.bufmask import mask_for_rmgr
from pgformat.lsn import parse_lsn
from pgformat.rmgr import RM_BTREE_ID, RM_HEAP_ID
from services.pageserver.main import PageServer
from services.pageserver.storage.compaction import COMPACT_L0_AT
from services.pageserver.repository import DEFAULT_TENANT
from zctl.importer import ImportSummary, import_requests, scan_backup
from zctl.postgres import PostgresNode, make_pg_owned_dir, run_as_pg_user
from zctl.waldump import iter_file_records
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc


def take_base_backup(node: PostgresNode, dest: Path) -> Path:
    """pg_basebackup -Fp -X none into `dest` (WAL comes separately, from the primary's pg_wal)."""
    make_pg_owned_dir(dest.parent)
    run_as_pg_user([node.bin("pg_basebackup"), "-h", node.host, "-p", str(node.port), "-U", node.user,
                    "-D", dest, "-Fp", "-X", "none", "-c", "fast", "--no-sync"])
    return dest


def import_backup(stub: pageserver_pb2_grpc.PageServerStub, backup: Path, timeline: str,
                  name: str = "") -> ImportSummary:
    stub.CreateTimeline(pageserver_pb2.CreateTimelineRequest(
        tenant=common_pb2.TenantId(id=DEFAULT_TENANT), new_timeline=common_pb2.TimelineId(id=timeline), name=name))
    summary = scan_backup(backup)
    stub.Import(import_requests(backup, DEFAULT_TENANT, timeline, summary))
    return summary


def record_proto(raw: object) -> common_pb2.DecodedRecord:
    rec = raw.decode()  # type: ignore[attr-defined]
    return common_pb2.DecodedRecord(lsn=rec.lsn, end_lsn=rec.end_lsn, prev_lsn=rec.prev, xid=rec.xid,
                                    rmid=rec.rmid, info=rec.info, total_len=rec.tot_len, raw=rec.raw)


def push_wal(stub: pageserver_pb2_grpc.PageServerStub, waldir: Path, timeline: str, start: int,
             end: int | None = None, batch: int = 400, flush_every: int = 0) -> int:
    """Send every record in [start, end) read from `waldir` over Ingest; return the last durable LSN.

    The last batch asks the page server to flush (everything sent is durable on return); with
    `flush_every`, every that many batches too (each flush ends a delta layer)."""
    records = (r for r in iter_file_records([waldir]) if r.lsn >= start and (end is None or r.end_lsn <= end))

    def batches() -> Iterator[pageserver_pb2.IngestRequest]:
        chunk = list(itertools.islice(records, batch))
        for seq in itertools.count(1):
            if not chunk:
                return
            following = list(itertools.islice(records, batch))
            flush = not following or (flush_every > 0 and seq % flush_every == 0)
            yield pageserver_pb2.IngestRequest(
                tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=timeline),
                batch_seq=seq, records=[record_proto(r) for r in chunk], flush=flush)
            chunk = following

    durable = 0
    for ack in stub.Ingest(batches()):
        durable = ack.durable_lsn
    return durable


def rel_key(node: PostgresNode, relname: str) -> common_pb2.RelTag:
    spc, db, filenode = node.sql(
        "SELECT CASE WHEN c.reltablespace = 0 THEN 1663 ELSE c.reltablespace END,"
        " (SELECT oid FROM pg_database WHERE datname = current_database()), pg_relation_filenode(c.oid)"
        " FROM pg_class c WHERE c.oid = %s::regclass", (relname,))[0]
    return common_pb2.RelTag(spc_oid=spc, db_oid=db, rel_number=filenode, fork=0)


def user_relations(node: PostgresNode) -> list[tuple[str, int]]:
    """(name, rmgr of its pages) of the public schema's permanent tables, their TOAST tables and btree indexes."""
    rows = node.sql(
        "WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        "  WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm') AND c.relpersistence = 'p'),"
        " rels AS (SELECT oid FROM t UNION SELECT reltoastrelid FROM pg_class WHERE oid IN (SELECT oid FROM t)"
        "  AND reltoastrelid <> 0),"
        " idx AS (SELECT indexrelid AS oid FROM pg_index WHERE indrelid IN (SELECT oid FROM rels))"
        " SELECT c.oid::regclass::text, c.relkind FROM pg_class c JOIN pg_am am ON am.oid = c.relam"
        " WHERE c.oid IN (SELECT oid FROM rels UNION SELECT oid FROM idx) AND am.amname IN ('heap', 'btree')"
        " ORDER BY 1")
    return [(name, RM_BTREE_ID if kind == "i" else RM_HEAP_ID) for name, kind in rows]


def get_page(stub: pageserver_pb2_grpc.PageServerStub, timeline: str, rel: common_pb2.RelTag, blk: int,
             lsn: int | None = None) -> bytes:
    req_lsn = common_pb2.RequestLsn(latest=True) if lsn is None else common_pb2.RequestLsn(lsn=lsn)
    resp = stub.GetPage(pageserver_pb2.GetPageRequest(
        tenant=common_pb2.TenantId(id=DEFAULT_TENANT), timeline=common_pb2.TimelineId(id=timeline),
        key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(rel=rel, blkno=blk)), lsn=req_lsn), timeout=60)
    return bytes(resp.page)


def masked_page(page: bytes, rmid: int, blk: int) -> bytes:
    """The page under its rmgr's wal_consistency_checking mask, for comparing ours with Postgres's."""
    if not any(page):
        # A new page: bulk relation extension under contention adds pages without WAL, all
        # zeroes on the primary and in the page server alike (and there is nothing to mask).
        return page
    buf = bytearray(page)
    mask_for_rmgr(rmid)(buf, blk)
    return bytes(buf)


def current_lsn(node: PostgresNode) -> int:
    return parse_lsn(node.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0])


class RunningPageServer:
    def __init__(self, repo_dir: Path, redo_address: str | None = None, *, compaction: bool = True) -> None:
        self.server = PageServer(repo_dir, "127.0.0.1:0", redo_address, lsn_wait_timeout=5.0,
                                 compaction_threshold=COMPACT_L0_AT if compaction else 0)
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.address, options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        self.stub = pageserver_pb2_grpc.PageServerStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=0.5)


# -- a table whose free space map has two bottom-level pages ----------------------------------

# One ~630-byte row a page (fillfactor 10 leaves room for one), so heap block = row number - 1,
# and every page has the same free space: the FSM holds one category in every used slot.
FSM_TABLE_ROWS = 4200  # > SlotsPerFSMPage (4069): two bottom-level FSM pages
FSM_TABLE_KEEP = 3000  # heap blocks a later VACUUM keeps: a cut inside the first bottom-level page


def create_fsm_table(node: PostgresNode, name: str) -> None:
    """The table, every page recorded in the FSM by VACUUM (which also sets the upper levels)."""
    node.execute(f"CREATE TABLE {name} (id int, pad text) WITH (fillfactor = 10, autovacuum_enabled = off)")
    node.execute(f"INSERT INTO {name} SELECT g, repeat('x', 600) FROM generate_series(1, {FSM_TABLE_ROWS}) g")
    node.sql(f"VACUUM {name}")
    assert node.sql(f"SELECT pg_relation_size('{name}') / 8192")[0][0] == FSM_TABLE_ROWS


def truncate_fsm_table(node: PostgresNode, name: str) -> None:
    """Empty the heap pages from FSM_TABLE_KEEP on; VACUUM then truncates the heap (XLOG_SMGR_TRUNCATE)."""
    node.execute(f"DELETE FROM {name} WHERE (ctid::text::point)[0] >= {FSM_TABLE_KEEP}")
    node.sql(f"VACUUM {name}")
    assert node.sql(f"SELECT pg_relation_size('{name}') / 8192")[0][0] == FSM_TABLE_KEEP


def raw_fsm_pages(node: PostgresNode, name: str) -> list[bytes]:
    """Every page of the table's FSM fork, as the primary's buffer manager has it (pageinspect)."""
    nblocks = node.sql(f"SELECT pg_relation_size('{name}', 'fsm') / 8192")[0][0]
    return [bytes(node.sql("SELECT get_raw_page(%s, 'fsm', %s)", (name, blk))[0][0]) for blk in range(nblocks)]
