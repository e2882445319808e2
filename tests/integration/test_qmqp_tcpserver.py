"""Our qmail-qmqpd and qmail-qmtpd under Debian's tcpserver with rules compiled by Debian's
tcprules, as a qmail site runs them; our qmail-qmqpc as the client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.netstring import decode_all, encode
from pyqmail.queue.envelope import format_input
from tests.conftest import free_port, require_tools
from tests.integration.test_qmqp_server import queued

pytestmark = pytest.mark.interop
BIN = Path(sys.executable).parent


def _tcpserver(home: Home, rules: str, prog: str, port: int) -> subprocess.Popen[bytes]:
    require_tools("tcpserver", "tcprules")
    cdb = home.control / f"{prog}.cdb"
    subprocess.run(["tcprules", str(cdb), str(cdb) + ".tmp"], input=rules.encode(), check=True)
    env = {**os.environ, "PYQMAIL_HOME": str(home.root), "PYQMAIL_SINGLE_USER": "1"}
    proc = subprocess.Popen(
        ["tcpserver", "-v", "-R", "-H", "-l", "mx.test.example", "-x", str(cdb),
         "127.0.0.1", str(port), str(BIN / prog)],
        env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "tcpserver: status: 0/40": it listens
    assert b"status" in line, line
    return proc


@pytest.fixture
def servers(home: Home) -> Iterator[tuple[Home, int, int]]:
    qmqp_port, qmtp_port = free_port(), free_port()
    procs = [
        _tcpserver(home, "127.0.0.1:allow\n:deny\n", "qmail-qmqpd", qmqp_port),
        _tcpserver(home, '127.0.0.1:allow,RELAYCLIENT=""\n:deny\n', "qmail-qmtpd", qmtp_port),
    ]
    yield home, qmqp_port, qmtp_port
    for p in procs:
        p.terminate()
        p.wait(10)
        if p.stderr:
            p.stderr.close()


def talk(port: int, data: bytes) -> bytes:
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_qmqpc_to_qmqpd_under_tcpserver(servers: tuple[Home, int, int], tmp_path: Path) -> None:
    home, qmqp_port, _ = servers
    null = Home(tmp_path / "null", single_user=True)
    create_home(null, "null.test.example", None)
    (null.control / "qmqpservers").write_text(f"127.0.0.1:{qmqp_port}\n")
    rfd, wfd = os.pipe()
    os.write(wfd, format_input(b"s@null.test.example", [b"a@elsewhere.example"]))
    os.close(wfd)
    env = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(null.root), "PYQMAIL_SINGLE_USER": "1"}
    try:
        r = subprocess.run([str(BIN / "qmail-qmqpc")], input=b"Subject: t\n\nhi\n", stdout=rfd,
                           env=env, timeout=60)  # fmt: skip
    finally:
        os.close(rfd)
    assert r.returncode == 0
    [(sender, rcpts, mess)] = queued(home)
    assert (sender, rcpts) == (b"s@null.test.example", (b"a@elsewhere.example",))
    assert b"Received: from unknown (127.0.0.1)\n  by mx.test.example with QMQP; " in mess


def test_qmtpd_under_tcpserver_relays_for_relayclient(servers: tuple[Home, int, int]) -> None:
    home, _, qmtp_port = servers
    (home.control / "rcpthosts").write_text("mx.test.example\n")
    data = encode(b"\nSubject: t\n\nhi\n") + encode(b"s@x") + encode(encode(b"a@far.example"))
    [reply] = decode_all(talk(qmtp_port, data))
    assert reply.startswith(b"Kok ")  # RELAYCLIENT from the rules skips rcpthosts
    [(_, rcpts, mess)] = queued(home)
    assert rcpts == (b"a@far.example",)
    assert b"\n  by mx.test.example with QMTP; " in mess


def test_rules_deny_other_clients(servers: tuple[Home, int, int]) -> None:
    home, qmqp_port, _ = servers
    request = encode(encode(b"x\n") + encode(b"s") + encode(b"r@x.example"))
    out = b""
    with socket.create_connection(("127.0.0.1", qmqp_port), 20, ("127.0.0.2", 0)) as s:
        try:
            s.sendall(request)
            out = s.recv(1000)
        except OSError:
            pass
    assert out == b""
    assert queued(home) == []
