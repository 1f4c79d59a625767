"""Data page checksums (src/include/storage/checksum_impl.h), many pages at a time.

The algorithm: 32 parallel FNV-1a-like lanes over the page viewed as
uint32[64][32] (with pd_checksum taken as zero), two extra rounds of zeros,
the lanes XOR-folded, the block number mixed in, then folded to 1..65535.
Computed with numpy across a batch of pages: lanes x pages in one array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from .constants import BLCKSZ

_N_SUMS: Final = 32
_FNV_PRIME: Final = np.uint32(16777619)
_BASE_OFFSETS: Final = np.array([
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
], dtype=np.uint32)
_PD_CHECKSUM_OFFSET: Final = 8  # PageHeaderData: pd_lsn (8 bytes), then pd_checksum (uint16)
_PD_UPPER_OFFSET: Final = 14


def page_checksums(pages: Sequence[bytes], first_blkno: int) -> list[int]:
    """pg_checksum_page() of each page; page i is block first_blkno + i of its fork."""
    if not pages:
        return []
    data = np.frombuffer(b"".join(pages), dtype="<u4").reshape(len(pages), BLCKSZ // (4 * _N_SUMS), _N_SUMS).copy()
    data[:, 0, _PD_CHECKSUM_OFFSET // 4] &= np.uint32(0xFFFF0000)  # pd_checksum counts as zero (little-endian)
    sums = np.tile(_BASE_OFFSETS, (len(pages), 1))
    for row in range(data.shape[1]):
        tmp = sums ^ data[:, row, :]
        sums = (tmp * _FNV_PRIME) ^ (tmp >> np.uint32(17))
    for _ in range(2):
        sums = (sums * _FNV_PRIME) ^ (sums >> np.uint32(17))
    folded = np.bitwise_xor.reduce(sums, axis=1).astype(np.uint64)
    blknos = np.arange(first_blkno, first_blkno + len(pages), dtype=np.uint64)
    return [int(c) for c in ((folded ^ blknos) % np.uint64(65535)) + np.uint64(1)]


def with_checksums(pages: Sequence[bytes], first_blkno: int) -> list[bytes]:
    """The pages with pd_checksum set; new (all-zero header) pages are left alone, as Postgres does."""
    sums = page_checksums(pages, first_blkno)
    out = []
    for page, checksum in zip(pages, sums):
        if page[_PD_UPPER_OFFSET:_PD_UPPER_OFFSET + 2] == b"\0\0":  # PageIsNew
            out.append(page)
        else:
            out.append(page[:_PD_CHECKSUM_OFFSET] + checksum.to_bytes(2, "little") + page[_PD_CHECKSUM_OFFSET + 2:])
    return out
