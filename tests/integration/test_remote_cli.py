"""The qmail-remote, qmail-tcpto and qmail-tcpok commands, run as programs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def qmail_remote(
    home: Home,
    args: list[str],
    stdin: bytes,
    port: int | None = None,
    script: Script | None = None,
) -> bytes:
    async def go() -> tuple[bytes, int, Peer]:
        async with Peer(script or Script(rcpt=rcpt)) as peer:
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


def test_one_of_two_refused_as_qmail_reports_it(home: Home) -> None:
    # notqmail 1.09's qmail-remote given the same two recipients and replies wrote exactly
    # these bytes: no "Giving up" while another recipient was accepted ...
    args = ["remote.example", "a@test.example", "ok@remote.example", "reject@remote.example"]
    assert qmail_remote(home, args, b"Subject: x\n\nbody\n") == (
        b"r\0"
        b"h127.0.0.1 does not like recipient.\nRemote host said: 550 no such user here\n\0"
        b"K127.0.0.1 accepted message.\nRemote host said: 250 ok: queued\n\0"
    )
    # ... and "Giving up on IP." as the message report when none was.
    args = ["remote.example", "a@test.example", "reject@remote.example"]
    assert qmail_remote(home, args, b"Subject: x\n\nbody\n") == (
        b"h127.0.0.1 does not like recipient.\nRemote host said: 550 no such user here\n\0"
        b"DGiving up on 127.0.0.1.\n\0"
    )


SAID = b"Remote host said: "
ACCEPTED = b"r\0K127.0.0.1 accepted message.\n" + SAID + b"250 ok: queued\n\0"


@pytest.mark.parametrize(
    ("step", "reply", "report"),
    [
        ("greeting", b"220-ok\r\n554 no\r\n", ACCEPTED),
        ("greeting", b"554-no\r\n220 ok\r\n",
         b"ZConnected to 127.0.0.1 but greeting failed.\n" + SAID + b"554-no\n220 ok\n\0"),
        ("mail", b"250-ok\r\n550 no\r\n", ACCEPTED),
        ("mail", b"550-no\r\n250 ok\r\n",
         b"DConnected to 127.0.0.1 but sender was rejected.\n" + SAID + b"550-no\n250 ok\n\0"),
        ("rcpt", b"250-ok\r\n550 no\r\n", ACCEPTED),
        ("rcpt", b"550-no\r\n250 ok\r\n",
         b"h127.0.0.1 does not like recipient.\n" + SAID + b"550-no\n250 ok\n\0"
         b"DGiving up on 127.0.0.1.\n\0"),
        ("data", b"354-go\r\n554 no\r\n", ACCEPTED),
        ("data", b"554-no\r\n354 go\r\n",
         b"r\0D127.0.0.1 failed on DATA command.\n" + SAID + b"554-no\n354 go\n\0"),
        ("after", b"250-ok\r\n550 no\r\n",
         b"r\0K127.0.0.1 accepted message.\n" + SAID + b"250-ok\n550 no\n\0"),
        ("after", b"550-no\r\n250 ok\r\n",
         b"r\0D127.0.0.1 failed after I sent the message.\n" + SAID + b"550-no\n250 ok\n\0"),
    ],
)  # fmt: skip
def test_multiline_reply_code_is_the_first_lines(
    home: Home, step: str, reply: bytes, report: bytes
) -> None:
    # Each expected report is what notqmail 1.09's qmail-remote wrote for the same reply.
    script = Script(rcpt=lambda _: reply) if step == "rcpt" else Script(**{step: reply})
    args = ["remote.example", "a@test.example", "x@remote.example"]
    assert qmail_remote(home, args, b"Subject: x\n\nbody\n", script=script) == report


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
