"""The queue's crash states and the clean-up of what a crashed writer left.

The writer (writer.py) moves a new message through the states below, in this order,
and calls its test hook after each one. A crash in any state before TODO_LINKED leaves
nothing qmail-send looks at (it only reads todo/ and info/); from TODO_LINKED on, the
message and its envelope are whole (both were fsynced before the link).

What each state leaves behind, and who removes it:

- PID_CREATED: ``pid/PID.TIME.SEQ`` only.
- MESS_LINKED, MESS_WRITTEN: the pid file and ``mess/S/N`` (one inode, two names).
- INTD_CREATED .. INTD_SYNCED: those and ``intd/N`` (durable only at INTD_SYNCED).
- TODO_LINKED, TODO_SYNCED: a queued message, plus its pid name (removed by clean_stale).
- PID_UNLINKED: a queued message. Nothing to clean.

How clean_stale knows a writer is gone: a pyqmail writer holds an exclusive flock on the
message inode from its creation to the end, and keeps the pid name (which carries its
PID) as a second link of the mess file until the commit. So:

- a pid file whose lock is free, whose PID is dead (or that is a minute old: a writer
  locks it right after creating it) belonged to a dead writer: it goes, and with it the
  mess file and intd/N, unless todo/N or info/S/N shows the message was queued;
- a mess file with no todo/N, no info/S/N, no lock and no second link was not written by
  a live pyqmail writer, but may be a foreign qmail-queue's (which takes no lock and drops
  the pid name early): qmail's rule applies, removed once its atime is OSSIFIED (36 h)
  old, which exceeds the writer's DEATH alarm (24 h), so a slow writer is never reaped;
- intd/N with neither todo/N nor mess/S/N is garbage.

A locked file older than OSSIFIED goes too, as in qmail. Safe to run while writers and
the scheduler run: it only removes what no live writer and no queued message owns.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.queue.layout import QueuePaths, msgnum

DEATH = 86400  # qmail-queue's alarm: a writer gives up after 24 h
OSSIFIED = 129600  # qmail-clean / qmail-send reap unclaimed files after 36 h


class CrashState(enum.Enum):
    """The writer's steps; the hook is called with each once it is done."""

    PID_CREATED = "pid created"
    MESS_LINKED = "mess linked"
    MESS_WRITTEN = "mess written"
    INTD_CREATED = "intd created"
    INTD_WRITTEN = "intd written"
    MESS_SYNCED = "mess synced"
    INTD_SYNCED = "intd and mess dir synced"
    TODO_LINKED = "todo linked"
    TODO_SYNCED = "todo synced"
    PID_UNLINKED = "pid unlinked"

    @property
    def committed(self) -> bool:
        """True once the message is the queue's responsibility."""
        return self in (CrashState.TODO_LINKED, CrashState.TODO_SYNCED, CrashState.PID_UNLINKED)


@dataclass
class CleanReport:
    """What clean_stale removed (paths relative to queue/)."""

    removed: list[str] = field(default_factory=list)
    kept_locked: int = 0  # files of live writers
    kept_foreign: int = 0  # unclaimed mess files younger than OSSIFIED
    errors: list[str] = field(default_factory=list)


def _unlink(paths: QueuePaths, rel: str, report: CleanReport) -> None:
    try:
        os.unlink(paths.root / rel)
        report.removed.append(rel)
    except FileNotFoundError:
        pass
    except OSError as e:
        report.errors.append(f"unable to unlink {rel}: {e.strerror}")


def _writer_gone(path: str) -> bool | None:
    """True if no process holds the writer's flock on ``path``; None if it is missing
    or is not a writer's file (a symlink is never opened: no writer makes one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    finally:
        os.close(fd)
    return True


_PID_GRACE = 60.0


def _pid_dead(name: str) -> bool:
    """True if the process named by a pid/ file (``PID.TIME.SEQ``) does not exist."""
    try:
        pid = int(name.split(".", 1)[0])
    except ValueError:
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _old(path: str, now: float, age: float) -> bool:
    """True if ``path`` was last used (atime or mtime, the later) over ``age`` s ago."""
    try:
        st = os.stat(path)
        return now - max(st.st_atime, st.st_mtime) > age
    except FileNotFoundError:
        return False


InfoCheck = Callable[[Path], bool]


def _info_exists(path: Path) -> bool:
    """Whether info/S/N exists; True (keep the message) when this user may not look,
    as the queue's owner may not in info/, which is qmail-send's."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)  # as Path.exists()


def _exists(path: str) -> bool:
    """``Path(path).exists()`` without making a Path: it runs once per queued message at
    every start (a full queue of 100,000 spent a third of a second building them)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno in _NOT_THERE:
            return False
        raise
    return True


def _queued(paths: QueuePaths, n: int, info_exists: InfoCheck) -> bool:
    return _exists(paths.name("todo", n)) or info_exists(paths.info(n))


def clean_stale(
    paths: QueuePaths,
    *,
    now: float | None = None,
    ossified: float = OSSIFIED,
    info_exists: InfoCheck = _info_exists,
) -> CleanReport:
    """Remove what crashed writers left: pid files, unclaimed mess, intd without todo.

    Safe to run while writers and qmail-send are running (see the module docstring).
    Run it as the queue's owner, never as root: the directories are that user's, and a
    symlink planted in place of one would point root's unlinks elsewhere. The queue's
    owner may not read info/; ``info_exists`` answers for it (as qmail-send's user),
    else every message whose todo/N is gone counts as queued.
    """
    now = time.time() if now is None else now
    report = CleanReport()
    # pid files: the inode is the message's; remove the mess link with it if unclaimed.
    try:
        pids = os.listdir(paths.pid)
    except OSError as e:
        report.errors.append(f"unable to read pid: {e.strerror}")
        pids = []
    for name in pids:
        p = os.path.join(paths.pid, name)
        gone = _writer_gone(p)
        if gone is None:
            continue
        # A writer creates its pid file and then locks it: in between, only a dead
        # process named in the file (PID.TIME.SEQ) or some age proves it is gone.
        if gone and not _pid_dead(name) and not _old(p, now, _PID_GRACE):
            gone = False
        if not gone and not _old(p, now, ossified):
            report.kept_locked += 1
            continue
        try:
            ino = os.stat(p).st_ino
        except FileNotFoundError:
            continue
        _unlink(paths, f"pid/{name}", report)
        m = paths.mess(ino)
        try:
            same = os.stat(m).st_ino == ino
        except FileNotFoundError:
            same = False
        if same and not _queued(paths, ino, info_exists):
            _unlink(paths, f"intd/{ino}", report)
            _unlink(paths, f"mess/{paths.split(ino)}/{ino}", report)
    # mess without todo/info and without a pid name: not a pyqmail writer's (see above).
    for d in paths.split_dirs("mess"):
        try:
            names = os.listdir(d)
        except OSError as e:
            report.errors.append(f"unable to read {d.name}: {e.strerror}")
            continue
        for name in names:
            n = msgnum(name)
            if n is None or _queued(paths, n, info_exists):
                continue
            mp = str(d / name)
            gone = _writer_gone(mp)
            if gone is None:
                continue
            try:
                nlink = os.stat(mp).st_nlink
            except FileNotFoundError:
                continue
            if not _old(mp, now, ossified):
                if nlink == 1:  # (nlink > 1: its pid name was dealt with above)
                    if gone:
                        report.kept_foreign += 1
                    else:
                        report.kept_locked += 1
                continue
            if _queued(paths, n, info_exists):  # committed while we looked
                continue
            _unlink(paths, f"intd/{n}", report)
            _unlink(paths, f"mess/{d.name}/{n}", report)
    # intd without todo whose mess is gone (the writer died after removing its mess).
    try:
        intds = os.listdir(paths.dir("intd"))
    except OSError as e:
        report.errors.append(f"unable to read intd: {e.strerror}")
        intds = []
    for name in intds:
        n = msgnum(name)
        if n is None or paths.todo(n).exists() or paths.mess(n).exists():
            continue
        _unlink(paths, f"intd/{name}", report)
    return report
