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
import re
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


class FromQuoter:
    """mboxrd quoting, streamed: a line matching ``^>*From `` gets one more ``>``.

    Linear in its input whatever the pieces: at a line's start it keeps only a count of
    ``>`` and at most 4 bytes of a possible ``From `` (never the bytes of a run of ``>``,
    which are all alike), and every byte is looked at once. The output is what quoting
    each line of the whole input with needs_quote gives.
    """

    def __init__(self) -> None:
        self._gt = 0  # '>' seen at the start of the current line, not yet written
        self._from = 0  # bytes of b"From " matched after them, not yet written
        self._midline = False  # the current line's start is decided and written
        self.open_line = False  # the input so far ends inside a line

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self._midline:
                nl = data.find(b"\n", i)
                end = n if nl < 0 else nl + 1
                out += data[i:end]
                i = end
                if nl >= 0:
                    self._midline = False
                continue
            if self._from == 0:
                m = _GT_RUN.match(data, i)
                assert m is not None  # ">*" always matches
                self._gt += m.end() - i
                i = m.end()
            while i < n and self._from < 5 and data[i] == _FROM[self._from]:
                self._from += 1
                i += 1
            if self._from == 5:  # a From_ line: one more '>'
                out += b">" * (self._gt + 1) + _FROM
            elif i == n:
                break  # undecided until more comes
            else:  # not a From_ line: what was held, unchanged
                out += b">" * self._gt + _FROM[: self._from]
            self._gt = self._from = 0
            self._midline = True
        if data:
            self.open_line = data[-1] != 10  # quoting adds no newline and takes none
        return bytes(out)

    def end(self) -> bytes:
        """What is still held at the end of the input (an undecided line start)."""
        out = b">" * self._gt + _FROM[: self._from]
        self._gt = self._from = 0
        return out


_GT_RUN = re.compile(rb">*")
_FROM = b"From "


def _write(fd: int, msg_fd: int, head: bytes) -> None:
    """Copy the message with mboxrd quoting, streaming (a long line is not held whole)."""
    buf = bytearray(head)
    offset = 0
    quoter = FromQuoter()
    while True:
        try:
            chunk = os.pread(msg_fd, 65536, offset)
        except OSError as e:
            raise temp(f"Unable to read message: {strerror(e)}. (#4.3.0)") from e
        if not chunk:
            break
        offset += len(chunk)
        buf += quoter.feed(chunk)
        if len(buf) >= 65536:
            write_all(fd, bytes(buf))
            buf.clear()
    buf += quoter.end()
    if quoter.open_line:
        buf += b"\n"
    buf += b"\n"
    write_all(fd, bytes(buf))
