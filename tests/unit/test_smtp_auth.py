"""AUTH in the sans-IO SMTP core (RFC 4954, PLAIN RFC 4616, LOGIN): where it is offered,
the exchange, the table of malformed and hostile inputs (each with its reply, no crash),
the failures record's delay and lock-out, and what a success changes (relay, ESMTPSA,
greylisting, the submission doors' MAIL)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.smtp import replies
from pyqmail.smtp.authlimit import AuthPolicy, MemoryFailures
from pyqmail.smtp.protocol import (
    CheckPassword,
    Door,
    Limits,
    Pause,
    Send,
    SmtpServerConnection,
    State,
    TlsOffer,
)
from pyqmail.smtp.session import Session, TlsInfo
from tests.conftest import write_control
from tests.unit.test_smtp_support import Driver

INFO = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
USER, PASSWORD = b"alice", b"s3cret pass"
PLAIN = base64.b64encode(b"\0alice\0s3cret pass")


@pytest.fixture(autouse=True)
def _rcpthosts(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    home: Home,
    *,
    door: Door = Door.SMTP,
    tls: bool = True,
    auth: bool = True,
    failures: MemoryFailures | None = None,
    ip: str = "192.0.2.7",
    env: dict[str, str] | None = None,
) -> Driver:
    environ = {"TCPREMOTEIP": ip, **(env or {})}
    session = Session(load(home), environ, clock=lambda: 811486014.0)
    conn = SmtpServerConnection(
        session, Limits(), tls=TlsOffer.ON, door=door, auth=auth, auth_failures=failures
    )
    if tls:
        conn.tls_started(INFO)
    d = Driver(conn, passwords={USER: PASSWORD})
    d.greet()
    d.feed(b"EHLO c.example\r\n")
    return d


def test_ehlo_offers_auth_only_inside_tls_and_only_with_a_password_source(home: Home) -> None:
    assert b"250-AUTH PLAIN LOGIN\r\n" in make(home).out
    assert b"AUTH" not in make(home, tls=False).out
    assert b"AUTH" not in make(home, auth=False).out
    d = make(home)
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.AUTH_OK
    assert b"AUTH" not in d.feed(b"EHLO c.example\r\n")  # one success per session


def test_auth_outside_tls_is_538_and_without_a_source_503(home: Home) -> None:
    assert make(home, tls=False).feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.AUTH_NEEDS_TLS
    assert make(home, auth=False).feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.NO_AUTH


@pytest.mark.parametrize("piece", [0, 1, 7])
def test_plain_initial_response_login_and_plain_after_334(home: Home, piece: int) -> None:
    d = make(home)
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n", piece) == replies.AUTH_OK
    assert d.conn.user == USER and d.conn.session.relayclient == b""
    d = make(home)
    assert d.feed(b"AUTH PLAIN\r\n", piece) == replies.AUTH_PLAIN_GO
    assert d.feed(PLAIN + b"\r\n", piece) == replies.AUTH_OK
    d = make(home)
    assert d.feed(b"auth login\r\n", piece) == replies.AUTH_USER
    assert d.feed(base64.b64encode(USER) + b"\r\n", piece) == replies.AUTH_PASSWORD
    assert d.feed(base64.b64encode(PASSWORD) + b"\r\n", piece) == replies.AUTH_OK
    d = make(home)
    assert d.feed(b"AUTH LOGIN " + base64.b64encode(USER) + b"\r\n") == replies.AUTH_PASSWORD
    assert d.feed(base64.b64encode(PASSWORD) + b"\r\n") == replies.AUTH_OK
    assert [n.result for n in d.notes] == ["ok"] and d.notes[0].user == USER
    assert d.checked[0].mechanism == "LOGIN"
    assert b"s3cret" not in repr(d.checked[0]).encode()  # never in a repr (logs)


def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


# (what, lines, the last reply, was a password checked)
HOSTILE = [
    ("wrong password", [b"AUTH PLAIN " + _b64(b"\0alice\0nope")], replies.AUTH_FAILED, True),
    ("unknown user", [b"AUTH PLAIN " + _b64(b"\0mallory\0x")], replies.AUTH_FAILED, True),
    ("bad base64 on the line", [b"AUTH PLAIN !!!not-base64!!!"], replies.AUTH_BASE64, False),
    ("bad base64 after 334", [b"AUTH PLAIN", b"%%%"], replies.AUTH_BASE64, False),
    ("base64 with bad padding", [b"AUTH PLAIN YWJj="], replies.AUTH_BASE64, False),
    ("PLAIN with two fields", [b"AUTH PLAIN " + _b64(b"alice\0x")], replies.AUTH_BASE64, False),
    ("PLAIN with four", [b"AUTH PLAIN " + _b64(b"\0a\0b\0c")], replies.AUTH_BASE64, False),
    ("authorize as another", [b"AUTH PLAIN " + _b64(b"root\0alice\0x")], replies.AUTH_AUTHZ,
     False),
    ("empty password", [b"AUTH PLAIN " + _b64(b"\0alice\0")], replies.AUTH_FAILED, False),
    ("empty user", [b"AUTH PLAIN " + _b64(b"\0\0pw")], replies.AUTH_FAILED, False),
    ("user with a newline", [b"AUTH PLAIN " + _b64(b"\0al\nice\0pw")], replies.AUTH_FAILED,
     False),
    ("LOGIN user with NUL", [b"AUTH LOGIN " + _b64(b"a\0b"), _b64(b"pw")], replies.AUTH_FAILED,
     False),
    ("password with NUL", [b"AUTH LOGIN " + _b64(b"alice"), _b64(b"p\0w")], replies.AUTH_FAILED,
     False),
    ("huge password", [b"AUTH PLAIN " + _b64(b"\0alice\0" + b"x" * 2000)], replies.AUTH_FAILED,
     False),
    ("= is the empty response", [b"AUTH PLAIN", b"="], replies.AUTH_BASE64, False),
    ("* cancels PLAIN", [b"AUTH PLAIN", b"*"], replies.AUTH_CANCELLED, False),
    ("* cancels LOGIN user", [b"AUTH LOGIN", b"*"], replies.AUTH_CANCELLED, False),
    ("* cancels LOGIN password", [b"AUTH LOGIN", _b64(b"alice"), b"*"], replies.AUTH_CANCELLED,
     False),
    ("unknown mechanism", [b"AUTH CRAM-MD5"], replies.AUTH_MECHANISM, False),
    ("no mechanism", [b"AUTH"], replies.AUTH_SYNTAX, False),
    ("three words", [b"AUTH PLAIN abc def"], replies.AUTH_SYNTAX, False),
    ("oversized line", [b"AUTH PLAIN " + _b64(b"\0alice\0" + b"x" * 30000)],
     replies.LINE_TOO_LONG, False),
    ("oversized response", [b"AUTH PLAIN", b"A" * 13000], replies.LINE_TOO_LONG, False),
    ("control bytes", [b"AUTH PLAIN \x01"], replies.BAD_BYTES, False),
]  # fmt: skip


@pytest.mark.parametrize(("what", "lines", "last", "checked"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_auth_input_gets_its_reply_and_the_session_goes_on(
    home: Home, what: str, lines: list[bytes], last: bytes, checked: bool
) -> None:
    d = make(home)
    out = b""
    for line in lines:
        out = d.feed(line + b"\r\n")
    assert out == last, what
    assert bool(d.checked) is checked
    assert d.conn.user is None and d.conn.session.relayclient is None
    assert d.conn.state is State.COMMAND
    assert d.feed(b"NOOP\r\n") == replies.OK
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.AUTH_OK  # a retry works


def test_oversized_response_without_a_newline_is_discarded(home: Home) -> None:
    d = make(home)
    assert d.feed(b"AUTH PLAIN\r\n") == replies.AUTH_PLAIN_GO
    assert d.feed(b"A" * 20000) == replies.LINE_TOO_LONG
    assert d.feed(b"A" * 1000 + b"\r\nNOOP\r\n") == replies.OK


@pytest.mark.parametrize(
    ("before", "reply"),
    [
        (b"", replies.AUTH_EHLO_FIRST),
        (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n", replies.AUTH_IN_MAIL),
        (b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n", replies.AUTH_AGAIN),
    ],
)
def test_auth_sequence_errors(home: Home, before: bytes, reply: bytes) -> None:
    session = Session(load(home), {"TCPREMOTEIP": "192.0.2.7"})
    conn = SmtpServerConnection(session, tls=TlsOffer.ON, auth=True)
    conn.tls_started(INFO)
    d = Driver(conn, passwords={USER: PASSWORD}).greet()
    if before:
        d.feed(before)
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == reply


def test_temporary_failure_is_454(home: Home) -> None:
    d = make(home)
    d.passwords = None
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.AUTH_TEMP
    assert [n.result for n in d.notes] == ["temp"] and d.conn.user is None


def test_failures_grow_the_delay_then_421_and_close_for_the_network(home: Home) -> None:
    clock = Clock()
    fails = MemoryFailures(AuthPolicy(max_failures=3, window=100, step=1, max_delay=2),
                           clock=clock)  # fmt: skip
    bad = b"AUTH PLAIN " + _b64(b"\0mallory\0guess") + b"\r\n"
    d = make(home, failures=fails, ip="2001:db8::1")
    for _ in range(3):
        assert d.feed(bad) == replies.AUTH_FAILED
    assert d.pauses == [1, 2, 2]
    # another address of the same /64, a new connection: 421 at AUTH, then closed
    d = make(home, failures=fails, ip="2001:db8::99")
    assert d.feed(bad) == replies.AUTH_BLOCKED and d.closed
    assert [n.result for n in d.notes] == ["blocked"]
    assert make(home, failures=fails, ip="2001:db8:1::1").feed(bad) == replies.AUTH_FAILED
    clock.now += 101  # the window has passed
    d = make(home, failures=fails, ip="2001:db8::99")
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.AUTH_OK


def test_pipelined_input_waits_for_the_pause(home: Home) -> None:
    fails = MemoryFailures(AuthPolicy(step=1))
    session = Session(load(home), {"TCPREMOTEIP": "192.0.2.9"})
    conn = SmtpServerConnection(session, tls=TlsOffer.ON, auth=True, auth_failures=fails)
    conn.tls_started(INFO)
    conn.greet()
    conn.receive_data(b"EHLO c\r\n")
    events = conn.receive_data(b"AUTH PLAIN " + _b64(b"\0x\0y") + b"\r\nNOOP\r\n")
    assert isinstance(events[-1], CheckPassword)
    events = conn.auth_result(False)
    assert isinstance(events[-1], Pause) and events[-1].seconds == 1
    assert conn.receive_data(b"NOOP\r\n") == []  # held
    sends = [e.data for e in conn.pause_over() if isinstance(e, Send)]
    assert sends == [replies.AUTH_FAILED, replies.OK, replies.OK]


def test_success_makes_a_relay_client_with_esmtpsa_and_no_greylisting(home: Home) -> None:
    d = make(home)
    assert d.feed(b"MAIL FROM:<a@test.example>\r\nRCPT TO:<x@elsewhere.example>\r\n") == (
        replies.OK + replies.NOT_RCPTHOSTS
    )
    d.feed(b"RSET\r\n")
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.AUTH_OK
    d.feed(b"MAIL FROM:<a@test.example>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\nhi\r\n.\r\n")
    assert d.messages[0].recipients == (b"x@elsewhere.example",)
    assert b" with ESMTPSA (TLSv1.3 " in d.messages[0].received
    assert d.messages[0].auth == USER


def test_relayclient_suffix_is_kept(home: Home) -> None:
    d = make(home, env={"RELAYCLIENT": "@hub.example"})
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n") == replies.AUTH_OK
    assert d.conn.session.relayclient == b"@hub.example"


class _Grey:
    def __init__(self) -> None:
        self.asked = 0

    def check(self, ip: str, sender: bytes, rcpt: bytes) -> bool:
        self.asked += 1
        return False


def test_greylisting_exempts_authenticated_sessions(home: Home) -> None:
    grey = _Grey()
    session = Session(load(home), {"TCPREMOTEIP": "192.0.2.7"})
    conn = SmtpServerConnection(session, tls=TlsOffer.ON, auth=True, greylist=grey)  # type: ignore[arg-type]
    conn.tls_started(INFO)
    d = Driver(conn, passwords={USER: PASSWORD}).greet()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.GREYLISTED and grey.asked == 1
    d.feed(b"RSET\r\nAUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.OK and grey.asked == 1


@pytest.mark.parametrize("door", [Door.SUBMISSION, Door.SMTPS])
def test_submission_doors_need_auth_before_mail(home: Home, door: Door) -> None:
    d = make(home, door=door)
    assert d.feed(b"MAIL FROM:<a@test.example>\r\n") == replies.AUTH_REQUIRED
    d = make(home, door=door, tls=False)  # 587 before STARTTLS
    assert d.feed(b"MAIL FROM:<a@test.example>\r\n") == replies.AUTH_REQUIRED
    d = make(home, door=door)
    d.feed(b"AUTH PLAIN " + PLAIN + b"\r\n")
    assert d.feed(b"MAIL FROM:<a@test.example>\r\n") == replies.OK


def test_port_25_takes_mail_without_auth(home: Home) -> None:
    assert make(home).feed(b"MAIL FROM:<a@b.example>\r\n") == replies.OK


def test_mail_hook_is_skipped_once_authenticated(home: Home) -> None:
    session = Session(load(home), {"TCPREMOTEIP": "192.0.2.7"})
    conn = SmtpServerConnection(session, tls=TlsOffer.ON, auth=True, mail_hook=True)
    conn.tls_started(INFO)
    d = Driver(conn, passwords={USER: PASSWORD}).greet()
    d.feed(b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == replies.OK  # no MailCheck waited for


AUTHSENDERS = b"""# who may send as whom
alice: alice@test.example @lists.test.example <>
bob@test.example: bob@other.example
*: postmaster@test.example
"""


@pytest.mark.parametrize(
    ("user", "sender", "ok"),
    [
        (b"alice", b"alice@test.example", True),
        (b"alice", b"ALICE@Test.Example", True),
        (b"alice", b"x@lists.test.example", True),
        (b"alice", b"x@sub.lists.test.example", False),
        (b"alice", b"", True),
        (b"alice", b"bob@test.example", False),
        (b"alice", b"postmaster@test.example", True),  # the * line
        (b"bob@test.example", b"bob@other.example", True),
        (b"bob@test.example", b"bob@test.example", False),  # its own line rules
        (b"carol@test.example", b"carol@test.example", False),  # no line, but a * line
        (b"carol@test.example", b"postmaster@test.example", True),
    ],
)
def test_authsenders_patterns(user: bytes, sender: bytes, ok: bool) -> None:
    from pyqmail.smtp.authsenders import AuthSenders

    assert AuthSenders.parse(AUTHSENDERS).allowed(user, sender) is ok


def test_authsenders_without_a_star_line_a_login_address_is_its_own_sender() -> None:
    from pyqmail.smtp.authsenders import AuthSenders

    rules = AuthSenders.parse(b"alice: *\n")
    assert rules.allowed(b"alice", b"anyone@anywhere.example")
    assert rules.allowed(b"dave@test.example", b"Dave@test.example")
    assert not rules.allowed(b"dave@test.example", b"eve@test.example")
    assert not rules.allowed(b"dave", b"dave@test.example")


def test_authsenders_file_missing_is_no_limit_and_unreadable_allows_nobody(home: Home) -> None:
    import os

    from pyqmail.smtp.authsenders import AuthSendersFile

    f = AuthSendersFile(home.control / "authsenders")
    assert f.get() is None
    (home.control / "authsenders").write_bytes(b"alice: *\n")
    got = f.get()
    assert got is not None and got.allowed(b"alice", b"x@y.example")
    (home.control / "authsenders").unlink()
    os.mkdir(home.control / "authsenders")  # exists, but not a readable file
    got = f.get()
    assert got is not None and not got.allowed(b"alice", b"x@y.example")


def test_mail_from_an_address_the_user_may_not_use_is_553(home: Home) -> None:
    from pyqmail.smtp.authsenders import AuthSenders

    session = Session(load(home), {"TCPREMOTEIP": "192.0.2.7"})
    rules = AuthSenders.parse(AUTHSENDERS)
    conn = SmtpServerConnection(session, tls=TlsOffer.ON, auth=True, authsenders=rules)
    conn.tls_started(INFO)
    d = Driver(conn, passwords={USER: PASSWORD}).greet()
    assert d.feed(b"EHLO c\r\nMAIL FROM:<bob@test.example>\r\n").endswith(replies.OK)  # no AUTH
    d.feed(b"RSET\r\nAUTH PLAIN " + PLAIN + b"\r\n")
    assert d.feed(b"MAIL FROM:<bob@test.example>\r\n") == replies.AUTH_SENDER
    assert d.feed(b"MAIL FROM:<alice@test.example>\r\n") == replies.OK


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    b"AUTH PLAIN",
                    b"AUTH LOGIN",
                    b"*",
                    b"=",
                    b"AUTH",
                    b"EHLO x",
                    b"MAIL FROM:<a@b.example>",
                    b"RSET",
                    b"AUTH PLAIN " + PLAIN,
                ]
            ),
            st.binary(max_size=40).map(base64.b64encode),
            st.binary(max_size=40),
        ),
        max_size=12,
    ),
    st.integers(min_value=0, max_value=9),
)
def test_any_auth_dialogue_gets_replies_and_never_raises(
    home: Home, lines: list[bytes], piece: int
) -> None:
    fails = MemoryFailures(AuthPolicy(max_failures=3, step=0.5))
    d = make(home, failures=fails)
    d.passwords = {USER: PASSWORD}
    for line in lines:
        if d.closed:
            break
        before = len(d.out)
        d.feed(line + b"\r\n", piece)
        assert (
            len(d.out) > before
            or d.conn.state in (State.AUTH, State.CLOSED)
            or (d.conn.state is State.DATA)
        )
    for c in d.checked:  # only what a password source can be asked about
        assert c.user and c.password and b"\0" not in c.password and b"\n" not in c.user
    text = d.out
    assert PASSWORD not in text and b"Traceback" not in text
