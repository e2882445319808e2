"""qmail-smtpd on stdin/stdout (the tcpserver way), over a socketpair, with tcpserver's env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from pyqmail.home import Home
from pyqmail.queue.envelope import parse_todo
from pyqmail.smtp import replies
from tests.conftest import write_control


def run(
    home: Home, script: bytes, env: dict[str, str] | None = None, half_close: bool = True
) -> tuple[bytes, int]:
    """Run qmail-smtpd with ``script`` as the client's bytes; (everything it wrote, rc)."""
    ours, theirs = socket.socketpair()
    e = dict(
        os.environ,
        PYQMAIL_HOME=str(home.root),
        PYQMAIL_SINGLE_USER="1",
        TCPREMOTEIP="192.0.2.9",
        **(env or {}),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pyqmail.cli.smtpd import main; sys.exit(main())"],
        stdin=theirs,
        stdout=theirs,
        env=e,
    )
    theirs.close()
    ours.sendall(script)
    if half_close:
        ours.shutdown(socket.SHUT_WR)
    ours.settimeout(20)
    out = b""
    while True:
        d = ours.recv(65536)
        if not d:
            break
        out += d
    rc = proc.wait(20)
    ours.close()
    return out, rc


def queued(home: Home) -> list[tuple[bytes, list[bytes]]]:
    out = []
    for f in sorted((home.queue / "todo").rglob("*")):
        if f.is_file():
            t = parse_todo(f.read_bytes())
            out.append((t.sender, list(t.recipients)))
    return out


def test_a_session_with_tcpserver_environment(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    out, rc = run(
        home,
        b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\n"
        b"DATA\r\nSubject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n",
        {"TCPREMOTEHOST": "relay.example", "TCPREMOTEINFO": "joe", "TCPLOCALHOST": "mx.here"},
    )
    lines = out.split(b"\r\n")
    assert lines[0] == b"220 mx.test.example ESMTP"
    assert lines[-2] == b"221 mx.test.example" and rc == 0
    assert any(line.startswith(b"250 ok ") and b" qp " in line for line in lines)
    assert queued(home) == [(b"a@b.example", [b"x@test.example"])]
    (mess,) = [f for f in (home.queue / "mess").rglob("*") if f.is_file()]
    text = mess.read_bytes()
    assert (
        b"Received: from relay.example (HELO client.example) (joe@192.0.2.9)\n"
        b"  by mx.here with SMTP; "
    ) in text
    assert text.endswith(b"Subject: s\n\nbody\n")


def test_relayclient_and_databytes_from_the_environment(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    out, _ = run(
        home,
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<joe>\r\nQUIT\r\n",
        {"RELAYCLIENT": "@fixme.example", "DATABYTES": "77"},
    )
    assert b"250 SIZE 77\r\n" in out
    out, _ = run(
        home,
        b"MAIL FROM:<a@b>\r\nRCPT TO:<v@elsewhere.example>\r\nDATA\r\nx\r\n.\r\n",
        {"RELAYCLIENT": ""},
    )
    assert out.endswith(b"354 go ahead\r\n" + out.split(b"\r\n")[-2] + b"\r\n")
    assert queued(home) == [(b"a@b", [b"v@elsewhere.example"])]


def test_timeout(home: Home) -> None:
    write_control(home, "timeoutsmtpd", "1\n")
    out, rc = run(home, b"HELO x\r\n", half_close=False)
    assert out.endswith(b"250 mx.test.example\r\n" + replies.TIMEOUT)
    assert rc == 1


def test_eof_inside_data_queues_nothing(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    out, rc = run(home, b"MAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nhalf")
    assert out.endswith(b"354 go ahead\r\n") and rc == 1  # qmail-smtpd: EOF is a read error, exit 1
    assert queued(home) == []
    assert not [f for f in (home.queue / "mess").rglob("*") if f.is_file()]


def test_bare_lf_closes_and_queues_nothing(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    out, rc = run(
        home,
        b"MAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nbare\n.\nMAIL FROM:<e@x>\r\n",
        half_close=False,
    )
    assert out.endswith(b"354 go ahead\r\n" + replies.BARE_LF)
    assert rc == 1  # as qmail-smtpd after its smtplf reply
    assert queued(home) == []


def test_qmailqueue_is_honoured(home: Home, tmp_path: Path) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    prog = tmp_path / "qq"
    prog.write_text("#!/bin/sh\ncat >/dev/null\nexit 53\n")
    prog.chmod(0o755)
    out, _ = run(
        home,
        b"MAIL FROM:<a@b>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nx\r\n.\r\n",
        {"QMAILQUEUE": str(prog)},
    )
    assert out.endswith(b"354 go ahead\r\n451 qq write error or disk full (#4.3.0)\r\n")


def test_no_controls_is_421(home: Home) -> None:
    (home.control / "me").unlink()
    (home.control / "smtpgreeting").unlink(missing_ok=True)
    out, rc = run(home, b"HELO x\r\n")
    assert out == replies.CONTROLS and rc != 0
