"""The same attacks against ``qmail-smtpd`` on stdin/stdout (as tcpserver runs it): the
adapter shares the protocol core with the listener, but has its own loop, its own error
handling and its own end of session."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.security._support import queued

BIN = Path(sys.executable).parent


def _session(home: Home, data: bytes, env: dict[str, str] | None = None) -> tuple[bytes, int]:
    """Run qmail-smtpd with a socket as fd 0/1, send ``data``, half-close, read all."""
    (home.control / "rcpthosts").write_text("test.example\n")
    ours, theirs = socket.socketpair()
    full = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1",
                TCPREMOTEIP="192.0.2.9", TCPLOCALIP="127.0.0.1", **(env or {}))  # fmt: skip
    full.pop("RELAYCLIENT", None)
    proc = subprocess.Popen(
        [str(BIN / "qmail-smtpd")], stdin=theirs.fileno(), stdout=theirs.fileno(),
        stderr=subprocess.PIPE, env=full,
    )  # fmt: skip
    theirs.close()
    ours.settimeout(30)
    try:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    out = b""
    try:
        while chunk := ours.recv(65536):
            out += chunk
    except OSError:
        pass
    ours.close()
    _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in out + err, err
    return out, proc.returncode


EVIL = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@test.example>\r\nDATA\r\nx\r\n"


@pytest.mark.parametrize(
    "attack",
    [
        b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"one\r.\r" + EVIL + b".\r\n",
        b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"one\n.\n" + EVIL + b".\r\n",
        b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n"
        + EVIL
        + b".\r\n",
        b"HELO x\r\nQUIT\r\n" + EVIL + b".\r\n",
        b"POST / HTTP/1.1\r\n\r\n" + EVIL + b".\r\n",
        b"HELO x\r\nBDAT 100 LAST\r\n" + EVIL + b".\r\n",
        b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example\x00Tv@elsewhere.example>"
        b"\r\nDATA\r\n",
        b"\x16\x03\x01\x00\x05hello" + EVIL,
        b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"cut short without the final dot\r\n",
    ],
    ids=["CR.CR", "LF.LF", "stuffing", "after-quit", "http", "bdat", "nul", "tls", "eof"],
)
def test_attack_queues_nothing(home: Home, attack: bytes) -> None:
    out, code = _session(home, attack)
    assert out.startswith(b"220 ")
    assert re.search(rb"250 ok \d+ qp \d+", out) is None, out  # nothing was accepted
    assert queued(home) == []
    assert code in (0, 1)


SHELLSHOCK = b"() { :; }; /bin/touch /tmp/x"  # the published exploit's sender


def test_the_shellshock_exploit_is_refused_at_mail_and_rcpt(home: Home) -> None:
    """The published exploit's conversation; then the sender quoted; then in RCPT."""
    out, _ = _session(
        home,
        b"HELO x\r\nMAIL FROM:<" + SHELLSHOCK + b">\r\nRCPT TO:<x@test.example>\r\nDATA\r\n",
    )
    assert [line[:3] for line in out.split(b"\r\n")[:5]] == [b"220", b"250", b"553", b"503", b"503"]
    out, _ = _session(
        home,
        b'MAIL FROM:<"' + SHELLSHOCK + b'"@b.example>\r\n'
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<" + SHELLSHOCK + b"@test.example>\r\n"
        b'RCPT TO:<"x-' + SHELLSHOCK + b'"@test.example>\r\nQUIT\r\n',
    )
    codes = [line[:3] for line in out.split(b"\r\n") if line]
    assert codes == [b"220", b"553", b"250", b"553", b"553", b"221"], out
    assert out.count(b"shell function definition") == 2
    assert queued(home) == []


def test_long_line_and_error_flood(home: Home) -> None:
    out, _ = _session(home, b"NOOP " + b"x" * 100_000 + b"\r\n" + b"BOGUS\r\n" * 40)
    assert b"500 " in out
    assert out.count(b"\r\n421 ") == 1
    assert queued(home) == []


def test_normal_session_after_hostile_bytes_in_helo(home: Home) -> None:
    out, _ = _session(
        home,
        b"HELO \xff\xfe(evil)[x] <script>\r\nMAIL FROM:<a@b.example>\r\n"
        b"RCPT TO:<x@test.example>\r\nDATA\r\nSubject: s\r\n\r\nb\r\n.\r\nQUIT\r\n",
    )
    assert b"\r\n250 ok " in out and out.endswith(b"221 mx.test.example\r\n")
    assert queued(home) == [(b"a@b.example", [b"x@test.example"])]
    mess = next(f for f in (home.queue / "mess").rglob("*") if f.is_file()).read_bytes()
    received = mess.split(b"\n")[1]
    assert received.startswith(b"Received: from unknown (HELO ???evil?[x]??script?)"), received


def test_hostile_ptr_and_ident_never_break_the_received_line(home: Home) -> None:
    """TCPREMOTEHOST comes from the client's PTR record and TCPREMOTEINFO from its ident
    server: both are the attacker's; qmail's ``?`` substitution keeps them in one field."""
    out, _ = _session(
        home,
        b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"Subject: s\r\n\r\nb\r\n.\r\nQUIT\r\n",
        env={"TCPREMOTEHOST": "evil.example\nX-Evil: 1", "TCPREMOTEINFO": "id\r\nX-Id: 2"},
    )
    assert re.search(rb"250 ok \d+ qp \d+", out), out
    mess = next(f for f in (home.queue / "mess").rglob("*") if f.is_file()).read_bytes()
    header = mess.split(b"\n\n", 1)[0].split(b"\n")
    assert not any(line.startswith((b"X-Evil", b"X-Id")) for line in header), header
    assert header[1] == b"Received: from evil.example?X-Evil:?1 (HELO x) (id??X-Id:?2@192.0.2.9)"
