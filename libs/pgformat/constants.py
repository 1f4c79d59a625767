"""Build constants of a stock PostgreSQL 15 (pg_config.h, pg_config_manual.h)."""

from __future__ import annotations

from typing import Final

PG_MAJOR_VERSION: Final = 15

BLCKSZ: Final = 8192
XLOG_BLCKSZ: Final = 8192
DEFAULT_WAL_SEG_SIZE: Final = 16 * 1024 * 1024
MAXIMUM_ALIGNOF: Final = 8

# src/include/access/xlog_internal.h
XLOG_PAGE_MAGIC: Final = 0xD110

# Fork numbers, src/include/common/relpath.h
MAIN_FORKNUM: Final = 0
FSM_FORKNUM: Final = 1
VISIBILITYMAP_FORKNUM: Final = 2
INIT_FORKNUM: Final = 3
FORK_NAMES: Final = ("main", "fsm", "vm", "init")

INVALID_TRANSACTION_ID: Final = 0
INVALID_BLOCK_NUMBER: Final = 0xFFFFFFFF


def maxalign(n: int) -> int:
    """MAXALIGN from c.h: round up to the platform's maximum alignment (8)."""
    return (n + 7) & ~7


def fork_name(forknum: int) -> str:
    """Fork name as Postgres spells it (relpath.c forkNames)."""
    if 0 <= forknum < len(FORK_NAMES):
        return FORK_NAMES[forknum]
    return f"fork{forknum}"
