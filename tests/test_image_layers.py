"""Image layers: base backups read through a layer are byte-identical to base backups read from page
versions alone.

The oracle is a second copy of the same repository that never had a layer: every member of
every base backup (plain tar and LZ4 frames) must match, at the layer's LSN, after it (pages
changed, a fork truncated, a table dropped, a relation rewritten), before it (the layer is out of
reach) and on a branch reading through its parent's layer. The primary runs with data checksums,
so the layer's stored pages carry them too. Layers are made with redo in this process and with
the redo service's stream API.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PgFactory
from pageserver_util import RunningPageServer, current_lsn, import_backup, push_wal, take_base_backup

from pgformat.lz4stream import Lz4FrameStream, Lz4StreamError
from services.pageserver.basebackup import write_basebackup
from services.pageserver.image_layers import LAYER_DIR, ImageLayerError
from services.pageserver.imager import ImageLayerMaker
from services.pageserver.redo_client import RemoteRedo
from services.pageserver.repository import DEFAULT_TENANT, LayerCancelledError, Repository, Timeline
from zctl.extract import DataDirectoryWriter, ExtractError

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


def test_backups_through_a_layer_match_backups_without(history: History, pair: tuple[Repository, Repository]) -> None:
    ours, reference = pair
    tl, ref_tl = _main(ours), _main(reference)
    layer_lsn = write_basebackup(reference, ref_tl, history.layer_lsn, io.BytesIO()).lsn  # snapped to a record end
    layer = ours.create_image_layer(tl, layer_lsn)
    assert layer.checksums and layer.path.is_file() and [la.lsn for la in ours.image_layers(tl)] == [layer_lsn]
    last = tl.last_record_lsn
    for name, lsn in (("import", history.start), ("layer", layer_lsn), ("after", history.after), ("last", last)):
        expected = _members(reference, ref_tl, lsn)
        _assert_same(_members(ours, tl, lsn), expected)
        _assert_same(_members(ours, tl, lsn, lz4=True), expected)
    # The untouched table's pages travel as the layer's stored frames, not recompressed.
    out = io.BytesIO()
    write_basebackup(ours, tl, last, out, lz4=True)
    kept = history.filepaths["kept"]
    with ours.backup_view(tl, last, checksums=True) as view:
        assert view.layer is not None and view.floor == (tl.id, layer_lsn)
        rel = next(r for r in ours.list_rels(tl, layer_lsn) if kept.endswith(f"/{r.rel}") and r.fork == 0)
        chunk = next(iter(ours.fork_chunks(view, rel, 1)))
        assert chunk.frame is None  # block 0 of `kept` changed after the layer; the others did not
        chunks = list(ours.fork_chunks(view, rel, ours.rel_size(tl, rel, last) or 0))
    assert any(c.frame is not None for c in chunks) and all(c.frame in out.getvalue() for c in chunks if c.frame)
    # A branch at the last LSN reads through its parent's layer.
    for repo in (ours, reference):
        repo.create_timeline(DEFAULT_TENANT, BRANCH, ancestor=TIMELINE)
    _assert_same(_members(ours, ours.timeline(DEFAULT_TENANT, BRANCH), last),
                 _members(reference, reference.timeline(DEFAULT_TENANT, BRANCH), last))

    # A newer layer replaces the old one (file and index); the old LSN is then out of its reach.
    newer = ours.create_image_layer(tl)
    assert [la.lsn for la in ours.image_layers(tl)] == [last] and not layer.path.exists()
    assert newer.path.is_file()
    for lsn in (layer_lsn, last):
        _assert_same(_members(ours, tl, lsn, lz4=True), _members(reference, ref_tl, lsn))
    assert ours.create_image_layer(tl) == newer  # nothing new to write


def test_layer_made_through_the_redo_service(history: History, tmp_path: Path) -> None:
    """The pages only WAL holds are redone in batches over ApplyRecordsStream; same archive."""
    proc = subprocess.Popen([sys.executable, "-m", "services.redo.main", "--listen", "127.0.0.1:0", "--workers", "2"],
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
    layer = ours.create_image_layer(tl)
    raw = bytearray(layer.path.read_bytes())
    # A flipped byte inside a frame: its content checksum catches it when the page server
    # decompresses (plain archive) and when the client does (stored frames pass through).
    raw[len(raw) // 2] ^= 0xFF
    layer.path.write_bytes(raw)
    with pytest.raises(ImageLayerError):
        write_basebackup(ours, tl, tl.last_record_lsn, io.BytesIO())
    out = io.BytesIO()
    try:
        write_basebackup(ours, tl, tl.last_record_lsn, out, lz4=True)
    except ImageLayerError:
        pass  # the damaged chunk had a changed page: decompressed here, refused here
    else:
        writer = DataDirectoryWriter(Path(ours.path / "unpacked"), lz4=True)
        with pytest.raises(ExtractError):
            writer.feed(out.getvalue())
            writer.close()
        writer.abort()
    # A file cut short: the index says more than it holds.
    layer.path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ImageLayerError, match="shorter than its index"):
        write_basebackup(ours, tl, tl.last_record_lsn, io.BytesIO(), lz4=True)


def test_orphans_and_cancelled_layers_leave_nothing(history: History, pair: tuple[Repository, Repository]) -> None:
    ours, _ = pair
    tl = _main(ours)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LayerCancelledError):
        ours.create_image_layer(tl, cancel=cancel)
    assert ours.image_layers(tl) == [] and list((ours.path / LAYER_DIR).iterdir()) == []
    # A crash between writing a layer file and committing its index leaves an orphan: removed at open.
    (ours.path / LAYER_DIR / "1-0000000001000000.layer").write_bytes(b"half a layer")
    (ours.path / LAYER_DIR / "1-0000000002000000.tmp").write_bytes(b"a layer being written")
    ours.close()
    reopened = Repository(ours.path)
    assert list((ours.path / LAYER_DIR).iterdir()) == []
    reopened.close()


def test_background_maker_writes_a_layer_when_due(history: History, pair: tuple[Repository, Repository]) -> None:
    busy, quiet = pair
    changes, pages = busy.changes_since_layer(_main(busy), lambda pages: 10**9)
    assert pages == 0 and changes > 4 * 100  # the whole import and the WAL after it
    # Far past the threshold: written at the first look, without waiting for ingest to go quiet.
    maker = ImageLayerMaker(busy, interval=3600, min_changes=100)
    assert maker.run_once() == [_main(busy)]
    assert [la.lsn for la in busy.image_layers(_main(busy))] == [_main(busy).last_record_lsn]
    changes, pages = busy.changes_since_layer(_main(busy), lambda pages: 10**9)
    assert changes == 0 and pages > 0
    assert maker.run_once() == []  # nothing changed since
    # Past the threshold but not four times: only once the timeline was seen quiet (same LSN twice).
    maker = ImageLayerMaker(quiet, interval=3600, min_changes=changes_at_start(quiet) // 2)
    assert maker.run_once() == []
    assert maker.run_once() == [_main(quiet)]


def changes_at_start(repo: Repository) -> int:
    return repo.changes_since_layer(_main(repo), lambda pages: 10**9)[0]


def test_lz4_stream_refuses_other_bytes() -> None:
    with pytest.raises(Lz4StreamError):
        Lz4FrameStream().feed(b"not lz4 at all")


def test_gc_past_a_layer_removes_it(history: History, pair: tuple[Repository, Repository]) -> None:
    """A layer below the GC cutoff is neither used nor kept (GC rewrites the history its readers
    check); base backups at and above the cutoff stay as they were."""
    ours, reference = pair
    tl = _main(ours)
    layer = ours.create_image_layer(tl, write_basebackup(ours, tl, history.layer_lsn, io.BytesIO()).lsn)
    ours.gc(tl, history.after)
    assert ours.image_layers(tl) == [] and not layer.path.exists()
    last = tl.last_record_lsn
    _assert_same(_members(ours, tl, last, lz4=True), _members(reference, _main(reference), last))
    ours.create_image_layer(tl)  # and a new one above the cutoff serves again
    _assert_same(_members(ours, tl, last, lz4=True), _members(reference, _main(reference), last))
