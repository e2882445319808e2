"""smtp/clientauth.py and the AUTH step of smtp/client.py's ClientSession (sans-IO)."""

from __future__ import annotations

import base64

import pytest

from pyqmail.smtp.client import ClientSession, Done, Reply, ReplyParser, Send, StartTls, TlsMode
from pyqmail.smtp.clientauth import ClientAuth, Credentials, auth_mechanisms

CREDS = Credentials(b"u@example.org", b"pa:ss word")
PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0u@example.org\0pa:ss word") + b"\r\n"


def R(wire: bytes) -> Reply:
    (r,) = ReplyParser().feed(wire)
    return r


@pytest.mark.parametrize(
    ("ehlo", "mechs"),
    [
        (b"250-x\r\n250 AUTH PLAIN LOGIN\r\n", {b"PLAIN", b"LOGIN"}),
        (b"250-x\r\n250-AUTH=LOGIN\r\n250 auth cram-md5 plain\r\n",
         {b"LOGIN", b"CRAM-MD5", b"PLAIN"}),
        (b"250-x\r\n250 AUTHX PLAIN\r\n", set()),
        (b"250 AUTH PLAIN\r\n", set()),  # the first line is the greeting name
    ],
)  # fmt: skip
def test_auth_mechanisms(ehlo: bytes, mechs: set[bytes]) -> None:
    assert auth_mechanisms(R(ehlo).text) == mechs


def test_plain_is_preferred_and_login_is_the_fallback() -> None:
    a = ClientAuth(CREDS)
    assert a.start(frozenset({b"LOGIN", b"PLAIN"})) == PLAIN
    a = ClientAuth(CREDS)
    assert a.start(frozenset({b"LOGIN", b"CRAM-MD5"})) == b"AUTH LOGIN\r\n"
    assert a.answer() == base64.b64encode(b"u@example.org") + b"\r\n"
    assert a.answer() == base64.b64encode(b"pa:ss word") + b"\r\n"
    assert a.answer() == b"*\r\n"  # asked once too often: cancel
    assert ClientAuth(CREDS).start(frozenset({b"CRAM-MD5"})) is None


def test_the_password_is_in_no_repr_and_scrubbed_from_replies() -> None:
    a = ClientAuth(CREDS)
    assert b"pa:ss" not in repr(CREDS).encode() and "pa:ss" not in repr(a)
    echoed = b"535 bad: " + PLAIN + b" or pa:ss word or " + base64.b64encode(b"pa:ss word")
    clean = a.scrub(echoed)
    assert b"pa:ss word" not in clean and base64.b64encode(b"pa:ss word") not in clean
    assert clean.count(b"[hidden]") == 3


def session(**kw: object) -> ClientSession:
    return ClientSession(
        "192.0.2.1", b"helo.example", b"a@b.example", [b"r@c.example"],
        tls=TlsMode.REQUIRED, tls_required_for="relay.example (credentials are never sent "
        "in clear)", auth=ClientAuth(CREDS), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def to_auth(s: ClientSession) -> list[object]:
    s.reply(R(b"220 x\r\n"))
    assert s.reply(R(b"250-x\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n")) == [Send(b"STARTTLS\r\n")]
    assert s.reply(R(b"220 go\r\n")) == [StartTls(verify=True)]
    assert s.tls_done(True) == [Send(b"EHLO helo.example\r\n")]
    return list(s.reply(R(b"250-x\r\n250 AUTH PLAIN LOGIN\r\n")))


def test_auth_after_tls_then_mail() -> None:
    s = session()
    assert to_auth(s) == [Send(PLAIN)]
    assert s.reply(R(b"235 ok\r\n")) == [Send(b"MAIL FROM:<a@b.example>\r\n")]


def test_auth_offered_in_clear_but_no_starttls_sends_nothing() -> None:
    s = session()
    s.reply(R(b"220 x\r\n"))
    (act,) = s.reply(R(b"250-x\r\n250 AUTH PLAIN LOGIN\r\n"))
    assert isinstance(act, Done) and act.result.message[0] == "Z"
    assert b"does not offer STARTTLS" in act.result.message[1]


def test_auth_is_never_sent_without_tls_whatever_the_mode() -> None:
    s = session()
    s.tls = TlsMode.OFF  # a misconfigured driver
    s.reply(R(b"220 x\r\n"))
    (act,) = s.reply(R(b"250-x\r\n250 AUTH PLAIN\r\n"))
    assert isinstance(act, Done) and b"TLS is not active" in act.result.message[1]


@pytest.mark.parametrize("code", [b"535 5.7.8 no", b"454 4.7.0 try later", b"504 unknown"])
def test_every_auth_refusal_is_temporary(code: bytes) -> None:
    s = session()
    to_auth(s)
    (act,) = s.reply(R(code + b"\r\n"))
    assert isinstance(act, Done)
    letter, text = act.result.message
    assert letter == "Z" and b"authentication as u@example.org failed. (#4.7.8)" in text
    assert b"Remote host said: " + code in text


def test_no_usable_mechanism_is_temporary() -> None:
    s = session()
    s.reply(R(b"220 x\r\n"))
    s.reply(R(b"250-x\r\n250 STARTTLS\r\n"))
    s.reply(R(b"220 go\r\n"))
    s.tls_done(True)
    (act,) = s.reply(R(b"250-x\r\n250 AUTH CRAM-MD5 GSSAPI\r\n"))
    assert isinstance(act, Done) and act.result.message[0] == "Z"
    assert b"offered: CRAM-MD5 GSSAPI" in act.result.message[1]


def test_endless_challenges_end() -> None:
    s = session()
    to_auth(s)
    sent = [s.reply(R(b"334 \r\n")) for _ in range(4)]
    assert sent[0] == [Send(PLAIN[len(b"AUTH PLAIN ") :])] and sent[1] == [Send(b"*\r\n")]
    (act,) = s.reply(R(b"334 \r\n"))
    assert isinstance(act, Done) and act.result.message[0] == "Z"


def test_implicit_tls_goes_straight_to_auth() -> None:
    s = session(implicit_tls=True)
    assert s.reply(R(b"220 x\r\n")) == [Send(b"EHLO helo.example\r\n")]
    assert s.reply(R(b"250-x\r\n250 AUTH LOGIN\r\n")) == [Send(b"AUTH LOGIN\r\n")]
