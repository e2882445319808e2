"""queue/envelope.py, queue/codes.py, queue/layout.py: formats and limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqmail.queue import codes
from pyqmail.queue.envelope import (
    MAX_ADDRESS,
    EnvelopeError,
    EnvelopeParser,
    format_input,
    format_todo,
    parse_envelope,
    parse_todo,
)
from pyqmail.queue.layout import QueuePaths, msgnum


def test_parse_good() -> None:
    assert parse_envelope(b"Fa@b\0Tc@d\0Te@f\0\0") == (b"a@b", [b"c@d", b"e@f"])


def test_parse_empty_sender_and_no_recipients() -> None:
    assert parse_envelope(b"F\0\0") == (b"", [])


def test_bytes_after_terminator_are_not_read() -> None:
    p = EnvelopeParser()
    used = p.feed(b"Fa\0Tb\0\0garbage")
    assert p.done and used == len(b"Fa\0Tb\0\0")
    assert p.finish() == (b"a", [b"b"])


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", 54),
        (b"Tbob@x\0\0", 91),
        (b"X\0\0", 91),
        (b"\0", 91),
        (b"Fa@x\0Xb@x\0\0", 91),
        (b"Fa@x\0Tb@x", 54),
        (b"Fa@x\0Tb@x\0", 54),
        (b"Fa@x", 54),
        (b"F" + b"a" * (MAX_ADDRESS + 1) + b"\0\0", 11),
        (b"Fa\0T" + b"b" * (MAX_ADDRESS + 1), 11),
    ],
)
def test_parse_errors(data: bytes, code: int) -> None:
    with pytest.raises(EnvelopeError) as ei:
        parse_envelope(data)
    assert ei.value.code == code


def test_longest_address_accepted() -> None:
    a = b"a" * MAX_ADDRESS
    assert parse_envelope(b"F" + a + b"\0T" + a + b"\0\0") == (a, [a])


def test_byte_at_a_time_equals_whole() -> None:
    data = format_input(b"s@x", [b"r%d@y" % i for i in range(50)])
    p = EnvelopeParser()
    for i in range(len(data)):
        p.feed(data[i : i + 1])
    assert p.finish() == parse_envelope(data)


def test_todo_roundtrip() -> None:
    raw = format_todo(1000, 4242, b"", [b"a@b", b"c@d"])
    assert raw == b"u1000\0p4242\0F\0Ta@b\0Tc@d\0"
    t = parse_todo(raw)
    assert (t.uid, t.pid, t.sender, t.recipients) == (1000, 4242, b"", (b"a@b", b"c@d"))


@pytest.mark.parametrize("raw", [b"u1\0p2\0Fa\0Tb", b"u1\0p2\0Tb\0", b"u1\0Qx\0Fa\0"])
def test_todo_bad(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_todo(raw)


@pytest.mark.parametrize(
    ("code", "cls", "text"),
    [
        (0, "K", "ok"),
        (11, "D", "envelope address too long for qq (#5.1.3)"),
        (31, "D", "mail server permanently rejected message (#5.3.0)"),
        (53, "Z", "qq write error or disk full (#4.3.0)"),
        (54, "Z", "qq read error (#4.3.0)"),
        (61, "Z", "qq trouble in home directory (#4.3.0)"),
        (64, "Z", "qq trouble creating files in queue (#4.3.0)"),
        (74, "Z", "communication with mail server failed (#4.4.2)"),
        (81, "Z", "qq internal bug (#4.3.0)"),
        (91, "Z", "qq internal bug (#4.3.0)"),
        (115, "D", "envelope address too long for qq (#5.1.3)"),
        (120, "Z", "unable to exec qq (#4.3.0)"),
        (25, "D", "qq permanent problem (#5.3.0)"),
        (99, "Z", "qq temporary problem (#4.3.0)"),
        (codes.CRASHED, "Z", "qq crashed (#4.3.0)"),
    ],
)
def test_qq_result(code: int, cls: str, text: str) -> None:
    assert codes.qq_result(code) == (cls, text)


def test_custom_error_text() -> None:
    assert codes.qq_result(82, "Dgo away") == ("D", "go away")
    assert codes.qq_result(82, "Dx") == ("Z", "qq temporary problem (#4.3.0)")
    # qmail.c: any first letter other than D is temporary
    assert codes.qq_result(82, "Xbusy") == ("Z", "busy")
    assert codes.smtp_reply(11) == b"554 envelope address too long for qq (#5.1.3)\r\n"


def test_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = QueuePaths(tmp_path)
    assert p.mess(47) == tmp_path / "mess" / "1" / "47"
    assert p.info(23) == tmp_path / "info" / "0" / "23"
    assert p.todo(47) == tmp_path / "todo" / "47"
    assert p.trigger == tmp_path / "lock" / "trigger"
    assert msgnum("123") == 123 and msgnum("12a") is None and msgnum("") is None


addresses = st.binary(max_size=40).filter(lambda b: b"\0" not in b)


@given(addresses, st.lists(addresses, max_size=8), st.lists(st.integers(1, 30), max_size=20))
def test_any_chunking_parses_the_same(sender: bytes, rcpts: list[bytes], cuts: list[int]) -> None:
    data = format_input(sender, rcpts)
    p = EnvelopeParser()
    pos = 0
    for c in cuts:
        pos += p.feed(data[pos : pos + c])
    p.feed(data[pos:])
    assert p.finish() == (sender, rcpts)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_envelope_errors(data: bytes) -> None:
    try:
        sender, rcpts = parse_envelope(data)
    except EnvelopeError as e:
        assert e.code in (11, 54, 91)
    else:
        assert data.startswith(b"F") and b"\0" not in sender
        assert format_input(sender, rcpts) == data[: len(format_input(sender, rcpts))]
