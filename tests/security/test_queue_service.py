"""The queue service (queue/service.py) is shared: every local user may connect to its
socket (mode 0666), and in multi-user mode the SMTP listener, bounces and forwards queue
through it too. One unprivileged user must not be able to stop everyone's mail by holding
connections open (qmail has no such shared point: each qmail-queue is its own process).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.service import Reply, ServiceClient
from tests.conftest import is_root

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]

# Holds N connections (or as many as it got in 20 s: connect times out while the backlog is
# full), says how many, and ends by itself after 90 s whatever happens to the test.
HOLDER = """
import signal, socket, sys, time
signal.alarm(90)
socks = []
deadline = time.monotonic() + 20
while len(socks) < int(sys.argv[2]) and time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(0.5)
    try:
        s.connect(sys.argv[1])
    except OSError:
        s.close()
        continue
    socks.append(s)
print(len(socks), flush=True)
time.sleep(60)
"""


@pytest.fixture
def service() -> Iterator[tuple[Home, Path]]:
    d = Path(tempfile.mkdtemp(prefix="pyqmail-sec-qs-"))
    d.chmod(0o755)  # nobody must reach the socket, as any local user can
    home = Home(d / "q", single_user=True)
    create_home(home, "mx.test.example", None)
    sock = d / "run" / "qmail-queue.sock"
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    proc = subprocess.Popen(
        [str(BIN / "qmail-queue"), "--serve", "--single-user", "--socket", str(sock),
         "--home", str(home.root)],
        env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():  # the service says nothing when ready: its socket appears
        assert proc.poll() is None and time.monotonic() < deadline, "service did not start"
        time.sleep(0.05)
    yield home, sock
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert b"Traceback" not in err, err
    shutil.rmtree(d, ignore_errors=True)


def _submit(sock: Path, timeout: float) -> Reply | None:
    out: list[Reply] = []

    def go() -> None:
        out.append(
            ServiceClient(sock).submit(iter([b"Subject: s\n\nb\n"]), lambda: b"Fa@b\0Tc@d\0\0")
        )

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


def test_one_user_holding_connections_does_not_stop_the_queue(
    service: tuple[Home, Path],
) -> None:
    _, sock = service
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    holder = subprocess.Popen(
        [shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3", "-c", HOLDER,
         str(sock), "300"],
        stdout=subprocess.PIPE, preexec_fn=drop, start_new_session=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        held = int(holder.stdout.readline() or b"0")
        assert held > 0
        reply = _submit(sock, 8)  # another user's message (here: root's) still gets in
        assert reply is not None, "the queue service is blocked by one user's idle connections"
        assert reply.code == 0, reply
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
