"""SMTPUTF8 (RFC 6531): UTF-8 addresses only when MAIL asked for them, in the server
(protocol.py, address.py) and the client of remote delivery (client.py)."""

from __future__ import annotations

import pytest

from pyqmail.home import Home
from pyqmail.smtp import replies
from pyqmail.smtp.address import MailParams, parse_mail_params
from pyqmail.smtp.client import ClientSession, Send, TlsMode, quote_address
from tests.conftest import write_control
from tests.unit.test_smtp_client import R, done, session
from tests.unit.test_smtp_support import make

JOERG = "jörg@b.example".encode()
ZOE = "zoë@test.example".encode()


@pytest.fixture(autouse=True)
def _rcpthosts(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")


def test_ehlo_offers_smtputf8(home: Home) -> None:
    d = make(home).greet()
    assert b"250-SMTPUTF8\r\n" in d.feed(b"EHLO x\r\n")


def test_utf8_addresses_with_the_parameter_reach_the_queue(home: Home) -> None:
    d = make(home).greet()
    out = d.feed(b"MAIL FROM:<" + JOERG + b"> SMTPUTF8\r\nRCPT TO:<" + ZOE + b">\r\n"
                 b"DATA\r\nSubject: hi\r\n\r\nx\r\n.\r\n")  # fmt: skip
    assert out.startswith(b"250 ok\r\n250 ok\r\n354 ")
    assert d.messages[0].sender == JOERG and d.messages[0].recipients == (ZOE,)


@pytest.mark.parametrize(
    ("script", "reply"),
    [
        (b"MAIL FROM:<" + JOERG + b">\r\n", replies.EIGHTBIT_ADDRESS),
        (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<" + ZOE + b">\r\n", replies.EIGHTBIT_ADDRESS),
        (b"MAIL FROM:<a\xff@b.example> SMTPUTF8\r\n", replies.SYNTAX),  # not UTF-8
        (b"MAIL FROM:<a@b.example> SMTPUTF8=yes\r\n", replies.BAD_PARAM),
    ],
)
def test_8bit_stays_refused_without_the_parameter(home: Home, script: bytes, reply: bytes) -> None:
    d = make(home).greet()
    assert d.feed(script).endswith(reply)


def test_the_parameter_holds_for_one_transaction(home: Home) -> None:
    d = make(home).greet()
    d.feed(b"MAIL FROM:<a@b.example> SMTPUTF8\r\nRSET\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"RCPT TO:<" + ZOE + b">\r\n") == replies.EIGHTBIT_ADDRESS


def test_mail_params() -> None:
    assert parse_mail_params(b"SMTPUTF8 BODY=8BITMIME", 0) == MailParams(None, b"8BITMIME", True)
    assert parse_mail_params(b"SMTPUTF8 smtputf8", 0) == replies.BAD_PARAM


def utf8_session() -> ClientSession:
    s = ClientSession("192.0.2.1", b"helo.example", JOERG, [ZOE], tls=TlsMode.OFF)
    s.reply(R(b"220 hi\r\n"))
    return s


def test_the_client_says_smtputf8_when_the_envelope_needs_it() -> None:
    assert quote_address(ZOE, utf8=True) == ZOE  # UTF-8 is atom text (RFC 6531)
    assert quote_address(ZOE) == '"zoë"@test.example'.encode()  # qmail's quote2
    s = utf8_session()
    assert s.reply(R(b"250-x\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")) == [
        Send(b"MAIL FROM:<" + JOERG + b"> SMTPUTF8\r\nRCPT TO:<" + ZOE + b">\r\nDATA\r\n")
    ]


def test_a_next_hop_without_smtputf8_bounces_the_message() -> None:
    s = utf8_session()
    res = done(s.reply(R(b"250-x\r\n250 8BITMIME\r\n"))).result
    assert res.message[0] == "D" and b"SMTPUTF8" in res.message[1]
    assert b"#5.6.7" in res.message[1]


def test_ascii_envelopes_go_as_before() -> None:
    s = session(1)
    s.reply(R(b"220 hi\r\n"))
    assert s.reply(R(b"250-x\r\n250 SMTPUTF8\r\n")) == [Send(b"MAIL FROM:<a@b.example>\r\n")]


def test_local_return_path_keeps_utf8_and_quotes_other_8bit() -> None:
    from pyqmail.local.qlocal import quote_address as local_quote

    assert local_quote(JOERG) == JOERG  # RFC 6532: UTF-8 is atom text
    assert local_quote(b"j\xf6rg@b.example") == b'"j\xf6rg"@b.example'  # Latin-1: qmail's quote
