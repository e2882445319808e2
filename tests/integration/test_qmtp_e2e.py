"""Two `pyqmail run` instances: A routes b.test.example over QMTP (control/qmtproutes) to
B's `--qmtp` listener, and B delivers to a Maildir; a null client hands mail to B over
QMQP (`--qmqp`) the same way. The whole path: inject -> queue -> scheduler -> RemoteAgent
-> QMTP -> queue -> local delivery."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.conftest import free_port

BIN = Path(sys.executable).parent


def _env(home: Home) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(home.root),
            "PYQMAIL_SINGLE_USER": "1", "USER": "robot"}  # fmt: skip


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "pyqmail run exited"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def _wait_files(d: Path, n: int) -> list[Path]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        files = sorted(d.iterdir())
        if len(files) >= n:
            return files
        time.sleep(0.1)
    raise AssertionError(f"{d}: {len(list(d.iterdir()))} of {n} messages delivered")


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Home, Home, Path, int]]:
    a = Home(tmp_path / "a", single_user=True)
    create_home(a, "a.test.example", None)
    b = Home(tmp_path / "b", single_user=True)
    create_home(b, "b.test.example", None)
    (b.control / "locals").write_text("b.test.example\n")
    (b.control / "rcpthosts").write_text("b.test.example\n")
    mbox = tmp_path / "carol"
    for sub in ("cur", "new", "tmp"):
        (mbox / "Maildir" / sub).mkdir(parents=True)
    (b.users / "assign").write_text(f"=carol:carol:{os.getuid()}:{os.getgid()}:{mbox}:::\n.\n")
    subprocess.run([str(BIN / "qmail-newu")], env=_env(b), check=True)
    qmtp_port, qmqp_port = free_port(), free_port()
    (a.control / "qmtproutes").write_text(f"b.test.example:127.0.0.1:{qmtp_port}\n")
    b_args = ["--qmtp", f"127.0.0.1:{qmtp_port}", "--qmqp", f"127.0.0.1:{qmqp_port}"]
    procs = [
        subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(home.root), "--single-user", *args],
            env=_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for home, args in ((b, b_args), (a, []))
    ]
    _wait_port(qmtp_port, procs[0])
    _wait_port(qmqp_port, procs[0])
    yield a, b, mbox / "Maildir" / "new", qmqp_port
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_mail_from_a_reaches_b_over_qmtp_and_from_a_null_client_over_qmqp(
    sites: tuple[Home, Home, Path, int], tmp_path: Path
) -> None:
    a, _, new, qmqp_port = sites
    r = subprocess.run([str(BIN / "qmail-inject")], env=_env(a), capture_output=True,
                       input=b"To: carol@b.test.example\nSubject: via qmtp\n\nhi\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    null = Home(tmp_path / "null", single_user=True)
    create_home(null, "null.test.example", None)
    (null.control / "qmqpservers").write_text(f"127.0.0.1:{qmqp_port}\n")
    r = subprocess.run([str(BIN / "sendmail"), "-t"], env=_env(null), capture_output=True,
                       input=b"To: carol@b.test.example\nSubject: via qmqp\n\nhi\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    files = _wait_files(new, 2)
    texts = [f.read_bytes() for f in files]
    qmtp = next(t for t in texts if b"Subject: via qmtp" in t)
    qmqp = next(t for t in texts if b"Subject: via qmqp" in t)
    assert b"\n  by b.test.example with QMTP; " in qmtp
    assert b"From: robot@a.test.example" in qmtp
    assert b"\n  by b.test.example with QMQP; " in qmqp
    assert list((null.queue / "todo").iterdir()) == []
