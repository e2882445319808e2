"""``pyqmail run`` as root in multi-user mode: each part under its qmail user (daemon/split.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.conftest import free_port, is_root, qmail_ids
from tests.integration.test_run_daemon import files, listening, wait_for

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]


@pytest.fixture
def root_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Home, Path]]:
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    ids = qmail_ids()
    d = Path(tempfile.mkdtemp(prefix="pyqmail-root-run-"))
    d.chmod(0o755)  # the qmail users must reach the home under it
    home = Home(d / "q", single_user=False)
    create_home(home, "mx.test.example", ids)
    (home.control / "locals").write_text("mx.test.example\ntest.example\n")
    (home.control / "rcpthosts").write_text("mx.test.example\ntest.example\n")
    nobody = pwd.getpwnam("nobody")
    user = d / "nobody"
    for sub in ("cur", "new", "tmp"):
        (user / "Maildir" / sub).mkdir(parents=True)
    for root, _dirs, _ in os.walk(user):
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    # joe-EXT has no .qmail-EXT: qmail-local bounces it within this home. (An unknown user
    # would go to the alias user, whose home is the installed /var/qmail/alias, which
    # `make accounts` names but does not create: not there on a machine without qmail.)
    (home.users / "assign").write_text(
        f"=joe:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:::\n"
        f"+joe-:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:-::\n.\n"
    )
    env = dict(os.environ, PYQMAIL_HOME=str(home.root))
    env.pop("PYQMAIL_SINGLE_USER", None)
    subprocess.run([str(BIN / "pyqmail"), "newu"], check=True, env=env)
    yield home, user
    shutil.rmtree(d, ignore_errors=True)


def start_root_run(home: Home, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """``pyqmail run`` as root, multi-user, SMTP on 127.0.0.1:port; its log file."""
    log = home.root.parent / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(home.root), "--smtp", f"127.0.0.1:{port}"],
            stdout=out, stderr=out, env=env, start_new_session=True,
        )  # fmt: skip
    return proc, log


def ids_of(pid: int) -> tuple[int, int]:
    uid = gid = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("Gid:"):
            gid = int(line.split()[1])
    return uid, gid


def test_parts_run_as_qmail_users_and_mail_flows(root_home: tuple[Home, Path]) -> None:
    home, user = root_home
    ids = home.ids()
    port = free_port()
    proc, log = start_root_run(home, port)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()

        def parts() -> set[tuple[int, int]]:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            return {ids_of(int(p)) for p in kids}

        want = {(ids.uid(r), ids.gid(g)) for r, g in
                (("queue", "qmail"), ("send", "qmail"), ("daemon", "nofiles"))}  # fmt: skip
        wait_for(lambda: parts() == want, what="every part dropped to its user")
        got = parts()
        assert (ids.uid("queue"), ids.gid("qmail")) in got
        assert (ids.uid("send"), ids.gid("qmail")) in got
        assert (ids.uid("daemon"), ids.gid("nofiles")) in got
        assert ids_of(proc.pid)[0] == 0  # the supervisor only waits and relays signals
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("joe@test.example", ["joe@test.example"], "Subject: one\r\n\r\nx\r\n")
            s.sendmail("joe@test.example", ["joe-nobox@test.example"], "Subject: two\r\n\r\nx\r\n")
        new = user / "Maildir" / "new"
        wait_for(lambda: len(files(new)) == 2, what="delivery and bounce")
        msgs = [f.read_bytes() for f in files(new)]
        assert all(os.stat(f).st_uid == pwd.getpwnam("nobody").pw_uid for f in files(new))
        first = next(m for m in msgs if b"Subject: one" in m.split(b"\n\n", 1)[0])
        assert b"invoked from network" in first
        bounce = next(m for m in msgs if b"failure notice" in m)
        assert b"invoked for bounce" in bounce
        assert (
            b"<joe-nobox@test.example>:\nSorry, no mailbox here by that name. (#5.1.1)\n" in bounce
        )
        # SMTP's messages were written by the listener's committer process, which runs as
        # the queue's owner (qmail-queue's setuid qmailq); its pid is the qp
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (smtpd,) = [
            int(k) for k in kids if ids_of(int(k)) == (ids.uid("daemon"), ids.gid("nofiles"))
        ]
        grandkids = Path(f"/proc/{smtpd}/task/{smtpd}/children").read_text().split()
        assert [ids_of(int(k)) for k in grandkids] == [(ids.uid("queue"), ids.gid("qmail"))]
        assert b"Received: (qmail %s invoked from network)" % grandkids[0].encode() in first
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0
    text = log.read_text()
    assert "status: exiting" in text and "alert" not in text
    for kind in ("todo", "intd", "info", "local", "remote", "bounce"):
        assert not any(files(d) for d in [home.queue / kind, *(home.queue / kind).glob("*")])
