"""MAIL/RCPT path parsing (qmail's addrparse) and the strict parameter rules."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqmail.smtp import replies
from pyqmail.smtp.address import (
    MailParams,
    check_address,
    check_rcpt_params,
    domain_of,
    ip_literal,
    parse_mail_params,
    split_path,
)


@pytest.mark.parametrize(
    ("arg", "path", "rest"),
    [
        (b"FROM:<a@b> SIZE=5", b"a@b", b" SIZE=5"),
        (b"TO: <x@y>", b"x@y", b""),
        (b"from:a@b", b"a@b", b""),
        (b"from: a@b BODY=8BITMIME", b"a@b", b"BODY=8BITMIME"),
        (b"TO:<@a,@b:u@c>", b"@a,@b:u@c", b""),
        (b"TO:<@a>", b"@a", b""),
        (b'TO:<"a b"@c>', b'"a b"@c', b""),
        (b'TO:<"a>b"@c>', b'"a>b"@c', b""),
        (b'TO:<"a\\"b"@c> X', b'"a\\"b"@c', b" X"),
        (b"TO:<a\\>b@c>", b"a\\>b@c", b""),
        (b'from:"a b"@c SIZE=1', b'"a b"@c', b"SIZE=1"),
        (b"<>", b"", b""),
        (b"TO:x<y@z>", b"y@z", b""),
        (b"", b"", b""),
    ],
)
def test_split_path(arg: bytes, path: bytes, rest: bytes) -> None:
    assert split_path(arg) == (path, rest)


@pytest.mark.parametrize("arg", [b"TO:<a@b", b'TO:<"a>b@c>', b"<", b"FROM:<a\\>"])
def test_unclosed_bracket_is_no_path(arg: bytes) -> None:
    assert split_path(arg) is None


_SAFE = st.binary(max_size=60).filter(lambda b: not any(c in b for c in b'<>"\\ :@'))


@given(_SAFE.filter(bool), _SAFE)
def test_bracketed_addresses_round_trip(local: bytes, domain: bytes) -> None:
    address = local + b"@" + domain
    assert split_path(b"FROM:<" + address + b"> SIZE=1") == (address, b" SIZE=1")


@given(st.binary(max_size=200))
def test_split_path_never_raises_and_never_grows(arg: bytes) -> None:
    got = split_path(arg)
    if got is not None:
        path, rest = got
        assert len(path) + len(rest) <= len(arg)
        assert path in arg


@pytest.mark.parametrize(
    ("address", "reply"),
    [
        (b"a@b", None),
        (b"", None),
        (b"a" * 899, None),
        (b"a" * 900, replies.SYNTAX),
        (b"a\x00b", replies.BAD_BYTES),
        (b"a\nb", replies.BAD_BYTES),
        (b"a\x7f", replies.BAD_BYTES),
        (b"\xc3\xa9@b", replies.EIGHTBIT_ADDRESS),
    ],
)
def test_check_address(address: bytes, reply: bytes | None) -> None:
    assert check_address(address) == reply


@given(st.binary(max_size=50))
def test_no_control_byte_ever_passes(address: bytes) -> None:
    if check_address(address) is None:
        assert all(0x20 <= c < 0x7F for c in address)


@pytest.mark.parametrize(
    ("text", "databytes", "result"),
    [
        (b"", 0, MailParams()),
        (b" SIZE=100  BODY=8bitmime", 0, MailParams(100, b"8BITMIME")),
        (b"size=100", 100, MailParams(100)),
        (b"SIZE=101", 100, replies.SIZE_TOO_BIG),
        (b"SIZE=99999999999999999999", 0, MailParams(99999999999999999999)),
        (b"SIZE=999999999999999999999", 0, replies.BAD_SIZE),
        (b"SIZE=1e3", 0, replies.BAD_SIZE),
        (b"SIZE", 0, replies.BAD_SIZE),
        (b"BODY=BINARYMIME", 0, replies.BINARYMIME),
        (b"BODY=", 0, replies.BAD_PARAM),
        (b"RET=HDRS", 0, replies.BAD_PARAM),
        (b"BODY=7BIT BODY=7BIT", 0, replies.BAD_PARAM),
    ],
)
def test_mail_params(text: bytes, databytes: int, result: object) -> None:
    assert parse_mail_params(text, databytes) == result


@given(st.binary(max_size=40))
def test_mail_params_never_raise(text: bytes) -> None:
    parse_mail_params(text, 1000)


def test_rcpt_params() -> None:
    assert check_rcpt_params(b"") is None
    assert check_rcpt_params(b"   ") is None
    assert check_rcpt_params(b" NOTIFY=NEVER") == replies.BAD_PARAM


@pytest.mark.parametrize(
    ("domain", "ip"),
    [
        (b"[127.0.0.1]", "127.0.0.1"),
        (b"[127.000.000.001]", "127.0.0.1"),
        (b"[IPv6:::1]", "::1"),
        (b"[ipv6:2001:db8::1]", "2001:db8::1"),
        (b"[1.2.3]", None),
        (b"[1.2.3.256]", None),
        (b"[IPv6:zz]", None),
        (b"127.0.0.1", None),
        (b"[]", None),
    ],
)
def test_ip_literal(domain: bytes, ip: str | None) -> None:
    got = ip_literal(domain)
    assert got == (None if ip is None else ipaddress.ip_address(ip))


def test_domain_of_uses_the_last_at() -> None:
    assert domain_of(b"a@b@c.example") == b"c.example"
    assert domain_of(b"a%b@c") == b"c"
    assert domain_of(b"bang!path") == b""
