"""Compaction of a timeline's L0 delta layers into L1 delta layers.

Each flush of an open layer adds an L0 delta layer over the whole key space,
and a read visits every one of them above the newest image layer. Once there
are COMPACT_L0_AT of them, `compact_l0` merges them into L1 delta layers over
the same LSN range, split into key ranges of about COMPACT_TARGET bytes that
cover the key space edge to edge: one streaming k-way merge in (key, LSN)
order (the L0 layers are disjoint in LSN), holding a few blocks per input.
The manifest swaps them in one step; a crash before that leaves the L0
layers and an orphan or temporary file, removed at the next open. Neon's
counterpart is compact_level0 (pageserver/src/tenant/timeline/compaction.rs).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from .delta_layer import DeltaLayerReader, DeltaLayerWriter
from .layer_desc import KEY_MAX, KEY_MIN, LayerDesc
from .timeline_layers import TimelineLayers

COMPACT_L0_AT: Final = 8
COMPACT_TARGET: Final = 128 << 20


@dataclass(frozen=True, slots=True)
class Compaction:
    """What one compaction did."""

    merged: list[LayerDesc]
    written: list[LayerDesc]
    bytes_merged: int


def compact_l0(layers: TimelineLayers, *, at: int = COMPACT_L0_AT, target: int = COMPACT_TARGET) -> Compaction | None:
    """Merge the L0 delta layers into L1 layers once there are `at` of them (None: not due)."""
    l0 = [d for d in layers.descs() if d.is_l0]
    if len(l0) < at:
        return None
    lsn_start, lsn_end = min(d.lsn_start for d in l0), max(d.lsn_end for d in l0)
    readers: list[DeltaLayerReader] = []
    for d in l0:
        reader = layers.open_reader(d)
        assert isinstance(reader, DeltaLayerReader)
        readers.append(reader)
    merged: Iterator[tuple[bytes, int, bytes]] = heapq.merge(*(r.iter_encoded() for r in readers))
    written: list[LayerDesc] = []
    writer: DeltaLayerWriter | None = None
    last_key = None
    try:
        for key, lsn, value in merged:
            if writer is not None and key != last_key and writer.approx_size >= target:
                written.append(writer.finish(key_end=key))
                writer = None
            if writer is None:
                start = written[-1].key_end if written else KEY_MIN
                writer = DeltaLayerWriter(layers.store, LayerDesc.delta(start, KEY_MAX, lsn_start, lsn_end))
            writer.add_encoded(key, lsn, value)
            last_key = key
        if writer is not None:
            written.append(writer.finish())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        for d in written:
            layers.store.delete(d.file_name)
        raise
    freed = layers.replace_layers(written, l0)
    return Compaction(l0, written, freed)
