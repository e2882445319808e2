"""Paths inside queue/: which file of message N lives where (queue.md section 1).

A message is named by N, the inode number of its mess file. mess, info, local and
remote are split into ``N % 23`` subdirectories; todo, intd and bounce are not.
This module only computes paths; it never touches the disk.
"""

from __future__ import annotations

from pathlib import Path

from pyqmail.home import SPLIT


class QueuePaths:
    """Every path of qmail's queue under one ``queue/`` directory."""

    def __init__(self, root: Path | str, split: int = SPLIT) -> None:
        self.root = Path(root)
        self.nsplit = split
        self.pid = self.root / "pid"
        self.lock = self.root / "lock"
        self.trigger = self.lock / "trigger"
        self.tcpto = self.lock / "tcpto"
        self.sendmutex = self.lock / "sendmutex"

    def split(self, n: int) -> int:
        """The split subdirectory number of message ``n``."""
        return n % self.nsplit

    def _split_path(self, kind: str, n: int) -> Path:
        return self.root / kind / str(n % self.nsplit) / str(n)

    def mess(self, n: int) -> Path:
        return self._split_path("mess", n)

    def info(self, n: int) -> Path:
        return self._split_path("info", n)

    def local(self, n: int) -> Path:
        return self._split_path("local", n)

    def remote(self, n: int) -> Path:
        return self._split_path("remote", n)

    def todo(self, n: int) -> Path:
        return self.root / "todo" / str(n)

    def intd(self, n: int) -> Path:
        return self.root / "intd" / str(n)

    def bounce(self, n: int) -> Path:
        return self.root / "bounce" / str(n)

    def dir(self, kind: str) -> Path:
        """``queue/KIND`` (mess, info, local, remote, todo, intd, bounce, pid, lock)."""
        return self.root / kind

    def split_dirs(self, kind: str) -> list[Path]:
        """``queue/KIND/0`` .. ``queue/KIND/22`` for a split kind."""
        return [self.root / kind / str(i) for i in range(self.nsplit)]


def msgnum(name: str) -> int | None:
    """The message number a queue file name stands for, or None (qmail skips non-digits)."""
    if not name or not name.isascii() or not name.isdigit():
        return None
    return int(name)
