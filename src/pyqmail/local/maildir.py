"""Maildir delivery (local.md 3.7): a message is never partially visible in new/.

The sequence: open the maildir relative to the home, create ``tmp/NAME`` with O_EXCL,
write Return-Path + Delivered-To + the message verbatim, fsync, close, ``link`` into
``new/NAME``, fsync ``new/`` (Linux needs it for the entry to survive a crash; qmail
relied on BSD semantics), unlink the tmp name. Any failure removes the tmp file and is a
temporary failure. ``cur/`` is never touched.

The ``new/`` fsync may be handed to the caller: inside :func:`deferred_dir_syncs` a
delivery stops after the link and the tmp unlink and records ``new/``'s path instead;
whoever collected it must fsync that directory before it reports the delivery done (the
single-user worker pool does, for many deliveries at once: local/pool.py). Nothing else
changes: the file itself is fsynced before the link, so ``new/`` never shows a message
that is not on disk.

On a file system whose journal keeps order (``durable.ordered_journal``: ext4 with a
journal, data=ordered) the file's fsync is a ``durable.write_out`` instead: its data on
the device, its metadata in the running journal transaction, which the ``new/`` fsync
after the link commits together with the link. One journal commit per delivery (or per
round of deferred ones) where two were needed one after the other.

Names follow the modern maildir spec: ``SECONDS.MusecPpidQseq.HOST`` (unique even for
several deliveries by one process in one second).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

from pyqmail.durable import ordered_journal, write_all, write_out
from pyqmail.local.failure import temp

_seq = itertools.count(1)
MAILDIR_TIMEOUT = 86400.0  # qmail-local's alarm around a maildir delivery
_deferred: list[bytes] | None = None  # inside deferred_dir_syncs(): new/ dirs to fsync


@contextlib.contextmanager
def deferred_dir_syncs() -> Iterator[list[bytes]]:
    """Within: each maildir delivery adds its ``new/`` (an absolute path) to the list
    yielded instead of fsyncing it; the caller must fsync them before it reports success."""
    global _deferred
    outer, _deferred = _deferred, []
    try:
        yield _deferred
    finally:
        _deferred = outer


def fsync_dirs(paths: list[bytes]) -> OSError | None:
    """fsync each directory (deferred_dir_syncs' list); the first error, or None."""
    err: OSError | None = None
    for path in dict.fromkeys(paths):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            err = err or e
    return err


@functools.cache
def _hostname() -> str:
    host = socket.gethostname()[:64] or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


def unique_name(now: float | None = None) -> str:
    """``SECONDS.MusecPpidQseq.HOST``: unique per host, process and delivery."""
    t = time.time() if now is None else now
    sec = int(t)
    usec = int((t - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_seq)}.{_hostname()}"


def copy_fd(src: int, dst: int, offset: int = 0) -> int:
    """Copy ``src`` from ``offset`` to its end onto ``dst``; returns bytes copied.

    Uses sendfile (no copy through Python) and reads at explicit offsets, so the shared
    message descriptor's position does not matter.
    """
    total = 0
    while True:
        try:
            n = os.sendfile(dst, src, offset + total, 1 << 20)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS) and total == 0:
                return _copy_by_read(src, dst, offset)
            raise
        if n == 0:
            return total
        total += n


def _copy_by_read(src: int, dst: int, offset: int) -> int:
    total = 0
    while True:
        chunk = os.pread(src, 65536, offset + total)
        if not chunk:
            return total
        write_all(dst, chunk)
        total += len(chunk)


def deliver(
    path: str,
    msg_fd: int,
    header: bytes,
    *,
    dir_fd: int | None = None,
    timeout: float | None = MAILDIR_TIMEOUT,
    name: Callable[[], str] = unique_name,
    sleep: Callable[[float], None] = time.sleep,
    copy: Callable[[int, int], int] = copy_fd,
) -> None:
    """Deliver the message on ``msg_fd`` into the maildir ``path`` (relative to ``dir_fd``).

    ``header`` is Return-Path + Delivered-To. Raises DeliveryFailure (111) on any error.
    ``timeout`` bounds the write (qmail: 24 hours, for a hung file system); it needs
    SIGALRM, so it applies only when called from the main thread.
    """
    try:
        dfd = os.open(
            path.encode("utf-8", "surrogateescape"), os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd
        )
    except OSError as e:
        raise temp("Unable to chdir to maildir. (#4.2.1)") from e
    try:
        _deliver_in(dfd, msg_fd, header, name, sleep, copy, timeout)
    finally:
        os.close(dfd)


def _deliver_in(
    dfd: int,
    msg_fd: int,
    header: bytes,
    name: Callable[[], str],
    sleep: Callable[[float], None],
    copy: Callable[[int, int], int],
    timeout: float | None,
) -> None:
    fail = "Temporary error on maildir delivery. (#4.3.0)"
    for attempt in range(3):
        fname = name()
        tmpname = "tmp/" + fname
        try:
            fd = os.open(tmpname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
            break
        except FileExistsError:
            if attempt == 2:
                raise temp(fail) from None
            sleep(2)
        except OSError as e:
            raise temp(fail) from e
    try:
        with _alarm(timeout):
            try:
                write_all(fd, header)
                copy(msg_fd, fd)
                if ordered_journal(fd):
                    write_out(fd)  # the new/ fsync commits it all (durable.py)
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmpname, "new/" + fname, src_dir_fd=dfd, dst_dir_fd=dfd)
    except _Timeout:
        _unlink(tmpname, dfd)
        raise temp("Timeout on maildir delivery. (#4.3.0)") from None
    except OSError as e:
        _unlink(tmpname, dfd)
        raise temp(fail) from e
    try:
        newfd = os.open("new", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
        try:
            where = _where(newfd) if _deferred is not None else None
            if where is None:
                os.fsync(newfd)
            else:
                assert _deferred is not None
                _deferred.append(where)
        finally:
            os.close(newfd)
    except OSError as e:
        # The link is there but not known to be durable: report a temporary failure so
        # the message is delivered again (at least once beats lost).
        _unlink(tmpname, dfd)
        raise temp(fail) from e
    _unlink(tmpname, dfd)


def _where(fd: int) -> bytes | None:
    """The directory's absolute path as the kernel has it now (None without /proc)."""
    try:
        path = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None
    return path if path.startswith(b"/") else None


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise _Timeout in the body after ``seconds`` (main thread only; else no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(_signum: int, _frame: object) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _unlink(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def make(path: str, mode: int = 0o700) -> None:
    """maildirmake: DIR, DIR/tmp, DIR/new, DIR/cur. Raises OSError (DIR may not exist)."""
    os.mkdir(path, mode)
    for sub in ("tmp", "new", "cur"):
        os.mkdir(os.path.join(path, sub), mode)
