"""Read what a repository holds durably, without opening it: a running page server may own it.

Tests and operators use this to see exactly what survived (the layer files
the timelines' manifests name), e.g. after a kill -9. Nothing is written.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .keys import WAL_RECORD_KEY
from .storage.delta_layer import DeltaLayerReader
from .storage.manifest import load_manifest
from .storage.store import DiskLayerStore


def timeline_start(repo_dir: Path, tenant: str, timeline: str) -> int:
    """The LSN the timeline was created or imported at (its catalog row)."""
    db = sqlite3.connect(f"file:{Path(repo_dir) / 'repository.sqlite'}?mode=ro", uri=True, timeout=60)
    try:
        row = db.execute("SELECT start_lsn FROM timelines WHERE tenant = ? AND timeline = ?",
                         (tenant, timeline)).fetchone()
    finally:
        db.close()
    if row is None:
        raise LookupError(f"timeline {timeline} of tenant {tenant} is not in {repo_dir}")
    return int(row[0])


def durable_records(repo_dir: Path, tenant: str, timeline: str) -> list[tuple[int, int, bytes]]:
    """(start LSN, end LSN, raw record) of every WAL record of the timeline in its layer files
    (not its ancestors'), in WAL order."""
    root = Path(repo_dir) / "tenants" / tenant / "timelines" / timeline
    store = DiskLayerStore(root, create=False, clean=False)
    manifest = load_manifest(store)
    if manifest is None:
        return []
    out: dict[int, tuple[int, int, bytes]] = {}
    for desc in manifest.descs():
        if desc.is_delta:
            with DeltaLayerReader.open(store, desc.file_name) as reader:
                for end, value in reader.versions_between(WAL_RECORD_KEY, 0, desc.lsn_end):
                    out[end] = (value.start_lsn, end, value.data)
    return [out[end] for end in sorted(out)]
