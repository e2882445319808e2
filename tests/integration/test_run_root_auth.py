"""SMTP AUTH under ``pyqmail run`` as root: ``pyqmail passwd`` makes control/authusers
qmailp's, mode 0600, which qmaild (the listener) cannot read; the password process checks
it as qmailp; an authenticated message is DKIM-signed by the committer (as qmailq)."""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from tests.conftest import free_port, is_root
from tests.integration.test_run_daemon import listening, wait_for
from tests.integration.test_run_root import ids_of, root_home, start_root_run  # noqa: F401
from tests.integration.test_smtpd_tls import install_cert

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]


def _qmaild_can_read(path: Path, uid: int, gid: int) -> bool:
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with open(path, "rb"):
                code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for line in (d / "status").read_text().splitlines():
                if line.startswith("PPid:") and int(line.split()[1]) == pid:
                    out.append(int(d.name))
        except OSError:
            continue
    return out


def test_authusers_is_qmailps_and_the_password_process_checks_it(
    root_home: tuple[Home, Path],  # noqa: F811 - the imported fixture
) -> None:
    home, _user = root_home
    ids = home.ids()
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    env["PYQMAIL_HOME"] = str(home.root)
    done = subprocess.run([str(BIN / "pyqmail"), "passwd", "alice"], input=b"r00t pw\n",
                          env=env, capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = home.control / "authusers"
    st = path.stat()
    assert st.st_uid == ids.uid("passwd") and stat.S_IMODE(st.st_mode) == 0o600
    assert not _qmaild_can_read(path, ids.uid("daemon"), ids.gid("nofiles"))
    check = subprocess.run([str(BIN / "pyqmail"), "check"], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert "authusers" not in check.stdout + check.stderr
    keygen = subprocess.run([str(BIN / "pyqmail"), "dkim", "keygen", "test.example"], env=env,
                            capture_output=True, timeout=60)  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    (home.control / "smtproutes").write_text("elsewhere.example:127.0.0.1:1\n")  # deferred
    ca = trustme.CA()
    install_cert(home, ca, "mx.test.example")
    port = free_port()
    proc, log = start_root_run(home, port)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("client.example")
            s.starttls(context=ctx)
            s.ehlo("client.example")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice", "wrong")
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("client.example")
            s.starttls(context=ctx)
            s.ehlo("client.example")
            s.login("alice", "r00t pw")
            msg = "From: alice@test.example\r\nSubject: root auth\r\n\r\nsigned as qmailq\r\n"
            s.sendmail("alice@test.example", ["x@elsewhere.example"], msg)
        # a process of the tree runs as qmailp: the password process
        tree, todo = [], [proc.pid]
        while todo:
            kids = _children_of(todo.pop())
            tree += kids
            todo += kids
        assert any(ids_of(p)[0] == ids.uid("passwd") for p in tree)
        found: list[bytes] = []

        def queued() -> bool:
            for root, _, names in os.walk(home.queue / "mess"):
                for n in names:
                    data = Path(root, n).read_bytes()
                    if b"Subject: root auth" in data:
                        found.append(data)
                        return True
            return False

        wait_for(queued, what="the message in the queue (its delivery deferred)")
        assert (
            b"\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=test.example;" in (found[0])
        )
        assert b" with ESMTPSA " in found[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text and "r00t pw" not in text
    assert "auth PLAIN alice from 127.0.0.1 ok" in text or "auth LOGIN alice" in text
    assert pwd.getpwuid(ids.uid("passwd")).pw_name == "qmailp"


def test_once_the_committer_is_gone_the_service_signs_authenticated_mail(
    root_home: tuple[Home, Path],  # noqa: F811 - the imported fixture
) -> None:
    """The listener (qmaild) cannot start another committer: its messages go to the queue
    service, which signs an authenticated session's because qmaild asks (its ``sign``
    option), and still not the unauthenticated ones."""
    home, _user = root_home
    ids = home.ids()
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    env["PYQMAIL_HOME"] = str(home.root)
    for argv, stdin in (
        (["passwd", "alice"], b"r00t pw\n"),
        (["dkim", "keygen", "test.example"], b""),
    ):
        done = subprocess.run([str(BIN / "pyqmail"), *argv], input=stdin, env=env,
                              capture_output=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
    (home.control / "smtproutes").write_text("elsewhere.example:127.0.0.1:1\n")  # deferred
    (home.control / "rcptchecks").write_text("0\n")
    ca = trustme.CA()
    install_cert(home, ca, "mx.test.example")
    port = free_port()
    proc, log = start_root_run(home, port)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def send(subject: str, rcpt: str, login: bool) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("client.example")
            s.starttls(context=ctx)
            s.ehlo("client.example")
            if login:
                s.login("alice", "r00t pw")
            msg = f"From: alice@test.example\r\nSubject: {subject}\r\n\r\nbody\r\n"
            s.sendmail("alice@test.example", [rcpt], msg)

    def queued(subject: str) -> bytes:
        found: list[bytes] = []

        def look() -> bool:
            for root, _, names in os.walk(home.queue / "mess"):
                for n in names:
                    data = Path(root, n).read_bytes()
                    if f"Subject: {subject}\n".encode() in data:
                        found.append(data)
                        return True
            return False

        wait_for(look, what=f"{subject!r} in the queue")
        return found[0]

    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        send("via committer", "x@elsewhere.example", True)  # the committer starts
        assert b"\nDKIM-Signature: v=1;" in queued("via committer")
        tree, todo = [], [proc.pid]
        while todo:
            kids = _children_of(todo.pop())
            tree += kids
            todo += kids
        (listener,) = [p for p in tree if ids_of(p)[0] == ids.uid("daemon")]
        (committer,) = [p for p in _children_of(listener) if ids_of(p)[0] == ids.uid("queue")]
        os.kill(committer, signal.SIGKILL)
        wait_for(lambda: committer not in _children_of(listener), what="the committer's end")
        send("via service", "x@elsewhere.example", True)
        mess = queued("via service")
        assert b"\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=test.example;" in mess
        # the service's qp is its caller's pid (the listener's), the committer's its own
        assert b"(qmail %d invoked from network)" % listener in mess
        send("anonymous via service", "postmaster@test.example", False)
        assert b"DKIM-Signature" not in queued("anonymous via service")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text and "r00t pw" not in text
