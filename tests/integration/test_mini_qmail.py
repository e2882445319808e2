"""mini-qmail: a null client (control/qmqpservers set) hands EVERYTHING to QMQP.

queue/submit.py's ``submitter`` is the one decision every caller uses (qmail-inject and
sendmail, smtpd, forwards from qmail-local, the scheduler's bounces), and qmail-queue
itself becomes qmail-qmqpc. Each case below runs against a real QmqpServer on loopback
(the central server's own queue) and checks the null client's queue stays empty.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue import codes
from pyqmail.queue.envelope import format_input
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.qmqpc import QmqpSubmitter
from pyqmail.queue.submit import (
    InProcessSubmitter,
    ProgramSubmitter,
    QueueSubmitter,
    qmqp_servers,
    submitter,
)
from pyqmail.queue.writer import QueueError
from pyqmail.smtp.qmqpd import QmqpServer
from tests.integration.test_qmqp_server import Listener, queued

BIN = Path(sys.executable).parent
MSG = b"From: robot@null.test.example\nSubject: mini\n\nhello\n"


@pytest.fixture
def central(home: Home) -> Iterator[tuple[Home, Listener]]:
    srv = QmqpServer(home, ControlCache(home), InProcessSubmitter(home))
    lst = Listener(srv)
    yield home, lst
    lst.close()


@pytest.fixture
def null(tmp_path: Path, central: tuple[Home, Listener]) -> Home:
    h = Home(tmp_path / "null", single_user=True)
    create_home(h, "null.test.example", None)
    (h.control / "qmqpservers").write_text(f"127.0.0.1:{central[1].port}\n")
    return h


def _mess_files(home: Home) -> list[str]:
    return [n for d in QueuePaths(home.queue).split_dirs("mess") for n in os.listdir(d)]


def _env(home: Home, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QMAILQUEUE"}
    env.update(PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1", **extra)
    return env


def null_port(h: Home) -> int:
    return int((h.control / "qmqpservers").read_text().strip().rsplit(":", 1)[1])


def test_the_decision(null: Home, home: Home) -> None:
    assert isinstance(submitter(null, env={}), QmqpSubmitter)
    assert submitter(null, env={}).kind == "qmqp"
    assert qmqp_servers(null) == (f"127.0.0.1:{null_port(null)}",)
    # QMAILQUEUE still wins; a host without qmqpservers writes its own queue
    assert isinstance(submitter(null, env={"QMAILQUEUE": "/bin/true"}), ProgramSubmitter)
    assert isinstance(submitter(home, env={}), QueueSubmitter)
    # the caller's already-loaded list is used as given
    assert isinstance(submitter(home, env={}, qmqpservers=("127.0.0.1",)), QmqpSubmitter)
    assert isinstance(submitter(null, env={}, qmqpservers=()), QueueSubmitter)
    (null.control / "qmqpservers").write_text("# no server\n\n")
    assert isinstance(submitter(null, env={}), QueueSubmitter)


def test_unreadable_qmqpservers_refuses_instead_of_queueing_locally(null: Home) -> None:
    (null.control / "qmqpservers").unlink()
    (null.control / "qmqpservers").mkdir()  # reading it fails: not "no servers"
    sub = submitter(null, env={})
    with pytest.raises(QueueError) as e:
        sub.begin()
    assert e.value.code == codes.CONFIG_ERROR
    r = subprocess.run([str(BIN / "qmail-queue")], input=MSG, env=_env(null), timeout=60)
    assert r.returncode == codes.CONFIG_ERROR
    assert _mess_files(null) == []


def test_bounce_through_submitter_goes_to_central(
    null: Home, central: tuple[Home, Listener]
) -> None:
    """What the scheduler does with the submitter the daemon made: origin "bounce"."""
    p = submitter(null, env={}).begin(origin="bounce")
    p.write(MSG)
    assert p.commit_blocking(b"", [b"poster@test.example"]).code == 0
    [(sender, rcpts, mess)] = queued(central[0])
    assert (sender, rcpts) == (b"", (b"poster@test.example",))
    assert mess.endswith(MSG)
    assert _mess_files(null) == [] and os.listdir(null.queue / "todo") == []


def test_qmail_queue_is_qmail_qmqpc(null: Home, central: tuple[Home, Listener]) -> None:
    rfd, wfd = os.pipe()
    os.write(wfd, format_input(b"robot@null.test.example", [b"a@test.example", b"b@x.example"]))
    os.close(wfd)
    try:
        r = subprocess.run(
            [str(BIN / "qmail-queue")], input=MSG, stdout=rfd, env=_env(null),
            capture_output=False, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
    finally:
        os.close(rfd)
    assert r.returncode == 0, r.stderr
    [(sender, rcpts, mess)] = queued(central[0])
    assert sender == b"robot@null.test.example"
    assert rcpts == (b"a@test.example", b"b@x.example")
    assert mess.endswith(MSG)
    assert _mess_files(null) == [] and os.listdir(null.queue / "todo") == []


def test_qmail_queue_on_a_null_client_maps_qmqp_failures(null: Home) -> None:
    """No server answers: qmail-qmqpc's 73 (connection refused), nothing queued here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    (null.control / "qmqpservers").write_text(f"127.0.0.1:{dead}\n")
    rfd, wfd = os.pipe()
    os.write(wfd, format_input(b"s", [b"r@x.example"]))
    os.close(wfd)
    try:
        r = subprocess.run([str(BIN / "qmail-queue")], input=MSG, stdout=rfd, env=_env(null),
                           timeout=60)  # fmt: skip
    finally:
        os.close(rfd)
    assert r.returncode == codes.CONN_REJECTED
    assert _mess_files(null) == []


def test_qmail_local_forward_goes_to_central(
    null: Home, central: tuple[Home, Listener], tmp_path: Path
) -> None:
    joe = tmp_path / "joe"
    joe.mkdir()
    (joe / ".qmail-fwd").write_text("&bob@test.example\n")
    m = tmp_path / "m"
    m.write_bytes(MSG)
    argv = [str(BIN / "qmail-local"), "--", "joe", str(joe), "joe-fwd", "-", "fwd",
            "null.test.example", "s@x.example", "./Maildir/"]  # fmt: skip
    with open(m, "rb") as f:
        r = subprocess.run(argv, stdin=f, capture_output=True, env=_env(null), timeout=60)
    assert r.returncode == 0, r.stderr
    [(sender, rcpts, mess)] = queued(central[0])
    assert (sender, rcpts) == (b"s@x.example", (b"bob@test.example",))
    assert b"Delivered-To: joe-fwd@null.test.example\n" in mess and mess.endswith(MSG)
    assert _mess_files(null) == [] and os.listdir(null.queue / "todo") == []
