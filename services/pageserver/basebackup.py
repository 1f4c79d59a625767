"""Base backups that a stock PostgreSQL 15 boots: a data directory as of (timeline, LSN), as a tar stream.

Postgres must start as after a clean shutdown at L, with no WAL to replay:
we write a real XLOG_CHECKPOINT_SHUTDOWN record at L into a synthetic WAL
segment and point pg_control at it (pg_resetwal's trick, RewriteControlFile
and WriteEmptyXLOG in src/bin/pg_resetwal/pg_resetwal.c, but at an exact
LSN), carrying the counters as they stand at L (see checkpoint_values). The
compute's WAL then continues right after that record.

Everything else comes from the repository, as of L:
- relation files of every fork but the FSM (not WAL-logged; Postgres
  rebuilds it), split into 1 GB segment files; an unlogged relation's main
  fork is a copy of its init fork, what ResetUnloggedRelations would make of
  it (a clean start does not reset them: StartupXLOG only does in recovery);
- pg_filenode.map files from the relmapper values, PG_VERSION files;
- SLRU segments: pg_xact from oldestXid to nextXid, pg_multixact from
  oldestMulti / its first member to nextMulti / nextMultiOffset, pg_commit_ts
  when tracked. Pages with no version up to the last one Postgres reads at
  startup (TrimCLOG, TrimMultiXact read the page of the next xid / multi /
  offset) are zeroes, as a ZEROPAGE record would have made them;
- pg_twophase files of the transactions prepared at L;
- the directories initdb creates (initdb.c subdirs), minimal configuration
  files, and global/pg_control last (basebackup.c sends it last too).

Files are read and streamed one page at a time; nothing is staged on disk.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

import google_crc32c

from pgformat.constants import BLCKSZ, FSM_FORKNUM, INIT_FORKNUM, MAIN_FORKNUM, maxalign
from pgformat.controlfile import (
    DB_SHUTDOWNED,
    CheckPoint,
    ControlFileData,
    parse_checkpoint,
    parse_control_file,
    write_control_file,
)
from pgformat.datadir import (
    DEFAULTTABLESPACE_OID,
    GLOBALTABLESPACE_OID,
    RELSEG_SIZE,
    TABLESPACE_VERSION_DIRECTORY,
    relation_path,
)
from pgformat.walbuild import build_checkpoint_record, build_wal_segments, record_start_for
from pgformat.xlogreader import segment_file_name
from pgformat.xlogrecord import DecodedRecord
from pgredo.slru import (
    CLOG_XACTS_PER_PAGE,
    COMMIT_TS_XACTS_PER_PAGE,
    MULTIXACT_MEMBERS_PER_PAGE,
    MULTIXACT_OFFSETS_PER_PAGE,
    SLRU_PAGES_PER_SEGMENT,
    SlruKind,
    multixact_get_offset,
    slru_segment_filename,
)

from .checkpoint_values import running_checkpoint, transaction_id_is_normal
from .keys import (
    CHECKPOINT_KEY,
    CONTROL_FILE_KEY,
    KeyKind,
    RelTag,
    decode_key,
    slru_page_key,
)
from .repository import InvalidRequestError, NotFoundError, Repository, RepositoryError, Timeline

log = logging.getLogger(__name__)

PG_VERSION_FILE: Final = b"15\n"
ZERO_PAGE: Final = bytes(BLCKSZ)

# initdb.c `subdirs`, in its order (base/1 comes with the databases).
DATA_DIRECTORY_SUBDIRS: Final = (
    "global",
    "pg_wal",
    "pg_wal/archive_status",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
    "pg_twophase",
    "pg_multixact",
    "pg_multixact/members",
    "pg_multixact/offsets",
    "base",
    "pg_replslot",
    "pg_tblspc",
    "pg_stat",
    "pg_stat_tmp",
    "pg_xact",
    "pg_logical",
    "pg_logical/snapshots",
    "pg_logical/mappings",
)

POSTGRESQL_CONF: Final = b"# Written by the page server's base backup; zctl adds the compute's settings.\n"
PG_HBA_CONF: Final = b"""\
# Written by the page server's base backup: trust from this host only.
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
"""
PG_IDENT_CONF: Final = b"# MAPNAME       SYSTEM-USERNAME         PG-USERNAME\n"

# twophase.c: xl_xact_prepare.total_len counts the trailing CRC-32C.
_TWOPHASE_MAGIC: Final = 0x57F94534


class BasebackupError(RepositoryError):
    """The repository lacks something every data directory needs."""


@dataclass(frozen=True, slots=True)
class BasebackupInfo:
    """Where the backup stands: its data is as of `lsn`; the compute's WAL continues at `end_lsn`."""

    lsn: int  # end of the last record included (the requested LSN, snapped back to a record end)
    checkpoint_lsn: int  # the shutdown checkpoint record pg_control points at
    end_lsn: int  # end of that record: where the compute inserts its first record
    checkpoint: CheckPoint


@dataclass(frozen=True, slots=True)
class _Start:
    info: BasebackupInfo
    control: bytes
    wal: list[tuple[str, bytes]]  # (pg_wal/... path, segment image)
    control_data: ControlFileData


def write_basebackup(
    repo: Repository, tl: Timeline, lsn: int, out: BinaryIO, *, timeline_id: int = 1
) -> BasebackupInfo:
    """Write the data directory as of `lsn` to `out` as an uncompressed tar stream."""
    started = time.monotonic()
    start = prepare_start(repo, tl, lsn, timeline_id=timeline_id)
    ckpt = start.info.checkpoint
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        w = _TarWriter(tar)
        w.file("PG_VERSION", PG_VERSION_FILE)
        for d in DATA_DIRECTORY_SUBDIRS:
            w.dir(d)
        w.file("postgresql.conf", POSTGRESQL_CONF)
        w.file("pg_hba.conf", PG_HBA_CONF)
        w.file("pg_ident.conf", PG_IDENT_CONF)
        nrels = _write_relations(repo, tl, lsn, w)
        _write_slrus(repo, tl, lsn, ckpt, start.control_data.track_commit_timestamp, w)
        _write_twophase(repo, tl, lsn, w)
        for path, image in start.wal:
            w.file(path, image)
        w.file("global/pg_control", start.control)
    log.info("base backup written", extra={
        "timeline": tl.timeline, "lsn": f"{start.info.lsn:X}", "checkpoint": f"{start.info.checkpoint_lsn:X}",
        "relations": nrels, "bytes": w.bytes, "seconds": round(time.monotonic() - started, 2)})
    return start.info


def prepare_start(repo: Repository, tl: Timeline, lsn: int, *, timeline_id: int = 1) -> _Start:
    """The checkpoint at `lsn`, its WAL segment(s) and the pg_control that points at it."""
    if lsn > tl.last_record_lsn:
        raise InvalidRequestError(
            f"LSN {lsn:X} is beyond the last record ingested on timeline {tl.timeline} ({tl.last_record_lsn:X})")
    if tl.ancestor_id is None and lsn < tl.start_lsn:
        raise InvalidRequestError(f"LSN {lsn:X} is before the start of timeline {tl.timeline} ({tl.start_lsn:X})")
    control_image = repo.get_file(tl, CONTROL_FILE_KEY, lsn)
    if control_image is None:
        raise BasebackupError(f"timeline {tl.timeline} has no pg_control (it was not imported from a data directory)")
    control = parse_control_file(control_image)
    ckpt_image = repo.get_file(tl, CHECKPOINT_KEY, lsn)
    base = parse_checkpoint(ckpt_image) if ckpt_image is not None else control.checkpoint_copy

    last: list[DecodedRecord] = []

    def scanned() -> Iterator[DecodedRecord]:
        for rec in repo.records_between(tl, min(base.redo, lsn), lsn):
            if last:
                last[0] = rec
            else:
                last.append(rec)
            yield rec

    ckpt = running_checkpoint(base, scanned(), 0, timeline_id=timeline_id)
    if last:
        insert_lsn, xl_prev = last[0].end_lsn, last[0].lsn
    else:
        # Nothing since the checkpoint we start from: e.g. the import LSN itself.
        insert_lsn = maxalign(lsn)
        xl_prev = tl.prev_record_lsn if lsn == tl.start_lsn else 0
    record_lsn = record_start_for(insert_lsn, control.xlog_seg_size)
    ckpt = dataclasses.replace(ckpt, redo=record_lsn)
    wal = build_wal_segments(insert_lsn, [build_checkpoint_record(ckpt, xl_prev)], timeline_id,
                             control.system_identifier, control.xlog_seg_size)
    if control.data_checksum_version:
        # Pages rebuilt from WAL carry stale pd_checksum values; we do not recompute them yet.
        log.warning("the primary has data checksums; the compute starts with them off")
    new_control = dataclasses.replace(
        control,
        state=DB_SHUTDOWNED,
        time=ckpt.time,
        checkpoint=record_lsn,
        checkpoint_copy=ckpt,
        min_recovery_point=0,
        min_recovery_point_tli=0,
        backup_start_point=0,
        backup_end_point=0,
        backup_end_required=False,
        data_checksum_version=0,
    )
    info = BasebackupInfo(insert_lsn, record_lsn, wal.end_lsn, ckpt)
    segments = [(f"pg_wal/{segment_file_name(timeline_id, s.start_lsn, control.xlog_seg_size)}", s.data)
                for s in wal.segments]
    return _Start(info, write_control_file(new_control), segments, new_control)


# -- relations ------------------------------------------------------------------------


def _write_relations(repo: Repository, tl: Timeline, lsn: int, w: _TarWriter) -> int:
    rels = repo.list_rels(tl, lsn)
    unlogged = {(r.spc, r.db, r.rel) for r in rels if r.fork == INIT_FORKNUM}
    dbs = sorted({(r.spc, r.db) for r in rels if r.spc != GLOBALTABLESPACE_OID})
    relmaps = {(spc, db): data for key, data in repo.list_files(tl, KeyKind.RELMAP_FILE, lsn).items()
               for _, spc, db, _, _, _ in (decode_key(key),)}
    if (GLOBALTABLESPACE_OID, 0) not in relmaps:
        raise BasebackupError(f"no global/pg_filenode.map at {lsn:X} on timeline {tl.timeline}")
    w.file("global/pg_filenode.map", relmaps[(GLOBALTABLESPACE_OID, 0)])
    db_oids = {db for _, db in dbs}
    for spc, db in dbs:
        path = _db_path(spc, db)
        if spc != DEFAULTTABLESPACE_OID:
            w.dir(f"pg_tblspc/{spc}")
            w.dir(f"pg_tblspc/{spc}/{TABLESPACE_VERSION_DIRECTORY}")
        w.dir(path)
    for (spc, db), data in sorted(relmaps.items()):
        if spc == GLOBALTABLESPACE_OID or db not in db_oids:
            continue  # a dropped database's last map
        if (spc, db) not in dbs:
            raise BasebackupError(f"the relation map of database {db} is in tablespace {spc}, its relations are not")
        w.file(f"{_db_path(spc, db)}/PG_VERSION", PG_VERSION_FILE)
        w.file(f"{_db_path(spc, db)}/pg_filenode.map", data)
    homeless = db_oids - {db for spc, db in relmaps if spc != GLOBALTABLESPACE_OID}
    if homeless:
        raise BasebackupError(f"databases {sorted(homeless)} have relations but no pg_filenode.map at {lsn:X}")

    for rel in rels:
        if rel.fork == FSM_FORKNUM:
            continue
        if rel.fork == MAIN_FORKNUM and (rel.spc, rel.db, rel.rel) in unlogged:
            continue  # written from the init fork below
        nblocks = repo.rel_size(tl, rel, lsn) or 0
        if rel.fork == INIT_FORKNUM:
            pages = list(repo.rel_pages(tl, rel, lsn))  # init forks are a page or two
            _write_fork(w, rel, nblocks, iter(pages))
            _write_fork(w, dataclasses.replace(rel, fork=MAIN_FORKNUM), nblocks, iter(pages))
        else:
            _write_fork(w, rel, nblocks, repo.rel_pages(tl, rel, lsn))
    return len(rels)


def _db_path(spc: int, db: int) -> str:
    if spc == DEFAULTTABLESPACE_OID:
        return f"base/{db}"
    return f"pg_tblspc/{spc}/{TABLESPACE_VERSION_DIRECTORY}/{db}"


def _write_fork(w: _TarWriter, rel: RelTag, nblocks: int, pages: Iterator[bytes]) -> None:
    """The fork's segment files: RELSEG_SIZE blocks each; an empty fork is one empty file."""
    nsegs = max(1, -(-nblocks // RELSEG_SIZE))
    for segno in range(nsegs):
        count = min(RELSEG_SIZE, nblocks - segno * RELSEG_SIZE)
        w.stream(relation_path(rel.spc, rel.db, rel.rel, rel.fork, segno), count * BLCKSZ,
                 (next(pages) for _ in range(count)))


# -- SLRUs ---------------------------------------------------------------------------------

# Pages of each SLRU over the whole 32-bit id space (the last page may be partial).
_CLOG_PAGES: Final = (1 << 32) // CLOG_XACTS_PER_PAGE
_OFFSETS_PAGES: Final = (1 << 32) // MULTIXACT_OFFSETS_PER_PAGE
_MEMBERS_PAGES: Final = -(-(1 << 32) // MULTIXACT_MEMBERS_PER_PAGE)
_COMMIT_TS_PAGES: Final = -(-(1 << 32) // COMMIT_TS_XACTS_PER_PAGE)


def _write_slrus(repo: Repository, tl: Timeline, lsn: int, ckpt: CheckPoint, track_commit_ts: bool,
                 w: _TarWriter) -> None:
    next_xid = ckpt.next_xid32
    _write_slru(repo, tl, lsn, w, SlruKind.CLOG, ckpt.oldest_xid // CLOG_XACTS_PER_PAGE,
                next_xid // CLOG_XACTS_PER_PAGE, _CLOG_PAGES)
    offsets = _write_slru(repo, tl, lsn, w, SlruKind.MULTIXACT_OFFSETS,
                          ckpt.oldest_multi // MULTIXACT_OFFSETS_PER_PAGE,
                          ckpt.next_multi // MULTIXACT_OFFSETS_PER_PAGE, _OFFSETS_PAGES)
    # Members from the oldest multixact's first member (find_multixact_start) to nextMultiOffset.
    last_member_page = ckpt.next_multi_offset // MULTIXACT_MEMBERS_PER_PAGE
    first_member_page = last_member_page
    if ckpt.oldest_multi != ckpt.next_multi:
        page = offsets.get(ckpt.oldest_multi // MULTIXACT_OFFSETS_PER_PAGE)
        start = multixact_get_offset(page, ckpt.oldest_multi) if page is not None else 0
        if start:
            first_member_page = start // MULTIXACT_MEMBERS_PER_PAGE
    _write_slru(repo, tl, lsn, w, SlruKind.MULTIXACT_MEMBERS, first_member_page, last_member_page, _MEMBERS_PAGES)
    if track_commit_ts:
        oldest = ckpt.oldest_commit_ts_xid if transaction_id_is_normal(ckpt.oldest_commit_ts_xid) else next_xid
        _write_slru(repo, tl, lsn, w, SlruKind.COMMIT_TS, oldest // COMMIT_TS_XACTS_PER_PAGE,
                    next_xid // COMMIT_TS_XACTS_PER_PAGE, _COMMIT_TS_PAGES)


def _write_slru(repo: Repository, tl: Timeline, lsn: int, w: _TarWriter, kind: SlruKind,
                first_page: int, last_page: int, total_pages: int) -> dict[int, bytes]:
    """Segment files holding absolute pages first..last (modulo the id space); return the pages by number.

    Every page the repository has in those segments is written; missing pages
    before the last one written are zeroes, and so is `last_page` if missing.
    """
    total_segs = -(-total_pages // SLRU_PAGES_PER_SEGMENT)
    seg = first_page // SLRU_PAGES_PER_SEGMENT
    last_seg = last_page // SLRU_PAGES_PER_SEGMENT
    pages_by_number: dict[int, bytes] = {}
    while True:
        present: dict[int, bytes] = {}
        for pageno in range(SLRU_PAGES_PER_SEGMENT):
            try:
                present[pageno] = repo.get_page(tl, slru_page_key(kind, seg, pageno), lsn, wait=False)[0]
            except NotFoundError:
                pass
        if seg == last_seg:
            count = max(last_page % SLRU_PAGES_PER_SEGMENT + 1, max(present, default=-1) + 1)
        else:
            count = SLRU_PAGES_PER_SEGMENT  # Postgres filled it before moving on
        images = [present.get(p, ZERO_PAGE) for p in range(count)]
        w.file(slru_segment_filename(kind, seg), b"".join(images))
        for p, page in enumerate(images):
            pages_by_number[seg * SLRU_PAGES_PER_SEGMENT + p] = page
        if seg == last_seg:
            return pages_by_number
        seg = (seg + 1) % total_segs


# -- two-phase state ------------------------------------------------------------------------


def _write_twophase(repo: Repository, tl: Timeline, lsn: int, w: _TarWriter) -> None:
    for key, state in sorted(repo.list_files(tl, KeyKind.TWOPHASE_FILE, lsn).items()):
        xid = decode_key(key)[5]
        w.file(f"pg_twophase/{xid:08X}", twophase_file(state, xid))


def twophase_file(state: bytes, xid: int) -> bytes:
    """The pg_twophase file for a PREPARE record's main data (RecreateTwoPhaseFile appends the CRC),
    or an imported file, which has its CRC already."""
    if len(state) < 8 or int.from_bytes(state[0:4], "little") != _TWOPHASE_MAGIC:
        raise BasebackupError(f"two-phase state of transaction {xid} has a bad magic number")
    total_len = int.from_bytes(state[4:8], "little")
    if len(state) == total_len:
        return state
    if len(state) + 4 != total_len:
        raise BasebackupError(f"two-phase state of transaction {xid} is {len(state)} bytes, its header says {total_len}")
    return state + google_crc32c.value(state).to_bytes(4, "little")


# -- tar ------------------------------------------------------------------------------------


class _TarWriter:
    """Entries of a data directory: 0700 directories, 0600 files, each directory once."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self._tar = tar
        self._dirs: set[str] = set()
        self._mtime = int(time.time())
        self.bytes = 0

    def dir(self, path: str) -> None:
        if path in self._dirs:
            return
        self._dirs.add(path)
        info = tarfile.TarInfo(path)
        info.type = tarfile.DIRTYPE
        info.mode = 0o700
        info.mtime = self._mtime
        self._tar.addfile(info)

    def file(self, path: str, data: bytes) -> None:
        self.stream(path, len(data), iter((data,)))

    def stream(self, path: str, size: int, chunks: Iterable[bytes]) -> None:
        info = tarfile.TarInfo(path)
        info.size = size
        info.mode = 0o600
        info.mtime = self._mtime
        self._tar.addfile(info, _ChunkReader(iter(chunks)))
        self.bytes += size


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte strings (what tarfile copies from)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        want = size
        while want != 0:
            if not self._chunk:
                nxt = next(self._chunks, None)
                if nxt is None:
                    break
                self._chunk = memoryview(nxt)
                continue
            take = len(self._chunk) if want < 0 else min(want, len(self._chunk))
            parts.append(bytes(self._chunk[:take]))
            self._chunk = self._chunk[take:]
            if want > 0:
                want -= take
        return b"".join(parts)
