"""gRPC servicer of zenith.v1.WalReceiver: one WalReceiver thread per attached (tenant, timeline)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import grpc

from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc, walreceiver_pb2, walreceiver_pb2_grpc

from .receiver import (
    DEFAULT_TENANT,
    AttachConfig,
    ReceiverOptions,
    ReceiverStatus,
    ReplicationError,
    State,
    WalReceiver,
    replication_conninfo,
    validate_id,
    validate_slot_name,
)

log = logging.getLogger("zenith.walreceiver")

_STATE_TO_PROTO = {
    State.CONNECTING: walreceiver_pb2.ATTACHMENT_STATE_CONNECTING,
    State.STREAMING: walreceiver_pb2.ATTACHMENT_STATE_STREAMING,
    State.BACKOFF: walreceiver_pb2.ATTACHMENT_STATE_BACKOFF,
    State.STOPPED: walreceiver_pb2.ATTACHMENT_STATE_STOPPED,
    State.FAILED: walreceiver_pb2.ATTACHMENT_STATE_FAILED,
}


def status_to_proto(s: ReceiverStatus) -> walreceiver_pb2.AttachmentStatus:
    return walreceiver_pb2.AttachmentStatus(
        tenant=common_pb2.TenantId(id=s.tenant), timeline=common_pb2.TimelineId(id=s.timeline),
        primary_conninfo=s.conninfo, slot_name=s.slot_name, state=_STATE_TO_PROTO[s.state],
        received_lsn=s.received_lsn, durable_lsn=s.durable_lsn, primary_lsn=s.primary_lsn,
        lag_bytes=s.lag_bytes, last_error=s.last_error, last_error_time_us=s.last_error_time_us,
        reconnects=s.reconnects,
    )


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

    def __init__(self, pageserver: str, options: ReceiverOptions | None = None) -> None:
        self.pageserver = pageserver
        self.options = options or ReceiverOptions()
        self._lock = threading.Lock()
        self._receivers: dict[tuple[str, str], WalReceiver] = {}

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
        )
        try:
            replication_conninfo(config.conninfo, timeline)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._check_timeline(context, config)
        with self._lock:
            old = self._receivers.get((tenant, timeline))
            if old is not None and old.running:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"timeline {timeline} of tenant {tenant} is already attached")
            receiver = WalReceiver(config, self.pageserver, self.options)
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
        with grpc.insecure_channel(self.pageserver) as channel:
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

    def Detach(self, request: Any, context: grpc.ServicerContext) -> Any:
        tenant, timeline = _ids(context, request.tenant, request.timeline)
        with self._lock:
            receiver = self._receivers.pop((tenant, timeline), None)
        if receiver is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"timeline {timeline} of tenant {tenant} is not attached")
        status = receiver.stop()
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
        """Stop every receiver (slots are kept: a restarted walreceiver resumes from them)."""
        with self._lock:
            receivers = list(self._receivers.values())
            self._receivers.clear()
        for r in receivers:
            r.stop(timeout)
