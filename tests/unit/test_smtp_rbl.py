"""smtp/rbl.py's pure parts, and the conversation a listed client gets (protocol.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.smtp import replies
from pyqmail.smtp.greylist import Greylist
from pyqmail.smtp.protocol import SmtpServerConnection
from pyqmail.smtp.rbl import Block, from_env, query_name
from pyqmail.smtp.session import Session
from tests.conftest import write_control
from tests.unit.test_smtp_support import Driver


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, True),
        ({"RBLSMTPD": ""}, False),
        ({"RBLSMTPD": "Slow down"}, Block("Slow down")),
        ({"RBLSMTPD": "-Go away"}, Block("Go away", permanent=True)),
        ({"RELAYCLIENT": ""}, False),
        ({"RELAYCLIENT": "", "RBLSMTPD": "-No"}, Block("No", permanent=True)),
    ],
)
def test_the_environment_decides_first(env: dict[str, str], want: Block | bool) -> None:
    assert from_env(env) == want


def test_reply_is_rblsmtpds() -> None:
    assert Block("listed in bl.test").reply() == b"451 listed in bl.test\r\n"
    assert Block("Go away", permanent=True).reply() == b"553 Go away\r\n"
    assert Block("a\r\nRCPT\x00\xe9").reply() == b"451 a??RCPT??\r\n"
    assert Block("x" * 300).reply() == b"451 " + b"x" * 200 + b"\r\n"


def test_query_names() -> None:
    assert query_name("192.0.2.7", "bl.test") == "7.2.0.192.bl.test."
    assert query_name("::ffff:192.0.2.7", "bl.test") == "7.2.0.192.bl.test."
    name = query_name("2001:db8::1", "bl.test")
    assert name == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test."
    assert query_name("unknown", "bl.test") is None


def test_rbllist_lines(home: Home) -> None:
    write_control(home, "rbllist", "# lists\nBL.test.:Blocked %IP%\nzen.example\n:nothing\n")
    assert load(home).rbllist == (("bl.test", "Blocked %IP%"), ("zen.example", None))


def blocked(home: Home, refusal: bytes) -> Driver:
    session = Session(load(home), {"TCPREMOTEIP": "192.0.2.7"})
    conn = SmtpServerConnection(session)
    conn.block(refusal)
    return Driver(conn).greet()


def test_a_listed_client_gets_rblsmtpds_conversation(home: Home) -> None:
    d = blocked(home, b"451 listed in bl.test\r\n")
    assert d.out == b"220 rblsmtpd.local\r\n"
    out = d.feed(
        b"EHLO x\r\nHELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n"
        b"NOOP\r\nRSET\r\nDATA\r\nSubject: hi\r\n.\r\nQUIT\r\n",
        1,
    )
    assert out == (
        b"250 rblsmtpd.local\r\n" * 3
        + b"451 listed in bl.test\r\n"
        + b"250 rblsmtpd.local\r\n" * 2
        + b"451 listed in bl.test\r\n" * 3  # DATA and its lines: nothing is ever queued
        + b"221 rblsmtpd.local\r\n"
    )
    assert d.closed and not d.messages


def test_a_listed_client_is_dropped_at_the_timeout(home: Home) -> None:
    d = blocked(home, b"553 Go away\r\n")
    before = d.out
    d.handle(d.conn.timeout())
    assert d.closed and d.out == before  # rblsmtpd's alarm: no 451 timeout line


def greylisted(home: Home, tmp_path: Path, env: dict[str, str]) -> Driver:
    write_control(home, "rcpthosts", "test.example\n")
    grey = Greylist(tmp_path / "grey.sqlite", 300)
    session = Session(load(home), env)
    return Driver(SmtpServerConnection(session, greylist=grey)).greet()


def test_greylisting_at_rcpt(home: Home, tmp_path: Path) -> None:
    d = greylisted(home, tmp_path, {"TCPREMOTEIP": "192.0.2.7"})
    out = d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert out == b"250 ok\r\n" + replies.GREYLISTED + b"503 RCPT first (#5.5.1)\r\n"
    assert replies.GREYLISTED.startswith(b"451 4.7.1 ")
    # a refused relay is refused as before: greylisting comes after the relay check
    out = d.feed(b"RCPT TO:<x@elsewhere.example>\r\n")
    assert out == replies.NOT_RCPTHOSTS


def test_greylisting_does_not_count_as_errors(home: Home, tmp_path: Path) -> None:
    d = greylisted(home, tmp_path, {"TCPREMOTEIP": "192.0.2.7"})
    rcpts = b"".join(b"RCPT TO:<u%d@test.example>\r\n" % i for i in range(30))
    out = d.feed(b"MAIL FROM:<a@b.example>\r\n" + rcpts)
    assert out.count(replies.GREYLISTED) == 30 and not d.closed


def test_relay_clients_are_not_greylisted(home: Home, tmp_path: Path) -> None:
    d = greylisted(home, tmp_path, {"TCPREMOTEIP": "192.0.2.7", "RELAYCLIENT": ""})
    out = d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n")
    assert out == b"250 ok\r\n250 ok\r\n"
