"""The page server's repository: tenants, timelines and every page version, on disk.

Storage engine: SQLite (stdlib), one database file per repository, in WAL
journal mode. Ingest commits each batch without an fsync (synchronous=NORMAL:
a committed batch survives kill -9 of the process, not the loss of the
machine); `sync` fsyncs, and only then does a timeline's
`disk_consistent_lsn` move up: that is what the page server reports as
durable, and the walreceiver keeps its WAL from there (DESIGN.md: WAL-first
durability). Every other change (timelines, imports, GC, writers) commits
with an fsync. Reads are B-tree lookups (O(log n)), memory is SQLite's
bounded page cache whatever the database size, and a branch is one row
(ancestor, ancestor LSN), copying nothing.

Tables:
- timelines: id, tenant, name, ancestor, ancestor_lsn, start/last/prev LSNs;
- wal_records: (timeline, end_lsn) -> raw record bytes, stored once;
- page_versions: (timeline, key, lsn, kind) -> image or reference to a record
  (`lsn` is the record's end LSN: the value is the state after that record);
- rel_sizes: (timeline, rel, lsn) -> nblocks (-1: dropped);
- commit_times: (timeline, end_lsn) -> commit timestamp (find-LSN-by-time);
- image_layers, image_layer_chunks: every page of a timeline as of one LSN
  in a compressed file beside the database (image_layers.py), so a base
  backup streams stored pages instead of reading and redoing each one.

A GetPage@LSN walks page_versions newest-first from the request LSN until an
image or a record that initializes the page, descending into the ancestor at
the branch LSN, then hands base image and records to redo. Long chains are
cut short by storing the result as an image (a materialized version).

Garbage collection (`gc`) moves a timeline's GC cutoff forward: reads below it
fail with LsnOutOfRangeError, and every version, size entry and WAL record no
read at or above the cutoff (or at a child's branch point) needs is deleted;
see retention.py for what is kept.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from pgformat.checksum import with_checksums
from pgformat.constants import BLCKSZ, FSM_FORKNUM
from pgformat.controlfile import parse_checkpoint, parse_control_file
from pgformat.errors import FormatError
from pgformat.lsn import format_lsn
from pgformat.rmgr import RM_XLOG_ID, XLOG_OVERWRITE_CONTRECORD
from pgformat.xlogreader import next_record_starts
from pgformat.xlogrecord import DecodedRecord, decode_record
from pgredo.errors import RedoError

from .image_layers import (
    CHUNK_PAGES,
    LAYER_DIR,
    ImageLayer,
    LayerChunk,
    LayerFileWriter,
    LayerReader,
    PageChunk,
    compress_frame,
    layer_file_name,
)
from .ingest import IngestPlan, plan_record
from .keys import (
    CHECKPOINT_KEY,
    CONTROL_FILE_KEY,
    KIND_DELETED,
    KIND_FILE,
    KIND_IMAGE,
    KIND_RECORD,
    KIND_RECORD_INIT,
    KeyKind,
    RelTag,
    decode_key,
    rel_range,
    relmap_key,
)
from .retention import GcResult, Version, WalWindow, plan_key, plan_sizes

log = logging.getLogger(__name__)

DEFAULT_TENANT: Final = "00000000000000000000000000000000"
MAX_LSN: Final = (1 << 63) - 1  # SQLite integers are signed 64-bit; no real LSN gets near
ZERO_PAGE: Final = bytes(BLCKSZ)

# Writer kinds, as pageserver.proto's WriterKind numbers them.
WRITER_NONE: Final = 0
WRITER_PRIMARY: Final = 1
WRITER_COMPUTE: Final = 2
WRITER_KINDS: Final = {WRITER_PRIMARY: "primary", WRITER_COMPUTE: "compute"}

# Replaying more than this many records for one GetPage stores the result as an image.
MATERIALIZE_AFTER: Final = 16
# GC works through a timeline's keys this many per transaction, so ingest waits at most one batch.
GC_KEYS_PER_BATCH: Final = 256

__all__ = ["KIND_DELETED", "KIND_FILE", "KIND_IMAGE", "KIND_RECORD", "KIND_RECORD_INIT", "Repository", "Timeline"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS durability (
    syncs INTEGER NOT NULL
);
INSERT INTO durability SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM durability);
CREATE TABLE IF NOT EXISTS tenants (
    tenant TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS timelines (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(tenant),
    timeline TEXT NOT NULL,
    name TEXT,
    ancestor_id INTEGER REFERENCES timelines(id),
    ancestor_lsn INTEGER NOT NULL DEFAULT 0,
    start_lsn INTEGER NOT NULL DEFAULT 0,
    last_record_lsn INTEGER NOT NULL DEFAULT 0,
    prev_record_lsn INTEGER NOT NULL DEFAULT 0,
    system_id INTEGER NOT NULL DEFAULT 0,
    pg_version INTEGER NOT NULL DEFAULT 15,
    created_at REAL NOT NULL,
    gc_cutoff_lsn INTEGER NOT NULL DEFAULT 0,
    writer_kind INTEGER NOT NULL DEFAULT 0,
    writer_name TEXT NOT NULL DEFAULT '',
    writer_epoch INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, timeline)
);
CREATE TABLE IF NOT EXISTS wal_records (
    tl INTEGER NOT NULL,
    end_lsn INTEGER NOT NULL,
    start_lsn INTEGER NOT NULL,
    raw BLOB NOT NULL,
    PRIMARY KEY (tl, end_lsn)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS page_versions (
    tl INTEGER NOT NULL,
    key BLOB NOT NULL,
    lsn INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    data BLOB,
    PRIMARY KEY (tl, key, lsn, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commit_times (
    tl INTEGER NOT NULL,
    end_lsn INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (tl, end_lsn)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commit_times_ts ON commit_times (tl, ts);
-- "Which keys changed after LSN x": what a base backup over an image layer must look up.
CREATE INDEX IF NOT EXISTS page_versions_by_lsn ON page_versions (tl, lsn);
CREATE TABLE IF NOT EXISTS image_layers (
    id INTEGER PRIMARY KEY,
    tl INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    file TEXT NOT NULL,
    checksums INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS image_layer_chunks (
    layer INTEGER NOT NULL,
    rel BLOB NOT NULL,
    first_blk INTEGER NOT NULL,
    npages INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (layer, rel, first_blk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rel_sizes (
    tl INTEGER NOT NULL,
    rel BLOB NOT NULL,
    lsn INTEGER NOT NULL,
    nblocks INTEGER NOT NULL,
    PRIMARY KEY (tl, rel, lsn)
) WITHOUT ROWID;
"""


class RepositoryError(Exception):
    """Base of the page server's errors; each maps to one gRPC status code."""


class NotFoundError(RepositoryError):
    """Unknown tenant, timeline, relation or key (NOT_FOUND)."""


class AlreadyExistsError(RepositoryError):
    """Tenant or timeline already there (ALREADY_EXISTS)."""


class InvalidRequestError(RepositoryError):
    """A request that can never succeed as given (INVALID_ARGUMENT / OUT_OF_RANGE)."""


class ConflictError(RepositoryError):
    """The request conflicts with the timeline's state: a WAL gap or fork, or a writer that is not
    (or no longer) the timeline's writer. Nothing was changed."""


class LsnTimeoutError(RepositoryError):
    """The requested LSN was not ingested in time (DEADLINE_EXCEEDED)."""


class LsnOutOfRangeError(InvalidRequestError):
    """The LSN is below the timeline's GC cutoff: that history is gone (OUT_OF_RANGE)."""


# One page to rebuild: (key, base image or None, records oldest first).
RedoJob = tuple[bytes, bytes | None, Sequence[DecodedRecord]]


class LayerCancelledError(RepositoryError):
    """An image layer was abandoned on request (the page server is stopping)."""


class PageRedo(Protocol):
    """What GetPage needs from redo: base image (or None) + records -> page."""

    def redo(self, key: bytes, base: bytes | None, records: Sequence[DecodedRecord]) -> bytes: ...

    def redo_many(self, jobs: Sequence[RedoJob]) -> list[bytes]:
        """The pages of many jobs, in order (base backups and image layers rebuild pages by the thousand)."""
        ...


class LocalRedo:
    """Redo in this process through pgredo (the redo service does the same in workers)."""

    def redo_many(self, jobs: Sequence[RedoJob]) -> list[bytes]:
        return [self.redo(key, base, records) for key, base, records in jobs]

    def redo(self, key: bytes, base: bytes | None, records: Sequence[DecodedRecord]) -> bytes:
        kind, a, b, c, fork, blk = decode_key(key)
        if kind == KeyKind.REL_PAGE:
            from pgformat.xlogrecord import RelFileNode
            from pgredo.engine import BufferTag, redo_page

            return bytes(redo_page(BufferTag(RelFileNode(a, b, c), fork, blk), base, records))
        if kind == KeyKind.SLRU_PAGE:
            from pgredo.slru import SlruKind, SlruPageTag, slru_redo_page

            return bytes(slru_redo_page(SlruPageTag(SlruKind(a), b, blk), base, records))
        raise InvalidRequestError(f"key kind {kind} has no redo")


@dataclass(slots=True)
class _Chain:
    """The versions that make one page: a base (an image, a layer's page, or none) and the records after it."""

    base: bytes | None = None
    base_lsn: int = 0
    records: list[tuple[int, int]] = field(default_factory=list)  # (timeline id, end LSN), newest first
    from_layer: bool = False  # the base is the image layer's page; the caller has it


@dataclass
class BackupView:
    """What `fork_chunks` reads as of (tl, lsn): see Repository.backup_view."""

    tl: Timeline
    lsn: int
    checksums: bool
    lineage: list[tuple[Timeline, int]]
    layer: LayerReader | None
    floor: tuple[int, int] | None = None  # (layer's timeline id, layer's LSN)
    changed: dict[RelTag, set[int]] = field(default_factory=dict)  # blocks with versions newer than the layer
    size_floor: dict[RelTag, int] = field(default_factory=dict)  # smallest size of a fork since the layer
    store_rebuilt: bool = True  # keep pages redone for it as images


@dataclass
class Timeline:
    """In-memory state of one timeline; the rows in `timelines` are the durable copy."""

    id: int
    tenant: str
    timeline: str
    name: str | None
    ancestor_id: int | None
    ancestor_lsn: int
    start_lsn: int
    last_record_lsn: int
    prev_record_lsn: int
    system_id: int
    pg_version: int
    created_at: float
    # Reads below this LSN are refused; the history below it was garbage-collected.
    gc_cutoff_lsn: int = 0
    # The single writer (WRITER_* kind, who) and its epoch; epoch 0 = never claimed, not fenced.
    writer_kind: int = 0
    writer_name: str = ""
    writer_epoch: int = 0
    # Everything up to here is fsynced (`Repository.sync`); the walreceiver keeps WAL from here on.
    disk_consistent_lsn: int = 0
    # Ingest-side cache of relation sizes at last_record_lsn (None: dropped / unknown).
    rel_size_cache: dict[RelTag, int | None] = field(default_factory=dict, repr=False)
    lsn_changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def durable_lsn(self) -> int:
        return self.disk_consistent_lsn


class Repository:
    """All tenants and timelines under one directory."""

    def __init__(self, path: Path, redo: PageRedo | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.db_path = self.path / "repository.sqlite"
        self.redo: PageRedo = redo if redo is not None else LocalRedo()
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._timelines: dict[int, Timeline] = {}
        self._by_name: dict[tuple[str, str], int] = {}
        self._unsynced = False  # ingest committed something not yet fsynced
        self._gc_lock = threading.Lock()  # one GC at a time: runs read what earlier batches left
        self._layers_lock = threading.Lock()  # choosing a layer to read vs removing one
        with self._conn() as conn:
            conn.executescript(_SCHEMA)
            _migrate(conn)
        self._load_timelines()
        # What a crashed predecessor committed without an fsync is made durable before it counts.
        self._unsynced = True
        self.sync()
        self._remove_orphan_layer_files()

    # -- connections ---------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Per connection (one per gRPC handler thread): bounded, whatever the database size.
            conn.execute("PRAGMA cache_size=-16384")  # 16 MB
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; fsync'd when the block exits without error if `durable` (and then
        with every transaction committed before it), else only safe from a crash of this process."""
        with self._write_lock:
            conn = self._conn()
            if durable:
                conn.execute("PRAGMA synchronous=FULL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    # Sizes cached during the rolled-back transaction may be wrong: reload lazily.
                    for tl in self._timelines.values():
                        tl.rel_size_cache.clear()
                    raise
                conn.execute("COMMIT")
                if durable:
                    self._all_durable()
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous=NORMAL")

    def _all_durable(self) -> None:
        """After an fsync'd commit: every timeline's ingested WAL is on disk (called with the write lock)."""
        for tl in self._timelines.values():
            tl.disk_consistent_lsn = tl.last_record_lsn
        self._unsynced = False

    def sync(self) -> None:
        """Make everything ingested durable (one fsync'd commit); disk_consistent_lsn catches up."""
        with self._write_lock:
            if not self._unsynced:
                return
            with self._write(durable=True) as conn:
                conn.execute("UPDATE durability SET syncs = syncs + 1")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- tenants and timelines ---------------------------------------------------

    def _load_timelines(self) -> None:
        rows = self._conn().execute(
            "SELECT id, tenant, timeline, name, ancestor_id, ancestor_lsn, start_lsn, last_record_lsn,"
            " prev_record_lsn, system_id, pg_version, created_at, gc_cutoff_lsn, writer_kind, writer_name,"
            " writer_epoch FROM timelines"
        ).fetchall()
        for row in rows:
            tl = Timeline(*row)
            self._timelines[tl.id] = tl
            self._by_name[(tl.tenant, tl.timeline)] = tl.id

    def create_tenant(self, tenant: str = DEFAULT_TENANT) -> str:
        _check_hex_id(tenant, "tenant")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE tenant = ?", (tenant,)).fetchone():
                raise AlreadyExistsError(f"tenant {tenant} already exists")
            conn.execute("INSERT INTO tenants VALUES (?)", (tenant,))
        return tenant

    def ensure_tenant(self, tenant: str = DEFAULT_TENANT) -> str:
        try:
            return self.create_tenant(tenant)
        except AlreadyExistsError:
            return tenant

    def list_tenants(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT tenant FROM tenants ORDER BY tenant")]

    def _check_tenant(self, tenant: str) -> None:
        if not self._conn().execute("SELECT 1 FROM tenants WHERE tenant = ?", (tenant,)).fetchone():
            raise NotFoundError(f"tenant {tenant} not found")

    def create_timeline(
        self,
        tenant: str,
        timeline: str | None = None,
        *,
        name: str | None = None,
        ancestor: str | None = None,
        ancestor_lsn: int | None = None,
        start_lsn: int = 0,
        prev_record_lsn: int = 0,
        system_id: int = 0,
        pg_version: int = 15,
        wait: float = 0.0,
    ) -> Timeline:
        """A new timeline: empty from `start_lsn`, or a branch of `ancestor` at `ancestor_lsn` (O(1)).

        A branch point the ancestor has not ingested yet is waited for, up to `wait` seconds (the
        walreceiver feeds the page server after the primary's commit returned)."""
        timeline = timeline or uuid.uuid4().hex
        _check_hex_id(timeline, "timeline")
        self._check_tenant(tenant)
        if ancestor is not None and ancestor_lsn and wait > 0:
            try:
                self.wait_for_lsn(self.timeline(tenant, ancestor), ancestor_lsn, wait)
            except LsnTimeoutError:
                pass  # refused below, naming the parent's last record
        # The write lock spans the commit and the registration in memory: a GC of the parent
        # that moves its cutoff next sees this child's branch point.
        with self._write_lock:
            with self._write() as conn:
                if (tenant, timeline) in self._by_name:
                    raise AlreadyExistsError(f"timeline {timeline} already exists in tenant {tenant}")
                if name is not None and any(
                    t.tenant == tenant and t.name == name for t in self._timelines.values()
                ):
                    raise AlreadyExistsError(f"a timeline named {name!r} already exists in tenant {tenant}")
                ancestor_id = None
                if ancestor is not None:
                    parent = self.timeline(tenant, ancestor)
                    requested = parent.last_record_lsn if not ancestor_lsn else ancestor_lsn
                    if requested > parent.last_record_lsn:
                        raise InvalidRequestError(
                            f"branch point {format_lsn(requested)} is beyond the last record of the parent "
                            f"({format_lsn(parent.last_record_lsn)})"
                        )
                    if requested < parent.start_lsn:
                        raise InvalidRequestError(
                            f"branch point {format_lsn(requested)} is before the parent's start "
                            f"({format_lsn(parent.start_lsn)})"
                        )
                    # The one definition of a branch point: the end of the last record at or
                    # before the requested LSN, where a standby's recovery target would stop.
                    lsn, prev_record_lsn = self.record_boundary_at(parent, requested)
                    if lsn < parent.gc_cutoff_lsn:
                        # Checked under the write lock GC takes to move the cutoff: no GC can
                        # slip in between and remove what the new branch point needs.
                        point = format_lsn(lsn) if lsn == requested else \
                            f"{format_lsn(lsn)} (the end of the last record at or before {format_lsn(requested)})"
                        raise LsnOutOfRangeError(
                            f"branch point {point} is below the GC cutoff {format_lsn(parent.gc_cutoff_lsn)} "
                            f"of {_describe(parent)}: the history before the cutoff was garbage-collected; "
                            f"branch at {format_lsn(parent.gc_cutoff_lsn)} or later"
                        )
                    ancestor_id, ancestor_lsn = parent.id, lsn
                    start_lsn = lsn
                    system_id, pg_version = parent.system_id, parent.pg_version
                now = time.time()
                cur = conn.execute(
                    "INSERT INTO timelines (tenant, timeline, name, ancestor_id, ancestor_lsn, start_lsn,"
                    " last_record_lsn, prev_record_lsn, system_id, pg_version, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, timeline, name, ancestor_id, ancestor_lsn or 0, start_lsn, start_lsn,
                     prev_record_lsn, system_id, pg_version, now),
                )
                tl = Timeline(int(cur.lastrowid or 0), tenant, timeline, name, ancestor_id, ancestor_lsn or 0,
                              start_lsn, start_lsn, prev_record_lsn, system_id, pg_version, now,
                              disk_consistent_lsn=start_lsn)
            self._timelines[tl.id] = tl
            self._by_name[(tenant, timeline)] = tl.id
        return tl

    def record_boundary_at(self, tl: Timeline, lsn: int) -> tuple[int, int]:
        """(end, start) of the last record of `tl`'s lineage that ends at or before `lsn`.

        The end is where WAL continues after that record (Postgres's EndRecPtr,
        MAXALIGNed; a page boundary when the record filled its page), the start
        is the next record's xl_prev. With no such record it is the lineage's
        start (the import LSN), with the xl_prev stored for it when known.
        """
        conn = self._conn()
        root = tl
        for t, upto in self._lineage(tl, lsn):
            row = conn.execute(
                "SELECT end_lsn, start_lsn FROM wal_records WHERE tl = ? AND end_lsn <= ? ORDER BY end_lsn DESC LIMIT 1",
                (t.id, upto),
            ).fetchone()
            if row:
                return int(row[0]), int(row[1])
            root = t
        # Nothing ingested between the root's import LSN and `lsn`.
        prev = root.prev_record_lsn if root.last_record_lsn == root.start_lsn else 0
        return root.start_lsn, prev

    def timeline(self, tenant: str, timeline: str) -> Timeline:
        tid = self._by_name.get((tenant, timeline))
        if tid is None:
            self._check_tenant(tenant)
            raise NotFoundError(f"timeline {timeline} not found in tenant {tenant}")
        return self._timelines[tid]

    def timeline_by_name(self, tenant: str, name: str) -> Timeline:
        for t in self._timelines.values():
            if t.tenant == tenant and (t.name == name or t.timeline == name):
                return t
        self._check_tenant(tenant)
        raise NotFoundError(f"no timeline named {name!r} in tenant {tenant}")

    def list_timelines(self, tenant: str) -> list[Timeline]:
        self._check_tenant(tenant)
        return sorted((t for t in self._timelines.values() if t.tenant == tenant), key=lambda t: t.id)

    def ancestor_of(self, tl: Timeline) -> Timeline | None:
        return self._timelines.get(tl.ancestor_id) if tl.ancestor_id is not None else None

    def _lineage(self, tl: Timeline, lsn: int) -> Iterator[tuple[Timeline, int]]:
        """(timeline, highest LSN to read there): the timeline itself, then ancestors at branch points."""
        t: Timeline | None = tl
        upto = lsn
        while t is not None:
            yield t, upto
            if t.ancestor_id is None:
                return
            upto = min(upto, t.ancestor_lsn)
            t = self._timelines[t.ancestor_id]

    # -- ingest -------------------------------------------------------------------

    def ingest(self, tl: Timeline, records: Sequence[DecodedRecord], writer_epoch: int = 0) -> int:
        """Store a batch of consecutive records durably; return the new last record LSN.

        Records ending at or before what is already stored are skipped, so a
        walreceiver may resend after a reconnect. The others must continue the
        stored WAL: start where the last record ended (after a page header on
        a page boundary) and link back to it by xl_prev; and a timeline that
        was ever claimed takes them only from its writer's epoch. Otherwise
        ConflictError and nothing is stored. Each batch is one SQLite
        transaction: all of it is durable when this returns, or none of it.
        """
        # The write lock spans the commit and the in-memory LSN update, so a second
        # Ingest stream (a walreceiver reconnecting) never reads a stale position;
        # claims take it too, so no batch of a fenced writer lands after the claim.
        with self._write_lock:
            self.check_writer(tl, writer_epoch)
            with self._write(durable=False) as conn:
                last = tl.last_record_lsn
                prev = tl.prev_record_lsn
                for rec in records:
                    if rec.end_lsn <= last:
                        continue
                    if rec.lsn < last:
                        raise InvalidRequestError(
                            f"record at {format_lsn(rec.lsn)} overlaps the stored WAL ending at {format_lsn(last)}"
                        )
                    if last:
                        _check_continuity(tl, rec, last, prev)
                    self._apply(conn, tl, rec, plan_record(rec))
                    prev, last = rec.lsn, rec.end_lsn
                if last != tl.last_record_lsn:
                    conn.execute(
                        "UPDATE timelines SET last_record_lsn = ?, prev_record_lsn = ? WHERE id = ?",
                        (last, prev, tl.id),
                    )
            with tl.lsn_changed:
                tl.last_record_lsn, tl.prev_record_lsn = last, prev
                tl.lsn_changed.notify_all()
            self._unsynced = self._unsynced or last != tl.disk_consistent_lsn
        return last

    # -- the single writer -------------------------------------------------------------

    def check_writer(self, tl: Timeline, writer_epoch: int) -> None:
        """ConflictError unless WAL of `writer_epoch` may be stored on `tl` now."""
        if tl.writer_epoch == 0:
            return  # never claimed: not fenced
        if tl.writer_kind == WRITER_NONE:
            raise ConflictError(
                f"timeline {tl.timeline} has no writer (released at epoch {tl.writer_epoch}); claim it first")
        if writer_epoch != tl.writer_epoch:
            raise ConflictError(
                f"WAL of writer epoch {writer_epoch} refused: timeline {tl.timeline} is written by "
                f"{describe_writer(tl)}")

    def claim_timeline(self, tl: Timeline, kind: int, name: str, *, takeover: bool = False) -> Timeline:
        """Make (kind, name) the timeline's only writer with a new epoch; the previous epoch is fenced."""
        if kind == WRITER_NONE or kind not in WRITER_KINDS or not name:
            raise InvalidRequestError("a writer needs a kind (primary or compute) and a name")
        with self._write_lock:
            held = tl.writer_kind != WRITER_NONE
            if held and (tl.writer_kind, tl.writer_name) != (kind, name) and not takeover:
                raise ConflictError(
                    f"timeline {tl.timeline} is written by {describe_writer(tl)}; "
                    f"{WRITER_KINDS[kind]} {name!r} cannot write it too")
            self._set_writer(tl, kind, name, tl.writer_epoch + 1)
        log.info("timeline %s: writer is now %s", tl.timeline, describe_writer(tl))
        return tl

    def release_timeline(self, tl: Timeline, epoch: int = 0) -> Timeline:
        """No writer from now on (the epoch goes up); ConflictError if `epoch` is given and stale."""
        with self._write_lock:
            if epoch and epoch != tl.writer_epoch:
                raise ConflictError(f"cannot release writer epoch {epoch}: timeline {tl.timeline} is written by "
                                    f"{describe_writer(tl)}")
            was = describe_writer(tl)
            self._set_writer(tl, WRITER_NONE, "", tl.writer_epoch + 1)
        log.info("timeline %s: writer %s released", tl.timeline, was)
        return tl

    def _set_writer(self, tl: Timeline, kind: int, name: str, epoch: int) -> None:
        with self._write() as conn:
            conn.execute("UPDATE timelines SET writer_kind = ?, writer_name = ?, writer_epoch = ? WHERE id = ?",
                         (kind, name, epoch, tl.id))
        tl.writer_kind, tl.writer_name, tl.writer_epoch = kind, name, epoch

    def _apply(self, conn: sqlite3.Connection, tl: Timeline, rec: DecodedRecord, plan: IngestPlan) -> None:
        lsn = rec.end_lsn
        conn.execute("INSERT INTO wal_records VALUES (?, ?, ?, ?)", (tl.id, lsn, rec.lsn, rec.raw))
        for rel in plan.creates:
            if self._cached_size(conn, tl, rel, lsn) is None:
                self._set_size(conn, tl, rel, lsn, 0)
        for key, will_init in plan.pages:
            conn.execute(
                "INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, NULL)",
                (tl.id, key, lsn, KIND_RECORD_INIT if will_init else KIND_RECORD),
            )
        for rel, blkno in plan.implied:
            size = self._cached_size(conn, tl, rel, lsn)
            if size is not None and blkno < size:
                conn.execute("INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, NULL)",
                             (tl.id, rel.page_key(blkno), lsn, KIND_RECORD))
        for rel, nblocks in plan.extends:
            size = self._cached_size(conn, tl, rel, lsn)
            if size is None or size < nblocks:
                self._set_size(conn, tl, rel, lsn, nblocks)
        for rel, nblocks in plan.truncates:
            size = self._cached_size(conn, tl, rel, lsn)
            if size is not None and size > nblocks:
                self._set_size(conn, tl, rel, lsn, nblocks)
        for spc, db, relnode in plan.drops:
            for fork in range(4):
                rel = RelTag(spc, db, relnode, fork)
                if self._cached_size(conn, tl, rel, lsn) is not None:
                    self._set_size(conn, tl, rel, lsn, -1)
        for spc, db in plan.db_drops:
            for rel in self.list_rels(tl, lsn - 1, spc, db):
                self._set_size(conn, tl, rel, lsn, -1)
        for src_spc, src_db, dst_spc, dst_db in plan.db_copies:
            self._copy_database(conn, tl, rec, src_spc, src_db, dst_spc, dst_db)
        for key, value in plan.files:
            conn.execute(
                "INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)",
                (tl.id, key, lsn, KIND_FILE if value is not None else KIND_DELETED, value),
            )
        if plan.commit_time is not None:
            conn.execute("INSERT OR REPLACE INTO commit_times VALUES (?, ?, ?)", (tl.id, lsn, plan.commit_time))

    def _copy_database(
        self, conn: sqlite3.Connection, tl: Timeline, rec: DecodedRecord, src_spc: int, src_db: int,
        dst_spc: int, dst_db: int,
    ) -> None:
        """CREATE DATABASE ... STRATEGY FILE_COPY: every page of the template, as images at this LSN."""
        lsn = rec.end_lsn
        for rel in self.list_rels(tl, rec.lsn, src_spc, src_db):
            nblocks = self.rel_size(tl, rel, rec.lsn) or 0
            dst = RelTag(dst_spc, dst_db, rel.rel, rel.fork)
            for blk in range(nblocks):
                page, _ = self.get_page(tl, rel.page_key(blk), rec.lsn, wait=False)
                conn.execute(
                    "INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)",
                    (tl.id, dst.page_key(blk), lsn, KIND_IMAGE, page),
                )
            self._set_size(conn, tl, dst, lsn, nblocks)
        relmap = self.get_file(tl, relmap_key(src_spc, src_db), rec.lsn)
        if relmap is not None:  # the copied database's mapped catalogs need the template's map
            conn.execute("INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)",
                         (tl.id, relmap_key(dst_spc, dst_db), lsn, KIND_FILE, relmap))

    def _cached_size(self, conn: sqlite3.Connection, tl: Timeline, rel: RelTag, lsn: int) -> int | None:
        if rel not in tl.rel_size_cache:
            tl.rel_size_cache[rel] = self.rel_size(tl, rel, lsn)
        return tl.rel_size_cache[rel]

    def _set_size(self, conn: sqlite3.Connection, tl: Timeline, rel: RelTag, lsn: int, nblocks: int) -> None:
        conn.execute("INSERT OR REPLACE INTO rel_sizes VALUES (?, ?, ?, ?)", (tl.id, rel.encode(), lsn, nblocks))
        tl.rel_size_cache[rel] = nblocks if nblocks >= 0 else None

    @contextmanager
    def import_transaction(
        self, tl: Timeline, lsn: int, prev_record_lsn: int, system_id: int, pg_version: int
    ) -> Iterator[ImportWriter]:
        """Load a base image at `lsn` into an empty root timeline: all of it, or (on error) none."""
        if tl.ancestor_id is not None or tl.last_record_lsn != tl.start_lsn or self.list_rels(tl, MAX_LSN):
            raise InvalidRequestError(f"timeline {tl.timeline} is not an empty root timeline")
        with self._write() as conn:
            writer = ImportWriter(self, conn, tl, lsn)
            yield writer
            conn.execute(
                "UPDATE timelines SET start_lsn = ?, last_record_lsn = ?, prev_record_lsn = ?, system_id = ?,"
                " pg_version = ? WHERE id = ?",
                (lsn, lsn, prev_record_lsn, system_id, pg_version, tl.id),
            )
        with tl.lsn_changed:
            tl.start_lsn = tl.last_record_lsn = tl.disk_consistent_lsn = lsn
            tl.prev_record_lsn, tl.system_id, tl.pg_version = prev_record_lsn, system_id, pg_version
            tl.lsn_changed.notify_all()

    # -- reads -----------------------------------------------------------------------

    def wait_for_lsn(self, tl: Timeline, lsn: int, timeout: float) -> None:
        """Block until `lsn` is ingested; LsnTimeoutError after `timeout` seconds."""
        if lsn <= tl.last_record_lsn:
            return
        deadline = time.monotonic() + timeout
        with tl.lsn_changed:
            while tl.last_record_lsn < lsn:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LsnTimeoutError(
                        f"timed out after {timeout:g}s waiting for WAL up to {format_lsn(lsn)}; "
                        f"ingested up to {format_lsn(tl.last_record_lsn)}"
                    )
                tl.lsn_changed.wait(left)

    def resolve_lsn(self, tl: Timeline, lsn: int | None, timeout: float = 30.0) -> int:
        """`None` means latest; otherwise wait until ingested; below the start or the GC cutoff is an error."""
        if lsn is None:
            return tl.last_record_lsn
        if lsn < tl.start_lsn and tl.ancestor_id is None:
            raise InvalidRequestError(
                f"LSN {format_lsn(lsn)} is before the start of timeline {tl.timeline} ({format_lsn(tl.start_lsn)})"
            )
        self.check_gc_cutoff(tl, lsn)
        self.wait_for_lsn(tl, lsn, timeout)
        return lsn

    def check_gc_cutoff(self, tl: Timeline, lsn: int) -> None:
        """LsnOutOfRangeError if a read at `lsn` needs history GC removed.

        Below a branch's start a read is served by the ancestor at that LSN
        (not at the branch point), so the ancestor's cutoff applies too.
        """
        t: Timeline | None = tl
        while t is not None:
            if lsn < t.gc_cutoff_lsn:
                where = "" if t is tl else f" (read through its ancestor {_describe(t)})"
                raise LsnOutOfRangeError(
                    f"LSN {format_lsn(lsn)} is below the GC cutoff {format_lsn(t.gc_cutoff_lsn)} of "
                    f"{_describe(tl)}{where}: that history was garbage-collected"
                )
            if lsn >= t.start_lsn:
                return
            t = self.ancestor_of(t)

    def rel_size(self, tl: Timeline, rel: RelTag, lsn: int) -> int | None:
        """Blocks in the relation fork as of `lsn`, or None if it does not exist then."""
        conn = self._conn()
        for t, upto in self._lineage(tl, lsn):
            row = conn.execute(
                "SELECT nblocks FROM rel_sizes WHERE tl = ? AND rel = ? AND lsn <= ? ORDER BY lsn DESC LIMIT 1",
                (t.id, rel.encode(), upto),
            ).fetchone()
            if row is not None:
                return int(row[0]) if row[0] >= 0 else None
        return None

    def list_rels(self, tl: Timeline, lsn: int, spc: int | None = None, db: int | None = None) -> list[RelTag]:
        """Every relation fork that exists as of `lsn` (optionally in one database)."""
        conn = self._conn()
        seen: dict[RelTag, int] = {}
        for t, upto in self._lineage(tl, lsn):
            rows = conn.execute(
                "SELECT rel, nblocks FROM rel_sizes r WHERE tl = ? AND lsn = "
                "(SELECT max(lsn) FROM rel_sizes WHERE tl = r.tl AND rel = r.rel AND lsn <= ?)",
                (t.id, upto),
            ).fetchall()
            for relb, nblocks in rows:
                rel = RelTag.decode(relb)
                if rel not in seen:
                    seen[rel] = nblocks
        return sorted(
            (r for r, n in seen.items() if n >= 0 and (spc is None or r.spc == spc) and (db is None or r.db == db)),
            key=lambda r: (r.spc, r.db, r.rel, r.fork),
        )

    def find_lsn_by_timestamp(self, tl: Timeline, ts: int) -> tuple[int, int]:
        """(end LSN, timestamp) of the last commit at or before `ts` (TimestampTz), searching the lineage."""
        best: tuple[int, int] | None = None
        for t, upto in self._lineage(tl, tl.last_record_lsn):
            row = self._conn().execute(
                "SELECT end_lsn, ts FROM commit_times WHERE tl = ? AND end_lsn <= ? AND ts <= ?"
                " ORDER BY end_lsn DESC LIMIT 1", (t.id, upto, ts)).fetchone()
            if row is not None and (best is None or row[0] > best[0]):
                best = (int(row[0]), int(row[1]))
            if best is not None:
                break
        if best is None:
            raise NotFoundError(f"no commit at or before that time on timeline {tl.timeline}")
        return best

    def db_size(self, tl: Timeline, spc: int, db: int, lsn: int) -> int:
        return sum((self.rel_size(tl, r, lsn) or 0) for r in self.list_rels(tl, lsn, spc, db)) * BLCKSZ

    def get_file(self, tl: Timeline, key: bytes, lsn: int) -> bytes | None:
        """A whole-file value (relmapper, two-phase state, checkpoint) as of `lsn`, or None."""
        conn = self._conn()
        for t, upto in self._lineage(tl, lsn):
            row = conn.execute(
                "SELECT kind, data FROM page_versions WHERE tl = ? AND key = ? AND lsn <= ?"
                " ORDER BY lsn DESC, kind ASC LIMIT 1",
                (t.id, key, upto),
            ).fetchone()
            if row is not None:
                return None if row[0] == KIND_DELETED else bytes(row[1])
        return None

    def list_files(self, tl: Timeline, kind: KeyKind, lsn: int) -> dict[bytes, bytes]:
        """Every live whole-file value of one key kind as of `lsn` (e.g. all two-phase files)."""
        lo = bytes([kind]) + bytes(17)
        hi = bytes([kind + 1]) + bytes(17)
        found: dict[bytes, bytes | None] = {}
        for t, upto in self._lineage(tl, lsn):
            rows = self._conn().execute(
                "SELECT key, kind, data FROM page_versions p WHERE tl = ? AND key >= ? AND key < ? AND lsn = "
                "(SELECT max(lsn) FROM page_versions WHERE tl = p.tl AND key = p.key AND lsn <= ?)",
                (t.id, lo, hi, upto),
            ).fetchall()
            for key, k, data in rows:
                found.setdefault(bytes(key), None if k == KIND_DELETED else bytes(data))
        return {k: v for k, v in found.items() if v is not None}

    def get_page(self, tl: Timeline, key: bytes, lsn: int, wait: bool = True,
                 timeout: float = 30.0) -> tuple[bytes, int]:
        """The page `key` as of `lsn`: (8192 bytes, its pd_lsn; for SLRU pages the LSN of its last change)."""
        if wait:
            self.wait_for_lsn(tl, lsn, timeout)
        conn = self._conn()
        chain = self._chain(conn, list(self._lineage(tl, lsn)), key)
        if not chain.records:
            if chain.base is not None:
                # pd_lsn for relation pages; SLRU pages have no LSN of their own.
                return chain.base, _page_lsn(chain.base) if key[0] == KeyKind.REL_PAGE else chain.base_lsn
            return self._missing_page(tl, key, lsn), 0
        records = self._chain_records(conn, chain)
        page = self.redo.redo(key, chain.base, records)
        if len(records) > MATERIALIZE_AFTER:
            self._materialize(chain.records[0][0], key, chain.records[0][1], page)
        # pd_lsn, as Postgres sets it (a record need not bump it: heap_xlog_visible leaves the heap page's
        # LSN alone without checksums); SLRU pages have none: the last record applied.
        return page, _page_lsn(page) if key[0] == KeyKind.REL_PAGE else records[-1].end_lsn

    def _chain(self, conn: sqlite3.Connection, lineage: Sequence[tuple[Timeline, int]], key: bytes,
               floor: tuple[int, int] | None = None) -> _Chain:
        """What makes `key` as of the end of `lineage`: walk its versions newest first, through the
        ancestors, to an image or a record that initializes the page.

        With `floor` (timeline id, LSN of an image layer holding this page), the walk stops at the
        first version on that timeline at or below that LSN: the layer's page is the base.
        """
        chain = _Chain()
        for t, upto in lineage:
            at_floor = floor is not None and t.id == floor[0]
            for vlsn, kind, data in conn.execute(
                "SELECT lsn, kind, data FROM page_versions WHERE tl = ? AND key = ? AND lsn <= ?"
                " ORDER BY lsn DESC, kind ASC",
                (t.id, key, upto),
            ):
                if at_floor and vlsn <= floor[1]:  # type: ignore[index]
                    chain.from_layer = True
                    return chain
                if kind == KIND_IMAGE:
                    chain.base, chain.base_lsn = bytes(data), vlsn
                    return chain
                chain.records.append((t.id, vlsn))
                if kind == KIND_RECORD_INIT:
                    return chain
            if at_floor:
                chain.from_layer = True
                return chain
        return chain

    def _chain_records(self, conn: sqlite3.Connection, chain: _Chain) -> list[DecodedRecord]:
        return [self._load_record(conn, tid, vlsn) for tid, vlsn in reversed(chain.records)]

    def _load_record(self, conn: sqlite3.Connection, tid: int, end_lsn: int) -> DecodedRecord:
        row = conn.execute("SELECT start_lsn, raw FROM wal_records WHERE tl = ? AND end_lsn = ?", (tid, end_lsn)).fetchone()
        if row is None:
            raise RepositoryError(f"record ending at {format_lsn(end_lsn)} missing from timeline {tid}")
        return decode_record(bytes(row[1]), int(row[0]), end_lsn, verify_crc=False)

    def _materialize(self, tid: int, key: bytes, lsn: int, page: bytes) -> None:
        conn = self._conn()
        if conn.in_transaction:  # called from inside ingest (database copy): same transaction
            conn.execute("INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)", (tid, key, lsn, KIND_IMAGE, page))
            return
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)", (tid, key, lsn, KIND_IMAGE, page))

    def _missing_page(self, tl: Timeline, key: bytes, lsn: int) -> bytes:
        """A page with no versions: zeroes inside the relation (extended, never written), else NOT_FOUND."""
        kind, a, b, c, fork, blk = decode_key(key)
        if kind == KeyKind.REL_PAGE:
            rel = RelTag(a, b, c, fork)
            size = self.rel_size(tl, rel, lsn)
            if size is None:
                raise NotFoundError(f"relation {rel} does not exist at {format_lsn(lsn)}")
            if blk >= size:
                raise NotFoundError(f"block {blk} is beyond the end of {rel} ({size} blocks) at {format_lsn(lsn)}")
            return ZERO_PAGE
        raise NotFoundError(f"no page for key {key.hex()} at {format_lsn(lsn)}")

    # -- whole relations: base backups and image layers -------------------------------------

    @contextmanager
    def backup_view(self, tl: Timeline, lsn: int, *, checksums: bool) -> Iterator[BackupView]:
        """How to read every page as of (`tl`, `lsn`): the nearest image layer in reach, and which
        pages changed after it. `checksums`: the pages come with pd_checksum set (as the cluster
        has data checksums on or off); only a layer written the same way is used."""
        lineage = list(self._lineage(tl, lsn))
        with self._layers_lock:  # the layer chosen stays readable: removal takes this lock too
            found = self._layer_in_reach(lineage, checksums)
            reader = LayerReader(found[1]) if found is not None else None
        try:
            view = BackupView(tl, lsn, checksums, lineage, reader)
            if found is not None:
                layer = found[1]
                conn = self._conn()
                for t, after, upto in _beyond_layer(lineage, found):
                    for (key,) in conn.execute(
                            "SELECT DISTINCT key FROM page_versions WHERE tl = ? AND lsn > ? AND lsn <= ?",
                            (t.id, after, upto)):
                        if key[0] == KeyKind.REL_PAGE:
                            view.changed.setdefault(RelTag.decode(key[1:14]), set()).add(
                                int.from_bytes(key[14:18], "big"))
                    # A fork truncated or dropped after the layer: blocks past its smallest size since
                    # then are not the layer's to answer (whatever came back is looked up as versions).
                    for relb, smallest in conn.execute(
                            "SELECT rel, min(nblocks) FROM rel_sizes WHERE tl = ? AND lsn > ? AND lsn <= ? GROUP BY rel",
                            (t.id, after, upto)):
                        rel = RelTag.decode(relb)
                        view.size_floor[rel] = min(view.size_floor.get(rel, smallest), max(smallest, 0))
                view.floor = (layer.tl_id, layer.lsn)
            yield view
        finally:
            if reader is not None:
                reader.close()

    def _layer_in_reach(self, lineage: Sequence[tuple[Timeline, int]],
                        checksums: bool) -> tuple[int, ImageLayer] | None:
        """(index in the lineage, layer): the newest layer on the nearest timeline that has one at or
        below the LSN read there."""
        conn = self._conn()
        for i, (t, upto) in enumerate(lineage):
            # Not below the GC cutoff: GC rewrites the history a layer's readers rely on there (the
            # relation sizes that tell a truncation after the layer); GC removes such layers.
            row = conn.execute(
                "SELECT id, tl, lsn, file, checksums, nbytes FROM image_layers WHERE tl = ? AND lsn <= ?"
                " AND lsn >= ? AND checksums = ? ORDER BY lsn DESC LIMIT 1",
                (t.id, upto, t.gc_cutoff_lsn, int(checksums))).fetchone()
            if row is not None:
                return i, self._layer_from_row(row)
        return None

    def _layer_from_row(self, row: Sequence[object]) -> ImageLayer:
        lid, tid, lsn, file, checksums, nbytes = row
        return ImageLayer(int(lid), int(tid), int(lsn), self.path / LAYER_DIR / str(file), bool(checksums), int(nbytes))

    def fork_chunks(self, view: BackupView, rel: RelTag, nblocks: int) -> Iterator[PageChunk]:
        """The first `nblocks` pages of a fork as of the view, CHUNK_PAGES at a time in block order.

        A chunk the layer holds and nothing changed since comes as the layer's stored frame; any
        other is assembled page by page: the layer's page where it still holds, else the newest
        version (redone in one batch with the chunk's other pages). Pages redone here are stored
        as images, so the next base backup finds them ready.
        """
        stored: dict[int, LayerChunk] = {}
        usable = 0  # blocks [0, usable) are the layer's to answer unless changed
        if view.layer is not None:
            stored = {c.first_blk: c for c in self._layer_chunks(view.layer.layer.id, rel)}
            usable = min(sum(c.npages for c in stored.values()), view.size_floor.get(rel, MAX_LSN))
        changed = view.changed.get(rel, set())
        changed_chunks = {blk // CHUNK_PAGES for blk in changed}
        for first in range(0, nblocks, CHUNK_PAGES):
            n = min(CHUNK_PAGES, nblocks - first)
            held = stored.get(first)
            if (held is not None and held.npages == n and first + n <= usable
                    and first // CHUNK_PAGES not in changed_chunks):
                assert view.layer is not None
                yield PageChunk(first, n, frame=view.layer.frame(held))
                continue
            layer_pages = view.layer.pages(held) if held is not None and view.layer is not None else b""
            covered = min(first + len(layer_pages) // BLCKSZ, usable)  # [first, covered) may come from the layer
            yield PageChunk(first, n, data=self._assemble(view, rel, first, n, layer_pages, covered, changed))

    def _assemble(self, view: BackupView, rel: RelTag, first: int, n: int, layer_pages: bytes, covered: int,
                  changed: set[int]) -> bytes:
        conn = self._conn()
        pages: list[bytes | None] = [None] * n

        def layer_page(blk: int) -> bytes:
            off = (blk - first) * BLCKSZ
            return layer_pages[off:off + BLCKSZ]

        wanted: list[int] = []
        for blk in range(first, first + n):
            if blk < covered and blk not in changed:
                pages[blk - first] = layer_page(blk)
            else:
                wanted.append(blk)
        if wanted:
            # One range scan per timeline finds each wanted key's newest version; most are images.
            newest: dict[bytes, tuple[int, int, int, bytes | None]] = {}  # key -> (tl id, lsn, kind, data)
            for t, upto in view.lineage:
                for key, vlsn, kind, data in conn.execute(
                    "SELECT key, lsn, kind, data FROM page_versions WHERE tl = ? AND key >= ? AND key < ? AND lsn <= ?"
                    " ORDER BY key, lsn DESC, kind", (t.id, rel.page_key(wanted[0]), rel.page_key(wanted[-1] + 1), upto),
                ):
                    newest.setdefault(key, (t.id, vlsn, kind, data))
                if view.floor is not None and t.id == view.floor[0]:
                    break  # beyond the layer's timeline only blocks it does not hold are read, below
            jobs: list[RedoJob] = []
            job_blocks: list[tuple[int, _Chain]] = []
            for blk in wanted:
                key = rel.page_key(blk)
                floor = view.floor if blk < covered else None
                hit = newest.get(key)
                if (hit is not None and hit[2] == KIND_IMAGE and hit[3] is not None
                        and not (floor and hit[0] == floor[0] and hit[1] <= floor[1])):
                    pages[blk - first] = bytes(hit[3])
                    continue
                chain = self._chain(conn, view.lineage, key, floor)
                base = layer_page(blk) if chain.from_layer else chain.base
                if not chain.records:
                    pages[blk - first] = base if base is not None else ZERO_PAGE
                else:
                    jobs.append((key, base, self._chain_records(conn, chain)))
                    job_blocks.append((blk, chain))
            if jobs:
                rebuilt = self.redo.redo_many(jobs)
                for (blk, _), page in zip(job_blocks, rebuilt):
                    pages[blk - first] = page
                if view.store_rebuilt:
                    with self._write() as wconn:
                        wconn.executemany("INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)",
                                          [(chain.records[0][0], rel.page_key(blk), chain.records[0][1], KIND_IMAGE, page)
                                           for (blk, chain), page in zip(job_blocks, rebuilt)])
        done = [p if p is not None else ZERO_PAGE for p in pages]
        if view.checksums:
            done = with_checksums(done, first)
        return b"".join(done)

    def _layer_chunks(self, layer_id: int, rel: RelTag) -> list[LayerChunk]:
        return [LayerChunk(*row) for row in self._conn().execute(
            "SELECT first_blk, npages, offset, length FROM image_layer_chunks WHERE layer = ? AND rel = ?"
            " ORDER BY first_blk", (layer_id, rel.encode()))]

    # -- image layers -------------------------------------------------------------------------

    def image_layers(self, tl: Timeline) -> list[ImageLayer]:
        """The timeline's own layers, oldest first."""
        return [self._layer_from_row(r) for r in self._conn().execute(
            "SELECT id, tl, lsn, file, checksums, nbytes FROM image_layers WHERE tl = ? ORDER BY lsn", (tl.id,))]

    def changes_since_layer(self, tl: Timeline, limit: Callable[[int], int]) -> tuple[int, int]:
        """(page versions a base backup at the last LSN reads beyond the image layer in reach, counted
        up to limit(pages in that layer); pages in that layer, 0 without one)."""
        lineage = list(self._lineage(tl, tl.last_record_lsn))
        found = self._layer_in_reach(lineage, self._checksums_at(tl, tl.last_record_lsn))
        conn = self._conn()
        pages = 0 if found is None else int(conn.execute(
            "SELECT coalesce(sum(npages), 0) FROM image_layer_chunks WHERE layer = ?", (found[1].id,)).fetchone()[0])
        cap = limit(pages)
        count = 0
        for t, after, upto in _beyond_layer(lineage, found):
            count += conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM page_versions WHERE tl = ? AND lsn > ? AND lsn <= ? LIMIT ?)",
                (t.id, after, upto, cap - count)).fetchone()[0]
            if count >= cap:
                break
        return count, pages

    def _checksums_at(self, tl: Timeline, lsn: int) -> bool:
        control = self.get_file(tl, CONTROL_FILE_KEY, lsn)
        return control is not None and parse_control_file(control, verify_crc=False).data_checksum_version != 0

    def create_image_layer(self, tl: Timeline, lsn: int | None = None,
                           cancel: threading.Event | None = None) -> ImageLayer:
        """Write every page (but the FSM's, which base backups leave out) as of `lsn` (default: the
        last record) into a new layer, then drop the timeline's older layers.

        Built from the newest layer in reach plus what changed since, so an unchanged chunk is
        copied as it is; pages that exist only as WAL are redone in batches. Setting `cancel`
        abandons the layer (LayerCancelledError); nothing of it stays.
        """
        lsn = tl.last_record_lsn if lsn is None else lsn
        checksums = self._checksums_at(tl, lsn)
        started = time.monotonic()
        (self.path / LAYER_DIR).mkdir(exist_ok=True)
        # GC waits: it could remove versions below its new cutoff that this read at `lsn` still needs.
        with self._gc_lock:
            self.check_gc_cutoff(tl, lsn)
            existing = [la for la in self.image_layers(tl) if la.lsn == lsn and la.checksums == checksums]
            if existing:
                return existing[0]
            writer = LayerFileWriter(self.path / LAYER_DIR / layer_file_name(tl.id, lsn))
            try:
                with self.backup_view(tl, lsn, checksums=checksums) as view:
                    view.store_rebuilt = False  # the layer is where they go
                    for rel in self.list_rels(tl, lsn):
                        if rel.fork == FSM_FORKNUM:
                            continue
                        for chunk in self.fork_chunks(view, rel, self.rel_size(tl, rel, lsn) or 0):
                            if cancel is not None and cancel.is_set():
                                raise LayerCancelledError(f"image layer of {_describe(tl)} cancelled")
                            writer.add(rel, chunk.first_blk, chunk.npages,
                                       chunk.frame if chunk.frame is not None else compress_frame(chunk.data or b""))
                writer.finish()
            except BaseException:
                writer.abandon()
                raise
            with self._layers_lock:
                with self._write() as conn:
                    cur = conn.execute(
                        "INSERT INTO image_layers (tl, lsn, file, checksums, nbytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (tl.id, lsn, writer.path.name, int(checksums), writer.nbytes, time.time()))
                    layer_id = int(cur.lastrowid or 0)
                    conn.executemany("INSERT INTO image_layer_chunks VALUES (?, ?, ?, ?, ?, ?)",
                                     [(layer_id, rel.encode(), c.first_blk, c.npages, c.offset, c.length)
                                      for rel, c in writer.chunks])
                    older = [la for la in self.image_layers(tl) if la.id != layer_id]
                    self._drop_layers(conn, older)
                for la in older:  # base backups that hold it open read on; the name goes now
                    la.path.unlink(missing_ok=True)
        layer = ImageLayer(layer_id, tl.id, lsn, writer.path, checksums, writer.nbytes)
        log.info("image layer written", extra={
            "timeline": tl.timeline, "lsn": format_lsn(lsn), "chunks": len(writer.chunks), "bytes": writer.nbytes,
            "replaced": len(older), "seconds": round(time.monotonic() - started, 2)})
        return layer

    def _drop_layers(self, conn: sqlite3.Connection, layers: Sequence[ImageLayer]) -> None:
        """Their index rows (the caller holds the layers lock, then unlinks the files after COMMIT)."""
        for la in layers:
            conn.execute("DELETE FROM image_layer_chunks WHERE layer = ?", (la.id,))
            conn.execute("DELETE FROM image_layers WHERE id = ?", (la.id,))

    def _remove_orphan_layer_files(self) -> None:
        """Files of layers whose index never committed (a crash while writing one)."""
        layer_dir = self.path / LAYER_DIR
        if not layer_dir.is_dir():
            return
        known = {r[0] for r in self._conn().execute("SELECT file FROM image_layers")}
        for f in layer_dir.iterdir():
            if f.name not in known:
                log.info("removing orphan image layer file %s", f.name)
                f.unlink(missing_ok=True)


    def key_range_has_versions(self, tl: Timeline, rel: RelTag) -> bool:
        lo, hi = rel_range(rel)
        return self._conn().execute(
            "SELECT 1 FROM page_versions WHERE tl = ? AND key >= ? AND key < ? LIMIT 1", (tl.id, lo, hi)
        ).fetchone() is not None

    def records_between(self, tl: Timeline, start_lsn: int, end_lsn: int, batch: int = 1000) -> Iterator[DecodedRecord]:
        """Records that start at or after `start_lsn` and end at or before `end_lsn`, oldest first,
        through the ancestors up to each branch point. Read in batches: no cursor stays open."""
        for t, upto in reversed(list(self._lineage(tl, end_lsn))):
            after = start_lsn
            while True:
                rows = self._conn().execute(
                    "SELECT start_lsn, end_lsn, raw FROM wal_records WHERE tl = ? AND end_lsn > ? AND end_lsn <= ?"
                    " ORDER BY end_lsn LIMIT ?", (t.id, after, upto, batch)).fetchall()
                for start, end, raw in rows:
                    if start >= start_lsn:
                        yield decode_record(bytes(raw), int(start), int(end), verify_crc=False)
                if len(rows) < batch:
                    break
                after = int(rows[-1][1])


    # -- garbage collection --------------------------------------------------------------

    def gc(self, tl: Timeline, horizon_lsn: int) -> GcResult:
        """Move the GC cutoff of `tl` up to min(horizon, last record LSN), snapped back to the end of a
        record, and delete what no read needs.

        Kept: everything above the cutoff; every key's value as of the cutoff
        (written as an image when it was a chain of records); the chain of
        every child branch point below the cutoff; the newest relation size
        at or below each of those LSNs; the WAL records a base backup there
        scans (from the redo point of the checkpoint in force) and the ones
        kept record versions point at. commit_times rows are all kept (a
        few bytes per commit): a timestamp then still resolves to its LSN,
        and branching there fails with the GC-cutoff error, not "no commit".

        Restartable rather than one transaction, so ingest is held up for one
        batch at a time, not the whole run: the new cutoff is made durable
        first (reads below it are refused from then on), then keys are
        handled GC_KEYS_PER_BATCH per transaction, each writing its images and
        deleting its versions together, then relation sizes, then WAL
        records. A crash anywhere leaves every read at or above the cutoff
        intact; running GC again (any horizon) finishes the job.
        """
        started = time.monotonic()
        with self._gc_lock:
            # The cutoff moves under the write lock, the one branch creation checks it under:
            # the children seen here are all the children that will ever read below it.
            with self._write_lock:
                previous = tl.gc_cutoff_lsn
                # A record boundary, as branch points are: a branch at the cutoff stays possible.
                cutoff = max(previous, self.record_boundary_at(tl, min(horizon_lsn, tl.last_record_lsn))[0])
                if cutoff != previous:
                    with self._write() as conn:
                        conn.execute("UPDATE timelines SET gc_cutoff_lsn = ? WHERE id = ?", (cutoff, tl.id))
                    tl.gc_cutoff_lsn = cutoff
                branch_points = sorted({c.ancestor_lsn for c in self._timelines.values()
                                        if c.ancestor_id == tl.id and c.ancestor_lsn < cutoff}, reverse=True)
            result = GcResult(tl.timeline, previous, cutoff, retained_lsns=sorted(branch_points))
            with self._layers_lock:
                stale = [la for la in self.image_layers(tl) if la.lsn < cutoff]
                with self._write() as conn:
                    self._drop_layers(conn, stale)
            for la in stale:
                la.path.unlink(missing_ok=True)
            if cutoff > 0:
                kept_records = self._gc_keys(tl, cutoff, branch_points, result)
                self._gc_sizes(tl, cutoff, branch_points, result)
                self._gc_wal(tl, cutoff, branch_points, kept_records, result)
        result.seconds = time.monotonic() - started
        log.info("gc of %s: cutoff %s -> %s, %d keys, %d versions removed, %d images written, %d sizes and "
                 "%d WAL records removed, %d branch points kept, %.2fs", _describe(tl), format_lsn(previous),
                 format_lsn(cutoff), result.keys_scanned, result.versions_removed, result.images_written,
                 result.rel_sizes_removed, result.wal_records_removed, len(branch_points), result.seconds)
        return result

    def _gc_keys(self, tl: Timeline, cutoff: int, branch_points: list[int], result: GcResult) -> set[int]:
        """Images at the cutoff and deletions, key by key; returns the LSNs of the record versions kept."""
        kept_records: set[int] = set()
        root = tl.ancestor_id is None
        after = b""
        while True:
            keys = [bytes(r[0]) for r in self._conn().execute(
                "SELECT DISTINCT key FROM page_versions WHERE tl = ? AND key > ? AND lsn <= ? ORDER BY key LIMIT ?",
                (tl.id, after, cutoff, GC_KEYS_PER_BATCH))]
            if not keys:
                return kept_records
            sizes: dict[RelTag, int | None] = {}
            with self._write() as conn:
                for key in keys:
                    versions = [Version(int(lsn), int(kind)) for lsn, kind in conn.execute(
                        "SELECT lsn, kind FROM page_versions WHERE tl = ? AND key = ? AND lsn <= ?"
                        " ORDER BY lsn DESC, kind ASC", (tl.id, key, cutoff))]
                    live = self._exists_at(tl, key, cutoff, sizes)
                    plan = plan_key(versions, cutoff, branch_points, live_at_cutoff=live, root=root)
                    result.keys_scanned += 1
                    if plan.image_lsn is not None:
                        try:
                            page, _ = self.get_page(tl, key, cutoff, wait=False)
                        except (RepositoryError, RedoError, FormatError) as e:
                            # Unreadable at the cutoff already: leave the key as it is, say so.
                            log.warning("gc of %s: key %s left as it was: %s", _describe(tl), key.hex(), e)
                            result.keys_failed += 1
                            kept_records.update(v.lsn for v in versions if v.kind in (KIND_RECORD, KIND_RECORD_INIT))
                            continue
                        conn.execute("INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)",
                                     (tl.id, key, plan.image_lsn, KIND_IMAGE, page))
                        result.images_written += 1
                    conn.executemany("DELETE FROM page_versions WHERE tl = ? AND key = ? AND lsn = ? AND kind = ?",
                                     [(tl.id, key, v.lsn, v.kind) for v in plan.delete])
                    result.versions_removed += len(plan.delete)
                    kept_records.update(plan.kept_records)
            if len(keys) < GC_KEYS_PER_BATCH:
                return kept_records
            after = keys[-1]

    def _exists_at(self, tl: Timeline, key: bytes, lsn: int, sizes: dict[RelTag, int | None]) -> bool:
        """False for a page of a relation fork that does not exist at `lsn` (dropped): nothing reads it.

        Blocks beyond a truncation are still treated as live: a VM page extended
        again later (vm_extend is not WAL-logged) is redone on top of them.
        """
        kind, a, b, c, fork, _ = decode_key(key)
        if kind != KeyKind.REL_PAGE:
            return True
        rel = RelTag(a, b, c, fork)
        if rel not in sizes:
            sizes[rel] = self.rel_size(tl, rel, lsn)
        return sizes[rel] is not None

    def _gc_sizes(self, tl: Timeline, cutoff: int, branch_points: list[int], result: GcResult) -> None:
        with self._write() as conn:
            by_rel: dict[bytes, list[tuple[int, int]]] = {}
            for rel, lsn, nblocks in conn.execute(
                    "SELECT rel, lsn, nblocks FROM rel_sizes WHERE tl = ? AND lsn <= ? ORDER BY rel, lsn DESC",
                    (tl.id, cutoff)):
                by_rel.setdefault(bytes(rel), []).append((int(lsn), int(nblocks)))
            for rel, entries in by_rel.items():
                doomed = plan_sizes(entries, cutoff, branch_points, root=tl.ancestor_id is None)
                conn.executemany("DELETE FROM rel_sizes WHERE tl = ? AND rel = ? AND lsn = ?",
                                 [(tl.id, rel, lsn) for lsn in doomed])
                result.rel_sizes_removed += len(doomed)

    def _gc_wal(self, tl: Timeline, cutoff: int, branch_points: list[int], kept_records: set[int],
                result: GcResult) -> None:
        """Delete the WAL records below the cutoff that no kept version and no base backup needs.

        A base backup at L scans the records from the redo point of the
        checkpoint in force at L (basebackup.prepare_start); checkpoints after
        the cutoff start their redo after the one in force at the cutoff, so
        one window per retained LSN covers every L at or above the cutoff.
        """
        windows = [WalWindow(min(self._checkpoint_redo_at(tl, lsn), lsn), lsn) for lsn in (cutoff, *branch_points)]
        with self._write() as conn:
            doomed = [(tl.id, end) for start, end in conn.execute(
                "SELECT start_lsn, end_lsn FROM wal_records WHERE tl = ? AND end_lsn <= ? AND start_lsn < ?",
                (tl.id, cutoff, windows[0].start))
                if end not in kept_records and not any(w.holds(start, end) for w in windows)]
            conn.executemany("DELETE FROM wal_records WHERE tl = ? AND end_lsn = ?", doomed)
            result.wal_records_removed = len(doomed)

    def _checkpoint_redo_at(self, tl: Timeline, lsn: int) -> int:
        """Redo LSN of the checkpoint in force at `lsn` (what a base backup there starts scanning from)."""
        image = self.get_file(tl, CHECKPOINT_KEY, lsn)
        if image is not None:
            return parse_checkpoint(image).redo
        control = self.get_file(tl, CONTROL_FILE_KEY, lsn)
        if control is not None:
            return parse_control_file(control, verify_crc=False).checkpoint_copy.redo
        return lsn  # no pg_control: no base backup of this timeline, nothing to scan

class ImportWriter:
    """Adds a base image's pages, sizes and files inside one import transaction."""

    def __init__(self, repo: Repository, conn: sqlite3.Connection, tl: Timeline, lsn: int) -> None:
        self._repo, self._conn, self._tl, self._lsn = repo, conn, tl, lsn
        self.pages = 0

    def add_pages(self, pages: Iterable[tuple[RelTag, int, bytes]]) -> None:
        for rel, blk, page in pages:
            if len(page) != BLCKSZ:
                raise InvalidRequestError(f"page {rel} block {blk} is {len(page)} bytes, expected {BLCKSZ}")
            self._conn.execute(
                "INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)",
                (self._tl.id, rel.page_key(blk), self._lsn, KIND_IMAGE, page),
            )
            self.pages += 1

    def add_sizes(self, sizes: dict[RelTag, int]) -> None:
        for rel, nblocks in sizes.items():
            self._repo._set_size(self._conn, self._tl, rel, self._lsn, nblocks)

    def add_files(self, files: dict[bytes, bytes]) -> None:
        for key, value in files.items():
            kind = KIND_IMAGE if key[0] == KeyKind.SLRU_PAGE else KIND_FILE
            self._conn.execute(
                "INSERT OR REPLACE INTO page_versions VALUES (?, ?, ?, ?, ?)",
                (self._tl.id, key, self._lsn, kind, value),
            )


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a repository written by an older version up to the current schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(timelines)")}
    added = [("gc_cutoff_lsn", "INTEGER NOT NULL DEFAULT 0"), ("writer_kind", "INTEGER NOT NULL DEFAULT 0"),
             ("writer_name", "TEXT NOT NULL DEFAULT ''"), ("writer_epoch", "INTEGER NOT NULL DEFAULT 0")]
    for name, decl in added:
        if name not in columns:
            conn.execute(f"ALTER TABLE timelines ADD COLUMN {name} {decl}")
            log.info("repository schema: added timelines.%s", name)


def _beyond_layer(lineage: Sequence[tuple[Timeline, int]],
                  found: tuple[int, ImageLayer] | None) -> list[tuple[Timeline, int, int]]:
    """(timeline, after, upto): the LSN ranges whose page versions a read over the layer in reach must
    still look at: all of every timeline nearer than the layer's, and the layer's own after the layer
    (without a layer, the whole lineage)."""
    if found is None:
        return [(t, -1, upto) for t, upto in lineage]
    k, layer = found
    return [(t, layer.lsn if i == k else -1, upto) for i, (t, upto) in enumerate(lineage[:k + 1])]


def _check_continuity(tl: Timeline, rec: DecodedRecord, last: int, prev: int) -> None:
    """ConflictError unless `rec` continues the WAL that ends at `last` (the record before starts at
    `prev`, 0 if unknown)."""
    if rec.rmid == RM_XLOG_ID and rec.info & 0xF0 == XLOG_OVERWRITE_CONTRECORD \
            and rec.prev in next_record_starts(last) and rec.lsn > rec.prev:
        # The primary crashed inside the record that started where the stored WAL ends and
        # overwrote its tail (xlog.c CreateOverwriteContrecordRecord): this record, after the
        # aborted one's partial bytes, links back to it.
        return
    if rec.lsn not in next_record_starts(last):
        raise ConflictError(
            f"record at {format_lsn(rec.lsn)} does not continue timeline {tl.timeline}, whose WAL ends at "
            f"{format_lsn(last)}: a gap in the WAL")
    if prev and rec.prev != prev:
        raise ConflictError(
            f"record at {format_lsn(rec.lsn)} links back to {format_lsn(rec.prev)}, but the last record of "
            f"timeline {tl.timeline} starts at {format_lsn(prev)}: foreign or diverged WAL")


def describe_writer(tl: Timeline) -> str:
    if tl.writer_kind == WRITER_NONE:
        return f"no writer (epoch {tl.writer_epoch})"
    return f"{WRITER_KINDS[tl.writer_kind]} {tl.writer_name!r} (epoch {tl.writer_epoch})"


def _describe(tl: Timeline) -> str:
    return f"timeline {tl.name!r} ({tl.timeline})" if tl.name else f"timeline {tl.timeline}"


def _page_lsn(page: bytes) -> int:
    hi = int.from_bytes(page[0:4], "little")
    lo = int.from_bytes(page[4:8], "little")
    return (hi << 32) | lo


def _check_hex_id(value: str, what: str) -> None:
    if len(value) != 32 or any(ch not in "0123456789abcdef" for ch in value):
        raise InvalidRequestError(f"{what} id must be 32 lowercase hex digits, got {value!r}")
