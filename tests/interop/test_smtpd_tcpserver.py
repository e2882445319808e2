"""Our qmail-smtpd under Debian's tcpserver, with a rules cdb made by Debian's tcprules,
driven by swaks and raw bytes: the way a qmail site runs it."""

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
from pyqmail.queue.envelope import parse_todo
from pyqmail.smtp import replies
from tests.conftest import free_port, require_tools

pytestmark = pytest.mark.interop

TOOLS = ("tcpserver", "tcprules", "swaks")
BIN = Path(sys.executable).parent


def _need_tools() -> None:
    require_tools(*TOOLS)


class Site:
    def __init__(self, home: Home, port: int) -> None:
        self.home = home
        self.port = port

    def queued(self) -> list[tuple[bytes, list[bytes]]]:
        out = []
        for f in sorted((self.home.queue / "todo").rglob("*")):
            if f.is_file():
                t = parse_todo(f.read_bytes())
                out.append((t.sender, list(t.recipients)))
        return out

    def clear(self) -> None:
        for f in (self.home.queue / "todo").rglob("*"):
            if f.is_file():
                f.unlink()

    def swaks(self, *args: str, source: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["swaks", "--server", f"127.0.0.1:{self.port}", "--hide-all", *args]
        if source:
            cmd += ["--local-interface", source]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def swaks_transcript(self, *args: str) -> str:
        cmd = ["swaks", "--server", f"127.0.0.1:{self.port}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout


def _wait_port(port: int) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2) as s:
                # the greeting: qmail-smtpd is up, not just tcpserver. Each probe starts a
                # qmail-smtpd, which takes a second on a loaded machine: wait for it here
                s.settimeout(max(deadline - time.monotonic(), 0.1))
                if s.recv(100):
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("tcpserver did not come up")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    _need_tools()
    root = tmp_path_factory.mktemp("tcpserver")
    home = Home(root / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").write_text("test.example\n.sub.test.example\n")
    (home.control / "badmailfrom").write_text("spammer@evil.example\n@worse.example\n")
    (home.control / "databytes").write_text("20000\n")
    subprocess.run(
        ["tcprules", str(root / "tcp.smtp.cdb"), str(root / "tcp.smtp.tmp")],
        input=b'127.0.0.2:allow,RELAYCLIENT=""\n127.0.0.3:deny\n'
        b'127.0.0.5:allow,DATABYTES="100"\n:allow\n',
        check=True,
    )
    port = free_port()
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    proc = subprocess.Popen(
        [
            "tcpserver",
            "-x",
            str(root / "tcp.smtp.cdb"),
            "-R",
            "-H",
            "-l",
            "mx.test.example",
            "127.0.0.1",
            str(port),
            str(BIN / "qmail-smtpd"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        yield Site(home, port)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def _clean(site: Site) -> None:
    site.clear()


def test_swaks_delivers_to_rcpthosts_domains(site: Site) -> None:
    assert site.swaks("--from", "a@b.example", "--to", "rcpt@test.example").returncode == 0
    assert site.swaks("--from", "a@b.example", "--to", "x@a.sub.test.example").returncode == 0
    assert sorted(site.queued()) == [
        (b"a@b.example", [b"rcpt@test.example"]),
        (b"a@b.example", [b"x@a.sub.test.example"]),
    ]


def test_relay_refused_without_relayclient_allowed_with_it(site: Site) -> None:
    assert site.swaks("--from", "a@b.example", "--to", "v@elsewhere.example").returncode != 0
    assert site.queued() == []
    r = site.swaks("--from", "a@b.example", "--to", "v@elsewhere.example", source="127.0.0.2")
    assert r.returncode == 0
    assert site.queued() == [(b"a@b.example", [b"v@elsewhere.example"])]


def test_tcprules_deny(site: Site) -> None:
    assert (
        site.swaks("--from", "a@b.example", "--to", "x@test.example", source="127.0.0.3").returncode
        != 0
    )
    assert site.queued() == []


def test_badmailfrom(site: Site) -> None:
    for sender in ("spammer@evil.example", "who@worse.example"):
        out = site.swaks_transcript("--from", sender, "--to", "x@test.example")
        assert "553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)" in out
    assert site.queued() == []


def test_databytes_from_control_and_from_a_rule(site: Site) -> None:
    body = site.home.root / "big"
    body.write_text(("a" * 70 + "\n") * 800)
    out = site.swaks_transcript(
        "--from", "a@b.example", "--to", "x@test.example", "--body", str(body)
    )
    assert "552 sorry, that message size exceeds my databytes limit (#5.3.4)" in out
    cmd = [
        "swaks",
        "--server",
        f"127.0.0.1:{site.port}",
        "--local-interface",
        "127.0.0.5",
        "--from",
        "a@b.example",
        "--to",
        "x@test.example",
        "--body",
        "x" * 200,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    assert "250 SIZE 100" in out and "552 sorry" in out
    assert site.queued() == []


def test_received_line_uses_tcpserver_environment(site: Site) -> None:
    assert (
        site.swaks(
            "--from", "a@b.example", "--to", "x@test.example", "--ehlo", "client.example"
        ).returncode
        == 0
    )
    mess = [f for f in (site.home.queue / "mess").rglob("*") if f.is_file()]
    text = max(mess, key=lambda f: f.stat().st_mtime).read_bytes()
    assert b"Received: from unknown (HELO client.example) (127.0.0.1)\n  by mx.test.example" in text


def _raw(site: Site) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", site.port), 10)
    assert s.recv(1000).startswith(b"220 mx.test.example ESMTP")
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            d = s.recv(65536)
        except OSError:
            break
        if not d:
            break
        out += d
    return out


@pytest.mark.parametrize("seq", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_smuggling_and_bare_lf_under_tcpserver(site: Site, seq: bytes) -> None:
    s = _raw(site)
    s.sendall(b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<s@test.example>\r\nDATA\r\n")
    got = b""
    while b"354" not in got:
        got += s.recv(1000)
    s.sendall(
        b"Subject: outer\r\n\r\nhello" + seq + b"MAIL FROM:<evil@x.example>\r\n"
        b"RCPT TO:<smuggled@test.example>\r\nDATA\r\nbad\r\n.\r\n"
    )
    rest = _read_all(s)
    assert rest.startswith(b"451 ") and b"250" not in rest and b"354" not in rest
    assert site.queued() == []


def test_long_lines_and_nul_under_tcpserver(site: Site) -> None:
    s = _raw(site)
    s.sendall(b"MAIL FROM:<" + b"a" * 5000 + b"@b.example>\r\nMAIL FROM:<n\x00@b>\r\nQUIT\r\n")
    out = _read_all(s)
    assert out == replies.LINE_TOO_LONG + replies.BAD_BYTES + b"221 mx.test.example\r\n"
