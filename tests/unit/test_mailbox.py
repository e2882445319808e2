"""pyqmail.mailbox: RFC 5321 mailboxes, source routes, and the shell-function refusal."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pyqmail.mailbox import (
    DOUBLE_BOUNCE,
    Mailbox,
    Refusal,
    check_envelope,
    is_function_definition,
    parse_mailbox,
    parse_path,
    quote,
)

SHELLSHOCK = b"() { :; }; /bin/touch /tmp/x"  # the published exploit's sender

_R = Refusal


@pytest.mark.parametrize(
    ("text", "result"),
    [
        (b"a@b", Mailbox(b"a", b"b")),
        (b"first.last@example.test", Mailbox(b"first.last", b"example.test")),
        (b"A-1.b_c+tag@Sub-1.Example.TEST", Mailbox(b"A-1.b_c+tag", b"Sub-1.Example.TEST")),
        (b"{|}~!#$%&'*+-/=?^_`@x.test", Mailbox(b"{|}~!#$%&'*+-/=?^_`", b"x.test")),
        (b'"john doe"@example.test', Mailbox(b"john doe", b"example.test")),
        (b'"a\\"b\\\\c"@x.test', Mailbox(b'a"b\\c', b"x.test")),
        (b'"a;b(c)<d>,e:f[g]"@x.test', Mailbox(b"a;b(c)<d>,e:f[g]", b"x.test")),
        (b'".leading..dots."@x.test', Mailbox(b".leading..dots.", b"x.test")),
        (b"u@[192.0.2.1]", Mailbox(b"u", b"[192.0.2.1]")),
        (b"u@[127.000.000.001]", Mailbox(b"u", b"[127.000.000.001]")),
        (b"u@[IPv6:2001:db8::1]", Mailbox(b"u", b"[IPv6:2001:db8::1]")),
        (b"u@[ipv6:::ffff:192.0.2.1]", Mailbox(b"u", b"[ipv6:::ffff:192.0.2.1]")),
        (b"x" * 200 + b"@x.test", Mailbox(b"x" * 200, b"x.test")),
        (b"u@" + b"a" * 63 + b".test", Mailbox(b"u", b"a" * 63 + b".test")),
        (b"u@" + b"a." * 126 + b"bcd", Mailbox(b"u", b"a." * 126 + b"bcd")),  # 255 octets
        (b"1@2.3", Mailbox(b"1", b"2.3")),
        # refused: not RFC 5321
        (SHELLSHOCK, _R.SYNTAX),
        (SHELLSHOCK + b"@x.test", _R.SYNTAX),
        (b"john doe@x.test", _R.SYNTAX),
        (b"a;b@x.test", _R.SYNTAX),
        (b"a(b@x.test", _R.SYNTAX),
        (b"a)b@x.test", _R.SYNTAX),
        (b"a,b@x.test", _R.SYNTAX),
        (b"a:b@x.test", _R.SYNTAX),
        (b"a<b@x.test", _R.SYNTAX),
        (b"a[b]@x.test", _R.SYNTAX),
        (b"a\\ b@x.test", _R.SYNTAX),
        (b'"john@x.test', _R.SYNTAX),
        (b'"a"b@x.test', _R.SYNTAX),
        (b'a"b"@x.test', _R.SYNTAX),
        (b'"a\\', _R.SYNTAX),
        (b'"a\\\x01"@x.test', _R.SYNTAX),
        (b'"a\tb"@x.test', _R.SYNTAX),
        (b".a@x.test", _R.SYNTAX),
        (b"a.@x.test", _R.SYNTAX),
        (b"a..b@x.test", _R.SYNTAX),
        (b"@x.test", _R.SYNTAX),
        (b"a@", _R.SYNTAX),
        (b"a@b@c.test", _R.SYNTAX),
        (b"a@x.test.", _R.SYNTAX),
        (b"a@.x.test", _R.SYNTAX),
        (b"a@x..test", _R.SYNTAX),
        (b"a@-x.test", _R.SYNTAX),
        (b"a@x-.test", _R.SYNTAX),
        (b"a@x_y.test", _R.SYNTAX),
        (b"a@x y.test", _R.SYNTAX),
        (b"a@[192.0.2.1", _R.SYNTAX),
        (b"a@[]", _R.SYNTAX),
        (b"a@[192.0.2]", _R.SYNTAX),
        (b"a@[192.0.2.256]", _R.SYNTAX),
        (b"a@[1920.0.2.1]", _R.SYNTAX),
        (b"a@[IPv6:1::2::3]", _R.SYNTAX),
        (b"a@[IPv6:fe80::1%eth0]", _R.SYNTAX),
        (b"a@[IPv6:]", _R.SYNTAX),
        (b"a@[tag:general]", _R.SYNTAX),
        (b"a@[192.0.2.1]x", _R.SYNTAX),
        (b"", _R.SYNTAX),
        (b'""@x.test', _R.EMPTY_LOCAL),
        (b"u@" + b"a" * 64 + b".test", _R.DOMAIN_TOO_LONG),
        (b"u@" + b"a." * 127 + b"bc", _R.DOMAIN_TOO_LONG),  # 256 octets
        (b"joe", _R.NO_DOMAIN),
        (b'"joe"', _R.NO_DOMAIN),
        ("jörg@x.test".encode(), _R.EIGHT_BIT),
        # refused: valid syntax, but bash would read it as a function definition
        (b'"' + SHELLSHOCK + b'"@x.test', _R.FUNCTION),
        (b'"() {"@x.test', _R.FUNCTION),
        (b'"x-(){:;}"@x.test', _R.FUNCTION),
        (b'"x-(  )  {"@x.test', _R.FUNCTION),
        (b'"\\(\\) \\{"@x.test', _R.FUNCTION),
        # not the shape: allowed
        (b'"()"@x.test', Mailbox(b"()", b"x.test")),
        (b'"{ ()"@x.test', Mailbox(b"{ ()", b"x.test")),
        (b"{:;}@x.test", _R.SYNTAX),  # ":" and ";" are not atext
    ],
)
def test_mailbox_table(text: bytes, result: Mailbox | Refusal) -> None:
    assert parse_mailbox(text, rcpt=False) == result


@pytest.mark.parametrize(
    ("text", "rcpt", "bare_ok", "result"),
    [
        (b"postmaster", True, False, Mailbox(b"postmaster", b"")),
        (b"POSTMASTER", True, False, Mailbox(b"POSTMASTER", b"")),
        (b'"postmaster"', True, False, Mailbox(b"postmaster", b"")),
        (b"postmaster", False, False, _R.NO_DOMAIN),
        (b"postmistress", True, False, _R.NO_DOMAIN),
        (b"joe", True, True, Mailbox(b"joe", b"")),
        (b"joe", False, True, Mailbox(b"joe", b"")),
        (b"a;b", True, True, _R.SYNTAX),
    ],
)
def test_addresses_without_a_domain(
    text: bytes, rcpt: bool, bare_ok: bool, result: Mailbox | Refusal
) -> None:
    assert parse_mailbox(text, rcpt=rcpt, bare_ok=bare_ok) == result


@pytest.mark.parametrize(
    ("path", "result"),
    [
        (b"", None),
        (b"@a.test:u@x.test", Mailbox(b"u", b"x.test")),
        (b"@a.test,@b.test:u@x.test", Mailbox(b"u", b"x.test")),
        (b"@[192.0.2.1]:u@x.test", _R.ROUTE),  # At-domain = "@" Domain: no literal
        (b"@a.test,@b.test:" + SHELLSHOCK, _R.SYNTAX),
        (b"@", _R.ROUTE),
        (b"@a.test", _R.ROUTE),
        (b"@a.test,b.test:u@x.test", _R.ROUTE),
        (b"@a.test,:u@x.test", _R.ROUTE),
        (b"@:u@x.test", _R.ROUTE),
        (b"@a;b:u@x.test", _R.ROUTE),
        (b"@a.test:", _R.SYNTAX),
    ],
)
def test_source_routes_are_checked_and_dropped(path: bytes, result: object) -> None:
    assert parse_path(path, rcpt=True) == result


@pytest.mark.parametrize(
    ("address", "sender", "result"),
    [
        (b"", True, b""),
        (DOUBLE_BOUNCE, True, DOUBLE_BOUNCE),
        (b"", False, _R.SYNTAX),
        (DOUBLE_BOUNCE, False, _R.SYNTAX),
        (b"ok@x.test", True, b"ok@x.test"),
        (b'"john doe"@x.test', True, b"john doe@x.test"),
        (b"john doe@x.test", True, _R.SYNTAX),
        (SHELLSHOCK, True, _R.SYNTAX),
        (b"a;b@x.test", False, _R.SYNTAX),
        (b'"' + SHELLSHOCK + b'"@x.test', False, _R.FUNCTION),
        ("jörg@bücher.test".encode(), False, "jörg@bücher.test".encode()),
        (b"j\xf6rg@x.test", False, _R.SYNTAX),  # Latin-1, not UTF-8
        (b"postmaster", False, b"postmaster"),
        (b"joe", False, b"joe"),  # qmail-send adds envnoathost
        (b'"joe q"', True, b"joe q"),
        (b"a;b", True, _R.SYNTAX),
    ],
)
def test_envelope_addresses(address: bytes, sender: bool, result: object) -> None:
    assert check_envelope(address, sender=sender) == result


# ------------------------------------------------------------------ properties

_ATEXT = st.sampled_from(
    list(b"ABCXYZabcxyz0189!#$%&'*+-/=?^_`{|}~"),
)
_ATOM = st.lists(_ATEXT, min_size=1, max_size=8).map(bytes)
_DOT_STRING = st.lists(_ATOM, min_size=1, max_size=4).map(b".".join)
_LABEL = st.from_regex(rb"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(b".".join)
_PRINTABLE = st.binary(max_size=30).map(lambda b: bytes(0x20 + c % 95 for c in b))


@given(_DOT_STRING, _DOMAIN)
def test_every_dot_string_at_a_domain_is_accepted_unchanged(local: bytes, domain: bytes) -> None:
    got = parse_mailbox(local + b"@" + domain, rcpt=False)
    if is_function_definition(local):
        assert got == _R.FUNCTION
    else:
        assert got == Mailbox(local, domain)


@given(_PRINTABLE.filter(bool), _DOMAIN)
def test_any_printable_local_part_can_be_quoted(content: bytes, domain: bytes) -> None:
    quoted = b'"' + content.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    got = parse_mailbox(quoted + b"@" + domain, rcpt=False)
    assert got == (_R.FUNCTION if is_function_definition(content) else Mailbox(content, domain))


@given(_DOT_STRING, st.sampled_from(list(b' ()<>[]:;@\\,"')), _DOT_STRING, _DOMAIN)
def test_a_special_outside_quotes_is_refused(a: bytes, c: int, b: bytes, domain: bytes) -> None:
    assert isinstance(parse_mailbox(a + bytes([c]) + b + b"@" + domain, rcpt=False), Refusal)


@given(st.binary(max_size=80), st.booleans(), st.booleans())
def test_what_passes_is_safe_for_the_queue_and_a_shell(text: bytes, rcpt: bool, utf8: bool) -> None:
    got = parse_path(text, rcpt=rcpt, utf8=utf8)
    if got is None:
        assert text == b""
    elif isinstance(got, Mailbox):
        address = got.address
        assert b"\0" not in address and b"\n" not in address and b"\r" not in address
        assert not is_function_definition(address)
        assert got.local and (got.domain or got.local.lower() == b"postmaster")
        assert address.isascii() or utf8
        if b'"' not in text and not text.startswith(b"@"):
            assert address == text


@given(st.binary(max_size=60))
def test_envelope_check_never_raises_and_refuses_nul(address: bytes) -> None:
    got = check_envelope(address, sender=False)
    if isinstance(got, bytes):
        assert b"\0" not in got and got


@given(_PRINTABLE.filter(bool), st.one_of(st.just(b""), _DOMAIN), st.booleans())
def test_quote_round_trips_every_queue_form(local: bytes, domain: bytes, sender: bool) -> None:
    # a bare local part holding "@" reads as local@domain in the queue too: not one form
    assume(domain or b"@" not in local)
    address = local + b"@" + domain if domain else local
    got = check_envelope(quote(address), sender=sender)
    assert got == (_R.FUNCTION if is_function_definition(address) else address)


@pytest.mark.parametrize(
    ("address", "quoted"),
    [
        (b"a@b", b"a@b"),
        (b"john doe@b", b'"john doe"@b'),
        (b'a"b\\c@b', b'"a\\"b\\\\c"@b'),
        (b"a@b@c", b'"a@b"@c'),
        (b".a..b.@c", b'".a..b."@c'),
        (b"joe", b"joe"),
        (b"a b", b'"a b"'),
        (b"", b""),
        (DOUBLE_BOUNCE, DOUBLE_BOUNCE),
    ],
)
def test_quote(address: bytes, quoted: bytes) -> None:
    assert quote(address) == quoted


def _domain_reference(domain: bytes) -> object:
    """The domain rules byte by byte, as written before the translate() fast path."""
    from pyqmail import mailbox as m

    if not domain:
        return m.Refusal.SYNTAX
    if len(domain) > m.MAX_DOMAIN:
        return m.Refusal.DOMAIN_TOO_LONG
    for label in domain.split(b"."):
        if not label or len(label) > m.MAX_LABEL:
            return m.Refusal.SYNTAX if not label else m.Refusal.DOMAIN_TOO_LONG
        ends = (label[0], label[-1])
        if not all(c in m._LETDIG or c >= 0x80 for c in ends):
            return m.Refusal.SYNTAX
        if not all(c in m._LDH or c >= 0x80 for c in label):
            return m.Refusal.SYNTAX
    return None


@given(st.lists(st.sampled_from(list(b"aZ09-._ \x00\x7f\x80\xff@[")), max_size=80))
def test_check_domain_agrees_with_a_byte_by_byte_reference(chars: list[int]) -> None:
    from pyqmail.mailbox import _check_domain

    domain = bytes(chars)
    assert _check_domain(domain) == _domain_reference(domain)
