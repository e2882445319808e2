"""remote/smarthost.py: control/smtproutesauth and control/smtproutestls."""

from __future__ import annotations

import os

import pytest

from pyqmail.control import ControlError
from pyqmail.home import Home
from pyqmail.remote.routes import parse_relay
from pyqmail.remote.smarthost import (
    Credentials,
    SmarthostError,
    Smarthosts,
    Trust,
    file_problems,
    host_key,
    parse_auth,
    parse_trust,
    pin_matches,
    secure_authfile,
)
from tests.conftest import write_control


def test_only_the_first_two_colons_split() -> None:
    got = parse_auth(
        b"# comment\n\nrelay.example:me@example.org:pa:ss:word \t\n"
        b"[10.0.0.1]:u:p\n[::1]:v6:p:6\nRELAY.example:later:wins\n"
    )
    assert got == {
        "relay.example": Credentials(b"later", b"wins"),
        "10.0.0.1": Credentials(b"u", b"p"),
        "::1": Credentials(b"v6", b"p:6"),
    }
    assert parse_auth(b"h:u:pa:ss word  \n")["h"].password == b"pa:ss word"
    assert parse_auth(b"h:u:\n")["h"].password == b""


@pytest.mark.parametrize("line", [b"relay.example:user", b"nocolon", b":u:p", b"h::p", b"[::1:u:p"])
def test_bad_auth_lines(line: bytes) -> None:
    with pytest.raises(SmarthostError) as e:
        parse_auth(b"ok:u:p\n" + line + b"\n")
    assert e.value.line == 2 and str(e.value).startswith("control/smtproutesauth:2: ")
    assert line.decode() not in str(e.value)  # a line may hold a password: never quoted


def test_trust_lines() -> None:
    hexd = "AB" * 32
    got = parse_trust(
        f"r.example:sha256:{':'.join(['AB'] * 32)}\nr.example:sha256:{'cd' * 32}\n"
        f"[10.0.0.1]:/etc/ssl/private-ca.pem\n".encode()
    )
    assert got["r.example"] == Trust(pins=frozenset({bytes.fromhex(hexd), b"\xcd" * 32}))
    assert got["10.0.0.1"] == Trust(cafile="/etc/ssl/private-ca.pem")
    for bad in (b"r:sha256:abcd", b"r:ca.pem", b"r:md5:00", b"r:/a.pem\nr:sha256:" + b"00" * 32):
        with pytest.raises(SmarthostError):
            parse_trust(bad)


def test_pin_matches() -> None:
    import hashlib

    der = b"certificate bytes"
    assert pin_matches(der, frozenset({hashlib.sha256(der).digest()}))
    assert not pin_matches(der, frozenset({b"\0" * 32}))
    assert not pin_matches(None, frozenset({hashlib.sha256(der).digest()}))


def test_host_keys_match_the_route_as_written() -> None:
    assert host_key("[10.0.0.1]") == host_key("10.0.0.1") == "10.0.0.1"
    assert host_key("Relay.Example.") == "relay.example"


def test_relay_lookup_and_reload_on_change(home: Home) -> None:
    sh = Smarthosts(home)
    route = parse_relay("[127.0.0.1]:587")
    assert route is not None
    assert sh.relay(route) is None  # no files: today's behaviour
    write_control(home, "smtproutesauth", "127.0.0.1:u:p\n")
    relay = sh.relay(route)
    assert relay is not None and relay.creds == Credentials(b"u", b"p") and relay.trust is None
    assert "never sent in clear" in relay.required_for
    write_control(home, "smtproutesauth", "127.0.0.1:u:changed\n")
    relay = sh.relay(route)
    assert relay is not None and relay.creds == Credentials(b"u", b"changed")
    other = parse_relay("mx.other.example")
    assert other is not None and sh.relay(other) is None
    write_control(home, "smtproutesauth", "127.0.0.1:broken\n")
    with pytest.raises(SmarthostError):
        sh.relay(other)  # a bad file stops every route: the bad line may be that one's


def test_an_unreadable_file_raises_each_time(home: Home) -> None:
    (home.control / "smtproutesauth").mkdir()
    sh = Smarthosts(home)
    route = parse_relay("r.example")
    assert route is not None
    for _ in range(2):
        with pytest.raises(ControlError):
            sh.relay(route)
    (home.control / "smtproutesauth").rmdir()
    assert sh.relay(route) is None


def test_file_problems_and_secure(home: Home) -> None:
    path = home.control / "smtproutesauth"
    path.write_text("r:u:p\n")
    os.chmod(path, 0o644)
    probs = file_problems(home, None)
    assert [p.message for p in probs] == [
        "holds passwords but is readable by group or other (mode 644)"
    ]
    assert probs[0].error
    assert secure_authfile(home, None)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not secure_authfile(home, None)
    assert file_problems(home, None) == []
    probs = file_problems(home, os.getuid() + 1)
    assert [p.fix for p in probs] == [f"chown qmailr {path}"]
    path.write_text("r:u\n")
    (home.control / "smtproutestls").write_text("r:sha256:00\n")
    assert [(p.file, p.line) for p in file_problems(home, None)] == [
        ("smtproutesauth", 1),
        ("smtproutestls", 1),
    ]


def test_secure_never_follows_a_symlink(home: Home) -> None:
    target = home.root / "elsewhere"
    target.write_text("x")
    os.chmod(target, 0o644)
    (home.control / "smtproutesauth").symlink_to(target)
    assert not secure_authfile(home, None)
    assert os.stat(target).st_mode & 0o777 == 0o644
