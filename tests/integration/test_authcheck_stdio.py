"""The checks of incoming mail in qmail-smtpd on stdio (the tcpserver door): the same
Authentication-Results header as the listener's (``pyqmail run``) for the same input,
enforce's refusals with the session going on, relay clients unchecked. DNS is Debian's
dnsmasq on loopback (test_authcheck_dns.py's records); qmail-smtpd runs as a program on a
socket pair with tcpserver's environment, and once under Debian's tcpserver itself."""

# ruff: noqa: F811  (the DNS fixtures are test_authcheck_dns.py's, imported by name)

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import dkim  # type: ignore[import-untyped]

from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.conftest import free_port, require_tools, write_control
from tests.integration.test_authcheck_dns import (  # noqa: F401
    FORGED,
    ME,
    _queued,
    _serve,
    dkim_key,
    dnsmasq,
)

SMTPD = [sys.executable, "-c", "import sys; from pyqmail.cli.smtpd import main; sys.exit(main())"]


def _env(home: Home, dns: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1", PYQMAIL_RESOLVER=dns,
               TCPREMOTEIP="127.0.0.1", TCPLOCALIP="127.0.0.1")  # fmt: skip
    env.update(extra or {})
    return env


def _talk(sock: socket.socket, script: list[bytes]) -> list[bytes]:
    """One command (or message) at a time, each reply read whole: the replies."""
    f = sock.makefile("rb")
    out = []

    def reply() -> bytes:
        text = b""
        while True:
            line = f.readline()
            text += line
            if line[3:4] != b"-":
                return text

    out.append(reply())
    for line in script:
        sock.sendall(line)
        out.append(reply())
    f.close()
    return out


def stdio_session(home: Home, dns: str, script: list[bytes], **extra: str) -> list[bytes]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(SMTPD, stdin=theirs, stdout=theirs, env=_env(home, dns, extra))
    theirs.close()
    ours.settimeout(30)
    try:
        return _talk(ours, script)
    finally:
        ours.close()
        proc.wait(30)


def transaction(sender: bytes, message: bytes) -> list[bytes]:
    return [b"MAIL FROM:<" + sender + b">\r\n", b"RCPT TO:<alice@test.example>\r\n",
            b"DATA\r\n", message.replace(b"\n", b"\r\n") + b".\r\n"]  # fmt: skip


def ar_header(mess: bytes) -> bytes:
    """Our Authentication-Results field (with its folding) in the queued header."""
    head = mess.split(b"\n\n", 1)[0] + b"\n"
    m = re.search(rb"^Authentication-Results: " + ME.encode() + rb";.*\n(?:[ \t].*\n)*", head,
                  re.MULTILINE)  # fmt: skip
    assert m is not None, head
    return m.group(0)


def second_home(tmp_path: Path) -> Home:
    h = Home(tmp_path / "q2", single_user=True)
    create_home(h, ME, None)
    write_control(h, "rcpthosts", "test.example\n")
    return h


def signed(key: bytes, frm: bytes, body: bytes = b"hello\n") -> bytes:
    msg = FORGED + b"From: " + frm + b"\nTo: alice@test.example\nSubject: s\n\n" + body
    sig = dkim.sign(msg.replace(b"\n", b"\r\n"), b"sel", b"dkim.test", key, linesep=b"\n",
                    include_headers=[b"from", b"subject"])  # fmt: skip
    return bytes(sig) + msg


def test_stdio_header_matches_the_listeners(
    home: Home, tmp_path: Path, dnsmasq: str, dkim_key: tuple[bytes, str]
) -> None:
    """Several messages, each through both doors: the two queued headers are byte-equal."""
    write_control(home, "rcpthosts", "test.example\n")
    cases = [
        (b"bob@pass.test", FORGED + b"From: bob@pass.test\nSubject: 0\n\nhello\n"),
        (b"bob@fail.test", b"From: bob@fail.test\nSubject: 1\n\n" + FORGED),
        (b"bob@fail.test", signed(dkim_key[0], b"bob@dkim.test")),  # DKIM carries DMARC
        (b"bob@pass.test", signed(dkim_key[0], b"bob@dkim.test").replace(b"hello", b"HELLO")),
        (b"", b"From: bob@garbage.test\nSubject: 4\n\nx\n"),  # HELO stands for <>
    ]
    run_home = second_home(tmp_path)
    listener = _serve(run_home, dnsmasq, cases)
    for replies in listener:
        assert replies[-2].startswith(b"250 ok"), replies
    stdio = []
    for sender, message in cases:
        out = stdio_session(home, dnsmasq, [b"HELO client.test\r\n", *transaction(sender, message),
                                            b"QUIT\r\n"])  # fmt: skip
        assert out[-2].startswith(b"250 ok"), out
        stdio.append(out)
    a = sorted(ar_header(m) for m in _queued(run_home))
    b = sorted(ar_header(m) for m in _queued(home))
    assert len(a) == len(cases) and a == b
    joined = b"".join(b)
    for want in (b"spf=pass smtp.mailfrom=bob@pass.test", b"spf=fail smtp.mailfrom=bob@fail.test",
                 b"dkim=pass header.d=dkim.test", b"dkim=fail header.d=dkim.test",
                 b"dmarc=permerror header.from=garbage.test"):  # fmt: skip
        assert want in joined, joined
    for mess in _queued(home):  # the forged field claiming us is gone; one in a body stays
        head = mess.split(b"\n\n", 1)[0]
        assert b"x@fail.test" not in head


def test_stdio_enforces_and_the_session_goes_on(home: Home, dnsmasq: str) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    write_control(home, "authchecks", "spf=enforce\ndmarc=enforce\n")
    out = stdio_session(home, dnsmasq, [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<bob@fail.test>\r\n",  # SPF fail: refused at MAIL
        *transaction(b"bob@neutral.test", b"From: bob@neutral.test\n\nx\n"),  # DMARC reject
        *transaction(b"bob@pass.test", b"From: bob@pass.test\n\nx\n"),
        b"QUIT\r\n",
    ])  # fmt: skip
    assert out[2].startswith(b"550 5.7.23 "), out
    assert out[3].startswith(b"250 ") and out[6].startswith(b"550 5.7.1 "), out
    assert out[10].startswith(b"250 ok"), out
    assert out[11].startswith(b"221 ")
    (mess,) = _queued(home)
    assert b"spf=pass smtp.mailfrom=bob@pass.test" in ar_header(mess)


def test_stdio_relay_clients_and_all_off_are_not_checked(home: Home, dnsmasq: str) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    msg = FORGED + b"From: bob@fail.test\n\nx\n"
    out = stdio_session(home, dnsmasq, transaction(b"bob@fail.test", msg), RELAYCLIENT="")
    assert out[-1].startswith(b"250 ok")
    write_control(home, "authchecks", "spf=off\ndkim=off\ndmarc=off\n")
    out = stdio_session(home, dnsmasq, transaction(b"bob@fail.test", msg))
    assert out[-1].startswith(b"250 ok")
    for mess in _queued(home):  # unchecked: no header of ours, nothing removed
        assert mess.count(b"Authentication-Results:") == 1 and b"x@fail.test" in mess


def test_stdio_spf_only_streams_with_the_header(home: Home, dnsmasq: str) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    write_control(home, "authchecks", "dkim=off\ndmarc=off\n")
    out = stdio_session(
        home,
        dnsmasq,
        [
            b"HELO helo.test\r\n",
            *transaction(b"bob@fail.test", FORGED + b"From: bob@fail.test\n\nx\n"),
        ],
    )
    assert out[-1].startswith(b"250 ok")
    (mess,) = _queued(home)
    assert ar_header(mess) == (b"Authentication-Results: mx.test.example;\n"
                               b"\tspf=fail smtp.mailfrom=bob@fail.test;\n"
                               b"\tspf=pass smtp.helo=helo.test\n")  # fmt: skip
    assert b"x@fail.test" not in mess


def test_under_debians_tcpserver(home: Home, dnsmasq: str) -> None:
    """qmail-smtpd under tcpserver (ucspi-tcp) on a real port: the header is there."""
    require_tools("tcpserver")
    write_control(home, "rcpthosts", "test.example\n")
    port = free_port()
    proc = subprocess.Popen(["tcpserver", "-R", "-H", "-l", ME, "127.0.0.1", str(port), *SMTPD],
                            env=_env(home, dnsmasq), stderr=subprocess.PIPE)  # fmt: skip
    try:
        for _ in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                if proc.poll() is not None:
                    raise AssertionError("tcpserver did not start") from None
                time.sleep(0.05)
        with sock:
            out = _talk(sock, [b"HELO client.test\r\n",
                               *transaction(b"bob@pass.test", b"From: bob@pass.test\n\nx\n"),
                               b"QUIT\r\n"])  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
    assert out[-2].startswith(b"250 ok"), out
    (mess,) = _queued(home)
    assert ar_header(mess) == (
        b"Authentication-Results: mx.test.example;\n"
        b"\tspf=pass smtp.mailfrom=bob@pass.test;\n"
        b"\tspf=none smtp.helo=client.test;\n"
        b"\tdkim=none;\n"
        b"\tdmarc=pass header.from=pass.test policy.dmarc=reject\n"
    )
