"""The one place that knows how to make bytes durable on disk.

On Linux a new directory entry survives a crash only after its directory is fsynced;
qmail relied on BSD semantics and did not. Every writer in pyqmail that promises
durability (queue, Maildir, cdb compilers) goes through these helpers.
"""

from __future__ import annotations

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


def fsync_all(jobs: Sequence[Callable[[], None]]) -> list[OSError | None]:
    """Run independent fsyncs at once; each job's error (or None), in order.

    A disk flushes concurrent fsyncs together, and on a journalled file system fsyncs
    issued while one journal transaction is open share its commit: 50 files of a batch
    take about a quarter of the time they take one after the other
    (docs/benchmarks/smtp.md). The calling thread takes one share; a small per-process
    pool the others."""
    global _sync_pool, _sync_pool_pid
    n = len(jobs)
    errs: list[OSError | None] = [None] * n

    def run(start: int, step: int) -> None:
        for k in range(start, n, step):
            try:
                jobs[k]()
            except OSError as e:
                errs[k] = e

    width = min(n, SYNC_THREADS)
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
