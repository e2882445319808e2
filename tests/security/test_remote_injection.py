"""The next hop: what qmail-remote puts on the wire from hostile queue contents
(gaps.md 3.3; queue.md: addresses in the queue may hold any byte but NUL).

The peer is our own SMTP listener (the ``smtp`` fixture), reached through smtproutes. A
stored message full of smuggling sequences must arrive there as exactly one message from
our sender; a recipient holding CR LF must never become a second RCPT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.security._support import Listener, messages, queued

BIN = Path(sys.executable).parent


def _remote(home: Home, port: int, sender: bytes, rcpts: list[bytes], msg: bytes) -> bytes:
    (home.control / "smtproutes").write_text(f"remote.example:127.0.0.1:{port}\n")
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    r = subprocess.run(
        [os.fsencode(BIN / "qmail-remote"), b"remote.example", sender, *rcpts],
        input=msg, capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert b"Traceback" not in r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize(
    "stored",
    [
        b"X\r.\rMAIL FROM:<evil@attacker.example>\rRCPT TO:<victim@test.example>\rDATA\r"
        b"smuggled\r.\r",
        b"X\r.\nMAIL FROM:<evil@attacker.example>\nRCPT TO:<victim@test.example>\nDATA\n"
        b"smuggled\n.\n",
        b"X\n.\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@test.example>\r\n"
        b"DATA\r\nsmuggled\r\n.\r\n",
    ],
    ids=["CR", "CR.LF", "LF.CRLF"],
)
def test_stored_smuggling_bytes_arrive_as_one_message(
    smtp: Listener, home: Home, stored: bytes
) -> None:
    out = _remote(
        home, smtp.port, b"a@client.example", [b"x@test.example"],
        b"Subject: relay\n\n" + stored + b"tail\n",
    )  # fmt: skip
    assert out.startswith(b"r"), out
    assert queued(smtp.home) == [(b"a@client.example", [b"x@test.example"])]
    [msg] = messages(smtp.home)
    assert msg.rstrip(b"\n").endswith(b"tail")
    assert b"smuggled" in msg


@pytest.mark.parametrize(
    "rcpt",
    [
        b"x@test.example>\r\nRCPT TO:<victim@test.example",
        b"x@test.example\nRCPT TO:<victim@test.example>",
        b"x@test.example\rRCPT TO:<victim@test.example>",
    ],
    ids=["CRLF", "LF", "CR"],
)
def test_recipient_with_line_break_is_never_sent(smtp: Listener, home: Home, rcpt: bytes) -> None:
    out = _remote(home, smtp.port, b"a@client.example", [rcpt, b"ok@test.example"], b"S: x\n\nb\n")
    assert queued(smtp.home) == [(b"a@client.example", [b"ok@test.example"])], out


def test_sender_with_line_break_is_never_sent(smtp: Listener, home: Home) -> None:
    out = _remote(
        home, smtp.port, b"a@client.example>\r\nRCPT TO:<victim@test.example",
        [b"ok@test.example"], b"S: x\n\nb\n",
    )  # fmt: skip
    assert queued(smtp.home) == [], out
