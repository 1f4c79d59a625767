"""pglz: PostgreSQL's own LZ compression, as used for full-page images in WAL.

Mirrors src/common/pg_lzcompress.c and src/include/common/pg_lzcompress.h
(PostgreSQL 15). With ``wal_compression=pglz`` a block image in a WAL record
carries BKPIMAGE_COMPRESS_PGLZ and its bytes are a pglz stream; redo restores
it with ``pglz_decompress(..., BLCKSZ - hole_length, true)``.

Stream format (see the header comment of pg_lzcompress.c):

- A control byte governs the next 8 items, least significant bit first.
- A clear bit: one literal byte follows, copied to the output.
- A set bit: a 2-byte tag ``OOOOLLLL OOOOOOOO`` follows. Length is the low
  nibble of the first byte plus 3 (3..17), offset the other 12 bits (1..4095),
  counted back from the current output position. A nibble of 0xF means a third
  byte follows and is added to 18, for lengths up to 273.
- The copy may overlap its own output (offset < length), which repeats the
  last ``offset`` bytes: that is how runs are encoded.

Like PG15's decoder, a tag is clamped to the space left in the output, and a
tag that reads past the input, has offset 0 or points before the start of the
output is corrupt. With ``check_complete`` the output must be exactly
``rawsize`` bytes and the whole input must be consumed.

No I/O here; the one error type is :class:`PglzError`.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from . import native
from .errors import FormatError

__all__ = [
    "PGLZ_MAX_MATCH",
    "PGLZ_MAX_OFFSET",
    "PGLZ_STRATEGY_ALWAYS",
    "PGLZ_STRATEGY_DEFAULT",
    "PglzError",
    "PglzStrategy",
    "pglz_compress",
    "pglz_decompress",
    "pglz_maximum_compressed_size",
]

# pg_lzcompress.c: local definitions.
PGLZ_HISTORY_SIZE = 4096
PGLZ_MAX_MATCH = 273
# The largest offset a tag can encode. PG's compressor never emits more than
# 0x0fff - 1 (pglz_find_match stops at thisoff >= 0x0fff); its decompressor
# accepts 4095.
PGLZ_MAX_OFFSET = 0x0FFF

_INT_MAX = 0x7FFFFFFF


class PglzError(FormatError):
    """A pglz stream that PostgreSQL's pglz_decompress would reject (it returns -1).

    A FormatError, hence a ValueError.

    ``offset`` is the position in the compressed input where the problem was
    found (None when it is about the arguments rather than the input).
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        if offset is not None:
            message = f"{message} (at input offset {offset})"
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class PglzStrategy:
    """PGLZ_Strategy from src/include/common/pg_lzcompress.h."""

    min_input_size: int
    max_input_size: int
    min_comp_rate: int
    first_success_by: int
    match_size_good: int
    match_size_drop: int


# strategy_default_data in pg_lzcompress.c: what XLogCompressBackupBlock uses.
PGLZ_STRATEGY_DEFAULT = PglzStrategy(
    min_input_size=32,
    max_input_size=_INT_MAX,
    min_comp_rate=25,
    first_success_by=1024,
    match_size_good=128,
    match_size_drop=10,
)

# strategy_always_data in pg_lzcompress.c.
PGLZ_STRATEGY_ALWAYS = PglzStrategy(
    min_input_size=0,
    max_input_size=_INT_MAX,
    min_comp_rate=0,
    first_success_by=_INT_MAX,
    match_size_good=128,
    match_size_drop=6,
)


def pglz_maximum_compressed_size(rawsize: int, total_compressed_size: int) -> int:
    """pglz_maximum_compressed_size: input bytes enough to decode a raw prefix.

    All literals cost 9 bits a byte, rounded up to bytes; plus 2 for a prefix
    that ends in a tag after rawsize - 1 or - 2 literals (the corner case
    later PostgreSQL minor releases account for). Capped at the total size.
    """
    return min((rawsize * 9 + 7) // 8 + 2, total_compressed_size)


# --------------------------------------------------------------------------
# Decompression
# --------------------------------------------------------------------------


def _control_plans() -> tuple[tuple[int, ...], ...]:
    """For every control byte, its 8 items as runs: n > 0 is n literals, 0 a tag.

    Walking a control byte as runs lets consecutive literal bytes be copied
    with one slice instead of one bytecode loop turn each.
    """
    plans = []
    for ctrl in range(256):
        items: list[int] = []
        run = 0
        for bit in range(8):
            if ctrl >> bit & 1:
                if run:
                    items.append(run)
                    run = 0
                items.append(0)
            else:
                run += 1
        if run:
            items.append(run)
        plans.append(tuple(items))
    return tuple(plans)


_PLANS = _control_plans()


def _bad_offset(off: int, dp: int, tagpos: int) -> PglzError:
    if off == 0:
        return PglzError("pglz: tag with offset 0", tagpos)
    return PglzError(
        f"pglz: tag offset {off} points before the start of the output "
        f"(output position {dp})",
        tagpos,
    )


def _repeated(pattern: bytearray, length: int) -> bytearray:
    """What a tag whose copy overlaps its own output (offset < length) appends.

    PG copies byte by byte, so the last `offset` bytes (`pattern`) repeat.
    """
    reps, rest = divmod(length, len(pattern))
    return pattern * reps + pattern[:rest]


# A control group reads at most 1 + 8 * 3 input bytes and writes at most
# 8 * PGLZ_MAX_MATCH output bytes.
_GROUP_MAX_IN = 1 + 8 * 3
_GROUP_MAX_OUT = 8 * PGLZ_MAX_MATCH


def pglz_decompress(
    source: bytes | bytearray | memoryview,
    rawsize: int,
    check_complete: bool = True,
) -> bytes:
    """Decode a pglz stream, as pglz_decompress() in src/common/pg_lzcompress.c.

    Runs the compiled twin (pgformat._native) when it is built, else
    :func:`pglz_decompress_py`, the reference it is tested against; both
    behave as documented there.
    """
    compiled = native.compiled
    if compiled is not None:
        return bytes(compiled.pglz_decompress(source, rawsize, check_complete))
    return pglz_decompress_py(source, rawsize, check_complete)


def pglz_decompress_py(
    source: bytes | bytearray | memoryview,
    rawsize: int,
    check_complete: bool = True,
) -> bytes:
    """Decode a pglz stream, pure Python, as pglz_decompress() in src/common/pg_lzcompress.c.

    Returns at most ``rawsize`` bytes. With ``check_complete`` (what WAL image
    restore uses) the result is exactly ``rawsize`` bytes and every input byte
    was consumed, or PglzError is raised. Without it, decoding stops when the
    output is full or the input runs out, and the (possibly shorter) output is
    returned; corrupt tags still raise.
    """
    src = source if isinstance(source, bytes) else bytes(source)
    if rawsize < 0:
        raise PglzError(f"pglz: negative raw size {rawsize}")
    srcend = len(src)
    plans = _PLANS
    out = bytearray()
    sp = 0  # input position
    dp = 0  # output position, always len(out)

    # Fast loop: while a whole control group can neither run off the end of
    # the input nor fill the output, PG's per-item end checks and the length
    # clamp cannot trigger, so skip them. Only the offset needs checking.
    fast_sp = srcend - _GROUP_MAX_IN
    fast_dp = rawsize - _GROUP_MAX_OUT
    while sp <= fast_sp and dp <= fast_dp:
        plan = plans[src[sp]]
        sp += 1
        for n in plan:
            if n:
                out += src[sp : sp + n]
                sp += n
                dp += n
                continue
            t0 = src[sp]
            length = (t0 & 0x0F) + 3
            off = (t0 & 0xF0) << 4 | src[sp + 1]
            if not 0 < off <= dp:
                raise _bad_offset(off, dp, sp)
            if length == 18:
                length += src[sp + 2]
                sp += 3
            else:
                sp += 2
            start = dp - off
            out += out[start : start + length] if off >= length else _repeated(out[start:dp], length)
            dp += length

    # Careful loop, item by item as PG15 does, for the last groups.
    while sp < srcend and dp < rawsize:
        plan = plans[src[sp]]
        sp += 1
        for n in plan:
            if sp >= srcend or dp >= rawsize:
                break
            if n:
                # A run of literal bytes; stop where the input or the output
                # ends, as PG's loop would between two literals.
                if n > srcend - sp:
                    n = srcend - sp
                if n > rawsize - dp:
                    n = rawsize - dp
                out += src[sp : sp + n]
                sp += n
                dp += n
                continue
            if sp + 2 > srcend:
                raise PglzError("pglz: truncated tag", sp)
            t0 = src[sp]
            length = (t0 & 0x0F) + 3
            off = (t0 & 0xF0) << 4 | src[sp + 1]
            if length == 18:
                if sp + 3 > srcend:
                    raise PglzError("pglz: truncated tag (missing length byte)", sp)
                length += src[sp + 2]
            if not 0 < off <= dp:
                raise _bad_offset(off, dp, sp)
            sp += 3 if length >= 18 else 2
            # Don't emit more than requested.
            if length > rawsize - dp:
                length = rawsize - dp
            start = dp - off
            out += out[start : start + length] if off >= length else _repeated(out[start:dp], length)
            dp += length

    if check_complete:
        if dp != rawsize:
            raise PglzError(f"pglz: decompressed {dp} bytes, expected {rawsize}", sp)
        if sp != srcend:
            raise PglzError(
                f"pglz: {srcend - sp} trailing input bytes after {rawsize} output bytes",
                sp,
            )
    return bytes(out)


# --------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------


def _hash_size(slen: int) -> int:
    """The history table size pglz_compress picks for an input of slen bytes."""
    if slen < 128:
        return 512
    if slen < 256:
        return 1024
    if slen < 512:
        return 2048
    if slen < 1024:
        return 4096
    return 8192


def _history_indexes(src: bytes, mask: int) -> list[int]:
    """pglz_hist_idx for every input position.

    The macro reads the input through `const char *`, so on platforms where
    char is signed (x86-64) bytes >= 0x80 enter the hash as negative numbers.
    We follow that so the chosen matches, and hence the output, can match
    what PostgreSQL produces on x86-64. The last 3 positions hash on one byte.
    """
    s = array("b", src)  # signed chars
    slen = len(s)
    idx = [
        ((a << 6) ^ (b << 4) ^ (c << 2) ^ d) & mask
        for a, b, c, d in zip(s, s[1:], s[2:], s[3:])
    ]
    idx.extend(x & mask for x in s[max(slen - 3, 0) :])
    return idx


def pglz_compress(
    source: bytes | bytearray | memoryview,
    strategy: PglzStrategy | None = PGLZ_STRATEGY_DEFAULT,
) -> bytes | None:
    """Compress as pglz_compress() in src/common/pg_lzcompress.c.

    Returns the pglz stream, or None where PG returns -1: the input size is
    outside the strategy's range, nothing compressible was found within
    ``first_success_by`` output bytes, or the result would not beat
    ``min_comp_rate``. Same hash-chain history, same match search and same
    stop conditions as PG's, so the output is byte-identical to PostgreSQL's
    on x86-64 (checked against 15.18); a None strategy means the default.
    """
    src = bytes(source)
    if strategy is None:
        strategy = PGLZ_STRATEGY_DEFAULT
    slen = len(src)
    if (
        strategy.match_size_good <= 0
        or slen < strategy.min_input_size
        or slen > strategy.max_input_size
    ):
        return None

    good_match_start = min(max(strategy.match_size_good, 17), PGLZ_MAX_MATCH)
    good_drop = min(max(strategy.match_size_drop, 0), 100)
    need_rate = min(max(strategy.min_comp_rate, 0), 99)
    first_success_by = strategy.first_success_by
    if slen > _INT_MAX // 100:
        result_max = (slen // 100) * (100 - need_rate)
    else:
        result_max = (slen * (100 - need_rate)) // 100

    hashsz = _hash_size(slen)
    hist_idx = _history_indexes(src, hashsz - 1)
    # hist_start / hist_entries as plain chains: head[h] is the newest position
    # with hash h, prev[p] the next older one (-1 ends a chain). PG recycles
    # entries older than PGLZ_HISTORY_SIZE positions; we keep them, but the
    # search stops at the first one too far back to encode, as PG's does, so
    # the same candidates are visited in the same order.
    head = [-1] * hashsz
    prev = [-1] * slen

    out = bytearray()
    ctrl_pos = -1  # index in `out` of the current control byte
    ctrlb = 0
    ctrl = 0
    found_match = False
    dp = 0

    while dp < slen:
        bp = len(out)
        if bp >= result_max:
            return None
        if not found_match and bp >= first_success_by:
            return None

        # pglz_find_match
        match_len = 0
        match_off = 0
        good_match = good_match_start
        maxlen = slen - dp
        if maxlen > PGLZ_MAX_MATCH:
            maxlen = PGLZ_MAX_MATCH
        hp = head[hist_idx[dp]]
        while hp >= 0:
            thisoff = dp - hp
            if thisoff >= PGLZ_MAX_OFFSET:
                break
            # Only a match longer than the best so far matters, so reject
            # early on the byte that would make it longer, then on the prefix.
            if (
                match_len < maxlen
                and src[hp + match_len] == src[dp + match_len]
                and (
                    match_len == 0
                    or src[hp : hp + match_len] == src[dp : dp + match_len]
                )
            ):
                n = match_len + 1
                while n + 16 <= maxlen and (
                    src[hp + n : hp + n + 16] == src[dp + n : dp + n + 16]
                ):
                    n += 16
                while n < maxlen and src[hp + n] == src[dp + n]:
                    n += 1
                match_len = n
                match_off = thisoff
            hp = prev[hp]
            if hp >= 0:
                if match_len >= good_match:
                    break
                good_match -= good_match * good_drop // 100

        # pglz_out_ctrl
        if (ctrl & 0xFF) == 0:
            if ctrl_pos >= 0:
                out[ctrl_pos] = ctrlb
            ctrl_pos = len(out)
            out.append(0)
            ctrlb = 0
            ctrl = 1

        if match_len > 2:
            # pglz_out_tag
            ctrlb |= ctrl
            ctrl <<= 1
            hi = (match_off & 0xF00) >> 4
            if match_len > 17:
                out += bytes((hi | 0x0F, match_off & 0xFF, match_len - 18))
            else:
                out += bytes((hi | (match_len - 3), match_off & 0xFF))
            end = dp + match_len
            while dp < end:
                h = hist_idx[dp]
                prev[dp] = head[h]
                head[h] = dp
                dp += 1
            found_match = True
        else:
            # pglz_out_literal
            ctrl <<= 1
            out.append(src[dp])
            h = hist_idx[dp]
            prev[dp] = head[h]
            head[h] = dp
            dp += 1

    if ctrl_pos >= 0:
        out[ctrl_pos] = ctrlb
    if len(out) >= result_max:
        return None
    return bytes(out)
