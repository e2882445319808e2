"""The per-connection policy: greeting, databytes, badmailfrom, relay control, Received."""

from __future__ import annotations

import ipaddress
import os

import pytest

from pyqmail import cdb
from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.listener import parse_listen
from pyqmail.smtp.session import CdbCache, Session, SessionError, local_addresses, safe
from tests.conftest import write_control


def make(home: Home, env: dict[str, str] | None = None, **kw: object) -> Session:
    return Session(load(home), env or {}, clock=lambda: 811486014.0, **kw)  # type: ignore[arg-type]


def test_greeting_falls_back_to_me_and_is_required(home: Home) -> None:
    assert make(home).greeting == "mx.test.example"
    write_control(home, "smtpgreeting", "hello there\n")
    assert make(home).greeting == "hello there"
    (home.control / "smtpgreeting").unlink()
    (home.control / "me").unlink()
    with pytest.raises(SessionError):
        make(home)


@pytest.mark.parametrize(("env", "expect"), [("123", 123), ("12abc", 12), ("", 0), ("x", 0)])
def test_databytes_env_is_read_like_scan_ulong(home: Home, env: str, expect: int) -> None:
    write_control(home, "databytes", "5000\n")
    assert make(home).databytes == 5000
    assert make(home, {"DATABYTES": env}).databytes == expect


def test_badmailfrom(home: Home) -> None:
    write_control(home, "badmailfrom", "Bad@Example.com\n@spam.example\n# comment\n")
    s = make(home)
    assert s.badmailfrom(b"bad@example.COM")
    assert s.badmailfrom(b"anyone@SPAM.example")
    assert not s.badmailfrom(b"anyone@sub.spam.example")
    assert not s.badmailfrom(b"good@example.com")
    assert not s.badmailfrom(b"")


def test_relay_rules(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n.wild.example\n")
    path = home.control / "morercpthosts.cdb"
    with cdb.Writer(path) as w:
        w.add(b"more.example", b"")
    with cdb.Reader.open(path) as more:
        s = make(home, morercpthosts=more)
        assert s.rcpt_allowed(b"x@test.example")
        assert s.rcpt_allowed(b"x@TEST.EXAMPLE")
        assert s.rcpt_allowed(b"x@a.b.wild.example")
        assert not s.rcpt_allowed(b"x@wild.example")
        assert s.rcpt_allowed(b"x@more.example")
        assert not s.rcpt_allowed(b"x@sub.more.example")
        assert s.rcpt_allowed(b"local-only")
        assert not s.rcpt_allowed(b"x@test.example@evil.example")
        assert s.relayclient is None
    assert make(home, {"RELAYCLIENT": ""}).rcpt_allowed(b"x@anywhere")
    assert make(home, {"RELAYCLIENT": ""}).relayclient == b""


def test_received_line(home: Home) -> None:
    s = make(
        home,
        {
            "TCPREMOTEIP": "1.2.3.4",
            "TCPREMOTEHOST": "h.example",
            "TCPREMOTEINFO": "id ent",
            "TCPLOCALIP": "5.6.7.8",
        },
    )
    assert s.received(b"other\nx") == (
        b"Received: from h.example (HELO other?x) (id?ent@1.2.3.4)\n"
        b"  by 5.6.7.8 with SMTP; 19 Sep 1995 04:46:54 -0000\n"
    )
    assert s.received(b"H.Example").startswith(b"Received: from h.example (id?ent@1.2.3.4)")
    assert make(home).received(None) == (
        b"Received: from unknown (unknown)\n  by unknown with SMTP; 19 Sep 1995 04:46:54 -0000\n"
    )


def test_safe_keeps_notqmails_characters() -> None:
    assert safe(b"aZ09.@%+/=:-[]") == b"aZ09.@%+/=:-[]"
    assert safe(b"a b\t\x00\xff<>()\"'") == b"a?b" + b"?" * 9


def test_literal_rewrite_uses_tcplocalip_too(home: Home) -> None:
    write_control(home, "localiphost", "lh.example\n")
    s = make(home, {"TCPLOCALIP": "192.0.2.1"}, local_ips=frozenset())
    assert s.rewrite_literal(b"u@[192.0.2.1]") == b"u@lh.example"
    assert s.rewrite_literal(b"u@[192.0.2.2]") == b"u@[192.0.2.2]"
    assert s.rewrite_literal(b"u@[IPv6:::ffff:192.0.2.1]") == b"u@lh.example"


def test_local_addresses_include_loopback() -> None:
    ips = local_addresses()
    assert ipaddress.ip_address("127.0.0.1") in ips


def test_cdb_cache_reopens_on_change(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    path = Path(tmp_path) / "x.cdb"
    cache = CdbCache(path)
    assert cache.get() is None
    with cdb.Writer(path) as w:
        w.add(b"k", b"1")
    r = cache.get()
    assert r is not None and r.get(b"k") == b"1"
    assert cache.get() is r
    with cdb.Writer(path) as w:
        w.add(b"k", b"22")
    r2 = cache.get()
    assert r2 is not None and r2.get(b"k") == b"22"
    path.unlink()
    assert cache.get() is None


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("127.0.0.1:25", ("127.0.0.1", 25)),
        ("0:2525", ("0.0.0.0", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("::1:25", ("::1", 25)),
        ("mx.example:25", ("mx.example", 25)),
    ],
)
def test_parse_listen(text: str, expect: tuple[str, int]) -> None:
    assert parse_listen(text) == expect


@pytest.mark.parametrize("text", ["25", "1.2.3.4:x", "1.2.3.4:70000", "[::1]25"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_cdb_cache_with_ttl_checks_the_file_at_most_that_often(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    path = Path(tmp_path) / "y.cdb"
    cache = CdbCache(path, ttl=3600)
    assert cache.get() is None
    with cdb.Writer(path) as w:
        w.add(b"k", b"1")
    assert cache.get() is None  # not looked at again within the ttl
    cache.ttl = 0
    r = cache.get()
    assert r is not None and r.get(b"k") == b"1"
