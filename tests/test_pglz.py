"""Tests for pgformat.pglz (PostgreSQL's LZ format, src/common/pg_lzcompress.c).

A plain byte-at-a-time transliteration of PG15's pglz_decompress serves as the
reference the fast decoder is checked against, on valid and hostile input.
Digests of streams PostgreSQL itself produced pin the compressor to PG's
output byte for byte. The live real-Postgres oracle (images from WAL written
with wal_compression=pglz) lives elsewhere.
"""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgformat.errors import FormatError
from pgformat.pglz import (
    PGLZ_MAX_MATCH,
    PGLZ_STRATEGY_ALWAYS,
    PGLZ_STRATEGY_DEFAULT,
    PglzError,
    PglzStrategy,
    pglz_compress,
    pglz_decompress,
    pglz_maximum_compressed_size,
)

BLCKSZ = 8192

slow_settings = settings(
    deadline=None,
    max_examples=120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def reference_decompress(src: bytes, rawsize: int, check_complete: bool = True) -> bytes:
    """PG15's pglz_decompress, one item and one byte at a time."""
    out = bytearray()
    sp = 0
    while sp < len(src) and len(out) < rawsize:
        ctrl = src[sp]
        sp += 1
        for _ in range(8):
            if not (sp < len(src) and len(out) < rawsize):
                break
            if ctrl & 1:
                # C reads past the end and then notices sp > srcend.
                if sp + 2 > len(src):
                    raise PglzError("truncated")
                length = (src[sp] & 0x0F) + 3
                off = ((src[sp] & 0xF0) << 4) | src[sp + 1]
                sp += 2
                if length == 18:
                    if sp >= len(src):
                        raise PglzError("truncated")
                    length += src[sp]
                    sp += 1
                if off == 0 or off > len(out):
                    raise PglzError("bad offset")
                for _ in range(min(length, rawsize - len(out))):
                    out.append(out[-off])
            else:
                out.append(src[sp])
                sp += 1
            ctrl >>= 1
    if check_complete and (len(out) != rawsize or sp != len(src)):
        raise PglzError("incomplete")
    return bytes(out)


Item = bytes | tuple[int, int]  # a literal byte string, or a (offset, length) tag


def build_stream(items: list[Item]) -> bytes:
    """Hand-assemble a pglz stream from literals and (offset, length) tags."""
    units: list[tuple[bool, bytes]] = []
    for item in items:
        if isinstance(item, bytes):
            units.extend((False, bytes([b])) for b in item)
        else:
            off, length = item
            assert 1 <= off <= 0xFFF and 3 <= length <= PGLZ_MAX_MATCH
            if length >= 18:
                units.append((True, bytes([(off >> 4) & 0xF0 | 0x0F, off & 0xFF, length - 18])))
            else:
                units.append((True, bytes([(off >> 4) & 0xF0 | (length - 3), off & 0xFF])))
    out = bytearray()
    for i in range(0, len(units), 8):
        group = units[i : i + 8]
        out.append(sum(1 << bit for bit, (is_tag, _) in enumerate(group) if is_tag))
        for _, data in group:
            out += data
    return bytes(out)


def parse_tags(stream: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every tag in a well-formed stream."""
    tags = []
    sp = 0
    while sp < len(stream):
        ctrl = stream[sp]
        sp += 1
        for bit in range(8):
            if sp >= len(stream):
                break
            if ctrl >> bit & 1:
                length = (stream[sp] & 0x0F) + 3
                off = ((stream[sp] & 0xF0) << 4) | stream[sp + 1]
                sp += 2
                if length == 18:
                    length += stream[sp]
                    sp += 1
                tags.append((off, length))
            else:
                sp += 1
    return tags


def heap_page(
    ntuples: int,
    tuple_len: int,
    template: bytes,
    varying: list[int],
    seed: int,
    remove_hole: bool,
) -> bytes:
    """A page shaped like a heap page: header, line pointers, hole, tuples.

    Tuples repeat `template` with a few bytes (`varying`) changing per tuple,
    as ids, xmins and ctids do. With remove_hole the free space is cut out,
    as XLogRecordAssemble does for a full-page image with a standard layout.
    """
    rng = random.Random(seed)
    width = (tuple_len + 7) & ~7  # MAXALIGN
    ntuples = min(ntuples, (BLCKSZ - 24) // (width + 4))
    lower = 24 + 4 * ntuples
    upper = BLCKSZ - width * ntuples
    header = struct.pack("<QHHHHHHI", rng.getrandbits(40), 0, 0, lower, upper, BLCKSZ, BLCKSZ | 4, 0)
    lps = b"".join(
        struct.pack("<I", (BLCKSZ - width * (i + 1)) | 1 << 15 | tuple_len << 17)
        for i in range(ntuples)
    )
    tuples = []
    for i in range(ntuples):
        t = bytearray(template[:tuple_len].ljust(tuple_len, b"\x00"))
        struct.pack_into("<I", t, 0, 700 + i // 5)  # xmin
        for pos in varying:
            if pos < tuple_len:
                t[pos] = rng.randrange(256)
        tuples.append(bytes(t).ljust(width, b"\x00"))
    page = header + lps + bytes(upper - lower) + b"".join(reversed(tuples))
    assert len(page) == BLCKSZ
    return page[:lower] + page[upper:] if remove_hole else page


@st.composite
def heap_pages(draw: st.DrawFn) -> bytes:
    tuple_len = draw(st.integers(min_value=24, max_value=300))
    return heap_page(
        ntuples=draw(st.integers(min_value=0, max_value=300)),
        tuple_len=tuple_len,
        template=draw(st.binary(min_size=tuple_len, max_size=tuple_len)),
        varying=draw(st.lists(st.integers(min_value=0, max_value=tuple_len - 1), max_size=10)),
        seed=draw(st.integers(min_value=0, max_value=2**32)),
        remove_hole=draw(st.booleans()),
    )


@st.composite
def repetitive_bytes(draw: st.DrawFn, max_size: int = 3 * BLCKSZ) -> bytes:
    """Concatenated chunks: runs of one byte, fresh random bytes, or copies of
    earlier output at assorted distances (including beyond 4 KB)."""
    out = bytearray()
    for kind, n, x in draw(
        st.lists(
            st.tuples(st.sampled_from("rfc"), st.integers(1, 600), st.integers(0, 2**16)),
            max_size=40,
        )
    ):
        if kind == "r":
            out += bytes([x & 0xFF]) * n
        elif kind == "f":
            out += random.Random(x).randbytes(n)
        elif out:
            start = x % len(out)
            out += out[start : start + n]
        if len(out) >= max_size:
            break
    return bytes(out[:max_size])


@st.composite
def compressed_pages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(raw, stream) for a page that compresses."""
    raw = draw(st.one_of(heap_pages(), repetitive_bytes(max_size=BLCKSZ)))
    stream = pglz_compress(raw, PGLZ_STRATEGY_ALWAYS)
    if stream is None:
        raw = bytes(BLCKSZ)
        stream = pglz_compress(raw)
    assert stream is not None
    return raw, stream


def assert_roundtrip(raw: bytes, strategy: PglzStrategy) -> bytes | None:
    stream = pglz_compress(raw, strategy)
    if stream is not None:
        assert len(stream) < len(raw)
        assert pglz_decompress(stream, len(raw)) == raw
        assert reference_decompress(stream, len(raw)) == raw
        # PG's compressor never emits an offset it could not encode plainly.
        assert all(1 <= off < 0xFFF and 3 <= n <= PGLZ_MAX_MATCH for off, n in parse_tags(stream))
    return stream


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@slow_settings
@given(raw=st.binary(max_size=3 * BLCKSZ), always=st.booleans())
def test_roundtrip_random_bytes(raw: bytes, always: bool) -> None:
    assert_roundtrip(raw, PGLZ_STRATEGY_ALWAYS if always else PGLZ_STRATEGY_DEFAULT)


@slow_settings
@given(raw=repetitive_bytes(), always=st.booleans())
def test_roundtrip_repetitive_bytes(raw: bytes, always: bool) -> None:
    assert_roundtrip(raw, PGLZ_STRATEGY_ALWAYS if always else PGLZ_STRATEGY_DEFAULT)


@slow_settings
@given(raw=heap_pages())
def test_roundtrip_page_like(raw: bytes) -> None:
    assert_roundtrip(raw, PGLZ_STRATEGY_DEFAULT)
    assert_roundtrip(raw, PGLZ_STRATEGY_ALWAYS)


@slow_settings
@given(
    raw=st.binary(min_size=1, max_size=2000).map(lambda b: b * 3),
    good=st.integers(-5, 400),
    drop=st.integers(-5, 120),
    rate=st.integers(-5, 120),
)
def test_roundtrip_any_strategy(raw: bytes, good: int, drop: int, rate: int) -> None:
    strategy = PglzStrategy(0, 2**31 - 1, rate, 2**31 - 1, good, drop)
    stream = assert_roundtrip(raw, strategy)
    if good <= 0:
        assert stream is None


def test_roundtrip_memoryview_and_bytearray() -> None:
    raw = b"0123456789abcdef" * 64
    stream = pglz_compress(memoryview(raw))
    assert stream is not None
    assert pglz_decompress(memoryview(stream), len(raw)) == raw
    assert pglz_decompress(bytearray(stream), len(raw)) == raw


@slow_settings
@given(data=compressed_pages(), cut=st.integers(0, BLCKSZ))
def test_partial_decompress_is_prefix(data: tuple[bytes, bytes], cut: int) -> None:
    """check_complete=False with a smaller rawsize yields the raw prefix, as
    toast slicing relies on."""
    raw, stream = data
    cut = min(cut, len(raw))
    assert pglz_decompress(stream, cut, check_complete=False) == raw[:cut]
    need = pglz_maximum_compressed_size(cut, len(stream))
    assert pglz_decompress(stream[:need], cut, check_complete=False) == raw[:cut]


# ---------------------------------------------------------------------------
# Compressor decisions (PGLZ_strategy_default)
# ---------------------------------------------------------------------------


def test_zero_page_exact_stream() -> None:
    # One literal zero, 30 tags of (offset 1, length 273), one literal zero:
    # the newest history entry is at offset 1 and already a 273-byte match.
    stream = pglz_compress(bytes(BLCKSZ))
    tag = bytes([0x0F, 0x01, 255])
    expected = (
        b"\xfe\x00" + tag * 7
        + b"\xff" + tag * 8
        + b"\xff" + tag * 8
        + b"\x7f" + tag * 7 + b"\x00"
    )
    assert stream == expected
    assert len(stream) == 96


def test_min_input_size() -> None:
    assert pglz_compress(b"a" * 31) is None
    assert pglz_compress(b"a" * 32) is not None
    assert pglz_compress(b"a" * 40) == build_stream([b"a", (1, 39)])
    # The last 3 positions hash on one byte, so a 4-byte run finds nothing.
    assert pglz_compress(b"a" * 4, PGLZ_STRATEGY_ALWAYS) is None


def test_empty_input() -> None:
    assert pglz_compress(b"") is None
    # PG: result_size 0 >= result_max 0, so even "always" gives up.
    assert pglz_compress(b"", PGLZ_STRATEGY_ALWAYS) is None
    assert pglz_decompress(b"", 0) == b""


def test_incompressible_returns_none() -> None:
    raw = random.Random(7).randbytes(BLCKSZ)
    assert pglz_compress(raw) is None
    assert pglz_compress(raw, PGLZ_STRATEGY_ALWAYS) is None


def test_min_comp_rate() -> None:
    rng = random.Random(3)
    # About 10% saved: fails the default 25% but passes "always".
    raw = b"".join(rng.randbytes(40) + bytes(12) for _ in range(100))
    stream = pglz_compress(raw, PGLZ_STRATEGY_ALWAYS)
    assert stream is not None and len(stream) > len(raw) * 75 // 100
    assert pglz_compress(raw) is None


def test_first_success_by() -> None:
    # Nothing to match in the first 1100 bytes, then plenty.
    raw = random.Random(5).randbytes(1100) + bytes(7000)
    assert pglz_compress(raw) is None
    stream = pglz_compress(raw, PGLZ_STRATEGY_ALWAYS)
    assert stream is not None
    assert pglz_decompress(stream, len(raw)) == raw


def test_compressed_offsets_reach_far_history() -> None:
    rng = random.Random(11)
    block = rng.randbytes(4000)
    raw = block + rng.randbytes(90) + block
    stream = pglz_compress(raw, PGLZ_STRATEGY_ALWAYS)
    assert stream is not None
    assert max(off for off, _ in parse_tags(stream)) == 4090
    assert pglz_decompress(stream, len(raw)) == raw


def test_never_emits_offset_4095() -> None:
    # pglz_find_match stops at offset >= 0x0fff, so a repeat exactly 4095
    # bytes back stays literal even though a tag could encode it.
    rng = random.Random(12)
    block = rng.randbytes(3000)
    raw = block + rng.randbytes(1095) + block + bytes(4000)
    stream = pglz_compress(raw, PGLZ_STRATEGY_ALWAYS)
    assert stream is not None
    assert all(off < 4095 for off, _ in parse_tags(stream))
    assert pglz_decompress(stream, len(raw)) == raw


def test_good_match_drops_ten_percent_per_candidate() -> None:
    # Four recent candidates each match 100 bytes; the oldest would match 200.
    # The good-match bar goes 128, 116, 105, 95: after the fourth candidate
    # 100 >= 95, so the search stops there and the oldest one is never seen.
    rng = random.Random(8)
    p = rng.randbytes(100)
    target = p + rng.randbytes(100)
    raw = target + b"".join(p + bytes([i]) for i in range(4)) + target + bytes(2000)
    tags = parse_tags(pglz_compress(raw) or b"")
    final = len(target) + 4 * 101
    assert (101, 100) in tags  # the newest copy of p, 101 bytes back
    assert (final, 200) not in tags
    # Without the drop (match_size_drop 0) the search reaches the long match.
    no_drop = PglzStrategy(32, 2**31 - 1, 25, 1024, 128, 0)
    assert (final, 200) in parse_tags(pglz_compress(raw, no_drop) or b"")


def _golden_inputs() -> list[tuple[bytes, int, str]]:
    rng = random.Random(1234)
    heap = heap_page(
        ntuples=60,
        tuple_len=121,
        template=rng.randbytes(121),
        varying=[30, 31, 64],
        seed=9,
        remove_hole=True,
    )
    high = bytes(rng.choice(b"\x00\x7f\x80\x81\xc3\xa9\xfe\xff") for _ in range(6000))
    words = [b"alpha", b"beta", b"gamma", b"\xc3\xa9t\xc3\xa9", b"delta", b"\xff\xfe"]
    text = b" ".join(rng.choice(words) for _ in range(2000))
    # Hashing bytes >= 0x80 as unsigned changes this one's output (seed found
    # by search): it pins the signed-char behaviour.
    rng = random.Random(23)
    tokens = [rng.randbytes(rng.randint(2, 6)) for _ in range(30)]
    binary = b"".join(rng.choice(tokens) for _ in range(1500))[:6000]
    return [
        (heap, 1031, "2895ca6493fd0981335d5f6a1d0ed095a2f33173e8c860780235df83b31453e3"),
        (high, 4120, "7f5408884fefb69d8fcb43dc46b121e0027f1bcd19c6e7d129c946a084ee1c11"),
        (text, 1782, "ba4060c2a03491055d276b8a03fdc91bdde743f0583ff04d17a35ab05fd388ee"),
        (binary, 2380, "add1762507baf2866ca6816f0ff65722f188b319d4e7816592b4dfd014c09c95"),
    ]


def test_matches_postgres_output() -> None:
    """Byte-identical to PostgreSQL 15.18 on x86-64 (signed char hash).

    The expected streams were taken from a bytea column with COMPRESSION pglz
    and STORAGE main (toast_compress_datum, default strategy), read back with
    pageinspect. PG on a platform with unsigned char (aarch64) may differ.
    """
    for raw, size, digest in _golden_inputs():
        stream = pglz_compress(raw)
        assert stream is not None
        assert (len(stream), hashlib.sha256(stream).hexdigest()) == (size, digest)
        assert pglz_decompress(stream, len(raw)) == raw


# ---------------------------------------------------------------------------
# Hand-built streams: every tag form
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param([b"abcdefgh", b"ij"], b"abcdefghij", id="literals-two-groups"),
        pytest.param([b"abc", (3, 3)], b"abcabc", id="short-min"),
        pytest.param([b"abcdefghijklmnopq", (17, 17)], b"abcdefghijklmnopq" * 2, id="short-max-17"),
        pytest.param([b"x" * 18, (18, 18)], b"x" * 36, id="long-18-extra-0"),
        pytest.param(
            [bytes(range(200)) + bytes(73), (273, 273)],
            (bytes(range(200)) + bytes(73)) * 2,
            id="long-273-extra-255",
        ),
        pytest.param([b"a", (1, 10)], b"a" * 11, id="overlap-run-1"),
        pytest.param([b"xyz", (3, 10)], b"xyz" * 4 + b"x", id="overlap-pattern-3"),
        pytest.param([b"11234", (4, 16)], b"112341234123412341234", id="overlap-doubling"),
        pytest.param([b"ab", (2, 273)], (b"ab" * 140)[:275], id="overlap-long"),
        pytest.param([b"abcd", (4, 4)], b"abcd" * 2, id="offset-equals-length"),
        pytest.param([b"abc", (2, 3), b"Z", (5, 4)], b"abcbcbZcbcb", id="mixed"),
    ],
)
def test_hand_built_streams(items: list[Item], expected: bytes) -> None:
    stream = build_stream(items)
    assert pglz_decompress(stream, len(expected)) == expected
    assert reference_decompress(stream, len(expected)) == expected


def test_tag_byte_layout() -> None:
    # OOOOLLLL OOOOOOOO: offset 0x123, length 5 -> 0x12, 0x23.
    prefix = bytes(range(256)) * 2
    stream = build_stream([prefix, (0x123, 5)])
    assert stream.endswith(b"\x12\x23")
    expected = prefix + prefix[-0x123 : -0x123 + 5]
    assert pglz_decompress(stream, len(expected)) == expected
    # Long form: 0xF nibble, then (length - 18).
    stream = build_stream([prefix, (0x123, 100)])
    assert stream.endswith(b"\x1f\x23\x52")


def test_max_offset_4095() -> None:
    rng = random.Random(1)
    prefix = rng.randbytes(4095)
    stream = build_stream([prefix, (4095, 3), (4095, 40)])
    expected = prefix + prefix[:3] + prefix[3:43]
    assert stream.endswith(b"\xf0\xff\x01\xff\xff\x16")  # a control byte between
    assert parse_tags(stream) == [(4095, 3), (4095, 40)]
    assert pglz_decompress(stream, len(expected)) == expected
    # One more byte of history makes offset 4095 point at byte 1.
    stream = build_stream([b"!" + prefix, (4095, 3)])
    assert pglz_decompress(stream, 4099) == b"!" + prefix + prefix[:3]


def test_tag_clamped_to_rawsize() -> None:
    # PG clamps a copy to the room left; the stream is then fully consumed, so
    # even check_complete accepts it.
    stream = build_stream([b"ab", (2, 100)])
    assert pglz_decompress(stream, 7) == b"abababa"
    assert reference_decompress(stream, 7) == b"abababa"


def test_unused_control_bits_are_ignored() -> None:
    # Control bits past the last item are not looked at.
    stream = b"\xfe" + b"a" + b"\x00\x01"  # literal 'a', tag (offset 1, length 3)
    assert pglz_decompress(stream, 4) == b"aaaa"
    assert pglz_decompress(b"\xf0abcd", 4) == b"abcd"


# ---------------------------------------------------------------------------
# Corrupt and hostile input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("check_complete", [True, False])
@pytest.mark.parametrize(
    ("stream", "rawsize", "what", "offset"),
    [
        pytest.param(b"\x01\x00\x00", 10, "offset 0", 1, id="offset-zero"),
        pytest.param(b"\x01\x00\x01", 10, "before the start", 1, id="offset-at-start"),
        pytest.param(b"\x02a\x00\x03", 10, "before the start", 2, id="offset-too-far"),
        pytest.param(build_stream([b"abc", (4, 3)]), 10, "before the start", 4, id="off-by-one"),
        pytest.param(b"\x02a\x00", 10, "truncated", 2, id="truncated-tag-1-byte"),
        pytest.param(b"\x02a\x0f\x01", 40, "missing length byte", 2, id="truncated-long-tag"),
    ],
)
def test_corrupt_tags(
    stream: bytes, rawsize: int, what: str, offset: int, check_complete: bool
) -> None:
    with pytest.raises(PglzError, match=what) as excinfo:
        pglz_decompress(stream, rawsize, check_complete)
    assert excinfo.value.offset == offset
    assert f"input offset {offset}" in str(excinfo.value)
    with pytest.raises(PglzError):
        reference_decompress(stream, rawsize, check_complete)


def test_corrupt_tag_in_fast_loop() -> None:
    # Deep enough into a long stream that the fast group loop sees it.
    rng = random.Random(2)
    good = build_stream([rng.randbytes(3000)])
    bad = good + b"\x01" + bytes([0xB0, 0xB9]) + b"\x00" * 30  # offset 0xBB9 = 3001
    with pytest.raises(PglzError, match="offset 3001 points before") as excinfo:
        pglz_decompress(bad, 20000)
    assert excinfo.value.offset == len(good) + 1


def test_incomplete_output() -> None:
    stream = build_stream([b"abc", (3, 3)])
    with pytest.raises(PglzError, match="decompressed 6 bytes, expected 7"):
        pglz_decompress(stream, 7)
    assert pglz_decompress(stream, 7, check_complete=False) == b"abcabc"


def test_trailing_input() -> None:
    stream = build_stream([b"abc", (3, 3)]) + b"\x00"
    with pytest.raises(PglzError, match="1 trailing input bytes"):
        pglz_decompress(stream, 6)
    assert pglz_decompress(stream, 6, check_complete=False) == b"abcabc"
    # Input left over because the output filled early.
    with pytest.raises(PglzError, match="trailing"):
        pglz_decompress(build_stream([b"abcdef"]), 4)


def test_negative_rawsize() -> None:
    with pytest.raises(PglzError, match="negative"):
        pglz_decompress(b"\x00a", -1)


def test_error_is_value_error() -> None:
    assert issubclass(PglzError, FormatError)
    assert issubclass(PglzError, ValueError)
    with pytest.raises(ValueError):
        pglz_decompress(b"\x01\x00\x00", 3)


def check_hostile(stream: bytes, rawsize: int) -> None:
    """Only PglzError, and never a wrong-length result; agree with the reference."""
    for complete in (True, False):
        try:
            got = pglz_decompress(stream, rawsize, complete)
        except PglzError:
            got = None
        try:
            want = reference_decompress(stream, rawsize, complete)
        except PglzError:
            want = None
        assert got == want
        if got is not None:
            assert len(got) <= rawsize
            if complete:
                assert len(got) == rawsize


@settings(max_examples=400, deadline=None)
@given(stream=st.binary(max_size=600), rawsize=st.integers(0, 3000))
def test_hostile_random_bytes(stream: bytes, rawsize: int) -> None:
    check_hostile(stream, rawsize)


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(
        st.sampled_from([b"\x00", b"\xff", b"\x01", b"\x0f", b"\xf0", b"\x1f", b"\x10", b"\x02"]),
        max_size=300,
    ).map(b"".join),
    rawsize=st.integers(0, 4000),
)
def test_hostile_tag_heavy_bytes(stream: bytes, rawsize: int) -> None:
    check_hostile(stream, rawsize)


@slow_settings
@given(data=compressed_pages(), cut=st.integers(0, 10**6))
def test_hostile_truncated_streams(data: tuple[bytes, bytes], cut: int) -> None:
    raw, stream = data
    truncated = stream[: cut % len(stream)]
    with pytest.raises(PglzError):
        pglz_decompress(truncated, len(raw))
    check_hostile(truncated, len(raw))


@slow_settings
@given(data=compressed_pages(), flips=st.lists(st.integers(0, 10**7), min_size=1, max_size=4))
def test_hostile_flipped_bits(data: tuple[bytes, bytes], flips: list[int]) -> None:
    raw, stream = data
    corrupt = bytearray(stream)
    for f in flips:
        corrupt[(f // 8) % len(corrupt)] ^= 1 << (f % 8)
    check_hostile(bytes(corrupt), len(raw))


@slow_settings
@given(data=compressed_pages(), delta=st.integers(-300, 300))
def test_hostile_wrong_rawsize(data: tuple[bytes, bytes], delta: int) -> None:
    raw, stream = data
    check_hostile(stream, max(0, len(raw) + delta))
