"""Image layers: base backups read through a layer are byte-identical to base backups read from the
delta layers alone.

The oracle is a second copy of the same repository that never had an image layer: every member
of every base backup (plain tar and LZ4 frames) must match, at the layer's LSN, after it (pages
changed, a fork truncated, a table dropped, a relation rewritten), before it (the layer is out of
reach) and on a branch reading through its parent's layer; and a backup at the layer's LSN needs
no redo at all (every read stops at the layer). The primary runs with data checksums. Layers
are made with redo in this process and with the redo service's stream API.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PgFactory
from pageserver_util import RunningPageServer, current_lsn, import_backup, push_wal, take_base_backup

from pgformat.lz4stream import Lz4FrameStream, Lz4StreamError
from services.pageserver.basebackup import write_basebackup
from pgformat.xlogrecord import DecodedRecord
from services.pageserver.imager import ImageLayerMaker
from services.pageserver.maintenance import image_debt
from services.pageserver.redo_client import RemoteRedo
from services.pageserver.repository import (
    DEFAULT_TENANT,
    LayerCancelledError,
    PageRedo,
    RedoJob,
    Repository,
    Timeline,
)
from services.pageserver.storage.errors import LayerCorruptError, ManifestError

TIMELINE = "44444444444444444444444444444444"
BRANCH = "55555555555555555555555555555555"


@dataclass
class History:
    repo: Path  # WAL up to `after` ingested; never had a layer
    start: int  # the import LSN
    layer_lsn: int
    after: int
    filepaths: dict[str, str]  # table -> relation file path at `layer_lsn`


@pytest.fixture(scope="module")
def history(pg_session_factory: PgFactory, pg_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> History:
    primary = pg_session_factory("layers", autovacuum="off", initdb_args=["--data-checksums"])
    primary.pgbench("-i", "-s", "2", "-q")
    primary.execute("""
        CREATE TABLE kept (id int PRIMARY KEY, v text);
        INSERT INTO kept SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, 30000) i;
        CREATE TABLE shrinking (id int, pad text);
        INSERT INTO shrinking SELECT i, repeat('s', 500) FROM generate_series(1, 3000) i;
        CREATE TABLE doomed (id int);
        INSERT INTO doomed SELECT generate_series(1, 5000);
        CREATE TABLE rewritten (id int PRIMARY KEY, v text);
        INSERT INTO rewritten SELECT i, 'r' FROM generate_series(1, 2000) i;
    """)
    backup = take_base_backup(primary, pg_base_dir / "layers-backup")
    primary.pgbench("-c", "2", "-t", "300", "-n")  # records on top of the imported images
    layer_lsn = current_lsn(primary)
    filepaths = {t: primary.sql(f"SELECT pg_relation_filepath('{t}')")[0][0]
                 for t in ("kept", "shrinking", "doomed", "rewritten", "pgbench_accounts")}
    # After the layer: changed pages, a truncation, a drop, a rewrite (new relfilenode), a new table.
    primary.pgbench("-c", "2", "-t", "300", "-n")
    primary.execute("DELETE FROM shrinking WHERE id > 1000")
    primary.sql("VACUUM shrinking")
    primary.execute("""
        DROP TABLE doomed;
        TRUNCATE rewritten;
        INSERT INTO rewritten SELECT i, 'again' FROM generate_series(1, 500) i;
        CREATE TABLE fresh AS SELECT i AS id, md5(i::text) AS v FROM generate_series(1, 4000) i;
        CREATE INDEX fresh_v ON fresh (v);
        UPDATE kept SET v = 'changed' WHERE id <= 20;
    """)
    after = current_lsn(primary)
    primary.sql("SELECT pg_switch_wal()")
    repo = tmp_path_factory.mktemp("layers-repo") / "repo"
    ps = RunningPageServer(repo)
    try:
        summary = import_backup(ps.stub, backup, TIMELINE)
        assert push_wal(ps.stub, primary.waldir, TIMELINE, summary.start_lsn) >= after
    finally:
        ps.close()
    return History(repo, summary.start_lsn, layer_lsn, after, filepaths)


def _copy(history: History, dest: Path) -> Repository:
    shutil.copytree(history.repo, dest)
    return Repository(dest)


def _members(repo: Repository, tl: Timeline, lsn: int, *, lz4: bool = False) -> dict[str, bytes]:
    """Every member of the base backup by name, but pg_control and the checkpoint's WAL segment: they
    carry the clock time of the backup (and no page of a layer; test_basebackup checks them)."""
    out = io.BytesIO()
    write_basebackup(repo, tl, lsn, out, lz4=lz4)
    data = out.getvalue()
    if lz4:
        frames = Lz4FrameStream()
        data = b"".join(frames.feed(data))
        frames.close()
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            f = tar.extractfile(m)
            body = f.read() if f is not None else b"<dir>"
            members[m.name] = body
    return {k: v for k, v in members.items() if not k.startswith("pg_wal/0") and k != "global/pg_control"}


def _assert_same(ours: dict[str, bytes], reference: dict[str, bytes]) -> None:
    assert sorted(ours) == sorted(reference)
    differing = [name for name in reference if ours[name] != reference[name]]
    assert not differing, differing


@pytest.fixture
def pair(history: History, tmp_path: Path) -> Iterator[tuple[Repository, Repository]]:
    """(a copy that gets layers, a copy that never does) of the same history."""
    ours, reference = _copy(history, tmp_path / "ours"), _copy(history, tmp_path / "reference")
    yield ours, reference
    ours.close()
    reference.close()


def _main(repo: Repository) -> Timeline:
    return repo.timeline(DEFAULT_TENANT, TIMELINE)


class CountingRedo:
    """The repository's redo, counting the pages it rebuilds."""

    def __init__(self, inner: PageRedo) -> None:
        self.inner, self.pages = inner, 0

    def redo(self, key: bytes, base: bytes | None, records: Sequence[DecodedRecord]) -> bytes:
        self.pages += 1
        return self.inner.redo(key, base, records)

    def redo_many(self, jobs: Sequence[RedoJob]) -> list[bytes]:
        self.pages += len(jobs)
        return self.inner.redo_many(jobs)


def _image_files(repo: Repository, tl: Timeline) -> list[Path]:
    return [tl.layers.store.root / d.file_name for d in repo.image_layers(tl)]  # type: ignore[attr-defined]


def test_backups_through_a_layer_match_backups_without(history: History, pair: tuple[Repository, Repository]) -> None:
    ours, reference = pair
    tl, ref_tl = _main(ours), _main(reference)
    layer_lsn = write_basebackup(reference, ref_tl, history.layer_lsn, io.BytesIO()).lsn  # snapped to a record end
    layer = ours.create_image_layer(tl, layer_lsn)
    assert layer.lsn_start == layer_lsn and ours.image_layers(tl) == [layer]
    assert all(p.is_file() for p in _image_files(ours, tl))
    last = tl.last_record_lsn
    for name, lsn in (("import", history.start), ("layer", layer_lsn), ("after", history.after), ("last", last)):
        expected = _members(reference, ref_tl, lsn)
        _assert_same(_members(ours, tl, lsn), expected)
        _assert_same(_members(ours, tl, lsn, lz4=True), expected)
    # At the layer's LSN every read stops at the layer: nothing is redone, where the copy without
    # a layer redoes the pages written since the import.
    counting, ref_counting = CountingRedo(ours.redo), CountingRedo(reference.redo)
    ours.redo, reference.redo = counting, ref_counting
    _members(ours, tl, layer_lsn)
    _members(reference, ref_tl, layer_lsn)
    assert counting.pages == 0 and ref_counting.pages > 100, (counting.pages, ref_counting.pages)
    # A branch at the last LSN reads through its parent's layers.
    for repo in (ours, reference):
        repo.create_timeline(DEFAULT_TENANT, BRANCH, ancestor=TIMELINE)
    _assert_same(_members(ours, ours.timeline(DEFAULT_TENANT, BRANCH), last),
                 _members(reference, reference.timeline(DEFAULT_TENANT, BRANCH), last))

    # A newer layer replaces the old one (file and manifest): reads at the old LSN go through the
    # delta layers again, as they did before it.
    old_files = _image_files(ours, tl)
    newer = ours.create_image_layer(tl)
    assert ours.image_layers(tl) == [newer] and newer.lsn_start == last
    assert not any(p.exists() for p in old_files)
    for lsn in (layer_lsn, last):
        _assert_same(_members(ours, tl, lsn, lz4=True), _members(reference, ref_tl, lsn))
    assert ours.create_image_layer(tl) == newer  # nothing new to write
    # They survive a restart: the manifest names them.
    ours.close()
    reopened = Repository(ours.path)
    assert reopened.image_layers(_main(reopened)) == [newer]
    _assert_same(_members(reopened, _main(reopened), last), _members(reference, ref_tl, last))
    reopened.close()


def test_layer_made_through_the_redo_service(history: History, tmp_path: Path) -> None:
    """The pages only WAL holds are redone in batches over ApplyRecordsStream; same archive."""
    proc = subprocess.Popen([sys.executable, "-m", "services.redo.main", "--listen", "127.0.0.1:0", "--workers", "2",
                             "--insecure"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        redo = RemoteRedo(line.split()[-1])
        shutil.copytree(history.repo, tmp_path / "remote")
        ours = Repository(tmp_path / "remote", redo=redo)
        reference = _copy(history, tmp_path / "reference")
        ours.create_image_layer(_main(ours))
        _assert_same(_members(ours, _main(ours), history.after, lz4=True),
                     _members(reference, _main(reference), history.after))
        redo.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_damaged_layers_are_refused(history: History, pair: tuple[Repository, Repository]) -> None:
    ours, _ = pair
    tl = _main(ours)
    ours.create_image_layer(tl)
    (path,) = _image_files(ours, tl)
    raw = bytearray(path.read_bytes())
    # A flipped byte inside a block: its checksum catches it; nothing is served from that block.
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(raw)
    with pytest.raises(LayerCorruptError, match=path.name):
        write_basebackup(ours, tl, tl.last_record_lsn, io.BytesIO())
    # A file cut short: the manifest's size and the file's own index disagree with it.
    path.write_bytes(raw[: len(raw) // 3])
    ours.close()
    with pytest.raises(ManifestError, match="wrong size"):
        Repository(ours.path)


def test_orphans_and_cancelled_layers_leave_nothing(history: History, pair: tuple[Repository, Repository]) -> None:
    ours, _ = pair
    tl = _main(ours)
    files = sorted(p.name for p in tl.layers.store.root.iterdir())  # type: ignore[attr-defined]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LayerCancelledError):
        ours.create_image_layer(tl, cancel=cancel)
    assert ours.image_layers(tl) == []
    assert sorted(p.name for p in tl.layers.store.root.iterdir()) == files  # type: ignore[attr-defined]
    # A crash between writing a layer file and the manifest naming it leaves an orphan; one while
    # writing it, a temporary file: both removed at open.
    root = tl.layers.store.root  # type: ignore[attr-defined]
    (root / f"{'00' * 18}-{'ff' * 19}__{tl.last_record_lsn:016X}.image").write_bytes(b"half a layer")
    (root / ".tmp-a-layer-being-written").write_bytes(b"a layer being written")
    ours.close()
    reopened = Repository(ours.path)
    assert sorted(p.name for p in root.iterdir()) == files
    reopened.close()


def test_background_maker_writes_a_layer_when_due(history: History, pair: tuple[Repository, Repository]) -> None:
    busy, quiet = pair
    debt, image_bytes = image_debt(busy, _main(busy))
    assert image_bytes == 0 and debt == history.after - history.start + (_main(busy).last_record_lsn - history.after)
    # Far past the threshold: written at the first look, without waiting for ingest to go quiet.
    maker = ImageLayerMaker(busy, interval=3600, min_wal=debt // 8)
    assert maker.run_once() == [_main(busy)]
    assert [d.lsn_start for d in busy.image_layers(_main(busy))] == [_main(busy).last_record_lsn]
    debt, image_bytes = image_debt(busy, _main(busy))
    assert debt == 0 and image_bytes > 0
    assert maker.run_once() == []  # nothing changed since
    # Past the threshold but not four times: only once the timeline was seen quiet (same LSN twice).
    maker = ImageLayerMaker(quiet, interval=3600, min_wal=image_debt(quiet, _main(quiet))[0] // 2)
    assert maker.run_once() == []
    assert maker.run_once() == [_main(quiet)]


def test_lz4_stream_refuses_other_bytes() -> None:
    with pytest.raises(Lz4StreamError):
        Lz4FrameStream().feed(b"not lz4 at all")


def test_gc_past_a_layer_removes_it(history: History, pair: tuple[Repository, Repository]) -> None:
    """A layer below the GC cutoff goes (the image GC writes at the cutoff hides it); base backups
    at and above the cutoff stay as they were."""
    ours, reference = pair
    tl = _main(ours)
    layer = ours.create_image_layer(tl, write_basebackup(ours, tl, history.layer_lsn, io.BytesIO()).lsn)
    old_files = _image_files(ours, tl)
    cutoff = ours.gc(tl, history.after).cutoff
    assert [d.lsn_start for d in ours.image_layers(tl)] == [cutoff] and layer not in ours.image_layers(tl)
    assert not any(p.exists() for p in old_files)
    last = tl.last_record_lsn
    _assert_same(_members(ours, tl, last, lz4=True), _members(reference, _main(reference), last))
    _assert_same(_members(ours, tl, cutoff, lz4=True), _members(reference, _main(reference), cutoff))
    ours.create_image_layer(tl)  # and a new one above the cutoff serves again
    _assert_same(_members(ours, tl, last, lz4=True), _members(reference, _main(reference), last))
