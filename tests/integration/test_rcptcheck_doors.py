"""Recipient checks through both doors: qmail-smtpd on a socketpair (the tcpserver way)
and the asyncio listener (``pyqmail smtpd --listen``), over real sockets and files."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from pyqmail import tcprules
from pyqmail.home import Home
from pyqmail.local import users
from pyqmail.smtp import rcptcheck
from tests.conftest import write_control
from tests.integration.test_smtpd_listener import Raw, start_listener, wait_listening
from tests.integration.test_smtpd_stdio import run


@pytest.fixture
def site(home: Home, tmp_path: Path) -> Home:
    write_control(home, "locals", "test.example\n")
    write_control(home, "rcpthosts", "test.example\nvpop.example\n")
    alice = tmp_path / "alice"
    alice.mkdir(mode=0o755)
    (alice / ".qmail-lists").write_text("./Maildir/\n")
    u, g = os.getuid(), os.getgid()
    (home.users / "assign").write_text(
        f"=alice:alice:{u}:{g}:{alice}:::\n+alice-:alice:{u}:{g}:{alice}:-::\n.\n"
    )
    users.newu(home)
    return home


def _rcpt_lines(out: bytes) -> list[bytes]:
    lines = [ln for ln in out.split(b"\r\n") if ln[:3].isdigit()]
    return lines[2:-1]  # after 220 and MAIL's 250, before QUIT's 221


def test_qmail_smtpd_refuses_what_delivery_would_bounce(site: Home) -> None:
    script = (
        b"MAIL FROM:<s@x.example>\r\nRCPT TO:<alice@test.example>\r\n"
        b"RCPT TO:<alice-lists@test.example>\r\nRCPT TO:<alice-nolist@test.example>\r\n"
        b"RCPT TO:<nosuchuser42@test.example>\r\nRCPT TO:<postmaster@test.example>\r\nQUIT\r\n"
    )
    out, rc = run(site, script)
    assert rc == 0
    codes = [ln[:3] for ln in _rcpt_lines(out)]
    assert codes == [b"250", b"250", b"550", b"550", b"250"]
    assert out.count(rcptcheck.NO_SUCH_USER) == 2  # the same line for both
    write_control(site, "rcptchecks", "0\n")
    out, _ = run(site, script)
    assert [ln[:3] for ln in _rcpt_lines(out)] == [b"250"] * 5


def test_missing_user_and_missing_dotqmail_take_the_floor(site: Home) -> None:
    """Both refusals wait out the same floor after the check began (timing class)."""
    times = {}
    for local in (b"nosuchuser42", b"alice-nolist", b"alice"):
        script = b"MAIL FROM:<s@x>\r\nRCPT TO:<" + local + b"@test.example>\r\nQUIT\r\n"
        t0 = time.monotonic()
        out, _ = run(site, script)
        times[local] = time.monotonic() - t0
        assert (b"550 " in out) == (local != b"alice")
    assert times[b"nosuchuser42"] >= rcptcheck.REFUSE_FLOOR
    assert times[b"alice-nolist"] >= rcptcheck.REFUSE_FLOOR


def test_qmail_smtpd_runs_rcptcheck_from_the_environment(site: Home, tmp_path: Path) -> None:
    prog = tmp_path / "check"
    prog.write_text('#!/bin/sh\ncase "$RECIPIENT" in bad@*) exit 100;; later@*) exit 111;; esac\n')
    prog.chmod(0o755)
    script = (
        b"MAIL FROM:<s@x>\r\nRCPT TO:<ok@vpop.example>\r\nRCPT TO:<bad@vpop.example>\r\n"
        b"RCPT TO:<later@vpop.example>\r\nQUIT\r\n"
    )
    out, _ = run(site, script, {"RCPTCHECK": str(prog)})
    assert [ln[:3] for ln in _rcpt_lines(out)] == [b"250", b"550", b"451"]


def test_listener_checks_with_rcptcheck_from_tcprules(site: Home, tmp_path: Path) -> None:
    prog = tmp_path / "check"
    prog.write_text('#!/bin/sh\ncase "$RECIPIENT" in bad@*) exit 100;; esac\nexit 0\n')
    prog.chmod(0o755)
    tcprules.compile_cdb(
        [f':allow,RCPTCHECK="{prog}"\n'.encode()],
        site.control / "tcp.smtp.cdb",
        site.control / "tcp.smtp.tmp",
    )
    proc = start_listener(site, "--listen", "127.0.0.1:0")
    try:
        port = wait_listening(proc)[0]
        c = Raw(port)
        assert c.reply()[0] == 220
        c.send(
            b"MAIL FROM:<s@x>\r\nRCPT TO:<ok@vpop.example>\r\nRCPT TO:<bad@vpop.example>\r\n"
            b"RCPT TO:<nosuchuser42@test.example>\r\nRCPT TO:<alice-lists@test.example>\r\n"
        )
        got = [c.reply() for _ in range(5)]
        assert [code for code, _ in got] == [250, 250, 550, 550, 250]
        texts = {re.sub(rb"\s+", b" ", t) for code, t in got if code == 550}
        assert len(texts) == 1  # a list miss and a missing user read the same
    finally:
        proc.terminate()
        proc.wait(10)
