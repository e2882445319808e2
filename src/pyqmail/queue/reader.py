"""Reading the queue as qmail-qread and qmail-qstat do (queue.md section 7).

Read-only: never takes qmail-send's lock, so a listing may be slightly behind a
running scheduler, as qmail's is.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyqmail.qdate import date822_gmt
from pyqmail.queue.layout import QueuePaths, msgnum
from pyqmail.queue.records import Recipient, read_channel, read_info

# qmail's own wording for the errors a queue reader meets (its error_str), which
# qmail-qread prints in "warning: trouble with #N: ..." lines.
_QMAIL_ERRORS = {
    errno.ENOENT: "file does not exist",
    errno.EACCES: "access denied",
    errno.EPERM: "permission denied",
    errno.EIO: "input/output error",
    errno.ENOMEM: "out of memory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
}


def qmail_strerror(e: OSError) -> str:
    """An OSError in qmail's words (falls back to the C library's text, lower case)."""
    if e.errno is not None and e.errno in _QMAIL_ERRORS:
        return _QMAIL_ERRORS[e.errno]
    return (e.strerror or str(e)).lower()


@dataclass(frozen=True)
class QueueCounts:
    messages: int  # files under mess/*
    unprocessed: int  # files in todo/


def _count_files(path: os.PathLike[str] | str, errors: list[str]) -> int:
    try:
        return sum(1 for e in os.scandir(path) if not e.is_dir(follow_symlinks=False))
    except OSError as e:
        errors.append(f"{path}: {e.strerror}")
        return 0


def count(paths: QueuePaths, errors: list[str] | None = None) -> QueueCounts:
    """qmail-qstat's two numbers. A directory that cannot be read counts as empty and
    is named in ``errors`` (qmail-qstat is ``find | wc -l``: it says so and goes on)."""
    errs: list[str] = [] if errors is None else errors
    messages = sum(_count_files(d, errs) for d in paths.split_dirs("mess"))
    return QueueCounts(messages, _count_files(paths.dir("todo"), errs))


def qstat_text(c: QueueCounts) -> str:
    return (
        f"messages in queue: {c.messages}\n"
        f"messages in queue but not yet preprocessed: {c.unprocessed}\n"
    )


@dataclass(frozen=True)
class QueuedMessage:
    msgnum: int
    birth: float  # info's mtime
    size: int  # mess file size
    sender: bytes
    bouncing: bool
    local: tuple[Recipient, ...]
    remote: tuple[Recipient, ...]


def _printable(b: bytes) -> str:
    return "".join(chr(c) if 32 <= c <= 126 else "_" for c in b)


def _channel(path: Path) -> tuple[Recipient, ...]:
    try:
        return tuple(read_channel(path))
    except FileNotFoundError:
        return ()


def messages(paths: QueuePaths) -> Iterator[QueuedMessage | tuple[int, str]]:
    """Each preprocessed message in info/0..22 directory order; (N, error) on trouble."""
    for d in paths.split_dirs("info"):
        for name in os.listdir(d):
            n = msgnum(name)
            if n is None:
                continue
            try:
                info = paths.info(n)
                birth = os.stat(info).st_mtime
                sender = read_info(info)
                size = os.stat(paths.mess(n)).st_size
                yield QueuedMessage(
                    n,
                    birth,
                    size,
                    sender,
                    paths.bounce(n).exists(),
                    _channel(paths.local(n)),
                    _channel(paths.remote(n)),
                )
            except OSError as e:
                yield (n, qmail_strerror(e))


def format_message(m: QueuedMessage) -> str:
    """qmail-qread's lines for one message."""
    head = f"{date822_gmt(m.birth)}  #{m.msgnum}  {m.size}  <{_printable(m.sender)}> "
    if m.bouncing:
        head += " bouncing"
    lines = [head]
    for kind, recs in (("local", m.local), ("remote", m.remote)):
        for r in recs:
            lines.append(f"{'  done' if r.done else ''}\t{kind}\t{_printable(r.address)}")
    return "\n".join(lines) + "\n"
