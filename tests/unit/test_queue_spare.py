"""Envelope inodes kept for reuse (queue/clean.py _retire_intd, queue/writer.py _take_spare).

The cleaner renames intd/N to spare/N instead of unlinking it; a writer makes its next
envelope from a spare, but only once nothing else names that inode."""

from __future__ import annotations

import os
import stat

import pytest

from pyqmail.home import Home
from pyqmail.queue import clean
from pyqmail.queue.envelope import format_todo, parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import CrashState, clean_stale
from pyqmail.queue.writer import QueueWriter


def _commit(home: Home, sender: bytes, rcpts: list[bytes], body: bytes = b"x\n") -> int:
    p = QueueWriter(home).begin()  # a fresh writer: it lists spare/ at once
    p.write(body)
    return p.commit(sender, rcpts)


def test_retired_inodes_make_the_next_message(home: Home) -> None:
    """A finished message's envelope and message file become the next message's files:
    no new inode, and nothing of the old bytes left in either."""
    paths = QueuePaths(home.queue)
    a = _commit(home, b"a@long.sender.example", [b"r1@x.org", b"r2@x.org"], b"old body\n" * 100)
    inodes = {a, os.stat(paths.intd(a)).st_ino}
    clean.clean_todo(paths, a)  # after preprocessing: the envelope
    clean.clean_mess(paths, a)  # the message is done: the message file
    spare = home.queue / "spare"
    assert stat.S_IMODE(os.stat(spare).st_mode) == 0o700
    assert sorted(e.name for e in os.scandir(spare)) == [f"e{a}", f"m{a}"]
    # nothing of the finished message is left readable in its spares
    assert [os.stat(e.path).st_size for e in os.scandir(spare)] == [0, 0]
    assert not paths.todo(a).exists() and not paths.mess(a).exists()
    b = _commit(home, b"b@y.org", [b"z@x.org"], b"new\n")
    assert {b, os.stat(paths.intd(b)).st_ino} == inodes  # no new inode
    assert os.listdir(spare) == []
    mess = paths.mess(b).read_bytes()
    assert mess.startswith(b"Received: (qmail ") and mess.endswith(b"\nnew\n")
    assert b"old body" not in mess
    data = paths.todo(b).read_bytes()
    t = parse_todo(data)
    assert (t.sender, t.recipients) == (b"b@y.org", (b"z@x.org",))
    assert len(data) == len(format_todo(os.getuid(), t.pid or 0, b"b@y.org", [b"z@x.org"]))
    for f in (paths.intd(b), paths.mess(b)):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
    assert os.listdir(paths.pid) == []


def test_spare_still_named_by_todo_is_left_alone(home: Home) -> None:
    """Between the cleaner's two steps the spare is also the old todo/N: a writer that
    takes it then must give it back untouched."""
    paths = QueuePaths(home.queue)
    a = _commit(home, b"a@x.org", [b"r@x.org"])
    before = paths.todo(a).read_bytes()
    os.makedirs(home.queue / "spare", 0o700, exist_ok=True)
    os.rename(paths.intd(a), home.queue / "spare" / f"e{a}")  # the cleaner's first step only
    b = _commit(home, b"b@y.org", [b"z@x.org"])
    assert paths.todo(a).read_bytes() == before  # the old envelope is intact
    assert os.stat(paths.todo(b)).st_ino != os.stat(paths.todo(a)).st_ino
    t = parse_todo(paths.todo(b).read_bytes())
    assert (t.sender, t.recipients) == (b"b@y.org", (b"z@x.org",))
    assert not paths.intd(a).exists() and paths.intd(b).exists()


def test_spares_are_bounded(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clean, "SPARE_MAX", 2)
    monkeypatch.setattr(clean, "_spare_count", {})
    paths = QueuePaths(home.queue)
    nums = [_commit(home, b"", [b"r@x.org"]) for _ in range(3)]
    for n in nums:
        clean.clean_todo(paths, n)
    assert len(os.listdir(home.queue / "spare")) == 2
    assert not any(paths.intd(n).exists() or paths.todo(n).exists() for n in nums)


def test_a_directory_in_intd_is_not_retired(home: Home) -> None:
    paths = QueuePaths(home.queue)
    os.mkdir(paths.intd(103))
    with pytest.raises(OSError):
        clean.clean_mess(paths, 103)  # qmail-clean's "!": unlink fails on a directory
    assert paths.intd(103).is_dir()


@pytest.mark.parametrize(
    "state", [CrashState.INTD_CREATED, CrashState.INTD_WRITTEN, CrashState.INTD_SYNCED]
)
def test_crash_after_taking_a_spare_leaves_nothing_queued(home: Home, state: CrashState) -> None:
    paths = QueuePaths(home.queue)
    a = _commit(home, b"a@x.org", [b"r@x.org"])
    clean.clean_todo(paths, a)
    clean.clean_mess(paths, a)  # message a is gone; its envelope inode is a spare
    pid = os.fork()
    if pid == 0:
        try:

            def hook(s: CrashState) -> None:
                if s is state:
                    os._exit(7)

            p = QueueWriter(home, hook=hook).begin()
            p.write(b"y\n")
            p.commit(b"b@y.org", [b"z@x.org"])
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert os.listdir(paths.dir("todo")) == []
    assert os.listdir(home.queue / "spare") == []  # the dead writer had taken it
    clean_stale(paths)
    left = {
        os.path.relpath(os.path.join(d, f), home.queue)
        for sub in ("pid", "mess", "intd", "todo")
        for d, _, fs in os.walk(home.queue / sub)
        for f in fs
    }
    assert left == set()
