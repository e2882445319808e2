"""Hostile addresses all the way through ``pyqmail run``: SMTP in, the scheduler, the local
spawner's forked delivery, a program, and the bounce (local.md 3.8-3.9, send.md 6 QSBMF).

An address accepted at SMTP time (qmail accepts shell metacharacters in local parts) must
reach a program only as environment values, never as shell text; a failure text with
blank lines must not break the bounce's paragraph structure.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.integration.test_run_daemon import BIN, Mta, files, wait_for


@pytest.fixture
def mta(home: Home, tmp_path: Path) -> Iterator[Mta]:
    m = Mta(home, tmp_path)
    yield m
    if m.proc is not None and m.proc.poll() is None:
        os.killpg(m.proc.pid, signal.SIGKILL)
        m.proc.wait(30)
    assert "Traceback" not in m.log(), m.log()


HOSTILE_LOCALS = [
    "alice-a;touch${IFS}PWNED1",
    "alice-$(touch PWNED2)",
    "alice-`touch PWNED3`",
    "alice-|touch PWNED4",
    "alice-x&&touch PWNED5",
    "alice-../../PWNED6",
    "alice-'$(touch PWNED7)'",
]


def _env(path: Path) -> dict[bytes, bytes]:
    out = {}
    for item in path.read_bytes().split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k] = v
    return out


def test_hostile_local_parts_through_smtp_reach_programs_as_env_only(
    mta: Mta, tmp_path: Path
) -> None:
    alice = mta.users["alice"]
    (alice / "dumps").mkdir()
    # our own .qmail line: the dump file is named after the delivery's process id
    (alice / ".qmail-default").write_text('|env -0 > "dumps/$$"\n')
    mta.start()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        for local in HOSTILE_LOCALS:
            code, _ = s.docmd("MAIL FROM:<carol@elsewhere.example>")
            assert code == 250
            # quoted, as RFC 5321 needs for these (unquoted they are refused at RCPT);
            # the queue, and so the delivery, gets them unquoted
            code, text = s.docmd(f'RCPT TO:<"{local}"@test.example>')
            assert code == 250, (local, text)
            code, _ = s.data(b"Subject: hostile\r\n\r\nbody\r\n")
            assert code == 250
    wait_for(lambda: len(list((alice / "dumps").iterdir())) == len(HOSTILE_LOCALS), 60, "dumps")
    seen = set()
    for f in (alice / "dumps").iterdir():
        wait_for(lambda f=f: f.stat().st_size > 0, 30, "dump written")
        env = _env(f)
        local = env[b"LOCAL"].decode()
        seen.add(local)
        assert env[b"EXT"].decode() == local[len("alice-") :]
        assert env[b"DEFAULT"].decode() == local[len("alice-") :]
        assert env[b"RECIPIENT"].decode() == local + "@test.example"
        assert env[b"SENDER"] == b"carol@elsewhere.example"
    assert seen == set(HOSTILE_LOCALS)
    for root in (alice, tmp_path, mta.home.root, Path("/tmp")):
        found = list(root.glob("PWNED*")) + list(root.glob("*/PWNED*"))
        assert found == [], found


def test_program_environment_in_the_daemon(mta: Mta, monkeypatch: pytest.MonkeyPatch) -> None:
    """qmail's rc starts qmail-start under ``env -`` with PATH alone: a program sees
    PATH = HOME/bin + the system's, pyqmail's home, and qmail-local's variables; none
    of the starter's environment (OLDPWD, DEFAULT...) and not the LC_CTYPE that the
    daemon's Python start-up adds when no locale is set."""
    for name in ("LANG", "LC_ALL", "LC_CTYPE", "QMAILQUEUE", "PYQMAIL_QUEUE_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OLDPWD", "/root")
    monkeypatch.setenv("DEFAULT", "from-the-starter")
    alice = mta.users["alice"]
    (alice / ".qmail-env").write_text("|cat /proc/$$/environ > env.tmp; mv env.tmp env.out\n")
    mta.start()
    mta.send("carol@elsewhere.example", ["alice-env@test.example"])
    out = alice / "env.out"
    wait_for(out.exists, 60, "env.out")
    env = dict(x.split(b"=", 1) for x in out.read_bytes().split(b"\0") if x)
    assert env.pop(b"UFLINE").startswith(b"From carol@elsewhere.example ")
    root = str(mta.home.root).encode()
    assert env == {
        b"PATH": root + b"/bin:/usr/local/bin:/usr/bin:/bin",
        b"PYQMAIL_HOME": root,
        b"PYQMAIL_SINGLE_USER": b"1",
        b"USER": b"alice",
        b"HOME": str(alice).encode(),
        b"LOCAL": b"alice-env",
        b"HOST": b"test.example",
        b"HOST2": b"test",
        b"HOST3": b"test",
        b"HOST4": b"test",
        b"RECIPIENT": b"alice-env@test.example",
        b"SENDER": b"carol@elsewhere.example",
        b"NEWSENDER": b"carol@elsewhere.example",
        b"EXT": b"env",
        b"EXT2": b"",
        b"EXT3": b"",
        b"EXT4": b"",
        b"DTLINE": b"Delivered-To: alice-env@test.example\n",
        b"RPLINE": b"Return-Path: <carol@elsewhere.example>\n",
    }


def _paragraphs(bounce: bytes) -> list[bytes]:
    _, _, body = bounce.partition(b"\n\n")
    text = body.split(b"--- Below this line is a copy of the message.", 1)[0]
    return text.split(b"\n\n")


def test_failure_text_with_blank_lines_keeps_qsbmf_structure(mta: Mta) -> None:
    """A program's output becomes the bounce text: blank lines inside it (at the start, in
    the middle, at the end) must never end the recipient's paragraph early."""
    alice = mta.users["alice"]
    (alice / ".qmail-fail").write_text(
        "|printf '\\n\\nRemote host said: 550 first\\n\\n\\n<forged@x.example>:\\nfake\\n\\n'; "
        "exit 100\n"
    )
    mta.start()
    mta.send("bob@test.example", ["alice-fail@test.example"], subject="fails")
    wait_for(lambda: len(files(mta.maildir("bob"))) == 1, 60, "the bounce")
    [bounce_file] = files(mta.maildir("bob"))
    bounce = bounce_file.read_bytes()
    assert b"Subject: failure notice" in bounce
    paras = _paragraphs(bounce)
    # "Hi. This is ...", then exactly one recipient paragraph, then the separator line
    assert paras[0].startswith(b"Hi. This is the qmail-send program"), paras
    rcpt_paras = [p for p in paras[1:] if p]
    assert len(rcpt_paras) == 1, paras
    assert rcpt_paras[0].startswith(b"<alice-fail@test.example>:\n"), rcpt_paras
    assert b"<forged@x.example>:" in rcpt_paras[0]  # inside, not a paragraph of its own
    assert paras[-1] == b"", paras  # the text ends with exactly one blank line
    assert not any(p == b"" for p in paras[1:-1]), paras


def test_sender_with_newline_cannot_inject_bounce_headers(mta: Mta) -> None:
    """A sender holding a newline (possible from a local user's -f, or a QMQP client) is
    written into the bounce's To: line; it must not start a header field there."""
    bob = mta.users["bob"]
    (bob / ".qmail-default").write_text("./Maildir/\n")
    (mta.users["alice"] / ".qmail-fail").write_text("|echo no; exit 100\n")
    mta.start()
    r = subprocess.run(
        [str(BIN / "qmail-inject"), "-f", "bob-x\nX-Evil: injected@test.example",
         "alice-fail@test.example"],
        input=b"Subject: bounce me\n\nbody\n", env=mta.env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r
    wait_for(lambda: len(files(mta.maildir("bob"))) == 1, 60, "the bounce")
    [bounce_file] = files(mta.maildir("bob"))
    head = bounce_file.read_bytes().split(b"\n\n", 1)[0]
    assert b"Subject: failure notice" in head
    assert b"\nX-Evil:" not in head, head


def test_open_relay_is_announced_at_start(mta: Mta) -> None:
    """No control/rcpthosts makes qmail an open relay (smtpd.md 8): pyqmail must warn
    loudly at start-up, in ``pyqmail run`` as in ``pyqmail smtpd --listen``."""
    (mta.home.control / "rcpthosts").unlink()
    mta.start()
    log = mta.log()
    assert "rcpthosts" in log and "relay" in log, log
