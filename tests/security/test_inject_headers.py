"""Header injection through qmail-inject and sendmail (inject.md 1-2; gaps.md 3.1).

The From: line qmail-inject writes is built from QMAILUSER, QMAILHOST, QMAILNAME (and
sendmail's -f and -F). A newline in any of them must not start a header field of the
attacker's choosing (``Bcc:``, ``X-Evil:``, a second ``From:``); either the value is made
harmless or the message is refused with nothing queued. notqmail writes the newline as a
backslash-escaped one, which still starts a new header line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.security._support import messages, queued

BIN = Path(sys.executable).parent

# Field names qmail-inject itself writes or that the test message carries.
KNOWN = (b"Received:", b"Date:", b"Message-ID:", b"From:", b"Cc:", b"To:", b"Subject:")


def _header(msg: bytes) -> list[bytes]:
    return msg.split(b"\n\n", 1)[0].split(b"\n")


def _assert_no_injected_field(home: Home, r: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in r.stdout + r.stderr
    if r.returncode != 0:  # refused: then nothing at all may be queued
        assert queued(home) == []
        return
    [msg] = messages(home)
    for line in _header(msg):
        if line[:1] in (b" ", b"\t"):
            continue  # a continuation line
        assert line.startswith(KNOWN), (line, msg)
    assert b"\nBcc:" not in msg and b"\nX-Evil:" not in msg


def _inject(home: Home, prog: str, args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    full = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1", **env)
    return subprocess.run(
        [str(BIN / prog), *args],
        input=b"To: rcpt@test.example, joe, ann+, bob@here\nSubject: s\n\nbody\n",
        capture_output=True, env=full, timeout=60,
    )  # fmt: skip


EVIL = "\nBcc: victim@elsewhere.example\nX-Evil: 1"


@pytest.mark.parametrize(
    "var",
    ["QMAILNAME", "MAILNAME", "NAME", "QMAILUSER", "MAILUSER", "QMAILHOST", "MAILHOST",
     "QMAILIDHOST", "QMAILDEFAULTHOST", "QMAILDEFAULTDOMAIN", "QMAILPLUSDOMAIN"],
)  # fmt: skip
def test_newline_in_inject_environment(home: Home, var: str) -> None:
    value = ("joe" if "HOST" not in var and "DOMAIN" not in var else "h.example") + EVIL
    r = _inject(home, "qmail-inject", ["rcpt@test.example"], {var: value})
    _assert_no_injected_field(home, r)


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "joe" + EVIL + "@client.example", "rcpt@test.example"],
        ["-F", "Joe" + EVIL, "rcpt@test.example"],
        ["-F", "Joe\r\nBcc: victim@elsewhere.example", "rcpt@test.example"],
    ],
    ids=["-f", "-F", "-F-crlf"],
)
def test_newline_in_sendmail_options(home: Home, args: list[str]) -> None:
    r = _inject(home, "sendmail", args, {})
    _assert_no_injected_field(home, r)


def test_injected_bcc_never_adds_a_recipient(home: Home) -> None:
    """With -t the header gives the recipients: an injected Bcc must not add one."""
    r = _inject(home, "sendmail", ["-t", "-F", "Joe" + EVIL], {})
    if r.returncode == 0:
        [(_, rcpts)] = queued(home)
        assert b"victim@elsewhere.example" not in rcpts
        assert len(rcpts) == 4  # the four addresses of To:


def test_nul_can_never_reach_the_envelope_from_inject(home: Home) -> None:
    """Header recipients are the only bytes not given as arguments: a NUL inside one
    must not split it into two envelope recipients."""
    full = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    r = subprocess.run(
        [str(BIN / "qmail-inject"), "-h"],
        input=b"To: a@test.example\x00Tvictim@elsewhere.example\nSubject: s\n\nbody\n",
        capture_output=True, env=full, timeout=60,
    )  # fmt: skip
    assert b"Traceback" not in r.stdout + r.stderr
    for _, rcpts in queued(home):
        assert all(b"\0" not in x for x in rcpts)
        assert b"victim@elsewhere.example" not in rcpts


@pytest.mark.parametrize(
    "head",
    [
        b"To: a@test.example\nBcc: secret@elsewhere.example\n",
        b"To: a@test.example\nbcc:\n  secret@elsewhere.example\n",
        b"To: a@test.example\nBCC: secret@elsewhere.example\n",
        b"Resent-To: a@test.example\nResent-Bcc: secret@elsewhere.example\n",
    ],
    ids=["bcc", "folded-lower", "upper", "resent-bcc"],
)
def test_bcc_recipients_are_never_disclosed(home: Home, head: bytes) -> None:
    full = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    r = subprocess.run(
        [str(BIN / "qmail-inject"), "-h"],
        input=head + b"Subject: s\n\nbody\n",
        capture_output=True, env=full, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r
    [(_, rcpts)] = queued(home)
    assert b"secret@elsewhere.example" in rcpts  # still a recipient
    [msg] = messages(home)
    assert b"secret" not in msg.lower()  # but nowhere in the message
