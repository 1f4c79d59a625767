"""storage.values: the encoding of a version round-trips and bad bytes raise ValueFormatError only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.pageserver.keys import (
    KIND_DELETED,
    KIND_FILE,
    KIND_IMAGE,
    KIND_RECORD,
    KIND_RECORD_INIT,
)
from services.pageserver.storage.errors import ValueFormatError
from services.pageserver.storage.values import (
    Value,
    decode_value,
    encode_value,
    value_kind,
)

values = st.one_of(
    st.binary(max_size=9000).map(Value.image),
    st.builds(Value.record, st.binary(max_size=3000), st.booleans(), st.integers(0, 2**64 - 1)),
    st.binary(max_size=600).map(Value.file),
    st.just(Value.deleted()),
)


@given(values)
def test_round_trip(v: Value) -> None:
    enc = encode_value(v)
    assert decode_value(enc) == v
    assert value_kind(enc) == v.kind


def test_flags() -> None:
    assert Value.record(b"r", will_init=True).kind == KIND_RECORD_INIT
    assert Value.record(b"r").kind == KIND_RECORD
    assert not Value.record(b"r").complete and Value.record(b"r", True).complete
    assert Value.record(b"r", True).will_init and Value.record(b"r").is_record
    for v in (Value.image(bytes(8192)), Value.file(b"f"), Value.deleted()):
        assert v.complete and not v.is_record and not v.will_init
    assert Value.deleted().kind == KIND_DELETED and Value.file(b"").kind == KIND_FILE
    assert Value.image(b"").kind == KIND_IMAGE
    assert "record" in Value.record(b"abc").describe()


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_domain_error(data: bytes) -> None:
    try:
        v = decode_value(data)
    except ValueFormatError:
        return
    assert encode_value(v) == data


@pytest.mark.parametrize("bad", [b"", b"\x09", b"\x02short", b"\x04x", b"\xff"])
def test_bad_encodings(bad: bytes) -> None:
    with pytest.raises(ValueFormatError):
        decode_value(bad)


def test_bad_values_refused() -> None:
    with pytest.raises(ValueFormatError):
        encode_value(Value(9, b""))
    with pytest.raises(ValueFormatError):
        encode_value(Value(KIND_DELETED, b"x"))
    with pytest.raises(ValueFormatError):
        encode_value(Value(KIND_RECORD, b"x", -1))
