"""GIN redo (libs/pgredo/gin.py) against PostgreSQL 15's own consistency images.

A real primary with wal_consistency_checking=all runs GIN workloads on int[],
jsonb and tsvector columns; every registered Gin block our redo can rebuild
is redone and compared, after gin_mask, with the image Postgres attached.

- fastupdate=on with the smallest pending list (64 kB): INSERT_LISTPAGE,
  UPDATE_META_PAGE (tail inserts, new sublists appended to the tail), and the
  flushes (automatic, gin_clean_pending_list, VACUUM): DELETE_LISTPAGE and the
  bulk inserts into the main tree;
- fastupdate=off with many rows sharing a key: the entry tuple's posting list
  outgrows GinMaxItemSize (CREATE_PTREE), the posting tree grows (INSERT on
  data leaves: ADDITEMS / REPLACE / INSERT segment actions), its leaves split
  (SPLIT, then INSERT on the data internal page completing the split);
- many distinct wide keys: entry leaf splits, root splits, internal entry
  page splits (the only SPLITs with a block to redo: the child, block 3);
- deletes + VACUUM: VACUUM_PAGE (entry leaves), VACUUM_DATA_LEAF_PAGE
  (posting tree leaves), DELETE_PAGE (emptied posting tree leaves).

SPLIT's left/right/root pages and VACUUM_PAGE's page are always full-page
images (REGBUF_FORCE_IMAGE): they are restored, not redone.

Not reached: a split of a posting tree's internal page (it holds ~800
PostingItems, so it takes hundreds of leaves, millions of TIDs); its redo is
the same child-flag clearing as an internal entry page split, which is
checked. Pre-9.4 uncompressed leaves cannot be made by PostgreSQL 15; their
conversion is unit-tested.
"""

from __future__ import annotations

import struct
from collections import Counter

import pytest
from walcorpus import CHECKED_WAL_GUCS, assert_rmgr_verified, assert_unknown_info_unsupported, corpus_fixtures, execute_all

from pgformat.bufmask import gin_mask
from pgformat.constants import BLCKSZ
from pgformat.rmgr import RM_GIN_ID, record_type_name
from pgformat.xlogrecord import DecodedRecord
from pgredo import gin
from pgredo.errors import RedoError, RedoFailedError
from pgredo.verify import VerifyReport

# Loading rows the GIN workloads then index is heap work, not what this test
# checks: it runs without consistency images to keep the WAL small.
_QUIET = "SET wal_consistency_checking = ''; "

# A wide, distinct text key (300 bytes, incompressible enough to stay inline).
_WIDE = "lpad(md5({0}::text), 300, md5(({0} + 1)::text))"

# Each entry is one transaction (VACUUM needs its own).
WORKLOAD: list[str] = [
    # --- pending list: int[], jsonb, tsvector with fastupdate = on -----------------
    "CREATE TABLE fu (id int, a int[], j jsonb, v tsvector) WITH (autovacuum_enabled = off)",
    "CREATE INDEX fu_a ON fu USING gin (a) WITH (fastupdate = on, gin_pending_list_limit = 64)",
    "CREATE INDEX fu_j ON fu USING gin (j) WITH (fastupdate = on, gin_pending_list_limit = 64)",
    "CREATE INDEX fu_jp ON fu USING gin (j jsonb_path_ops) WITH (fastupdate = on, gin_pending_list_limit = 64)",
    "CREATE INDEX fu_v ON fu USING gin (v) WITH (fastupdate = on, gin_pending_list_limit = 64)",
    """INSERT INTO fu SELECT i, array[i % 10, i % 100, 1000 + i],
           jsonb_build_object('k', i % 20, 'n', i, 'tags', jsonb_build_array('t' || i % 7, 'u' || i)),
           to_tsvector('simple', 'w' || (i % 30) || ' x' || i || ' common')
       FROM generate_series(1, 2500) i""",
    # Rows with more keys than fit one list page: multi-page sublists appended
    # to the existing tail.
    """INSERT INTO fu SELECT i, (SELECT array_agg(g) FROM generate_series(i * 10, i * 10 + 1500) g),
           (SELECT jsonb_object_agg('key' || g, g) FROM generate_series(1, 600) g),
           (SELECT string_agg('lex' || g, ' ')::tsvector FROM generate_series(i, i + 900) g)
       FROM generate_series(2501, 2504) i""",
    "SELECT gin_clean_pending_list('fu_a'::regclass), gin_clean_pending_list('fu_j'::regclass)",
    "INSERT INTO fu SELECT i, array[i % 10, 5000 + i], '{}', 'tail' FROM generate_series(2505, 2800) i",
    "DELETE FROM fu WHERE id % 4 = 0",
    "VACUUM fu",
    # --- posting trees: fastupdate = off, one key shared by many rows -------------
    "CREATE TABLE pt (id int, a int[]) WITH (autovacuum_enabled = off)",
    _QUIET + "INSERT INTO pt SELECT i, array[1, 100000 + i / 50] FROM generate_series(1, 30000) i",
    # The build is WAL-logged as full-page images: a multi-leaf posting tree for key 1.
    "CREATE INDEX pt_a ON pt USING gin (a) WITH (fastupdate = off)",
    # Appends to key 1's tree; key 2's posting list grows in its entry tuple
    # until it needs a posting tree of its own, which then fills and splits.
    "INSERT INTO pt SELECT i, array[1, 2] FROM generate_series(30001, 40000) i",
    # Empty the middle of key 1's tree.
    "DELETE FROM pt WHERE id BETWEEN 4000 AND 26000 OR (id > 30000 AND id % 3 = 0)",
    "VACUUM pt",
    # New rows land in freed heap space: TIDs inside existing leaves.
    "INSERT INTO pt SELECT i, array[1, 2, 3] FROM generate_series(40001, 42000) i",
    # --- entry tree: many distinct wide keys, fastupdate = off --------------------
    "CREATE TABLE et (id int, t text[]) WITH (autovacuum_enabled = off)",
    "CREATE INDEX et_t ON et USING gin (t) WITH (fastupdate = off)",
    f"INSERT INTO et SELECT i, array[{_WIDE.format('i')}, 'shared'] FROM generate_series(1, 1500) i",
    "DELETE FROM et WHERE id % 3 = 0",
    "VACUUM et",
    "CHECKPOINT",
]

# Record types whose registered blocks our redo rebuilds and verify compares.
EXPECTED_CHECKED = {
    "CREATE_PTREE", "INSERT", "SPLIT", "VACUUM_DATA_LEAF_PAGE", "DELETE_PAGE",
    "UPDATE_META_PAGE", "INSERT_LISTPAGE", "DELETE_LISTPAGE",
}
# VACUUM_PAGE is only a forced full-page image: nothing to redo or compare.
EXPECTED_PRESENT = EXPECTED_CHECKED | {"VACUUM_PAGE"}

gin_corpus, gin_records, gin_report = corpus_fixtures(
    "gin_", lambda node: execute_all(node, WORKLOAD), CHECKED_WAL_GUCS)


def test_gin_redo_matches_consistency_images(
    gin_records: list[DecodedRecord], gin_report: VerifyReport
) -> None:
    assert_rmgr_verified(gin_records, gin_report, RM_GIN_ID, EXPECTED_PRESENT, EXPECTED_CHECKED)


def _recompress_actions(data: bytes) -> list[int]:
    """The segment action types of a ginxlogRecompressDataLeaf."""
    (nactions,) = struct.unpack_from("<H", data, 0)
    pos, actions = 2, []
    for _ in range(nactions):
        action = data[pos + 1]
        pos += 2
        actions.append(action)
        if action in (gin.GIN_SEGMENT_INSERT, gin.GIN_SEGMENT_REPLACE):
            nbytes = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + nbytes + (nbytes & 1)
        elif action == gin.GIN_SEGMENT_ADDITEMS:
            pos += 2 + 6 * struct.unpack_from("<H", data, pos)[0]
    return actions


def workload_shapes(records: list[DecodedRecord]) -> Counter[str]:
    """Which branches of ginxlog.c the corpus reaches (beyond one per record type)."""
    shapes: Counter[str] = Counter()
    names = {
        gin.GIN_SEGMENT_DELETE: "DELETE", gin.GIN_SEGMENT_INSERT: "INSERT",
        gin.GIN_SEGMENT_REPLACE: "REPLACE", gin.GIN_SEGMENT_ADDITEMS: "ADDITEMS",
    }
    for rec in records:
        if rec.rmid != RM_GIN_ID:
            continue
        name = record_type_name(rec.rmid, rec.info)
        b0 = rec.block(0)
        if name == "INSERT":
            (flags,) = struct.unpack_from("<H", rec.main_data, 0)
            kind = ("data" if flags & gin.GIN_INSERT_ISDATA else "entry") + (
                " leaf" if flags & gin.GIN_INSERT_ISLEAF else " internal")
            shapes[f"INSERT {kind}"] += 1
            if kind == "entry leaf" and b0 is not None and b0.data and b0.data[2]:
                shapes["INSERT entry leaf replacing a tuple (isDelete)"] += 1
            if kind == "data leaf" and b0 is not None and b0.data:
                for a in _recompress_actions(b0.data):
                    shapes[f"leaf action {names.get(a, a)}"] += 1
        elif name == "VACUUM_DATA_LEAF_PAGE" and b0 is not None and b0.data:
            for a in _recompress_actions(b0.data):
                shapes[f"vacuum leaf action {names.get(a, a)}"] += 1
        elif name == "SPLIT":
            flags = struct.unpack_from("<H", rec.main_data, 24)[0]
            kind = ("data" if flags & gin.GIN_INSERT_ISDATA else "entry") + (
                " leaf" if flags & gin.GIN_INSERT_ISLEAF else " internal")
            shapes[f"SPLIT {kind}" + (" root" if flags & gin.GIN_SPLIT_ROOT else "")] += 1
        elif name == "UPDATE_META_PAGE":
            prev_tail, _rl, ntuples = struct.unpack_from("<IIi", rec.main_data, 72)
            if ntuples > 0:
                shapes["UPDATE_META_PAGE tail insert"] += 1
            elif prev_tail != 0xFFFFFFFF:
                shapes["UPDATE_META_PAGE sublist appended"] += 1
            else:
                shapes["UPDATE_META_PAGE metapage only"] += 1
        elif name == "INSERT_LISTPAGE":
            (rightlink,) = struct.unpack_from("<I", rec.main_data, 0)
            shapes["INSERT_LISTPAGE " + ("sublist tail" if rightlink == 0xFFFFFFFF else "inner")] += 1
    return shapes


def test_gin_workload_shapes(gin_records: list[DecodedRecord]) -> None:
    shapes = workload_shapes(gin_records)
    wanted = [
        "INSERT entry leaf", "INSERT entry internal", "INSERT data leaf", "INSERT data internal",
        "INSERT entry leaf replacing a tuple (isDelete)",
        "leaf action ADDITEMS", "leaf action REPLACE", "leaf action INSERT",
        "vacuum leaf action REPLACE", "vacuum leaf action DELETE",
        "SPLIT entry leaf root", "SPLIT entry leaf", "SPLIT entry internal", "SPLIT entry internal root",
        "SPLIT data leaf",
        "SPLIT data leaf root",
        "UPDATE_META_PAGE tail insert", "UPDATE_META_PAGE sublist appended", "UPDATE_META_PAGE metapage only",
        "INSERT_LISTPAGE sublist tail", "INSERT_LISTPAGE inner",
    ]
    missing = [k for k in wanted if shapes[k] == 0]
    assert missing == [], dict(shapes)


# --- the posting list codec and leaf recompression (ginpostinglist.c, ginxlog.c) ----------


def _ip(blk: int, off: int) -> int:
    return (blk << 11) | off


def test_compress_posting_list_layout() -> None:
    # (0,1), (0,2), (1,1): deltas 1 and 2047 -> 0x01, 0xFF 0x0F, then one padding byte.
    seg = gin.gin_compress_posting_list([_ip(0, 1), _ip(0, 2), _ip(1, 1)])
    assert seg == struct.pack("<HHHH", 0, 0, 1, 3) + bytes([0x01, 0xFF, 0x0F, 0x00])
    assert gin.gin_posting_list_decode(seg) == [_ip(0, 1), _ip(0, 2), _ip(1, 1)]


def test_posting_list_roundtrip_extremes() -> None:
    items = [_ip(0, 1), _ip(0, 2047), _ip(5, 3), _ip(0xFFFF, 1), _ip(0x10000, 9), _ip(0xFFFFFFFE, 2047)]
    seg = gin.gin_compress_posting_list(items)
    assert len(seg) % 2 == 0
    assert gin.gin_posting_list_decode(seg) == items
    # A 43-bit delta takes all seven varbyte bytes.
    two = gin.gin_compress_posting_list([_ip(0, 1), _ip(0xFFFFFFFE, 5)])
    assert struct.unpack_from("<H", two, 6)[0] == 7
    assert gin.gin_posting_list_decode(two) == [_ip(0, 1), _ip(0xFFFFFFFE, 5)]
    # Several segments back to back.
    both = seg + two
    assert gin.gin_posting_list_decode(both, 0, len(both)) == items + [_ip(0, 1), _ip(0xFFFFFFFE, 5)]


def test_postgres_segments_reencode_identically(gin_records: list[DecodedRecord]) -> None:
    """Every posting list segment Postgres logged re-encodes to the same bytes."""
    segments: list[bytes] = []
    for rec in gin_records:
        if rec.rmid != RM_GIN_ID:
            continue
        name = record_type_name(rec.rmid, rec.info)
        if name == "CREATE_PTREE":
            (size,) = struct.unpack_from("<I", rec.main_data, 0)
            data, pos = rec.main_data[4 : 4 + size], 0
            while pos < len(data):
                n = 8 + struct.unpack_from("<H", data, pos + 6)[0]
                n += n & 1
                segments.append(data[pos : pos + n])
                pos += n
        b0 = rec.block(0)
        if name in ("INSERT", "VACUUM_DATA_LEAF_PAGE") and b0 is not None and b0.data:
            if name == "INSERT" and struct.unpack_from("<H", rec.main_data, 0)[0] != 3:
                continue  # not a data leaf
            pos = 2
            for _ in range(struct.unpack_from("<H", b0.data, 0)[0]):
                action = b0.data[pos + 1]
                pos += 2
                if action in (gin.GIN_SEGMENT_INSERT, gin.GIN_SEGMENT_REPLACE):
                    n = 8 + struct.unpack_from("<H", b0.data, pos + 6)[0]
                    n += n & 1
                    segments.append(b0.data[pos : pos + n])
                    pos += n
                elif action == gin.GIN_SEGMENT_ADDITEMS:
                    pos += 2 + 6 * struct.unpack_from("<H", b0.data, pos)[0]
    assert len(segments) > 50
    for seg in segments:
        assert gin.gin_compress_posting_list(gin.gin_posting_list_decode(seg)) == seg


def _leaf_page(*segments: bytes) -> bytearray:
    page = bytearray(BLCKSZ)
    gin.gin_init_page(page, gin.GIN_DATA | gin.GIN_LEAF | gin.GIN_COMPRESSED)
    body = b"".join(segments)
    page[32 : 32 + len(body)] = body
    struct.pack_into("<H", page, 12, 32 + len(body))
    return page


def _leaf_items(page: bytearray) -> list[int]:
    lower = struct.unpack_from("<H", page, 12)[0]
    return gin.gin_posting_list_decode(page, 32, lower - 32)


def test_recompress_every_action() -> None:
    seg0 = gin.gin_compress_posting_list([_ip(1, o) for o in range(1, 40)])
    seg1 = gin.gin_compress_posting_list([_ip(3, o) for o in range(1, 40, 2)])
    seg2 = gin.gin_compress_posting_list([_ip(5, o) for o in range(1, 10)])
    page = _leaf_page(seg0, seg1, seg2)
    new_first = gin.gin_compress_posting_list([_ip(0, 1), _ip(0, 2)])
    new_last = gin.gin_compress_posting_list([_ip(9, 1)])
    replaced = gin.gin_compress_posting_list([_ip(5, 1)])
    added = [_ip(3, 2), _ip(3, 4), _ip(4, 1)]
    wal = bytearray(struct.pack("<H", 5))
    wal += bytes([0, gin.GIN_SEGMENT_INSERT]) + new_first
    wal += bytes([0, gin.GIN_SEGMENT_DELETE])
    wal += bytes([1, gin.GIN_SEGMENT_ADDITEMS]) + struct.pack("<H", 3)
    wal += b"".join(struct.pack("<HHH", v >> 27, (v >> 11) & 0xFFFF, v & 0x7FF) for v in added)
    wal += bytes([2, gin.GIN_SEGMENT_REPLACE]) + replaced
    wal += bytes([3, gin.GIN_SEGMENT_INSERT]) + new_last
    gin.gin_redo_recompress(page, bytes(wal))
    want = [_ip(0, 1), _ip(0, 2)] + sorted(gin.gin_posting_list_decode(seg1) + added) + [_ip(5, 1), _ip(9, 1)]
    assert _leaf_items(page) == want
    merged = gin.gin_compress_posting_list(sorted(gin.gin_posting_list_decode(seg1) + added))
    assert bytes(page[32 : struct.unpack_from("<H", page, 12)[0]]) == new_first + merged + replaced + new_last


def test_recompress_converts_pre_94_leaf() -> None:
    """A pre-9.4 leaf (uncompressed ItemPointers, maxoff items) is compressed first."""
    page = bytearray(BLCKSZ)
    gin.gin_init_page(page, gin.GIN_DATA | gin.GIN_LEAF)
    items = [_ip(2, o) for o in range(1, 6)]
    for i, v in enumerate(items):
        struct.pack_into("<HHH", page, 32 + 6 * i, v >> 27, (v >> 11) & 0xFFFF, v & 0x7FF)
    struct.pack_into("<H", page, BLCKSZ - 4, len(items))  # maxoff
    gin.gin_redo_recompress(page, struct.pack("<H", 1) + bytes([0, gin.GIN_SEGMENT_ADDITEMS])
                            + struct.pack("<HHHH", 1, 0, 3, 1))
    assert _leaf_items(page) == items + [_ip(3, 1)]
    rightlink, maxoff, flags = struct.unpack_from("<IHH", page, BLCKSZ - 8)
    assert maxoff == 0 and flags & gin.GIN_COMPRESSED


def test_gin_mask_deleted_page() -> None:
    page = bytearray(BLCKSZ)
    gin.gin_init_page(page, gin.GIN_DATA | gin.GIN_LEAF | gin.GIN_COMPRESSED)
    page[40:60] = b"x" * 20
    other = bytearray(page)
    struct.pack_into("<H", page, 12, 100)
    struct.pack_into("<H", page, BLCKSZ - 2, gin.GIN_DATA | gin.GIN_DELETED)
    struct.pack_into("<H", other, BLCKSZ - 2, gin.GIN_DATA | gin.GIN_DELETED)
    struct.pack_into("<I", other, BLCKSZ - 8, 77)
    gin_mask(page, 1)
    gin_mask(other, 1)
    assert page == other
    assert not any(page[24:]) and struct.unpack_from("<HH", page, 12) == (0, 0)


def test_unknown_gin_info_is_unsupported(gin_records: list[DecodedRecord]) -> None:
    assert_unknown_info_unsupported(gin_records, RM_GIN_ID, 0xA0, gin.gin_redo)


def test_split_halves_need_their_images(gin_records: list[DecodedRecord]) -> None:
    """ginRedoSplit only restores images for blocks 0-2; redoing one is an error."""
    rec = next(r for r in gin_records if r.rmid == RM_GIN_ID and record_type_name(r.rmid, r.info) == "SPLIT")
    b0 = rec.block(0)
    assert b0 is not None and b0.apply_image
    with pytest.raises(RedoError):  # BadRecordError here; the engine reports it as RedoFailedError
        gin.gin_redo(rec, b0, bytearray(b0.image.page()) if b0.image else bytearray(BLCKSZ))


def test_additems_append_shortcut_equals_full_recompression() -> None:
    """Appending to a segment re-encodes only the new deltas; the bytes must equal a full
    ginCompressPostingList of the merged items, for one-byte up to seven-byte deltas."""
    import random

    rng = random.Random(4)
    for _ in range(300):
        n = rng.randint(1, 60)
        vals = sorted(rng.sample(range(1, 1 << rng.choice((12, 20, 30, 43))), n + rng.randint(1, 20)))
        old, added = vals[:n], vals[n:]
        seg = gin.gin_compress_posting_list(old)
        assert gin._last_item(seg, 0) == old[-1]
        assert gin._add_items_to_segment(seg, 0, added) == gin.gin_compress_posting_list(old + added)
        # Items before and among the old ones take the merge path (duplicates kept once).
        present = set(old)
        mixed = sorted({v + 1 for v in old[:-1] if v + 1 not in present} | {old[0] - 1} - {0})[:6]
        mixed += old[:1]
        if len(mixed) > 1:
            mixed.sort()
            want = gin.gin_compress_posting_list(sorted(present | set(mixed)))
            assert gin._add_items_to_segment(seg, 0, mixed) == want
