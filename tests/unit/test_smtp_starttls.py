"""STARTTLS in the sans-IO SMTP core (RFC 3207): the offer, the refusals, the fresh start
after the handshake, and the STARTTLS command injection class (CVE-2011-0411)."""

from __future__ import annotations

import pytest

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.smtp import replies
from pyqmail.smtp.protocol import (
    Door,
    Event,
    SmtpServerConnection,
    StartTls,
    State,
    TlsOffer,
)
from pyqmail.smtp.session import Session, TlsInfo, protocol_word
from tests.conftest import write_control
from tests.unit.test_smtp_support import Driver

INFO = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
EHLO_PLAIN = (
    b"250-mx.test.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE\r\n"
)
EHLO_TLS = (
    b"250-mx.test.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-STARTTLS\r\n"
    b"250 SIZE\r\n"
)


class TlsDriver(Driver):
    """The test driver, plus StartTls: it must be the last event of its list."""

    tls_requests: int = 0

    def handle(self, events: list[Event]) -> None:
        if events and isinstance(events[-1], StartTls):
            assert not any(isinstance(e, StartTls) for e in events[:-1])
            self.tls_requests += 1
            events = events[:-1]
        assert not any(isinstance(e, StartTls) for e in events), "StartTls not last"
        super().handle(events)

    def handshake(self) -> bytes:
        before = len(self.out)
        assert self.conn.state is State.WAIT_TLS
        self.handle(self.conn.tls_started(INFO))
        return self.out[before:]


@pytest.fixture(autouse=True)
def _rcpthosts(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")


def make(
    home: Home, offer: TlsOffer = TlsOffer.ON, door: Door = Door.SMTP, auth: bool = False
) -> TlsDriver:
    session = Session(load(home), {"TCPREMOTEIP": "192.0.2.7"}, clock=lambda: 811486014.0)
    return TlsDriver(SmtpServerConnection(session, tls=offer, door=door, auth=auth))


def started(home: Home, piece: int = 0) -> TlsDriver:
    d = make(home).greet()
    assert d.feed(b"EHLO c.example\r\n", piece) == EHLO_TLS
    assert d.feed(b"STARTTLS\r\n", piece) == replies.TLS_GO
    assert d.tls_requests == 1
    return d


@pytest.mark.parametrize(
    ("offer", "advertised"),
    [(TlsOffer.ON, EHLO_TLS), (TlsOffer.OFF, EHLO_PLAIN), (TlsOffer.UNAVAILABLE, EHLO_PLAIN)],
)
def test_ehlo_advertises_starttls_only_when_a_certificate_works(
    home: Home, offer: TlsOffer, advertised: bytes
) -> None:
    d = make(home, offer).greet()
    assert d.feed(b"EHLO c.example\r\n") == advertised
    assert d.feed(b"HELO c.example\r\n") == b"250 mx.test.example\r\n"


@pytest.mark.parametrize("piece", [1, 0])
def test_after_the_handshake_the_session_starts_over(home: Home, piece: int) -> None:
    d = started(home, piece)
    assert d.handshake() == b""  # the client speaks first inside TLS
    assert d.conn.tls == INFO
    # no envelope and no HELO survive; EHLO inside TLS does not offer STARTTLS again
    assert d.feed(b"RCPT TO:<x@test.example>\r\n", piece) == replies.MAIL_FIRST
    assert d.feed(b"EHLO c.example\r\n", piece) == EHLO_PLAIN
    out = d.feed(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nhi\r\n.\r\n", piece
    )
    assert out.startswith(b"250 ok\r\n250 ok\r\n354 go ahead\r\n250 ok")
    received = d.messages[0].received
    assert b" by unknown with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384); 19 Sep 1995" in received
    assert b"(HELO c.example)" in received


def test_a_session_without_tls_keeps_qmails_received_line(home: Home) -> None:
    d = make(home).greet()
    d.feed(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n")
    d.feed(b"DATA\r\nhi\r\n.\r\n")
    assert d.messages[0].received.endswith(b" by unknown with SMTP; 19 Sep 1995 04:46:54 -0000\n")


# Bytes a client (or an attacker on the path) sends in the same write as STARTTLS. None of
# them may be answered in clear text or run inside TLS.
INJECTIONS = {
    "rset": b"RSET\r\n",
    "mail": b"MAIL FROM:<evil@attacker.example>\r\n",
    "transaction": b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
    b"Subject: injected\r\n\r\nbody\r\n.\r\n",
    "quit": b"QUIT\r\n",
    "helo": b"HELO evil.example\r\n",
    "second starttls": b"STARTTLS\r\n",
    "partial line": b"MAIL FROM:<evil@attacker.ex",
    "bare lf commands": b"RSET\nMAIL FROM:<evil@attacker.example>\n",
    "client hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32,
    "nul and junk": b"\x00\xff\r\nNOOP\r\n",
    "long line": b"A" * 70000 + b"\r\n",
}


@pytest.mark.parametrize("piece", [1, 7, 0])
@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_nothing_pipelined_behind_starttls_runs(home: Home, name: str, piece: int) -> None:
    d = make(home).greet()
    d.feed(b"EHLO c.example\r\n")
    out = d.feed(b"STARTTLS\r\n" + INJECTIONS[name], piece)
    assert out == replies.TLS_GO  # nothing answered in clear text after the 220
    assert d.tls_requests == 1
    assert not d.closed
    # an adapter that (wrongly) kept feeding while the handshake runs is ignored too
    assert d.feed(b"RSET\r\n") == b""
    assert d.handshake() == b""  # and nothing is answered once TLS is up
    assert d.feed(b"NOOP\r\n") == replies.OK
    assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.MAIL_FIRST
    assert d.messages == [] and d.current is None


# (offer, what comes before, the STARTTLS line, the reply); after each refusal the session
# goes on in clear text and what was pipelined behind the refused STARTTLS is dropped.
REFUSALS = [
    ("not configured", TlsOffer.OFF, b"", b"STARTTLS", replies.UNIMPLEMENTED),
    ("argument", TlsOffer.ON, b"", b"STARTTLS now", replies.TLS_SYNTAX),
    ("trailing space", TlsOffer.ON, b"", b"STARTTLS ", replies.TLS_SYNTAX),
    (
        "in transaction",
        TlsOffer.ON,
        b"MAIL FROM:<a@b.example>\r\n",
        b"STARTTLS",
        replies.TLS_IN_MAIL,
    ),
    (
        "after rcpt",
        TlsOffer.ON,
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n",
        b"STARTTLS",
        replies.TLS_IN_MAIL,
    ),
    ("bad certificate", TlsOffer.UNAVAILABLE, b"", b"STARTTLS", replies.TLS_UNAVAILABLE),
]


@pytest.mark.parametrize(("name", "offer", "before", "line", "reply"), REFUSALS)
def test_refused_starttls(
    home: Home, name: str, offer: TlsOffer, before: bytes, line: bytes, reply: bytes
) -> None:
    d = make(home, offer).greet()
    d.feed(b"EHLO c.example\r\n" + before)
    assert d.feed(line + b"\r\nRSET\r\n") == reply
    assert d.tls_requests == 0 and d.conn.tls is None and not d.closed
    assert d.feed(b"NOOP\r\n") == replies.OK


def test_starttls_inside_tls_is_refused_and_the_rest_dropped(home: Home) -> None:
    d = started(home)
    d.handshake()
    d.feed(b"EHLO c.example\r\n")
    assert d.feed(b"STARTTLS\r\nRSET\r\n") == replies.TLS_ACTIVE
    assert d.tls_requests == 1
    assert d.feed(b"NOOP\r\n") == replies.OK


def test_lower_case_starttls_is_the_same_command(home: Home) -> None:
    d = make(home).greet()
    assert d.feed(b"ehlo c\r\nstarttls\r\n").endswith(replies.TLS_GO)
    assert d.tls_requests == 1


def test_repeated_refusals_count_as_errors(home: Home) -> None:
    d = make(home).greet()
    for _ in range(19):
        assert d.feed(b"STARTTLS x\r\n") == replies.TLS_SYNTAX
    assert d.feed(b"STARTTLS x\r\n") == replies.TLS_SYNTAX + replies.TOO_MANY_ERRORS
    assert d.closed


@pytest.mark.parametrize(
    ("call", "want"),
    [("timeout", replies.TIMEOUT), ("eof", b""), ("fail", replies.TEMP_ERROR)],
)
def test_the_wait_for_the_handshake_ends_cleanly(home: Home, call: str, want: bytes) -> None:
    d = started(home)
    before = len(d.out)
    if call == "timeout":
        d.handle(d.conn.timeout())
    elif call == "eof":
        d.handle(d.conn.receive_data(b""))
    else:
        d.handle(d.conn.fail())
    assert d.out[before:] == want and d.closed
    assert d.conn.tls_started(INFO) == [] and d.conn.tls is None


def test_tls_started_out_of_turn_does_nothing(home: Home) -> None:
    d = make(home).greet()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.conn.tls_started(INFO) == []
    assert d.conn.tls is None
    assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.OK  # the envelope is intact


def test_implicit_tls_records_the_handshake_before_the_greeting(home: Home) -> None:
    d = make(home, TlsOffer.OFF, Door.SMTPS, auth=True)
    d.passwords = {b"u": b"p"}
    assert d.conn.tls_started(INFO) == []
    d.greet()
    assert d.out == b"220 mx.test.example ESMTP\r\n"
    assert d.feed(b"EHLO c.example\r\n") == EHLO_PLAIN.replace(
        b"250 SIZE", b"250-AUTH PLAIN LOGIN\r\n250 SIZE"
    )
    assert d.feed(b"STARTTLS\r\n") == replies.TLS_ACTIVE
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == replies.AUTH_REQUIRED  # submission
    assert d.feed(b"AUTH PLAIN AHUAcA==\r\n") == replies.AUTH_OK
    d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nhi\r\n.\r\n")
    assert b" with ESMTPSA (TLSv1.3 TLS_AES_256_GCM_SHA384); " in d.messages[0].received
    assert d.conn.door is Door.SMTPS


@pytest.mark.parametrize(
    ("tls", "auth", "word"),
    [(False, False, b"SMTP"), (True, False, b"ESMTPS"), (False, True, b"ESMTPA"),
     (True, True, b"ESMTPSA")],
)  # fmt: skip
def test_protocol_word_rfc3848(tls: bool, auth: bool, word: bytes) -> None:
    assert protocol_word(tls=tls, auth=auth) == word


def test_tls_comment_keeps_cipher_names_and_nothing_else() -> None:
    assert TlsInfo("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384").comment() == (
        b"(TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384)"
    )
    assert TlsInfo("TLS 1)\n", "x;y").comment() == b"(TLS?1?? x?y)"
