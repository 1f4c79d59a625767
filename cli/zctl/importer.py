"""Import a plain-format base backup into the page server (the client side of Import).

Reads the backup directory pg_basebackup wrote and streams its relation
pages, SLRU segments and the files the page server keeps, as ImportRequest
messages. The page server accepts them all or nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pgformat.constants import BLCKSZ
from pgformat.datadir import (
    DB_SHUTDOWNED,
    RELSEG_SIZE,
    RelationFile,
    control_file_system_identifier,
    parse_backup_label,
    parse_control_file_head,
    parse_relation_path,
)
from pgformat.lsn import format_lsn
from zproto import common_pb2, pageserver_pb2

from .waldump import iter_file_records

PAGES_PER_MESSAGE = 64
_SLRU_DIRS = {
    "pg_xact": common_pb2.SLRU_KIND_CLOG,
    "pg_multixact/offsets": common_pb2.SLRU_KIND_MULTIXACT_OFFSETS,
    "pg_multixact/members": common_pb2.SLRU_KIND_MULTIXACT_MEMBERS,
    "pg_commit_ts": common_pb2.SLRU_KIND_COMMIT_TS,
}
_KEPT_FILES = ("global/pg_control", "global/pg_filenode.map")


class ImportSourceError(ValueError):
    """A backup directory the page server cannot be loaded from."""


@dataclass
class ImportSummary:
    start_lsn: int
    system_id: int
    pages: int = 0
    files: int = 0
    prev_record_lsn: int = 0


def scan_backup(datadir: Path) -> ImportSummary:
    label = datadir / "backup_label"
    if not label.exists():
        raise ImportSourceError(f"{datadir} has no backup_label: not a base backup taken by pg_basebackup")
    start = parse_backup_label(label.read_text()).start_lsn
    system_id = control_file_system_identifier((datadir / "global/pg_control").read_bytes())
    return ImportSummary(start, system_id)


def scan_stopped_datadir(datadir: Path) -> ImportSummary:
    """A cleanly shut down cluster (e.g. fresh from initdb): consistent as of the end of its
    shutdown checkpoint record, which the next WAL record (the compute's) follows."""
    head = parse_control_file_head((datadir / "global/pg_control").read_bytes())
    if head.state != DB_SHUTDOWNED:
        raise ImportSourceError(f"{datadir} was not shut down cleanly (pg_control state {head.state}); "
                                "start and stop it once, or import a base backup instead")
    for raw in iter_file_records([datadir / "pg_wal"]):
        if raw.lsn == head.checkpoint_lsn:
            return ImportSummary(raw.end_lsn, head.system_identifier, prev_record_lsn=raw.lsn)
    raise ImportSourceError(f"checkpoint record {format_lsn(head.checkpoint_lsn)} not found in {datadir / 'pg_wal'}")


def import_requests(
    datadir: Path, tenant: str, timeline: str, summary: ImportSummary,
    progress: Callable[[int], None] | None = None,
) -> Iterator[pageserver_pb2.ImportRequest]:
    """The whole Import stream for a backup directory; fills in `summary` counts."""
    yield pageserver_pb2.ImportRequest(begin=pageserver_pb2.ImportBegin(
        tenant=common_pb2.TenantId(id=tenant), timeline=common_pb2.TimelineId(id=timeline),
        lsn=summary.start_lsn, prev_record_lsn=summary.prev_record_lsn, pg_version=15,
        system_identifier=summary.system_id))
    for path in sorted(_walk(datadir)):
        rel_path = path.relative_to(datadir).as_posix()
        rf = parse_relation_path(rel_path)
        if rf is not None:
            yield from _relation_messages(path, rf, summary, progress)
            continue
        parent = os.path.dirname(rel_path)
        if parent in _SLRU_DIRS:
            data = path.read_bytes()
            yield pageserver_pb2.ImportRequest(slru_segment=pageserver_pb2.ImportSlruSegment(
                kind=_SLRU_DIRS[parent], segno=int(path.name, 16), data=data))
            summary.files += 1
        elif rel_path in _KEPT_FILES or path.name == "pg_filenode.map" or parent == "pg_twophase":
            yield pageserver_pb2.ImportRequest(file=pageserver_pb2.ImportFile(path=rel_path, data=path.read_bytes()))
            summary.files += 1
    yield pageserver_pb2.ImportRequest(end=pageserver_pb2.ImportEnd(total_pages=summary.pages, total_files=summary.files))


def _walk(datadir: Path) -> Iterator[Path]:
    for root, _dirs, files in os.walk(datadir, followlinks=True):
        for f in files:
            yield Path(root) / f


def _relation_messages(
    path: Path, rf: RelationFile, summary: ImportSummary, progress: Callable[[int], None] | None
) -> Iterator[pageserver_pb2.ImportRequest]:
    data = path.read_bytes()
    if len(data) % BLCKSZ:
        raise ImportSourceError(f"{path}: size {len(data)} is not a multiple of {BLCKSZ}")
    nblocks = len(data) // BLCKSZ
    if nblocks > RELSEG_SIZE:
        raise ImportSourceError(f"{path}: {nblocks} blocks exceed a segment")
    rel = common_pb2.RelTag(spc_oid=rf.spc, db_oid=rf.db, rel_number=rf.rel, fork=rf.fork)
    first = rf.first_block
    if nblocks == 0:
        yield pageserver_pb2.ImportRequest(rel_pages=pageserver_pb2.ImportRelPages(rel=rel, start_blkno=first, rel_nblocks=first))
        return
    for i in range(0, nblocks, PAGES_PER_MESSAGE):
        chunk = [data[j * BLCKSZ:(j + 1) * BLCKSZ] for j in range(i, min(nblocks, i + PAGES_PER_MESSAGE))]
        yield pageserver_pb2.ImportRequest(rel_pages=pageserver_pb2.ImportRelPages(
            rel=rel, start_blkno=first + i, pages=chunk, rel_nblocks=first + nblocks))
        summary.pages += len(chunk)
        if progress is not None:
            progress(len(chunk))
