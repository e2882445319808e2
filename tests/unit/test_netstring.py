"""Netstrings: encoding, incremental length parsing, errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqmail import netstring
from pyqmail.netstring import NetstringError


def test_encode() -> None:
    assert netstring.encode(b"hello") == b"5:hello,"
    assert netstring.encode(b"") == b"0:,"
    assert netstring.encode_all([b"a", b"bc"]) == b"1:a,2:bc,"


@given(st.lists(st.binary(max_size=50), max_size=8))
def test_roundtrip(items: list[bytes]) -> None:
    assert netstring.decode_all(netstring.encode_all(items)) == items


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=210))
def test_decode_one_incomplete_prefix_asks_for_more(data: bytes, cut: int) -> None:
    full = netstring.encode(data)
    got = netstring.decode_one(full[:cut])
    if cut >= len(full):
        assert got == (data, len(full))
    else:
        assert got is None


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"x:", 100), (b"1a:", 100), (b":", 100), (b"-1:", 100), (b" 1:", 100),
     (b"999999999999999:", 111), (b"1:ab", 100)],
)  # fmt: skip
def test_bad_input(data: bytes, code: int) -> None:
    with pytest.raises(NetstringError) as e:
        netstring.decode_one(data, 0, 10**9)
    assert e.value.code == code


def test_length_over_limit_is_111() -> None:
    with pytest.raises(NetstringError) as e:
        netstring.parse_length(b"201:", 0, 200)
    assert e.value.code == 111
    assert netstring.parse_length(b"200:", 0, 200) == (200, 4)


def test_truncated_decode_all() -> None:
    with pytest.raises(NetstringError):
        netstring.decode_all(b"3:ab")


@pytest.mark.parametrize("field", [b"0" * 13, b"0" * 12 + b"5", b"1" * 40, b"0" * 100_000])
def test_length_field_over_13_bytes_is_answered(field: bytes) -> None:
    """Leading zeros too: no peer makes the parser walk an endless run of digits."""
    with pytest.raises(NetstringError) as e:
        netstring.parse_length(field + b":", 0, 10**15)
    assert e.value.code == 100 and e.value.reply == netstring.BAD_LENGTH_FIELD
    assert netstring.parse_length(b"0" * 11 + b"7:", 0, 10) == (7, 13)  # 13 bytes: fine


def test_length_field_looks_at_13_bytes_at_most() -> None:
    class Probe(bytearray):
        seen = 0

        def __getitem__(self, i: object) -> object:
            Probe.seen = max(Probe.seen, i if isinstance(i, int) else 0)
            return super().__getitem__(i)  # type: ignore[index]

    with pytest.raises(NetstringError):
        netstring.parse_length(Probe(b"9" * 1_000_000), 0, 10**20)
    assert Probe.seen < 13
    assert netstring.parse_length(b"12345", 0, 10**9, end=3) is None  # ``end`` bounds it
