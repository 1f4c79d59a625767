"""Errors the shim answers with: each carries the SQLSTATE of its ErrorResponse."""

from __future__ import annotations

import grpc

from pgformat.wire import ErrorFields, SqlState


class ShimError(Exception):
    """A failed command; the session goes on unless `fatal`."""

    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None,
                 fatal: bool = False) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint
        self.fatal = fatal

    def fields(self) -> ErrorFields:
        return ErrorFields(self.sqlstate, self.message, severity="FATAL" if self.fatal else "ERROR",
                           detail=self.detail, hint=self.hint)


class ClientGone(Exception):
    """The client closed the connection (or it broke): nothing more to send."""


# gRPC status of a page server answer -> SQLSTATE of our ErrorResponse.
_SQLSTATE_FOR_STATUS = {
    grpc.StatusCode.NOT_FOUND: SqlState.UNDEFINED_OBJECT,
    grpc.StatusCode.INVALID_ARGUMENT: SqlState.INVALID_PARAMETER_VALUE,
    grpc.StatusCode.OUT_OF_RANGE: SqlState.INVALID_PARAMETER_VALUE,
    grpc.StatusCode.DEADLINE_EXCEEDED: SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
    grpc.StatusCode.FAILED_PRECONDITION: SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
    grpc.StatusCode.ALREADY_EXISTS: SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
    grpc.StatusCode.UNAVAILABLE: SqlState.CONNECTION_FAILURE,
    grpc.StatusCode.CANCELLED: SqlState.QUERY_CANCELED,
}


def from_rpc_error(e: grpc.aio.AioRpcError, doing: str) -> ShimError:
    """What a client should read when the page server refused or failed."""
    code = e.code()
    state = _SQLSTATE_FOR_STATUS.get(code, SqlState.INTERNAL_ERROR)
    hint = "is the page server running?" if code == grpc.StatusCode.UNAVAILABLE else None
    return ShimError(state, f"{doing}: {e.details() or code.name}", detail=f"page server status {code.name}",
                     hint=hint)
