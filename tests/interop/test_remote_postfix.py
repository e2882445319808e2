"""Remote delivery to real Debian peers: Postfix's smtp-sink, and a private Postfix instance
on a loopback port that accepts the mail and delivers it into a Maildir."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Status
from pyqmail.remote.deliver import RemoteAgent
from tests.conftest import free_port, require_tools, write_control
from tests.peers import PrivatePostfix

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True)
def _postfix() -> None:
    require_tools("smtp-sink", "postfix")


MSG = b"Subject: interop\n\nline one\n.dot line\nX\r.\nline after\n"


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, secs: float = 20) -> None:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError("peer exited") from None
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def wait_files(d: Path, n: int, secs: float = 20) -> list[Path]:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        files = [p for p in d.rglob("*") if p.is_file()]
        if len(files) >= n:
            return files
        time.sleep(0.05)
    return [p for p in d.rglob("*") if p.is_file()]


def run_sink(tmp_path: Path, extra: list[str]) -> tuple[int, Path, subprocess.Popen[bytes]]:
    d = tmp_path / "sink"
    d.mkdir()
    d.chmod(0o777)
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    p = subprocess.Popen(
        ["smtp-sink", *user, *extra, "-d", f"{d}/%M.", f"127.0.0.1:{port}", "100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, p)
    return port, d, p


def deliver(home: Home, tmp_path: Path, rcpts: list[str]) -> list[tuple[Status, str]]:
    mess = tmp_path / "mess"
    mess.write_bytes(MSG)
    agent = RemoteAgent(home, ControlCache(home), idle_timeout=0)  # QUIT after each message
    outs = asyncio.run(agent.deliver(mess, "a@test.example", rcpts))
    return [(o.status, o.text) for o in outs]


def test_smtp_sink_accepts_all_recipients_on_one_connection(home: Home, tmp_path: Path) -> None:
    port, d, p = run_sink(tmp_path, [])
    try:
        write_control(home, "smtproutes", f"sink.test:127.0.0.1:{port}\n")
        outs = deliver(home, tmp_path, ["u@sink.test", "v@sink.test"])
        assert [s for s, _ in outs] == [Status.OK, Status.OK]
        assert outs[0][1].startswith("127.0.0.1 accepted message.\nRemote host said: 250")
        (f,) = wait_files(d, 1)
        dump = f.read_bytes()
    finally:
        p.terminate()
        p.wait(5)
    assert b"X-Rcpt-Args: <u@sink.test>\nX-Rcpt-Args: <v@sink.test>\n" in dump
    assert b"\n\nline one\n.dot line\nX\n.\nline after\n" in dump


def test_smtp_sink_deferring_recipients(home: Home, tmp_path: Path) -> None:
    port, _, p = run_sink(tmp_path, ["-r", "rcpt"])
    try:
        write_control(home, "smtproutes", f"sink.test:127.0.0.1:{port}\n")
        outs = deliver(home, tmp_path, ["u@sink.test", "v@sink.test"])
    finally:
        p.terminate()
        p.wait(5)
    assert [s for s, _ in outs] == [Status.TEMP, Status.TEMP]
    assert outs[0][1].startswith("127.0.0.1 does not like recipient.\nRemote host said: 4")
    assert "Giving up on 127.0.0.1." in outs[0][1]


def postfix_instance(d: Path, port: int) -> PrivatePostfix:
    """A private Postfix in ``d``: smtpd on 127.0.0.1:port, pfx.test to a virtual Maildir."""
    (d / "mail").mkdir(parents=True)
    shutil.chown(d / "mail", "nobody", "nogroup")
    return PrivatePostfix(
        d,
        port,
        hostname="pfx.test.example",
        settings=f"""virtual_mailbox_domains = pfx.test
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = static:Maildir/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = error
relay_transport = error
""",
    )


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="postfix needs root")
def test_real_postfix_accepts_and_delivers(home: Home, tmp_path: Path) -> None:
    # Postfix's own users must reach the directory: not under pytest's 0700 tmp_path.
    d = Path(tempfile.mkdtemp(prefix="pyqmail-postfix-"))
    d.chmod(0o755)
    port = free_port()
    pfx = postfix_instance(d, port)
    started = pfx.postfix("start", check=False)
    if started.returncode:
        log = (d / "maillog").read_text() if (d / "maillog").exists() else ""
        shutil.rmtree(d, ignore_errors=True)
        pytest.fail(f"postfix did not start: {started.stderr!r} {log[-2000:]}")
    try:
        wait_port(port)
        write_control(home, "smtproutes", f"pfx.test:127.0.0.1:{port}\n")
        outs = deliver(home, tmp_path, ["u@pfx.test", "v@pfx.test"])
        assert [s for s, _ in outs] == [Status.OK, Status.OK]
        assert "Remote host said: 250 2.0.0 Ok: queued as " in outs[0][1]
        files = wait_files(d / "mail" / "Maildir" / "new", 2)
        bodies = [f.read_bytes() for f in files]
    finally:
        pfx.stop()
        shutil.rmtree(d, ignore_errors=True)
    # one copy per recipient, each whole: the stored "X\r." smuggled nothing
    assert len(bodies) == 2
    for body in bodies:
        assert body.endswith(b"\n\nline one\n.dot line\nX\n.\nline after\n")
        assert b"Return-Path: <a@test.example>\n" in body
    assert sorted(b.split(b"Delivered-To: ")[1].split(b"\n")[0] for b in bodies) == [
        b"u@pfx.test",
        b"v@pfx.test",
    ]
