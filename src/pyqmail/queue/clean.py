"""qmail-clean's job: removing queue files in the order that keeps the queue consistent.

qmail-send never unlinks mess/intd/todo itself; it asks qmail-clean (queue.md section 5):

- after preprocessing todo/N: remove ``intd/N`` then ``todo/N`` (clean_todo);
- every removal is an unlink, so a finished message's inodes go back to the file
  system: an inode a delivery program may still hold open (its fd 0 is the message file)
  is never made into another message's file or envelope, as in qmail;
- when a message is done: qmail-send removes ``info/S/N`` first (remove_info), then
  qmail-clean removes ``intd/N`` and ``mess/S/N`` (finish_message does all three in that
  order), so a crash in between leaves a mess file with no info and no todo:
  unreferenced, reaped later;
- pyqmail's direct delivery (a message delivered straight from todo, never given
  info/local files) is finished by removing ``todo/N`` first, so nothing delivers it
  again, then ``intd/N`` and ``mess/S/N`` (finish_direct).

qmail-send's own removals are here too, so that no other module unlinks a queue file:
leftovers of an interrupted preprocessing (remove_leftovers), a finished channel file
(remove_channel) and ``bounce/N`` once its bounce is queued (remove_bounce).

Each stops at the first failed unlink and raises its OSError (``filename`` set), as
qmail-clean answers ``!`` at the first failure; the scheduler logs it and carries on.
Paths are built with ``QueuePaths.name`` (str, cheap: this is every message's path).

``handle_request`` speaks qmail-clean's wire protocol for a drop-in qmail-clean:
``foop/N\\0`` or ``todo/N\\0`` -> ``+`` done, ``!`` an unlink failed, ``x`` malformed.
A missing file is not a failure (ENOENT is ignored, as qmail-clean does).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from pyqmail.queue.layout import QueuePaths, msgnum

StrPath = str | os.PathLike[str]
# A client of qmail-clean (``handle_request`` in another process), for a scheduler that may
# not unlink queue files itself (root mode): ("todo", N) or ("foop", N) -> done.
Cleaner = Callable[[str, int], Awaitable[bool]]


def _unlink(path: StrPath) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def clean_todo(paths: QueuePaths, n: int) -> None:
    """After todo/N is preprocessed into info/local/remote: unlink intd/N, then todo/N."""
    _unlink(paths.name("intd", n))
    _unlink(paths.name("todo", n))


def clean_mess(paths: QueuePaths, n: int) -> None:
    """qmail-clean's ``foop/N``: unlink intd/N and mess/S/N."""
    _unlink(paths.name("intd", n))
    _unlink(paths.name("mess", n))


def remove_info(paths: QueuePaths, n: int) -> None:
    """qmail-send's own first step for a finished message: unlink info/S/N."""
    _unlink(paths.name("info", n))


def remove_leftovers(paths: QueuePaths, n: int) -> None:
    """Before todo/N is preprocessed (again): unlink info, local and remote of N if they
    exist, the leftovers of an interrupted earlier attempt (queue.md 4, step 2).

    Almost always none exists: each is looked for with access(2), which answers without
    an exception, and unlinked only when there. Only the scheduler creates these files
    and it is the one here, so nothing makes one in between; a directory it cannot
    search (access says no) fails the preprocessing's own O_EXCL create instead. The
    effective ids decide, as they do for the unlink (access(2) alone would use the real
    ones)."""
    for kind in ("info", "local", "remote"):
        path = paths.name(kind, n)
        if os.access(path, os.F_OK, effective_ids=True, follow_symlinks=False):
            _unlink(path)


def remove_channel(path: StrPath) -> None:
    """Every recipient in local/S/N or remote/S/N (``path``) has its result: unlink it."""
    _unlink(path)


def remove_bounce(paths: QueuePaths, n: int) -> None:
    """The bounce of message N is queued (or dropped as a triple bounce): unlink bounce/N."""
    _unlink(paths.name("bounce", n))


def finish_message(paths: QueuePaths, n: int) -> None:
    """A message is done: unlink info/S/N, then intd/N and mess/S/N (OSError on failure).

    Channel files (local/remote) and bounce/N must already be gone; the scheduler
    removes those as part of finishing the recipients and the bounce.
    """
    remove_info(paths, n)
    clean_mess(paths, n)


def finish_direct(paths: QueuePaths, n: int) -> None:
    """A message delivered straight from todo is done: unlink todo/N, intd/N, mess/S/N."""
    _unlink(paths.name("todo", n))
    clean_mess(paths, n)


MAX_REQUEST = 100  # bytes with the NUL: anything longer is refused ('x'), as qmail-clean does


def handle_request(paths: QueuePaths, request: bytes) -> bytes:
    """One qmail-clean request (without its NUL) -> its one-byte reply."""
    if len(request) + 1 < 7 or len(request) + 1 > MAX_REQUEST:
        return b"x"
    kind, _, num = request.partition(b"/")
    n = msgnum(num.decode("ascii", "replace"))
    if n is None or kind not in (b"foop", b"todo"):
        return b"x"
    try:
        if kind == b"todo":
            clean_todo(paths, n)
        else:
            clean_mess(paths, n)
    except OSError:
        return b"!"
    return b"+"
