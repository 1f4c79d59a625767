"""The shim's view of the page server: an asyncio gRPC client.

Everything the shim knows comes through the page server's public API
(protos/zproto/pageserver.proto); it shares no code or state with it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from services.auth import ClientSecurity
from zproto import common_pb2, pageserver_pb2, pageserver_pb2_grpc

from .errors import ShimError, from_rpc_error
from pgformat.wire import SqlState

DEFAULT_TENANT = "00000000000000000000000000000000"
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(frozen=True, slots=True)
class Target:
    """What a session reads: a tenant's timeline at an LSN (None = latest)."""

    tenant: str
    timeline: str
    lsn: int | None


class PageServerClient:
    """Async calls to one page server, with errors turned into ShimErrors."""

    def __init__(self, address: str, rpc_timeout: float = 60.0, security: ClientSecurity | None = None) -> None:
        self.address = address
        self.rpc_timeout = rpc_timeout
        self.channel = (security or ClientSecurity()).aio_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = pageserver_pb2_grpc.PageServerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def ids(tenant: str, timeline: str) -> dict[str, Any]:
        return {"tenant": common_pb2.TenantId(id=tenant), "timeline": common_pb2.TimelineId(id=timeline)}

    async def call(self, doing: str, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.rpc_timeout)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, doing) from None

    async def timelines(self, tenant: str) -> list[Any]:
        resp = await self.call("listing timelines", self.stub.ListTimelines,
                               pageserver_pb2.ListTimelinesRequest(tenant=common_pb2.TenantId(id=tenant)))
        return list(resp.timelines)

    async def tenants(self) -> list[str]:
        resp = await self.call("listing tenants", self.stub.ListTenants, pageserver_pb2.ListTenantsRequest())
        return [t.id for t in resp.tenants]

    async def timeline(self, tenant: str, timeline: str) -> Any:
        return await self.call(f"timeline {timeline}", self.stub.GetTimeline,
                               pageserver_pb2.GetTimelineRequest(**self.ids(tenant, timeline)))

    async def resolve_timeline(self, tenant: str, name_or_id: str) -> Any:
        """A timeline by branch name or 32-hex id; a clear error when neither matches."""
        timelines = await self.timelines(tenant)
        for t in timelines:
            if t.name == name_or_id or t.timeline.id == name_or_id.lower():
                return t
        known = ", ".join(sorted(t.name or t.timeline.id for t in timelines)) or "none"
        raise ShimError(SqlState.UNDEFINED_OBJECT, f"branch or timeline \"{name_or_id}\" does not exist",
                        detail=f"tenant {tenant} has: {known}")

    def basebackup(self, tenant: str, timeline: str, lsn: int) -> Any:
        """A streaming call; iterate it (errors are AioRpcError: see `stream_errors`)."""
        return self.stub.Basebackup(pageserver_pb2.BasebackupRequest(lsn=lsn, **self.ids(tenant, timeline)))

    async def basebackup_chunks(self, tenant: str, timeline: str, lsn: int) -> AsyncIterator[Any]:
        call = self.basebackup(tenant, timeline, lsn)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, "base backup") from None
        finally:
            call.cancel()


def is_timeline_id(text: str) -> bool:
    return bool(_HEX_ID.match(text))
