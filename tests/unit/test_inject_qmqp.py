"""The QMQP server core fed byte by byte, its refusals, and the qmqpservers list."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqmail.mailbox import queue_form
from pyqmail.netstring import BAD_LENGTH_FIELD, encode
from pyqmail.queue.envelope import MAX_RECIPIENTS
from pyqmail.queue.qmqpc import server_list
from pyqmail.smtp.netdoor import received_line
from pyqmail.smtp.qmqpd import (
    TOO_BIG,
    TOO_MANY_RECIPIENTS,
    MessageData,
    QmqpReceiver,
    Refused,
    Request,
)


def req(message: bytes, sender: bytes, rcpts: list[bytes]) -> bytes:
    return encode(encode(message) + encode(sender) + b"".join(encode(r) for r in rcpts))


def run(data: bytes, step: int = 1, limit: int = 200_000_000) -> tuple[bytes, list[object]]:
    rx = QmqpReceiver(limit)
    message = b""
    other: list[object] = []
    for i in range(0, len(data), step):
        for ev in rx.feed(data[i : i + step]):
            if isinstance(ev, MessageData):
                message += ev.data
            else:
                other.append(ev)
    if not rx.finished:
        other += rx.eof()
    return message, other


def test_request_in_one_byte_pieces() -> None:
    msg, ev = run(req(b"Subject: x\n\nhi\n", b"s@x", [b"a@b", b"c@d"]))
    assert msg == b"Subject: x\n\nhi\n"
    assert ev == [Request(b"s@x", [b"a@b", b"c@d"], False)]


@given(
    st.binary(max_size=300),
    st.binary(max_size=50),
    st.lists(st.binary(max_size=40), max_size=5),
    st.integers(min_value=1, max_value=64),
)
def test_any_split_gives_the_same_request(m: bytes, s: bytes, r: list[bytes], step: int) -> None:
    msg, ev = run(req(m, s, r), step)
    assert msg == m
    forms = [queue_form(s, sender=True), *(queue_form(a, sender=False) for a in r)]
    bad = any(f is None for f in forms) or any(len(a) >= 1000 for a in [s, *r])
    assert ev == [Request(forms[0] or b"", [f or b"" for f in forms[1:]], bad)]


@pytest.mark.parametrize(
    ("sender", "rcpts", "expected"),
    [
        (b"() { :; }; /bin/touch /tmp/x", [b"a@b"], Request(b"", [b"a@b"], True)),
        (b"a;b@example.test", [b"a@b"], Request(b"", [b"a@b"], True)),
        (b'"() { :;}; x"@e.test', [b"a@b"], Request(b"", [b"a@b"], True)),
        (b"ok@e.test", [b"john doe@e.test"], Request(b"ok@e.test", [b""], True)),
        (b"ok@e.test", [b""], Request(b"ok@e.test", [b""], True)),
        (
            b'"john doe"@e.test',
            [b'"a;b"@e.test'],
            Request(b"john doe@e.test", [b"a;b@e.test"], False),
        ),
        (b"", [b"postmaster"], Request(b"", [b"postmaster"], False)),
        (b"#@[]", [b"a@[192.0.2.1]"], Request(b"#@[]", [b"a@[192.0.2.1]"], False)),
    ],
)
def test_addresses_must_be_mailboxes(sender: bytes, rcpts: list[bytes], expected: Request) -> None:
    assert run(req(b"x\n", sender, rcpts))[1] == [expected]


@pytest.mark.parametrize(
    "data",
    [
        b"x:",  # not a length
        b"10:" + encode(b"abcdefgh") + b",",  # outer length says 10, inner takes 11
        b"8:100:abc,,",  # inner length lies past the outer one
        req(b"A\n", b"s", [b"a"])[:-1] + b";",  # no closing comma
        encode(encode(b"A\n")),  # no sender
        b":",
        b"5:1:a,;",  # bad comma inside
    ],
)
def test_malformed_requests_close_without_reply(data: bytes) -> None:
    _, ev = run(data)
    assert len(ev) == 1 and isinstance(ev[0], Refused)
    assert ev[0].code == 100 and ev[0].reply is None


def test_eof_mid_request_is_a_quiet_end() -> None:
    _, ev = run(req(b"A\n", b"s", [b"a"])[:-3])
    assert ev == [Refused(0, None, "connection closed in the middle of the request")]


def test_oversized_length_refused_before_the_body() -> None:
    rx = QmqpReceiver(limit=100 * 1024 * 1024)
    ev = rx.feed(b"104857700:104857600:")  # 100 MB declared; nothing of it sent
    assert len(ev) == 1 and isinstance(ev[0], Refused)
    assert ev[0].reply == TOO_BIG and rx.finished
    assert rx.feed(b"more") == []


def test_long_and_nul_addresses_are_flagged() -> None:
    _, ev = run(req(b"A\n", b"s", [b"x" * 1000]))
    assert ev == [Request(b"s", [b""], True)]  # the long address is not kept
    _, ev = run(req(b"A\n", b"s\0", [b"a"]))
    assert isinstance(ev[0], Request) and ev[0].bad


def test_received_line() -> None:
    env = {"TCPREMOTEIP": "1.2.3.4", "TCPREMOTEHOST": "h (x)", "TCPREMOTEINFO": "id",
           "TCPLOCALHOST": "mx.example"}  # fmt: skip
    line = received_line("QMQP", env, when=0)
    assert line == (b"Received: from h??x? (id@1.2.3.4)\n  by mx.example with QMQP; "
                    b"1 Jan 1970 00:00:00 -0000\n")  # fmt: skip


def test_server_list() -> None:
    lines = ["127.0.0.1", "# not", "host.example", "10.0.0.1:6280", "[::1]:700", "::1", "1.2.3.4:x"]
    assert server_list(lines) == [("127.0.0.1", 628), ("10.0.0.1", 6280), ("::1", 700),
                                  ("::1", 628)]  # fmt: skip


def test_recipients_up_to_the_bound_are_served() -> None:
    rcpts = [b"r%d@x.example" % i for i in range(MAX_RECIPIENTS)]
    _, ev = run(req(b"A\n", b"s", rcpts), step=65536)
    assert ev == [Request(b"s", rcpts, False)]


def test_recipient_over_the_bound_is_refused_as_it_starts() -> None:
    """A hostile request declares 199,999,999 bytes and sends recipients for ever: once
    MAX_RECIPIENTS are in and its length says more follow, it is answered D."""
    rx = QmqpReceiver()
    head = b"199999999:" + encode(b"A\n") + encode(b"s")
    assert rx.feed(head + encode(b"abcd") * (MAX_RECIPIENTS - 1)) == [MessageData(b"A\n")]
    assert not rx.finished
    ev = rx.feed(encode(b"abcd"))
    assert ev == [Refused(111, TOO_MANY_RECIPIENTS, "too many recipients")] and rx.finished
    assert TOO_MANY_RECIPIENTS[:1] == b"D" and b"%d" % MAX_RECIPIENTS in TOO_MANY_RECIPIENTS


def test_long_inner_length_field_is_answered() -> None:
    _, ev = run(b"100:" + b"0" * 20 + b"1:A,")
    assert ev == [Refused(100, BAD_LENGTH_FIELD, "netstring length field too long")]
