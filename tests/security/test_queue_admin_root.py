"""The queue manager (send/admin.py) as root on a multi-user home: a symlink that qmailq or
qmails plants in a directory of theirs never makes root change, create or read its target.

Each home is made by ``pyqmail init`` (layout.create_home) with qmail's real accounts; the
decoys are root's files outside the home, and each test checks them afterwards.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyqmail.home import Home
from pyqmail.queue.layout import QueuePaths
from pyqmail.send import admin
from tests.conftest import is_root
from tests.security._support import root_home

pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    h = root_home("pyqmail-sec-admin-")
    yield h
    shutil.rmtree(h.root.parent, ignore_errors=True)


def decoy(home: Home, name: str = "decoy") -> Path:
    """A root-owned 0644 file outside the home."""
    f = home.root.parent / name
    f.write_bytes(b"root's\n")
    os.chown(f, 0, 0)
    f.chmod(0o644)
    return f


def unchanged(f: Path) -> bool:
    st = os.stat(f)
    return (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o644) and (
        f.read_bytes() == b"root's\n"
    )


def queue_message(home: Home) -> int:
    """A preprocessed message as qmail leaves it: mess/S/N and intd/N qmailq's, info/S/N
    and remote/S/N qmails's (group qmail); N is the mess file's inode number."""
    ids = home.ids()
    q, s, g = ids.uid("queue"), ids.uid("send"), ids.gid("qmail")
    paths = QueuePaths(home.queue)
    tmp = home.queue / "mess" / "0" / "new"
    tmp.write_bytes(b"Subject: hello\n\nbody\n")
    n = os.stat(tmp).st_ino
    os.rename(tmp, paths.mess(n))
    files = [
        (paths.mess(n), None, q),
        (Path(paths.name("intd", n)), b"u0\0p1\0Fjoe@test.example\0Tr@remote.example\0\0", q),
        (paths.info(n), b"Fjoe@test.example\0", s),
        (paths.remote(n), b"Tr@remote.example\0", s),
    ]
    for f, data, uid in files:
        if data is not None:
            f.write_bytes(data)
        os.chown(f, uid, g)
        f.chmod(0o644 if uid == q else 0o600)
    return n


# ---------------------------------------------------------------- prepare_as_root


def test_a_symlink_at_queue_hold_is_not_chowned(home: Home) -> None:
    target = decoy(home)
    hold = home.queue / admin.HOLD_DIR
    hold.rmdir()  # a home from before init made queue/hold, and qmailq's symlink there
    hold.symlink_to(target)
    sock = admin.prepare_as_root(home, home.ids())
    assert sock is not None
    sock.close()
    assert unchanged(target)
    assert hold.is_symlink()


def test_prepare_as_root_makes_hold_for_an_old_home(home: Home) -> None:
    hold = home.queue / admin.HOLD_DIR
    hold.rmdir()
    sock = admin.prepare_as_root(home, home.ids())
    assert sock is not None
    sock.close()
    st = os.lstat(hold)
    ids = home.ids()
    assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o777 == 0o700
    assert (st.st_uid, st.st_gid) == (ids.uid("send"), ids.gid("qmail"))


# ---------------------------------------------------------------- bind_control


def test_a_symlink_planted_at_the_socket_is_not_followed(home: Home) -> None:
    target = decoy(home)
    path = admin.control_path(home)
    path.parent.mkdir(exist_ok=True)
    path.symlink_to(target)
    s = admin.bind_control(path, grp.getgrnam("qmail").gr_gid)
    s.close()
    assert unchanged(target)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o660
    assert (st.st_uid, st.st_gid) == (0, grp.getgrnam("qmail").gr_gid)


def test_a_symlink_swapped_in_after_bind_is_not_chowned(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qmailq replaces the new socket by a symlink to /etc/shadow's like right after bind:
    root must not chown or chmod by name afterwards."""
    target = decoy(home)
    path = admin.control_path(home)
    path.parent.mkdir(exist_ok=True)
    bound = path.parent / "bound.sock"
    real = socket.socket

    class Swapping(real):  # type: ignore[misc,valid-type]
        def bind(self, address: Any) -> None:
            super().bind(address)
            os.rename(path, bound)
            path.symlink_to(target)

    monkeypatch.setattr(socket, "socket", Swapping)
    s = admin.bind_control(path, grp.getgrnam("qmail").gr_gid)
    s.close()
    assert unchanged(target)
    st = os.lstat(bound)  # the socket as it was bound: its final group and mode at once
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o660
    assert st.st_gid == grp.getgrnam("qmail").gr_gid
