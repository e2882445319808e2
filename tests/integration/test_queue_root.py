"""Root-only: the queue service as qmailq with callers of other uids, and the queue on
a full, a read-only and a wrongly owned file system."""

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

from pyqmail.cli.queue import main as qmail_queue_main
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import QueueError, QueueWriter
from tests.conftest import qmail_ids

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

BIN = Path(sys.executable).parent


def queue_files(root: Path) -> set[str]:
    out = set()
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if not rel.startswith("lock"):
                out.add(rel)
    return out


@pytest.fixture
def multi_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A multi-user home owned as qmail's install makes it, reachable by every user."""
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    ids = qmail_ids()
    top = Path(tempfile.mkdtemp(prefix="pyqmail-q-"))
    os.chmod(top, 0o755)
    home = Home(top / "qmail", single_user=False)
    create_home(home, "mx.test.example", ids)
    monkeypatch.setenv("PYQMAIL_HOME", str(home.root))
    yield home
    shutil.rmtree(top)


def _run_as(uid: int, gid: int, msg: Path, env: Path, extra_env: dict[str, str]) -> int:
    """Fork, drop to uid/gid, and run qmail-queue's main() with fd 0/1 on the files.

    (Forked rather than exec'd: this machine's interpreter lives under /root, which other
    users cannot execute; the code path is the command's own main, imported at the top
    so that the child, no longer root, has nothing left to read from under /root.)
    """
    pid = os.fork()
    if pid == 0:
        rc = 100
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.environ.update(extra_env)
            os.dup2(os.open(msg, os.O_RDONLY), 0)
            os.dup2(os.open(env, os.O_RDONLY), 1)
            rc = qmail_queue_main([])
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_service_learns_caller_uid(multi_home: Home, tmp_path: Path) -> None:
    home = multi_home
    sock = home.root / "run" / "qmail-queue.sock"
    svc = subprocess.Popen(
        [sys.executable, "-m", "pyqmail.queue.service", "--home", str(home.root)],
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"},
    )
    try:
        assert svc.stderr is not None
        line = svc.stderr.readline()
        assert b"listening on" in line, line
        assert os.stat(sock).st_mode & 0o777 == 0o666
        work = Path(tempfile.mkdtemp())
        os.chmod(work, 0o755)
        msg, env = work / "m", work / "e"
        msg.write_bytes(b"Subject: from a user\n\nhello\n")
        env.write_bytes(b"Fuser@mx.test.example\0Tbob@example.org\0\0")
        for p in (msg, env):
            os.chmod(p, 0o644)
        ids = home.ids()
        nobody = pwd.getpwnam("nobody")
        cases = [
            (nobody.pw_uid, nobody.pw_gid, f"invoked by uid {nobody.pw_uid}"),
            (ids.uid("daemon"), ids.gid("nofiles"), "invoked from network"),
            (ids.uid("send"), ids.gid("qmail"), "invoked for bounce"),
            (ids.uid("alias"), ids.gid("nofiles"), "invoked by alias"),
        ]
        paths = QueuePaths(home.queue)
        seen: set[str] = set()
        for uid, gid, text in cases:
            # a user who cannot write the queue goes through the service
            assert _run_as(uid, gid, msg, env, {}) == 0
            (name,) = set(os.listdir(paths.dir("todo"))) - seen
            seen.add(name)
            n = int(name)
            data = paths.mess(n).read_bytes()
            assert re.match(rb"Received: \(qmail \d+ %s\); " % text.encode(), data), data[:80]
            t = parse_todo(paths.todo(n).read_bytes())
            assert t.uid == uid
            assert os.stat(paths.mess(n)).st_uid == ids.uid("queue")
        # a refused envelope through the service: exit code, nothing left
        env.write_bytes(b"Tbob@example.org\0\0")
        assert _run_as(nobody.pw_uid, nobody.pw_gid, msg, env, {}) == 91
        assert len(queue_files(home.queue)) == 3 * len(cases)
        shutil.rmtree(work)
    finally:
        svc.terminate()
        svc.wait(10)


def test_root_qmail_queue_drops_to_qmailq(multi_home: Home, tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"Fa\0Tb\0\0")
    with open(tmp_path / "e", "rb") as env:
        r = subprocess.run([str(BIN / "qmail-queue")], input=b"x\n", stdout=env, timeout=30)
    assert r.returncode == 0
    paths = QueuePaths(multi_home.queue)
    (name,) = os.listdir(paths.dir("todo"))
    assert os.stat(paths.mess(int(name))).st_uid == multi_home.ids().uid("queue")
    assert b"invoked by uid 0" in paths.mess(int(name)).read_bytes()


@pytest.mark.parametrize(
    ("where", "code"), [("pid", 63), ("mess/{s}", 64), ("intd", 65), ("todo", 66)]
)
def test_wrongly_owned_dirs(multi_home: Home, tmp_path: Path, where: str, code: int) -> None:
    paths = QueuePaths(multi_home.queue)
    if "{s}" in where:
        for i in range(23):
            os.chown(paths.root / "mess" / str(i), 0, 0)
            os.chmod(paths.root / "mess" / str(i), 0o700)
    else:
        os.chown(paths.root / where, 0, 0)
        os.chmod(paths.root / where, 0o700)
    (tmp_path / "e").write_bytes(b"Fa\0Tb\0\0")
    with open(tmp_path / "e", "rb") as env:
        r = subprocess.run(
            [str(BIN / "qmail-queue")], input=b"x\n", stdout=env, stderr=subprocess.PIPE, timeout=30
        )
    assert r.returncode == code
    assert b"Permission denied" in r.stderr
    assert queue_files(paths.root) == set()


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pyqmail-tmpfs-"))
    opts = "size=400k,nr_inodes=200"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:  # root on Debian can; a container without CAP_SYS_ADMIN cannot
        os.rmdir(d)
        pytest.fail(f"root cannot mount a tmpfs: {r.stderr.decode().strip()}", pytrace=False)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        os.rmdir(d)


def _home_on(fs: Path) -> Home:
    home = Home(fs / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    return home


def test_disk_full(tiny_fs: Path, tmp_path: Path) -> None:
    home = _home_on(tiny_fs)
    p = QueueWriter(home).begin()
    for _ in range(100):
        p.write(b"z" * 10_000)
    with pytest.raises(QueueError) as ei:
        p.commit(b"a", [b"b"])
    assert ei.value.code == 53
    assert "No space left" in str(ei.value)
    assert queue_files(home.queue) == set()
    # the command: same code, a clear message, nothing left; then space frees up again
    (tmp_path / "e").write_bytes(b"Fa\0Tb\0\0")
    with open(tmp_path / "e", "rb") as env:
        r = subprocess.run(
            [str(BIN / "qmail-queue"), "--home", str(home.root), "--single-user"],
            input=b"y" * 1_000_000,
            stdout=env,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    assert r.returncode == 53 and b"No space left" in r.stderr
    assert queue_files(home.queue) == set()
    p = QueueWriter(home).begin()
    p.write(b"small\n")
    assert p.commit(b"a", [b"b"]) > 0


def test_out_of_inodes(tiny_fs: Path) -> None:
    home = _home_on(tiny_fs)
    filler = tiny_fs / "filler"
    filler.mkdir()
    i = 0
    try:
        while True:
            (filler / str(i)).touch()
            i += 1
    except OSError:
        pass
    with pytest.raises(QueueError) as ei:
        QueueWriter(home).begin()
    assert ei.value.code == 53
    assert queue_files(home.queue) == set()


def test_read_only(tiny_fs: Path, tmp_path: Path) -> None:
    home = _home_on(tiny_fs)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    (tmp_path / "e").write_bytes(b"Fa\0Tb\0\0")
    with open(tmp_path / "e", "rb") as env:
        r = subprocess.run(
            [str(BIN / "qmail-queue"), "--home", str(home.root), "--single-user"],
            input=b"x\n",
            stdout=env,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    assert r.returncode == 63
    assert b"Read-only file system" in r.stderr
    assert queue_files(home.queue) == set()
