"""remote/mx.py without a DNS server: literals, the self-MX rule, resolver settings.
(MX order, A fallback, NXDOMAIN and CNAMEs against dnsmasq: tests/integration/test_remote_dns.py)"""

from __future__ import annotations

import asyncio

import pytest

from pyqmail.outcome import Status
from pyqmail.remote.mx import (
    Address,
    DnsFailure,
    eligible,
    ip_literal,
    make_resolver,
    mx_addresses,
    own_addresses,
    relay_addresses,
)


@pytest.mark.parametrize(
    ("host", "ip"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[::1]", "::1"),
        ("example.com", None),
        ("[example.com]", None),
        ("1.2.3", None),
    ],
)
def test_ip_literal(host: str, ip: str | None) -> None:
    assert ip_literal(host) == ip


def test_literals_need_no_dns() -> None:
    res = make_resolver("127.0.0.1:1")  # nothing listens there
    got = asyncio.run(mx_addresses(res, "[192.0.2.5]"))
    assert got == [Address(0, "192.0.2.5", "192.0.2.5")]
    assert asyncio.run(relay_addresses(res, "192.0.2.6")) == [Address(0, "192.0.2.6", "192.0.2.6")]


A = [Address(10, "192.0.2.1", "mx1"), Address(20, "192.0.2.2", "mx2"),
     Address(30, "192.0.2.3", "mx3")]  # fmt: skip


def test_self_rule_cuts_at_our_preference() -> None:
    assert eligible(A, {"192.0.2.2"}) == A[:1]
    assert eligible(A, {"192.0.2.9"}) == A
    assert eligible(A, set(), ["MX3"]) == A[:2]


def test_self_rule_when_we_are_best() -> None:
    with pytest.raises(DnsFailure) as e:
        eligible(A, {"192.0.2.1"})
    assert e.value.outcome.status is Status.PERM
    assert e.value.outcome.text == (
        "Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
        "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n"
    )


def test_own_addresses_include_loopback_and_any() -> None:
    own = own_addresses()
    assert {"127.0.0.1", "0.0.0.0"} <= own


def test_resolver_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    r = make_resolver("127.0.0.1:5353")
    assert r.nameservers == ["127.0.0.1"] and r.port == 5353
    r = make_resolver("[::1]:5300")
    assert r.nameservers == ["::1"] and r.port == 5300
    monkeypatch.setenv("PYQMAIL_RESOLVER", "127.0.0.2")
    r = make_resolver()
    assert r.nameservers == ["127.0.0.2"] and r.port == 53


def test_unreachable_resolver_is_temporary() -> None:
    res = make_resolver("127.0.0.1:9", lifetime=0.5)
    with pytest.raises(DnsFailure) as e:
        asyncio.run(mx_addresses(res, "example.com"))
    assert e.value.outcome.status is Status.TEMP
    assert e.value.outcome.text == "Sorry, I couldn't find any host by that name. (#4.1.2)\n"
