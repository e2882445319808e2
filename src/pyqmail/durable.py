"""The one place that knows how to make bytes durable on disk.

On Linux a new directory entry survives a crash only after its directory is fsynced;
qmail relied on BSD semantics and did not. Every writer in pyqmail that promises
durability (queue, Maildir, cdb compilers) goes through these helpers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


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
