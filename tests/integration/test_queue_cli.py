"""qmail-queue, qmail-qstat and qmail-qread as commands (real processes, real files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue.envelope import format_input, parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.records import mark_done, read_channel, write_channel, write_info

BIN = Path(sys.executable).parent


def qq(
    home: Home, tmp_path: Path, message: bytes, envelope: bytes
) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "e").write_bytes(envelope)
    with open(tmp_path / "e", "rb") as env:
        return subprocess.run(
            [str(BIN / "qmail-queue")],
            input=message,
            stdout=env,
            stderr=subprocess.PIPE,
            timeout=30,
        )


def queue_files(home: Home) -> set[str]:
    out = set()
    for dirpath, _, names in os.walk(home.queue):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), home.queue)
            if not rel.startswith("lock"):
                out.add(rel)
    return out


def test_good_message(home: Home, tmp_path: Path) -> None:
    r = qq(home, tmp_path, b"Subject: hi\n\nbody\n", b"Falice@x\0Tbob@y\0Tcarol@z\0\0")
    assert r.returncode == 0 and r.stderr == b""
    (name,) = os.listdir(home.queue / "todo")
    n = int(name)
    paths = QueuePaths(home.queue)
    mess = paths.mess(n).read_bytes()
    assert re.match(
        rb"Received: \(qmail \d+ invoked by uid %d\); \d+ \w{3} \d{4} " % os.getuid(), mess
    )
    assert mess.endswith(b"\nSubject: hi\n\nbody\n")
    t = parse_todo(paths.todo(n).read_bytes())
    assert t.uid == os.getuid() and t.pid is not None and t.pid > 0
    assert (t.sender, t.recipients) == (b"alice@x", (b"bob@y", b"carol@z"))


@pytest.mark.parametrize(
    ("name", "envelope", "code"),
    [
        ("missing F", b"Tbob@x\0\0", 91),
        ("junk first byte", b"X\0\0", 91),
        ("missing terminator", b"Falice@x\0Tbob@x\0", 54),
        ("eof inside address", b"Falice@x\0Tbob", 54),
        ("empty envelope", b"", 54),
        ("NUL first", b"\0Falice@x\0Tbob@x\0\0", 91),
        ("bad record after NUL", b"Falice@x\0Tbob@x\0Qx\0\0", 91),
        ("sender too long", b"F" + b"a" * 1003 + b"\0Tb\0\0", 11),
        ("recipient too long", b"Fa\0T" + b"b" * 1003 + b"\0\0", 11),
    ],
)
def test_bad_envelope(home: Home, tmp_path: Path, name: str, envelope: bytes, code: int) -> None:
    r = qq(home, tmp_path, b"Subject: x\n\n" + b"y" * 200_000, envelope)
    assert r.returncode == code, name
    assert r.stderr.startswith(b"qmail-queue: ")
    assert queue_files(home) == set()


def test_zero_byte_message(home: Home, tmp_path: Path) -> None:
    r = qq(home, tmp_path, b"", b"Fa\0Tb\0\0")
    assert r.returncode == 0
    (name,) = os.listdir(home.queue / "todo")
    mess = QueuePaths(home.queue).mess(int(name)).read_bytes()
    assert mess.count(b"\n") == 1 and mess.startswith(b"Received: ")


def test_ten_thousand_recipients(home: Home, tmp_path: Path) -> None:
    rcpts = [b"user%05d@example.net" % i for i in range(10_000)]
    r = qq(home, tmp_path, b"x\n", format_input(b"a@b", rcpts))
    assert r.returncode == 0
    (name,) = os.listdir(home.queue / "todo")
    assert parse_todo(QueuePaths(home.queue).todo(int(name)).read_bytes()).recipients == tuple(
        rcpts
    )


def test_envelope_pipe_left_open(home: Home) -> None:
    """qmail-queue stops reading fd 1 at the final NUL: a writer that keeps it open works."""
    r, w = os.pipe()
    os.write(w, b"Fa\0Tb\0\0")
    p = subprocess.Popen([str(BIN / "qmail-queue")], stdin=subprocess.PIPE, stdout=r)
    p.communicate(b"msg\n", timeout=30)
    os.close(r)
    os.close(w)
    assert p.returncode == 0


def test_missing_queue_dir(home: Home, tmp_path: Path) -> None:
    os.rename(home.queue, tmp_path / "q-away")
    r = qq(home, tmp_path, b"x\n", b"Fa\0Tb\0\0")
    assert r.returncode == 62
    assert b"queue" in r.stderr
    os.rename(tmp_path / "q-away", home.queue)
    os.rename(home.root, tmp_path / "h-away")
    r = qq(home, tmp_path, b"x\n", b"Fa\0Tb\0\0")
    assert r.returncode == 61


def run(home: Home, prog: str) -> str:
    return subprocess.run(
        [str(BIN / prog)], capture_output=True, check=True, timeout=30
    ).stdout.decode()


def test_qstat(home: Home, tmp_path: Path) -> None:
    assert run(home, "qmail-qstat") == (
        "messages in queue: 0\nmessages in queue but not yet preprocessed: 0\n"
    )
    for _ in range(3):
        assert qq(home, tmp_path, b"x\n", b"Fa\0Tb\0\0").returncode == 0
    paths = QueuePaths(home.queue)
    n = int(os.listdir(paths.dir("todo"))[0])
    os.unlink(paths.todo(n))  # as if qmail-send had preprocessed it
    assert run(home, "qmail-qstat") == (
        "messages in queue: 3\nmessages in queue but not yet preprocessed: 2\n"
    )


def test_qread(home: Home, tmp_path: Path) -> None:
    assert run(home, "qmail-qread") == ""
    assert qq(home, tmp_path, b"Subject: x\n\nhello\n", b"Fs\x01nd@x\0Ta@l\0\0").returncode == 0
    paths = QueuePaths(home.queue)
    n = int(os.listdir(paths.dir("todo"))[0])
    size = paths.mess(n).stat().st_size
    write_info(paths.info(n), b"s\x01nd@x")
    os.utime(paths.info(n), (812090814, 812090814))
    write_channel(paths.local(n), [b"a@l", b"b@l"])
    mark_done(paths.local(n), read_channel(paths.local(n))[1].offset)
    write_channel(paths.remote(n), [b"r@remote"])
    assert run(home, "qmail-qread") == (
        f"26 Sep 1995 04:46:54 GMT  #{n}  {size}  <s_nd@x> \n"
        "\tlocal\ta@l\n  done\tlocal\tb@l\n\tremote\tr@remote\n"
    )
    paths.bounce(n).write_bytes(b"x")
    assert run(home, "qmail-qread").splitlines()[0].endswith("<s_nd@x>  bouncing")
    os.unlink(paths.mess(n))
    assert run(home, "qmail-qread") == f"warning: trouble with #{n}: file does not exist\n"


def test_serve(home: Home, tmp_path: Path) -> None:
    """``qmail-queue --serve`` runs the queue service; SIGTERM removes its socket."""
    from pyqmail.queue.submit import ServiceSubmitter

    sock = tmp_path / "qq.sock"
    svc = subprocess.Popen(
        [str(BIN / "qmail-queue"), "--serve", "--socket", str(sock)], stderr=subprocess.PIPE
    )
    try:
        assert svc.stderr is not None
        assert b"listening on" in svc.stderr.readline()
        p = ServiceSubmitter(home, sock).begin()
        p.write(b"via service\n")
        r = p.commit_blocking(b"a@b", [b"c@d"])
        assert QueuePaths(home.queue).mess(r.msgnum).read_bytes().endswith(b"\nvia service\n")
        assert r.qp == os.getpid()
    finally:
        svc.terminate()
        assert svc.wait(10) == 0
    assert not sock.exists()


def test_unreadable_queue(home: Home, tmp_path: Path) -> None:
    """As notqmail: qread says ``fatal: unable to chdir: ...`` on stdout and exits 111;
    qstat reports the unreadable directories on stderr and counts the rest."""
    os.rename(home.queue, tmp_path / "away")
    r = subprocess.run([str(BIN / "qmail-qread")], capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (111, b"fatal: unable to chdir: file does not exist\n")
    r = subprocess.run([str(BIN / "qmail-qstat")], capture_output=True, timeout=30)
    assert r.returncode == 0
    assert r.stdout == b"messages in queue: 0\nmessages in queue but not yet preprocessed: 0\n"
    assert b"todo" in r.stderr
