"""notqmail's queue and ours: pyqmail reads what the real qmail-queue wrote, refuses the same
envelopes with the same exit codes, and the real qmail-qread/qmail-qstat read a queue pyqmail
wrote. Needs the reference built in /var/qmail-ref, idle (``make compat``); moved here from
tests/integration so that ``make test`` does not depend on the reference qmail."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue import clean
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.records import mark_done, read_channel, write_channel, write_info
from pyqmail.queue.writer import QueueWriter

REF = Path("/var/qmail-ref")
BIN = Path(sys.executable).parent


def _ref_available() -> bool:
    if not (REF / "bin" / "qmail-queue").exists() or os.geteuid() != 0:
        return False
    try:
        fd = os.open(REF / "queue" / "lock" / "sendmutex", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # qmail-send holds it exclusively
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


needs_ref = pytest.mark.skipif(not _ref_available(), reason="no idle /var/qmail-ref (notqmail)")


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and "lock" not in p.parts}


@pytest.fixture
def ref_queue() -> Iterator[Path]:
    """The reference queue; every file a test adds is removed afterwards."""
    root = REF / "queue"
    before = _files(root)
    yield root
    for p in _files(root) - before:
        p.unlink(missing_ok=True)


def _ref_qq(message: bytes, envelope: bytes, tmp: Path) -> int:
    (tmp / "env").write_bytes(envelope)
    with open(tmp / "env", "rb") as env:
        return subprocess.run(
            [str(REF / "bin" / "qmail-queue")], input=message, stdout=env, timeout=30
        ).returncode


@needs_ref
def test_read_queue_written_by_notqmail(ref_queue: Path, tmp_path: Path) -> None:
    before = set(os.listdir(ref_queue / "todo"))
    body = b"Subject: from notqmail\n\n" + b"z" * 70000 + b"\n"
    assert _ref_qq(body, b"Fref@example.com\0Ta@example.org\0Tb@example.org\0\0", tmp_path) == 0
    (name,) = set(os.listdir(ref_queue / "todo")) - before
    paths = QueuePaths(ref_queue)
    n = int(name)
    t = parse_todo(paths.todo(n).read_bytes())
    assert (t.uid, t.sender, t.recipients) == (
        0,
        b"ref@example.com",
        (b"a@example.org", b"b@example.org"),
    )
    mess = paths.mess(n).read_bytes()
    assert os.stat(paths.mess(n)).st_ino == n
    first, rest = mess.split(b"\n", 1)
    assert re.fullmatch(
        rb"Received: \(qmail %d invoked by uid 0\); \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d -0000"
        % t.pid,
        first,
    )
    assert rest == body


@needs_ref
@pytest.mark.parametrize(
    "envelope",
    [
        b"Tbob@x\0\0",
        b"X\0\0",
        b"Falice@x\0Tbob@x",
        b"Falice@x\0Tbob@x\0",
        b"",
        b"\0",
        b"Fa\0Qx\0\0",
        b"F" + b"a" * 1002 + b"\0Tb\0\0",
        b"F" + b"a" * 1003 + b"\0Tb\0\0",
        b"Fa\0T" + b"b" * 1003,
        b"F\0\0",
    ],
)
def test_same_exit_codes_as_notqmail(
    ref_queue: Path, home: Home, tmp_path: Path, envelope: bytes
) -> None:
    ref = _ref_qq(b"x\n", envelope, tmp_path)
    (tmp_path / "env").write_bytes(envelope)
    with open(tmp_path / "env", "rb") as env:
        ours = subprocess.run(
            [str(BIN / "qmail-queue")],
            input=b"x\n",
            stdout=env,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
    assert ours.returncode == ref


@needs_ref
def test_notqmail_reads_queue_written_by_us(ref_queue: Path) -> None:
    """The other way round: our writer and record helpers lay a message into the
    reference queue; notqmail's qmail-qread and qmail-qstat print what ours print."""
    home = Home(REF, single_user=True)
    p = QueueWriter(home, notify=lambda n: None).begin(uid=0)
    p.write(b"Subject: written by pyqmail\n\nbody\n")
    n = p.commit(b"s\x01@x.example", [b"a@l.example", b"b@l.example", b"r@remote.example"])
    paths = QueuePaths(ref_queue)
    write_info(paths.info(n), b"s\x01@x.example")
    write_channel(paths.local(n), [b"a@l.example", b"b@l.example"])
    mark_done(paths.local(n), read_channel(paths.local(n))[1].offset)
    write_channel(paths.remote(n), [b"r@remote.example"])
    clean.clean_todo(paths, n)
    for ref_prog, ours in (("qmail-qread", "qmail-qread"), ("qmail-qstat", "qmail-qstat")):
        ref = subprocess.run([str(REF / "bin" / ref_prog)], capture_output=True, timeout=30)
        mine = subprocess.run(
            [str(BIN / ours), "--home", str(REF)], capture_output=True, timeout=30
        )
        assert (mine.returncode, mine.stdout) == (ref.returncode, ref.stdout)
    assert f"#{n}  ".encode() in ref.stdout or ref_prog == "qmail-qstat"
