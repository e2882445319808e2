"""Paths inside queue/: which file of message N lives where (queue.md section 1).

A message is named by N, the inode number of its mess file. mess, info, local and
remote are split into ``N % 23`` subdirectories; todo, intd and bounce are not.
This module only computes paths; it never touches the disk. ``QueuePaths.name`` is the
one place a message's path is spelled; the Path-returning methods are built from it.
"""

from __future__ import annotations

from pathlib import Path

from pyqmail.home import SPLIT

SPLIT_KINDS = frozenset({"mess", "info", "local", "remote"})
MESSAGE_KINDS = ("mess", "info", "local", "remote", "todo", "intd", "bounce")


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
        root = str(self.root)
        self._split_prefix = {k: f"{root}/{k}/" for k in MESSAGE_KINDS if k in SPLIT_KINDS}
        self._prefix = {k: f"{root}/{k}/" for k in MESSAGE_KINDS if k not in SPLIT_KINDS}

    def split(self, n: int) -> int:
        """The split subdirectory number of message ``n``."""
        return n % self.nsplit

    def name(self, kind: str, n: int) -> str:
        """The path of message ``n``'s file of ``kind`` (one of MESSAGE_KINDS) as a str.

        Built by string formatting, several times cheaper than the Path methods: the
        scheduler and the cleaner build a handful per message on their hot path.
        """
        prefix = self._split_prefix.get(kind)
        if prefix is not None:
            return f"{prefix}{n % self.nsplit}/{n}"
        return f"{self._prefix[kind]}{n}"

    def mess(self, n: int) -> Path:
        return Path(self.name("mess", n))

    def info(self, n: int) -> Path:
        return Path(self.name("info", n))

    def local(self, n: int) -> Path:
        return Path(self.name("local", n))

    def remote(self, n: int) -> Path:
        return Path(self.name("remote", n))

    def todo(self, n: int) -> Path:
        return Path(self.name("todo", n))

    def intd(self, n: int) -> Path:
        return Path(self.name("intd", n))

    def bounce(self, n: int) -> Path:
        return Path(self.name("bounce", n))

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
