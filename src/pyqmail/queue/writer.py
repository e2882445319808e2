"""qmail-queue's job in-process: the crash-safe sequence that puts a message in todo/.

Sequence (queue.md section 3, with the directory fsyncs Linux needs):

1. create ``pid/PID.TIME.SEQ`` (O_EXCL) and take an exclusive flock on it; N = inode;
2. link it to ``mess/S/N`` (the pid name stays until the commit: see recover.py);
3. write qmail-queue's Received line, the caller's ``received`` bytes and the message
   (buffered: ``Pending.write`` is cheap). One departure from qmail's order: for mail
   from the network whose first header is the door's Received line recording TLS or
   AUTH (``with ESMTPS``/``ESMTPA``/``ESMTPSA``, RFC 3848), that line goes first and
   qmail-queue's own line right below it, so the top trace line says how the message
   was protected. A plain session keeps qmail's order byte for byte. Only the network
   doors' own line can match: they write it, and the client-supplied parts of it (HELO,
   host name) have their spaces replaced, so no client can spell `` with ESMTPS``;
   local injection (``origin`` other than network) is never reordered;
4. ``commit``: flush the message, create ``intd/N`` (O_EXCL) and write ``u..p..F..T..``,
   start both files' write-back; fsync mess, intd and ``mess/S`` (so the message's name
   survives): each is independent of the others, so they run at once; only when all
   three are done, link ``intd/N`` to ``todo/N`` (the commit point), fsync ``todo/``,
   unlink the pid name, poke the scheduler.

One commit where the file system orders its journal (``durable.ordered_journal``: ext4
with a journal, data=ordered, the default; durable.py has the argument): step 4's fsyncs of
mess, intd and ``mess/S`` become ``durable.write_out`` of mess and intd (their data on
the device, their metadata in the running journal transaction), and the fsync of
``todo/`` after the link commits all of it at once: one journal commit per batch where
two were needed one after the other. The order of the steps, the crash states and every
invariant below are the same; ``PYQMAIL_ORDERED_JOURNAL=no`` keeps the fsyncs.

Invariants: nothing appears in todo/ before its message and envelope are on disk; any
failure before the commit point removes everything this message created (stricter than
qmail, which leaves mess/intd for the 36-hour reaper); a crash leaves only files that
recover.clean_stale removes (the flock proves the writer is gone). The steps are the
recover.CrashState values and a test hook is called after each.

Group commit: ``commit`` blocks. ``commit_many`` commits a batch in one thread, step by
step for all its messages (each still passes every step in the order above): the batch's
files and ``mess/S`` directories are fsynced together by a few threads (a disk flushes
concurrent fsyncs together), each ``mess/S`` and ``todo/`` once per batch; the SMTP
listener's committer (queue/committer.py) uses it. Concurrent commits in several threads
still share directory fsyncs: one fsync of ``todo/`` that starts after a link covers
every link made before it. The directories are opened once; links into ``mess/S`` and
``todo/`` are made through the same descriptor that is fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from pyqmail import qdate
from pyqmail.durable import fsync_all, ordered_journal, start_write_out, write_all, write_out
from pyqmail.home import Home
from pyqmail.queue import codes
from pyqmail.queue.contract import QueueError as QueueError  # its home before the contract
from pyqmail.queue.envelope import EnvelopeError, check_address, format_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import CrashState

Hook = Callable[[CrashState], None]

ORIGINS = ("uid", "network", "bounce", "alias")
_BUFSIZE = 65536
# The door's line recording TLS or AUTH (RFC 3848): what moves above qmail-queue's line.
_PROTECTED = re.compile(rb" with (?:ESMTP|UTF8SMTP)(?:SA|S|A)[ ;]")
_HOLD_MAX = 8192  # a first header longer than this is not the door's: qmail's order
_PID_SEQ_TRIES = 1000


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

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
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
                    os.fsync(self.fd)
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
    ``one_commit``: commit a batch with one journal commit (module docstring); None (the
    default) when the queue is on a file system that orders its journal and
    ``PYQMAIL_ORDERED_JOURNAL`` is not ``no``, decided at the first commit.
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
        one_commit: bool | None = None,
    ) -> None:
        self.home = home
        self.share_dir_syncs = share_dir_syncs
        self._one_commit = one_commit
        self.paths = paths or QueuePaths(home.queue)
        self.notify = notify
        self.hook = hook
        self.clock = clock
        self._seq = itertools.count(1)
        self._owner_pid = os.getpid()
        # Paths as strings, computed once: pathlib costs more than the syscalls here.
        root = str(self.paths.root)
        self._pid_dir = root + "/pid/"
        self._intd_dir = root + "/intd/"
        self._todo_dir = root + "/todo"
        self._mess_dirs = [str(d) for d in self.paths.split_dirs("mess")]
        # The directories whose entries a commit makes durable (mess/S, todo/), each
        # opened once, lazily: the link into one is made through its descriptor
        # (os.link dst_dir_fd) and the fsync goes to the same descriptor, so the entry
        # synced is the one made, with no open/close or path lookup per message.
        self._dir_lock = threading.Lock()
        self._syncs: dict[str, _GroupSync] = {}

    def _dir(self, path: str) -> _GroupSync:
        """The (lazily opened) descriptor and group sync of one queue directory."""
        g = self._syncs.get(path)
        if g is None:
            with self._dir_lock:
                g = self._syncs.get(path)
                if g is None:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    g = self._syncs[path] = _GroupSync(path, fd)
        return g

    @property
    def one_commit(self) -> bool:
        """Whether a batch takes one journal commit (decided once, at the first use)."""
        if self._one_commit is None:
            self._one_commit = self._detect_one_commit()
        return self._one_commit

    def _detect_one_commit(self) -> bool:
        # Every directory a commit writes must be on that one file system.
        dirs = [self._pid_dir, self._intd_dir, self._todo_dir, *self._mess_dirs]
        try:
            devs = {os.stat(d).st_dev for d in dirs}
        except OSError:
            return False
        return len(devs) == 1 and ordered_journal(self._todo_dir)

    def _dirsync(self, g: _GroupSync) -> None:
        if self.share_dir_syncs:
            g.sync()
        else:
            os.fsync(g.fd)

    def close(self) -> None:
        """Close the directory descriptors (reopened if the writer is used again)."""
        with self._dir_lock:
            syncs, self._syncs = self._syncs, {}
        for g in syncs.values():
            try:
                os.close(g.fd)
            except OSError:
                pass

    def __del__(self) -> None:
        if getattr(self, "_owner_pid", None) == os.getpid():
            self.close()

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
            # Blocking: the name is new (O_EXCL) and the only other lock it can meet is
            # clean_stale's probe (a shared lock taken and dropped at once), which with
            # LOCK_NB turned a message away with a temporary error now and then.
            fcntl.flock(fd, fcntl.LOCK_EX)
            # 0644 whatever the process umask (qmail-queue runs with umask 033): the
            # remote agent and qmail-send read queue files through group/other bits.
            os.fchmod(fd, 0o644)
            self._step(CrashState.PID_CREATED)
            n = os.fstat(fd).st_ino
            p.msgnum = n
            mdir = self._mess_dirs[n % paths.nsplit]
            mess = f"{mdir}/{n}"
            try:
                os.link(pidpath, str(n), dst_dir_fd=self._dir(mdir).fd)
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
        line = received_line(qp, origin, uid, now)
        if origin == "network":
            p._held = line  # placed once the first header is seen (module docstring)
        else:
            p.write(line)
        p.write(received)
        return p

    def _poke(self, n: int) -> None:
        if self.notify is not None:
            self.notify(n)
        else:
            poke_trigger(self.paths.trigger)


def poke_trigger(trigger: os.PathLike[str] | str) -> None:
    """Wake qmail-send: one byte into lock/trigger if somebody has it open."""
    try:
        fd = os.open(trigger, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
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
        self._ifd = -1
        self._done = False
        self._owner = os.getpid()
        self.size = 0
        self._held: bytes | None = None  # qmail-queue's line, until the first header ends

    def _place_held(self, final: bool) -> None:
        """Put qmail-queue's held line above the message, or below a first header that
        records TLS or AUTH, once that header is complete (or can no longer be)."""
        held = self._held
        assert held is not None
        buf = self._buf
        end = 0
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0 or nl + 1 >= len(buf):
                break
            if buf[nl + 1] not in b" \t":
                end = nl + 1
                break
            start = nl + 1
        if not end:
            if not final and len(buf) < _HOLD_MAX:
                return  # the first header may go on in the next write
            end = len(buf) if final else 0
        self._held = None
        first = bytes(buf[:end])
        protected = first[:9].lower() == b"received:" and _PROTECTED.search(first)
        at = end if protected else 0
        buf[at:at] = held
        self.size += len(held)

    def _flush(self) -> None:
        if self._held is not None:
            self._place_held(final=True)
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
        if self._held is not None:
            self._place_held(final=False)
        if len(self._buf) >= _BUFSIZE:
            self._flush()

    def commit(self, sender: bytes, recipients: Iterable[bytes]) -> int:
        """Make the message durable and visible in todo/; returns N. Blocking.

        ``recipients`` may be an iterator that reads them as they come (the queue
        service's): intd/N is then written while it runs, as qmail-queue writes it while
        reading fd 1, and what it raises aborts the message and propagates."""
        result = commit_many([(self, sender, recipients)])[0]
        if isinstance(result, QueueError):
            raise result
        return result

    def _prepare(self, sender: bytes, recipients: Iterable[bytes]) -> None:
        """Flush the message, create and write intd/N (kept open in ``_ifd``).

        A list of recipients is checked whole before anything is created; an iterator's
        are checked and written as it yields them, so only a buffer is ever held."""
        if self._done:
            raise RuntimeError("commit after commit or abort")
        w = self._w
        n = self.msgnum
        try:
            check_address(sender)
            if isinstance(recipients, Sequence):
                for r in recipients:
                    check_address(r)
        except EnvelopeError as e:
            raise QueueError(e.code, str(e)) from e
        self._flush()
        if self._error is not None:
            raise self._error
        w._step(CrashState.MESS_WRITTEN)
        intd = f"{w._intd_dir}{n}"
        self._ifd = self._create_intd(intd, n)
        self._intd = intd
        w._step(CrashState.INTD_CREATED)
        envelope = bytearray(format_todo(self._uid, self.qp, sender, ()))
        for r in recipients:  # what the iterator raises (its reading) propagates as is
            try:
                check_address(r)
            except EnvelopeError as e:
                raise QueueError(e.code, str(e)) from e
            envelope += b"T" + r + b"\0"
            if len(envelope) >= _BUFSIZE:
                self._write_intd(envelope)
        self._write_intd(envelope)
        w._step(CrashState.INTD_WRITTEN)

    def _write_intd(self, data: bytearray) -> None:
        try:
            write_all(self._ifd, bytes(data))
        except OSError as e:
            raise QueueError(codes.WRITE_ERROR, f"unable to write {self._intd}: {e}") from e
        data.clear()

    def _start_writeback(self, mess: bool) -> None:
        """Start writing the envelope's data now, and the message's if ``mess``.

        No wait and no promise (``durable.start_write_out``: the pages stay cached for
        the delivery that reads them next); the fsyncs or write-outs that follow decide.
        """
        for fd in (self._fd, self._ifd) if mess else (self._ifd,):
            try:
                start_write_out(fd)
            except OSError:
                pass

    def _close_intd(self) -> None:
        ifd, self._ifd = self._ifd, -1
        if ifd >= 0:
            os.close(ifd)

    def _link_todo(self, tdir: _GroupSync) -> None:
        n = self.msgnum
        try:
            os.link(self._intd, str(n), dst_dir_fd=tdir.fd)
        except OSError as e:
            code = _classify_create_error(self._w.paths, e, codes.TODO_TROUBLE)
            raise QueueError(code, f"unable to link {tdir.path}/{n}: {e.strerror}") from e

    def _finish(self) -> int:
        """After the todo/ fsync: drop the pid name, close, poke the scheduler."""
        w = self._w
        w._step(CrashState.TODO_SYNCED)
        # Only now does the pid name go (qmail drops it right after the mess link): until
        # the commit it tells recovery which process wrote this mess file.
        self._drop_pid()
        self._done = True
        os.close(self._fd)
        self._fd = -1
        w._step(CrashState.PID_UNLINKED)
        w._poke(self.msgnum)
        return self.msgnum

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
        if self._fd >= 0:
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
        if self._ifd >= 0:
            os.close(self._ifd)
            self._ifd = -1
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


Item = tuple[Pending, bytes, Iterable[bytes]]


def _sync_batch(
    w: QueueWriter,
    items: Sequence[Item],
    live: list[int],
    fail: Callable[[int, QueueError], None],
    extra: Sequence[Callable[[], None]] = (),
) -> tuple[list[int], list[OSError | None]]:
    """fsync every message file, envelope and ``mess/S`` directory of the batch at once,
    and the ``extra`` fsyncs with them (CommitPipeline: the previous round's todo/);
    with ``one_commit``, write out the files and leave the directories to todo/'s fsync.

    Each is independent of the others and all must be done before any todo link, so
    they need no order among themselves; the hook still sees MESS_SYNCED and then
    INTD_SYNCED for each message, after the fsyncs. Returns the messages still live and
    the errors of the ``extra`` jobs."""
    jobs: list[Callable[[], None]] = list(extra)
    first: list[int] = []  # per live message: the index of its two jobs (file, envelope)
    dir_job: dict[int, int] = {}  # split -> index of its job
    dir_err: dict[int, OSError] = {}
    # One commit: the data written out now, the metadata (mess/S's link with the rest)
    # committed by the todo/ fsync after the links.
    one = w.one_commit
    sync = write_out if one else os.fsync
    for i in live:
        p = items[i][0]
        first.append(len(jobs))
        jobs.append(functools.partial(sync, p._fd))
        jobs.append(functools.partial(sync, p._ifd))
        split = p.msgnum % w.paths.nsplit
        if not one and split not in dir_job and split not in dir_err:
            try:
                g = w._dir(w._mess_dirs[split])
            except OSError as exc:
                dir_err[split] = exc
                continue
            dir_job[split] = len(jobs)
            jobs.append(functools.partial(w._dirsync, g))
    try:
        # Write-outs only wait for the device (the writes were all started already): one
        # thread waits for each in turn, with no hand-off to the sync threads.
        errs = fsync_all(jobs, at_once=not one)
    finally:
        for i in live:
            items[i][0]._close_intd()
    for split, k in dir_job.items():
        derr = errs[k]
        if derr is not None:
            dir_err[split] = derr
    ok = []
    for k, i in enumerate(live):
        p = items[i][0]
        try:
            ferr = errs[first[k]]
            if ferr is not None:
                fail(i, QueueError(codes.WRITE_ERROR, f"unable to fsync message: {ferr}"))
                continue
            w._step(CrashState.MESS_SYNCED)
            ferr = errs[first[k] + 1]
            if ferr is not None:
                fail(i, QueueError(codes.WRITE_ERROR, f"unable to fsync {p._intd}: {ferr}"))
                continue
            ferr = dir_err.get(p.msgnum % w.paths.nsplit)
            if ferr is not None:
                fail(i, QueueError(codes.WRITE_ERROR, f"unable to fsync mess dir: {ferr}"))
                continue
            w._step(CrashState.INTD_SYNCED)
        except BaseException:
            p.abort()
            raise
        ok.append(i)
    return ok, errs[: len(extra)]


class CommitPipeline:
    """Group commit across batches: one batch's todo/ fsync shares its journal commit
    with the next batch's file fsyncs.

    A message needs two rounds of fsyncs one after the other: its file, envelope and
    ``mess/S`` (then the todo link), and ``todo/`` (then the reply). On a journalled file
    system each round is a journal commit, and the commits of a file system are made one
    at a time, so a committer that waits for both rounds of one batch before it takes the
    next one pays two commits per batch. Here each :meth:`round` does, in one set of
    concurrent fsyncs, the second round of the messages linked by the previous call and
    the first round of the new ones: one commit per batch when messages keep coming.

    With the writer's ``one_commit`` a batch needs one commit only: a round then does
    both rounds of its messages itself, and nothing waits for the next call.

    Every message still passes every step in the same order as a commit of its own (the
    hook sees each state for each message), no todo link is made before its message's
    files are synced, and no result is returned before its todo/ fsync returned: the
    guarantees are those of ``commit_many``, which is two rounds of one pipeline.
    """

    def __init__(self, writer: QueueWriter) -> None:
        self.w = writer
        self._linked: list[tuple[object, Pending]] = []
        self._out: list[tuple[object, int | QueueError]] = []

    @property
    def pending(self) -> int:
        """Messages linked into todo/ whose todo/ fsync is still to come (next round)."""
        return len(self._linked)

    def round(
        self, new: Sequence[tuple[object, Pending, bytes, Iterable[bytes]]]
    ) -> list[tuple[object, int | QueueError]]:
        """Prepare ``new`` (keys with their items), fsync it together with todo/ for the
        messages linked last time, finish those and link the new ones. Returns the
        results that are final now: (key, N) of the finished messages and (key,
        QueueError) of every message that failed. Exceptions other than QueueError (a
        hook's) abort the message they hit and propagate; the results already final
        are then in ``drain()`` and the linked messages in ``abort()``."""
        w = self.w
        items: list[Item] = []
        for _, p, sender, rcpts in new:
            if p._w is not w:
                raise ValueError("CommitPipeline: messages of different writers")
            items.append((p, sender, rcpts))
        out = self._out

        def fail(i: int, err: QueueError) -> None:
            items[i][0].abort()
            out.append((new[i][0], err))

        live = _phase(
            list(range(len(items))),
            lambda i: items[i][0]._prepare(items[i][1], items[i][2]),
            items,
            fail,
        )
        # Start every file's write-back before the first fsync: the disk then writes them
        # all at once and each fsync finds its data written or on its way. (The first
        # message file is fsynced at once anyway, so a batch of one kicks its envelope only.
        # With one commit the waits are one after the other: every file is kicked.)
        for k, i in enumerate(live):
            items[i][0]._start_writeback(k > 0 or w.one_commit)
        linked = list(self._linked)  # stay in _linked until finished: abort() sees them
        extra: list[Callable[[], None]] = []
        tdir: _GroupSync | None = None
        tdir_err: OSError | None = None
        if linked or live:
            try:
                tdir = w._dir(w._todo_dir)
            except OSError as e:
                tdir_err = e
        if linked and tdir is not None:
            extra.append(functools.partial(w._dirsync, tdir))
        if live or extra:
            live, extra_errs = _sync_batch(w, items, live, fail, extra)
        else:
            extra_errs = []
        if linked:
            terr = tdir_err if tdir is None else extra_errs[0]
            err = None
            if terr is not None:
                err = QueueError(codes.TODO_TROUBLE, f"unable to fsync todo: {terr}")
            for key, p in linked:
                if err is not None:
                    p._undo_link(f"{w._todo_dir}/{p.msgnum}")
                    out.append((key, err))
                else:
                    out.append((key, p._finish()))
                del self._linked[0]
        if live and tdir is None:
            err = QueueError(codes.TODO_TROUBLE, f"unable to open {w._todo_dir}: {tdir_err}")
            for i in live:
                fail(i, err)
            live = []
        now = []
        for i in sorted(live):
            p = items[i][0]
            try:
                p._link_todo(cast(_GroupSync, tdir))
            except QueueError as e:
                fail(i, e)
                continue
            except BaseException:
                p.abort()
                raise
            self._linked.append((new[i][0], p))
            now.append(i)
        # The commit point of each message: whole on disk and named in todo/.
        for _ in now:
            w._step(CrashState.TODO_LINKED)
        if now and w.one_commit:
            # Nothing to share the todo/ fsync with: the files' data is already out, and
            # this one commit is the batch's only one (its results join ours in _out).
            return self.round([])
        return self.drain()

    def drain(self) -> list[tuple[object, int | QueueError]]:
        """The results made final and not yet returned (after a round that raised)."""
        out, self._out = self._out, []
        return out

    def abort(self) -> list[object]:
        """Give up the linked messages (a bug or a hook raised): they are withdrawn as
        after a failed todo/ fsync. Returns their keys (none of them was acknowledged)."""
        linked, self._linked = self._linked, []
        for _, p in linked:
            p._undo_link(f"{self.w._todo_dir}/{p.msgnum}")
        return [key for key, _ in linked]


def _phase(
    idx: list[int],
    step: Callable[[int], None],
    items: Sequence[Item],
    fail: Callable[[int, QueueError], None],
) -> list[int]:
    """Run ``step`` for each message; the ones it fails with QueueError drop out."""
    ok = []
    for i in idx:
        try:
            step(i)
        except QueueError as e:
            fail(i, e)
        except BaseException:
            items[i][0].abort()
            raise
        else:
            ok.append(i)
    return ok


def commit_many(items: Sequence[Item]) -> list[int | QueueError]:
    """Commit several messages of one writer together; per message, N or its error.

    Each message goes through the same steps, in the same order, as a commit of its own
    (the hook sees each state for each message), but step by step for the whole batch:
    every message and envelope is written before any is synced, then all of them and
    their ``mess/S`` directories (each once) are fsynced at once, and ``todo/`` once
    after all the links: two rounds of a :class:`CommitPipeline`. A message that fails
    before its link is aborted alone; the others go on.
    One thread doing a batch costs far fewer thread switches than a thread per message.
    Exceptions other than QueueError (a hook's) abort the message they hit and propagate.
    """
    w: QueueWriter | None = None
    for p, _, _ in items:
        if w is None:
            w = p._w
        elif p._w is not w:
            raise ValueError("commit_many: messages of different writers")
    if w is None:
        return []
    pipe = CommitPipeline(w)
    results: list[int | QueueError] = [0] * len(items)
    try:
        got = pipe.round([(i, p, s, r) for i, (p, s, r) in enumerate(items)])
        got += pipe.round([])
    except BaseException:
        pipe.abort()
        raise
    for key, res in got:
        assert isinstance(key, int)
        results[key] = res
    return results
