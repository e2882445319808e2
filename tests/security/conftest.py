"""Fixtures for the adversarial tests: one real SMTP listener per test module."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from pyqmail import tcprules
from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.security._support import Listener, clear_queue

RCPTHOSTS = "test.example\n.sub.test.example\n"
BADMAILFROM = "spammer@evil.example\n@worse.example\nMixed.Case@Shouty.Example\n"


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    """`pyqmail smtpd --listen` with rcpthosts test.example; 127.0.0.2 may relay."""
    home = Home(tmp_path_factory.mktemp("sec") / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    rules = home.root / "tcp.smtp.cdb"
    tcprules.compile_cdb(
        io.BytesIO(b'127.0.0.2:allow,RELAYCLIENT=""\n:allow\n'), rules, home.root / "tcp.smtp.tmp"
    )
    srv = Listener(home, "--rules", str(rules), "--max-per-ip", "40", "--max-conns", "60")
    yield srv
    log = srv.stop()
    assert "Traceback" not in log, log


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    if "smtp" not in request.fixturenames:
        yield
        return
    srv: Listener = request.getfixturevalue("smtp")
    srv.control("rcpthosts", RCPTHOSTS)
    srv.control("badmailfrom", BADMAILFROM)
    srv.control("databytes", "100000\n")
    srv.control("localiphost", "test.example\n")
    srv.control("timeoutsmtpd", None)
    clear_queue(srv.home)
    yield
    assert srv.proc.poll() is None, "the listener died"
    assert srv.alive(), "a normal session failed after the attack"
    assert "Traceback" not in srv.log(), srv.log()
