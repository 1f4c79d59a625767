"""What the page server does to a timeline's layers besides ingest: image layers and GC.

**Image layers.** `create_image_layer` writes the value of every key of the
timeline as of one LSN (a record's end) into one image layer over the whole
key space: what the timeline's layers hold and, for a branch, what it reads
through its ancestors, so a read that reaches the layer stops there. Keys
are visited in order, streaming over the layers (never all keys in memory);
pages that exist only as WAL are redone a batch at a time. A timeline's
older image layers above its GC cutoff are only shortcuts (the delta layers
above the cutoff are all kept), so a new one replaces them.

**GC.** `gc_timeline` moves the timeline's GC cutoff up (reads below it are
refused from then on), writes an image layer at the cutoff when layers
below it could otherwise go, and deletes every layer no read at or above
the cutoff, or at a child's branch point, visits, keeping those that hold
WAL records a base backup at one of those LSNs scans (from the redo point
of the checkpoint in force there). Neon's counterparts are compaction's
image layer creation and gc_timeline (pageserver/src/tenant/timeline.rs).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from pgformat.controlfile import parse_checkpoint, parse_control_file
from pgformat.lsn import format_lsn

from .keys import (
    CHECKPOINT_KEY,
    COMMIT_TIME_KEY,
    CONTROL_FILE_KEY,
    KIND_DELETED,
    KeyKind,
    RelTag,
    decode_key,
)
from .repository import (
    InvalidRequestError,
    LayerCancelledError,
    RedoJob,
    Repository,
    Timeline,
    _page_versions,
)
from .storage.image_layer import ImageLayerWriter
from .storage.layer_desc import KEY_MAX, KEY_MIN, LayerDesc
from .storage.values import Value

log = logging.getLogger(__name__)

# Keys whose values an image layer takes a batch at a time (pages needing redo go in one call).
IMAGE_BATCH: Final = 256


@dataclass(slots=True)
class GcResult:
    """What one GC run of a timeline did."""

    timeline: str
    previous_cutoff: int
    cutoff: int
    retained_lsns: list[int] = field(default_factory=list)  # child branch points below the cutoff
    images_written: int = 0  # image layers written at the cutoff
    layers_removed: int = 0
    bytes_removed: int = 0
    seconds: float = 0.0


# -- image layers ---------------------------------------------------------------------------


def create_image_layer(repo: Repository, tl: Timeline, lsn: int,
                       cancel: threading.Event | None = None) -> LayerDesc:
    """An image layer of `tl` at `lsn` (snapped back to a record's end); the existing one if
    there is one. Setting `cancel` abandons it (LayerCancelledError) leaving nothing behind."""
    if lsn > tl.last_record_lsn:
        raise InvalidRequestError(f"image layer at {format_lsn(lsn)}: beyond the last record of "
                                  f"timeline {tl.timeline} ({format_lsn(tl.last_record_lsn)})")
    repo.check_gc_cutoff(tl, lsn)
    lsn = repo.record_boundary_at(tl, lsn)[0]
    for desc in repo.image_layers(tl):
        if desc.lsn_start == lsn:
            return desc
    started = time.monotonic()
    if lsn > tl.layers.disk_consistent_lsn:
        # Layer files answer only below what the open and frozen layers hold.
        tl.layers.flush_all()
    desc = LayerDesc.image(KEY_MIN, KEY_MAX, lsn)
    writer = ImageLayerWriter(tl.layers.store, desc)
    try:
        for key, value in _values_at(repo, tl, lsn, cancel):
            writer.add(key, value)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    tl.layers.add_layer(desc)
    replaced = [d for d in repo.image_layers(tl) if d != desc and d.lsn_start > tl.gc_cutoff_lsn]
    tl.layers.remove_layers(replaced)
    log.info("image layer written", extra={
        "timeline": tl.timeline, "lsn": format_lsn(lsn), "keys": writer.entry_count,
        "bytes": tl.layers.layer_sizes().get(desc.file_name, 0), "replaced": len(replaced),
        "seconds": round(time.monotonic() - started, 2)})
    return desc


def _keys(repo: Repository, tl: Timeline, lsn: int) -> Iterator[bytes]:
    """Every key that may have a value as of `lsn` through the lineage, once each, in order."""
    last = None
    streams = [t.layers.keys(KEY_MIN, KEY_MAX, upto) for t, upto in repo._lineage(tl, lsn)]
    for key in heapq.merge(*streams):
        if key != last:
            yield key
            last = key


def _values_at(repo: Repository, tl: Timeline, lsn: int,
               cancel: threading.Event | None) -> Iterator[tuple[bytes, Value]]:
    """(key, value as of `lsn`) in key order, for every key that has one; pages redone in batches."""
    lineage = list(repo._lineage(tl, lsn))
    sizes: dict[RelTag, int | None] = {}
    batch: list[bytes] = []

    def flush() -> Iterator[tuple[bytes, Value]]:
        if cancel is not None and cancel.is_set():
            raise LayerCancelledError(f"image layer of timeline {tl.timeline} cancelled")
        out: list[tuple[bytes, Value | None]] = []
        jobs: list[RedoJob] = []
        slots: list[int] = []
        for key in batch:
            found = repo.versions(lineage, key)
            if not found or found[0][1].kind == KIND_DELETED:
                continue
            kind = key[0]
            if kind == KeyKind.COMMIT_TIME:
                continue  # the times of commits are history, not state: delta layers keep them
            if kind == KeyKind.WAL_RECORD:
                if found[0][0] == lsn:  # the record ending at the layer's LSN: where WAL goes on
                    out.append((key, found[0][1]))
                continue
            if kind in (KeyKind.REL_PAGE, KeyKind.SLRU_PAGE):
                if kind == KeyKind.REL_PAGE and not _within_rel(repo, tl, key, lsn, sizes):
                    continue  # a page of a dropped relation or beyond a truncation
                pv = _page_versions(found)
                if pv.records:
                    jobs.append((key, pv.base, pv.records))
                    slots.append(len(out))
                    out.append((key, None))
                elif pv.base is not None:
                    out.append((key, Value.image(pv.base)))
                continue
            out.append((key, found[0][1]))
        if jobs:
            for slot, page in zip(slots, repo.redo.redo_many(jobs)):
                out[slot] = (out[slot][0], Value.image(page))
        batch.clear()
        for key, value in out:
            assert value is not None
            yield key, value

    for key in _keys(repo, tl, lsn):
        if key == COMMIT_TIME_KEY:
            continue
        batch.append(key)
        if len(batch) >= IMAGE_BATCH:
            yield from flush()
    yield from flush()


def _within_rel(repo: Repository, tl: Timeline, key: bytes, lsn: int, sizes: dict[RelTag, int | None]) -> bool:
    _, spc, db, rel, fork, blk = decode_key(key)
    tag = RelTag(spc, db, rel, fork)
    if tag not in sizes:
        sizes[tag] = repo.rel_size(tl, tag, lsn)
    size = sizes[tag]
    return size is not None and blk < size


def image_debt(repo: Repository, tl: Timeline) -> tuple[int, int]:
    """(bytes of WAL a read at the last LSN may replay above the newest image layer in reach,
    bytes of that image layer; 0 without one): what decides whether a new image layer is due."""
    image: LayerDesc | None = None
    image_bytes = 0
    debt = 0
    for t, upto in repo._lineage(tl, tl.last_record_lsn):
        sizes = t.layers.layer_sizes()
        images = [d for d in t.layers.descs() if d.is_image and d.lsn_start <= upto]
        image = max(images, key=lambda d: d.lsn_start, default=None)
        floor = image.lsn_start if image is not None else t.start_lsn
        debt += max(0, min(upto, t.last_record_lsn) - floor)
        if image is not None:
            image_bytes = sizes.get(image.file_name, 0)
            break
    return debt, image_bytes


# -- garbage collection -----------------------------------------------------------------------


def gc_timeline(repo: Repository, tl: Timeline, horizon_lsn: int) -> GcResult:
    """Move the GC cutoff of `tl` up to min(horizon, last record LSN), snapped back to the end of a
    record, and delete the layers no read needs any more (see the module docstring).

    The cutoff is made durable first; a crash after that leaves every read at or
    above it intact, and running GC again finishes the job.
    """
    started = time.monotonic()
    previous, cutoff, branch_points = repo.set_gc_cutoff(tl, horizon_lsn)
    result = GcResult(tl.timeline, previous, cutoff, retained_lsns=sorted(branch_points))
    layers = tl.layers
    if cutoff > 0:
        below = [d for d in layers.descs() if d.lsn_end <= cutoff]
        if below and not layers.has_image_at(cutoff):
            create_image_layer(repo, tl, cutoff)
            result.images_written = 1
        # A base backup at a retained LSN scans the WAL from the redo point of the checkpoint
        # in force there: the layers holding those records stay.
        windows = [(min(_checkpoint_redo_at(repo, tl, lsn), lsn), lsn) for lsn in (cutoff, *branch_points)]
        doomed = [d for d in layers.gc_candidates(cutoff, branch_points)
                  if d.is_image or not any(d.lsn_start <= upto and d.lsn_end > start for start, upto in windows)]
        result.layers_removed = len(doomed)
        result.bytes_removed = layers.remove_layers(doomed)
    result.seconds = time.monotonic() - started
    log.info("gc of timeline %s: cutoff %s -> %s, %d image layers written, %d layers (%d bytes) removed, "
             "%d branch points kept, %.2fs", tl.timeline, format_lsn(previous), format_lsn(cutoff),
             result.images_written, result.layers_removed, result.bytes_removed, len(branch_points), result.seconds)
    return result


def _checkpoint_redo_at(repo: Repository, tl: Timeline, lsn: int) -> int:
    """Redo LSN of the checkpoint in force at `lsn` (what a base backup there starts scanning from)."""
    image = repo.get_file(tl, CHECKPOINT_KEY, lsn)
    if image is not None:
        return parse_checkpoint(image).redo
    control = repo.get_file(tl, CONTROL_FILE_KEY, lsn)
    if control is not None:
        return parse_control_file(control, verify_crc=False).checkpoint_copy.redo
    return lsn  # no pg_control: no base backup of this timeline, nothing to scan
