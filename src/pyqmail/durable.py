"""The one place that knows how to make bytes durable on disk.

On Linux a new directory entry survives a crash only after its directory is fsynced;
qmail relied on BSD semantics and did not. Every writer in pyqmail that promises
durability (queue, Maildir, cdb compilers) goes through these helpers.

One commit instead of two (:func:`ordered_journal`, :func:`write_out`). Making a new
file durable under a new name normally takes two journal commits one after the other:
fsync the file, and only then link it and fsync the directory (linked first, a crash
could keep the name and lose the data). On ext4 with a journal in ``data=ordered`` mode
(the default) the first commit can go: write the file's data out and wait for it
(``sync_file_range`` with WAIT_BEFORE, WRITE and WAIT_AFTER), then link, then fsync the
directory. That is safe there because:

1. the wait returns only after the data is on the device and the metadata that makes it
   readable (the blocks' allocation, the conversion of unwritten extents, the on-disk
   size) is recorded in the journal's running transaction: ext4 ends a page's write-back
   only after converting its unwritten extents;
2. jbd2 commits transactions strictly in order, one at a time: the transaction holding
   the link, which the directory's fsync commits, is never durable before the ones
   holding the file's creation, allocation and size (on a file system made with
   fast_commit too: a fast commit logs the changes since the last full commit, and
   Debian 12's kernel made full commits for these directory fsyncs anyway, fc_info
   counting none);
3. a commit flushes the device's write cache before its commit block (``barrier``, the
   default), so the data written before it is on stable storage too.

A crash then leaves either no name, or the name with all of the file. Anywhere else
(other file systems, ext4 without a journal or in another data mode, a detection that
fails) the two-commit sequence stays.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so the entries created or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE
_SFR_WAIT_WRITE_WAIT = 1 | _SFR_WRITE | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER
_sfr: Callable[[int, int, int, int], int] | None = None
_sfr_missing = False


def _sync_range(fd: int, flags: int) -> bool:
    """sync_file_range(2) over the whole file; False where the C library has none."""
    global _sfr, _sfr_missing
    if _sfr is None and not _sfr_missing:
        # ctypes is imported at the top: a delivery process that has dropped to a user may
        # no longer read the interpreter's library. The symbol comes from the running
        # program (no file opened).
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        except (AttributeError, OSError):
            _sfr_missing = True
        else:
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sfr = fn
    if _sfr is None:
        return False
    if _sfr(fd, 0, 0, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def write_out(fd: int) -> None:
    """Write the whole file's dirty data to the device and wait for it (no metadata
    commit, no cache flush: see the module's docstring for when that is enough). Where
    the C library has no sync_file_range, an fsync (which does more) instead."""
    if not _sync_range(fd, _SFR_WAIT_WRITE_WAIT):
        os.fsync(fd)


def start_write_out(fd: int) -> None:
    """Start writing the file's dirty data to the device, without waiting and without
    dropping its cached pages (sync_file_range with WRITE alone): a kick before the
    fsyncs or write-outs that decide. Best effort: nothing where the call is missing."""
    _sync_range(fd, _SFR_WRITE)


def ordered_journal(where: str | os.PathLike[str] | int) -> bool:
    """True if ``where`` (a path or an open descriptor) is on an ext4 file system with a
    jbd2 journal in ``data=ordered`` mode, where :func:`write_out` then a directory
    fsync is as durable as an fsync of the file then of the directory (module
    docstring). False wherever that cannot be read from /proc and /sys, which is always
    safe, and when ``PYQMAIL_ORDERED_JOURNAL`` is ``no``. Read once per file system and
    process: the device and the file system's id (from ext4's UUID, new with every
    mkfs) name it, and ext4 cannot change its data mode on a remount."""
    if os.environ.get("PYQMAIL_ORDERED_JOURNAL", "").lower() in ("no", "0", "off"):
        return False
    try:
        st_dev = os.stat(where).st_dev
        fsid = os.statvfs(where).f_fsid
    except OSError:
        return False
    return _ordered_dev(st_dev, fsid)


@functools.lru_cache(maxsize=64)
def _ordered_dev(st_dev: int, fsid: int) -> bool:
    """ordered_journal's reading of /proc and /sys (``fsid``: the cache's key only)."""
    try:
        dev = f"{os.major(st_dev)}:{os.minor(st_dev)}"
        # Read as bytes: a dropped-privilege child may be unable to import a codec.
        fstype = b""
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[2] == dev.encode() and b" - " in line:
                    fstype = line.split(b" - ", 1)[1].split()[0]
                    break
        if fstype != b"ext4":
            return False
        name = os.path.basename(os.readlink(f"/sys/dev/block/{dev}"))
        with open(f"/proc/fs/ext4/{name}/options", "rb") as f:
            options = f.read().split()
        if b"data=ordered" not in options or b"nobarrier" in options:
            return False
        # An internal journal's jbd2 name is the device's and the journal inode's.
        return any(j.startswith(name + "-") for j in os.listdir("/proc/fs/jbd2"))
    except (OSError, ValueError, IndexError, LookupError):
        return False


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def replace_file(
    path: str | os.PathLike[str],
    chunks: Iterable[bytes],
    tmp: str | os.PathLike[str] | None = None,
    mode: int = 0o644,
) -> None:
    """Atomically replace ``path`` with ``chunks``: write tmp, fsync, rename, fsync dir.

    A reader sees the old file or the whole new one, never a part. If anything fails the
    temporary file is removed and the old ``path`` is untouched.
    """
    path = os.fspath(path)
    tmp = os.fspath(tmp) if tmp is not None else path + ".tmp"
    # never through a symlink planted at the temporary name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


SYNC_THREADS = 8  # fsyncs of one batch in flight at once
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_pid = 0
_sync_pool_lock = threading.Lock()


def fsync_all(jobs: Sequence[Callable[[], None]], *, at_once: bool = True) -> list[OSError | None]:
    """Run independent fsyncs at once; each job's error (or None), in order.

    A disk flushes concurrent fsyncs together, and on a journalled file system fsyncs
    issued while one journal transaction is open share its commit: 50 files of a batch
    take about a quarter of the time they take one after the other
    (docs/benchmarks/smtp.md). The calling thread takes one share; a small per-process
    pool the others. ``at_once=False``: all in the calling thread, one after the other
    (write-outs whose writes were all started already only wait for the device)."""
    global _sync_pool, _sync_pool_pid
    n = len(jobs)
    errs: list[OSError | None] = [None] * n

    def run(start: int, step: int) -> None:
        for k in range(start, n, step):
            try:
                jobs[k]()
            except OSError as e:
                errs[k] = e

    width = min(n, SYNC_THREADS) if at_once else 1
    if width <= 1:
        run(0, 1)
        return errs
    with _sync_pool_lock:
        if _sync_pool is None or _sync_pool_pid != os.getpid():  # none yet, or forked
            _sync_pool = ThreadPoolExecutor(SYNC_THREADS - 1, thread_name_prefix="qsync")
            _sync_pool_pid = os.getpid()
        pool = _sync_pool
    futures = [pool.submit(run, j, width) for j in range(1, width)]
    run(0, width)
    for f in futures:
        f.result()
    return errs
