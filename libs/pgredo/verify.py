"""Check our redo against the page images of `wal_consistency_checking = all`.

With that setting Postgres attaches to every block reference an image of the
page as it must be after redo (not flagged BKPIMAGE_APPLY). For each such
block we take the page as it stood before the record (the previous image of
that block in the stream, or nothing when the record initializes it), run our
redo, mask both pages with the rmgr's mask (as verifyBackupPageConsistency in
xlogrecovery.c does) and compare all 8192 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pgformat.bufmask import NoMaskError, mask_for_rmgr
from pgformat.constants import BLCKSZ
from pgformat.lsn import format_lsn
from pgformat.rmgr import record_type_name, rmgr_name
from pgformat.xlogrecord import DecodedRecord

from .engine import BufferTag, apply_block, apply_record, implied_tags
from .errors import RedoError, UnsupportedRecordError


@dataclass
class Mismatch:
    lsn: int
    rmgr: str
    record_type: str
    tag: BufferTag
    block_id: int
    first_offset: int | None  # None when redo raised instead of producing a page
    detail: str = ""

    def __str__(self) -> str:
        where = (
            f"first difference at byte {self.first_offset}" if self.first_offset is not None else self.detail
        )
        t = self.tag
        return (
            f"{format_lsn(self.lsn)} {self.rmgr}/{self.record_type} blkref #{self.block_id} "
            f"rel {t.rnode} fork {t.forknum} blk {t.blkno}: {where}"
        )


@dataclass
class RmgrTally:
    records: int = 0
    blocks_checked: int = 0
    matched: int = 0
    mismatched: int = 0
    unsupported: int = 0
    no_base: int = 0


@dataclass
class VerifyReport:
    per_rmgr: dict[str, RmgrTally] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    unsupported_types: dict[str, int] = field(default_factory=dict)

    def tally(self, rmgr: str) -> RmgrTally:
        return self.per_rmgr.setdefault(rmgr, RmgrTally())

    @property
    def checked(self) -> int:
        return sum(t.blocks_checked for t in self.per_rmgr.values())

    @property
    def mismatched(self) -> int:
        return sum(t.mismatched for t in self.per_rmgr.values())

    @property
    def unsupported(self) -> int:
        return sum(t.unsupported for t in self.per_rmgr.values())

    def as_json(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "mismatched": self.mismatched,
            "unsupported": self.unsupported,
            "rmgrs": {name: vars(t) for name, t in sorted(self.per_rmgr.items())},
            "unsupported_types": dict(sorted(self.unsupported_types.items())),
            "mismatches": [str(m) for m in self.mismatches[:100]],
        }


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    if a == b:
        return None
    return next(i for i in range(min(len(a), len(b))) if a[i] != b[i])


def verify_records(records: Iterable[DecodedRecord], max_mismatches: int = 1000) -> VerifyReport:
    report = VerifyReport()
    pages: dict[BufferTag, bytearray] = {}  # the latest true page of every block seen
    for rec in records:
        rmgr = rmgr_name(rec.rmid)
        tally = report.tally(rmgr)
        tally.records += 1
        for tag in implied_tags(rec):
            # Keep unregistered pages (visibility map) current; nothing to check them against.
            if tag in pages:
                try:
                    pages[tag] = apply_record(tag, pages[tag], rec)
                except RedoError:
                    del pages[tag]
        for block in rec.blocks:
            tag = BufferTag(block.rnode, block.forknum, block.blkno)
            image = block.image
            if image is None:
                # Nothing to compare with; keep the page current if we can.
                if tag in pages or block.will_init:
                    try:
                        pages[tag] = apply_block(block, pages.get(tag), rec)
                    except RedoError:
                        pages.pop(tag, None)
                continue
            expected = bytearray(image.page())
            if image.apply:
                pages[tag] = expected
                continue
            base = pages.get(tag)
            if base is None and not block.will_init:
                tally.no_base += 1
                pages[tag] = expected
                continue
            tally.blocks_checked += 1
            try:
                ours = apply_block(block, bytearray(base) if base is not None else None, rec)
            except UnsupportedRecordError:
                tally.unsupported += 1
                name = f"{rmgr}/{record_type_name(rec.rmid, rec.info)}"
                report.unsupported_types[name] = report.unsupported_types.get(name, 0) + 1
                pages[tag] = expected
                continue
            except (RedoError, ValueError) as e:
                tally.mismatched += 1
                if len(report.mismatches) < max_mismatches:
                    report.mismatches.append(
                        Mismatch(rec.lsn, rmgr, record_type_name(rec.rmid, rec.info), tag, block.block_id, None,
                                 f"redo raised {type(e).__name__}: {e}")
                    )
                pages[tag] = expected
                continue
            try:
                mask = mask_for_rmgr(rec.rmid)
            except NoMaskError:
                tally.unsupported += 1
                name = f"{rmgr}/(no mask)"
                report.unsupported_types[name] = report.unsupported_types.get(name, 0) + 1
                pages[tag] = expected
                continue
            got = bytearray(ours)
            want = bytearray(expected)
            mask(want, block.blkno)
            try:
                mask(got, block.blkno)
                diff = first_difference(got, want) if len(got) == BLCKSZ else min(len(got), BLCKSZ)
            except ValueError:  # our page is so wrong the mask cannot read it (PageError)
                diff = 0
            if diff is None:
                tally.matched += 1
            else:
                tally.mismatched += 1
                if len(report.mismatches) < max_mismatches:
                    report.mismatches.append(
                        Mismatch(rec.lsn, rmgr, record_type_name(rec.rmid, rec.info), tag, block.block_id, diff)
                    )
            pages[tag] = expected
    return report
