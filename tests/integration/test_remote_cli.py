"""The qmail-remote, qmail-tcpto and qmail-tcpok commands, run as programs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from pyqmail.home import Home
from pyqmail.remote.tcpto import Tcpto
from tests.conftest import free_port, write_control
from tests.integration.test_remote_peers import Peer, Script

BIN = Path(sys.executable).parent


def rcpt(addr: bytes) -> bytes:
    if addr.startswith(b"reject"):
        return b"550 no such user here\r\n"
    if addr.startswith(b"defer"):
        return b"451 try later\r\n"
    return b"250 ok\r\n"


def qmail_remote(home: Home, args: list[str], stdin: bytes, port: int | None = None) -> bytes:
    async def go() -> tuple[bytes, int, Peer]:
        async with Peer(Script(rcpt=rcpt)) as peer:
            write_control(home, "smtproutes", f"remote.example:127.0.0.1:{port or peer.port}\n")
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "qmail-remote"), *args,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate(stdin)
            assert proc.returncode == 0
        return out, proc.returncode, peer

    out, _, _ = asyncio.run(go())
    return out


def test_reports_for_accepted_rejected_deferred(home: Home) -> None:
    out = qmail_remote(
        home,
        ["remote.example", "a@test.example",
         "ok@remote.example", "reject@remote.example", "defer@remote.example"],
        b"Subject: x\n\nbody\n",
    )  # fmt: skip
    assert out == (
        b"r\0"
        b"h127.0.0.1 does not like recipient.\nRemote host said: 550 no such user here\n\0"
        b"s127.0.0.1 does not like recipient.\nRemote host said: 451 try later\n\0"
        b"K127.0.0.1 accepted message.\nRemote host said: 250 ok: queued\n\0"
    )


def test_connection_refused(home: Home) -> None:
    out = qmail_remote(home, ["remote.example", "a@b", "x@remote.example"], b"\n", free_port())
    assert out == b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n\0"


def test_usage(home: Home) -> None:
    p = subprocess.run([BIN / "qmail-remote", "host", "sender"], capture_output=True, input=b"")
    assert p.returncode == 0
    assert p.stdout == b"DI (qmail-remote) was invoked improperly. (#5.3.5)\n\0"


def test_home_option(home: Home, tmp_path: Path) -> None:
    p = subprocess.run(
        [BIN / "qmail-remote", "--home", str(tmp_path / "nohome"), "h", "s", "r@h"],
        capture_output=True, input=b"",
    )  # fmt: skip
    assert p.stdout == b"ZUnable to switch to home directory. (#4.3.0)\n\0"


def test_tcpto_and_tcpok(home: Home) -> None:
    path = home.queue / "lock" / "tcpto"
    Tcpto(path, clock=lambda: time.time() - 300).record("192.0.2.7", True)
    Tcpto(path, clock=lambda: time.time() - 100).record("192.0.2.7", True)
    out = subprocess.run([BIN / "qmail-tcpto"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("192.0.2.7 timed out 10")
    assert out.endswith(" seconds ago; # recent timeouts: 2\n")
    subprocess.run([BIN / "qmail-tcpok"], check=True)
    assert path.read_bytes() == bytes(1024)
    out = subprocess.run([BIN / "qmail-tcpto"], capture_output=True, text=True, check=True).stdout
    assert out == ""
