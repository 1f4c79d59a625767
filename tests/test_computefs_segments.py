"""services/computefs/segments.py: which blocks come from the page server, the local overlay or zeroes.

A Segment over a real sparse file; the "page server" is the dict of pages the
caller fetched (segments.py does no gRPC). The reference model is a plain
bytearray of the file as Postgres would see it after the same operations.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pgformat.constants import BLCKSZ
from pgformat.datadir import RELSEG_SIZE
from services.computefs.fs import build_segments
from services.computefs.pages import RelationSize
from services.computefs.segments import RemoteFork, Segment

FORK = RemoteFork(1663, 5, 16384, 0)


def _page(blk: int, version: int = 0) -> bytes:
    return bytes([(blk * 7 + version) % 251 + 1]) * BLCKSZ


def _segment(tmp_path: Path, nblocks: int, segno: int = 0) -> Segment:
    return Segment("base/5/16384", FORK, segno, nblocks, nblocks * BLCKSZ, tmp_path / "base/5/16384")


def _read(seg: Segment, off: int, size: int) -> bytes:
    fetched = {b: _page(seg.first_blkno() + b) for b in seg.blocks_to_fetch(off, size)}
    return seg.read(off, size, fetched)


def _write(seg: Segment, off: int, data: bytes) -> None:
    fetched = {b: _page(seg.first_blkno() + b) for b in seg.partial_blocks(off, len(data))}
    assert seg.write(off, data, fetched, 1) == len(data)


def _truncate(seg: Segment, size: int) -> None:
    blk = size // BLCKSZ
    fetched = {}
    if size % BLCKSZ and blk < seg.remote_blocks and not seg.is_written(blk):
        fetched = {blk: _page(seg.first_blkno() + blk)}
    seg.truncate(size, fetched, 1)


def test_reads_come_from_the_page_server_until_written(tmp_path: Path) -> None:
    seg = _segment(tmp_path, 4)
    assert seg.blocks_to_fetch(0, 4 * BLCKSZ) == [0, 1, 2, 3]
    assert _read(seg, 0, 4 * BLCKSZ) == b"".join(_page(b) for b in range(4))
    _write(seg, BLCKSZ, b"w" * BLCKSZ)
    assert seg.blocks_to_fetch(0, 4 * BLCKSZ) == [0, 2, 3]  # the written block never goes back
    assert _read(seg, BLCKSZ - 10, 20) == _page(0)[-10:] + b"w" * 10
    assert _read(seg, 3 * BLCKSZ, 10 * BLCKSZ) == _page(3)  # clipped at the end of the file
    assert not (tmp_path / "base/5/16384.map").exists()
    seg.fsync()
    saved = (tmp_path / "base/5/16384.map").read_bytes()
    assert int.from_bytes(saved[:4], "little") == 4 and saved[4] == 0b10


def test_extension_truncation_and_partial_writes_match_a_model(tmp_path: Path) -> None:
    rng = random.Random(5)
    seg = _segment(tmp_path, 6, segno=1)
    model = bytearray(b"".join(_page(RELSEG_SIZE + b) for b in range(6)))
    for step in range(300):
        op = rng.random()
        if op < 0.5:
            off = rng.randrange(0, len(model) + 3 * BLCKSZ)
            size = rng.choice([BLCKSZ, rng.randrange(1, 3 * BLCKSZ)])
            off = off - off % BLCKSZ if size == BLCKSZ else off
            data = os.urandom(size)
            _write(seg, off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + size] = data
        elif op < 0.65:
            size = rng.randrange(0, len(model) + 2 * BLCKSZ)
            _truncate(seg, size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        else:
            off = rng.randrange(0, len(model) + BLCKSZ)
            size = rng.randrange(1, 4 * BLCKSZ)
            assert _read(seg, off, size) == bytes(model[off:off + size]), step
        assert seg.size == len(model), step
    assert _read(seg, 0, len(model)) == bytes(model)


def test_a_truncated_then_extended_block_reads_zeroes_not_the_old_page(tmp_path: Path) -> None:
    seg = _segment(tmp_path, 8)
    _write(seg, 7 * BLCKSZ, b"x" * BLCKSZ)
    _truncate(seg, 2 * BLCKSZ)
    _truncate(seg, 8 * BLCKSZ)
    assert seg.remote_blocks == 2
    assert _read(seg, 2 * BLCKSZ, 6 * BLCKSZ) == bytes(6 * BLCKSZ)
    _write(seg, 5 * BLCKSZ + 100, b"y")  # partial write past the remote blocks: zeroes around it
    assert _read(seg, 5 * BLCKSZ, BLCKSZ) == bytes(100) + b"y" + bytes(BLCKSZ - 101)


def test_layout_of_relation_files(tmp_path: Path) -> None:
    rels = [
        RelationSize(RemoteFork(1663, 5, 100, 0), RELSEG_SIZE + 3),  # two segments
        RelationSize(RemoteFork(1663, 5, 100, 1), 3),  # FSM: left out, Postgres rebuilds it
        RelationSize(RemoteFork(1663, 5, 100, 2), 1),
        RelationSize(RemoteFork(1663, 5, 200, 0), 0),  # empty: one empty file
        RelationSize(RemoteFork(1663, 5, 300, 0), 9),  # unlogged: main reads the init fork
        RelationSize(RemoteFork(1663, 5, 300, 3), 1),
        RelationSize(RemoteFork(1664, 0, 1262, 0), 1),
    ]
    segs = build_segments(rels, tmp_path)
    assert sorted(segs) == ["base/5/100", "base/5/100.1", "base/5/100_vm", "base/5/200", "base/5/300",
                            "base/5/300_init", "global/1262"]
    assert (segs["base/5/100"].size, segs["base/5/100.1"].size) == (RELSEG_SIZE * BLCKSZ, 3 * BLCKSZ)
    assert segs["base/5/100.1"].first_blkno() == RELSEG_SIZE
    assert segs["base/5/200"].size == 0
    assert segs["base/5/300"].source == RemoteFork(1663, 5, 300, 3) and segs["base/5/300"].size == BLCKSZ


def test_relations_outside_base_and_global_are_refused(tmp_path: Path) -> None:
    from services.computefs.fs import ComputeFsError

    with pytest.raises(ComputeFsError, match="tablespace 16500.*full-copy"):
        build_segments([RelationSize(RemoteFork(16500, 5, 100, 0), 1)], tmp_path)


def test_read_ahead_serves_sequential_reads_and_asks_once(tmp_path: Path) -> None:
    import trio

    from services.computefs.prefetch import Prefetcher

    seg = _segment(tmp_path, 1000)
    calls: list[list[int]] = []

    async def fetch(s: Segment, blocks: list[int]) -> dict[int, bytes]:
        calls.append(list(blocks))
        await trio.sleep(0.01)
        return {b: _page(b) for b in blocks}

    async def scan() -> None:
        p = Prefetcher(fetch, window=64, parts=4)
        async with trio.open_nursery() as nursery:
            p.nursery = nursery
            for first in range(0, 320, 16):
                blocks = list(range(first, first + 16))
                got = await p.get(seg, blocks, first, first + 16)
                assert got == {b: _page(b) for b in blocks}
            assert p.hits >= 320 - 32  # all but the first two reads came from the read-ahead
            _write(seg, 400 * BLCKSZ, b"z" * BLCKSZ)  # a written block is never read ahead
            await p.get(seg, list(range(390, 400)), 390, 400)
            await p.get(seg, list(range(400 + 1, 410)), 400, 410)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(scan)
    asked = [b for c in calls for b in c]
    assert len(asked) == len(set(asked)), "a block was asked for twice"
    assert 400 not in asked
    assert max(len(c) for c in calls) <= 16  # split into concurrent calls
