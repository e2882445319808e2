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

from pyqmail import durable
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


# ---------------------------------------------------------------- direct mode


def test_a_symlink_at_a_missing_sendmutex_is_not_followed(home: Home) -> None:
    target = home.root.parent / "created-by-root"
    mutex = QueuePaths(home.queue).sendmutex
    mutex.unlink()
    mutex.symlink_to(target)
    q = admin.DirectQueue(home)
    with pytest.raises(admin.AdminError, match="sendmutex"):
        q.lock()
    q.close()
    assert not target.exists() and not target.is_symlink()


def test_a_symlink_to_a_file_at_sendmutex_is_not_opened(home: Home) -> None:
    target = decoy(home)
    mutex = QueuePaths(home.queue).sendmutex
    mutex.unlink()
    mutex.symlink_to(target)
    with pytest.raises(admin.AdminError, match="sendmutex"):
        admin.DirectQueue(home).lock()
    assert unchanged(target)


def test_hold_marker_symlinks_are_not_followed(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink planted at queue/hold/N (to a missing file, to root's file), or swapped in
    between the marker's write and its chown, never changes or creates its target."""
    n = queue_message(home)
    paths = QueuePaths(home.queue)
    mark = paths.root / admin.HOLD_DIR / str(n)
    missing = home.root.parent / "no-such-file"
    mark.symlink_to(missing)
    q = admin.DirectQueue(home)
    assert q.lock()
    try:
        (r,) = q.act("hold", [n], None)
        assert r.ok, r.text
        assert not missing.exists()
        assert (r := q.act("release", [n], None)[0]).ok, r.text
        target = decoy(home)
        real = durable.replace_file

        def swapping(path: Any, *args: Any, **kw: Any) -> None:
            real(path, *args, **kw)
            os.unlink(path)
            os.symlink(target, path)

        monkeypatch.setattr(durable, "replace_file", swapping)
        q.act("hold", [n], None)
        assert unchanged(target)
    finally:
        q.close()


def test_hold_release_delete_as_root_keep_the_owners(home: Home) -> None:
    ids = home.ids()
    n = queue_message(home)
    keep = queue_message(home)
    paths = QueuePaths(home.queue)
    q = admin.DirectQueue(home)
    assert q.lock()
    try:
        assert {m.id for m in q.states(None)} == {n, keep}
        assert q.show(n).headers == "Subject: hello\n"
        assert q.act("hold", [n], None)[0].ok
        mark = paths.root / admin.HOLD_DIR / str(n)
        st = os.lstat(mark)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == ids.uid("send")
        assert admin.is_held(paths, n) and q.show(n).held
        assert q.act("release", [n], None)[0].ok and not mark.exists()
        assert q.act("retry", [n], None)[0].ok
        assert q.act("hold", [n], None)[0].ok
        (r,) = q.act("delete", [n], None)
        assert r.ok and r.text == "deleted", r.text
        for f in (paths.mess(n), paths.info(n), paths.remote(n), mark):
            assert not os.path.lexists(f), f
        assert not os.path.lexists(paths.name("intd", n))
        assert [m.id for m in q.states(None)] == [keep]
        assert os.stat(paths.mess(keep)).st_uid == ids.uid("queue")
        assert not q.act("delete", [n], None)[0].ok  # gone
    finally:
        q.close()


def test_delete_with_bounce_as_root_queues_the_bounce_as_qmailq(home: Home) -> None:
    """qmails's child records the failures; the bounce is queued through root's own
    submitter (a child that becomes qmailq), relayed, with no queue service running."""
    ids = home.ids()
    n = queue_message(home)
    todo = home.queue / "todo"
    before = set(todo.iterdir())
    q = admin.DirectQueue(home)
    assert q.lock()
    try:
        (r,) = q.act("delete", [n], "spam")
        assert r.ok and r.text == "deleted and bounced", r.text
    finally:
        q.close()
    paths = QueuePaths(home.queue)
    for f in (paths.mess(n), paths.info(n), paths.remote(n), Path(paths.name("bounce", n))):
        assert not os.path.lexists(f), f
    (new,) = set(todo.iterdir()) - before
    assert os.stat(new).st_uid == ids.uid("queue")
    m = int(new.name)
    text = paths.mess(m).read_bytes()
    assert b"deleted from the queue by the postmaster: spam" in text
    assert b"<r@remote.example>" in text and b"Subject: hello" in text
    assert b"Tjoe@test.example\0" in new.read_bytes()
