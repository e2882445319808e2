"""queue/clean.py removes a finished message's files by unlinking them.

A delivery program gets the message file as fd 0 and may keep it open after it exits; the
inode it holds must never carry another message. So the cleaner unlinks intd/N, todo/N and
mess/S/N (nothing is kept for reuse), and while any descriptor holds the old inode the file
system cannot hand its number to a new file."""

from __future__ import annotations

import os

import pytest

from pyqmail.home import Home
from pyqmail.queue import clean
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import QueueWriter


def _commit(home: Home, sender: bytes, rcpts: list[bytes], body: bytes = b"x\n") -> int:
    p = QueueWriter(home).begin()
    p.write(body)
    return p.commit(sender, rcpts)


def _queue_files(home: Home) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), home.queue)
        for d, _, fs in os.walk(home.queue)
        for f in fs
        if d != str(home.queue / "lock")
    }


def test_a_finished_messages_files_are_unlinked_not_kept(home: Home) -> None:
    """A message held open by its delivery (fd 0) and its envelope: after cleaning, both
    inodes have no name left, keep the old bytes for whoever holds them, and the next
    messages get other inodes."""
    paths = QueuePaths(home.queue)
    before, dirs = _queue_files(home), set(os.listdir(home.queue))
    a = _commit(home, b"a@x.org", [b"alice@x.org"], b"alice's body\n")
    mess_fd = os.open(paths.mess(a), os.O_RDONLY)  # what a |program gets as fd 0
    intd_fd = os.open(paths.intd(a), os.O_RDONLY)
    try:
        old_mess, old_intd = os.pread(mess_fd, 1 << 16, 0), os.pread(intd_fd, 1 << 16, 0)
        held = {os.fstat(mess_fd).st_ino, os.fstat(intd_fd).st_ino}
        clean.clean_todo(paths, a)  # after preprocessing: the envelope
        clean.finish_message(paths, a)  # the message is done
        assert _queue_files(home) == before  # nothing of message a keeps a name
        assert set(os.listdir(home.queue)) == dirs  # no directory of kept inodes
        assert [os.fstat(fd).st_nlink for fd in (mess_fd, intd_fd)] == [0, 0]
        for i in range(20):
            b = _commit(home, b"b@y.org", [b"bob@y.org"], b"bob's secret %d\n" % i)
            assert b != a and os.stat(paths.intd(b)).st_ino not in held
            clean.clean_todo(paths, b)
            clean.finish_message(paths, b)
        # the holder still reads message a, and only message a
        assert os.pread(mess_fd, 1 << 16, 0) == old_mess
        assert os.pread(intd_fd, 1 << 16, 0) == old_intd
        assert old_mess.endswith(b"alice's body\n") and b"alice@x.org" in old_intd
    finally:
        os.close(mess_fd)
        os.close(intd_fd)
    assert _queue_files(home) == before
    assert set(os.listdir(home.queue)) == dirs


def test_a_directory_in_intd_is_refused(home: Home) -> None:
    paths = QueuePaths(home.queue)
    os.mkdir(paths.intd(103))
    with pytest.raises(OSError):
        clean.clean_mess(paths, 103)  # qmail-clean's "!": unlink fails on a directory
    assert paths.intd(103).is_dir()
