"""Random hostile transcripts against the SMTP conversation core (the code every adapter
runs), fed in random pieces: it never raises, never emits anything after Close, and never
starts a message whose envelope holds a control byte, an 8-bit byte, an empty recipient or
a recipient outside rcpthosts."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyqmail.control import domain_keys, load
from pyqmail.home import Home
from pyqmail.smtp.protocol import (
    Close,
    DataChunk,
    MessageAbort,
    MessageEnd,
    MessageStart,
    Send,
    SmtpServerConnection,
)
from pyqmail.smtp.session import Session

PIECES = [
    b"HELO x\r\n", b"EHLO y\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<x@test.example>\r\n", b"RCPT TO:<v@elsewhere.example>\r\n", b"RCPT TO:<@>\r\n",
    b"RCPT TO:<x@test.example\x00Tv@elsewhere.example>\r\n", b"RCPT TO:<\xc3\xa9@test.example>\r\n",
    b"RCPT TO:<@test.example:v@elsewhere.example>\r\n", b'RCPT TO:<"v@e"@test.example>\r\n',
    b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"\r.\r", b"\n.\n", b"x\r\n", b"\r", b"\n", b"\x00",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"BDAT 5\r\n", b"AUTH PLAIN\r\n", b"STARTTLS\r\n",
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"A" * 600, b"Received: x\r\n", b" ", b":", b"<", b">",
]  # fmt: skip

ALLOWED = {"test.example"}


def _ok_rcpt(r: bytes) -> bool:
    if not r or any(c < 0x20 or c >= 0x7F for c in r):
        return False
    at = r.rfind(b"@")
    return at < 0 or any(k in ALLOWED for k in domain_keys(r[at + 1 :].decode()))


@pytest.fixture
def ctl(home: Home):  # type: ignore[no-untyped-def]
    (home.control / "rcpthosts").write_text("test.example\n")
    return load(home)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parts=st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=12)), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=10),
    start_ok=st.booleans(),
)
def test_random_transcripts_keep_the_invariants(ctl, parts, cuts, start_ok) -> None:  # type: ignore[no-untyped-def]
    conn = SmtpServerConnection(Session(ctl, {"TCPREMOTEIP": "192.0.2.1"}))
    data = b"".join(parts)
    closed = False
    pending: list = list(conn.greet())
    i = 0
    k = 0
    while True:
        while pending:
            ev = pending.pop(0)
            assert not closed, ev
            if isinstance(ev, MessageStart):
                assert ev.recipients and all(_ok_rcpt(r) for r in ev.recipients), ev
                assert not any(c < 0x20 or c >= 0x7F for c in ev.sender), ev
                pending = conn.start_result(start_ok) + pending
            elif isinstance(ev, MessageEnd):
                pending = conn.message_result(b"250 ok 1 qp 1\r\n") + pending
            elif isinstance(ev, Close):
                closed = True
            else:
                assert isinstance(ev, (Send, DataChunk, MessageAbort))
                if isinstance(ev, Send):
                    assert b"Traceback" not in ev.data
        if i >= len(data):
            break
        n = cuts[k % len(cuts)]
        k += 1
        pending = list(conn.receive_data(data[i : i + n]))
        i += n
    if not closed:
        for ev in conn.receive_data(b""):
            assert not isinstance(ev, (Send, MessageStart, MessageEnd))


NS_PIECES = [b"0:", b"1:", b"3:", b"10:", b"999:", b",", b":", b"a@b", b"\x00", b"\n", b"\r",
             b"x", b"12345678901234567890:", b"2:\n,", b"5:a@b.c,"]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    parts=st.lists(st.one_of(st.sampled_from(NS_PIECES), st.binary(max_size=8)), max_size=30),
    cut=st.integers(min_value=1, max_value=20),
)
def test_random_qmqp_and_qmtp_input_never_crashes(parts, cut) -> None:  # type: ignore[no-untyped-def]
    from pyqmail.smtp.qmqpd import QmqpReceiver, Request
    from pyqmail.smtp.qmtpd import Envelope, QmtpReceiver

    data = b"".join(parts)
    qmqp, qmtp = QmqpReceiver(limit=10_000), QmtpReceiver(limit=10_000)
    for i in range(0, len(data), cut):
        for ev in qmqp.feed(data[i : i + cut]):
            if isinstance(ev, Request) and not ev.bad:
                assert all(b"\0" not in r for r in (ev.sender, *ev.recipients))
        for ev in qmtp.feed(data[i : i + cut]):
            if isinstance(ev, Envelope):
                assert all(r is None or len(r) < 1000 for r in ev.recipients)
    qmqp.eof()
