"""The SMTP state machine, fed transcripts without sockets (often one byte at a time)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail import cdb
from pyqmail.home import Home
from pyqmail.mailbox import Refusal
from pyqmail.smtp import replies
from pyqmail.smtp.protocol import (
    Close,
    Event,
    Limits,
    MailCheck,
    MessageEnd,
    MessageStart,
    Send,
    SmtpServerConnection,
    State,
)
from tests.conftest import write_control
from tests.unit.test_smtp_support import ACCEPT, Driver, make

_NOT_MAILBOX_RCPT = replies.bad_mailbox(Refusal.SYNTAX, sender=False)
_NOT_MAILBOX_MAIL = replies.bad_mailbox(Refusal.SYNTAX, sender=True)

PIECES = [1, 3, 0]  # one byte at a time, small pieces, the whole transcript at once

GREET = b"220 mx.test.example ESMTP\r\n"


@pytest.fixture(autouse=True)
def _rcpthosts(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")


def session(home: Home, **kw: object) -> Driver:
    return make(home, **kw).greet()  # type: ignore[arg-type]


def send_mail(d: Driver, body: bytes, rcpt: bytes = b"x@test.example", piece: int = 0) -> bytes:
    return d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n" + body, piece)


# ----------------------------------------------------------------- qmail's replies


@pytest.mark.parametrize("piece", PIECES)
def test_every_plain_command_reply_is_qmails(home: Home, piece: int) -> None:
    d = make(home)
    assert d.greet().out == GREET
    out = d.feed(
        b"HELO x\r\nEHLO y\r\nNOOP\r\nVRFY joe\r\nHELP\r\nRSET\r\nEXPN x\r\nSTARTTLSX\r\n"
        b"\r\nQUIT\r\n",
        piece,
    )
    assert out == (
        b"250 mx.test.example\r\n"
        b"250-mx.test.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE\r\n"
        b"250 ok\r\n"
        b"252 send some mail, i'll try my best\r\n"
        b"214 notqmail home page: https://notqmail.org\r\n"
        b"250 flushed\r\n"
        b"502 unimplemented (#5.5.1)\r\n"
        b"502 unimplemented (#5.5.1)\r\n"
        b"502 unimplemented (#5.5.1)\r\n"
        b"221 mx.test.example\r\n"
    )
    assert d.closed


def test_smtpgreeting_with_trailing_text_and_size(home: Home) -> None:
    write_control(home, "smtpgreeting", "mx.test.example NO UCE\n")
    write_control(home, "databytes", "20000\n")
    d = session(home)
    assert d.out == b"220 mx.test.example NO UCE ESMTP\r\n"
    assert d.feed(b"EHLO me\r\n") == (
        b"250-mx.test.example NO UCE\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        b"250 SIZE 20000\r\n"
    )


def test_commands_are_case_insensitive_and_bare_lf_ends_a_command(home: Home) -> None:
    d = session(home)
    assert d.feed(b"hElO x\nnoop\n") == b"250 mx.test.example\r\n250 ok\r\n"


@pytest.mark.parametrize("piece", PIECES)
def test_a_whole_transaction(home: Home, piece: int) -> None:
    d = session(home, env={"TCPREMOTEIP": "192.0.2.7", "TCPREMOTEHOST": "relay.example"})
    out = d.feed(
        b"HELO other.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n"
        b"RCPT TO:<y@test.example>\r\nDATA\r\n"
        b"Subject: s\r\n\r\nline\r\n..dot\r\n.x\r\n\r\n.\r\nQUIT\r\n",
        piece,
    )
    assert out == (
        b"250 mx.test.example\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
        + ACCEPT
        + b"221 mx.test.example\r\n"
    )
    (m,) = d.messages
    assert m.sender == b"a@b.example"
    assert m.recipients == (b"x@test.example", b"y@test.example")
    assert m.body == b"Subject: s\n\nline\n.dot\nx\n\n"
    assert m.received == (
        b"Received: from relay.example (HELO other.example) (192.0.2.7)\n"
        b"  by unknown with SMTP; 19 Sep 1995 04:46:54 -0000\n"
    )


def test_empty_message_right_after_354(home: Home) -> None:
    d = session(home)
    assert send_mail(d, b".\r\n").endswith(b"354 go ahead\r\n" + ACCEPT)
    assert d.messages[0].body == b""


def test_mail_state_is_cleared_after_data_rset_and_helo(home: Home) -> None:
    d = session(home)
    send_mail(d, b"x\r\n.\r\n")
    assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.MAIL_FIRST
    assert d.feed(b"MAIL FROM:<a@b>\r\nRSET\r\nRCPT TO:<x@test.example>\r\n").endswith(
        replies.MAIL_FIRST
    )
    assert d.feed(b"MAIL FROM:<a@b>\r\nHELO x\r\nDATA\r\n").endswith(replies.MAIL_FIRST)


def test_data_needs_mail_and_rcpt(home: Home) -> None:
    d = session(home)
    assert d.feed(b"DATA\r\n") == replies.MAIL_FIRST
    assert d.feed(b"MAIL FROM:<a@b>\r\n") == replies.OK
    assert d.feed(b"DATA\r\n") == replies.RCPT_FIRST


@pytest.mark.parametrize(
    ("received_env", "helo", "expect"),
    [
        ({}, None, b"Received: from unknown (192.0.2.7)\n  by unknown with SMTP;"),
        ({"TCPREMOTEHOST": "h.example"}, b"H.EXAMPLE", b"Received: from h.example (192.0.2.7)\n"),
        ({}, b"", b"Received: from unknown (HELO ) (192.0.2.7)\n"),
        (
            {"TCPREMOTEINFO": "joe", "TCPLOCALIP": "10.0.0.1"},
            b"a b<c>[d]",
            b"Received: from unknown (HELO a?b?c?[d]) (joe@192.0.2.7)\n  by 10.0.0.1 with SMTP;",
        ),
        ({"TCPLOCALHOST": "mx.here", "TCPLOCALIP": "10.0.0.1"}, None, b"  by mx.here with SMTP;"),
    ],
)
def test_received_line(
    home: Home, received_env: dict[str, str], helo: bytes | None, expect: bytes
) -> None:
    d = session(home, env={"TCPREMOTEIP": "192.0.2.7", **received_env})
    if helo is not None:
        d.feed(b"HELO " + helo + b"\r\n")
    send_mail(d, b".\r\n")
    assert expect in d.messages[0].received
    assert d.messages[0].received.endswith(b"; 19 Sep 1995 04:46:54 -0000\n")


# ----------------------------------------------------------------- relay control


def test_rcpthosts_exact_and_suffix(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n.sub.test.example\n")
    d = session(home)
    d.feed(b"MAIL FROM:<a@b>\r\n")
    assert d.feed(b"RCPT TO:<x@TEST.example>\r\n") == replies.OK
    assert d.feed(b"RCPT TO:<x@a.sub.test.example>\r\n") == replies.OK
    assert d.feed(b"RCPT TO:<x@sub.test.example>\r\n") == replies.NOT_RCPTHOSTS
    assert d.feed(b"RCPT TO:<x@elsewhere.example>\r\n") == replies.NOT_RCPTHOSTS
    assert d.feed(b"RCPT TO:<x%elsewhere.example@test.example>\r\n") == replies.OK
    assert d.feed(b"RCPT TO:<elsewhere.example!x@test.example>\r\n") == replies.OK
    # two @ signs: not an RFC 5321 mailbox (qmail took the last @ and refused the relay)
    assert d.feed(b"RCPT TO:<x@test.example@elsewhere.example>\r\n") == _NOT_MAILBOX_RCPT
    assert d.feed(b"RCPT TO:<postmaster>\r\n") == replies.OK


def test_no_rcpthosts_is_an_open_relay_as_in_qmail(home: Home) -> None:
    (home.control / "rcpthosts").unlink(missing_ok=True)
    d = session(home)
    d.feed(b"MAIL FROM:<a@b>\r\n")
    assert d.feed(b"RCPT TO:<x@anywhere.example>\r\n") == replies.OK


def test_morercpthosts_cdb(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    with cdb.Writer(home.control / "morercpthosts.cdb") as w:
        w.add(b"more.example", b"")
        w.add(b".wild.example", b"")
    with cdb.Reader.open(home.control / "morercpthosts.cdb") as r:
        d = session(home, morercpthosts=r)
        d.feed(b"MAIL FROM:<a@b>\r\n")
        assert d.feed(b"RCPT TO:<x@more.example>\r\n") == replies.OK
        assert d.feed(b"RCPT TO:<x@a.wild.example>\r\n") == replies.OK
        assert d.feed(b"RCPT TO:<x@less.example>\r\n") == replies.NOT_RCPTHOSTS


def test_relayclient_skips_rcpthosts_and_is_appended(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    d = session(home, env={"RELAYCLIENT": ""})
    send_mail(d, b".\r\n", rcpt=b"victim@elsewhere.example")
    assert d.messages[0].recipients == (b"victim@elsewhere.example",)
    d = session(home, env={"RELAYCLIENT": "@fixme.example"})
    send_mail(d, b".\r\n", rcpt=b"joe")
    assert d.messages[0].recipients == (b"joe@fixme.example",)


def test_badmailfrom_address_and_domain_refused_at_each_rcpt(home: Home) -> None:
    write_control(home, "badmailfrom", "spammer@evil.example\n@worse.example\n")
    d = session(home, env={"RELAYCLIENT": ""})
    for sender in (b"Spammer@EVIL.example", b"any@worse.example"):
        assert d.feed(b"MAIL FROM:<" + sender + b">\r\n") == replies.OK
        assert d.feed(b"RCPT TO:<a@test.example>\r\nRCPT TO:<b@test.example>\r\n") == (
            replies.BMF * 2
        )
    assert d.feed(b"MAIL FROM:<ok@evil.example>\r\nRCPT TO:<a@test.example>\r\n") == (
        replies.OK * 2
    )


@pytest.mark.parametrize(
    ("literal", "rewritten"),
    [
        (b"[127.0.0.1]", True),
        (b"[127.000.000.001]", True),
        (b"[0.0.0.0]", True),
        (b"[IPv6:::1]", True),
        (b"[192.0.2.99]", False),
        (b"[IPv6:2001:db8::1]", False),
    ],
)
def test_localiphost_for_our_ip_literals(home: Home, literal: bytes, rewritten: bool) -> None:
    write_control(home, "localiphost", "local.test.example\n")
    ips = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})
    d = session(home, local_ips=ips, env={"RELAYCLIENT": ""})
    send_mail(d, b".\r\n", rcpt=b"joe@" + literal)
    expect = b"joe@local.test.example" if rewritten else b"joe@" + literal
    assert d.messages[0].recipients == (expect,)


# ----------------------------------------------------------------- addresses and parameters


@pytest.mark.parametrize(
    ("arg", "address"),
    [
        (b"FROM:<a@b>", b"a@b"),
        (b"from:a@b", b"a@b"),
        (b"FROM: <a@b>", b"a@b"),
        (b"FROM:<@r1,@r2:u@c>", b"u@c"),
        (b'FROM:<"a b"@c>', b"a b@c"),
        (b'FROM:<"a>b"@c>', b"a>b@c"),
        (b'FROM:<"a\\"b"@c>', b'a"b@c'),
        (b'FROM:"a b"@c', b"a b@c"),
        (b"FROM:<>", b""),
        (b"<a@b>", b"a@b"),
    ],
)
def test_mail_paths_as_qmail_parses_them(home: Home, arg: bytes, address: bytes) -> None:
    d = session(home)
    assert d.feed(b"MAIL " + arg + b"\r\nRCPT TO:<x@test.example>\r\nDATA\r\n.\r\n").startswith(
        b"250 ok\r\n"
    )
    assert d.messages[0].sender == address


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a\x00x@b.example>", replies.BAD_BYTES),
        (b"MAIL FROM:<a\rx@b.example>", replies.BAD_BYTES),
        (b"MAIL FROM:<a\x7fx@b.example>", replies.BAD_BYTES),
        (b"MAIL FROM:<a\tx@b.example>", replies.BAD_BYTES),
        (b"MAIL FROM:<a@b.example> SIZE=1\x00", replies.BAD_BYTES),
        ("MAIL FROM:<jörg@b.example>".encode(), replies.EIGHTBIT_ADDRESS),
        (b"MAIL FROM:<a\xff@b.example>", replies.EIGHTBIT_ADDRESS),
        (b"MAIL FROM:<a@b.example> SIZE=abc", replies.BAD_SIZE),
        (b"MAIL FROM:<a@b.example> SIZE=", replies.BAD_SIZE),
        (b"MAIL FROM:<a@b.example> SIZE=" + b"9" * 21, replies.BAD_SIZE),
        (b"MAIL FROM:<a@b.example> SIZE=-1", replies.BAD_SIZE),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME", replies.BINARYMIME),
        (b"MAIL FROM:<a@b.example> BODY=UTF8", replies.BAD_PARAM),
        (b"MAIL FROM:<a@b.example> SMTPUTF8", replies.OK),  # offered (RFC 6531)
        (b"MAIL FROM:<a@b.example> AUTH=<>", replies.BAD_PARAM),
        (b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2", replies.BAD_PARAM),
        (b"MAIL FROM:<a@b.example> =x", replies.BAD_PARAM),
        (b"MAIL FROM:<" + b"a" * 480 + b"@b.example>", replies.OK),
    ],
)
def test_strict_mail_arguments(home: Home, line: bytes, reply: bytes) -> None:
    d = session(home)
    assert d.feed(line + b"\r\n") == reply
    if reply != replies.OK:  # the transaction did not start
        assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.MAIL_FIRST


def test_good_mail_parameters(home: Home) -> None:
    write_control(home, "databytes", "1000\n")
    d = session(home)
    assert d.feed(b"MAIL FROM:<a@b> size=1000 body=8bitmime\r\n") == replies.OK
    assert d.feed(b"MAIL FROM:<a@b> BODY=7BIT\r\n") == replies.OK
    assert d.feed(b"MAIL FROM:<a@b> SIZE=1001\r\n") == replies.SIZE_TOO_BIG


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<>", replies.EMPTY_RCPT),
        (b"RCPT TO:<@>", replies.bad_mailbox(Refusal.ROUTE, sender=False)),
        (b"RCPT TO:<@a.example:>", _NOT_MAILBOX_RCPT),
        (b"RCPT TO:", replies.EMPTY_RCPT),
        (b"RCPT TO:<x\x00y@test.example>", replies.BAD_BYTES),
        (b"RCPT TO:<x@test.example>\x00RCPT TO:<evil@else>", replies.BAD_BYTES),
        (b"RCPT TO:<x\xc3\xa9@test.example>", replies.EIGHTBIT_ADDRESS),
        (b"RCPT TO:<x@test.example> NOTIFY=NEVER", replies.BAD_PARAM),
        (b"RCPT TO:<x@test.example> ORCPT=rfc822;x@y", replies.BAD_PARAM),
    ],
)
def test_strict_rcpt_arguments(home: Home, line: bytes, reply: bytes) -> None:
    d = session(home)
    d.feed(b"MAIL FROM:<a@b>\r\n")
    assert d.feed(line + b"\r\n") == reply
    assert d.feed(b"DATA\r\n") == replies.RCPT_FIRST


# The sender of the published Shellshock exploit against qmail, exactly as it sends it.
SHELLSHOCK = b"() { :; }; /bin/touch /tmp/x"


@pytest.mark.parametrize(
    ("path", "reply"),
    [
        (SHELLSHOCK, _NOT_MAILBOX_MAIL),
        (SHELLSHOCK + b"@example.test", _NOT_MAILBOX_MAIL),
        (b'"' + SHELLSHOCK + b'"@example.test', replies.FUNCTION_DEFINITION),
        (b'"x\\(\\) \\{ :;}; id"@example.test', replies.FUNCTION_DEFINITION),
        (b'"me-(){ :;}; id"@example.test', replies.FUNCTION_DEFINITION),
        (b"john doe@example.test", _NOT_MAILBOX_MAIL),
        (b"a;b@example.test", _NOT_MAILBOX_MAIL),
        (b"a(b@example.test", _NOT_MAILBOX_MAIL),
        (b"a)b@example.test", _NOT_MAILBOX_MAIL),
        (b"a,b@example.test", _NOT_MAILBOX_MAIL),
        (b"a:b@example.test", _NOT_MAILBOX_MAIL),
        (b'"john@example.test', _NOT_MAILBOX_MAIL),
        (b"a\\>b@example.test", _NOT_MAILBOX_MAIL),
        (b"a@b@example.test", _NOT_MAILBOX_MAIL),
        (b"a@example.test.", _NOT_MAILBOX_MAIL),
        (b"a@exa_mple.test", _NOT_MAILBOX_MAIL),
        (b"a@[300.0.0.1]", _NOT_MAILBOX_MAIL),
        (b"a@[IPv6:fe80::1%25eth0]", _NOT_MAILBOX_MAIL),
        (b"a@[x-tag:anything]", _NOT_MAILBOX_MAIL),
        (b'""@example.test', replies.bad_mailbox(Refusal.EMPTY_LOCAL, sender=True)),
        (b"me", replies.bad_mailbox(Refusal.NO_DOMAIN, sender=True)),
        (b"postmaster", replies.bad_mailbox(Refusal.NO_DOMAIN, sender=True)),
        (b"a@" + b"b." * 127 + b"cc", replies.bad_mailbox(Refusal.DOMAIN_TOO_LONG, sender=True)),
        (b"@a,b:u@example.test", replies.bad_mailbox(Refusal.ROUTE, sender=True)),
        (b"a@b.example", replies.OK),
        (b'"john doe"@example.test', replies.OK),
        (b"{|}~!#$%&'*+-/=?^_`@example.test", replies.OK),
        (b"a@[192.0.2.1]", replies.OK),
        (b"a@[IPv6:2001:db8::1]", replies.OK),
        (b"@r1.example,@r2.example:u@example.test", replies.OK),
        (b"x" * 65 + b"@example.test", replies.OK),  # longer than RFC's 64, like VERP/SRS
        (b"", replies.OK),
    ],
)
def test_mail_needs_an_rfc5321_mailbox(home: Home, path: bytes, reply: bytes) -> None:
    d = session(home)
    assert d.feed(b"MAIL FROM:<" + path + b">\r\n") == reply
    if reply != replies.OK:
        assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.MAIL_FIRST


@pytest.mark.parametrize(
    ("path", "reply"),
    [
        (b"a;b@test.example", _NOT_MAILBOX_RCPT),
        (SHELLSHOCK + b"@test.example", _NOT_MAILBOX_RCPT),
        (b'"' + SHELLSHOCK + b'"@test.example', replies.FUNCTION_DEFINITION),
        (b"me-() { :;}; id@test.example", _NOT_MAILBOX_RCPT),
        (b"joe", replies.bad_mailbox(Refusal.NO_DOMAIN, sender=False)),
        (b"postmaster", replies.OK),
        (b"PostMaster", replies.OK),
        (b"postmaster@test.example", replies.OK),
        (b'"john doe"@test.example', replies.OK),
        (b"@r.example:x@test.example", replies.OK),
    ],
)
def test_rcpt_needs_an_rfc5321_mailbox(home: Home, path: bytes, reply: bytes) -> None:
    d = session(home)
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"RCPT TO:<" + path + b">\r\n") == reply


def test_what_a_good_quoted_path_queues(home: Home) -> None:
    d = session(home)
    send_mail(d, b".\r\n", rcpt=b'"john doe"@test.example')
    assert d.messages[0].recipients == (b"john doe@test.example",)


def test_relayclient_completes_a_bare_recipient(home: Home) -> None:
    d = session(home, env={"RELAYCLIENT": "@fixme.example"})
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"RCPT TO:<joe>\r\n") == replies.OK
    assert d.feed(b"RCPT TO:<a;b>\r\n") == _NOT_MAILBOX_RCPT
    d = session(home, env={"RELAYCLIENT": ""})
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"RCPT TO:<joe>\r\n") == replies.bad_mailbox(Refusal.NO_DOMAIN, sender=False)


def test_an_unclosed_bracket_is_refused(home: Home) -> None:
    d = session(home)
    assert d.feed(b"MAIL FROM:<a@b.example\r\n") == _NOT_MAILBOX_MAIL


def test_address_of_899_passes_900_is_a_syntax_error(home: Home) -> None:
    d = session(home, limits=Limits(max_command=2000))
    assert d.feed(b"MAIL FROM:<" + b"a" * 889 + b"@b.example>\r\n") == replies.OK
    assert d.feed(b"MAIL FROM:<" + b"a" * 890 + b"@b.example>\r\n") == replies.SYNTAX
    # qmail's limit is on the address as stored: quotes and a source route do not count
    assert d.feed(b'MAIL FROM:<@r.example:"' + b"a" * 889 + b'"@b.example>\r\n') == replies.OK


# ----------------------------------------------------------------- DATA


@pytest.mark.parametrize("piece", PIECES)
def test_bare_lf_in_data_is_451_and_close(home: Home, piece: int) -> None:
    d = session(home)
    out = send_mail(d, b"Subject: x\r\n\r\nline with bare\nlf\r\n.\r\nQUIT\r\n", piece=piece)
    assert out.endswith(b"354 go ahead\r\n" + replies.BARE_LF)
    assert d.closed and not d.messages and d.aborted


@pytest.mark.parametrize("piece", PIECES)
def test_bare_cr_in_data_is_451_and_close(home: Home, piece: int) -> None:
    d = session(home)
    out = send_mail(d, b"Subject: x\r\n\r\nX\r.\r\nmore\r\n.\r\n", piece=piece)
    assert out.endswith(replies.BARE_CR)
    assert d.closed and not d.messages


SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\n.\r",
    b"\r.\n",
    b"\r\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
]


@pytest.mark.parametrize("seq", SMUGGLING)
@pytest.mark.parametrize("piece", PIECES)
def test_smuggling_never_ends_a_message_nor_injects_one(home: Home, seq: bytes, piece: int) -> None:
    d = session(home)
    smuggled = (
        b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<smuggled@test.example>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nbad\r\n.\r\n"
    )
    out = send_mail(d, b"Subject: outer\r\n\r\nhello" + seq + smuggled, piece=piece)
    assert out.count(b"354") == 1
    assert b"smuggled" not in b"".join(r for m in d.messages for r in m.recipients)
    if d.messages:  # the NUL case is plain data: one message, holding the text
        (m,) = d.messages
        assert m.recipients == (b"x@test.example",)
        assert b"MAIL FROM:<evil" in m.body
    else:
        assert d.closed and out.endswith((replies.BARE_LF, replies.BARE_CR))


def test_text_line_over_1000_fails_the_message_only(home: Home) -> None:
    d = session(home)
    out = send_mail(d, b"a" * 1000 + b"\r\n.\r\n")
    assert out.endswith(ACCEPT)
    out = send_mail(d, b"ok\r\n" + b"b" * 5000 + b"\r\n.\r\nNOOP\r\n", piece=7)
    assert out.endswith(replies.TEXT_TOO_LONG + replies.OK)
    assert len(d.messages) == 1 and not d.closed


def test_a_long_line_is_never_held_whole(home: Home) -> None:
    d = session(home)
    send_mail(d, b"x\r\n")
    for _ in range(200):
        d.feed(b"y" * 10000)
        assert len(d.conn._decoder._buf) <= 1002  # type: ignore[union-attr]
    # the tail of the long line starting with ".\r\n" is not an end of data
    out = d.feed(b".\r\nstill data\r\n.\r\n")
    assert out == replies.TEXT_TOO_LONG and not d.messages


def test_databytes_552_after_the_data(home: Home) -> None:
    write_control(home, "databytes", "100\n")
    d = session(home)
    out = send_mail(d, b"x" * 99 + b"\r\n.\r\nNOOP\r\n")  # 100 stored bytes with the LF
    assert out.endswith(ACCEPT + replies.OK)
    out = send_mail(d, b"x" * 100 + b"\r\n.\r\nNOOP\r\n")
    assert out.endswith(replies.TOO_BIG + replies.OK)
    assert len(d.messages) == 1


def test_databytes_env_overrides_the_control_file(home: Home) -> None:
    write_control(home, "databytes", "100\n")
    d = session(home, env={"DATABYTES": "10"})
    assert d.feed(b"EHLO x\r\n").endswith(b"250 SIZE 10\r\n")
    assert send_mail(d, b"x" * 20 + b"\r\n.\r\n").endswith(replies.TOO_BIG)


@pytest.mark.parametrize(("hops", "ok"), [(99, True), (100, False)])
def test_hop_count(home: Home, hops: int, ok: bool) -> None:
    d = session(home)
    header = b"".join(
        (b"Received: x\r\n" if i % 2 else b"DELIVERED-TO: y\r\n") for i in range(hops)
    )
    out = send_mail(d, header + b"\r\nReceived: in the body\r\n.\r\n", piece=0)
    assert out.endswith(ACCEPT if ok else replies.TOO_MANY_HOPS)
    assert len(d.messages) == (1 if ok else 0)


def test_eof_inside_data_queues_nothing(home: Home) -> None:
    d = session(home)
    send_mail(d, b"Subject: x\r\n\r\nhalf a mess")
    d.feed(b"")
    assert d.closed and not d.messages and d.aborted == ["connection closed in DATA"]


def test_queue_start_failure_is_451_qqt(home: Home) -> None:
    d = session(home)
    d.start_ok = False
    out = send_mail(d, b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert out.endswith(replies.QQT_FAILURE)
    assert not d.messages and not d.closed


def test_queue_failure_reply_is_passed_on(home: Home) -> None:
    d = session(home)
    d.reply = b"451 qq write error or disk full (#4.3.0)\r\n"
    assert send_mail(d, b"x\r\n.\r\nNOOP\r\n").endswith(d.reply + replies.OK)


# ----------------------------------------------------------------- the strict rules


def test_command_line_over_512_is_500_and_discarded(home: Home) -> None:
    d = session(home)
    assert d.feed(b"NOOP " + b"x" * 507 + b"\r\n") == replies.OK  # 512 octets
    assert d.feed(b"NOOP " + b"x" * 508 + b"\r\n") == replies.LINE_TOO_LONG
    out = d.feed(b"MAIL FROM:<" + b"a" * 5000 + b"@b.example>\r\nNOOP\r\n", piece=100)
    assert out == replies.LINE_TOO_LONG + replies.OK
    assert len(d.conn._buf) == 0


def test_a_client_that_never_sends_a_newline_is_cut_off(home: Home) -> None:
    d = session(home)
    for _ in range(100):
        d.feed(b"x" * 1000)
        assert len(d.conn._buf) <= 1000
        if d.closed:
            break
    assert d.closed
    assert d.out.endswith(replies.LINE_TOO_LONG + replies.LONG_LINE_CLOSE)


@pytest.mark.parametrize(
    "first", [b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"CONNECT a:25 HTTP/1.1", b"HEAD / HTTP/1.0"]
)
def test_http_verbs_are_refused_and_closed(home: Home, first: bytes) -> None:
    d = session(home)
    out = d.feed(first + b"\r\nHost: x\r\n\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\n")
    assert out == replies.NOT_SMTP and d.closed


def test_tls_client_hello_is_refused_and_closed(home: Home) -> None:
    d = session(home)
    assert d.feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") == replies.TLS_HELLO
    assert d.closed


def test_bdat_closes_and_its_payload_never_runs(home: Home) -> None:
    d = session(home)
    out = d.feed(
        b"MAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nBDAT 60 LAST\r\n"
        b"MAIL FROM:<e@x>\r\nRCPT TO:<y@test.example>\r\nDATA\r\n"
    )
    assert out == replies.OK * 2 + replies.NO_CHUNKING and d.closed


def test_auth_is_refused_and_its_payload_discarded(home: Home) -> None:
    d = session(home)
    out = d.feed(b"AUTH LOGIN\r\nTUFJTCBGUk9NOjxhQGI+\r\nMAIL FROM:<a@b>\r\n")
    assert out == replies.NO_AUTH
    assert d.feed(b"NOOP\r\n") == replies.OK


def test_starttls_not_offered_discards_what_follows(home: Home) -> None:
    d = session(home)
    assert d.feed(b"STARTTLS\r\nMAIL FROM:<a@b>\r\n") == replies.UNIMPLEMENTED
    assert d.feed(b"RCPT TO:<x@test.example>\r\n") == replies.MAIL_FIRST


def test_nothing_after_quit_runs(home: Home) -> None:
    d = session(home)
    out = d.feed(b"QUIT\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nx\r\n.\r\n")
    assert out == b"221 mx.test.example\r\n" and d.closed and not d.messages
    assert d.conn.receive_data(b"NOOP\r\n") == []


def test_after_a_refused_data_the_same_write_is_discarded(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    d = session(home)
    out = d.feed(
        b"MAIL FROM:<a@b>\r\nRCPT TO:<v@elsewhere.example>\r\nDATA\r\n"
        b"MAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nSubject: stuffed\r\n\r\n.\r\n"
    )
    assert out == replies.OK + replies.NOT_RCPTHOSTS + replies.RCPT_FIRST
    assert not d.messages and d.conn.state is State.COMMAND


def test_pipelined_commands_are_answered_in_order(home: Home) -> None:
    d = session(home)
    batch = b"".join(
        b"MAIL FROM:<s%d@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nmsg %d\r\n.\r\n" % (i, i)
        for i in range(5)
    )
    out = d.feed(batch + b"RSET\r\nNOOP\r\n")
    assert out == (replies.OK * 2 + replies.GO_AHEAD + ACCEPT) * 5 + replies.FLUSHED + replies.OK
    assert [m.body for m in d.messages] == [b"msg %d\n" % i for i in range(5)]


def test_more_than_100_recipients_get_452(home: Home) -> None:
    d = session(home)
    d.feed(b"MAIL FROM:<a@b>\r\n")
    out = d.feed(b"".join(b"RCPT TO:<r%d@test.example>\r\n" % i for i in range(10000)))
    assert out == replies.OK * 100 + replies.TOO_MANY_RCPTS * 9900
    assert not d.closed
    d.feed(b"DATA\r\nx\r\n.\r\n")
    assert len(d.messages[0].recipients) == 100


def test_twenty_errors_close_the_session(home: Home) -> None:
    d = session(home)
    out = d.feed(b"FOO\r\n" * 30)
    assert out == replies.UNIMPLEMENTED * 20 + replies.TOO_MANY_ERRORS
    assert d.closed


def test_early_talker_is_refused(home: Home) -> None:
    d = make(home)
    d.handle(d.conn.receive_data(b"EHLO x\r\n"))
    assert d.out == replies.EARLY_TALKER and d.closed
    assert d.conn.greet() == []


def test_timeout_is_451_and_close_and_drops_the_message(home: Home) -> None:
    d = session(home)
    send_mail(d, b"Subject: x\r\n")
    d.handle(d.conn.timeout())
    assert d.out.endswith(replies.TIMEOUT) and d.closed and d.aborted == ["timeout"]
    assert not d.messages


def test_unexpected_local_error_is_a_temporary_451(home: Home) -> None:
    d = session(home)
    send_mail(d, b"Subject: x\r\n")
    d.handle(d.conn.fail())
    assert d.out.endswith(replies.TEMP_ERROR) and d.closed and not d.messages


def test_partial_line_is_reported(home: Home) -> None:
    d = session(home)
    d.feed(b"NO")
    assert d.conn.partial
    d.feed(b"OP\r\n")
    assert not d.conn.partial


def test_input_is_held_while_the_queue_commits(home: Home) -> None:
    d = session(home)
    events = d.conn.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    ev = events[-1]
    d.handle(events[:-1])
    from pyqmail.smtp.protocol import DataChunk, MessageEnd, MessageStart, Send

    assert isinstance(ev, MessageStart)
    assert d.conn.receive_data(b"Subject: x\r\n") == []  # held until the queue answered
    out = d.conn.start_result(True)
    assert out == [Send(replies.GO_AHEAD), DataChunk(b"Subject: x\n")]
    out = d.conn.receive_data(b".\r\nNOOP\r\n")
    assert isinstance(out[-1], MessageEnd)
    assert d.conn.receive_data(b"NOOP\r\n") == []
    assert not d.conn.wants_input or d.conn.state is State.WAIT_END
    assert d.conn.message_result(ACCEPT) == [Send(ACCEPT), Send(replies.OK), Send(replies.OK)]


# ----------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_arbitrary_input_never_raises_and_never_queues_without_crlf_dot_crlf(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, piece: int
) -> None:
    home = _shared_home(tmp_path_factory)
    d = session(home)
    d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    d.feed(data, piece)
    if d.messages:
        assert b"\r\n.\r\n" in b"\r\n" + data
    assert all(line[:1] in b"2345" for line in d.lines())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=20
    ),
    st.integers(min_value=1, max_value=64),
)
def test_any_clean_body_round_trips(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], piece: int
) -> None:
    home = _shared_home(tmp_path_factory)
    d = session(home)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    out = send_mail(d, wire + b".\r\nNOOP\r\n", piece=piece)
    assert out.endswith(ACCEPT + replies.OK)
    assert d.messages[0].body == b"".join(line + b"\n" for line in lines)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"HELO x",
                b"EHLO y",
                b"MAIL FROM:<a@b>",
                b"RCPT TO:<c@t>",
                b"RSET",
                b"NOOP",
                b"VRFY z",
                b"DATA",
                b"FOO",
                b"",
                b"HELP",
                b"MAIL",
                b"RCPT TO:<>",
            ]
        ),
        max_size=30,
    )
)
def test_command_sequences_get_one_reply_each(
    tmp_path_factory: pytest.TempPathFactory, cmds: list[bytes]
) -> None:
    home = _shared_home(tmp_path_factory)
    d = session(home, limits=Limits(max_errors=1000))
    for c in cmds:
        before = len(d.out)
        d.feed(c + b"\r\n")
        if c == b"DATA" and d.out.endswith(replies.GO_AHEAD):
            d.feed(b".\r\n")
        reply = d.out[before:]
        assert reply.count(b"\r\n") >= 1
        assert reply[:1] in b"2345"


_HOMES: dict[str, Home] = {}


def _shared_home(factory: pytest.TempPathFactory) -> Home:
    from pyqmail.layout import create_home

    if "h" not in _HOMES:
        h = Home(factory.mktemp("smtp") / "qmail", single_user=True)
        create_home(h, "mx.test.example", None)
        write_control(h, "rcpthosts", "test.example\nt\n")
        _HOMES["h"] = h
    return _HOMES["h"]


# ----------------------------------------------------------------- the MAIL hook (checks)


def _hooked(home: Home) -> SmtpServerConnection:
    d = make(home)
    conn = SmtpServerConnection(d.conn.session, mail_hook=True)
    conn.greet()
    return conn


def _sent(events: list[Event]) -> bytes:
    return b"".join(ev.data for ev in events if isinstance(ev, Send))


@pytest.mark.parametrize("piece", [1, 0])
def test_mail_hook_holds_pipelined_commands_until_the_result(home: Home, piece: int) -> None:
    conn = _hooked(home)
    data = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n"
    events: list[Event] = []
    for i in range(0, len(data), piece or len(data)):
        events += conn.receive_data(data[i : i + (piece or len(data))])
    assert isinstance(events[-1], MailCheck)
    assert events[-1] == MailCheck(b"a@b.example", b"client.example")
    assert _sent(events).endswith(b"250 SIZE\r\n")  # the EHLO lines only
    assert conn.state is State.WAIT_MAIL and conn.wants_input
    assert conn.receive_data(b"DATA\r\n") == []  # held
    after = conn.mail_result(None)
    assert next(e for e in after if isinstance(e, MessageStart)).sender == b"a@b.example"
    assert _sent(after) == b"250 ok\r\n250 ok\r\n"  # MAIL, RCPT; DATA opens the queue
    assert _sent(conn.start_result(True)).startswith(b"354 ")


def test_mail_hook_refusal_ends_the_transaction(home: Home) -> None:
    conn = _hooked(home)
    events = conn.receive_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n")
    assert isinstance(events[-1], MailCheck)
    refusal = b"550 5.7.23 SPF validation failed\r\n"
    after = conn.mail_result(refusal)
    assert _sent(after) == refusal + replies.MAIL_FIRST
    assert conn.state is State.COMMAND
    assert conn.mail_result(None) == []  # no check is waiting: ignored


def test_mail_hook_eof_and_timeout_while_waiting(home: Home) -> None:
    conn = _hooked(home)
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    assert conn.timeout()[-1] == Close()
    conn = _hooked(home)
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    assert conn.receive_data(b"") == [Close()]
    assert conn.mail_result(None) == []


def test_mail_hook_not_used_for_a_bad_address(home: Home) -> None:
    conn = _hooked(home)
    events = conn.receive_data(b"MAIL FROM:<a b>\r\n")
    assert not any(isinstance(e, MailCheck) for e in events)
    assert _sent(events) == _NOT_MAILBOX_MAIL


# ----------------------------------------------------------------- shutdown (SIGTERM)

BYE = replies.SHUTTING_DOWN


def test_shutdown_of_an_idle_session_is_421_and_close(home: Home) -> None:
    d = session(home)
    d.feed(b"EHLO x\r\n")
    d.handle(d.conn.shutdown())
    assert d.out.endswith(BYE) and d.closed
    assert d.conn.shutdown() == []  # once


def test_shutdown_in_data_lets_the_message_finish_then_421(home: Home) -> None:
    d = session(home)
    send_mail(d, b"Subject: s\r\n\r\nline one\r\n")
    d.handle(d.conn.shutdown())
    assert not d.closed and d.out.endswith(b"354 go ahead\r\n")
    out = d.feed(b"line two\r\n.\r\n")
    assert out == ACCEPT + BYE
    assert d.closed
    assert d.messages[0].body == b"Subject: s\n\nline one\nline two\n"


def test_shutdown_in_data_a_quit_behind_the_dot_gets_221(home: Home) -> None:
    d = session(home)
    send_mail(d, b"x\r\n")
    d.handle(d.conn.shutdown())
    out = d.feed(b".\r\nQUIT\r\n")  # pipelined: read with the dot
    assert out == ACCEPT + b"221 mx.test.example\r\n" and d.closed
    d = session(home)
    send_mail(d, b"x\r\n")
    d.handle(d.conn.shutdown())
    out = d.feed(b".\r\nQUIT\r\n", 1)  # not yet there when the 250 goes out: no wait
    assert out == ACCEPT + BYE and d.closed


def test_shutdown_in_data_a_new_transaction_behind_the_dot_gets_421(home: Home) -> None:
    d = session(home)
    send_mail(d, b"x\r\n")
    d.handle(d.conn.shutdown())
    out = d.feed(b".\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n")
    assert out == ACCEPT + BYE and d.closed
    assert len(d.messages) == 1


def test_shutdown_while_the_queue_commits_answers_the_message_first(home: Home) -> None:
    d = session(home)
    events = d.conn.receive_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    d.handle(events)
    events = d.conn.receive_data(b"body\r\n.\r\n")
    assert isinstance(events[-1], MessageEnd)  # not answered yet: the queue is committing
    d.handle(events[:-1])
    assert d.conn.state is State.WAIT_END
    assert d.conn.shutdown() == []
    d.handle(d.conn.message_result(ACCEPT))
    assert d.out.endswith(ACCEPT + BYE) and d.closed


def test_shutdown_of_a_message_that_fails_in_data_is_its_reply_then_421(home: Home) -> None:
    write_control(home, "databytes", "10\n")
    d = session(home)
    send_mail(d, b"x\r\n")
    d.handle(d.conn.shutdown())
    out = d.feed(b"far more than ten bytes\r\n.\r\n")
    assert out == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n" + BYE
    assert d.closed and not d.messages


def test_shutdown_before_the_greeting_is_a_421_greeting(home: Home) -> None:
    d = make(home)
    d.handle(d.conn.shutdown())
    assert d.out == BYE and d.closed


def test_shutdown_during_a_recipient_check_answers_421(home: Home) -> None:
    d = make(home, check_rcpt=True).greet()
    d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n")
    assert d.conn.state is State.WAIT_RCPT
    d.handle(d.conn.shutdown())
    assert d.out.endswith(b"250 ok\r\n" + BYE) and d.closed
    assert d.conn.rcpt_result(None) == []  # the check's late answer goes nowhere
