"""A user's ``|program`` that keeps its fd 0 (the queue's message file) open after it exits
must never see another user's mail through it (design.md, "Isolation between users").

``pyqmail run`` as root in multi-user mode, two users from users/assign only (uids 60001
and 60002, homes in the temp dir, no /etc/passwd entries). The attacker's .qmail runs a
program that forks a tap into a session of its own, exits 0, and the tap keeps reading
its fd 0 from offset 0 every 2 ms. Then the victim gets messages with a secret. qmail
never lets that inode carry another message while it is open; pyqmail must not either
(it once kept finished messages' inodes in queue/spare/ and wrote later message files and
envelopes into them). The victim's .qmail delivers to a Maildir and then runs a program
that takes 0.3 s, so each of its message files stays in the queue long enough for a tap
to catch it; its messages are sent one at a time, each after the last left the queue,
so the queue writes span more than a second (a writer that recycled inodes listed its
stock at most once a second).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.conftest import free_port, is_root
from tests.integration.test_run_daemon import wait_for
from tests.security._support import root_home, root_run

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]

ATTACKER, VICTIM = 60001, 60002
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's may live where other users cannot reach
N_ATTACKER, N_VICTIM = 4, 10

# The tap: the .qmail program copies its message to ~/leak and forks; the child leaves
# the delivery's process group, reports its pid (the readiness event), and copies
# whatever new its fd 0 holds to ~/leak until ~/stop appears or 120 s pass; the parent
# exits 0 so the delivery succeeds.
TAP = """\
import os, time
home = os.environ["HOME"]
first = os.pread(0, 1 << 20, 0)  # its own message, read before the delivery ends
with open(home + "/leak", "ab") as leak:
    leak.write(first + b"\\n--\\n")
if os.fork():
    os._exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
os.dup2(null, 1)
os.dup2(null, 2)
seen = {first}
with open(home + "/leak", "ab") as leak:
    with open(home + "/taps/" + str(os.getpid()), "w"):
        pass
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not os.path.exists(home + "/stop"):
        data = os.pread(0, 1 << 20, 0)
        if data and data not in seen:
            seen.add(data)
            leak.write(data + b"\\n--\\n")
            leak.flush()
        time.sleep(0.002)
"""


@dataclass
class Site:
    home: Home
    att: Path
    vic: Path


def _queued(home: Home) -> int:
    """Messages in the queue: files in mess/*/ (as root, without qmail-qstat)."""
    return sum(len(os.listdir(d)) for d in (home.queue / "mess").iterdir())


def _kill_taps(att: Path) -> None:
    """SIGKILL each tap's session, if its pid is still the attacker's process."""
    for f in (att / "taps").iterdir() if (att / "taps").is_dir() else []:
        pid = int(f.name)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uid_line = next(x for x in status.splitlines() if x.startswith("Uid:"))
        if int(uid_line.split()[1]) == ATTACKER:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    home = root_home("pyqmail-sec-tap-")
    d = home.root.parent
    att, vic = d / "att", d / "vic"
    try:
        (home.control / "rcpthosts").write_text("mx.test.example\n")
        (att / "taps").mkdir(parents=True)
        (att / "tap.py").write_text(TAP)
        (att / ".qmail").write_text(f"|exec {SYSTEM_PYTHON} {att}/tap.py\n")
        for sub in ("cur", "new", "tmp"):
            (vic / "Maildir" / sub).mkdir(parents=True)
        (vic / ".qmail").write_text("./Maildir/\n|sleep 0.3\n")
        for top, uid in ((att, ATTACKER), (vic, VICTIM)):
            for p in [top, *top.rglob("*")]:
                os.chown(p, uid, uid)
            top.chmod(0o755)
        (home.users / "assign").write_text(
            f"=attacker:attacker:{ATTACKER}:{ATTACKER}:{att}:::\n"
            f"=victim:victim:{VICTIM}:{VICTIM}:{vic}:::\n.\n"
        )
        env = dict(os.environ, PYQMAIL_HOME=str(home.root))
        subprocess.run([str(BIN / "pyqmail"), "newu"], check=True, env=env)
        yield Site(home, att, vic)
    finally:
        with contextlib.suppress(OSError):
            (att / "stop").touch()
        _kill_taps(att)
        shutil.rmtree(d, ignore_errors=True)


def _send(port: int, to: str, body: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("sender@test.example", [to], f"Subject: {body}\r\n\r\n{body}\r\n")


def test_a_tap_on_a_programs_fd0_never_sees_another_users_mail(site: Site) -> None:
    home, att, vic = site.home, site.att, site.vic
    port = free_port()
    with root_run(home, port) as (_, log):
        for i in range(N_ATTACKER):
            _send(port, "attacker@mx.test.example", f"attacker-own-{i}")
        wait_for(lambda: len(os.listdir(att / "taps")) == N_ATTACKER, 60, "the taps")
        wait_for(lambda: _queued(home) == 0, 60, "the attacker's messages to leave the queue")
        secret = f"SECRET-{os.urandom(8).hex()}"
        for i in range(N_VICTIM):
            _send(port, "victim@mx.test.example", f"{secret}-{i}")
            wait_for(lambda: _queued(home) == 0, 60, f"victim message {i} to leave the queue")
        (att / "stop").touch()
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in os.listdir(att / "taps")),
                 30, "the taps to stop")  # fmt: skip
    delivered = b"".join(p.read_bytes() for p in (vic / "Maildir" / "new").iterdir())
    for i in range(N_VICTIM):
        assert f"{secret}-{i}\n".encode() in delivered
    leak = (att / "leak").read_bytes()
    # the taps work: each read the attacker's own message through its fd 0
    for i in range(N_ATTACKER):
        assert f"attacker-own-{i}".encode() in leak
    assert secret.encode() not in leak, "a tap read the victim's message body"
    assert b"victim@mx.test.example" not in leak, "a tap read the victim's envelope or header"
    assert "Traceback" not in log.read_text(errors="replace")
