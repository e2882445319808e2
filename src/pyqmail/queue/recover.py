"""The queue's crash states and the start-up clean of what a crashed writer left.

The writer (writer.py) moves a new message through the states below, in this order,
and calls its test hook after each one. A crash in any state before TODO_LINKED leaves
nothing qmail-send looks at (it only reads todo/ and info/); from TODO_LINKED on, the
message and its envelope are whole (both were fsynced before the link).

What each state leaves behind, and who removes it:

- PID_CREATED: ``pid/PID.TIME.SEQ`` only.
- MESS_LINKED: the pid file and ``mess/S/N`` (the same inode).
- PID_UNLINKED, MESS_WRITTEN: ``mess/S/N`` (possibly partial).
- INTD_CREATED .. INTD_SYNCED: ``mess/S/N`` and ``intd/N`` (durable only at INTD_SYNCED).
- TODO_LINKED, TODO_SYNCED: a queued message. Nothing to clean.

``clean_stale`` removes leftovers. pyqmail writers hold an exclusive flock on the
message inode (pid file = mess file) from its creation until the todo link is made,
so "the lock is free and there is no todo/N or info/S/N" proves the writer is gone:
such files are removed at once. Files without that proof (a writer that is still
running, or a foreign qmail-queue that takes no lock) fall under qmail's rule instead:
removed only when their atime is older than OSSIFIED (36 h), which exceeds the writer's
DEATH alarm (24 h), so a slow writer is never reaped.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import time
from dataclasses import dataclass, field

from pyqmail.queue.layout import QueuePaths, msgnum

DEATH = 86400  # qmail-queue's alarm: a writer gives up after 24 h
OSSIFIED = 129600  # qmail-clean / qmail-send reap unclaimed files after 36 h


class CrashState(enum.Enum):
    """The writer's steps; the hook is called with each once it is done."""

    PID_CREATED = "pid created"
    MESS_LINKED = "mess linked"
    PID_UNLINKED = "pid unlinked"
    MESS_WRITTEN = "mess written"
    INTD_CREATED = "intd created"
    INTD_WRITTEN = "intd written"
    MESS_SYNCED = "mess synced"
    INTD_SYNCED = "intd and mess dir synced"
    TODO_LINKED = "todo linked"
    TODO_SYNCED = "todo synced"

    @property
    def committed(self) -> bool:
        """True once the message is the queue's responsibility."""
        return self in (CrashState.TODO_LINKED, CrashState.TODO_SYNCED)


@dataclass
class CleanReport:
    """What clean_stale removed (paths relative to queue/)."""

    removed: list[str] = field(default_factory=list)
    kept_locked: int = 0
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
    """True if no process holds the writer's flock on ``path``; None if it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
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


def _queued(paths: QueuePaths, n: int) -> bool:
    return paths.todo(n).exists() or paths.info(n).exists()


def clean_stale(
    paths: QueuePaths, *, now: float | None = None, ossified: float = OSSIFIED
) -> CleanReport:
    """Remove what crashed writers left: pid files, unclaimed mess, intd without todo.

    Safe to run while writers and qmail-send are running (see the module docstring).
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
        if same and not _queued(paths, ino):
            _unlink(paths, f"intd/{ino}", report)
            _unlink(paths, f"mess/{paths.split(ino)}/{ino}", report)
    # mess without todo/info: a writer that died after unlinking its pid file.
    for d in paths.split_dirs("mess"):
        try:
            names = os.listdir(d)
        except OSError as e:
            report.errors.append(f"unable to read {d.name}: {e.strerror}")
            continue
        for name in names:
            n = msgnum(name)
            if n is None or _queued(paths, n):
                continue
            mp = str(d / name)
            gone = _writer_gone(mp)
            if gone is None:
                continue
            if not gone and not _old(mp, now, ossified):
                report.kept_locked += 1
                continue
            if _queued(paths, n):  # committed while we looked
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
