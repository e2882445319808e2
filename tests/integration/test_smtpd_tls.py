"""STARTTLS, implicit TLS and submission on ``pyqmail run``'s listeners, with real clients:
smtplib, ``openssl s_client -starttls smtp`` and ``swaks --tls`` on 127.0.0.1, and raw
sockets for the STARTTLS injection class (CVE-2011-0411). Certificates come from a
trustme CA; mail is delivered to a Maildir and its Received line is read back."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.smtp import replies
from tests.conftest import free_port, require_tools
from tests.integration.test_run_daemon import Mta, files, listening, wait_for

GREETING = b"220 mx.test.example ESMTP\r\n"


class TlsMta(Mta):
    def __init__(self, home: Home, tmp: Path, ca: trustme.CA) -> None:
        super().__init__(home, tmp)
        self.ca = ca
        self.smtps = free_port()
        self.submission = free_port()
        self.leaf = install_cert(home, ca, "mx.test.example")

    def start_tls(self) -> None:
        self.start("--smtps", f"127.0.0.1:{self.smtps}",
                   "--submission", f"127.0.0.1:{self.submission}")  # fmt: skip
        wait_for(lambda: listening(self.smtps) and listening(self.submission), what="TLS ports")

    def client_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def delivered(self, subject: str) -> bytes:
        found: list[bytes] = []

        def look() -> bool:
            for f in files(self.maildir("alice")):
                data = f.read_bytes()
                if f"Subject: {subject}\n".encode() in data:
                    found.append(data)
                    return True
            return False

        wait_for(look, what=f"delivery of {subject!r}")
        return found[0]


def install_cert(home: Home, ca: trustme.CA, name: str) -> trustme.LeafCert:
    leaf = ca.issue_cert(name, "127.0.0.1")
    pem = home.control / "servercert.pem"
    tmp = home.control / "servercert.pem.new"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp))
    tmp.chmod(0o600)
    os.replace(tmp, pem)
    return leaf


def served(port: int, ca: trustme.CA) -> bytes:
    """The certificate a new STARTTLS connection to ``port`` is given (DER)."""
    c = Raw(port)
    c.reply()
    c.cmd(b"EHLO client.example")
    assert c.cmd(b"STARTTLS") == replies.TLS_GO
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    c.starttls(ctx)
    got = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    c.close()
    assert got is not None
    return bytes(got)


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def received_line(message: bytes) -> bytes:
    """Our own Received line, unfolded (the first one: with TLS it goes above
    qmail-queue's, queue/writer.py)."""
    m = re.search(rb"\nReceived: from .*?\n  by [^\n]*\n", message)
    assert m is not None, message[:400]
    return m.group(0).replace(b"\n  ", b" ").strip()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def mta(tmp_path: Path, ca: trustme.CA) -> Iterator[TlsMta]:
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    m = TlsMta(home, tmp_path, ca)
    m.start_tls()
    yield m
    m.stop()
    assert "Traceback" not in m.log()


class Raw:
    """A raw client: exact bytes in one write, replies read back."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), 15)
        if ctx is not None:
            self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.test.example")
        self.buf = b""

    def reply(self) -> bytes:
        while True:
            m = re.search(rb"(?:^|\r\n)\d{3} [^\r\n]*\r\n", self.buf)
            if m is not None:
                out, self.buf = self.buf[: m.end()], self.buf[m.end() :]
                return out
            data = self.sock.recv(65536)
            if not data:
                out, self.buf = self.buf, b""
                return out
            self.buf += data

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert not self.buf
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.test.example")

    def unasked(self, wait: float = 1.0) -> bytes:
        self.sock.settimeout(wait)
        try:
            return self.buf + self.sock.recv(65536)
        except (TimeoutError, ssl.SSLError, OSError):
            return self.buf
        finally:
            self.sock.settimeout(15)

    def until_eof(self, wait: float = 10.0) -> bytes:
        """Everything until the server closes (an AssertionError if it does not)."""
        data, self.buf = self.buf, b""
        self.sock.settimeout(wait)
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def test_smtplib_starttls_delivers_and_received_says_esmtps(mta: TlsMta) -> None:
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
        s.starttls(context=mta.client_ctx())
        s.ehlo("client.example")
        assert not s.has_extn("starttls")  # RFC 3207 4.2: not offered again
        assert s.sock is not None
        cipher, version, _bits = s.sock.cipher()  # type: ignore[union-attr]
        s.sendmail("a@example.org", ["alice@test.example"], "Subject: smtplib tls\r\n\r\nhi\r\n")
    message = mta.delivered("smtplib tls")
    line = received_line(message)
    assert f" with ESMTPS ({version} {cipher}); ".encode() in line, line
    first = message.index(b"\nReceived: ")
    assert message.index(b"\nReceived: from ") == first  # the TLS line is on top
    assert message.index(b"\nReceived: (qmail ") > first
    assert b"(HELO client.example)" in line


@pytest.mark.parametrize(
    ("flag", "works"),
    [("-tls1_2", True), ("-tls1_3", True), ("-tls1_1", False), ("-tls1", False)],
)
def test_openssl_s_client_starttls_versions(mta: TlsMta, flag: str, works: bool) -> None:
    require_tools("openssl")
    cmd = ["openssl", "s_client", "-brief", "-starttls", "smtp",
           "-connect", f"127.0.0.1:{mta.port}", flag]  # fmt: skip
    if not works:
        cmd += ["-cipher", "DEFAULT:@SECLEVEL=0"]
    out = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    version = re.search(r"^Protocol version: *(\S+)", text, re.M)
    if works:
        want = {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[flag]
        assert version is not None and version.group(1) == want, text
    else:
        assert version is None, text
    assert listening(mta.port)


def test_swaks_tls_delivers_with_its_cipher_named(mta: TlsMta) -> None:
    require_tools("swaks")
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{mta.port}", "--tls", "--timeout", "30",
         "--from", "s@example.org", "--to", "alice@test.example", "--h-Subject", "swaks tls"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:]
    m = re.search(r"TLS started with cipher ([^:]+):([^:]+):", out.stdout)
    assert m is not None, out.stdout
    line = received_line(mta.delivered("swaks tls"))
    assert f"with ESMTPS ({m.group(1)} {m.group(2)});".encode() in line


# What an attacker puts in the same TCP segment as STARTTLS (the client's write).
INJECTED = {
    "rset": b"RSET\r\n",
    "mail": b"MAIL FROM:<evil@attacker.example>\r\n",
    "transaction": b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<alice@test.example>\r\n"
    b"DATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n",
    "quit": b"QUIT\r\n",
}


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_nothing_pipelined_behind_starttls_runs_inside_tls(mta: TlsMta, name: str) -> None:
    c = Raw(mta.port)
    assert c.reply() == GREETING
    c.cmd(b"EHLO client.example")
    c.sock.sendall(b"STARTTLS\r\n" + INJECTED[name])
    assert c.reply() == replies.TLS_GO
    assert c.buf == b""  # nothing else in clear text
    c.starttls(mta.client_ctx())
    assert c.unasked(1.0) == b""  # nothing answered inside TLS either
    assert c.cmd(b"EHLO client.example").startswith(b"250-mx.test.example")
    assert c.cmd(b"RCPT TO:<alice@test.example>") == replies.MAIL_FIRST
    assert c.cmd(b"QUIT").startswith(b"221")
    c.close()
    assert not any(b"Subject: injected" in f.read_bytes() for f in files(mta.maildir("alice")))


def test_starttls_refusals_on_the_wire(mta: TlsMta) -> None:
    c = Raw(mta.port)
    c.reply()
    c.cmd(b"EHLO client.example")
    assert c.cmd(b"STARTTLS now") == replies.TLS_SYNTAX
    assert c.cmd(b"MAIL FROM:<a@example.org>") == replies.OK
    assert c.cmd(b"STARTTLS") == replies.TLS_IN_MAIL
    assert c.cmd(b"RSET") == replies.FLUSHED
    assert c.cmd(b"STARTTLS") == replies.TLS_GO
    c.starttls(mta.client_ctx())
    assert c.cmd(b"STARTTLS") == replies.TLS_ACTIVE
    assert c.cmd(b"NOOP") == replies.OK
    c.close()


def test_failed_handshakes_leave_the_listener_whole(mta: TlsMta) -> None:
    # more failures than the connection limit (100): a leaked slot would lock clients out
    for _ in range(105):
        c = Raw(mta.port)
        c.reply()
        c.sock.sendall(b"STARTTLS\r\n")
        assert c.reply() == replies.TLS_GO
        c.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
        rest = c.until_eof()
        assert rest == b"" or rest.startswith(b"\x15\x03")  # closed, at most a TLS alert
        c.close()
    mta.send("a@example.org", ["alice@test.example"], subject="after failures")
    mta.delivered("after failures")


def test_a_replaced_certificate_reaches_new_connections_without_a_restart(
    mta: TlsMta, ca: trustme.CA
) -> None:
    assert served(mta.port, ca) == der(mta.leaf)
    pid = mta.proc.pid if mta.proc else 0
    new = install_cert(mta.home, ca, "mx.test.example")
    wait_for(lambda: served(mta.port, ca) == der(new), timeout=10, what="the new certificate")
    assert mta.proc is not None and mta.proc.pid == pid and mta.proc.poll() is None


def _password(mta: TlsMta) -> None:
    """The submission doors take mail only after AUTH (smtp/protocol.py; tests of AUTH
    itself: test_smtpd_auth.py)."""
    from pyqmail.smtp.passwords import set_password

    set_password(mta.home, b"sub", b"sub pw")

    def offered() -> bool:  # the listener looks at the password files at most once a second
        c = Raw(mta.smtps, mta.client_ctx())
        c.reply()
        got = c.cmd(b"EHLO client.example")
        c.close()
        return b"AUTH PLAIN LOGIN" in got

    wait_for(offered, what="AUTH offered")


def test_implicit_tls_on_the_smtps_port(mta: TlsMta) -> None:
    _password(mta)
    with smtplib.SMTP_SSL(
        "127.0.0.1", mta.smtps, timeout=30, context=mta.client_ctx(), local_hostname="c.example"
    ) as s:
        s.ehlo()
        assert not s.has_extn("starttls")
        assert s.docmd("STARTTLS")[0] == 503
        with pytest.raises(smtplib.SMTPSenderRefused):
            s.sendmail("a@example.org", ["alice@test.example"], "Subject: no\r\n\r\nhi\r\n")
        s.rset()
        s.login("sub", "sub pw")
        s.sendmail("a@example.org", ["alice@test.example"], "Subject: smtps\r\n\r\nhi\r\n")
    assert b" with ESMTPSA (TLSv1.3 " in received_line(mta.delivered("smtps"))


def test_plain_text_on_the_smtps_port_is_not_smtp(mta: TlsMta) -> None:
    c = Raw(mta.smtps)
    c.sock.sendall(b"EHLO client.example\r\n")
    assert c.unasked(5.0) == b""  # no greeting, no reply in clear text: the handshake failed
    c.close()
    assert listening(mta.smtps)


def test_the_submission_port_offers_starttls(mta: TlsMta) -> None:
    _password(mta)
    with smtplib.SMTP("127.0.0.1", mta.submission, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
        s.starttls(context=mta.client_ctx())
        s.ehlo("client.example")
        s.login("sub", "sub pw")
        s.sendmail("a@example.org", ["alice@test.example"], "Subject: submission\r\n\r\nhi\r\n")
    assert b" with ESMTPSA " in received_line(mta.delivered("submission"))


def test_a_bad_certificate_is_a_warning_and_mail_still_flows(
    tmp_path: Path, ca: trustme.CA
) -> None:
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    m = TlsMta(home, tmp_path, ca)
    (home.control / "servercert.pem").write_text("this is not a certificate\n")
    m.start_tls()
    try:
        log = m.log()
        assert "control/servercert.pem cannot be used" in log, log
        c = Raw(m.port)
        c.reply()
        assert b"STARTTLS" not in c.cmd(b"EHLO client.example")
        assert c.cmd(b"STARTTLS") == replies.TLS_UNAVAILABLE
        c.close()
        m.send("a@example.org", ["alice@test.example"], subject="clear")
        m.delivered("clear")
        s = Raw(m.smtps)  # implicit TLS without a certificate: closed, never plain SMTP
        assert s.unasked(5.0) == b""
        s.close()
    finally:
        assert m.stop() == 0
    assert "Traceback" not in m.log()
