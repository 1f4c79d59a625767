"""Base backups over the wire: Neon's `basebackup` and PG15's `BASE_BACKUP`.

`basebackup <tenant> <timeline> [lsn] [--gzip]` passes the page server's tar
through a COPY OUT. `BASE_BACKUP (...)` answers an unmodified pg_basebackup
15 with the message sequence of src/backend/backup/basebackup_copy.c: start
position, tablespace list, one COPY OUT carrying the archive ('n' new
archive, 'd' data, 'p' progress) and the backup manifest ('m'), then the end
position. The archive is re-framed on the fly (pg_basebackup reads file
names only from the ustar name field) while each file's CRC goes into the
manifest (src/backend/backup/backup_manifest.c). The WAL the backup needs
is the page server's synthetic segment: it goes into the archive for
`WAL` (-X fetch) or to the streaming connection for -X stream.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from pgformat import wire
from pgformat.backup_manifest import ManifestBuilder
from pgformat.lsn import format_lsn
from pgformat.tarstream import (
    TAR_END,
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarStreamParser,
    tar_padding,
    ustar_header,
)
from pgformat.wire import Column, SqlState

from .commands import Command, Options, Token, lsn_argument, parse_option_list
from .errors import ShimError, from_rpc_error
from .replication import TIMELINE_ID, segment_start, segment_start_from_name

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("zenith.pgshim.backup")

_COPY_CHUNK = 256 << 10
_PROGRESS_EVERY = 4 << 20
_POSITION_COLUMNS = [Column("recptr"), Column("tli", wire.INT8_OID, -1)]
_TABLESPACE_COLUMNS = [Column("spcoid", wire.OID_OID, 4), Column("spclocation"), Column("size", wire.INT8_OID, 8)]
_CHECKSUMS = ("NONE", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512")


# ------------------------------------------------------------------- Neon's basebackup


def parse_basebackup_command(args: list[Token]) -> Command:
    """basebackup <tenant> <timeline> [lsn] [--gzip] [--replica]."""
    words = [a.text for a in args]
    flags = {w for w in words if w.startswith("--")}
    plain = [w for w in words if not w.startswith("--")]
    if len(plain) not in (2, 3) or flags - {"--gzip", "--replica"}:
        raise ShimError(SqlState.SYNTAX_ERROR, "usage: basebackup <tenant_id> <timeline_id> [lsn] [--gzip]")
    tenant, timeline = plain[0].lower(), plain[1]
    lsn = lsn_argument(plain[2]) if len(plain) == 3 and plain[2].lower() != "latest" else 0
    gzip = "--gzip" in flags

    async def run(session: Session) -> None:
        client = session.client
        info = await client.resolve_timeline(tenant, timeline)
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
        session.send(wire.copy_out_response())
        async for chunk in client.basebackup_chunks(tenant, info.timeline.id, lsn):
            data = compressor.compress(chunk.data) if compressor else chunk.data
            if data:
                session.send(wire.copy_data(data))
                await session.flush()
        if compressor:
            session.send(wire.copy_data(compressor.flush()))
        session.send(wire.COPY_DONE)
        session.send(wire.command_complete("SELECT 1"))

    return Command("basebackup", run, streaming=True)


# ------------------------------------------------------------------- BASE_BACKUP


@dataclass(frozen=True, slots=True)
class BaseBackupSettings:
    """What a BASE_BACKUP asked for (PG15 option names)."""

    label: str = "base backup"
    progress: bool = False
    include_wal: bool = False
    manifest: bool = True
    force_encode: bool = False
    checksum: str = "CRC32C"


def parse_base_backup_command(args: list[Token]) -> Command:
    settings = base_backup_settings(_options(args))
    return Command("BASE_BACKUP", lambda s: send_base_backup(s, settings), streaming=True)


def _options(args: list[Token]) -> Options:
    if not args or args[0].kind == "lparen":
        return parse_option_list(args)
    # The pre-15 syntax: bare keywords, some followed by a value.
    opts = Options()
    takes_value = {"LABEL", "MAX_RATE", "MANIFEST", "MANIFEST_CHECKSUMS"}
    renamed = {"FAST": ("CHECKPOINT", "fast"), "NOWAIT": ("WAIT", "false"),
               "NOVERIFY_CHECKSUMS": ("VERIFY_CHECKSUMS", "false")}
    i = 0
    while i < len(args):
        name = args[i].text.upper()
        if name in takes_value:
            if i + 1 >= len(args):
                raise ShimError(SqlState.SYNTAX_ERROR, f"{name} needs a value")
            opts.values[name] = args[i + 1].text
            i += 2
            continue
        key, value = renamed.get(name, (name, None))
        opts.values[key] = value
        i += 1
    return opts


def base_backup_settings(opts: Options) -> BaseBackupSettings:
    known = {"LABEL", "PROGRESS", "CHECKPOINT", "WAIT", "WAL", "MAX_RATE", "TABLESPACE_MAP", "VERIFY_CHECKSUMS",
             "MANIFEST", "MANIFEST_CHECKSUMS", "TARGET", "TARGET_DETAIL", "COMPRESSION", "COMPRESSION_DETAIL"}
    for name in opts.values:
        if name not in known:
            raise ShimError(SqlState.SYNTAX_ERROR, f"unrecognized base backup option: \"{name.lower()}\"")
    target = (opts.values.get("TARGET") or "client").lower()
    if target != "client":
        raise ShimError(SqlState.FEATURE_NOT_SUPPORTED, f"backup target \"{target}\" is not supported by the shim",
                        hint="omit --target: the backup is sent to the client")
    compression = (opts.values.get("COMPRESSION") or "none").lower()
    if compression != "none":
        raise ShimError(SqlState.FEATURE_NOT_SUPPORTED, "server-side compression is not supported by the shim",
                        hint="use client-side compression (pg_basebackup --compress=client-gzip)")
    manifest = (opts.values.get("MANIFEST") or "yes").lower()
    if manifest not in ("yes", "no", "force-encode"):
        raise ShimError(SqlState.SYNTAX_ERROR, f"unrecognized manifest option: \"{manifest}\"")
    checksum = (opts.values.get("MANIFEST_CHECKSUMS") or "CRC32C").upper()
    if checksum not in _CHECKSUMS:
        raise ShimError(SqlState.SYNTAX_ERROR, f"unrecognized checksum algorithm: \"{checksum}\"")
    checkpoint = (opts.values.get("CHECKPOINT") or "spread").lower()
    if checkpoint not in ("fast", "spread"):
        raise ShimError(SqlState.SYNTAX_ERROR, f"unrecognized checkpoint type: \"{checkpoint}\"")
    for flag in ("WAIT", "TABLESPACE_MAP", "VERIFY_CHECKSUMS"):
        opts.flag(flag)  # validated, no effect: the page server's backup is consistent as of its LSN
    return BaseBackupSettings(label=opts.values.get("LABEL") or "base backup", progress=opts.flag("PROGRESS"),
                              include_wal=opts.flag("WAL"), manifest=manifest != "no",
                              force_encode=manifest == "force-encode", checksum=checksum)


class _ArchiveWriter:
    """Re-frames the page server's tar for pg_basebackup and feeds the manifest."""

    def __init__(self, session: Session, settings: BaseBackupSettings, manifest: ManifestBuilder | None,
                 tenant: str, timeline: str) -> None:
        self.session = session
        self.settings = settings
        self.manifest = manifest
        self.tenant, self.timeline = tenant, timeline
        self.buf = bytearray()
        self.sent = 0
        self.next_progress = _PROGRESS_EVERY
        self.member: MemberStart | None = None
        self.in_archive = False
        self.in_manifest = False
        self.wal_data: bytearray | None = None
        self.wal_segments: dict[int, bytes] = {}

    def _emit(self, data: bytes) -> None:
        self.buf += data

    async def drain(self, force: bool = False) -> None:
        while len(self.buf) >= _COPY_CHUNK or (force and self.buf):
            piece = bytes(self.buf[:_COPY_CHUNK])
            del self.buf[:_COPY_CHUNK]
            self.session.send(wire.copy_data(b"d" + piece))
            self.sent += len(piece)
            if self.settings.progress and self.sent >= self.next_progress:
                self.session.send(wire.copy_data(b"p" + self.sent.to_bytes(8, "big")))
                self.next_progress = self.sent + _PROGRESS_EVERY
            await self.session.flush()

    def handle(self, event: object) -> None:
        if isinstance(event, MemberStart):
            self.member = event
            is_wal_file = event.name.startswith("pg_wal/") and event.kind == "file"
            self.wal_data = bytearray() if is_wal_file else None
            self.in_archive = not is_wal_file or self.settings.include_wal
            self.in_manifest = self.manifest is not None and event.kind == "file" and not is_wal_file
            if self.in_archive:
                self._emit(ustar_header(event.name, event.size if event.kind == "file" else 0, mode=event.mode,
                                        mtime=event.mtime, kind=event.kind, linkname=event.linkname))
            if self.in_manifest and self.manifest is not None:
                self.manifest.begin_file(event.name, event.mtime)
        elif isinstance(event, MemberData):
            if self.in_archive:
                self._emit(event.data)
            if self.in_manifest and self.manifest is not None:
                self.manifest.update(event.data)
            if self.wal_data is not None:
                self.wal_data += event.data
        elif isinstance(event, MemberEnd):
            member = self.member
            assert member is not None
            if self.in_archive and member.kind == "file":
                self._emit(tar_padding(member.size))
            if self.in_manifest and self.manifest is not None:
                self.manifest.end_file()
            if self.wal_data is not None:
                start = segment_start_from_name(member.name.rsplit("/", 1)[-1])
                if start is not None:
                    self.wal_segments[start] = bytes(self.wal_data)
                    self.session.server.wal.provide(self.tenant, self.timeline, start, self.wal_segments[start])
            self.member, self.wal_data = None, None
        elif isinstance(event, ArchiveEnd):
            self._emit(TAR_END)


async def send_base_backup(session: Session, settings: BaseBackupSettings) -> None:
    target = await session.resolve_target()
    client = session.client
    call = client.basebackup(target.tenant, target.timeline, target.lsn or 0)
    expected_wal: int | None = None
    try:
        first = await call.read()
        if first is grpc.aio.EOF or not first.wal_end_lsn:
            raise ShimError(SqlState.INTERNAL_ERROR, "the page server's base backup did not say where it starts")
        start, end = first.checkpoint_lsn, first.wal_end_lsn
        if not settings.include_wal:
            expected_wal = segment_start(start)
            session.server.wal.expect(target.tenant, target.timeline, expected_wal)
        log.info("BASE_BACKUP", extra={"pid": session.pid, "timeline": target.timeline, "lsn": format_lsn(first.lsn),
                                       "start": format_lsn(start), "end": format_lsn(end)})
        session.send(wire.result_set(_POSITION_COLUMNS, [[format_lsn(start), str(TIMELINE_ID)]], "SELECT"))
        session.send(wire.result_set(_TABLESPACE_COLUMNS, [[None, None, None]], "SELECT"))
        session.send(wire.copy_out_response())
        session.send(wire.copy_data(b"n" + b"base.tar\0" + b"\0"))
        await session.flush()
        manifest = ManifestBuilder(checksum=settings.checksum, force_encode=settings.force_encode) \
            if settings.manifest else None
        writer = _ArchiveWriter(session, settings, manifest, target.tenant, target.timeline)
        parser = TarStreamParser()
        if first.data:
            for event in parser.feed(first.data):
                writer.handle(event)
        while (chunk := await call.read()) is not grpc.aio.EOF:
            for event in parser.feed(chunk.data):
                writer.handle(event)
            await writer.drain()
        parser.close()  # raises unless the archive ended properly
        await writer.drain(force=True)
        if settings.progress:
            session.send(wire.copy_data(b"p" + writer.sent.to_bytes(8, "big")))
        if manifest is not None:
            manifest.add_wal_range(TIMELINE_ID, start, end)
            session.send(wire.copy_data(b"m"))
            body = manifest.render()
            for i in range(0, len(body), _COPY_CHUNK):
                session.send(wire.copy_data(b"d" + body[i:i + _COPY_CHUNK]))
        if expected_wal is not None and expected_wal not in writer.wal_segments:
            raise ShimError(SqlState.INTERNAL_ERROR, "the page server's base backup has no WAL segment")
        session.send(wire.COPY_DONE)
        session.send(wire.result_set(_POSITION_COLUMNS, [[format_lsn(end), str(TIMELINE_ID)]], "SELECT"))
        session.send(wire.command_complete("BASE_BACKUP"))
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, "base backup") from None
    finally:
        call.cancel()
        if expected_wal is not None:
            session.server.wal.fail(target.tenant, target.timeline, expected_wal, "the base backup did not finish")
