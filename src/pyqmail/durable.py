"""The one place that knows how to make bytes durable on disk.

On Linux a new directory entry survives a crash only after its directory is fsynced;
qmail relied on BSD semantics and did not. Every writer in pyqmail that promises
durability (queue, Maildir, cdb compilers) goes through these helpers.
"""

from __future__ import annotations

import os


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
