"""The wire-protocol and pagestream codecs on their own: layouts, and bad input as clear errors.

Layouts are checked against libpq where it matters (test_pgshim.py drives
psql, psycopg and pg_basebackup through the shim); here every parser gets
truncated, oversized and garbage input.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgformat import pagestream as ps
from pgformat import wire
from pgformat.errors import FormatError


def _startup(params: dict[str, str], protocol: int = wire.PROTOCOL_V3) -> bytes:
    body = struct.pack("!I", protocol) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    return body + b"\0"


def test_startup_packet_and_special_requests() -> None:
    msg = wire.parse_startup_packet(_startup({"user": "u", "database": "d", "options": "-c a=b"}))
    assert msg == wire.StartupMessage(wire.PROTOCOL_V3, {"user": "u", "database": "d", "options": "-c a=b"})
    assert wire.parse_startup_packet(struct.pack("!I", wire.SSL_REQUEST_CODE)) == wire.SSLRequest()
    assert wire.parse_startup_packet(struct.pack("!I", wire.GSSENC_REQUEST_CODE)) == wire.GSSEncRequest()
    assert wire.parse_startup_packet(struct.pack("!IiI", wire.CANCEL_REQUEST_CODE, 42, 7)) == wire.CancelRequest(42, 7)


@pytest.mark.parametrize("body, why", [
    (b"", "truncated"),
    (_startup({"database": "d"}), "no PostgreSQL user"),
    (_startup({"user": "u"})[:-1], "NUL-terminated"),
    (_startup({"user": "u"}, protocol=2 << 16), "unsupported frontend protocol 2.0"),
    (struct.pack("!I", wire.PROTOCOL_V3) + b"user\0u\0lonely\0\0", "without a value"),
    (struct.pack("!I", wire.PROTOCOL_V3) + b"user\0\xff\0\0", "UTF-8"),
    (struct.pack("!II", wire.SSL_REQUEST_CODE, 0), "SSLRequest with a body"),
    (struct.pack("!Ii", wire.CANCEL_REQUEST_CODE, 1), "wrong length"),
])
def test_bad_startup_packets(body: bytes, why: str) -> None:
    with pytest.raises(wire.ProtocolError, match=why):
        wire.parse_startup_packet(body)


@pytest.mark.parametrize("length", [0, 7, wire.MAX_STARTUP_PACKET_LENGTH + 1, 0xFFFFFFFF])
def test_startup_lengths_out_of_range(length: int) -> None:
    with pytest.raises(wire.ProtocolError, match="invalid length"):
        wire.startup_packet_length(struct.pack("!I", length))


def test_options_are_split_like_postgres() -> None:
    assert wire.parse_options("-c zenith.branch=feature -c zenith.lsn=0/16B3748") == {
        "zenith.branch": "feature", "zenith.lsn": "0/16B3748"}
    assert wire.parse_options(r"-cwork_mem=4MB --search-path=a\ b") == {"work_mem": "4MB", "search_path": "a b"}
    assert wire.parse_options("   ") == {}
    for bad in ("-c", "-c novalue", "plainword", "trailing\\"):
        with pytest.raises(wire.ProtocolError):
            wire.parse_options(bad)


def test_message_parser_frames_and_limits() -> None:
    parser = wire.MessageParser(max_length=100)
    stream = wire.message(b"Q", b"status\0") + wire.message(b"S") + wire.message(b"X")
    assert parser.feed(stream[:3]) == []
    assert parser.feed(stream[3:]) == [(b"Q", b"status\0"), (b"S", b""), (b"X", b"")]
    assert parser.pending == 0
    with pytest.raises(wire.ProtocolError, match="invalid message length 3"):
        wire.MessageParser().feed(b"Q" + struct.pack("!I", 3))
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        wire.MessageParser(max_length=100).feed(b"d" + struct.pack("!I", 105))


@given(st.lists(st.tuples(st.sampled_from(b"QPBDESdcX"), st.binary(max_size=40)), max_size=12), st.data())
def test_message_parser_any_chunking(messages: list[tuple[int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(wire.message(bytes([k]), body) for k, body in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    parser = wire.MessageParser()
    got: list[tuple[bytes, bytes]] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += parser.feed(stream[prev:cut])
        prev = cut
    assert got == [(bytes([k]), body) for k, body in messages]


def test_extended_protocol_bodies() -> None:
    assert wire.parse_parse(b"s1\0status\0\0\0") == wire.Parse("s1", "status", ())
    bind = wire.parse_bind(b"p\0s1\0" + b"\0\x01\0\x01" + b"\0\x01\0\0\0\x02hi" + b"\0\0")
    assert bind.params == (b"hi",) and bind.param_formats == (1,) and bind.portal == "p"
    assert wire.parse_describe_or_close(b"Pp\0", "Describe") == (b"P", "p")
    assert wire.parse_execute(b"p\0\0\0\0\0") == ("p", 0)
    for parse, body in ((wire.parse_parse, b"s1\0status\0\0\x01"), (wire.parse_bind, b"p\0s\0\0\x01\0"),
                        (wire.parse_bind, b"p\0s\0\0\0\0\x01\0\0\0\x09hi\0\0"), (wire.parse_execute, b"p\0\0"),
                        (wire.parse_query, b"no terminator"), (wire.parse_query, b"a\0trailing")):
        with pytest.raises(wire.ProtocolError):
            parse(body)
    with pytest.raises(wire.ProtocolError, match="kind"):
        wire.parse_describe_or_close(b"Xp\0", "Describe")


def test_backend_messages_layout() -> None:
    # RowDescription: count, then per column name, table oid, attnum, type oid, typlen, typmod, format.
    rd = wire.row_description([wire.Column("a"), wire.Column("n", wire.INT4_OID, 4)])
    assert rd == b"T" + struct.pack("!Ih", 4 + 2 + 2 * 18 + 4, 2) + b"a\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0) \
        + b"n\0" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0)
    assert wire.data_row(["x", None]) == b"D" + struct.pack("!IhI", 4 + 2 + 4 + 1 + 4, 2, 1) + b"x" + struct.pack("!i", -1)
    err = wire.error_response(wire.ErrorFields("08P01", "bad\0thing", detail="d"))
    assert err.startswith(b"E") and b"C08P01\0" in err and b"Mbad\\0thing\0" in err and err.endswith(b"Dd\0\0")
    assert wire.copy_both_response() == b"W\0\0\0\x07\0\0\0"


# ------------------------------------------------------------------- pagestream


@pytest.mark.parametrize("version", [2, 3])
def test_pagestream_requests_round_trip(version: int) -> None:
    for tag, kw in ((ps.RequestTag.EXISTS, dict(spc=1663, db=5, rel=16384, fork=1)),
                    (ps.RequestTag.NBLOCKS, dict(spc=1663, db=5, rel=16384, fork=0)),
                    (ps.RequestTag.GET_PAGE, dict(spc=1663, db=5, rel=16384, fork=0, blkno=77)),
                    (ps.RequestTag.DB_SIZE, dict(db=5)),
                    (ps.RequestTag.GET_SLRU_SEGMENT, dict(slru_kind=ps.SLRU_CLOG, segno=3))):
        data = ps.build_request(version, tag, 0x1_6B37_48, 0x1_0000_00, reqid=9, **kw)
        req = ps.parse_request(data, version)
        assert (req.tag, req.request_lsn, req.not_modified_since, req.reqid) == (tag, 0x16B3748, 0x1000000,
                                                                                 9 if version == 3 else 0)
        for k, v in kw.items():
            assert getattr(req, k) == v


def test_pagestream_v3_responses_echo_the_request() -> None:
    data = ps.build_request(3, ps.RequestTag.GET_PAGE, 100, 90, reqid=5, spc=1, db=2, rel=3, fork=0, blkno=4)
    req = ps.parse_request(data, 3)
    page = bytes(range(256)) * 32
    resp = ps.get_page_response(req, 3, page)
    assert resp[0] == ps.ResponseTag.GET_PAGE and resp[1:len(data)] == data[1:] and resp[len(data):] == page
    parsed = ps.parse_response(resp, 3, ps.RequestTag.GET_PAGE)
    assert parsed.page == page and parsed.echoed == data[1:]
    err = ps.parse_response(ps.error_response(req, 3, "boom"), 3)
    assert err.tag == ps.ResponseTag.ERROR and err.error == "boom" and err.echoed[:8] == struct.pack("!Q", 5)
    v2 = ps.nblocks_response(ps.parse_request(ps.build_request(2, ps.RequestTag.NBLOCKS, 1, 1), 2), 2, 12)
    assert v2 == bytes([ps.ResponseTag.NBLOCKS]) + struct.pack("!I", 12)


@pytest.mark.parametrize("version", [2, 3])
def test_pagestream_bad_requests(version: int) -> None:
    good = ps.build_request(version, ps.RequestTag.GET_PAGE, 1, 1, spc=1, db=2, rel=3, blkno=4)
    for bad in (b"", good[:-1], good + b"\0", bytes([7]) + good[1:], bytes([ps.RequestTag.DB_SIZE]) + good[1:]):
        with pytest.raises(FormatError):
            ps.parse_request(bad, version)


@given(st.binary(max_size=64), st.sampled_from([2, 3]))
def test_pagestream_garbage_is_an_error_or_a_request(data: bytes, version: int) -> None:
    try:
        req = ps.parse_request(data, version)
    except ps.PagestreamError:
        return
    assert ps.build_request(version, req.tag, req.request_lsn, req.not_modified_since, reqid=req.reqid, spc=req.spc,
                            db=req.db, rel=req.rel, fork=req.fork, blkno=req.blkno, slru_kind=req.slru_kind,
                            segno=req.segno) == data
