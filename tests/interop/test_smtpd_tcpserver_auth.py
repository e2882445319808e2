"""SMTP AUTH in our qmail-smtpd under Debian's tcpserver, as qmail's AUTH patches run it
(``qmail-smtpd HOSTNAME CHECKPROG SUBPROG``), with swaks --tls --auth and smtplib:
relay after AUTH, ``with ESMTPSA``, the checkpassword fd-3 protocol, control/authusers,
the log line on stderr (user and address, never the password), the failures shared by
the per-connection processes through HOME/greylist/authfail.sqlite."""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.smtp.passwords import set_password
from tests.conftest import free_port, require_tools
from tests.integration.test_smtpd_tls import install_cert
from tests.interop.test_smtpd_tcpserver_tls import Door

pytestmark = pytest.mark.interop
BIN = Path(sys.executable).parent
CHECKPW = """#!/bin/bash
IFS= read -r -d '' user <&3; IFS= read -r -d '' pass <&3
[ "$user" = bob ] && [ "$pass" = 'b0b pw' ] && exec "$@"
exit 1
"""


def _wait_greeting(port: int) -> None:
    """tcpserver listens at once; each connection starts a Python qmail-smtpd, which can
    take seconds on a loaded machine, so one probe waits long for its greeting."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 30) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("tcpserver + qmail-smtpd did not come up")


class AuthDoor(Door):
    err: Path

    def log(self) -> str:
        return self.err.read_text(errors="replace")


@pytest.fixture
def door(tmp_path: Path) -> Iterator[AuthDoor]:
    require_tools("tcpserver", "swaks")
    ca = trustme.CA()
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").write_text("test.example\n")
    install_cert(home, ca, "mx.test.example")
    set_password(home, b"alice", b"al1ce pw")
    prog = tmp_path / "checkpw"
    prog.write_text(CHECKPW)
    prog.chmod(0o755)
    port = free_port()
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    err = tmp_path / "stderr"
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            ["tcpserver", "-R", "-H", "-l", "mx.test.example", "127.0.0.1", str(port),
             str(BIN / "qmail-smtpd"), "mx.test.example", str(prog), "/bin/true"],
            env=env, stdout=subprocess.DEVNULL, stderr=errf,
        )  # fmt: skip
    d = AuthDoor(home, port, ca)
    d.err = err
    try:
        _wait_greeting(port)
        yield d
    finally:
        proc.terminate()
        proc.wait(10)
        assert "Traceback" not in d.log()


def swaks(door: AuthDoor, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{door.port}", "--tls", "--timeout", "30",
         "--from", "bob@test.example", "--to", "x@elsewhere.example", *args],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_swaks_auth_through_checkprog_relays_with_esmtpsa(door: AuthDoor, mech: str) -> None:
    r = swaks(door, "--auth", mech, "--auth-user", "bob", "--auth-password", "b0b pw")
    assert r.returncode == 0, r.stdout[-2000:]
    (mess,) = door.messages()
    assert b" with ESMTPSA (TLSv1.3 " in mess
    assert f"auth {mech} bob from 127.0.0.1 ok" in door.log()


def test_authusers_answers_before_the_program(door: AuthDoor) -> None:
    r = swaks(door, "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "al1ce pw")
    assert r.returncode == 0, r.stdout[-2000:]


def test_wrong_password_is_535_logged_without_it_and_no_relay(door: AuthDoor) -> None:
    r = swaks(door, "--auth", "LOGIN", "--auth-user", "bob", "--auth-password", "wr0ng pw")
    assert r.returncode != 0 and "535 5.7.8" in r.stdout
    assert door.messages() == []
    log = door.log()
    assert "auth LOGIN bob from 127.0.0.1 failed" in log
    assert "wr0ng" not in log and base64.b64encode(b"wr0ng pw").decode() not in log


def test_without_tls_no_auth_and_no_relay(door: AuthDoor) -> None:
    with smtplib.SMTP("127.0.0.1", door.port, timeout=30) as s:
        s.ehlo("client.example")
        assert not s.has_extn("auth")
        assert s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0bob\0b0b pw").decode())[0] == 538
        s.mail("bob@test.example")
        assert s.rcpt("x@elsewhere.example")[0] == 553


def test_failures_are_shared_by_the_processes(door: AuthDoor) -> None:
    from pyqmail.smtp.authlimit import AuthPolicy, FileFailures, failures_path

    # seven failures recorded as earlier qmail-smtpd processes would have
    f = FileFailures(failures_path(door.home), AuthPolicy())
    for _ in range(7):
        f.failed("127.0.0.1")
    f.close()
    r = swaks(door, "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", "nope")
    assert "535 5.7.8" in r.stdout  # the eighth
    r = swaks(door, "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", "b0b pw")
    assert "421 4.7.0" in r.stdout and door.messages() == []
