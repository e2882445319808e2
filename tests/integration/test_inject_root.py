"""Root-only: root's qmail-inject and sendmail queue with no `pyqmail run` and no queue
service going, as qmail's do (qmail-queue is setuid qmailq): the message is written by a
child that became qmailq, and qmail-queue's Received line names uid 0."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.service import socket_path

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

BIN = Path(sys.executable).parent


@pytest.fixture
def multi_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    top = Path(tempfile.mkdtemp(prefix="pyqmail-inject-root-"))
    os.chmod(top, 0o755)
    home = Home(top / "qmail", single_user=False)
    create_home(home, "mx.test.example", home.ids())
    yield home
    shutil.rmtree(top)


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
