"""gRPC servicer of zenith.v1.WalReceiver: one WalReceiver thread per attached (tenant, timeline).

With a state file, the set of attachments survives the process: every Attach
and Detach rewrites the file atomically before it answers, and a restarted
walreceiver starts one receiver per saved attachment, each resuming from the
page server's durable LSN (its replication slot kept the WAL meanwhile).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import grpc
import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgformat.lsn import format_lsn, parse_lsn
from services.auth import check_primary_conninfo
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc, walreceiver_pb2, walreceiver_pb2_grpc

from .errors import FatalError, ReplicationError, WalReceiverError
from .feeder import check_writer
from .protocol import replication_conninfo, validate_id, validate_slot_name
from .receiver import DEFAULT_TENANT, AttachConfig, ReceiverOptions, ReceiverStatus, State, WalReceiver

log = logging.getLogger("zenith.walreceiver")

_STATE_TO_PROTO = {
    State.CONNECTING: walreceiver_pb2.ATTACHMENT_STATE_CONNECTING,
    State.STREAMING: walreceiver_pb2.ATTACHMENT_STATE_STREAMING,
    State.BACKOFF: walreceiver_pb2.ATTACHMENT_STATE_BACKOFF,
    State.STOPPED: walreceiver_pb2.ATTACHMENT_STATE_STOPPED,
    State.FAILED: walreceiver_pb2.ATTACHMENT_STATE_FAILED,
    State.FAILING: walreceiver_pb2.ATTACHMENT_STATE_FAILING,
}


def status_to_proto(s: ReceiverStatus) -> walreceiver_pb2.AttachmentStatus:
    return walreceiver_pb2.AttachmentStatus(
        tenant=common_pb2.TenantId(id=s.tenant), timeline=common_pb2.TimelineId(id=s.timeline),
        primary_conninfo=s.conninfo, slot_name=s.slot_name, state=_STATE_TO_PROTO[s.state],
        received_lsn=s.received_lsn, durable_lsn=s.durable_lsn, primary_lsn=s.primary_lsn,
        lag_bytes=s.lag_bytes, last_error=s.last_error, last_error_time_us=s.last_error_time_us,
        reconnects=s.reconnects, repeated_errors=s.repeated_errors, pageserver_lsn=s.pageserver_lsn,
        pageserver_durable_lsn=s.pageserver_durable_lsn, pageserver_error=s.pageserver_error,
        writer_epoch=s.writer_epoch,
    )


# -- the state file -------------------------------------------------------------------

STATE_FILE_VERSION: Final = 1


class StateFileError(WalReceiverError):
    """The attachments state file cannot be read, parsed or written; the message names the file."""


def _config_to_json(c: AttachConfig) -> dict[str, Any]:
    return {
        "tenant": c.tenant, "timeline": c.timeline, "primary_conninfo": c.conninfo, "slot_name": c.slot_name,
        "start_lsn": None if c.start_lsn is None else format_lsn(c.start_lsn), "create_slot": c.create_slot,
        "writer_epoch": c.writer_epoch,
    }


def _config_from_json(entry: Any) -> AttachConfig:
    """One saved attachment, validated as Attach validates its request; ValueError if bad."""
    if not isinstance(entry, dict):
        raise ValueError("an attachment must be a JSON object")
    missing = {"tenant", "timeline", "primary_conninfo", "slot_name"} - entry.keys()
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    fields = [entry["tenant"], entry["timeline"], entry["primary_conninfo"], entry["slot_name"]]
    if not all(isinstance(v, str) for v in fields):
        raise ValueError("tenant, timeline, primary_conninfo and slot_name must be strings")
    start = entry.get("start_lsn")
    if start is not None and not isinstance(start, str):
        raise ValueError("start_lsn must be an LSN string like '0/16B3748' or null")
    create_slot = entry.get("create_slot", False)
    if not isinstance(create_slot, bool):
        raise ValueError("create_slot must be true or false")
    writer_epoch = entry.get("writer_epoch", 0)
    if not isinstance(writer_epoch, int) or isinstance(writer_epoch, bool) or writer_epoch < 0:
        raise ValueError("writer_epoch must be a non-negative integer")
    config = AttachConfig(
        tenant=validate_id(entry["tenant"], "tenant"), timeline=validate_id(entry["timeline"], "timeline"),
        conninfo=entry["primary_conninfo"], slot_name=validate_slot_name(entry["slot_name"]),
        create_slot=create_slot, start_lsn=None if start is None else parse_lsn(start), writer_epoch=writer_epoch,
    )
    replication_conninfo(config.conninfo, config.timeline)  # raises ValueError if libpq cannot parse it
    return config


class AttachmentStore:
    """The set of attachments in a JSON file, rewritten atomically (temp file, fsync, rename, fsync dir).

    The file holds connection strings as given, passwords included: it is
    created readable by its owner only.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[AttachConfig]:
        """The saved attachments; none if the file does not exist yet. StateFileError if it is unusable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise StateFileError(f"cannot read the state file {self.path}: {e}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise StateFileError(f"state file {self.path} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != STATE_FILE_VERSION \
                or not isinstance(doc.get("attachments"), list):
            raise StateFileError(f"state file {self.path}: expected {{\"version\": {STATE_FILE_VERSION}, "
                                 "\"attachments\": [...]}")
        configs: list[AttachConfig] = []
        seen: set[tuple[str, str]] = set()
        for i, entry in enumerate(doc["attachments"]):
            try:
                config = _config_from_json(entry)
            except (ValueError, psycopg.Error) as e:
                raise StateFileError(f"state file {self.path}: attachment #{i}: {e}") from None
            if (config.tenant, config.timeline) in seen:
                raise StateFileError(f"state file {self.path}: attachment #{i}: timeline {config.timeline} "
                                     f"of tenant {config.tenant} appears twice")
            seen.add((config.tenant, config.timeline))
            configs.append(config)
        return configs

    def save(self, configs: Iterable[AttachConfig]) -> None:
        """Replace the file's contents with `configs`, durably; StateFileError (file unchanged) on failure."""
        doc = {"version": STATE_FILE_VERSION,
               "attachments": [_config_to_json(c) for c in sorted(configs, key=lambda c: (c.tenant, c.timeline))]}
        data = (json.dumps(doc, indent=2) + "\n").encode()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # not ours to remove (a directory, say); the error below says what failed
            raise StateFileError(f"cannot write the state file {self.path}: {e}") from None


def _ids(context: grpc.ServicerContext, tenant: common_pb2.TenantId,
         timeline: common_pb2.TimelineId) -> tuple[str, str]:
    try:
        t = validate_id(tenant.id or DEFAULT_TENANT, "tenant")
        if not timeline.id:
            raise ValueError("timeline id is required")
        return t, validate_id(timeline.id, "timeline")
    except ValueError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        raise  # unreachable: abort raises


class WalReceiverServicer(walreceiver_pb2_grpc.WalReceiverServicer):
    """Attachments live here, keyed by (tenant, timeline); nothing is kept in module globals."""

    def __init__(self, pageserver: str, data_dir: Path, options: ReceiverOptions | None = None,
                 state_file: Path | None = None) -> None:
        """Each attachment keeps its WAL under `data_dir`/wal/<tenant>/<timeline>. With `state_file`,
        the saved attachments are read now (StateFileError if the file is unusable) and started by
        restore()."""
        self.pageserver = pageserver
        self.data_dir = Path(data_dir)
        self.detach_timeout = 30.0  # how long Detach waits for the page server to store the WAL kept here
        self.options = options or ReceiverOptions()
        self._lock = threading.Lock()
        self._receivers: dict[tuple[str, str], WalReceiver] = {}
        self._store = AttachmentStore(state_file) if state_file is not None else None
        self._saved: list[AttachConfig] = self._store.load() if self._store is not None else []

    def restore(self) -> int:
        """Start a receiver for every attachment of the state file; return how many.

        No page server check here: it may not be up yet, and each receiver
        retries until it is (a timeline the page server does not know ends in FAILED).
        """
        with self._lock:
            saved, self._saved = self._saved, []
            for config in saved:
                receiver = self._receiver(config)
                self._receivers[(config.tenant, config.timeline)] = receiver
                receiver.start()
                log.info("restored attachment %s/%s: slot %s, application_name %s", config.tenant,
                         config.timeline, config.slot_name, receiver.application_name)
        return len(saved)

    def wal_dir(self, tenant: str, timeline: str) -> Path:
        return self.data_dir / "wal" / tenant / timeline

    def _receiver(self, config: AttachConfig) -> WalReceiver:
        return WalReceiver(config, self.pageserver, self.wal_dir(config.tenant, config.timeline), self.options)

    def _persist(self, context: grpc.ServicerContext, configs: dict[tuple[str, str], AttachConfig]) -> None:
        """Save `configs` as the set of attachments (called with the lock held); abort the RPC if the
        state file cannot be written."""
        if self._store is None:
            return
        try:
            self._store.save(configs.values())
        except StateFileError as e:
            log.error("%s", e)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    # -- RPCs -----------------------------------------------------------------------

    def Attach(self, request: Any, context: grpc.ServicerContext) -> Any:
        tenant, timeline = _ids(context, request.tenant, request.timeline)
        if not request.primary_conninfo.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "primary_conninfo is required")
        try:
            slot = validate_slot_name(request.slot_name or f"zenith_{timeline}")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        config = AttachConfig(
            tenant=tenant, timeline=timeline, conninfo=request.primary_conninfo, slot_name=slot,
            create_slot=request.create_slot,
            start_lsn=request.start_lsn if request.HasField("start_lsn") else None,
            writer_epoch=request.writer_epoch,
        )
        try:
            replication_conninfo(config.conninfo, timeline)
            check_primary_conninfo(conninfo_to_dict(config.conninfo), self.options.allowed_primary_hosts)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._check_timeline(context, config)
        with self._lock:
            old = self._receivers.get((tenant, timeline))
            if old is not None and old.running:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"timeline {timeline} of tenant {tenant} is already attached")
            # Durable before it starts: an Attach that returned OK survives a crash.
            self._persist(context, {**{k: r.config for k, r in self._receivers.items()}, (tenant, timeline): config})
            receiver = self._receiver(config)
            self._receivers[(tenant, timeline)] = receiver
            receiver.start()
        log.info("attached %s/%s: slot %s, application_name %s", tenant, timeline, slot,
                 receiver.application_name)
        return walreceiver_pb2.AttachResponse(status=status_to_proto(receiver.status()))

    def _check_timeline(self, context: grpc.ServicerContext, config: AttachConfig) -> None:
        """FAILED_PRECONDITION if the page server does not know the timeline or it has no position.

        An unreachable page server is not an error here: the receiver retries,
        and Status shows why it waits.
        """
        with self.options.pageserver_security.channel(self.pageserver) as channel:
            stub = pageserver_pb2_grpc.PageServerStub(channel)
            try:
                info = stub.GetTimeline(pageserver_pb2.GetTimelineRequest(
                    tenant=common_pb2.TenantId(id=config.tenant), timeline=common_pb2.TimelineId(id=config.timeline),
                ), timeout=min(5.0, self.options.rpc_timeout))
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"page server: {e.details()}")
                log.warning("page server %s not reachable at attach (%s); the receiver will retry",
                            self.pageserver, e.code().name)
                return
        if info.last_record_lsn == 0 and not config.start_lsn:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"timeline {config.timeline} has no WAL position yet (import a base image first, "
                          "or give start_lsn)")
        if config.start_lsn and info.last_record_lsn and config.start_lsn > info.last_record_lsn:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"start_lsn {format_lsn(config.start_lsn)} is beyond the end of timeline "
                          f"{config.timeline}'s WAL ({format_lsn(info.last_record_lsn)}): that would leave a gap")
        try:
            check_writer(info, config.writer_epoch)
        except FatalError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    def Detach(self, request: Any, context: grpc.ServicerContext) -> Any:
        tenant, timeline = _ids(context, request.tenant, request.timeline)
        key = (tenant, timeline)
        with self._lock:
            receiver = self._receivers.get(key)
            if receiver is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"timeline {timeline} of tenant {tenant} is not attached")
        # The WAL kept here may hold commits the page server has not stored yet: it goes there first.
        if not receiver.drain(self.detach_timeout):
            status = receiver.stop()
            if status.state is not State.FAILED:
                with self._lock:
                    if self._receivers.get(key) is receiver:  # not replaced meanwhile: carry on as before
                        self._receivers[key] = again = self._receiver(receiver.config)
                        again.start()
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"cannot detach timeline {timeline} yet: the page server holds its WAL durably up to "
                              f"{format_lsn(status.pageserver_durable_lsn)}, the walreceiver up to "
                              f"{format_lsn(status.durable_lsn)}"
                              + (f" ({status.pageserver_error})" if status.pageserver_error else "")
                              + "; the attachment goes on, retry once the page server has caught up")
            # A failed attachment's WAL never reaches the page server (fenced, diverged): set aside, not lost.
            aside = self._set_aside(tenant, timeline)
            if aside is not None:
                log.warning("timeline %s: the WAL of the failed attachment is kept in %s", timeline, aside)
        with self._lock:
            # Forgotten durably: a crash from here on does not bring it back.
            self._persist(context, {k: r.config for k, r in self._receivers.items() if k != key})
            if self._receivers.get(key) is receiver:
                del self._receivers[key]
        status = receiver.status()
        if request.drop_slot:
            try:
                dropped = receiver.drop_slot()
                log.info("replication slot %s %s", receiver.config.slot_name,
                         "dropped" if dropped else "did not exist")
            except (ReplicationError, OSError) as e:
                log.warning("could not drop replication slot %s: %s", receiver.config.slot_name, e)
                status = replace(status, last_error=f"could not drop slot: {e}")
        log.info("detached %s/%s: %s", tenant, timeline, status.line())
        return walreceiver_pb2.DetachResponse(status=status_to_proto(status))

    def _set_aside(self, tenant: str, timeline: str) -> Path | None:
        wal_dir = self.wal_dir(tenant, timeline)
        if not wal_dir.exists():
            return None
        aside = wal_dir.with_name(f"{timeline}.failed-{time.strftime('%Y%m%dT%H%M%S')}")
        wal_dir.rename(aside)
        return aside

    def statuses(self) -> list[ReceiverStatus]:
        with self._lock:
            receivers = list(self._receivers.values())
        return [r.status() for r in receivers]

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            receivers = sorted(self._receivers.items())
        if not request.all_tenants:
            tenant = request.tenant.id or DEFAULT_TENANT
            timeline = request.timeline.id
            receivers = [(k, r) for k, r in receivers if k[0] == tenant and (not timeline or k[1] == timeline)]
        return walreceiver_pb2.StatusResponse(attachments=[status_to_proto(r.status()) for _, r in receivers])

    # -- lifecycle ----------------------------------------------------------------------

    def stop_all(self, timeout: float = 30.0) -> None:
        """Stop every receiver (slots are kept: a restarted walreceiver resumes from them).

        The state file is left as it is: the attachments come back with the process.
        """
        with self._lock:
            receivers = list(self._receivers.values())
            self._receivers.clear()
        for r in receivers:
            r.stop(timeout)
