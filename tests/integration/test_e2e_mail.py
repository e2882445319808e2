"""End to end through ``pyqmail run`` with real peers: swaks as the client, Postfix's
smtp-sink as the remote MX (accepting, refusing with 5xx, deferring with 4xx), and every
kind of local delivery (Maildir, mbox, .qmail-ext, program, forward, alias, virtual domain).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.conftest import free_port, require_tools, write_control
from tests.integration.test_run_daemon import Mta, files, wait_for

pytestmark = pytest.mark.interop


@pytest.fixture
def mta(home: Home, tmp_path: Path) -> Iterator[Mta]:
    m = Mta(home, tmp_path)
    yield m
    if m.proc is not None and m.proc.poll() is None:
        os.killpg(m.proc.pid, signal.SIGKILL)
        m.proc.wait(30)


class Sink:
    """Postfix's smtp-sink on loopback; ``dump`` holds one file per accepted message."""

    def __init__(self, tmp: Path, *args: str) -> None:
        require_tools("smtp-sink")
        self.port = free_port()
        # smtp-sink drops to nobody, who cannot enter pytest's private tmp_path
        self.dump = Path(tempfile.mkdtemp(prefix="pyqmail-sink-"))
        self.dump.chmod(0o777)
        cmd = ["smtp-sink", "-d", f"{self.dump}/%M.", *args, f"127.0.0.1:{self.port}", "10"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        from tests.integration.test_run_daemon import listening

        wait_for(lambda: listening(self.port), what="smtp-sink")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dump, ignore_errors=True)


def mail_to(mta: Mta, user: str, needle: bytes) -> list[bytes]:
    return [m for m in (f.read_bytes() for f in files(mta.maildir(user))) if needle in m]


def test_swaks_to_local_users_ext_virtual_alias_mbox_program_forward(mta: Mta) -> None:
    require_tools("swaks")
    alice = mta.users["alice"]
    for sub in ("cur", "new", "tmp"):
        (alice / "Lists" / sub).mkdir(parents=True)
    (alice / ".qmail-lists").write_text("./Lists/\n")
    (alice / ".qmail-box").write_text("./mbox\n")
    (alice / ".qmail-prog").write_text(f"|cat > {alice}/prog.out\n")
    (alice / ".qmail-fwd").write_text("&bob@test.example\n")
    (alice / ".qmail-x").write_text("./Maildir/\n")
    write_control(mta.home, "virtualdomains", "virt.example:alice\n")
    mta.start()
    rcpts = ["alice@test.example", "alice-lists@test.example", "alice-box@test.example",
             "alice-prog@test.example", "alice-fwd@test.example", "x@virt.example",
             "postmaster@test.example"]  # fmt: skip
    for to in rcpts:
        r = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{mta.port}", "--from", "carol@elsewhere.example",
             "--to", to, "--header", f"Subject: to {to}", "--body", f"hello {to}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-500:]
    alias_new = mta.home.alias / "Maildir" / "new"
    wait_for(
        lambda: (
            len(files(mta.maildir("alice"))) >= 1
            and len(files(alice / "Lists" / "new")) == 1
            and (alice / "mbox").exists()
            and (alice / "prog.out").exists()
            and len(files(mta.maildir("bob"))) == 1
            and len(files(alias_new)) == 1
        ),
        what="every local delivery",
    )
    assert (
        b"Delivered-To: alice-lists@test.example" in files(alice / "Lists" / "new")[0].read_bytes()
    )
    mbox = (alice / "mbox").read_bytes()
    assert (
        mbox.startswith(b"From carol@elsewhere.example ")
        and b"hello alice-box@test.example" in mbox
    )
    wait_for(
        lambda: b"hello alice-prog" in (alice / "prog.out").read_bytes(), what="program output"
    )
    fwd = files(mta.maildir("bob"))[0].read_bytes()
    assert (
        b"Delivered-To: alice-fwd@test.example" in fwd and b"Delivered-To: bob@test.example" in fwd
    )
    # virtualdomains: x@virt.example is alice-x@virt.example, delivered by ~alice/.qmail-x
    wait_for(lambda: bool(mail_to(mta, "alice", b"Delivered-To: alice-x@virt.example")))
    assert b"Subject: to postmaster@test.example" in files(alias_new)[0].read_bytes()
    assert "failure" not in mta.log()
    assert mta.stop() == 0


def test_unknown_user_bounces_in_qsbmf_to_the_sender(mta: Mta) -> None:
    write_control(mta.home, "rcptchecks", "0\n")  # else refused at RCPT (no bounce)
    mta.start()
    mta.send("alice@test.example", ["nobody@test.example"], "lost")
    wait_for(lambda: bool(mail_to(mta, "alice", b"failure notice")), what="bounce")
    (b,) = mail_to(mta, "alice", b"failure notice")
    assert b"Return-Path: <>\n" in b
    assert b"\nFrom: MAILER-DAEMON@mx.test.example\nTo: alice@test.example\n" in b
    assert b"Hi. This is the qmail-send program at mx.test.example.\n" in b
    assert b"<nobody@test.example>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n" in b
    assert (
        b"--- Below this line is a copy of the message.\n\nReturn-Path: <alice@test.example>\n" in b
    )
    assert b"invoked for bounce" in b
    log = mta.log()
    assert "bounce msg " in log and "failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/" in log
    wait_for(lambda: mta.queue_files() == [], what="queue empty")
    assert mta.stop() == 0


def test_bounce_of_a_bounce_goes_to_doublebounceto(mta: Mta) -> None:
    write_control(mta.home, "doublebounceto", "bob\n")
    write_control(mta.home, "doublebouncehost", "test.example\n")
    write_control(mta.home, "rcptchecks", "0\n")  # else refused at RCPT (no bounce)
    mta.start()
    mta.send("", ["nobody@test.example"], "null sender")
    wait_for(lambda: len(files(mta.maildir("bob"))) == 1, what="double bounce")
    d = files(mta.maildir("bob"))[0].read_bytes()
    assert d.startswith(b"Return-Path: <#@[]>\n")
    assert b"I tried to deliver a bounce message to this address, but the bounce bounced!\n" in d
    assert b"--- Below this line is the original bounce.\n\nReturn-Path: <>\n" in d
    assert mta.stop() == 0


def test_remote_delivery_through_smtproutes_to_smtp_sink(mta: Mta, tmp_path: Path) -> None:
    sink = Sink(tmp_path)
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{sink.port}\n")
        mta.start()
        mta.send("alice@test.example", ["x@remote.example", "y@remote.example"], "out")
        wait_for(lambda: len(files(sink.dump)) >= 1 and "end msg" in mta.log(), what="sink")
        dumped = b"".join(f.read_bytes() for f in files(sink.dump))
        assert b"x@remote.example" in dumped and b"y@remote.example" in dumped
        assert b"Subject: out" in dumped
        log = mta.log()
        assert log.count(" to remote ") == 2 and log.count(": success: ") == 2
        assert mta.stop() == 0
    finally:
        sink.close()


def test_remote_refusal_bounces_with_the_remote_text(mta: Mta, tmp_path: Path) -> None:
    sink = Sink(tmp_path, "-f", "rcpt", "-B", "550 5.1.1 no such user here")
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{sink.port}\n")
        mta.start()
        mta.send("alice@test.example", ["gone@remote.example"], "refused")
        wait_for(lambda: bool(mail_to(mta, "alice", b"failure notice")), what="bounce")
        (b,) = mail_to(mta, "alice", b"failure notice")
        assert b"<gone@remote.example>:\n" in b and b"no such user here" in b
        assert mta.stop() == 0
    finally:
        sink.close()


def test_remote_deferral_is_retried_then_bounced_after_queuelifetime(
    mta: Mta, tmp_path: Path
) -> None:
    sink = Sink(tmp_path, "-r", "rcpt", "-b", "451 4.3.0 try later")
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{sink.port}\n")
        write_control(mta.home, "queuelifetime", "1\n")
        mta.start()
        mta.send("alice@test.example", ["slow@remote.example"], "slow")
        wait_for(lambda: ": deferral: " in mta.log(), what="first deferral")
        remote = [p for p in mta.queue_files() if p.startswith("remote/")]
        assert len(remote) == 1
        info = mta.home.queue / remote[0].replace("remote/", "info/")
        birth = info.stat().st_mtime
        # the next pass is due at birth + 400 s (qmail's remote schedule), and was persisted
        # nowhere yet; ALRM makes it due now. Wait until the lifetime has passed first.
        wait_for(lambda: time.time() > birth + 2.5, what="queuelifetime to pass")
        mta.signal(signal.SIGALRM)
        wait_for(lambda: bool(mail_to(mta, "alice", b"failure notice")), what="bounce")
        (b,) = mail_to(mta, "alice", b"failure notice")
        assert b"<slow@remote.example>:\n" in b and b"try later" in b
        assert (b"I'm not going to try again; this message has been in the queue too long.\n\n"
                in b)  # fmt: skip
        assert mta.log().count(" to remote slow@remote.example") == 2
        wait_for(lambda: mta.queue_files() == [], what="queue empty")
        assert mta.stop() == 0
    finally:
        sink.close()


def test_deferred_message_next_try_survives_restart(mta: Mta, tmp_path: Path) -> None:
    sink = Sink(tmp_path, "-r", "rcpt", "-b", "451 4.3.0 try later")
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{sink.port}\n")
        mta.start()
        mta.send("alice@test.example", ["slow@remote.example"], "slow")
        wait_for(lambda: ": deferral: " in mta.log(), what="deferral")
        assert mta.stop() == 0
        (remote,) = [p for p in mta.queue_files() if p.startswith("remote/")]
        info = mta.home.queue / remote.replace("remote/", "info/")
        birth = int(info.stat().st_mtime)
        nxt = (mta.home.queue / remote).stat().st_mtime
        assert birth + 400 <= nxt <= birth + 441  # (isqrt(recent - birth) + 20)^2
        assert (mta.home.queue / remote).read_bytes() == b"Tslow@remote.example\0"
        log_before = mta.log().count(" to remote ")
        mta.start()
        mta.send("alice@test.example", ["alice@test.example"], "other")
        wait_for(lambda: len(files(mta.maildir("alice"))) == 1)
        assert mta.log().count(" to remote ") == log_before  # not due yet after the restart
        assert mta.stop() == 0
    finally:
        sink.close()
