"""mbox delivery (local.md 3.6): From_ line, mboxrd quoting, locking, truncate on error.

Locking takes all three locks mail readers use, so pyqmail interoperates with qmail
(flock), procmail/mutt/dovecot (fcntl and a ``FILE.lock`` dot-lock): the dot-lock is
best effort (skipped when the directory is not writable for the user), the kernel locks
are polled until ``lock_timeout`` (qmail: 30 s) and then the delivery is deferred. If a
kernel lock fails for a reason other than contention the delivery proceeds unlocked, as
qmail's does. The file size is remembered before writing; a failed write truncates back
to it (only when locked, as qmail), so no half message is left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable

from pyqmail.durable import write_all
from pyqmail.local.failure import DeliveryFailure, strerror, temp

STALE_DOTLOCK = 300.0  # seconds after which a FILE.lock is considered abandoned


def needs_quote(line: bytes) -> bool:
    """gfrom: a line matching ``^>*From `` gets one more ``>``."""
    return line.lstrip(b">").startswith(b"From ")


class _Locks:
    def __init__(self, fd: int, dotlock: str | None, dir_fd: int | None) -> None:
        self.fd = fd
        self.dotlock = dotlock
        self.dir_fd = dir_fd
        self.kernel = False

    def release(self) -> None:
        if self.dotlock is not None:
            try:
                os.unlink(self.dotlock, dir_fd=self.dir_fd)
            except OSError:
                pass


def _try_dotlock(name: str, dir_fd: int | None) -> bool | None:
    """True: made; False: held by someone; None: cannot dot-lock here (skip)."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        try:
            if time.time() - os.stat(name, dir_fd=dir_fd).st_mtime > STALE_DOTLOCK:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        return False
    except OSError:
        return None
    try:
        write_all(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    os.close(fd)
    return True


def _lock(
    fd: int,
    path: str,
    dir_fd: int | None,
    timeout: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> _Locks:
    deadline = clock() + timeout
    locks = _Locks(fd, None, dir_fd)
    dotname = path + ".lock"
    delay = 0.01

    def wait() -> None:
        nonlocal delay
        if clock() >= deadline:
            locks.release()
            raise temp(f"File has been locked for {int(timeout)} seconds straight. (#4.3.0)")
        sleep(delay)
        delay = min(delay * 2, 0.25)

    while True:
        got = _try_dotlock(dotname, dir_fd)
        if got is None:
            break
        if got:
            locks.dotlock = dotname
            break
        wait()
    flock_ok = True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                flock_ok = False
                break
        wait()
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locks.kernel = flock_ok
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EINTR):
                locks.kernel = flock_ok
                break
        wait()
    return locks


def deliver(
    path: str,
    msg_fd: int,
    ufline: bytes,
    header: bytes,
    *,
    dir_fd: int | None = None,
    lock_timeout: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Append the message on ``msg_fd`` to the mbox ``path`` (relative to ``dir_fd``).

    ``header`` is Return-Path + Delivered-To. Raises DeliveryFailure (111) on any error.
    """
    bpath = path
    try:
        fd = os.open(
            bpath.encode("utf-8", "surrogateescape"),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT,
            0o600,
            dir_fd=dir_fd,
        )
    except OSError as e:
        raise temp(f"Unable to open {path}: {strerror(e)}. (#4.2.1)") from e
    locks: _Locks | None = None
    try:
        locks = _lock(fd, path, dir_fd, lock_timeout, clock, sleep)
        pos = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write(fd, msg_fd, ufline + header)
            os.fsync(fd)
        except DeliveryFailure:
            if locks.kernel:
                os.ftruncate(fd, pos)
            raise
        except OSError as e:
            if locks.kernel:
                try:
                    os.ftruncate(fd, pos)
                except OSError:
                    pass
            raise temp(f"Unable to write {path}: {strerror(e)}. (#4.3.0)") from e
    finally:
        os.close(fd)
        if locks is not None:
            locks.release()


def _write(fd: int, msg_fd: int, head: bytes) -> None:
    """Copy the message with mboxrd quoting, streaming (a long line is not held whole)."""
    buf = bytearray(head)
    offset = 0
    midline = False  # the previous chunk ended inside a line whose start is written
    while True:
        try:
            chunk = os.pread(msg_fd, 65536, offset)
        except OSError as e:
            raise temp(f"Unable to read message: {strerror(e)}. (#4.3.0)") from e
        if not chunk:
            break
        offset += len(chunk)
        start = 0
        while start < len(chunk):
            nl = chunk.find(b"\n", start)
            end = len(chunk) if nl < 0 else nl + 1
            piece = chunk[start:end]
            if not midline and nl < 0 and len(piece.lstrip(b">")) < 5:
                # Too short to decide on quoting yet: carry it into the next read.
                more = os.pread(msg_fd, 65536, offset)
                if more:
                    chunk = chunk[start:] + more
                    offset += len(more)
                    start = 0
                    continue
            if not midline and needs_quote(piece):
                buf += b">"
            buf += piece
            midline = nl < 0
            start = end
        if len(buf) >= 65536:
            write_all(fd, bytes(buf))
            buf.clear()
    if midline:
        buf += b"\n"
    buf += b"\n"
    write_all(fd, bytes(buf))
