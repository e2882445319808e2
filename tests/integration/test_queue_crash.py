"""Fault injection: stop the writer after every file operation, and SIGKILL a real
qmail-queue at random moments. After each crash the queue must hold either the whole
message in todo/ or nothing qmail-send would pick up, and recover.clean_stale must
remove every leftover (and nothing else)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue.envelope import format_input, parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import CrashState, clean_stale
from pyqmail.queue.writer import QueueWriter

QQ = str(Path(sys.executable).with_name("qmail-queue"))
BODY = b"".join(b"line %06d of the message body\n" % i for i in range(6000))  # ~180 KB
RCPTS = [b"r%d@example.org" % i for i in range(20)]


def queue_files(home: Home) -> set[str]:
    out = set()
    for dirpath, _, names in os.walk(home.queue):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), home.queue)
            if not rel.startswith("lock"):
                out.add(rel)
    return out


def check_invariant(home: Home, body: bytes, known: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """Every todo entry (not in ``known``) names a whole message; returns the new ones."""
    paths = QueuePaths(home.queue)
    new = []
    for name in os.listdir(paths.dir("todo")):
        n = int(name)
        if n in known:
            continue
        data = paths.mess(n).read_bytes()
        first, rest = data.split(b"\n", 1)
        assert first.startswith(b"Received: (qmail ")
        assert rest == body, f"todo/{n} points at a partial message ({len(data)} bytes)"
        t = parse_todo(paths.todo(n).read_bytes())
        assert (t.sender, t.recipients) == (b"s@example.com", tuple(RCPTS))
        new.append(n)
    return new


def _crash_at(home: Home, state: CrashState) -> int:
    """Fork a writer that dies (os._exit, no cleanup) right after ``state``."""
    pid = os.fork()
    if pid == 0:  # child
        try:

            def hook(s: CrashState) -> None:
                if s is state:
                    os._exit(7)

            p = QueueWriter(home, hook=hook).begin()
            for i in range(0, len(BODY), 8192):
                p.write(BODY[i : i + 8192])
            p.commit(b"s@example.com", RCPTS)
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("state", list(CrashState))
def test_crash_after_each_step(home: Home, state: CrashState) -> None:
    assert _crash_at(home, state) == 7
    paths = QueuePaths(home.queue)
    queued = check_invariant(home, BODY)
    assert len(queued) == (1 if state.committed else 0)
    before = queue_files(home)
    report = clean_stale(paths)
    after = queue_files(home)
    if state.committed:
        (n,) = queued
        assert after == {f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"}
        # at most the writer's pid name, never a file of the queued message
        assert all(r.startswith("pid/") for r in report.removed)
        assert len(report.removed) == (0 if state is CrashState.PID_UNLINKED else 1)
    else:
        assert after == set(), f"leftovers after clean: {after}"
        assert sorted(report.removed) == sorted(before)


@pytest.mark.parametrize("state", [s for s in CrashState if not s.committed])
def test_failure_at_each_step_cleans_at_once(home: Home, state: CrashState) -> None:
    class Boom(Exception):
        pass

    def hook(s: CrashState) -> None:
        if s is state:
            raise Boom

    with pytest.raises(Boom):
        p = QueueWriter(home, hook=hook).begin()
        p.write(BODY)
        p.commit(b"s@example.com", RCPTS)
    assert queue_files(home) == set()


def test_live_writer_is_not_reaped(home: Home) -> None:
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(w2)
            p = QueueWriter(home).begin()
            p.write(BODY)
            os.write(w, b"%d\n" % p.msgnum)
            os.read(r2, 1)  # wait until the parent has run the cleaner
            p.commit(b"s@example.com", RCPTS)
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(w)
    os.close(r2)
    n = int(os.read(r, 100))
    paths = QueuePaths(home.queue)
    report = clean_stale(paths)
    assert report.removed == [] and report.kept_locked == 1
    assert paths.mess(n).exists()
    # qmail's rule still applies to a writer older than 36 hours
    assert clean_stale(paths, now=time.time() - 10).kept_locked == 1
    assert os.listdir(paths.pid) != []  # the live writer's pid name stays
    os.write(w2, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert check_invariant(home, BODY) == [n]
    os.close(r)
    os.close(w2)


def test_ossified_locked_file_is_reaped(home: Home) -> None:
    p = QueueWriter(home).begin()
    p.write(b"x")
    paths = QueuePaths(home.queue)
    report = clean_stale(paths, now=time.time() + 37 * 3600)
    assert f"mess/{p.msgnum % 23}/{p.msgnum}" in report.removed
    p.abort()


def test_stale_pid_file_of_dead_writer(home: Home) -> None:
    paths = QueuePaths(home.queue)
    (paths.pid / "99999.1.1").write_bytes(b"")
    (paths.dir("intd") / "12345").write_bytes(b"u0\0p1\0Fx\0")  # no todo, no mess
    (paths.dir("todo") / "not-a-number").write_bytes(b"")
    report = clean_stale(paths)
    assert sorted(report.removed) == ["intd/12345", "pid/99999.1.1"]
    assert (paths.dir("todo") / "not-a-number").exists()


def test_sigkill_real_qmail_queue(home: Home, tmp_path: Path) -> None:
    """kill -9 a real qmail-queue at random moments while it reads a big message."""
    rnd = random.Random(3)
    env_path = tmp_path / "env"
    env_path.write_bytes(format_input(b"s@example.com", RCPTS))
    msg_path = tmp_path / "msg"
    msg_path.write_bytes(BODY)
    queued = 0
    for i in range(30):
        with open(env_path, "rb") as env:
            if i % 2:  # message on a pipe: killed while reading or right after
                proc = subprocess.Popen([QQ], stdin=subprocess.PIPE, stdout=env)
                assert proc.stdin is not None
                cut = rnd.randrange(len(BODY))
                proc.stdin.write(BODY[:cut])
                proc.stdin.flush()
                if rnd.random() < 0.5:
                    proc.stdin.write(BODY[cut:])
                    proc.stdin.close()
                    time.sleep(rnd.random() * 0.02)
            else:  # message in a file: killed at a random instant
                with open(msg_path, "rb") as msg:
                    proc = subprocess.Popen([QQ], stdin=msg, stdout=env)
                time.sleep(rnd.random() * 0.15)
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            queued += rc == 0
    new = check_invariant(home, BODY)
    assert len(new) >= queued
    clean_stale(QueuePaths(home.queue))
    left = queue_files(home)
    expect = set()
    for n in new:
        expect |= {f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"}
    assert left == expect


def test_foreign_writer_files_wait_for_ossified(home: Home) -> None:
    """A mess file with no pid name, no lock and no todo may be a running foreign
    qmail-queue's (notqmail takes no lock): kept until qmail's 36 hours have passed."""
    paths = QueuePaths(home.queue)
    tmp = paths.pid / "1.1.1"
    tmp.write_bytes(b"Received: (qmail 1 invoked by uid 0); ...\n")
    n = os.stat(tmp).st_ino
    os.link(tmp, paths.mess(n))
    os.unlink(tmp)
    paths.intd(n).write_bytes(b"u0\0p1\0Fa\0")
    report = clean_stale(paths)
    assert report.removed == [] and report.kept_foreign == 1
    report = clean_stale(paths, now=time.time() + 37 * 3600)
    assert sorted(report.removed) == [f"intd/{n}", f"mess/{n % 23}/{n}"]


def test_sigkill_queue_service_mid_message(home: Home, tmp_path: Path) -> None:
    """kill -9 the queue service while a client streams a message: the client gets a
    temporary failure, nothing is visible in todo/, and the restarted service's start-up
    clean removes what the dead one left."""
    import socket as socketmod

    from pyqmail.queue.service import netstring

    sock = tmp_path / "qq.sock"

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([QQ, "--serve", "--socket", str(sock)], stderr=subprocess.PIPE)
        assert p.stderr is not None
        assert b"listening on" in p.stderr.readline()
        return p

    svc = start()
    s = socketmod.socket(socketmod.AF_UNIX)
    s.connect(str(sock))
    # A first chunk, then ~900 KB: more than the socket buffers hold, so sendall returns
    # only once the service reads past the first chunk, i.e. after it made the files.
    s.sendall(netstring(b"Subject: x\n\n"))
    s.sendall(netstring(BODY * 5))
    paths = QueuePaths(home.queue)
    assert os.listdir(paths.pid), "the service has not started the message"
    svc.kill()
    svc.wait()
    try:
        s.sendall(b"0:," + netstring(format_input(b"s", RCPTS)))
        reply = s.recv(100)
    except OSError:
        reply = b""
    s.close()
    assert reply == b""  # no "0 ..." success reply can come from a dead service
    assert os.listdir(paths.dir("todo")) == []
    assert queue_files(home) != set()
    svc = start()  # its start-up clean
    try:
        assert queue_files(home) == set()
    finally:
        svc.terminate()
        svc.wait(10)


def test_clean_stale_races_live_writers(home: Home) -> None:
    """The periodic clean runs while writers write, commit and abort: it never takes a
    file from a live message, and afterwards only the committed messages remain."""
    import threading

    paths = QueuePaths(home.queue)
    w = QueueWriter(home, notify=lambda n: None)
    committed: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def writer(t: int) -> None:
        try:
            for i in range(25):
                p = w.begin()
                p.write(BODY[: 1000 * (i + 1)])
                if (t + i) % 4 == 0:
                    p.abort()
                    continue
                n = p.commit(b"s@example.com", RCPTS)
                with lock:
                    committed.append(n)
        except BaseException as e:
            errors.append(e)

    def cleaner() -> None:
        while not done.is_set():
            clean_stale(paths)

    c = threading.Thread(target=cleaner)
    c.start()
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    c.join()
    assert errors == []
    assert len(committed) == 6 * 25 - sum(
        1 for t in range(6) for i in range(25) if (t + i) % 4 == 0
    )
    clean_stale(paths)
    expect = set()
    for n in committed:
        data = paths.mess(n).read_bytes()
        assert data.split(b"\n", 1)[1] == BODY[: len(data.split(b"\n", 1)[1])]
        assert parse_todo(paths.todo(n).read_bytes()).recipients == tuple(RCPTS)
        expect |= {f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"}
    assert queue_files(home) == expect


@pytest.mark.parametrize("where", ["pid/1.1.1", "mess/0/23"])
def test_clean_never_opens_what_a_symlink_points_at(home: Home, tmp_path: Path, where: str) -> None:
    """A symlink planted in the queue could name a FIFO or a device: opening it (to test
    the writer's lock) is already an action on it, so the clean opens no symlink. Here
    the target is a file this test holds locked: a clean that opened it would count it
    as a live writer's."""
    import fcntl

    target = tmp_path / "target"
    target.write_bytes(b"x")
    link = home.queue / where
    link.symlink_to(target)
    with open(target, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report = clean_stale(QueuePaths(home.queue))
    assert report.kept_locked == 0
    assert target.read_bytes() == b"x"
