"""`zctl wal dump`: print the records of WAL segment files, like pg_waldump.

File I/O lives here (the format library has none): we read whole segment
files in LSN order and hand them to pgformat's reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pgformat.constants import BLCKSZ, fork_name
from pgformat.lsn import format_lsn
from pgformat.rmgr import record_type_name, rmgr_name
from pgformat.xlogreader import RawRecord, is_segment_file_name, iter_segment_records, parse_segment_file_name
from pgformat.xlogrecord import DecodedRecord


class WalFilesError(ValueError):
    """Paths that do not name WAL segment files or a directory holding them."""


def collect_segment_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their segment files; sort everything by LSN."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in p.iterdir() if f.is_file() and is_segment_file_name(f.name))
        elif p.is_file():
            if not is_segment_file_name(p.name):
                raise WalFilesError(f"{p}: not a WAL segment file name (expected 24 hex digits)")
            files.append(p)
        else:
            raise WalFilesError(f"{p}: no such file or directory")
    if not files:
        raise WalFilesError("no WAL segment files found in " + ", ".join(map(str, paths)))
    files.sort(key=lambda f: (parse_segment_file_name(f.name)[1], f.name))
    return files


def read_segments(files: Iterable[Path]) -> Iterator[tuple[int, bytes]]:
    for f in files:
        yield parse_segment_file_name(f.name)[1], f.read_bytes()


def iter_file_records(paths: Iterable[str | Path], verify_crc: bool = True) -> Iterator[RawRecord]:
    """Every record of the given segment files or pg_wal directories, in LSN order."""
    return iter_segment_records(read_segments(collect_segment_files(paths)), verify_crc=verify_crc)


def record_as_json(rec: DecodedRecord) -> dict[str, Any]:
    return {
        "lsn": format_lsn(rec.lsn),
        "end_lsn": format_lsn(rec.end_lsn),
        "prev": format_lsn(rec.prev),
        "rmgr": rmgr_name(rec.rmid),
        "type": record_type_name(rec.rmid, rec.info),
        "info": rec.info,
        "xid": rec.xid,
        "tot_len": rec.tot_len,
        "blocks": [
            {
                "id": b.block_id,
                "spc": b.rnode.spc,
                "db": b.rnode.db,
                "rel": b.rnode.rel,
                "fork": fork_name(b.forknum),
                "blk": b.blkno,
                "has_image": b.has_image,
                "apply_image": b.apply_image,
                "will_init": b.will_init,
                "data_len": len(b.data),
                **(
                    {
                        "image_len": len(b.image.data),
                        "hole_offset": b.image.hole_offset,
                        "hole_length": b.image.hole_length,
                        "compression": b.image.compression,
                    }
                    if b.image is not None
                    else {}
                ),
            }
            for b in rec.blocks
        ],
        "main_data_len": len(rec.main_data),
    }


def record_as_text(rec: DecodedRecord) -> str:
    """One line in pg_waldump's style (without its per-rmgr description)."""
    fpi_len = sum(len(b.image.data) for b in rec.blocks if b.image is not None)
    parts = [
        f"rmgr: {rmgr_name(rec.rmid):<11} len (rec/tot): {rec.tot_len - fpi_len:6}/{rec.tot_len:6}, "
        f"tx: {rec.xid:10}, lsn: {format_lsn(rec.lsn)}, prev {format_lsn(rec.prev)}, "
        f"desc: {record_type_name(rec.rmid, rec.info)}"
    ]
    for b in rec.blocks:
        s = f"blkref #{b.block_id}: rel {b.rnode} fork {fork_name(b.forknum)} blk {b.blkno}"
        if b.image is not None:
            s += " (FPW)" if b.apply_image else " (FPW for WAL verification)"
            s += f"; hole: offset: {b.image.hole_offset}, length: {b.image.hole_length}"
            if b.image.compression:
                saved = BLCKSZ - b.image.hole_length - len(b.image.data)
                s += f", compression saved: {saved}, method: {b.image.compression}"
        parts.append(s)
    return ", ".join(parts)


def dump(paths: Iterable[str | Path], out: IO[str], as_json: bool = False) -> int:
    """Print every record; return how many."""
    n = 0
    fmt = (lambda r: json.dumps(record_as_json(r), separators=(",", ":"))) if as_json else record_as_text
    for raw in iter_file_records(paths):
        out.write(fmt(raw.decode()))
        out.write("\n")
        n += 1
    return n
