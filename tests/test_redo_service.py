"""The redo pool service (services/redo) over real gRPC with real worker processes.

A real Postgres 15 primary with `wal_consistency_checking = all` runs pgbench
(-i -s 1 and a few hundred transactions) plus a little SQL (B-tree splits,
deletes, VACUUM, a hash index, rolled-back transactions), so every record carries, for each block it
touches, an image of the page as Postgres's redo must leave it. From that WAL
we pick a few hundred (block, record) pairs whose previous page is known (the
image of the block at its previous record), ask the service to apply the
record to that page, and compare the answer with Postgres's image after the
rmgr's mask (pgformat.bufmask), exactly as verifyBackupPageConsistency does.

CLOG pages are checked against the primary's own pg_xact: the commits and
aborts of the workload, applied to an absent (all-zero) page, must give each
transaction the status Postgres wrote.

The service runs as its console script `zenith-redo` in a subprocess, with
two workers and `--enable-test-hooks` so a request can make its worker crash
or hang on purpose.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import PgFactory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from walcorpus import capture_corpus

from pgformat.bufmask import mask_for_rmgr
from pgformat.constants import BLCKSZ
from pgformat.page import new_page, page_get_lsn
from pgformat.rmgr import (
    RM_BTREE_ID,
    RM_HASH_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_XACT_ID,
    XLOG_HEAP_DELETE,
    XLOG_HEAP_OPMASK,
    record_type_name,
    rmgr_name,
)
from pgformat.xlogrecord import DecodedRecord, record_crc
from pgredo.engine import BufferTag, implied_tags, redo_page
from pgredo.errors import UnsupportedRecordError
from pgredo.slru import SlruKind, SlruPageTag, clog_get_status, slru_tags_for_record, xact_completion
from zctl.waldump import iter_file_records
from services.redo.pool import JobError, PageResult, RedoPool
from zproto import common_pb2, redo_pb2, redo_pb2_grpc

SUPPORTED_RMIDS = {RM_HEAP_ID, RM_HEAP2_ID, RM_BTREE_ID}
SAMPLE_SIZE = 300
FAILURE_KEY = "zenith-redo-failure-bin"
HOOK_KEY = "zenith-test-hook"

SQL_WORKLOAD = [
    "CREATE TABLE items (id int PRIMARY KEY, label text, qty int)",
    "CREATE INDEX items_label ON items (label)",
    "INSERT INTO items SELECT i, md5(i::text), i % 100 FROM generate_series(1, 3000) i",
    "UPDATE items SET qty = qty + 1 WHERE id % 4 = 0",
    "UPDATE items SET label = label || 'x' WHERE id % 9 = 0",
    "DELETE FROM items WHERE id % 5 = 0",
    "CREATE TABLE hashed (k int)",
    "CREATE INDEX hashed_k ON hashed USING hash (k)",
    "INSERT INTO hashed SELECT generate_series(1, 300)",
    "BEGIN; INSERT INTO hashed VALUES (-1); ROLLBACK",  # an abort record
    "BEGIN; DELETE FROM items WHERE id < 10; ROLLBACK",
]


# -- the WAL corpus and the pairs picked from it --------------------------------------


@dataclass
class Case:
    """Apply `records` to `base` (None: the first record initializes the page); expect `expected`."""

    tag: BufferTag
    base: bytes | None
    records: list[DecodedRecord]
    expected: bytes

    @property
    def last(self) -> DecodedRecord:
        return self.records[-1]

    def type_name(self) -> str:
        return f"{rmgr_name(self.last.rmid)}/{record_type_name(self.last.rmid, self.last.info)}"


@dataclass
class Corpus:
    pairs: list[Case]  # one record each
    chains: list[Case]  # several consecutive records of one block
    hash_pairs: list[Case]  # Hash records with a known base (unsupported while Hash redo is missing)
    xact_records: list[DecodedRecord] = dataclasses.field(default_factory=list)  # Transaction rmgr
    clog: bytes = b""  # the primary's pg_xact/0000 after a clean shutdown


@pytest.fixture(scope="module")
def corpus(pg_session_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    node = pg_session_factory(wal_consistency_checking="all", wal_compression="lz4")
    start = node.current_lsn()
    node.pgbench("-i", "-s", "1", "-q")
    node.pgbench("-c", "2", "-t", "150", "-n")
    for stmt in SQL_WORKLOAD:
        node.execute(stmt)
    node.sql("VACUUM items")
    c = capture_corpus(node, tmp_path_factory.mktemp("redo-service") / "pg_wal", start)
    records = [r.decode() for r in iter_file_records([c.waldir]) if r.lsn >= start]
    corpus = pick_cases(records)
    corpus.xact_records = [r for r in records if r.rmid == RM_XACT_ID]
    corpus.clog = (node.datadir / "pg_xact" / "0000").read_bytes()
    return corpus


def pick_cases(records: list[DecodedRecord]) -> Corpus:
    """Walk the WAL like pgredo.verify: the true page of each block is its latest image."""
    pages: dict[BufferTag, bytes] = {}
    chains_open: dict[BufferTag, tuple[bytes | None, list[DecodedRecord]]] = {}
    by_type: dict[tuple[int, int], list[Case]] = {}
    chains: list[Case] = []
    hash_pairs: list[Case] = []
    for rec in records:
        for tag in implied_tags(rec):  # e.g. VM bits cleared without a block reference: page unknown now
            pages.pop(tag, None)
            chains_open.pop(tag, None)
        for block in rec.blocks:
            tag = BufferTag(block.rnode, block.forknum, block.blkno)
            if block.image is None:
                pages.pop(tag, None)
                chains_open.pop(tag, None)
                continue
            expected = block.image.page()
            base = pages.get(tag)
            known = base is not None or block.will_init
            if not block.image.apply and known:
                case = Case(tag, None if block.will_init else base, [rec], expected)
                if rec.rmid in SUPPORTED_RMIDS:
                    by_type.setdefault((rec.rmid, rec.info & 0xF0), []).append(case)
                elif rec.rmid == RM_HASH_ID:
                    hash_pairs.append(case)
            pages[tag] = expected
            if rec.rmid not in SUPPORTED_RMIDS:
                chains_open.pop(tag, None)
                continue
            chain = chains_open.get(tag)
            if block.will_init:
                chain = chains_open[tag] = (None, [rec])
            elif chain is None:
                chains_open[tag] = (expected, [])
                continue
            else:
                chain[1].append(rec)
            if len(chain[1]) >= 2:
                chains.append(Case(tag, chain[0], list(chain[1]), expected))
            if len(chain[1]) >= 6:
                chains_open[tag] = (expected, [])
    # Round-robin over record types so every type is represented.
    pairs: list[Case] = []
    queues = [list(v) for _, v in sorted(by_type.items())]
    for q in queues:
        step = max(1, len(q) // SAMPLE_SIZE)
        q[:] = q[::step]
    while len(pairs) < SAMPLE_SIZE and any(queues):
        for q in queues:
            if q and len(pairs) < SAMPLE_SIZE:
                pairs.append(q.pop(0))
    return Corpus(pairs, chains[:: max(1, len(chains) // 60)], hash_pairs)


# -- the service ---------------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[str]
    address: str
    logfile: Path

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 << 20)])

    def worker_pids(self) -> set[int]:
        return children_of(self.proc.pid)

    def log_text(self) -> str:
        return self.logfile.read_text()


def children_of(pid: int) -> set[int]:
    """Worker processes of the service `pid` (multiprocessing's resource tracker left out)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"resource_tracker" not in cmdline:
                found.add(int(entry))
    return found


def redo_command() -> list[str]:
    script = Path(sys.executable).parent / "zenith-redo"
    return [*([str(script)] if script.exists() else [sys.executable, "-m", "services.redo.main"]), "--insecure"]


def start_service(tmp: Path, *args: str) -> Service:
    logfile = tmp / "redo.log"
    proc = subprocess.Popen(
        [*redo_command(), "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=logfile.open("w"), text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"zenith-redo listening on (\S+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"service did not start: {line!r}\n{logfile.read_text()}")
    return Service(proc, m[1], logfile)


def stop_service(svc: Service) -> int:
    svc.proc.send_signal(signal.SIGTERM)
    return svc.proc.wait(20)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("redo-svc"), "--workers", "2", "--enable-test-hooks",
                        "--job-timeout", "3")
    try:
        yield svc
    finally:
        if svc.proc.poll() is None:
            pids = svc.worker_pids()
            assert stop_service(svc) == 0
            assert not any(Path(f"/proc/{p}").exists() for p in pids), "workers outlived the service"
        assert "BUG" not in svc.log_text()
        assert "did not stop" not in svc.log_text()


@pytest.fixture(scope="module")
def stub(service: Service) -> Iterator[redo_pb2_grpc.RedoStub]:
    with service.channel() as ch:
        yield redo_pb2_grpc.RedoStub(ch)


# -- helpers ---------------------------------------------------------------------------


def make_request(tag: BufferTag, base: bytes | None, records: list[DecodedRecord]) -> redo_pb2.ApplyRecordsRequest:
    req = redo_pb2.ApplyRecordsRequest(
        key=common_pb2.PageKey(rel_block=common_pb2.RelBlock(
            rel=common_pb2.RelTag(spc_oid=tag.rnode.spc, db_oid=tag.rnode.db, rel_number=tag.rnode.rel,
                                  fork=tag.forknum),
            blkno=tag.blkno)),
        records=[redo_pb2.RedoRecord(lsn=r.lsn, end_lsn=r.end_lsn, raw=r.raw) for r in records],
        pg_version=15,
    )
    if base is not None:
        req.base_image = base
    return req


def case_request(case: Case) -> redo_pb2.ApplyRecordsRequest:
    return make_request(case.tag, case.base, case.records)


def assert_matches(case: Case, page: bytes, page_lsn: int) -> None:
    assert len(page) == BLCKSZ
    assert page_lsn == page_get_lsn(bytearray(page))
    assert page_lsn <= case.last.end_lsn
    mask = mask_for_rmgr(case.last.rmid)
    got, want = bytearray(page), bytearray(case.expected)
    mask(got, case.tag.blkno)
    mask(want, case.tag.blkno)
    if got != want:
        first = next(i for i in range(BLCKSZ) if got[i] != want[i])
        raise AssertionError(f"{case.type_name()} at {case.last.lsn:X} on {case.tag}: first difference at byte {first}")


def stream_cases(stub: redo_pb2_grpc.RedoStub, cases: list[Case], batch: int = 25) -> dict[int, Any]:
    """Send `cases` over one ApplyRecordsStream in batches; every answer by request id."""

    def requests() -> Iterator[redo_pb2.ApplyRecordsStreamRequest]:
        for i in range(0, len(cases), batch):
            yield redo_pb2.ApplyRecordsStreamRequest(items=[
                redo_pb2.ApplyRecordsItem(request_id=j, request=case_request(cases[j]))
                for j in range(i, min(i + batch, len(cases)))
            ])

    answers: dict[int, Any] = {}
    for resp in stub.ApplyRecordsStream(requests(), timeout=60):
        for item in resp.items:
            assert item.request_id not in answers, "answered twice"
            answers[item.request_id] = item
    assert sorted(answers) == list(range(len(cases)))
    return answers


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def failure_of(err: grpc.RpcError) -> redo_pb2.RedoFailure:
    for k, v in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if k == FAILURE_KEY:
            return redo_pb2.RedoFailure.FromString(v)
    raise AssertionError(f"no {FAILURE_KEY} in the trailing metadata of {err}")


def recrc(raw: bytearray) -> bytes:
    struct.pack_into("<I", raw, 20, record_crc(raw))
    return bytes(raw)


# -- tests -----------------------------------------------------------------------------


def test_health_serving(service: Service) -> None:
    with service.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "zenith.v1.Redo"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert len(service.worker_pids()) >= 2


def test_corpus_is_rich(corpus: Corpus) -> None:
    types = {c.type_name() for c in corpus.pairs}
    assert len(corpus.pairs) == SAMPLE_SIZE
    assert len(types) >= 8, types
    assert {"Heap/HOT_UPDATE", "Heap/INSERT", "Btree/INSERT_LEAF", "Heap2/PRUNE"} <= types, types
    assert len(corpus.chains) >= 30


def test_unary_pages_match_postgres(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    for case in corpus.pairs:
        resp = stub.ApplyRecords(case_request(case), timeout=30)
        assert_matches(case, resp.page, resp.page_lsn)


def test_multi_record_requests_match_postgres(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    for case in corpus.chains:
        resp = stub.ApplyRecords(case_request(case), timeout=30)
        assert_matches(case, resp.page, resp.page_lsn)


def test_stream_pages_match_postgres(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    cases = corpus.pairs + corpus.chains
    answers = stream_cases(stub, cases)
    for i, case in enumerate(cases):
        item = answers[i]
        assert item.WhichOneof("result") == "page", item.error
        assert_matches(case, item.page.page, item.page.page_lsn)


def test_concurrent_clients(service: Service, corpus: Corpus) -> None:
    errors: list[BaseException] = []
    cases = corpus.pairs

    def unary_client(part: list[Case]) -> None:
        try:
            with service.channel() as ch:
                stub = redo_pb2_grpc.RedoStub(ch)
                for case in part:
                    resp = stub.ApplyRecords(case_request(case), timeout=30)
                    assert_matches(case, resp.page, resp.page_lsn)
        except BaseException as e:
            errors.append(e)

    def stream_client(part: list[Case]) -> None:
        try:
            with service.channel() as ch:
                answers = stream_cases(redo_pb2_grpc.RedoStub(ch), part, batch=16)
                for i, case in enumerate(part):
                    assert_matches(case, answers[i].page.page, answers[i].page.page_lsn)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=unary_client, args=(cases[0::4],)),
        threading.Thread(target=unary_client, args=(cases[1::4],)),
        threading.Thread(target=stream_client, args=(cases[2::4] + corpus.chains,)),
        threading.Thread(target=stream_client, args=(cases[3::4] * 3,)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]


def _crafted(case: Case, rmid: int | None = None, info: int | None = None) -> DecodedRecord:
    """The case's record with another rmgr id or info code, and a valid CRC."""
    raw = bytearray(case.last.raw)
    if info is not None:
        raw[16] = info
    if rmid is not None:
        raw[17] = rmid
    rec = case.last
    return DecodedRecord(rec.lsn, rec.end_lsn, rec.header, rec.blocks, rec.main_data, raw=recrc(raw))


def test_unsupported_record_is_unimplemented(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    leaf = next(c for c in corpus.pairs if c.type_name() == "Btree/INSERT_LEAF")
    # Btree has no info code 0xF0; a custom rmgr (id >= 128) we can never know.
    for rec, label, rmid, info in [
        (_crafted(leaf, info=0xF0 | (leaf.last.info & 0x0F)), "rmgr=Btree(11) info=0xF0", RM_BTREE_ID, 0xF0),
        (_crafted(leaf, rmid=200), f"rmgr=custom200(200) info=0x{leaf.last.info & 0xF0:02X}", 200, leaf.last.info),
    ]:
        req = make_request(leaf.tag, leaf.base, [rec])
        err = rpc_error(stub.ApplyRecords, req, timeout=10)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert label in err.details()
        failure = failure_of(err)
        assert failure.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert (failure.lsn, failure.rmid, failure.info & 0xF0) == (rec.lsn, rmid, info & 0xF0)
        assert failure.rmgr_name == ("Btree" if rmid == RM_BTREE_ID else "custom200")
        # The same, reported per item on the stream.
        item = stream_cases(stub, [Case(leaf.tag, leaf.base, [rec], leaf.expected)])[0]
        assert item.error.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert label in item.error.message


def test_hash_record_while_unsupported(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    """A real Hash record: UNIMPLEMENTED naming Hash while pgredo has no Hash redo; once it has,
    the service's page is the in-process engine's page, byte for byte."""
    assert corpus.hash_pairs, "the workload wrote no Hash records with a known page"
    case = corpus.hash_pairs[len(corpus.hash_pairs) // 2]
    try:
        ours = redo_page(case.tag, case.base, case.records)
    except UnsupportedRecordError:
        err = rpc_error(stub.ApplyRecords, case_request(case), timeout=10)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert f"rmgr=Hash({RM_HASH_ID})" in err.details()
        assert failure_of(err).rmgr_name == "Hash"
        return
    resp = stub.ApplyRecords(case_request(case), timeout=10)
    assert resp.page == bytes(ours)


def test_inapplicable_record_is_failed_precondition(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    delete = next(c for c in corpus.pairs
                  if c.last.rmid == RM_HEAP_ID and c.last.info & XLOG_HEAP_OPMASK == XLOG_HEAP_DELETE)
    empty = bytes(new_page())  # an initialized page without the tuple the record deletes
    err = rpc_error(stub.ApplyRecords, make_request(delete.tag, empty, delete.records), timeout=10)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rmgr=Heap(10)" in err.details()
    failure = failure_of(err)
    assert (failure.rmgr_name, failure.lsn) == ("Heap", delete.last.lsn)


def _malformed(corpus: Corpus) -> dict[str, redo_pb2.ApplyRecordsRequest]:
    case = next(c for c in corpus.pairs if c.base is not None and c.last.rmid == RM_HEAP_ID)
    other = next(c for c in corpus.pairs if c.tag != case.tag and c.tag.forknum == 0)
    rec = case.last
    out: dict[str, redo_pb2.ApplyRecordsRequest] = {}

    r = case_request(case)
    r.base_image = case.base[:100]  # type: ignore[index]
    out["short base image"] = r

    r = case_request(case)
    r.base_image = case.base + b"\0"  # type: ignore[operator]
    out["long base image"] = r

    r = case_request(case)
    r.records[0].raw = os.urandom(len(rec.raw))
    out["garbage record"] = r

    r = case_request(case)
    garbage = bytearray(os.urandom(len(rec.raw)))
    struct.pack_into("<I", garbage, 0, len(garbage))
    r.records[0].raw = bytes(garbage)
    out["garbage record with a plausible length"] = r

    r = case_request(case)
    bad = bytearray(rec.raw)
    bad[-1] ^= 0x55
    r.records[0].raw = bytes(bad)
    out["CRC-bad record"] = r

    r = case_request(case)
    r.records[0].raw = rec.raw[:-1]
    out["truncated record"] = r

    r = make_request(case.tag, case.base, [rec, rec])
    out["records out of LSN order"] = r

    r = case_request(case)
    r.ClearField("key")
    out["no key"] = r

    r = case_request(case)
    r.key.rel_block.rel.fork = 7
    out["bad fork"] = r

    r = case_request(case)
    r.key.rel_block.blkno = 0xFFFFFFFF
    out["invalid block number"] = r

    r = make_request(other.tag, other.base, [rec])
    out["record does not touch the page"] = r

    out["no base image and no init"] = make_request(case.tag, None, [rec])

    r = case_request(case)
    r.tenant.id = "not-a-tenant"
    out["bad tenant id"] = r
    return out


def test_malformed_requests_are_invalid_argument(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    bad = _malformed(corpus)
    for name, req in bad.items():
        err = rpc_error(stub.ApplyRecords, req, timeout=10)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {err.code()} {err.details()}"
    # On the stream, bad items get per-item errors and good ones their pages.
    good = corpus.pairs[:10]
    items = [redo_pb2.ApplyRecordsItem(request_id=i, request=case_request(c)) for i, c in enumerate(good)]
    items += [redo_pb2.ApplyRecordsItem(request_id=100 + i, request=r) for i, r in enumerate(bad.values())]
    answers = {}
    for resp in stub.ApplyRecordsStream(iter([redo_pb2.ApplyRecordsStreamRequest(items=items)]), timeout=30):
        for item in resp.items:
            answers[item.request_id] = item
    assert len(answers) == len(items)
    for i, c in enumerate(good):
        assert_matches(c, answers[i].page.page, answers[i].page.page_lsn)
    for i, name in enumerate(bad):
        assert answers[100 + i].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], name


def test_worker_crash_fails_cleanly_and_is_replaced(
    service: Service, stub: redo_pb2_grpc.RedoStub, corpus: Corpus,
) -> None:
    case = corpus.pairs[0]
    before = service.worker_pids()
    t0 = time.monotonic()
    err = rpc_error(stub.ApplyRecords, case_request(case), metadata=[(HOOK_KEY, "crash-worker")], timeout=10)
    assert time.monotonic() - t0 < 5
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "exited with code 70" in err.details()
    resp = stub.ApplyRecords(case_request(case), timeout=10)
    assert_matches(case, resp.page, resp.page_lsn)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(service.worker_pids()) < 2 or service.worker_pids() == before):
        time.sleep(0.1)
    after = service.worker_pids()
    assert len(after) == 2 and len(after - before) == 1, (before, after)


def test_worker_crash_under_load(service: Service, stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    """A crash while a stream is busy: every item is answered (page or UNAVAILABLE), nothing hangs."""
    cases = corpus.pairs * 4
    result: dict[str, Any] = {}

    def run_stream() -> None:
        try:
            result["answers"] = stream_cases(stub, cases, batch=20)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=run_stream)
    t.start()
    time.sleep(0.05)
    err = rpc_error(stub.ApplyRecords, case_request(cases[0]), metadata=[(HOOK_KEY, "crash-worker")], timeout=10)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    t.join(60)
    assert not t.is_alive() and "error" not in result, result.get("error")
    for i, case in enumerate(cases):
        item = result["answers"][i]
        if item.WhichOneof("result") == "page":
            assert_matches(case, item.page.page, item.page.page_lsn)
        else:
            assert item.error.code == grpc.StatusCode.UNAVAILABLE.value[0], item.error
    answers = stream_cases(stub, corpus.pairs[:50])
    assert all(a.WhichOneof("result") == "page" for a in answers.values())


def test_hung_worker_is_killed(service: Service, stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    case = corpus.pairs[0]
    t0 = time.monotonic()
    err = rpc_error(stub.ApplyRecords, case_request(case), metadata=[(HOOK_KEY, "hang-worker")], timeout=30)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 2.5 < time.monotonic() - t0 < 10  # --job-timeout 3
    resp = stub.ApplyRecords(case_request(case), timeout=10)
    assert_matches(case, resp.page, resp.page_lsn)


def test_sigterm_stops_service_and_workers(tmp_path: Path, corpus: Corpus) -> None:
    """Without --enable-test-hooks the crash hook is ignored; SIGTERM stops everything, exit code 0."""
    svc = start_service(tmp_path, "--workers", "2")
    try:
        pids = svc.worker_pids()
        assert len(pids) == 2
        case = corpus.pairs[0]
        with svc.channel() as ch:
            resp = redo_pb2_grpc.RedoStub(ch).ApplyRecords(
                case_request(case), metadata=[(HOOK_KEY, "crash-worker")], timeout=10)
        assert_matches(case, resp.page, resp.page_lsn)
        assert svc.worker_pids() == pids
        assert stop_service(svc) == 0
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
        log = svc.log_text()
        assert "signal received" in log and "redo workers stopped" in log
        assert "BUG" not in log and "did not stop" not in log
    finally:
        if svc.proc.poll() is None:
            svc.proc.kill()


def test_pool_in_process(corpus: Corpus) -> None:
    """The RedoPool API without gRPC: a page, then UNAVAILABLE once closed."""
    case = corpus.pairs[0]
    pool = RedoPool(1)
    pool.start()
    try:
        result = pool.apply(case_request(case)).result(timeout=30)
        assert isinstance(result, PageResult)
        assert_matches(case, result.page, result.page_lsn)
        assert pool.stats()[0]["jobs_done"] == 1
    finally:
        pool.close()
    late = pool.apply(case_request(case)).result(timeout=5)
    assert isinstance(late, JobError) and late.code == "UNAVAILABLE"


def test_clog_page_matches_postgres(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    """The commits and aborts of the workload, applied to an absent (all-zero) CLOG page, give
    every one of those transactions the status the primary's own pg_xact holds."""
    tag = SlruPageTag(SlruKind.CLOG, 0, 0)
    recs = [r for r in corpus.xact_records if tag in slru_tags_for_record(r)]
    completions = [xact_completion(r) for r in recs]
    assert len(recs) > 300 and any(c is not None and not c.committed for c in completions)
    key = common_pb2.PageKey(slru_page=common_pb2.SlruPage(kind=common_pb2.SLRU_KIND_CLOG, segno=0, rpageno=0))
    req = redo_pb2.ApplyRecordsRequest(
        key=key, records=[redo_pb2.RedoRecord(lsn=r.lsn, end_lsn=r.end_lsn, raw=r.raw) for r in recs])
    resp = stub.ApplyRecords(req, timeout=30)
    assert resp.page_lsn == recs[-1].end_lsn
    theirs = corpus.clog[:BLCKSZ]
    xids = [x for c in completions if c is not None for x in c.xids]
    for c in completions:
        assert c is not None
        for xid in c.xids:
            assert clog_get_status(resp.page, xid) == c.status == clog_get_status(theirs, xid), xid
    # Every xid of the workload's range: ours and the primary's agree (in progress = 0 in both).
    for xid in range(min(xids), max(xids) + 1):
        assert clog_get_status(resp.page, xid) == clog_get_status(theirs, xid), xid
    # A record that does not complete a transaction does not touch the page.
    other = corpus.pairs[0].last
    bad = redo_pb2.ApplyRecordsRequest(key=key, records=[redo_pb2.RedoRecord(lsn=other.lsn, end_lsn=other.end_lsn,
                                                                              raw=other.raw)])
    assert rpc_error(stub.ApplyRecords, bad, timeout=10).code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_kind = redo_pb2.ApplyRecordsRequest(key=common_pb2.PageKey(slru_page=common_pb2.SlruPage(rpageno=0)),
                                            records=req.records[:1])
    assert rpc_error(stub.ApplyRecords, bad_kind, timeout=10).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancelled_stream(stub: redo_pb2_grpc.RedoStub, corpus: Corpus) -> None:
    """A client that goes away mid-stream leaves the service healthy."""
    cases = corpus.pairs * 10

    def requests() -> Iterator[redo_pb2.ApplyRecordsStreamRequest]:
        for i in range(0, len(cases), 50):
            yield redo_pb2.ApplyRecordsStreamRequest(items=[
                redo_pb2.ApplyRecordsItem(request_id=j, request=case_request(cases[j]))
                for j in range(i, min(i + 50, len(cases)))
            ])

    call = stub.ApplyRecordsStream(requests(), timeout=60)
    first = next(call)
    assert first.items
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.CANCELLED
    answers = stream_cases(stub, corpus.pairs[:40])
    assert all(a.WhichOneof("result") == "page" for a in answers.values())
