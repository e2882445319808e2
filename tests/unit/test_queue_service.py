"""queue/service.py: framing, the reply, and the origin wording from the caller's uid."""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import pytest

from pyqmail.home import Home, Ids
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import CrashState
from pyqmail.queue.service import (
    FrameError,
    QueueService,
    ServiceClient,
    netstring,
    origin_of,
    peer_credentials,
    read_netstring,
)
from pyqmail.queue.writer import QueueWriter


def test_netstrings() -> None:
    f = io.BytesIO(netstring(b"hello") + netstring(b"") + b"3:abc,")
    assert read_netstring(f, 10) == b"hello"
    assert read_netstring(f, 10) == b""
    assert read_netstring(f, 10) == b"abc"
    with pytest.raises(FrameError):
        read_netstring(f, 10)


@pytest.mark.parametrize(
    "raw", [b"5:abc", b"3:abc;", b"x:", b":", b"99999999999:", b"20:" + b"a" * 20 + b","]
)
def test_bad_netstrings(raw: bytes) -> None:
    with pytest.raises(FrameError):
        read_netstring(io.BytesIO(raw), 10)


def test_origin_of() -> None:
    ids = Ids(
        {
            "alias": 1,
            "daemon": 2,
            "log": 3,
            "owner": 0,
            "passwd": 4,
            "queue": 5,
            "remote": 6,
            "send": 7,
        },
        {"nofiles": 10, "qmail": 11},
        False,
    )
    assert [origin_of(u, ids) for u in (1, 2, 7, 5, 1000)] == [
        "alias",
        "network",
        "bounce",
        "uid",
        "uid",
    ]
    assert origin_of(2, None) == "uid"


def test_peer_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_raw_protocol(home: Home, tmp_path: Path) -> None:
    svc = QueueService(home, path=tmp_path / "s")
    svc.bind()
    svc.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(svc.path))
            s.sendall(b"6:hello\n,0:," + netstring(b"Fa\0Tb\0\0"))
            with s.makefile("rb") as f:
                code, qp, n = read_netstring(f, 100).split()
        assert (code, int(qp)) == (b"0", os.getpid())
        data = QueuePaths(home.queue).mess(int(n)).read_bytes()
        assert data.endswith(b"\nhello\n")
        # broken framing: nothing queued, 54
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(svc.path))
            s.sendall(b"6:hello\n;")
            s.shutdown(socket.SHUT_WR)
            with s.makefile("rb") as f:
                assert read_netstring(f, 100).split()[0] == b"54"
        assert os.listdir(home.queue / "todo") == [n.decode()]
    finally:
        svc.close()
    assert not svc.path.exists()


def test_unexpected_error_is_81_and_leaves_nothing(home: Home, tmp_path: Path) -> None:
    def hook(state: CrashState) -> None:
        if state is CrashState.INTD_CREATED:
            raise RuntimeError("bug")

    svc = QueueService(home, path=tmp_path / "s", writer=QueueWriter(home, hook=hook))
    svc.bind()
    svc.start()
    try:
        r = ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")
        assert r.code == 81 and "RuntimeError" in r.text
    finally:
        svc.close()
    paths = QueuePaths(home.queue)
    assert os.listdir(paths.dir("todo")) == [] and os.listdir(paths.dir("intd")) == []
    assert all(os.listdir(d) == [] for d in paths.split_dirs("mess"))


def test_limits_refuse_at_once_instead_of_waiting(home: Home, tmp_path: Path) -> None:
    svc = QueueService(home, path=tmp_path / "s", max_clients=2)
    svc.bind()
    svc.start()
    held = []
    try:
        for _ in range(2):  # two silent clients hold both slots (and make no files)
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(svc.path))
            held.append(c)
        r = ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")
        assert r.code == 71 and "too many connections" in r.text
        assert os.listdir(home.queue / "pid") == []
        held.pop().close()  # the service answers the closed one (54) and frees its slot
        # the slot is freed when the service thread sees the close: retry until then
        deadline = time.monotonic() + 10
        while (r := ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")).code == 71:
            assert time.monotonic() < deadline
        assert r.code == 0
    finally:
        for c in held:
            c.close()
        svc.close()


def test_per_uid_limit(home: Home, tmp_path: Path) -> None:
    svc = QueueService(home, path=tmp_path / "s", per_uid=1)
    svc._trusted.clear()  # treat the test's own uid as an ordinary user
    svc.bind()
    svc.start()
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(svc.path))
        r = ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")
        assert r.code == 71 and f"uid {os.getuid()}" in r.text
        c.close()
    finally:
        svc.close()


@pytest.mark.root
@pytest.mark.parametrize("plant", ["writable parent", "symlink"])
def test_root_makes_the_socket_directory_only_where_no_one_else_can_act(
    home: Home, tmp_path: Path, plant: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    parent = tmp_path / "p"
    parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if plant == "writable parent":
        parent.chmod(0o777)  # anyone could swap run/ for a symlink between two calls
    else:
        parent.chmod(0o755)
        (parent / "run").symlink_to(elsewhere)
    svc = QueueService(home, path=parent / "run" / "qmail-queue.sock")
    with pytest.raises(OSError):
        svc.prepare_dir((12345, 12345))
    st = elsewhere.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    assert plant == "symlink" or not (parent / "run").exists()


@pytest.mark.root
def test_root_made_socket_directory_belongs_to_the_queue_user(home: Home, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp_path.chmod(0o755)
    svc = QueueService(home, path=tmp_path / "run" / "qmail-queue.sock")
    svc.prepare_dir((12345, 23456))
    st = os.lstat(tmp_path / "run")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (12345, 23456, 0o755)
