"""The QMTP server core: LF and CR LF modes, pipelining, errors; and the policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.netstring import BAD_LENGTH_FIELD, encode
from pyqmail.queue.envelope import MAX_ENVELOPE, MAX_RECIPIENTS
from pyqmail.smtp.qmtpd import (
    BAD_RECIPIENT,
    NOT_RCPTHOST,
    TOO_MANY_RECIPIENTS,
    Envelope,
    MessageData,
    ProtocolError,
    QmtpPolicy,
    QmtpReceiver,
)


def msg(body: bytes, sender: bytes, rcpts: list[bytes], mode: bytes = b"\n") -> bytes:
    return encode(mode + body) + encode(sender) + encode(b"".join(encode(r) for r in rcpts))


def run(data: bytes, step: int = 1) -> list[tuple[bytes, object]]:
    rx = QmtpReceiver()
    out: list[tuple[bytes, object]] = []
    cur = b""
    for i in range(0, len(data), step):
        for ev in rx.feed(data[i : i + step]):
            if isinstance(ev, MessageData):
                cur += ev.data
            else:
                out.append((cur, ev))
                cur = b""
    return out


def test_lf_message_byte_by_byte() -> None:
    assert run(msg(b"A\nB\n", b"s", [b"a", b"b"])) == [(b"A\nB\n", Envelope(b"s", [b"a", b"b"]))]


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_crlf_mode_converts_across_any_split(body: bytes, step: int) -> None:
    got = run(msg(body, b"s", [b"r"], b"\r"), step)
    assert got == [(body.replace(b"\r\n", b"\n"), Envelope(b"s", [b"r"]))]


def test_lone_cr_is_kept() -> None:
    assert run(msg(b"a\rb\r\n", b"", [b"r"], b"\r"))[0][0] == b"a\rb\n"


def test_pipelined_messages() -> None:
    data = msg(b"one\n", b"s1", [b"a"]) + msg(b"two\n", b"s2", [b"b", b"c"])
    assert run(data, 7) == [(b"one\n", Envelope(b"s1", [b"a"])),
                            (b"two\n", Envelope(b"s2", [b"b", b"c"]))]  # fmt: skip


@pytest.mark.parametrize(
    ("sender", "rcpts", "envelope"),
    [
        (b"() { :; }; /bin/touch /tmp/x", [b"a@b"], Envelope(None, [b"a@b"])),
        (b"a;b@example.test", [b"a@b"], Envelope(None, [b"a@b"])),
        (b"ok@e.test", [b"a(b@e.test", b'"() {"@e.test', b""], Envelope(b"ok@e.test", [None] * 3)),
        (b'"john doe"@e.test', [b'"a;b"@e.test'], Envelope(b"john doe@e.test", [b"a;b@e.test"])),
        (b"", [b"postmaster", b"u@[IPv6:::1]"], Envelope(b"", [b"postmaster", b"u@[IPv6:::1]"])),
    ],
)
def test_addresses_must_be_mailboxes(sender: bytes, rcpts: list[bytes], envelope: Envelope) -> None:
    # None = refused: BAD_SENDER for the message, BAD_RECIPIENT for that recipient
    assert run(msg(b"x\n", sender, rcpts)) == [(b"x\n", envelope)]


def test_long_addresses_become_none() -> None:
    ((_, env),) = run(msg(b"x\n", b"s" * 1000, [b"r" * 1000, b"ok"]))
    assert env == Envelope(None, [None, b"ok"])


@pytest.mark.parametrize(
    "data",
    [encode(b"") + encode(b"s") + encode(encode(b"a")),  # empty message
     encode(b"Xbody") + encode(b"s") + encode(encode(b"a")),  # neither LF nor CR
     b"1x:", b"3:\nab;",
     encode(b"\nA") + encode(b"s") + b"5:3:abcd,,"],  # recipient runs past its list
)  # fmt: skip
def test_protocol_errors(data: bytes) -> None:
    ((_, ev),) = run(data)
    assert isinstance(ev, ProtocolError) and ev.code == 100


def test_policy(home: Home, tmp_path: Path) -> None:
    (home.control / "rcpthosts").write_text("mx.test.example\n.sub.example\n")
    ctl = load(home)
    p = QmtpPolicy(ctl, {}, None)
    assert p.check(b"a@mx.test.example") == (b"a@mx.test.example", None)
    assert p.check(b"a@x.sub.example")[0] == b"a@x.sub.example"
    assert p.check(b"a@other.example") == (None, NOT_RCPTHOST)
    assert p.check(b"local") == (b"local", None)
    assert p.check(None) == (None, BAD_RECIPIENT)
    assert p.check(b"a\0b@mx.test.example") == (None, BAD_RECIPIENT)
    relay = QmtpPolicy(ctl, {"RELAYCLIENT": "@fix.example", "DATABYTES": "12x"}, None)
    assert relay.check(b"joe") == (b"joe@fix.example", None)
    assert relay.check(b"a" * 990) == (None, BAD_RECIPIENT)  # with RELAYCLIENT it is 1002
    assert relay.databytes == 12


def test_recipients_up_to_the_bound_are_served() -> None:
    rcpts = [b"r%d@x.example" % i for i in range(MAX_RECIPIENTS)]
    ((_, env),) = run(msg(b"x\n", b"s", rcpts), step=65536)
    assert env == Envelope(b"s", list(rcpts))


def test_recipient_over_the_bound_is_refused_as_it_starts() -> None:
    rx = QmtpReceiver()
    head = encode(b"\nA\n") + encode(b"s") + b"1999999:"
    assert rx.feed(head + encode(b"abcd") * (MAX_RECIPIENTS - 1)) == [MessageData(b"A\n")]
    (ev,) = rx.feed(encode(b"abcd"))
    assert ev == ProtocolError(111, "too many recipients", TOO_MANY_RECIPIENTS)
    assert rx.feed(encode(b"abcd")) == []


def test_recipient_list_declared_over_the_envelope_bound_is_refused_at_once() -> None:
    rx = QmtpReceiver()
    head = encode(b"\nA\n") + encode(b"s")
    ok = rx.feed(head + b"%d:" % MAX_ENVELOPE)
    assert ok == [MessageData(b"A\n")]
    rx = QmtpReceiver()
    (_, ev) = rx.feed(head + b"%d:" % (MAX_ENVELOPE + 1))
    assert ev == ProtocolError(111, "recipient list too long", TOO_MANY_RECIPIENTS)


def test_long_length_field_is_answered() -> None:
    ((_, ev),) = run(b"0" * 14 + b"2:\nA,")
    assert isinstance(ev, ProtocolError) and ev.reply == BAD_LENGTH_FIELD
