"""qmail-queue's job in-process: the crash-safe sequence that puts a message in todo/.

Sequence (queue.md section 3, with the directory fsyncs Linux needs):

1. create ``pid/PID.TIME.SEQ`` (O_EXCL) and take an exclusive flock on it; N = inode;
2. link it to ``mess/S/N`` (the pid name stays until the commit: see recover.py);
3. write qmail-queue's Received line, the caller's ``received`` bytes and the message
   (buffered: ``Pending.write`` is cheap);
4. ``commit``: flush the message, create ``intd/N`` (O_EXCL) and write ``u..p..F..T..``,
   fsync mess, fsync intd, fsync ``mess/S`` (so the message's name survives), link
   ``intd/N`` to ``todo/N`` (the commit point), fsync ``todo/``, unlink the pid name,
   poke the scheduler.

Invariants: nothing appears in todo/ before its message and envelope are on disk; any
failure before the commit point removes everything this message created (stricter than
qmail, which leaves mess/intd for the 36-hour reaper); a crash leaves only files that
recover.clean_stale removes (the flock proves the writer is gone). The steps are the
recover.CrashState values and a test hook is called after each.

Group commit: ``commit`` blocks; callers run it in worker threads. Concurrent commits
overlap their file fsyncs in the kernel, and directory fsyncs are shared: one fsync of
``todo/`` that starts after a link covers every link made before it.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence

from pyqmail import qdate
from pyqmail.durable import fsync_dir, write_all
from pyqmail.home import Home
from pyqmail.queue import codes
from pyqmail.queue.codes import qq_result
from pyqmail.queue.envelope import EnvelopeError, check_address, format_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import CrashState

Hook = Callable[[CrashState], None]

ORIGINS = ("uid", "network", "bounce", "alias")
_BUFSIZE = 65536
_PID_SEQ_TRIES = 1000


class QueueError(Exception):
    """A refused or failed queue insertion; ``code`` is qmail-queue's exit code.

    ``custom`` is a replacement program's fd-6 text (exit 82, notqmail).
    """

    def __init__(self, code: int, message: str = "", custom: str | None = None) -> None:
        super().__init__(message or qq_result(code, custom)[1])
        self.code = code
        self.custom = custom

    def result(self) -> tuple[str, str]:
        """(``"D"`` or ``"Z"``, qmail's text for the caller to report)."""
        return qq_result(self.code, self.custom)

    @property
    def permanent(self) -> bool:
        return self.result()[0] == "D"


def received_line(qp: int, origin: str, uid: int, when: float) -> bytes:
    """qmail-queue's Received line (queue.md section 3), with its LF."""
    if origin == "network":
        how = "invoked from network"
    elif origin == "bounce":
        how = "invoked for bounce"
    elif origin == "alias":
        how = "invoked by alias"
    else:
        how = f"invoked by uid {uid}"
    return f"Received: (qmail {qp} {how}); {qdate.date822(when)}\n".encode()


class _GroupSync:
    """fsync one directory on behalf of many threads: a sync started after a caller's
    request covers it, so N concurrent callers cost about 2 fsyncs, not N."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False
        self._error: tuple[int, OSError] | None = None

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                target = self._requested
                self._cond.release()
                err: OSError | None = None
                try:
                    fsync_dir(self.path)
                except OSError as e:
                    err = e
                finally:
                    self._cond.acquire()
                self._running = False
                if err is not None:
                    self._error = (target, err)
                self._done = max(self._done, target)
                self._cond.notify_all()
            if self._error is not None and self._error[0] >= ticket:
                raise self._error[1]


def _classify_create_error(paths: QueuePaths, e: OSError, code: int) -> int:
    """qmail's code for a failed create: 61 home, 62 queue, else the step's own code."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return codes.WRITE_ERROR
    if not paths.root.parent.is_dir():
        return codes.HOME_TROUBLE
    if not paths.root.is_dir() or not os.access(paths.root, os.X_OK):
        return codes.QUEUE_TROUBLE
    return code


class QueueWriter:
    """Writes messages into one queue. Thread-safe; one instance per process is enough.

    ``notify(msgnum)`` replaces the lock/trigger poke (the daemon's in-process wake-up).
    ``hook`` is for fault-injection tests: called after every step of the sequence.
    ``share_dir_syncs=False`` gives each commit its own directory fsyncs (for the bench).
    """

    def __init__(
        self,
        home: Home,
        *,
        notify: Callable[[int], None] | None = None,
        hook: Hook | None = None,
        clock: Callable[[], float] = time.time,
        paths: QueuePaths | None = None,
        share_dir_syncs: bool = True,
    ) -> None:
        self.home = home
        self.share_dir_syncs = share_dir_syncs
        self.paths = paths or QueuePaths(home.queue)
        self.notify = notify
        self.hook = hook
        self.clock = clock
        self._seq = itertools.count(1)
        # Paths as strings, computed once: pathlib costs more than the syscalls here.
        root = str(self.paths.root)
        self._pid_dir = root + "/pid/"
        self._intd_dir = root + "/intd/"
        self._todo_dir = root + "/todo"
        self._mess_dirs = [str(d) for d in self.paths.split_dirs("mess")]
        self._syncs = {d: _GroupSync(d) for d in [*self._mess_dirs, self._todo_dir]}

    def _dirsync(self, path: str) -> None:
        if self.share_dir_syncs:
            self._syncs[path].sync()
        else:
            fsync_dir(path)

    def _step(self, state: CrashState) -> None:
        if self.hook is not None:
            self.hook(state)

    def begin(
        self,
        *,
        uid: int | None = None,
        origin: str = "uid",
        received: bytes = b"",
        qp: int | None = None,
    ) -> Pending:
        """Create the message file and write the Received line; raises QueueError."""
        if origin not in ORIGINS:
            raise ValueError(f"unknown origin {origin!r}")
        now = self.clock()
        qp = os.getpid() if qp is None else qp
        uid = os.getuid() if uid is None else uid
        paths = self.paths
        fd = -1
        pidpath = ""
        for _ in range(_PID_SEQ_TRIES):
            pidpath = f"{self._pid_dir}{os.getpid()}.{int(now)}.{next(self._seq)}"
            try:
                fd = os.open(pidpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                continue
            except OSError as e:
                code = _classify_create_error(paths, e, codes.PID_TROUBLE)
                raise QueueError(code, f"unable to create {pidpath}: {e.strerror}") from e
        else:
            raise QueueError(codes.PID_TROUBLE, "unable to find a free name in queue/pid")
        p = Pending(self, fd, uid, qp)
        try:
            p._pidpath = pidpath
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # 0644 whatever the process umask (qmail-queue runs with umask 033): the
            # remote agent and qmail-send read queue files through group/other bits.
            os.fchmod(fd, 0o644)
            self._step(CrashState.PID_CREATED)
            n = os.fstat(fd).st_ino
            p.msgnum = n
            mess = f"{self._mess_dirs[n % paths.nsplit]}/{n}"
            try:
                os.link(pidpath, mess)
            except OSError as e:
                code = _classify_create_error(paths, e, codes.MESS_TROUBLE)
                raise QueueError(code, f"unable to link {mess}: {e.strerror}") from e
            p._mess = mess
            self._step(CrashState.MESS_LINKED)
        except OSError as e:
            p.abort()
            raise QueueError(codes.PID_TROUBLE, f"trouble with {pidpath}: {e}") from e
        except BaseException:
            p.abort()
            raise
        p.write(received_line(qp, origin, uid, now))
        p.write(received)
        return p

    def _poke(self, n: int) -> None:
        if self.notify is not None:
            self.notify(n)
            return
        try:
            fd = os.open(self.paths.trigger, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # no scheduler listening: it scans todo/ at start and every 25 min
        try:
            os.write(fd, b"\0")
        except OSError:
            pass
        finally:
            os.close(fd)


class Pending:
    """One message being written: ``write`` its bytes, then ``commit`` or ``abort``."""

    msgnum: int
    qp: int

    def __init__(self, writer: QueueWriter, fd: int, uid: int, qp: int) -> None:
        self._w = writer
        self._fd = fd
        self._uid = uid
        self.qp = qp
        self.msgnum = 0
        self._buf = bytearray()
        self._error: QueueError | None = None
        self._pidpath = ""
        self._mess = ""
        self._intd = ""
        self._done = False
        self._owner = os.getpid()
        self.size = 0

    def _flush(self) -> None:
        if self._buf and self._error is None:
            try:
                write_all(self._fd, bytes(self._buf))
            except OSError as e:
                self._error = QueueError(codes.WRITE_ERROR, f"unable to write message: {e}")
        self._buf.clear()

    def write(self, data: bytes) -> None:
        """Append message bytes (buffered, no fsync). Errors surface at commit."""
        if self._done:
            raise RuntimeError("write after commit or abort")
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= _BUFSIZE:
            self._flush()

    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> int:
        """Make the message durable and visible in todo/; returns N. Blocking."""
        if self._done:
            raise RuntimeError("commit after commit or abort")
        w = self._w
        paths = w.paths
        n = self.msgnum
        try:
            try:
                check_address(sender)
                for r in recipients:
                    check_address(r)
            except EnvelopeError as e:
                raise QueueError(e.code, str(e)) from e
            self._flush()
            if self._error is not None:
                raise self._error
            w._step(CrashState.MESS_WRITTEN)
            envelope = format_todo(self._uid, self.qp, sender, recipients)
            intd = f"{w._intd_dir}{n}"
            ifd = self._create_intd(intd, n)
            self._intd = intd
            try:
                w._step(CrashState.INTD_CREATED)
                try:
                    write_all(ifd, envelope)
                except OSError as e:
                    raise QueueError(codes.WRITE_ERROR, f"unable to write {intd}: {e}") from e
                w._step(CrashState.INTD_WRITTEN)
                # Both files are written before either is synced: on a journalling file
                # system the first fsync commits both creations in one transaction, so
                # the later fsyncs find little left to do. Each is still done.
                try:
                    os.fsync(self._fd)
                except OSError as e:
                    raise QueueError(codes.WRITE_ERROR, f"unable to fsync message: {e}") from e
                w._step(CrashState.MESS_SYNCED)
                try:
                    os.fsync(ifd)
                except OSError as e:
                    raise QueueError(codes.WRITE_ERROR, f"unable to fsync {intd}: {e}") from e
            finally:
                os.close(ifd)
            try:
                w._dirsync(w._mess_dirs[n % paths.nsplit])
            except OSError as e:
                raise QueueError(codes.WRITE_ERROR, f"unable to fsync mess dir: {e}") from e
            w._step(CrashState.INTD_SYNCED)
            todo = f"{w._todo_dir}/{n}"
            try:
                os.link(intd, todo)
            except OSError as e:
                code = _classify_create_error(paths, e, codes.TODO_TROUBLE)
                raise QueueError(code, f"unable to link {todo}: {e.strerror}") from e
        except BaseException:
            self.abort()
            raise
        # The commit point: the message is whole on disk and named in todo/.
        w._step(CrashState.TODO_LINKED)
        try:
            w._dirsync(w._todo_dir)
        except OSError as e:
            self._undo_link(todo)
            raise QueueError(codes.TODO_TROUBLE, f"unable to fsync todo: {e}") from e
        w._step(CrashState.TODO_SYNCED)
        # Only now does the pid name go (qmail drops it right after the mess link): until
        # the commit it tells recovery which process wrote this mess file.
        self._drop_pid()
        self._done = True
        os.close(self._fd)
        self._fd = -1
        w._step(CrashState.PID_UNLINKED)
        w._poke(n)
        return n

    def _drop_pid(self) -> None:
        if self._pidpath:
            try:
                os.unlink(self._pidpath)
            except OSError:
                pass  # a stale pid name: clean_stale removes it
            self._pidpath = ""

    def _create_intd(self, intd: str, n: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for attempt in (1, 2):
            try:
                fd = os.open(intd, flags, 0o644)
                try:
                    os.fchmod(fd, 0o644)
                except OSError:
                    os.close(fd)
                    os.unlink(intd)
                    raise
                return fd
            except FileExistsError as e:
                # A leftover of an older message whose inode number we now hold: its
                # mess is gone (the inode is ours), so it can only be garbage.
                if attempt == 2 or self._w.paths.todo(n).exists():
                    raise QueueError(codes.INTD_TROUBLE, f"{intd} exists") from e
                try:
                    os.unlink(intd)
                except OSError:
                    pass
            except OSError as e:
                code = _classify_create_error(self._w.paths, e, codes.INTD_TROUBLE)
                raise QueueError(code, f"unable to create {intd}: {e.strerror}") from e
        raise QueueError(codes.INTD_TROUBLE, f"unable to create {intd}")

    def _undo_link(self, todo: str) -> None:
        """The todo/ fsync failed after the link: withdraw the message if we still can.

        If qmail-send already took it (info exists) the message stays queued and the
        caller's retry may duplicate it: at least once, never lost.
        """
        self._done = True
        try:
            os.unlink(todo)
        except OSError:
            pass
        if not self._w.paths.info(self.msgnum).exists():
            for path in (self._mess, self._intd):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._drop_pid()
        os.close(self._fd)
        self._fd = -1

    def __del__(self) -> None:
        # A Pending dropped without commit or abort can never be committed: clean up now
        # rather than leave its files to the start-up clean. Only in the process that
        # made it: a forked child finalizes copies of its parent's objects (CPython
        # clears the other threads' frames after fork), and must not touch its files.
        if not getattr(self, "_done", True) and getattr(self, "_owner", None) == os.getpid():
            self.abort()

    def abort(self) -> None:
        """Remove every file this message created. Idempotent; never raises."""
        if self._done:
            return
        self._done = True
        self._buf.clear()
        # The pid name goes last: if we die half way, it still names the dead writer.
        for path in (self._mess, self._intd, self._pidpath):
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1
