"""remote/transmit.py: CRLF and dot-stuffing so that no stored bytes end DATA early."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.remote.transmit import DataEncoder, encode, has_8bit


@pytest.mark.parametrize(
    ("stored", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\n", b"a\r\n.\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
        (b".\n", b"..\r\n.\r\n"),
        (b"..x\n", b"...x\r\n.\r\n"),
        (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),  # stored CRLF is not doubled
        (b"X\r.\n", b"X\r\n..\r\n.\r\n"),  # gaps.md 3.3: the smuggling sequence
        (b"X\r.\r\nMAIL FROM:<e@vil>\n", b"X\r\n..\r\nMAIL FROM:<e@vil>\r\n.\r\n"),
        (b"a\r\r\n.\n", b"a\r\n\r\n..\r\n.\r\n"),
        (b"\r.\r", b"\r\n..\r\n.\r\n"),
        (b"partial", b"partial\r\n.\r\n"),  # completed, not refused
        (b"a\n.", b"a\r\n..\r\n.\r\n"),
        (b"8bit \xe9\0\n", b"8bit \xe9\0\r\n.\r\n"),
    ],
)
def test_encoding_table(stored: bytes, wire: bytes) -> None:
    assert encode(stored) == wire
    # the same bytes fed one at a time give the same wire bytes
    enc = DataEncoder()
    out = b"".join(enc.feed(stored[i : i + 1]) for i in range(len(stored))) + enc.finish()
    assert out == wire


def _check_wire(wire: bytes) -> None:
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    # no bare CR, no bare LF anywhere
    assert body.replace(b"\r\n", b"").count(b"\r") == 0
    assert body.replace(b"\r\n", b"").count(b"\n") == 0
    assert body == b"" or body.endswith(b"\r\n")
    # no end of data before the real one: no line that is exactly "."
    lines = body.split(b"\r\n")[:-1]
    assert b"." not in lines


@settings(deadline=None)  # timing is not under test; the machine is shared
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_no_stored_bytes_can_end_data_early(stored: bytes, step: int) -> None:
    enc = DataEncoder()
    wire = b"".join(enc.feed(stored[i : i + step]) for i in range(0, len(stored), step))
    wire += enc.finish()
    _check_wire(wire)
    assert wire == encode(stored)
    # a receiver unstuffing it gets the stored text with every line end made LF
    lines = wire[:-3].split(b"\r\n")[:-1]
    unstuffed = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\n" for ln in lines)
    norm = stored.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if norm and not norm.endswith(b"\n"):
        norm += b"\n"
    assert unstuffed == norm


@settings(deadline=None)  # timing is not under test; the machine is shared
@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\n."]), max_size=40))
def test_line_end_soup(parts: list[bytes]) -> None:
    _check_wire(encode(b"".join(parts)))


def test_has_8bit() -> None:
    assert has_8bit(b"caf\xc3\xa9")
    assert not has_8bit(b"plain\r\n\0")
