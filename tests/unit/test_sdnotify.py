"""sdnotify.py against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.sdnotify import Notifier
from tests.conftest import require_tools


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    """What systemd binds for a Type=notify service: a datagram socket at a path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def _got(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_path_socket_gets_each_message(systemd: socket.socket) -> None:
    n = Notifier(systemd.getsockname(), watchdog_usec=4_000_000)
    assert n.enabled and n.watchdog_interval == 2.0
    assert n.ready("queue 0")
    assert _got(systemd) == ["READY=1", "STATUS=queue 0"]
    assert n.status("two\nlines")
    assert _got(systemd) == ["STATUS=two lines"]  # a newline would start another KEY=
    assert n.watchdog()
    assert _got(systemd) == ["WATCHDOG=1"]
    assert n.stopping("draining")
    assert _got(systemd) == ["STOPPING=1", "STATUS=draining"]
    n.close()


def test_abstract_socket_name(systemd: socket.socket) -> None:
    name = f"pyqmail-test-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind("\0" + name)
    abstract.settimeout(5)
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _got(abstract) == ["READY=1"]
    finally:
        abstract.close()


def test_from_environ_takes_the_variables_out(systemd: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": systemd.getsockname(), "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}  # fmt: skip
    n = Notifier.from_environ(env)
    assert env == {"PATH": "/bin"}  # no delivery program inherits them
    assert n.watchdog_interval == 15.0


def test_a_watchdog_for_another_pid_is_not_ours(systemd: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": systemd.getsockname(), "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": "1"}  # fmt: skip
    n = Notifier.from_environ(env, unset=False)
    assert n.enabled and n.watchdog_interval is None
    assert not n.watchdog()  # no watchdog, no status: nothing sent


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative"},
                                 {"WATCHDOG_USEC": "1000000"}])  # fmt: skip
def test_without_systemd_nothing_is_sent_and_nothing_fails(env: dict[str, str]) -> None:
    n = Notifier.from_environ(env)
    assert not n.enabled and n.watchdog_interval is None
    assert not n.ready() and not n.status("x") and not n.watchdog() and not n.stopping()


def test_a_socket_that_went_away_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "gone"))
    assert n.enabled
    assert not n.ready()  # ENOENT: dropped, never raised
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "gone"))
    try:
        assert n.ready()  # and it recovers when systemd is back
    finally:
        sock.close()


def test_the_same_datagram_as_systemds_own_client(systemd: socket.socket) -> None:
    """systemd-notify (Debian's systemd package) as the oracle of the wire format."""
    require_tools("systemd-notify")
    env = dict(os.environ, NOTIFY_SOCKET=systemd.getsockname())
    subprocess.run(["systemd-notify", "--no-block", "--ready", "--status=queue 3"], env=env,
                   check=True, capture_output=True)  # fmt: skip
    theirs = systemd.recv(4096)
    Notifier(systemd.getsockname()).ready("queue 3")
    assert systemd.recv(4096) == theirs == b"READY=1\nSTATUS=queue 3"
