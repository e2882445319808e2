"""listener.py: what the SMTP, QMQP and QMTP listeners share before their protocols."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail import listener, tcprules


@pytest.mark.parametrize(
    ("addr", "expect"),
    [
        (("192.0.2.1", 4321), ("192.0.2.1", "4321")),
        (("::ffff:127.0.0.1", 25, 0, 0), ("127.0.0.1", "25")),  # tcpserver writes IPv4
        (("2001:db8::1", 25, 0, 0), ("2001:db8::1", "25")),
        (None, ("unknown", "0")),
        ("/run/sock", ("unknown", "0")),
    ],
)
def test_peer_address(addr: object, expect: tuple[str, str]) -> None:
    assert listener.peer_address(addr) == expect


def test_peer_env_is_tcpservers() -> None:
    env = listener.peer_env(("::ffff:10.0.0.2", 5000, 0, 0), ("::ffff:10.0.0.1", 628, 0, 0), "mx")
    assert env == {
        "PROTO": "TCP",
        "TCPREMOTEIP": "10.0.0.2",
        "TCPREMOTEPORT": "5000",
        "TCPLOCALIP": "10.0.0.1",
        "TCPLOCALPORT": "628",
        "TCPLOCALHOST": "mx",
    }
    assert "TCPLOCALHOST" not in listener.peer_env(("10.0.0.2", 1), ("10.0.0.1", 2), None)


def _rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tcp.cdb"
    tcprules.compile_cdb(text.encode().splitlines(keepends=True), path, tmp_path / "tcp.tmp")
    return path


def test_rules_decide_by_the_cdb(tmp_path: Path) -> None:
    rules = listener.Rules(_rules(tmp_path, '127.:allow,RELAYCLIENT=""\n:deny\n'))
    allowed = rules.decide("127.0.0.1")
    assert allowed is not None and allowed.allow and allowed.env == {"RELAYCLIENT": ""}
    denied = rules.decide("192.0.2.1")
    assert denied is not None and not denied.allow


@pytest.mark.parametrize(
    ("loopback_only", "ip", "allow"),
    [
        (False, "192.0.2.1", True),  # tcpserver without -x
        (True, "192.0.2.1", False),  # QMQP: no rules file, loopback clients only
        (True, "127.0.0.5", True),
        (True, "::1", True),
        (True, "::ffff:127.0.0.1", True),
    ],
)
def test_rules_without_a_file(tmp_path: Path, loopback_only: bool, ip: str, allow: bool) -> None:
    rules = listener.Rules(tmp_path / "missing.cdb", loopback_only=loopback_only)
    d = rules.decide(ip)
    assert d is not None and d.allow is allow and d.env == {}


def test_rules_unreadable_drops(tmp_path: Path) -> None:
    path = tmp_path / "tcp.cdb"
    path.write_bytes(b"not a cdb")
    assert listener.Rules(path).decide("127.0.0.1") is None


def test_rules_see_a_new_file(tmp_path: Path) -> None:
    path = _rules(tmp_path, ":allow\n")
    rules = listener.Rules(path)
    assert rules.decide("192.0.2.1").allow  # type: ignore[union-attr]
    _rules(tmp_path, ":deny\n")
    assert not rules.decide("192.0.2.1").allow  # type: ignore[union-attr]


def test_per_ip_counts_an_ipv6_64_as_one_client() -> None:
    per = listener.PerIp(1)
    key = per.take("2001:db8:0:1::1")
    assert key == "2001:db8:0:1::/64"
    assert per.take("2001:db8:0:1::2") is None  # same /64
    assert per.take("2001:db8:0:2::1") is not None  # the next /64
    per.give_back(key)
    assert per.take("2001:db8:0:1::2") == key
    assert per.take("::ffff:192.0.2.1") == "192.0.2.1"


def test_per_ip_hold_gives_back() -> None:
    per = listener.PerIp(1)
    with per.hold("192.0.2.1") as ok:
        assert ok
        with per.hold("192.0.2.1") as again:
            assert not again
    assert per.count == {}


@pytest.mark.parametrize(("exempt", "served"), [(True, 3), (False, 1)])
def test_per_ip_loopback_exemption(exempt: bool, served: int) -> None:
    per = listener.PerIp(1, exempt_loopback=exempt)
    assert sum(per.take("127.0.0.1") is not None for _ in range(3)) == served
    assert per.take("192.0.2.1") is not None
    assert per.take("192.0.2.1") is None  # the exemption is for loopback only


@pytest.mark.parametrize(
    ("text", "default", "expect"),
    [
        ("127.0.0.1:25", None, ("127.0.0.1", 25)),
        ("[::1]:628", None, ("::1", 628)),
        (":209", None, ("0.0.0.0", 209)),
        ("::1", 25, ("::1", 25)),
        ("*", 628, ("0.0.0.0", 628)),
    ],
)
def test_parse_listen(text: str, default: int | None, expect: tuple[str, int]) -> None:
    assert listener.parse_listen(text, default) == expect
