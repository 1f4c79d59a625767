"""Micro-benchmark of the layer file formats (services/pageserver/storage): write MB/s, random
GetPage-style lookups/s and sequential scan MB/s, for a delta layer of ~100k entries and an
image layer, on disk (a temporary directory; page cache warm after the write).

    .venv/bin/python bench/layer_formats.py [--entries 100000] [--dir /tmp]

Values are shaped like a page server's: WAL records of 60-400 bytes with a common header and
partly repeated bodies, one in 10 versions an 8 KB page that is half zeros (a typical heap
page's free space), ~10 versions per key. MB are of encoded values plus entry keys.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.pageserver.keys import rel_page_key  # noqa: E402
from services.pageserver.storage.delta_layer import DeltaLayerReader, DeltaLayerWriter  # noqa: E402
from services.pageserver.storage.image_layer import ImageLayerReader, ImageLayerWriter  # noqa: E402
from services.pageserver.storage.layer_desc import KEY_MAX, KEY_MIN, LayerDesc  # noqa: E402
from services.pageserver.storage.store import DiskLayerStore  # noqa: E402
from services.pageserver.storage.values import Value, encode_value  # noqa: E402


def make_page(rng: random.Random) -> bytes:
    return rng.randbytes(4096) + bytes(4096)


def make_record(rng: random.Random, pool: list[bytes]) -> bytes:
    body = rng.choice(pool)[: rng.randrange(36, 376)]
    return b"\x3a\x00\x00\x00" + rng.randbytes(20) + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--image-pages", type=int, default=8192)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    rng = random.Random(42)
    pool = [rng.randbytes(100) * 4 for _ in range(64)]
    nkeys = max(args.entries // 10, 1)
    keys = [rel_page_key(1663, 5, 16384 + b // 50_000, 0, b % 50_000) for b in range(nkeys)]
    entries: list[tuple[bytes, int, Value]] = []
    lsn0 = 0x1000000
    for k in keys:
        lsns = sorted(rng.sample(range(lsn0, lsn0 + 10 * args.entries), 10))
        for j, lsn in enumerate(lsns):
            v = Value.image(make_page(rng)) if j == 0 or rng.random() < 0.1 else \
                Value.record(make_record(rng, pool), start_lsn=lsn - 300)
            entries.append((k, lsn, v))
    entries = entries[: args.entries]
    logical = sum(len(encode_value(v)) + 26 for _, _, v in entries)

    with tempfile.TemporaryDirectory(prefix="zenith-layer-bench-", dir=args.dir) as tmp:
        store = DiskLayerStore(Path(tmp))
        t0 = time.perf_counter()
        w = DeltaLayerWriter(store, LayerDesc.delta(KEY_MIN, KEY_MAX, lsn0, lsn0 + 10 * args.entries + 1))
        for k, lsn, v in entries:
            w.add(k, lsn, v)
        desc = w.finish()
        t_write = time.perf_counter() - t0
        size = store.size(desc.file_name)

        r = DeltaLayerReader.open(store, desc.file_name)
        queries = [(rng.choice(keys), rng.randrange(lsn0, lsn0 + 10 * args.entries)) for _ in range(args.lookups)]
        t0 = time.perf_counter()
        found = 0
        for k, lsn in queries:
            found += len(r.versions(k, lsn))
        t_lookup = time.perf_counter() - t0

        t0 = time.perf_counter()
        n = sum(1 for _ in r.iter_entries())
        t_scan = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_raw = sum(1 for _ in r.iter_encoded())
        t_scan_raw = time.perf_counter() - t0
        assert n == n_raw == len(entries)

        pages = [(rel_page_key(1663, 5, 20000, 0, b), make_page(rng)) for b in range(args.image_pages)]
        t0 = time.perf_counter()
        iw = ImageLayerWriter(store, LayerDesc.image(KEY_MIN, KEY_MAX, lsn0))
        for k, p in pages:
            iw.add(k, Value.image(p))
        idesc = iw.finish()
        t_iwrite = time.perf_counter() - t0
        isize = store.size(idesc.file_name)
        ir = ImageLayerReader.open(store, idesc.file_name)
        iq = [rng.choice(pages)[0] for _ in range(args.lookups)]
        t0 = time.perf_counter()
        for k in iq:
            ir.get(k)
        t_iget = time.perf_counter() - t0
        t0 = time.perf_counter()
        ni = sum(1 for _ in ir.iter_entries())
        t_iscan = time.perf_counter() - t0
        assert ni == len(pages)

    mb = logical / 1e6
    imb = len(pages) * 8192 / 1e6
    print(f"delta layer: {len(entries)} entries over {nkeys} keys, {mb:.1f} MB logical -> {size / 1e6:.1f} MB file"
          f" ({r.block_count} blocks)")
    print(f"  write                      {mb / t_write:8.1f} MB/s  {len(entries) / t_write:10.0f} entries/s")
    print(f"  versions() random lookups  {args.lookups / t_lookup:10.0f} lookups/s"
          f"  ({found / args.lookups:.1f} versions each)")
    print(f"  sequential scan (decoded)  {mb / t_scan:8.1f} MB/s  {n / t_scan:10.0f} entries/s")
    print(f"  sequential scan (raw)      {mb / t_scan_raw:8.1f} MB/s  {n / t_scan_raw:10.0f} entries/s")
    print(f"image layer: {len(pages)} pages, {imb:.1f} MB -> {isize / 1e6:.1f} MB file")
    print(f"  write                      {imb / t_iwrite:8.1f} MB/s  {len(pages) / t_iwrite:10.0f} pages/s")
    print(f"  get() random lookups       {args.lookups / t_iget:10.0f} lookups/s")
    print(f"  sequential scan            {imb / t_iscan:8.1f} MB/s  {ni / t_iscan:10.0f} pages/s")


if __name__ == "__main__":
    main()
