"""Envelope attacks on the real listener: bytes that must never reach the NUL-separated
queue envelope, empty recipients, parameters, relay-control bypasses, badmailfrom evasion
(smtpd.md section 8 and "Where pyqmail is stricter than qmail"; queue.md: a NUL in a
recipient adds a recipient).

The invariant checked after every relay probe: each queued recipient is either without
``@`` or has a domain (after the last ``@``) that rcpthosts allows; the attacker never gets
a recipient elsewhere queued.
"""

from __future__ import annotations

import pytest

from pyqmail.control import domain_keys
from tests.security._support import Listener, queued

ALLOWED = {"test.example", ".sub.test.example"}


def _allowed(rcpt: bytes) -> bool:
    at = rcpt.rfind(b"@")
    if at < 0:
        return True
    return any(k in ALLOWED for k in domain_keys(rcpt[at + 1 :].decode("ascii")))


def _transaction(smtp: Listener, mail: bytes, rcpts: list[bytes]) -> list[int | None]:
    """MAIL, each RCPT, then a legitimate recipient, DATA and a message; the reply codes."""
    c = smtp.session()
    codes = [c.cmd(mail)[0]]
    for r in rcpts:
        code, text = c.cmd(r)
        assert b"Traceback" not in text
        codes.append(code)
    if codes[0] == 250:
        assert c.cmd(b"RCPT TO:<control@test.example>")[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        assert c.cmd(b"Subject: t\r\n\r\nbody\r\n.")[0] == 250
    c.cmd(b"QUIT")
    c.close()
    return codes


# ----------------------------------------------------------------- bytes in addresses

BAD_BYTES = [b"\x00", b"\r", b"\x01", b"\x1b", b"\x7f", b"\t", b"\x0b", b"\x0c"]


@pytest.mark.parametrize("bad", BAD_BYTES, ids=lambda b: f"0x{b[0]:02x}")
@pytest.mark.parametrize("where", ["local", "domain", "param"])
def test_control_byte_in_rcpt_is_refused_and_never_queued(
    smtp: Listener, bad: bytes, where: str
) -> None:
    if where == "local":
        line = b"RCPT TO:<x" + bad + b"Tvictim@elsewhere.example@test.example>"
    elif where == "domain":
        line = b"RCPT TO:<x@test.example" + bad + b"Tvictim@elsewhere.example>"
    else:
        line = b"RCPT TO:<x@test.example> NOTIFY=" + bad
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [line])
    assert codes[1] is not None and codes[1] // 100 == 5, codes
    q = queued(smtp.home)
    assert q == [(b"a@client.example", [b"control@test.example"])], q


@pytest.mark.parametrize("bad", BAD_BYTES, ids=lambda b: f"0x{b[0]:02x}")
def test_control_byte_in_mail_is_refused_and_never_queued(smtp: Listener, bad: bytes) -> None:
    for line in (
        b"MAIL FROM:<a" + bad + b"Tvictim@elsewhere.example@client.example>",
        b"MAIL FROM:<a@client.example> SIZE=10" + bad,
        b"MAIL FROM:<a@client.example> BODY=8BITMIME" + bad + b"X",
    ):
        codes = _transaction(smtp, line, [])
        assert codes[0] is not None and codes[0] // 100 == 5, (line, codes)
    assert queued(smtp.home) == []


@pytest.mark.parametrize(
    "addr",
    [b"caf\xc3\xa9@test.example", b"x@t\xc3\xa9st.example", b"\xff@test.example", b"x@\x80"],
)
def test_eight_bit_address_refused_without_smtputf8(smtp: Listener, addr: bytes) -> None:
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:<" + addr + b">"])
    assert codes[1] is not None and codes[1] // 100 == 5
    codes = _transaction(smtp, b"MAIL FROM:<" + addr + b">", [])
    assert codes[0] is not None and codes[0] // 100 == 5
    assert queued(smtp.home) == [(b"a@client.example", [b"control@test.example"])]


@pytest.mark.parametrize(
    "rcpt",
    [b"<>", b"<@>", b"<@relay.example:>", b"<@a,@b:>", b"", b'<"">', b"<@relay.example>"],
    ids=["empty", "at", "route-only", "two-routes", "nothing", "empty-quoted", "route-no-colon"],
)
def test_empty_recipients_refused(smtp: Listener, rcpt: bytes) -> None:
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:" + rcpt])
    assert codes[1] is not None and codes[1] // 100 == 5, codes
    assert queued(smtp.home) == [(b"a@client.example", [b"control@test.example"])]


@pytest.mark.parametrize(
    ("line", "family"),
    [
        (b"MAIL FROM:<a@client.example> SIZE=abc", 5),
        (b"MAIL FROM:<a@client.example> SIZE=", 5),
        (b"MAIL FROM:<a@client.example> SIZE=-1", 5),
        (b"MAIL FROM:<a@client.example> SIZE=1e9", 5),
        (b"MAIL FROM:<a@client.example> SIZE=" + b"9" * 40, 5),
        (b"MAIL FROM:<a@client.example> SIZE=999999999", 5),  # over databytes: 552
        (b"MAIL FROM:<a@client.example> SIZE=10 SIZE=20", 5),
        (b"MAIL FROM:<a@client.example> BODY=BINARYMIME", 5),
        (b"MAIL FROM:<a@client.example> SMTPUTF8=1", 5),  # SMTPUTF8 takes no value
        (b"MAIL FROM:<a@client.example> AUTH=<>", 5),
        (b"MAIL FROM:<a@client.example> X=" + b"A" * 400, 5),
        (b"MAIL FROM:<a@client.example> SIZE=100 BODY=8BITMIME", 2),
        (b"MAIL FROM:<a@client.example> SMTPUTF8", 2),  # offered (RFC 6531)
    ],
)
def test_mail_parameters(smtp: Listener, line: bytes, family: int) -> None:
    c = smtp.session(b"EHLO client.example")
    code, text = c.cmd(line)
    assert code is not None and code // 100 == family, text
    if family == 5:
        assert c.cmd(b"RCPT TO:<x@test.example>")[0] == 503  # no sender was set


def test_size_over_databytes_is_552(smtp: Listener) -> None:
    c = smtp.session(b"EHLO client.example")
    assert c.cmd(b"MAIL FROM:<a@client.example> SIZE=100001")[0] == 552


# ----------------------------------------------------------------- relay control

RELAY_PROBES = [
    b"<victim@elsewhere.example>",
    b"<victim@elsewhere.example.>",
    b"<victim@ELSEWHERE.EXAMPLE>",
    b"<victim@test.example.elsewhere.example>",
    b"<victim@nottest.example>",
    b"<victim@sub.test.example>",  # .sub.test.example covers subdomains only
    b"<victim@test.example@elsewhere.example>",
    b'<"victim@test.example"@elsewhere.example>',
    b"<victim\\@test.example@elsewhere.example>",
    b"<@test.example:victim@elsewhere.example>",
    b"<@test.example,@x.example:victim@elsewhere.example>",
    b"<victim@elsewhere.example%test.example>",
    b"<test.example!victim@elsewhere.example>",
    b"<victim@[192.0.2.1]>",
    b"<victim@[IPv6:2001:db8::1]>",
    b"<victim@[test.example]>",
    b"<victim@elsewhere.example >",
    b"victim@elsewhere.example",
    b" <victim@elsewhere.example>",
    b"<victim@elsewhere.example> <x@test.example>",
    b"<victim@elsewhere.example>x@test.example",
]

# Accepted as qmail accepts them, but each stays on a domain we serve (local delivery
# decides later; percenthack is empty, so no % or ! address is ever routed away).
LOCAL_TRICKS = [
    b"<victim%elsewhere.example@test.example>",
    b"<elsewhere.example!victim@test.example>",
    b'<"victim@elsewhere.example"@test.example>',
    b"<victim@TEST.EXAMPLE>",
    b"<victim@a.sub.test.example>",
    b"<@elsewhere.example:victim@test.example>",
    b"<postmaster>",
    b'<"victim@elsewhere.example>"@test.example>',
]
# Accepted by qmail, not RFC 5321 mailboxes: refused at RCPT (a bare name other than
# postmaster, two @, a backslash or quotes in the middle of a dot-string).
NOT_MAILBOXES = [
    b"<victim@elsewhere.example@test.example>",
    b"<victim>",
    b'<"spam""mer"@test.example>',
    b"<spam\\mer@test.example>",
    b"<@test.example,elsewhere.example:victim@test.example>",
]


@pytest.mark.parametrize("rcpt", RELAY_PROBES)
def test_relay_probe_is_refused(smtp: Listener, rcpt: bytes) -> None:
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:" + rcpt])
    assert codes[1] is not None and codes[1] // 100 == 5, (rcpt, codes)
    q = queued(smtp.home)
    assert q == [(b"a@client.example", [b"control@test.example"])], q


@pytest.mark.parametrize("rcpt", NOT_MAILBOXES)
def test_what_is_not_a_mailbox_is_refused(smtp: Listener, rcpt: bytes) -> None:
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:" + rcpt])
    assert codes[1] in (501, 553), (rcpt, codes)
    assert queued(smtp.home) == [(b"a@client.example", [b"control@test.example"])]


@pytest.mark.parametrize("rcpt", LOCAL_TRICKS)
def test_accepted_tricks_stay_on_our_domains(smtp: Listener, rcpt: bytes) -> None:
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:" + rcpt])
    assert codes[1] == 250, (rcpt, codes)
    [(_, rcpts)] = queued(smtp.home)
    assert all(_allowed(r) for r in rcpts), rcpts
    assert all(b"\0" not in r and b"\n" not in r for r in rcpts)


def test_ip_literal_of_ours_becomes_localiphost(smtp: Listener) -> None:
    codes = _transaction(
        smtp,
        b"MAIL FROM:<a@client.example>",
        [b"RCPT TO:<v1@[127.0.0.1]>", b"RCPT TO:<v2@[127.000.000.001]>", b"RCPT TO:<v3@[0.0.0.0]>"],
    )
    assert codes[1:] == [250, 250, 250], codes
    [(_, rcpts)] = queued(smtp.home)
    assert rcpts == [b"v1@test.example", b"v2@test.example", b"v3@test.example",
                     b"control@test.example"]  # fmt: skip


@pytest.mark.parametrize(
    "rcpt",
    [b"<v@[127.0.0.256]>", b"<v@[127.0.0.1.5]>", b"<v@[127.0.0]>", b"<v@[ 127.0.0.1]>",
     b"<v@[127.0.0.1]x>", b"<v@x[127.0.0.1]>", b"<v@[127.0.0.1]]>", b"<v@[[127.0.0.1]>",
     b"<v@[IPv6:::ffff:192.0.2.1]>", b"<v@[0x7f.0.0.1]>"],
)  # fmt: skip
def test_malformed_or_foreign_ip_literals_are_not_ours(smtp: Listener, rcpt: bytes) -> None:
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:" + rcpt])
    assert codes[1] is not None and codes[1] // 100 == 5, (rcpt, codes)
    assert queued(smtp.home) == [(b"a@client.example", [b"control@test.example"])]


def test_ip_literal_without_localiphost_is_not_relayed(smtp: Listener) -> None:
    smtp.control("localiphost", None)
    smtp.control("me", "mx.test.example\n")
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:<v@[192.0.2.7]>"])
    assert codes[1] == 553
    [(_, rcpts)] = queued(smtp.home)
    assert all(_allowed(r) or r.endswith(b"@mx.test.example") for r in rcpts)


def test_relayclient_host_may_relay_and_others_may_not(smtp: Listener) -> None:
    c = smtp.connect(source="127.0.0.2")
    assert c.reply()[0] == 220
    assert c.cmd(b"HELO relay")[0] == 250
    assert c.cmd(b"MAIL FROM:<a@client.example>")[0] == 250
    assert c.cmd(b"RCPT TO:<far@elsewhere.example>")[0] == 250
    c.close()
    c = smtp.connect(source="127.0.0.3")
    assert c.reply()[0] == 220
    assert c.cmd(b"HELO relay")[0] == 250
    assert c.cmd(b"MAIL FROM:<a@client.example>")[0] == 250
    assert c.cmd(b"RCPT TO:<far@elsewhere.example>")[0] == 553
    c.close()


def test_env_like_helo_or_commands_do_not_grant_relaying(smtp: Listener) -> None:
    c = smtp.session(b"HELO RELAYCLIENT=")
    assert c.cmd(b"XFORWARD ADDR=127.0.0.2")[0] == 502
    assert c.cmd(b"MAIL FROM:<a@client.example>")[0] == 250
    assert c.cmd(b"RCPT TO:<far@elsewhere.example>")[0] == 553
    c.close()


# ----------------------------------------------------------------- badmailfrom

BMF_EVASIONS = [
    b"<SPAMMER@EVIL.EXAMPLE>",
    b'<"spammer"@evil.example>',
    b"<@relay.example:spammer@evil.example>",
    b"spammer@evil.example",
    b" <spammer@evil.example>",
    b"<anyone@worse.example>",
    b"<anyone@WORSE.Example>",
    b"<mixed.case@shouty.example>",
    b"<MIXED.CASE@SHOUTY.EXAMPLE>",
]


@pytest.mark.parametrize("sender", BMF_EVASIONS)
def test_badmailfrom_evasion(smtp: Listener, sender: bytes) -> None:
    c = smtp.session()
    assert c.cmd(b"MAIL FROM:" + sender)[0] == 250  # qmail refuses at RCPT
    code, text = c.cmd(b"RCPT TO:<x@test.example>")
    assert code == 553 and b"badmailfrom" in text, (sender, text)
    assert c.cmd(b"DATA")[0] == 503
    c.close()
    assert queued(smtp.home) == []


def test_ipv6_literals_of_ours_become_localiphost(smtp: Listener) -> None:
    rcpts = [b"<v@[IPv6:::1]>", b"<v@[IPv6:::ffff:127.0.0.1]>", b"<v@[IPv6:0:0:0:0:0:0:0:1]>"]
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:" + r for r in rcpts])
    assert codes[1:] == [250, 250, 250], codes
    [(_, got)] = queued(smtp.home)
    assert got == [b"v@test.example"] * 3 + [b"control@test.example"]


@pytest.mark.parametrize(
    "rcpt", [b"<v@[IPv6:::1%lo]>", b"<v@[::1]>", b"<v@[IPv6:2001:db8::7]>", b"<v@[IPv6:]>"]
)
def test_foreign_or_malformed_ipv6_literals_are_refused(smtp: Listener, rcpt: bytes) -> None:
    codes = _transaction(smtp, b"MAIL FROM:<a@client.example>", [b"RCPT TO:" + rcpt])
    assert codes[1] == 553, codes
    assert queued(smtp.home) == [(b"a@client.example", [b"control@test.example"])]
