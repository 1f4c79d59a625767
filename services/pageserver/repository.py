"""The page server's repository: tenants, timelines and every page version, on disk.

Each timeline's history lives in its layers (storage/): ingest appends to
the timeline's open layer (an ephemeral file and an index in memory: no
fsync, no database row per record); a full or old open layer is frozen and
written out as an immutable delta layer, and only then, when the timeline's
manifest names it, does `disk_consistent_lsn` move up: that is what the page
server reports as durable, and the walreceiver keeps its WAL above it
(DESIGN.md: WAL-first durability). After a crash the open layers are gone
and the walreceiver resends from there. Image layers (every key of the
timeline as of one LSN) are made in the background and by GC; a read stops
at the first one it meets.

What layers hold, besides relation and SLRU pages, are versioned keys
(keys.py): relation sizes, relmapper / two-phase / checkpoint / control
files, the commit time of each commit and each raw WAL record (record
boundaries for branch points and GC, the records a base backup scans).

A small SQLite catalog (`repository.sqlite`, every change fsync'd) keeps
the tenants and the timelines: ancestor and branch point, start, GC cutoff,
writer. A branch is one catalog row and an empty manifest: O(1).

A GetPage@LSN takes the key's versions newest first from the timeline's
layers down to an image or a record that initializes the page, descending
into the ancestor at the branch point, and hands base image and records to
redo. Garbage collection (`gc`) moves a timeline's GC cutoff forward (reads
below it fail with LsnOutOfRangeError) and deletes the layers no read at or
above the cutoff (or at a child's branch point) needs: maintenance.py.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from pgformat.checksum import with_checksums
from pgformat.constants import BLCKSZ
from pgformat.controlfile import parse_control_file
from pgformat.lsn import format_lsn
from pgformat.rmgr import RM_XLOG_ID, XLOG_OVERWRITE_CONTRECORD
from pgformat.xlogreader import next_record_starts
from pgformat.xlogrecord import DecodedRecord, decode_record

from .ingest import IngestPlan, plan_record
from .keys import (
    COMMIT_TIME_KEY,
    CONTROL_FILE_KEY,
    KIND_DELETED,
    KIND_IMAGE,
    KIND_RECORD,
    KIND_RECORD_INIT,
    WAL_RECORD_KEY,
    KeyKind,
    RelTag,
    decode_key,
    kind_range,
    rel_of_size_key,
    rel_size_key,
    relmap_key,
)
from .page_chunks import CHUNK_PAGES, PageChunk
from .storage.compaction import COMPACT_L0_AT, compact_l0
from .storage.layer_desc import LayerDesc
from .storage.manifest import load_manifest
from .storage.store import DiskLayerStore
from .storage.timeline_layers import DEFAULT_CHECKPOINT_DISTANCE, TimelineLayers
from .storage.values import Value

if TYPE_CHECKING:
    from .maintenance import GcResult

log = logging.getLogger(__name__)

DEFAULT_TENANT: Final = "00000000000000000000000000000000"
MAX_LSN: Final = (1 << 63) - 1  # SQLite integers are signed 64-bit; no real LSN gets near
ZERO_PAGE: Final = bytes(BLCKSZ)
LOCK_FILE: Final = "LOCK"
# An open layer older than this is frozen and flushed even when small (Neon: checkpoint_timeout).
DEFAULT_CHECKPOINT_TIMEOUT: Final = 10.0

# Writer kinds, as pageserver.proto's WriterKind numbers them.
WRITER_NONE: Final = 0
WRITER_PRIMARY: Final = 1
WRITER_COMPUTE: Final = 2
WRITER_KINDS: Final = {WRITER_PRIMARY: "primary", WRITER_COMPUTE: "compute"}

__all__ = ["KIND_DELETED", "KIND_IMAGE", "KIND_RECORD", "KIND_RECORD_INIT", "Repository", "Timeline"]

_SCHEMA = """
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
"""
# (timelines.last_record_lsn is the LSN a timeline was created or imported at; where its WAL
# ends now is its layers' business.)


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


class LayerCancelledError(RepositoryError):
    """An image layer was abandoned on request (the page server is stopping)."""


# One page to rebuild: (key, base image or None, records oldest first).
RedoJob = tuple[bytes, bytes | None, Sequence[DecodedRecord]]


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
class PageVersions:
    """What makes one page as of an LSN: a base image (or none) and the records after it, oldest first."""

    base: bytes | None
    base_lsn: int
    records: list[DecodedRecord]
    exists: bool  # False: no version at all (the caller decides between zeroes and NOT_FOUND)


@dataclass
class BackupView:
    """What `fork_chunks` reads as of (tl, lsn): see Repository.backup_view."""

    tl: Timeline
    lsn: int
    checksums: bool
    lineage: list[tuple[Timeline, int]]


@dataclass
class Timeline:
    """In-memory state of one timeline; its catalog row and its layers are the durable copy."""

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
    layers: TimelineLayers = field(default=None, repr=False)  # type: ignore[assignment]
    # Held by ingest, imports and writer changes of this timeline.
    ingest_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # Ingest-side cache of relation sizes at last_record_lsn (None: dropped / unknown).
    rel_size_cache: dict[RelTag, int | None] = field(default_factory=dict, repr=False)
    lsn_changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def disk_consistent_lsn(self) -> int:
        """Everything up to here is in layer files the manifest names; the walreceiver keeps WAL above it."""
        return self.layers.disk_consistent_lsn

    @property
    def durable_lsn(self) -> int:
        return self.disk_consistent_lsn


class Repository:
    """All tenants and timelines under one directory."""

    def __init__(self, path: Path, redo: PageRedo | None = None, *,
                 checkpoint_distance: int = DEFAULT_CHECKPOINT_DISTANCE,
                 checkpoint_timeout: float = DEFAULT_CHECKPOINT_TIMEOUT, compaction_threshold: int = COMPACT_L0_AT,
                 lock_wait: float = 0.0) -> None:
        """`compaction_threshold`: L0 layers that make a compaction due at the periodic checkpoint
        (0: never compact)."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.db_path = self.path / "repository.sqlite"
        self.redo: PageRedo = redo if redo is not None else LocalRedo()
        self.checkpoint_distance = checkpoint_distance
        self.checkpoint_timeout = checkpoint_timeout
        self.compaction_threshold = compaction_threshold
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._timelines: dict[int, Timeline] = {}
        self._by_name: dict[tuple[str, str], int] = {}
        self._gc_lock = threading.Lock()  # one GC or image layer at a time
        self._lock_fd = _lock_repository(self.path, lock_wait)
        with self._conn() as conn:
            _refuse_old_format(conn, self.db_path)
            conn.executescript(_SCHEMA)
            _migrate(conn)
        self._load_timelines()

    # -- the catalog -----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One catalog transaction, fsync'd when the block exits without error."""
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _timeline_dir(self, tenant: str, timeline: str) -> Path:
        return self.path / "tenants" / tenant / "timelines" / timeline

    def _open_layers(self, tl: Timeline, *, new: bool) -> TimelineLayers:
        root = self._timeline_dir(tl.tenant, tl.timeline)
        store = DiskLayerStore(root)
        if not new and load_manifest(store) is None:
            raise RepositoryError(
                f"{_describe(tl)} has no manifest in {root}: its layer files are missing or were never "
                f"written; restore that directory from a backup (the catalog alone cannot rebuild it)")
        return TimelineLayers(store, root / "ephemeral", tl.start_lsn, self.checkpoint_distance)

    def sync(self) -> None:
        """Make everything ingested durable: every timeline's open layer is frozen and flushed."""
        for tl in list(self._timelines.values()):
            tl.layers.flush_all()

    def sync_timeline(self, tl: Timeline) -> None:
        tl.layers.flush_all()

    def checkpoint(self) -> bool:
        """The periodic pass: flush frozen layers and open layers older than checkpoint_timeout,
        then compact the L0 layers of timelines that have many. True if some timeline's
        disk_consistent_lsn moved."""
        moved = False
        for tl in list(self._timelines.values()):
            moved = tl.layers.checkpoint(self.checkpoint_timeout) or moved
            if not self.compaction_threshold:
                continue
            started = time.monotonic()
            done = compact_l0(tl.layers, at=self.compaction_threshold)
            if done is not None:
                log.info("compacted %d L0 layers (%d bytes) of %s into %d L1 layers in %.2fs", len(done.merged),
                         done.bytes_merged, _describe(tl), len(done.written), time.monotonic() - started)
        return moved

    def close(self) -> None:
        for tl in self._timelines.values():
            tl.layers.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1

    # -- tenants and timelines ---------------------------------------------------

    def _load_timelines(self) -> None:
        rows = self._conn().execute(
            "SELECT id, tenant, timeline, name, ancestor_id, ancestor_lsn, start_lsn, last_record_lsn,"
            " prev_record_lsn, system_id, pg_version, created_at, gc_cutoff_lsn, writer_kind, writer_name,"
            " writer_epoch FROM timelines ORDER BY id"
        ).fetchall()
        for row in rows:
            tl = Timeline(*row)
            tl.layers = self._open_layers(tl, new=False)
            self._timelines[tl.id] = tl
            self._by_name[(tl.tenant, tl.timeline)] = tl.id
        for tl in self._timelines.values():
            # The WAL ends where the layer files end (what the open layer held is resent).
            durable = tl.layers.disk_consistent_lsn
            if durable > tl.last_record_lsn:
                end, start = self.record_boundary_at(tl, durable)
                tl.last_record_lsn, tl.prev_record_lsn = end, start
            tl.layers.last_lsn = max(tl.layers.last_lsn, tl.last_record_lsn)

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
            if (tenant, timeline) in self._by_name:
                raise AlreadyExistsError(f"timeline {timeline} already exists in tenant {tenant}")
            if name is not None and any(t.tenant == tenant and t.name == name for t in self._timelines.values()):
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
                if lsn > parent.disk_consistent_lsn:
                    # The child reads the parent at the branch point without waiting for it:
                    # what it reads there must survive a crash of this process.
                    parent.layers.flush_all()
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
            # The layer directory first: a crash before the catalog commit leaves an unnamed
            # directory (harmless, reused by nobody: timeline ids are new), never a row without one.
            shutil.rmtree(self._timeline_dir(tenant, timeline), ignore_errors=True)
            with self._write() as conn:
                cur = conn.execute(
                    "INSERT INTO timelines (tenant, timeline, name, ancestor_id, ancestor_lsn, start_lsn,"
                    " last_record_lsn, prev_record_lsn, system_id, pg_version, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, timeline, name, ancestor_id, ancestor_lsn or 0, start_lsn, start_lsn,
                     prev_record_lsn, system_id, pg_version, now),
                )
                tl = Timeline(int(cur.lastrowid or 0), tenant, timeline, name, ancestor_id, ancestor_lsn or 0,
                              start_lsn, start_lsn, prev_record_lsn, system_id, pg_version, now)
                tl.layers = self._open_layers(tl, new=True)
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
        root = tl
        for t, upto in self._lineage(tl, lsn):
            found, done = t.layers.versions(WAL_RECORD_KEY, upto)
            if found:
                end, value = found[0]
                return end, value.start_lsn
            root = t
            if done:
                break
        # Nothing ingested between the root's import LSN and `lsn`.
        return root.start_lsn, root.prev_record_lsn if root.ancestor_id is None else 0

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

    def all_timelines(self) -> list[Timeline]:
        return sorted(self._timelines.values(), key=lambda t: t.id)

    def children_of(self, tl: Timeline) -> list[Timeline]:
        return [c for c in self._timelines.values() if c.ancestor_id == tl.id]

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
        """Store a batch of consecutive records; return the new last record LSN.

        Records ending at or before what is already stored are skipped, so a
        walreceiver may resend after a reconnect. The others must continue the
        stored WAL: start where the last record ended (after a page header on
        a page boundary) and link back to it by xl_prev; and a timeline that
        was ever claimed takes them only from its writer's epoch. Otherwise
        ConflictError and nothing of the batch is stored. Records go to the
        open layer: durable once a flush has written them out
        (disk_consistent_lsn).
        """
        # The timeline's ingest lock spans the check and the in-memory LSN update, so a second
        # Ingest stream (a walreceiver reconnecting) never reads a stale position; claims take
        # it too, so no batch of a fenced writer lands after the claim. Other timelines ingest
        # meanwhile.
        with tl.ingest_lock:
            self.check_writer(tl, writer_epoch)
            # The whole batch must continue the stored WAL before any of it is stored.
            new: list[DecodedRecord] = []
            last, prev = tl.last_record_lsn, tl.prev_record_lsn
            for rec in records:
                if rec.end_lsn <= last:
                    continue
                if rec.lsn < last:
                    raise InvalidRequestError(
                        f"record at {format_lsn(rec.lsn)} overlaps the stored WAL ending at {format_lsn(last)}"
                    )
                if last:
                    _check_continuity(tl, rec, last, prev)
                new.append(rec)
                prev, last = rec.lsn, rec.end_lsn
            try:
                for rec in new:
                    self._apply(tl, rec, plan_record(rec))
                    # Record by record: a failure part-way (a record that cannot be planned)
                    # keeps what came before it; a resend repeats the failed record's versions.
                    tl.last_record_lsn, tl.prev_record_lsn = rec.end_lsn, rec.lsn
            finally:
                with tl.lsn_changed:
                    tl.lsn_changed.notify_all()
        return tl.last_record_lsn


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
        with tl.ingest_lock:
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
        with tl.ingest_lock:
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

    def _apply(self, tl: Timeline, rec: DecodedRecord, plan: IngestPlan) -> None:
        lsn = rec.end_lsn
        layers = tl.layers
        for rel in plan.creates:
            if self._cached_size(tl, rel, lsn) is None:
                self._set_size(tl, rel, lsn, 0)
        # The record is stored once, filed under every page it changes and under the WAL key
        # (one version per record: where records end, what a base backup scans).
        pages = list(plan.pages)
        for rel, blkno in plan.implied:
            size = self._cached_size(tl, rel, lsn)
            if size is not None and blkno < size:
                pages.append((rel.page_key(blkno), False))
        pages.append((WAL_RECORD_KEY, True))
        layers.put_record(lsn, rec.raw, rec.lsn, pages)
        for rel, nblocks in plan.extends:
            size = self._cached_size(tl, rel, lsn)
            if size is None or size < nblocks:
                self._set_size(tl, rel, lsn, nblocks)
        for rel, nblocks in plan.truncates:
            size = self._cached_size(tl, rel, lsn)
            if size is not None and size > nblocks:
                self._set_size(tl, rel, lsn, nblocks)
        for spc, db, relnode in plan.drops:
            for fork in range(4):
                rel = RelTag(spc, db, relnode, fork)
                if self._cached_size(tl, rel, lsn) is not None:
                    self._set_size(tl, rel, lsn, None)
        for spc, db in plan.db_drops:
            for rel in self.list_rels(tl, lsn - 1, spc, db):
                self._set_size(tl, rel, lsn, None)
        for src_spc, src_db, dst_spc, dst_db in plan.db_copies:
            self._copy_database(tl, rec, src_spc, src_db, dst_spc, dst_db)
        for key, value in plan.files:
            layers.put(key, lsn, Value.file(value) if value is not None else Value.deleted())
        if plan.commit_time is not None:
            layers.put(COMMIT_TIME_KEY, lsn, Value.file(plan.commit_time.to_bytes(8, "big", signed=True)))

    def _copy_database(self, tl: Timeline, rec: DecodedRecord, src_spc: int, src_db: int,
                       dst_spc: int, dst_db: int) -> None:
        """CREATE DATABASE ... STRATEGY FILE_COPY: every page of the template, as images at this LSN."""
        lsn = rec.end_lsn
        view = BackupView(tl, rec.lsn, False, list(self._lineage(tl, rec.lsn)))
        for rel in self.list_rels(tl, rec.lsn, src_spc, src_db):
            nblocks = self.rel_size(tl, rel, rec.lsn) or 0
            dst = RelTag(dst_spc, dst_db, rel.rel, rel.fork)
            for chunk in self.fork_chunks(view, rel, nblocks):
                for i in range(chunk.npages):
                    tl.layers.put(dst.page_key(chunk.first_blk + i), lsn,
                                  Value.image(chunk.data[i * BLCKSZ:(i + 1) * BLCKSZ]))
            self._set_size(tl, dst, lsn, nblocks)
        relmap = self.get_file(tl, relmap_key(src_spc, src_db), rec.lsn)
        if relmap is not None:  # the copied database's mapped catalogs need the template's map
            tl.layers.put(relmap_key(dst_spc, dst_db), lsn, Value.file(relmap))

    def _cached_size(self, tl: Timeline, rel: RelTag, lsn: int) -> int | None:
        if rel not in tl.rel_size_cache:
            tl.rel_size_cache[rel] = self.rel_size(tl, rel, lsn)
        return tl.rel_size_cache[rel]

    def _set_size(self, tl: Timeline, rel: RelTag, lsn: int, nblocks: int | None) -> None:
        """The fork's size from `lsn` on (None: dropped)."""
        tl.layers.put(rel_size_key(rel), lsn,
                      Value.file(nblocks.to_bytes(4, "big")) if nblocks is not None else Value.deleted())
        tl.rel_size_cache[rel] = nblocks

    @contextmanager
    def import_transaction(
        self, tl: Timeline, lsn: int, prev_record_lsn: int, system_id: int, pg_version: int
    ) -> Iterator[ImportWriter]:
        """Load a base image at `lsn` into an empty root timeline: all of it, or (on error) none."""
        if tl.ancestor_id is not None or tl.last_record_lsn != tl.start_lsn or tl.layers.last_lsn > tl.start_lsn:
            raise InvalidRequestError(f"timeline {tl.timeline} is not an empty root timeline")
        with tl.ingest_lock:  # ingest of other timelines goes on
            try:
                writer = ImportWriter(self, tl, lsn)
                yield writer
                tl.layers.flush_all()
            except BaseException:
                # Nothing of it stays: the timeline's layers start over, empty.
                tl.layers.close()
                shutil.rmtree(self._timeline_dir(tl.tenant, tl.timeline), ignore_errors=True)
                tl.layers = self._open_layers(tl, new=True)
                tl.rel_size_cache.clear()
                raise
            with self._write() as conn:
                conn.execute(
                    "UPDATE timelines SET start_lsn = ?, last_record_lsn = ?, prev_record_lsn = ?, system_id = ?,"
                    " pg_version = ? WHERE id = ?",
                    (lsn, lsn, prev_record_lsn, system_id, pg_version, tl.id),
                )
        with tl.lsn_changed:
            tl.start_lsn = tl.last_record_lsn = lsn
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

    def versions(self, lineage: Iterable[tuple[Timeline, int]], key: bytes) -> list[tuple[int, Value]]:
        """The versions of `key` a read at the end of `lineage` uses, newest first: down to one
        that stands alone, through the ancestors (empty: the key has no value there)."""
        out: list[tuple[int, Value]] = []
        for t, upto in lineage:
            found, done = t.layers.versions(key, upto)
            out += found
            if done:
                break
        return out

    def versions_many(self, lineage: Sequence[tuple[Timeline, int]], keys: list[bytes]) -> list[list[tuple[int, Value]]]:
        """`versions` of each of `keys` (sorted, close together), each layer read once for them all."""
        out: list[list[tuple[int, Value]]] = [[] for _ in keys]
        todo = list(range(len(keys)))
        for t, upto in lineage:
            if not todo:
                break
            found = t.layers.versions_many([keys[i] for i in todo], upto)
            left = []
            for i, (versions, done) in zip(todo, found):
                out[i] += versions
                if not done:
                    left.append(i)
            todo = left
        return out

    def _value(self, tl: Timeline, key: bytes, lsn: int) -> bytes | None:
        """A whole-value key (file, size) as of `lsn`: its bytes, None if absent or deleted."""
        found = self.versions(self._lineage(tl, lsn), key)
        if not found or found[0][1].kind == KIND_DELETED:
            return None
        return found[0][1].data

    def rel_size(self, tl: Timeline, rel: RelTag, lsn: int) -> int | None:
        """Blocks in the relation fork as of `lsn`, or None if it does not exist then."""
        data = self._value(tl, rel_size_key(rel), lsn)
        return int.from_bytes(data, "big") if data is not None else None

    def _keys(self, tl: Timeline, lsn: int, start: bytes, end: bytes) -> list[bytes]:
        """Keys in [start, end) that may have a value as of `lsn` (a superset), sorted."""
        found: set[bytes] = set()
        for t, upto in self._lineage(tl, lsn):
            found.update(t.layers.keys(start, end, upto))
        return sorted(found)

    def list_rels(self, tl: Timeline, lsn: int, spc: int | None = None, db: int | None = None) -> list[RelTag]:
        """Every relation fork that exists as of `lsn` (optionally in one database)."""
        if spc is not None and db is not None:
            start, end = rel_size_key(RelTag(spc, db, 0, 0)), rel_size_key(RelTag(spc, db + 1, 0, 0))
        else:
            start, end = kind_range(KeyKind.REL_SIZE)
        lineage = list(self._lineage(tl, lsn))
        rels = []
        for key in self._keys(tl, lsn, start, end):
            rel = rel_of_size_key(key)
            if (spc is None or rel.spc == spc) and (db is None or rel.db == db):
                found = self.versions(lineage, key)
                if found and found[0][1].kind != KIND_DELETED:
                    rels.append(rel)
        return rels

    def find_lsn_by_timestamp(self, tl: Timeline, ts: int) -> tuple[int, int]:
        """(end LSN, timestamp) of the last commit at or before `ts` (TimestampTz), searching the lineage.

        Walks the commit times newest first, a window of WAL at a time (each twice the last)."""
        for t, upto in self._lineage(tl, tl.last_record_lsn):
            floor = t.start_lsn if t.ancestor_id is not None else 0
            hi, width = upto, 1 << 24
            while hi >= floor:
                lo = max(floor, hi - width)
                for lsn, value in reversed(list(t.layers.versions_between(COMMIT_TIME_KEY, lo, hi))):
                    when = int.from_bytes(value.data, "big", signed=True)
                    if when <= ts:
                        return lsn, when
                hi, width = lo - 1, width * 2
        raise NotFoundError(f"no commit at or before that time on timeline {tl.timeline}")

    def db_size(self, tl: Timeline, spc: int, db: int, lsn: int) -> int:
        return sum((self.rel_size(tl, r, lsn) or 0) for r in self.list_rels(tl, lsn, spc, db)) * BLCKSZ

    def get_file(self, tl: Timeline, key: bytes, lsn: int) -> bytes | None:
        """A whole-file value (relmapper, two-phase state, checkpoint) as of `lsn`, or None."""
        return self._value(tl, key, lsn)

    def list_files(self, tl: Timeline, kind: KeyKind, lsn: int) -> dict[bytes, bytes]:
        """Every live whole-file value of one key kind as of `lsn` (e.g. all two-phase files)."""
        out = {}
        for key in self._keys(tl, lsn, *kind_range(kind)):
            value = self._value(tl, key, lsn)
            if value is not None:
                out[key] = value
        return out

    def page_versions(self, tl: Timeline, key: bytes, lsn: int) -> PageVersions:
        """Base image and records that make page `key` as of `lsn` (no redo yet)."""
        return _page_versions(self.versions(self._lineage(tl, lsn), key))

    def get_page(self, tl: Timeline, key: bytes, lsn: int, wait: bool = True,
                 timeout: float = 30.0) -> tuple[bytes, int]:
        """The page `key` as of `lsn`: (8192 bytes, its pd_lsn; for SLRU pages the LSN of its last change)."""
        if wait:
            self.wait_for_lsn(tl, lsn, timeout)
        pv = self.page_versions(tl, key, lsn)
        if not pv.records:
            if pv.base is not None:
                # pd_lsn for relation pages; SLRU pages have no LSN of their own.
                return pv.base, _page_lsn(pv.base) if key[0] == KeyKind.REL_PAGE else pv.base_lsn
            return self._missing_page(tl, key, lsn), 0
        page = self.redo.redo(key, pv.base, pv.records)
        # pd_lsn, as Postgres sets it (a record need not bump it: heap_xlog_visible leaves the heap page's
        # LSN alone without checksums); SLRU pages have none: the last record applied.
        return page, _page_lsn(page) if key[0] == KeyKind.REL_PAGE else pv.records[-1].end_lsn

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

    def records_between(self, tl: Timeline, start_lsn: int, end_lsn: int) -> Iterator[DecodedRecord]:
        """Records that start at or after `start_lsn` and end at or before `end_lsn`, oldest first,
        through the ancestors up to each branch point."""
        for t, upto in reversed(list(self._lineage(tl, end_lsn))):
            for end, value in t.layers.versions_between(WAL_RECORD_KEY, start_lsn, upto):
                if value.start_lsn >= start_lsn:
                    yield decode_record(value.data, value.start_lsn, end, verify_crc=False)

    # -- whole relations: base backups and image layers -------------------------------------

    def backup_view(self, tl: Timeline, lsn: int, *, checksums: bool) -> BackupView:
        """How to read every page as of (`tl`, `lsn`); `checksums`: the pages come with pd_checksum
        set (as the cluster has data checksums on or off)."""
        return BackupView(tl, lsn, checksums, list(self._lineage(tl, lsn)))

    def fork_chunks(self, view: BackupView, rel: RelTag, nblocks: int) -> Iterator[PageChunk]:
        """The first `nblocks` pages of a fork as of the view, CHUNK_PAGES at a time in block order;
        the pages of a chunk that exist only as WAL are redone in one batch."""
        for first in range(0, nblocks, CHUNK_PAGES):
            n = min(CHUNK_PAGES, nblocks - first)
            pages: list[bytes] = [ZERO_PAGE] * n
            jobs: list[RedoJob] = []
            where: list[int] = []
            keys = [rel.page_key(first + i) for i in range(n)]
            for i, (key, found) in enumerate(zip(keys, self.versions_many(view.lineage, keys))):
                pv = _page_versions(found)
                if pv.records:
                    jobs.append((key, pv.base, pv.records))
                    where.append(i)
                elif pv.base is not None:
                    pages[i] = pv.base
            if jobs:
                for i, page in zip(where, self.redo.redo_many(jobs)):
                    pages[i] = page
            if view.checksums:
                pages = with_checksums(pages, first)
            yield PageChunk(first, n, b"".join(pages))

    def checksums_at(self, tl: Timeline, lsn: int) -> bool:
        control = self.get_file(tl, CONTROL_FILE_KEY, lsn)
        return control is not None and parse_control_file(control, verify_crc=False).data_checksum_version != 0

    # -- image layers and garbage collection (maintenance.py) ---------------------------------

    def image_layers(self, tl: Timeline) -> list[LayerDesc]:
        """The timeline's own image layers, oldest first."""
        return sorted((d for d in tl.layers.descs() if d.is_image), key=lambda d: d.lsn_start)

    def create_image_layer(self, tl: Timeline, lsn: int | None = None,
                           cancel: threading.Event | None = None) -> LayerDesc:
        from .maintenance import create_image_layer

        with self._gc_lock:
            return create_image_layer(self, tl, tl.last_record_lsn if lsn is None else lsn, cancel)

    def gc(self, tl: Timeline, horizon_lsn: int) -> GcResult:
        from .maintenance import gc_timeline

        with self._gc_lock:
            return gc_timeline(self, tl, horizon_lsn)

    def set_gc_cutoff(self, tl: Timeline, horizon_lsn: int) -> tuple[int, int, list[int]]:
        """Move the GC cutoff up to min(horizon, last record), snapped back to the end of a record;
        (previous cutoff, cutoff, child branch points below it, newest first)."""
        # The cutoff moves under the write lock, the one branch creation checks it under:
        # the children seen here are all the children that will ever read below it.
        with self._write_lock:
            previous = tl.gc_cutoff_lsn
            cutoff = max(previous, self.record_boundary_at(tl, min(horizon_lsn, tl.last_record_lsn))[0])
            if cutoff != previous:
                with self._write() as conn:
                    conn.execute("UPDATE timelines SET gc_cutoff_lsn = ? WHERE id = ?", (cutoff, tl.id))
                tl.gc_cutoff_lsn = cutoff
            branch_points = sorted({c.ancestor_lsn for c in self.children_of(tl) if c.ancestor_lsn < cutoff},
                                   reverse=True)
        return previous, cutoff, branch_points


class ImportWriter:
    """Adds a base image's pages, sizes and files inside one import transaction."""

    def __init__(self, repo: Repository, tl: Timeline, lsn: int) -> None:
        self._repo, self._tl, self._lsn = repo, tl, lsn
        self.pages = 0

    def add_pages(self, pages: Iterable[tuple[RelTag, int, bytes]]) -> None:
        for rel, blk, page in pages:
            if len(page) != BLCKSZ:
                raise InvalidRequestError(f"page {rel} block {blk} is {len(page)} bytes, expected {BLCKSZ}")
            self._tl.layers.put(rel.page_key(blk), self._lsn, Value.image(page))
            self.pages += 1

    def add_sizes(self, sizes: dict[RelTag, int]) -> None:
        for rel, nblocks in sizes.items():
            self._repo._set_size(self._tl, rel, self._lsn, nblocks)

    def add_files(self, files: dict[bytes, bytes]) -> None:
        for key, value in files.items():
            self._tl.layers.put(key, self._lsn, Value.image(value) if key[0] == KeyKind.SLRU_PAGE else Value.file(value))


def _page_versions(found: list[tuple[int, Value]]) -> PageVersions:
    """Split a page's versions (newest first) into base image and records to apply, oldest first."""
    base: bytes | None = None
    base_lsn = 0
    records: list[DecodedRecord] = []
    for lsn, value in reversed(found):
        if value.kind == KIND_IMAGE:
            base, base_lsn, records = value.data, lsn, []
        elif value.is_record:
            if value.will_init:
                base, base_lsn, records = None, 0, []
            records.append(decode_record(value.data, value.start_lsn, lsn, verify_crc=False))
        else:  # a page key never holds a file or a deletion
            raise RepositoryError(f"a page version at {format_lsn(lsn)} is a {value.describe()}")
    return PageVersions(base, base_lsn, records, bool(found))


def _lock_repository(path: Path, wait: float) -> int:
    """An exclusive lock on the repository for as long as the returned descriptor is open (the
    kernel drops it when the process dies, kill -9 included): two page servers writing one
    repository's manifests would lose each other's layers. Waits up to `wait` seconds for a
    predecessor that is still exiting."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RepositoryError(f"repository {path} is in use by another page server (pid {holder}); stop it "
                                  f"first, or give this one its own --repo") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _refuse_old_format(conn: sqlite3.Connection, db_path: Path) -> None:
    """A repository of the SQLite page store (before layers) cannot be read by this version."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'page_versions'").fetchone():
        raise RepositoryError(
            f"{db_path} is a repository of an older page server that kept page versions in SQLite; this "
            f"version keeps them in layer files and does not convert it. Start from a new repository "
            f"(`zctl init` in a new directory, then import or attach the primary again)")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a catalog written by an older version up to the current schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(timelines)")}
    added = [("gc_cutoff_lsn", "INTEGER NOT NULL DEFAULT 0"), ("writer_kind", "INTEGER NOT NULL DEFAULT 0"),
             ("writer_name", "TEXT NOT NULL DEFAULT ''"), ("writer_epoch", "INTEGER NOT NULL DEFAULT 0")]
    for name, decl in added:
        if name not in columns:
            conn.execute(f"ALTER TABLE timelines ADD COLUMN {name} {decl}")
            log.info("repository schema: added timelines.%s", name)


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
