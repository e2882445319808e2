"""Root-only: root's qmail-inject and sendmail queue with no `pyqmail run` and no queue
service going, as qmail's do (qmail-queue is setuid qmailq): the message is written by a
child that became qmailq, and qmail-queue's Received line names uid 0. Local users queue
through a standalone queue service, which pyqmail run leaves alone."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.service import ServiceClient, service_alive, socket_path
from tests.conftest import free_port
from tests.integration.test_run_daemon import listening, wait_for
from tests.security._support import root_home

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

BIN = Path(sys.executable).parent


@pytest.fixture
def multi_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    home = root_home("pyqmail-inject-root-")  # a multi-user home, as the security tests make it
    yield home
    shutil.rmtree(home.root.parent)


def _env(home: Home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYQMAIL_")}
    env["PYQMAIL_HOME"] = str(home.root)
    return env


@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "qmail-inject")],
        [str(BIN / "sendmail"), "-t"],
        ["HOME/bin/sendmail", "-t"],  # the wrapper pyqmail init wrote, as /usr/sbin/sendmail
    ],
)
def test_root_injects_without_a_service(multi_home: Home, command: list[str]) -> None:
    home = multi_home
    assert not socket_path(home).exists()
    argv = [c.replace("HOME", str(home.root)) for c in command]
    r = subprocess.run(
        argv,
        input=b"To: someone@remote.example\nSubject: from root\n\nhello\n",
        capture_output=True,
        env=_env(home),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    qmailq = pwd.getpwnam("qmailq").pw_uid
    paths = QueuePaths(home.queue)
    (name,) = os.listdir(home.queue / "todo")
    n = int(name)
    assert parse_todo(paths.todo(n).read_bytes()).recipients == (b"someone@remote.example",)
    for f in (paths.todo(n), paths.mess(n), paths.intd(n)):
        assert f.stat().st_uid == qmailq, f
    first = paths.mess(n).read_bytes().split(b"\n", 1)[0]
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked by uid 0\); .*", first), first


def _submit_as_nobody(home: Home) -> int:
    """Fork, become nobody, hand a message to the queue service; its exit code."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        rc = 100
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            reply = ServiceClient(socket_path(home)).submit(
                [b"Subject: from nobody\n\nx\n"], b"Fnobody@x.example\0Tjoe@y.example\0\0"
            )
            rc = reply.code
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_standalone_service_outlives_pyqmail_run(multi_home: Home) -> None:
    """qmail-queue --serve (the unit init writes in HOME/doc) keeps local users' queueing
    working across pyqmail run's start and stop: run leaves the live socket alone."""
    home = multi_home
    unit = (home.root / "doc" / "pyqmail-queue.service").read_text()
    assert f"ExecStart={home.root}/bin/qmail-queue --serve" in unit
    env = _env(home)
    log = home.root.parent / "logs"
    with open(log, "wb") as out:
        svc = subprocess.Popen(
            [str(home.root / "bin" / "qmail-queue"), "--serve"], stdout=out, stderr=out, env=env
        )
        try:
            wait_for(lambda: service_alive(socket_path(home)), what="the queue service")
            ino = socket_path(home).stat().st_ino
            port = free_port()
            run = subprocess.Popen(
                [str(BIN / "pyqmail"), "run", "--smtp", f"127.0.0.1:{port}"],
                stdout=out, stderr=out, env=env, start_new_session=True,
            )  # fmt: skip
            try:
                wait_for(lambda: listening(port) or run.poll() is not None, what="pyqmail run")
                assert run.poll() is None, log.read_text()
                assert _submit_as_nobody(home) == 0, log.read_text()
            finally:
                run.send_signal(signal.SIGTERM)
                assert run.wait(60) == 0, log.read_text()
            assert socket_path(home).stat().st_ino == ino
            assert service_alive(socket_path(home))
            before = set(os.listdir(home.queue / "todo"))
            assert _submit_as_nobody(home) == 0, log.read_text()
            (n,) = set(os.listdir(home.queue / "todo")) - before
        finally:
            svc.terminate()
            svc.wait(30)
    head = QueuePaths(home.queue).mess(int(n)).read_bytes().split(b"\n", 1)[0]
    assert b"invoked by uid %d)" % pwd.getpwnam("nobody").pw_uid in head, head
