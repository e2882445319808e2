"""STARTTLS in our qmail-smtpd under Debian's tcpserver (the stdin/stdout door, TLS over
MemoryBIO): smtplib, swaks --tls, openssl s_client and raw bytes for the injection class."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.smtp import replies
from tests.conftest import free_port, require_tools
from tests.integration.test_smtpd_tls import INJECTED, Raw, install_cert

pytestmark = pytest.mark.interop
BIN = Path(sys.executable).parent


class Door:
    def __init__(self, home: Home, port: int, ca: trustme.CA) -> None:
        self.home, self.port, self.ca = home, port, ca

    def ctx(self) -> ssl.SSLContext:
        c = ssl.create_default_context()
        self.ca.configure_trust(c)
        return c

    def messages(self) -> list[bytes]:
        return [
            f.read_bytes() for f in sorted((self.home.queue / "mess").rglob("*")) if f.is_file()
        ]


def _wait_greeting(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("tcpserver + qmail-smtpd did not come up")


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    require_tools("tcpserver")
    ca = trustme.CA()
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").write_text("test.example\n")
    install_cert(home, ca, "mx.test.example")
    port = free_port()
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    proc = subprocess.Popen(
        ["tcpserver", "-R", "-H", "-l", "mx.test.example", "127.0.0.1", str(port),
         str(BIN / "qmail-smtpd")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_greeting(port)
        yield Door(home, port, ca)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert b"Traceback" not in err, err.decode(errors="replace")


def test_smtplib_starttls_through_tcpserver(door: Door) -> None:
    with smtplib.SMTP("127.0.0.1", door.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
        s.starttls(context=door.ctx())
        s.ehlo("client.example")
        assert not s.has_extn("starttls")
        assert s.sock is not None
        cipher, version, _ = s.sock.cipher()  # type: ignore[union-attr]
        s.sendmail("a@example.org", ["x@test.example"], "Subject: stdio tls\r\n\r\nhi\r\n")
    [mess] = door.messages()
    assert f" with ESMTPS ({version} {cipher}); ".encode() in mess


def test_swaks_tls_through_tcpserver(door: Door) -> None:
    require_tools("swaks")
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{door.port}", "--tls", "--timeout", "30",
         "--from", "s@example.org", "--to", "x@test.example"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:]
    m = re.search(r"TLS started with cipher ([^:]+):([^:]+):", out.stdout)
    assert m is not None
    [mess] = door.messages()
    assert f"with ESMTPS ({m.group(1)} {m.group(2)});".encode() in mess


@pytest.mark.parametrize(
    ("flag", "works"), [("-tls1_3", True), ("-tls1_2", True), ("-tls1_1", False)]
)
def test_openssl_versions_through_tcpserver(door: Door, flag: str, works: bool) -> None:
    require_tools("openssl")
    cmd = ["openssl", "s_client", "-brief", "-starttls", "smtp", "-connect",
           f"127.0.0.1:{door.port}", flag, "-cipher", "DEFAULT:@SECLEVEL=0"]  # fmt: skip
    out = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=30)
    got = re.search(r"^Protocol version: *(\S+)", out.stdout + out.stderr, re.M)
    assert (got is not None) == works, out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_nothing_pipelined_behind_starttls_runs_under_tcpserver(door: Door, name: str) -> None:
    c = Raw(door.port)
    c.reply()
    c.cmd(b"EHLO client.example")
    c.sock.sendall(b"STARTTLS\r\n" + INJECTED[name].replace(b"alice@", b"x@"))
    assert c.reply() == replies.TLS_GO
    assert c.buf == b""
    c.starttls(door.ctx())
    assert c.unasked(1.0) == b""
    assert c.cmd(b"EHLO client.example").startswith(b"250-mx.test.example")
    assert c.cmd(b"RCPT TO:<x@test.example>") == replies.MAIL_FIRST
    assert c.cmd(b"STARTTLS") == replies.TLS_ACTIVE
    c.close()
    assert door.messages() == []


def test_a_bad_handshake_ends_only_that_session(door: Door) -> None:
    c = Raw(door.port)
    c.reply()
    assert c.cmd(b"STARTTLS") == replies.TLS_GO
    c.sock.sendall(b"MAIL FROM:<evil@attacker.example>\r\n")
    rest = c.until_eof()
    assert rest == b"" or rest.startswith(b"\x15\x03")  # at most a TLS alert
    c.close()
    assert door.messages() == []


def test_a_bad_certificate_means_454_and_clear_text_still_works(door: Door) -> None:
    (door.home.control / "servercert.pem").write_text("this is not a certificate\n")
    with smtplib.SMTP("127.0.0.1", door.port, timeout=30) as s:
        s.ehlo("client.example")
        assert not s.has_extn("starttls")
        assert s.docmd("STARTTLS")[0] == 454
        s.sendmail("a@example.org", ["x@test.example"], "Subject: clear\r\n\r\nhi\r\n")
    [mess] = door.messages()
    assert b" with SMTP; " in mess
