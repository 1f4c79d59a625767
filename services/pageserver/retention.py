"""What garbage collection keeps: pure decisions over one key's versions, no I/O.

GC of a timeline picks a cutoff LSN C. From then on reads are served at C or
later only, plus at each child branch point B < C (a child reads its parent
at B forever). These are the *retained LSNs*. For every key, a read at a
retained LSN walks the key's versions newest-first from that LSN, exactly as
Repository.get_page / get_file / rel_size do, and stops at the first version
that stands alone (an image, a record that initializes the page, a whole-file
value or a deletion); a read above C walks the versions above C and then the
same chain as a read at C. So every version on one of those chains is kept;
everything else at or below C is garbage.

The chain at C is made as short as it gets by writing the page as of C as an
image at the LSN of the key's newest version at or below C (the page does
not change between that version and C); the records below it are then only
kept for branch points that still need them.

Neon's GC has the same shape (pageserver/src/tenant/timeline.rs, gc_timeline
with its retain_lsns and the "latest version below the horizon" rule); this
is our own version of it for per-key versions instead of layer files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .keys import KIND_DELETED, KIND_FILE, KIND_IMAGE, KIND_RECORD, KIND_RECORD_INIT

# Kinds a read stops at: nothing older is needed to produce the value.
_STANDALONE = frozenset({KIND_IMAGE, KIND_RECORD_INIT, KIND_FILE, KIND_DELETED})


class Version(NamedTuple):
    """One row of page_versions for a key: (end LSN of the change, kind)."""

    lsn: int
    kind: int


def newest_first(versions: Iterable[Version]) -> list[Version]:
    """The order reads walk versions in: LSN descending, images before records at one LSN."""
    return sorted(versions, key=lambda v: (-v.lsn, v.kind))


def chain_at(versions: Sequence[Version], lsn: int) -> list[Version]:
    """The versions a read at `lsn` uses (newest first), given the versions newest-first.

    An empty chain, or one that ends on a plain record, means the read goes on
    into the ancestor timeline at the branch point (or finds nothing).
    """
    chain: list[Version] = []
    for v in versions:
        if v.lsn > lsn:
            continue
        chain.append(v)
        if v.kind in _STANDALONE:
            break
    return chain


@dataclass(frozen=True, slots=True)
class KeyPlan:
    """GC of one key: write an image at `image_lsn` (if set), then delete `delete`."""

    image_lsn: int | None
    keep: frozenset[Version]
    delete: tuple[Version, ...]

    @property
    def kept_records(self) -> list[int]:
        """LSNs of the kept record versions (their WAL records must stay too)."""
        return [v.lsn for v in self.keep if v.kind in (KIND_RECORD, KIND_RECORD_INIT)]


def plan_key(
    versions: Sequence[Version],
    cutoff: int,
    branch_points: Sequence[int],
    *,
    live_at_cutoff: bool,
    root: bool,
) -> KeyPlan:
    """Decide GC of one key from its versions at or below `cutoff` (newest first).

    `branch_points`: the child branch points below the cutoff. `live_at_cutoff`:
    False for a page of a relation fork that does not exist as of the cutoff
    (dropped): nothing reads it at or after the cutoff, so no image is written
    and only branch points keep its versions. `root`: the timeline has no ancestor, so a
    deletion with nothing older kept below it can go too (on a branch it must
    stay: it hides the ancestor's value).
    """
    if not versions:
        return KeyPlan(None, frozenset(), ())
    if any(v.lsn > cutoff for v in versions):
        raise ValueError("plan_key takes the versions at or below the cutoff only")
    image_lsn: int | None = None
    if not live_at_cutoff:
        keep: set[Version] = set()
    elif versions[0].kind in (KIND_RECORD, KIND_RECORD_INIT):
        image_lsn = versions[0].lsn
        image = Version(image_lsn, KIND_IMAGE)
        versions = [image, *versions]
        keep = {image}
    else:
        keep = set(chain_at(versions, cutoff))
    for lsn in branch_points:
        if lsn < cutoff:
            keep.update(chain_at(versions, lsn))
    if root and keep and all(v.kind == KIND_DELETED for v in keep):
        keep = set()  # reading finds no version either way: the file does not exist
    delete = tuple(v for v in versions if v not in keep)  # the new image is kept: never in here
    return KeyPlan(image_lsn, frozenset(keep), delete)


def plan_sizes(entries: Sequence[tuple[int, int]], cutoff: int, branch_points: Sequence[int],
               *, root: bool) -> list[int]:
    """LSNs of the rel_sizes entries of one relation fork to delete.

    `entries`: (lsn, nblocks) at or below the cutoff, newest first; nblocks -1
    marks a drop. The newest entry at or below each retained LSN stays; on a
    root timeline a drop with nothing older kept goes too.
    """
    keep: set[int] = set()
    for lsn in (cutoff, *branch_points):
        newest = next((e for e in entries if e[0] <= lsn), None)
        if newest is not None:
            keep.add(newest[0])
    if root and keep and all(n < 0 for lsn, n in entries if lsn in keep):
        keep = set()
    return [lsn for lsn, _ in entries if lsn not in keep]


@dataclass(frozen=True, slots=True)
class WalWindow:
    """Records a base backup at `upto` scans: those starting at or after `start`, ending by `upto`."""

    start: int
    upto: int

    def holds(self, start_lsn: int, end_lsn: int) -> bool:
        return start_lsn >= self.start and end_lsn <= self.upto


@dataclass(slots=True)
class GcResult:
    """What one GC run of a timeline did."""

    timeline: str
    previous_cutoff: int
    cutoff: int
    retained_lsns: list[int] = field(default_factory=list)  # child branch points below the cutoff
    keys_scanned: int = 0
    versions_removed: int = 0
    images_written: int = 0
    rel_sizes_removed: int = 0
    wal_records_removed: int = 0
    keys_failed: int = 0  # pages redo could not build at the cutoff: left as they were
    seconds: float = 0.0
