"""Names and small files of a Postgres 15 data directory (no I/O).

Relation file paths from src/common/relpath.c (GetRelationPath), segment size
RELSEG_SIZE from pg_config.h, backup_label lines from xlogbackup / xlog.c
(do_pg_backup_start writes them), pg_control's first field from
src/include/catalog/pg_control.h.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

from .errors import FormatError
from .lsn import LsnFormatError, parse_lsn

GLOBALTABLESPACE_OID: Final = 1664
DEFAULTTABLESPACE_OID: Final = 1663
RELSEG_SIZE: Final = 131072  # blocks per 1 GB segment file
TABLESPACE_VERSION_DIRECTORY: Final = "PG_15_202209061"

_FORK_SUFFIX: Final = {"": 0, "_fsm": 1, "_vm": 2, "_init": 3}
_REL_FILE = re.compile(r"^(\d+)(_fsm|_vm|_init)?(?:\.(\d+))?$")


@dataclass(frozen=True, slots=True)
class RelationFile:
    """One segment file of a relation fork."""

    spc: int
    db: int
    rel: int
    fork: int
    segno: int

    @property
    def first_block(self) -> int:
        return self.segno * RELSEG_SIZE


def parse_relation_path(path: str) -> RelationFile | None:
    """'base/5/16384_vm.1' -> RelationFile(1663, 5, 16384, 2, 1); None for non-relation files."""
    parts = path.split("/")
    if len(parts) == 2 and parts[0] == "global":
        spc, db, name = GLOBALTABLESPACE_OID, 0, parts[1]
    elif len(parts) == 3 and parts[0] == "base" and parts[1].isdigit():
        spc, db, name = DEFAULTTABLESPACE_OID, int(parts[1]), parts[2]
    elif len(parts) == 5 and parts[0] == "pg_tblspc" and parts[1].isdigit() and parts[3].isdigit():
        spc, db, name = int(parts[1]), int(parts[3]), parts[4]
    else:
        return None
    m = _REL_FILE.match(name)
    if not m:
        return None
    return RelationFile(spc, db, int(m.group(1)), _FORK_SUFFIX[m.group(2) or ""], int(m.group(3) or 0))


def relation_path(spc: int, db: int, rel: int, fork: int, segno: int = 0) -> str:
    """GetRelationPath plus the segment suffix."""
    suffix = {0: "", 1: "_fsm", 2: "_vm", 3: "_init"}[fork]
    if spc == GLOBALTABLESPACE_OID:
        base = f"global/{rel}{suffix}"
    elif spc == DEFAULTTABLESPACE_OID:
        base = f"base/{db}/{rel}{suffix}"
    else:
        base = f"pg_tblspc/{spc}/{TABLESPACE_VERSION_DIRECTORY}/{db}/{rel}{suffix}"
    return base if segno == 0 else f"{base}.{segno}"


class BackupLabelError(FormatError):
    """A backup_label that lacks what recovery needs."""


@dataclass(frozen=True, slots=True)
class BackupLabel:
    start_lsn: int  # START WAL LOCATION: where redo must begin
    checkpoint_lsn: int
    timeline: int


def parse_backup_label(text: str) -> BackupLabel:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        start = parse_lsn(fields["START WAL LOCATION"].split()[0])
        ckpt = parse_lsn(fields["CHECKPOINT LOCATION"])
        tli = int(fields.get("START TIMELINE", "1"))
    except (KeyError, IndexError, ValueError, LsnFormatError) as e:
        raise BackupLabelError(f"backup_label is missing or has a bad field: {e}") from None
    return BackupLabel(start, ckpt, tli)


# ControlFileData (pg_control.h): system_identifier u64 @0, pg_control_version
# u32 @8, catalog_version_no u32 @12, state (DBState, int) @16, time i64 @24,
# checkPoint XLogRecPtr @32.
DB_SHUTDOWNED: Final = 1
_CONTROL_HEAD = struct.Struct("<QIIi4xqQ")


@dataclass(frozen=True, slots=True)
class ControlFileHead:
    """The first fields of pg_control: enough to import a cleanly stopped cluster."""

    system_identifier: int
    pg_control_version: int
    catalog_version_no: int
    state: int
    time: int
    checkpoint_lsn: int


def parse_control_file_head(control: bytes) -> ControlFileHead:
    if len(control) < _CONTROL_HEAD.size:
        raise FormatError(f"pg_control is {len(control)} bytes")
    return ControlFileHead(*_CONTROL_HEAD.unpack_from(control, 0))


def control_file_system_identifier(control: bytes) -> int:
    """ControlFileData.system_identifier, the first 8 bytes of global/pg_control."""
    if len(control) < 8:
        raise FormatError(f"pg_control is {len(control)} bytes")
    return int(struct.unpack_from("<Q", control, 0)[0])
