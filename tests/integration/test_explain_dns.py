"""``pyqmail explain`` asks DNS through delivery's resolver (dnsmasq as the server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.remote.mx import make_resolver
from pyqmail.send import explain
from tests.conftest import require_tools, write_control
from tests.integration.test_remote_dns import dnsmasq

__all__ = ["dnsmasq"]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _dnsmasq() -> None:
    require_tools("dnsmasq")


def test_mx_in_preference_order(home: Home, dnsmasq: str) -> None:
    ex = explain.explain_address(home, "u@mx.test", resolver=make_resolver(dnsmasq, lifetime=2))
    lines = [line for line in ex.lines if line.startswith("DNS: ")]
    assert lines[0] == "DNS: MX 10 a.mx.test -> 127.0.0.2"
    assert "DNS: MX 20 b.mx.test -> 127.0.0.3" in lines
    assert not ex.refused


def test_no_such_domain_bounces(home: Home, dnsmasq: str) -> None:
    ex = explain.explain_address(home, "u@gone.test", resolver=make_resolver(dnsmasq, lifetime=2))
    assert ex.refused and "couldn't find any host named gone.test" in ex.text()


def test_relay_name_by_address_records(home: Home, dnsmasq: str) -> None:
    write_control(home, "smtproutes", "routed.example:plain.test:2525\n")
    r = subprocess.run(
        [str(BIN / "pyqmail"), "explain", "u@routed.example"],
        capture_output=True, text=True, timeout=60,
        env={"PYQMAIL_RESOLVER": dnsmasq, "PYQMAIL_HOME": str(home.root),
             "PYQMAIL_SINGLE_USER": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "SMTP to the relay plain.test:2525" in r.stdout
    assert "DNS: plain.test -> 127.0.0.4" in r.stdout
