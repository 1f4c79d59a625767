"""Neon's page-service protocol ("pagestream"), versions 2 and 3.

A compute that keeps no local data asks for pages with these messages, each
carried in one CopyData of a CopyBoth stream opened by the command
`pagestream_v2 <tenant> <timeline>` (or `_v3`). Layout (big-endian) as Neon's
compute extension and page server lay it out (pgxn/neon/pagestore_client.h,
libs/pageserver_api/src/models.rs):

request:  tag u8 | [v3: reqid u64] | request_lsn u64 | not_modified_since u64 | body
  0 Exists          rel (spc u32, db u32, rel u32, fork u8)
  1 Nblocks         rel
  2 GetPage         rel, blkno u32
  3 DbSize          dbnode u32
  4 GetSlruSegment  kind u8, segno u32
response: tag u8 | [v3: the request's header and body echoed] | answer
  100 Exists u8 | 101 Nblocks u32 | 102 GetPage 8192 bytes | 103 Error cstring
  104 DbSize i64 | 105 GetSlruSegment nblocks u32 + pages

request_lsn = 0xFFFF_FFFF_FFFF_FFFF means "latest" (a primary); the client
promises the object did not change between not_modified_since and request_lsn.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeVar

from .constants import BLCKSZ
from .errors import FormatError

LSN_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF


class PagestreamError(FormatError):
    """A pagestream message that does not follow the layout."""


class RequestTag(IntEnum):
    EXISTS = 0
    NBLOCKS = 1
    GET_PAGE = 2
    DB_SIZE = 3
    GET_SLRU_SEGMENT = 4


class ResponseTag(IntEnum):
    EXISTS = 100
    NBLOCKS = 101
    GET_PAGE = 102
    ERROR = 103
    DB_SIZE = 104
    GET_SLRU_SEGMENT = 105


# Neon's SLRU kind numbers in GetSlruSegment (SlruKind in postgres_ffi).
SLRU_CLOG: Final = 0
SLRU_MULTIXACT_MEMBERS: Final = 1
SLRU_MULTIXACT_OFFSETS: Final = 2

_REL: Final = struct.Struct("!IIIB")
_BODY_SIZE: Final = {
    RequestTag.EXISTS: _REL.size,
    RequestTag.NBLOCKS: _REL.size,
    RequestTag.GET_PAGE: _REL.size + 4,
    RequestTag.DB_SIZE: 4,
    RequestTag.GET_SLRU_SEGMENT: 5,
}


@dataclass(frozen=True, slots=True)
class PagestreamRequest:
    """One decoded request; only the fields of its tag are meaningful."""

    tag: RequestTag
    reqid: int
    request_lsn: int
    not_modified_since: int
    spc: int = 0
    db: int = 0
    rel: int = 0
    fork: int = 0
    blkno: int = 0
    slru_kind: int = 0
    segno: int = 0
    header: bytes = b""  # the request's bytes after the tag: echoed in v3 responses


def header_size(version: int) -> int:
    """Bytes between the tag and the body."""
    return 24 if version == 3 else 16


_Tag = TypeVar("_Tag", bound=IntEnum)


def _first_tag(data: bytes, tags: type[_Tag], what: str) -> _Tag:
    """The message's first byte as a tag of `tags`; PagestreamError when empty or unknown."""
    if not data:
        raise PagestreamError(f"empty pagestream {what}")
    try:
        return tags(data[0])
    except ValueError:
        raise PagestreamError(f"unknown pagestream {what} tag {data[0]}") from None


def parse_request(data: bytes, version: int) -> PagestreamRequest:
    """Decode one request (the CopyData payload) of protocol `version` 2 or 3."""
    if version not in (2, 3):
        raise ValueError(f"unknown pagestream version {version}")
    tag = _first_tag(data, RequestTag, "request")
    hsize = header_size(version)
    expected = 1 + hsize + _BODY_SIZE[tag]
    if len(data) != expected:
        raise PagestreamError(f"pagestream {tag.name} request of {len(data)} bytes, expected {expected}")
    if version == 3:
        reqid, request_lsn, nms = struct.unpack_from("!QQQ", data, 1)
    else:
        reqid = 0
        request_lsn, nms = struct.unpack_from("!QQ", data, 1)
    pos = 1 + hsize
    common = dict(tag=tag, reqid=reqid, request_lsn=request_lsn, not_modified_since=nms, header=data[1:])
    if tag in (RequestTag.EXISTS, RequestTag.NBLOCKS, RequestTag.GET_PAGE):
        spc, db, rel, fork = _REL.unpack_from(data, pos)
        blkno = struct.unpack_from("!I", data, pos + _REL.size)[0] if tag == RequestTag.GET_PAGE else 0
        return PagestreamRequest(spc=spc, db=db, rel=rel, fork=fork, blkno=blkno, **common)  # type: ignore[arg-type]
    if tag == RequestTag.DB_SIZE:
        return PagestreamRequest(db=struct.unpack_from("!I", data, pos)[0], **common)  # type: ignore[arg-type]
    kind, segno = struct.unpack_from("!BI", data, pos)
    return PagestreamRequest(slru_kind=kind, segno=segno, **common)  # type: ignore[arg-type]


def _echo(req: PagestreamRequest, version: int) -> bytes:
    return req.header if version == 3 else b""


def exists_response(req: PagestreamRequest, version: int, exists: bool) -> bytes:
    return bytes([ResponseTag.EXISTS]) + _echo(req, version) + bytes([1 if exists else 0])


def nblocks_response(req: PagestreamRequest, version: int, nblocks: int) -> bytes:
    return bytes([ResponseTag.NBLOCKS]) + _echo(req, version) + struct.pack("!I", nblocks)


def get_page_response(req: PagestreamRequest, version: int, page: bytes) -> bytes:
    if len(page) != BLCKSZ:
        raise ValueError(f"page of {len(page)} bytes")
    return bytes([ResponseTag.GET_PAGE]) + _echo(req, version) + page


def db_size_response(req: PagestreamRequest, version: int, size: int) -> bytes:
    return bytes([ResponseTag.DB_SIZE]) + _echo(req, version) + struct.pack("!q", size)


def slru_segment_response(req: PagestreamRequest, version: int, segment: bytes) -> bytes:
    if len(segment) % BLCKSZ:
        raise ValueError(f"SLRU segment of {len(segment)} bytes is not whole pages")
    return bytes([ResponseTag.GET_SLRU_SEGMENT]) + _echo(req, version) + struct.pack("!I", len(segment) // BLCKSZ) + segment


def error_response(req: PagestreamRequest | None, version: int, message: str) -> bytes:
    """An Error answer; in v3 it echoes the request's reqid and LSNs (not its body)."""
    head = b""
    if version == 3:
        head = struct.pack("!QQQ", req.reqid, req.request_lsn, req.not_modified_since) if req else bytes(24)
    return bytes([ResponseTag.ERROR]) + head + message.replace("\0", " ").encode("utf-8") + b"\0"


# ---------------------------------------------------------------- client side


def build_request(version: int, tag: RequestTag, request_lsn: int, not_modified_since: int, *,
                  reqid: int = 0, spc: int = 0, db: int = 0, rel: int = 0, fork: int = 0, blkno: int = 0,
                  slru_kind: int = 0, segno: int = 0) -> bytes:
    """Encode a request as a compute would send it (tests and benchmarks use this)."""
    head = struct.pack("!QQQ", reqid, request_lsn, not_modified_since) if version == 3 else \
        struct.pack("!QQ", request_lsn, not_modified_since)
    if tag in (RequestTag.EXISTS, RequestTag.NBLOCKS):
        body = _REL.pack(spc, db, rel, fork)
    elif tag == RequestTag.GET_PAGE:
        body = _REL.pack(spc, db, rel, fork) + struct.pack("!I", blkno)
    elif tag == RequestTag.DB_SIZE:
        body = struct.pack("!I", db)
    else:
        body = struct.pack("!BI", slru_kind, segno)
    return bytes([tag]) + head + body


@dataclass(frozen=True, slots=True)
class PagestreamResponse:
    """A decoded response (client side)."""

    tag: ResponseTag
    echoed: bytes  # v3: the request header+body echoed; v2: b""
    exists: bool = False
    nblocks: int = 0
    page: bytes = b""
    db_size: int = 0
    segment: bytes = b""
    error: str = ""


def parse_response(data: bytes, version: int, request_tag: RequestTag | None = None) -> PagestreamResponse:
    """Decode a response; v3 needs the request's tag to know how much is echoed (errors echo 24 bytes)."""
    tag = _first_tag(data, ResponseTag, "response")
    pos = 1
    if version == 3:
        if tag == ResponseTag.ERROR:
            echo_len = 24
        else:
            req_tag = RequestTag(tag - 100 if tag < ResponseTag.ERROR else tag - 101)
            echo_len = 24 + _BODY_SIZE[req_tag]
        if len(data) < pos + echo_len:
            raise PagestreamError("truncated pagestream response")
        echoed, pos = data[pos:pos + echo_len], pos + echo_len
    else:
        echoed = b""
    rest = data[pos:]
    try:
        if tag == ResponseTag.EXISTS:
            return PagestreamResponse(tag, echoed, exists=rest == b"\x01")
        if tag == ResponseTag.NBLOCKS:
            return PagestreamResponse(tag, echoed, nblocks=struct.unpack("!I", rest)[0])
        if tag == ResponseTag.GET_PAGE:
            if len(rest) != BLCKSZ:
                raise PagestreamError(f"GetPage response with {len(rest)} page bytes")
            return PagestreamResponse(tag, echoed, page=rest)
        if tag == ResponseTag.DB_SIZE:
            return PagestreamResponse(tag, echoed, db_size=struct.unpack("!q", rest)[0])
        if tag == ResponseTag.GET_SLRU_SEGMENT:
            (n,) = struct.unpack_from("!I", rest)
            if len(rest) != 4 + n * BLCKSZ:
                raise PagestreamError("GetSlruSegment response length does not match its page count")
            return PagestreamResponse(tag, echoed, segment=rest[4:])
        return PagestreamResponse(tag, echoed, error=rest.rstrip(b"\0").decode("utf-8", "replace"))
    except struct.error:
        raise PagestreamError(f"malformed pagestream {tag.name} response") from None
