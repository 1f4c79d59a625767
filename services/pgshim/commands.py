"""The commands the shim understands, parsed from query text.

Page service commands (Neon's page_service.rs): `pagestream_v2|v3 <tenant>
<timeline>`, `basebackup <tenant> <timeline> [lsn] [--gzip]`, `status`.
Replication commands (src/backend/replication/repl_gram.y, PG15), enough
for pg_basebackup: IDENTIFY_SYSTEM, SHOW, BASE_BACKUP, CREATE_REPLICATION_SLOT,
DROP_REPLICATION_SLOT, START_REPLICATION, TIMELINE_HISTORY.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgformat import wire
from pgformat.lsn import LsnFormatError, format_lsn, parse_lsn
from pgformat.wire import Column, SqlState

from .errors import ShimError

if TYPE_CHECKING:
    from .session import Session

WAL_SEGMENT_SIZE = 16 << 20


@dataclass(slots=True)
class Result:
    """A complete, small result: rows and the CommandComplete tag."""

    columns: Sequence[Column]
    rows: Sequence[Sequence[str | bytes | None]]
    tag: str

    def describe(self) -> bytes:
        return wire.row_description(self.columns) if self.columns else wire.NO_DATA

    def encode(self, with_description: bool) -> bytes:
        head = wire.row_description(self.columns) if with_description and self.columns else b""
        return head + b"".join(wire.data_row(r) for r in self.rows) + wire.command_complete(self.tag)


Runner = Callable[["Session"], Awaitable[Result | None]]


@dataclass(slots=True)
class Command:
    """A parsed command. Streaming commands write their own messages and return None."""

    name: str
    run: Runner
    streaming: bool = False
    pure: bool = False  # no side effects: may run early to describe its result


# ------------------------------------------------------------------- tokenizer

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<lparen>\() | (?P<rparen>\)) | (?P<comma>,) |
      '(?P<string>(?:[^']|'')*)' |
      "(?P<quoted>(?:[^"]|"")*)" |
      (?P<word>[^\s(),'"]+)
    )""", re.VERBOSE)


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # lparen rparen comma string quoted word
    text: str


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ShimError(SqlState.SYNTAX_ERROR, f"syntax error at or near \"{text[pos:pos + 20].strip()}\"")
        kind = m.lastgroup or "word"
        value = m.group(kind)
        if kind == "string":
            value = value.replace("''", "'")
        elif kind == "quoted":
            value = value.replace('""', '"')
        tokens.append(Token(kind, value))
        pos = m.end()
    return tokens


def lsn_argument(text: str) -> int:
    """An X/X argument of a command; a syntax error (42601) otherwise."""
    try:
        return parse_lsn(text)
    except LsnFormatError as e:
        raise ShimError(SqlState.SYNTAX_ERROR, str(e)) from None


# ------------------------------------------------------------------- options


@dataclass(slots=True)
class Options:
    """Generic `( NAME [value], ... )` options as PG15 writes them (repl_gram.y generic_option_list)."""

    values: dict[str, str | None] = field(default_factory=dict)

    def flag(self, name: str) -> bool:
        if name not in self.values:
            return False
        v = self.values[name]
        if v is None:
            return True
        low = v.lower()
        if low in ("true", "on", "1", "yes"):
            return True
        if low in ("false", "off", "0", "no"):
            return False
        raise ShimError(SqlState.SYNTAX_ERROR, f"{name.lower()} requires a Boolean value")


def parse_option_list(tokens: list[Token]) -> Options:
    """`( A, B 'x', C 5 )` → {A: None, B: 'x', C: '5'}; names upper-cased."""
    opts = Options()
    if not tokens:
        return opts
    if tokens[0].kind != "lparen" or tokens[-1].kind != "rparen":
        raise ShimError(SqlState.SYNTAX_ERROR, "options must be a parenthesized list")
    items: list[list[Token]] = [[]]
    for t in tokens[1:-1]:
        if t.kind == "comma":
            items.append([])
        elif t.kind in ("lparen", "rparen"):
            raise ShimError(SqlState.SYNTAX_ERROR, "unexpected parenthesis in option list")
        else:
            items[-1].append(t)
    for item in items:
        if not item or len(item) > 2 or item[0].kind != "word":
            raise ShimError(SqlState.SYNTAX_ERROR, "malformed option list")
        name = item[0].text.upper()
        if name in opts.values:
            raise ShimError(SqlState.SYNTAX_ERROR, f"duplicate option \"{name.lower()}\"")
        opts.values[name] = item[1].text if len(item) == 2 else None
    return opts


# ------------------------------------------------------------------- parsing


def parse_command(text: str) -> Command | None:
    """The command a query string names; None for an empty query."""
    stripped = text.strip().rstrip(";").strip()
    if not stripped:
        return None
    tokens = tokenize(stripped)
    head = tokens[0].text.lower() if tokens[0].kind == "word" else ""
    args = tokens[1:]
    # The command modules import this one; import them when a command needs them.
    from . import pagestream, replication

    if head in _TRANSACTION_COMMANDS:
        # Drivers wrap queries in transactions (psycopg without autocommit); the shim's
        # commands are not transactional, so these succeed and do nothing.
        tag = _TRANSACTION_COMMANDS[head]
        return Command(tag, lambda s: _done(tag), pure=True)
    if head == "status" and not args:
        return Command("status", run_status, pure=True)
    if head in ("pagestream_v2", "pagestream_v3"):
        tenant, timeline = _ids(args, head)
        version = 3 if head.endswith("v3") else 2
        return Command(head, lambda s: pagestream.serve(s, tenant, timeline, version), streaming=True)
    if head == "basebackup":
        from . import backup

        return backup.parse_basebackup_command(args)
    if head == "identify_system" and not args:
        return Command("IDENTIFY_SYSTEM", replication.identify_system, pure=True)
    if head == "show" and len(args) == 1:
        name = args[0].text.lower()
        return Command("SHOW", lambda s: run_show(s, name), pure=True)
    if head == "base_backup":
        from . import backup

        return backup.parse_base_backup_command(args)
    if head == "create_replication_slot":
        return replication.parse_create_slot(args)
    if head == "drop_replication_slot":
        return replication.parse_drop_slot(args)
    if head == "start_replication":
        return replication.parse_start_replication(args)
    if head == "timeline_history":
        return Command("TIMELINE_HISTORY", replication.timeline_history)
    raise ShimError(SqlState.SYNTAX_ERROR, f"unknown command \"{stripped[:60]}\"",
                    hint="this is the zenith page server shim: try `status`, `pagestream_v2 <tenant> <timeline>`, "
                         "`basebackup <tenant> <timeline> [lsn]`, or replication commands (pg_basebackup)")


_TRANSACTION_COMMANDS = {"begin": "BEGIN", "start": "START TRANSACTION", "commit": "COMMIT", "end": "COMMIT",
                         "rollback": "ROLLBACK", "abort": "ROLLBACK"}


async def _done(tag: str) -> Result:
    return Result([], [], tag)


def _ids(args: list[Token], head: str) -> tuple[str, str]:
    if len(args) != 2 or any(a.kind != "word" for a in args):
        raise ShimError(SqlState.SYNTAX_ERROR, f"usage: {head} <tenant_id> <timeline_id>")
    return args[0].text.lower(), args[1].text


# ------------------------------------------------------------------- simple commands

_STATUS_COLUMNS = [Column(n) for n in ("tenant", "timeline_id", "branch", "ancestor_timeline", "ancestor_lsn",
                                       "last_record_lsn", "durable_lsn", "gc_cutoff_lsn", "state")]


async def run_status(session: Session) -> Result:
    """One row per timeline of every tenant."""
    client = session.client
    rows: list[list[str | bytes | None]] = []
    for tenant in await client.tenants():
        for t in await client.timelines(tenant):
            rows.append([tenant, t.timeline.id, t.name or None, t.ancestor_timeline.id or None,
                         format_lsn(t.ancestor_lsn) if t.ancestor_timeline.id else None,
                         format_lsn(t.last_record_lsn), format_lsn(t.durable_lsn), format_lsn(t.gc_cutoff_lsn),
                         _state_name(t.state)])
    return Result(_STATUS_COLUMNS, rows, f"SELECT {len(rows)}")


def _state_name(state: Any) -> str:
    from zproto import pageserver_pb2

    return pageserver_pb2.TimelineState.Name(state).removeprefix("TIMELINE_STATE_").lower()


async def run_show(session: Session, name: str) -> Result:
    """SHOW for the settings replication clients ask about."""
    from .session import SERVER_VERSION

    requested = session.requested
    values = {
        "wal_segment_size": "16MB",
        "data_directory_mode": "0700",
        "server_version": SERVER_VERSION,
        "server_version_num": "150000",
        "server_encoding": "UTF8",
        "integer_datetimes": "on",
        "zenith.tenant": requested[0],
        "zenith.branch": requested[1],
        "zenith.lsn": format_lsn(requested[2]) if requested[2] is not None else "latest",
    }
    if name not in values:
        raise ShimError(SqlState.UNDEFINED_OBJECT, f"unrecognized configuration parameter \"{name}\"")
    return Result([Column(name)], [[values[name]]], "SHOW")
