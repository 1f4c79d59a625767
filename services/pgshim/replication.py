"""Replication commands: what pg_basebackup's WAL streaming needs.

A base backup from the page server carries its own WAL: one synthetic
segment holding the shutdown checkpoint the backup starts from. With
`pg_basebackup -X stream`, a second connection asks for that WAL with
START_REPLICATION while BASE_BACKUP is still sending files, so BASE_BACKUP
announces the segment when it starts (`WalSegments.expect`) and hands over
its bytes when the tar reaches them (`WalSegments.provide`); the streaming
connection waits for it. Message layouts: src/backend/replication/walsender.c
(XLogData 'w', keepalive 'k') and the protocol chapter "Streaming
Replication Protocol".
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgformat import wire
from pgformat.lsn import format_lsn
from pgformat.wire import Column, SqlState

from .commands import WAL_SEGMENT_SIZE, Command, Result, Token, lsn_argument, parse_option_list
from .errors import ClientGone, ShimError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("zenith.pgshim.replication")

TIMELINE_ID = 1  # computes' WAL stays on timeline 1 (see the base backup notes)
_PG_EPOCH_UNIX = 946684800  # 2000-01-01 in Unix time
_XLOG_CHUNK = 128 << 10
_KEEPALIVE_SECONDS = 10.0
_PAGE = 8192


def pg_now_us() -> int:
    """Microseconds since 2000-01-01 UTC (TimestampTz)."""
    return int((time.time() - _PG_EPOCH_UNIX) * 1_000_000)


@dataclass(slots=True)
class _Segment:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    data: bytes | None = None
    failed: str | None = None
    created: float = field(default_factory=time.monotonic)


class WalSegments:
    """WAL segments of base backups in progress or just taken, for -X stream.

    Keyed by (tenant, timeline, segment start LSN); the newest backup wins.
    Bounded: old entries are dropped.
    """

    def __init__(self, keep: int = 16, ttl: float = 3600.0) -> None:
        self._segments: dict[tuple[str, str, int], _Segment] = {}
        self.keep = keep
        self.ttl = ttl

    def expect(self, tenant: str, timeline: str, seg_start: int) -> None:
        self._prune()
        self._segments[(tenant, timeline, seg_start)] = _Segment()

    def provide(self, tenant: str, timeline: str, seg_start: int, data: bytes) -> None:
        seg = self._segments.setdefault((tenant, timeline, seg_start), _Segment())
        seg.data = data
        seg.ready.set()

    def fail(self, tenant: str, timeline: str, seg_start: int, why: str) -> None:
        seg = self._segments.get((tenant, timeline, seg_start))
        if seg is not None and seg.data is None:
            seg.failed = why
            seg.ready.set()

    async def get(self, tenant: str, timeline: str, seg_start: int) -> bytes:
        seg = self._segments.get((tenant, timeline, seg_start))
        if seg is None:
            raise ShimError(
                SqlState.UNDEFINED_FILE,
                f"requested WAL segment starting at {format_lsn(seg_start)} is not available",
                detail="the shim streams only the WAL of a base backup being taken through it "
                       "(pg_basebackup -X stream)")
        await seg.ready.wait()
        if seg.data is None:
            raise ShimError(SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
                            f"the base backup providing WAL at {format_lsn(seg_start)} failed: {seg.failed}")
        return seg.data

    def _prune(self) -> None:
        now = time.monotonic()
        for key, seg in list(self._segments.items()):
            if now - seg.created > self.ttl:
                del self._segments[key]
        while len(self._segments) >= self.keep:
            del self._segments[next(iter(self._segments))]


def segment_start(lsn: int) -> int:
    return lsn - lsn % WAL_SEGMENT_SIZE


def segment_start_from_name(name: str) -> int | None:
    """'000000010000000000000003' → start LSN of that segment (16 MB segments)."""
    if len(name) != 24 or not all(c in "0123456789ABCDEF" for c in name):
        return None
    log_id, seg_id = int(name[8:16], 16), int(name[16:24], 16)
    return (log_id << 32) | (seg_id * WAL_SEGMENT_SIZE)


# ------------------------------------------------------------------- commands


async def identify_system(session: Session) -> Result:
    target = await session.resolve_target()
    info = await session.client.timeline(target.tenant, target.timeline)
    xlogpos = target.lsn if target.lsn is not None else info.last_record_lsn
    columns = [Column("systemid"), Column("timeline", wire.INT4_OID, 4), Column("xlogpos"), Column("dbname")]
    return Result(columns, [[str(info.system_identifier), str(TIMELINE_ID), format_lsn(xlogpos), None]],
                  "IDENTIFY_SYSTEM")


async def timeline_history(session: Session) -> Result:
    raise ShimError(SqlState.UNDEFINED_FILE, "there is no history file: every branch's WAL is on timeline 1")


def parse_create_slot(args: list[Token]) -> Command:
    """CREATE_REPLICATION_SLOT name [TEMPORARY] PHYSICAL [(options) | RESERVE_WAL]."""
    words = [a for a in args if a.kind in ("word", "quoted")]
    if not words:
        raise ShimError(SqlState.SYNTAX_ERROR, "CREATE_REPLICATION_SLOT needs a slot name")
    name = words[0].text
    kinds = [w.text.upper() for w in words[1:3] if w.kind == "word"]
    temporary = "TEMPORARY" in kinds
    if "LOGICAL" in kinds:
        raise ShimError(SqlState.FEATURE_NOT_SUPPORTED, "logical replication slots are not supported by the shim")
    if "PHYSICAL" not in kinds:
        raise ShimError(SqlState.SYNTAX_ERROR, "expected PHYSICAL in CREATE_REPLICATION_SLOT")
    if not temporary:
        raise ShimError(SqlState.FEATURE_NOT_SUPPORTED,
                        "only TEMPORARY physical slots are supported (the page server keeps all WAL it needs)",
                        hint="run pg_basebackup without --create-slot/--slot")

    async def run(session: Session) -> Result:
        if name in session.temp_slots:
            raise ShimError("42710", f"replication slot \"{name}\" already exists")
        target = await session.resolve_target()
        info = await session.client.timeline(target.tenant, target.timeline)
        session.temp_slots.add(name)
        point = target.lsn if target.lsn is not None else info.last_record_lsn
        columns = [Column("slot_name"), Column("consistent_point"), Column("snapshot_name"), Column("output_plugin")]
        return Result(columns, [[name, format_lsn(point), None, None]], "CREATE_REPLICATION_SLOT")

    return Command("CREATE_REPLICATION_SLOT", run)


def parse_drop_slot(args: list[Token]) -> Command:
    if not args or args[0].kind not in ("word", "quoted"):
        raise ShimError(SqlState.SYNTAX_ERROR, "DROP_REPLICATION_SLOT needs a slot name")
    name = args[0].text

    async def run(session: Session) -> Result:
        if name not in session.temp_slots:
            raise ShimError(SqlState.UNDEFINED_OBJECT, f"replication slot \"{name}\" does not exist")
        session.temp_slots.discard(name)
        return Result([], [], "DROP_REPLICATION_SLOT")

    return Command("DROP_REPLICATION_SLOT", run)


def parse_start_replication(args: list[Token]) -> Command:
    """START_REPLICATION [SLOT name] [PHYSICAL] X/X [TIMELINE n]."""
    i = 0
    if i < len(args) and args[i].text.upper() == "SLOT":
        if i + 1 >= len(args):
            raise ShimError(SqlState.SYNTAX_ERROR, "SLOT needs a name")
        i += 2
    if i < len(args) and args[i].text.upper() == "LOGICAL":
        raise ShimError(SqlState.FEATURE_NOT_SUPPORTED, "logical replication is not supported by the shim")
    if i < len(args) and args[i].text.upper() == "PHYSICAL":
        i += 1
    if i >= len(args):
        raise ShimError(SqlState.SYNTAX_ERROR, "START_REPLICATION needs a start position X/X")
    start = lsn_argument(args[i].text)
    i += 1
    timeline = TIMELINE_ID
    if i < len(args) and args[i].text.upper() == "TIMELINE":
        if i + 1 >= len(args) or not args[i + 1].text.isdigit():
            raise ShimError(SqlState.SYNTAX_ERROR, "TIMELINE needs a number")
        timeline = int(args[i + 1].text)
        i += 2
    parse_option_list(args[i:])  # physical replication takes no options; reject malformed ones
    if timeline != TIMELINE_ID:
        raise ShimError(SqlState.INVALID_PARAMETER_VALUE, f"requested timeline {timeline} is not in this server's history")

    return Command("START_REPLICATION", lambda s: stream_wal(s, start), streaming=True)


def _wal_extent(data: bytes) -> int:
    """Bytes of the segment up to the end of its last non-empty page."""
    end = len(data)
    while end > 0 and not any(data[end - _PAGE:end]):
        end -= _PAGE
    return end


async def stream_wal(session: Session, start: int) -> None:
    """Send the WAL of the backup's segment from `start`, then idle until the client ends the copy."""
    target = await session.resolve_target()
    seg = segment_start(start)
    data = await session.server.wal.get(target.tenant, target.timeline, seg)
    end = max(_wal_extent(data), start - seg)
    session.send(wire.copy_both_response())
    pos = start - seg
    while pos < end:
        piece = data[pos:pos + _XLOG_CHUNK]
        session.send(wire.copy_data(b"w" + struct.pack("!QQQ", seg + pos, seg + end, pg_now_us()) + piece))
        pos += len(piece)
        await session.flush()
    await session.flush()
    sent_up_to = seg + end
    while True:
        try:
            kind, body = await asyncio.wait_for(session.recv(), _KEEPALIVE_SECONDS)
        except asyncio.TimeoutError:
            session.send(wire.copy_data(b"k" + struct.pack("!QQB", sent_up_to, pg_now_us(), 0)))
            await session.flush()
            continue
        if kind == b"d":
            continue  # standby status updates and hot-standby feedback: nothing to act on
        if kind == b"c":
            session.send(wire.COPY_DONE)
            session.send(wire.command_complete("START_STREAMING"))
            session.send(wire.command_complete("START_REPLICATION"))
            return
        if kind == b"X":
            raise ClientGone()
        raise wire.ProtocolError(f"unexpected message type {kind[0]} during replication")
