"""The queue-submission contract: how every part of pyqmail hands a message to the queue.

Written once here and implemented by every submitter (queue/submit.py's in-process
writer, QMAILQUEUE program, root fork and queue service client; queue/committer.py's
committer process; mini-qmail's QMQP client): what qmail.c's ``qmail_open`` /
``qmail_put`` / ``qmail_close`` are for qmail's programs.

* ``Submitter.begin(*, origin, received) -> Submission`` opens a message (``origin``:
  the wording of qmail-queue's Received line, ``received``: the caller's own trace
  line, written first). It raises :class:`QueueError` only when no message can be
  begun at all.
* ``Submission.write(bytes)`` appends message bytes: cheap (buffered, spooled or
  streamed); a write error is reported by the commit.
* ``await Submission.commit(sender, recipients)`` makes the message durable and
  returns its :class:`Reply`; it does not raise for a queue failure (the reply carries
  qmail-queue's exit code), so the SMTP, QMQP, QMTP and inject front ends each make
  their own reply from one value. After a commit, ``write``, ``commit`` and ``abort``
  may not be called again (``abort`` is then harmless).
* ``Submission.abort()`` drops the message; nothing of it is queued.

A submitter whose work is blocking (files, sockets, a child process) derives its
submissions from :class:`BlockingSubmission`, which adds ``commit_blocking`` for the
synchronous commands (qmail-inject, sendmail, qmail-smtpd on stdio, qmail-qmqpd,
qmail-qmtpd, forwards, bounces from a worker thread), written once: an unexpected
exception becomes ``qq internal bug`` there, never a traceback to a peer. Such a
submitter is a :class:`BlockingSubmitter`; the committer process is not (its commit
needs the event loop that owns its socket).

This module is a leaf of queue/: it imports only the exit-code table.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from pyqmail.queue import codes
from pyqmail.queue.codes import qq_result

log = logging.getLogger("pyqmail.queue")


class QueueError(Exception):
    """A refused or failed queue insertion; ``code`` is qmail-queue's exit code.

    ``custom`` is a replacement program's fd-6 text (exit 82, notqmail).
    """

    def __init__(self, code: int, message: str = "", custom: str | None = None) -> None:
        super().__init__(message or qq_result(code, custom)[1])
        self.code = code
        self.custom = custom

    def result(self) -> tuple[str, str]:
        """(``"D"`` or ``"Z"``, qmail's text for the caller to report)."""
        return qq_result(self.code, self.custom)

    @property
    def permanent(self) -> bool:
        return self.result()[0] == "D"


@dataclass(frozen=True, slots=True)
class Reply:
    """What a commit gives back, and what the queue service and the committer send.

    ``code``: qmail-queue's exit code (0: queued; :data:`codes.CRASHED` for a signal).
    ``qp``: the queue process's id ("qp" in ``250 ok T qp P``; 0 when unknown).
    ``msgnum``: the message's inode number (0 when a program or a QMQP server queued it).
    ``text``: with exit 82, notqmail's custom reply (``D``/``Z`` + text, as the program
    wrote it on fd 6); otherwise a diagnostic for the log, never shown to a peer.
    """

    code: int
    qp: int = 0
    msgnum: int = 0
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.code == codes.OK

    @property
    def custom(self) -> str | None:
        """The fd-6 text when there is one (qmail.c uses it for exit 82 only)."""
        return self.text if self.code == codes.CUSTOM_ERROR else None

    def result(self) -> tuple[str, str]:
        """``("K", "ok")``, or (``"D"`` / ``"Z"``, qmail's text for the caller)."""
        return qq_result(self.code, self.custom)

    def error(self) -> QueueError:
        """This failure as the exception the synchronous commands raise."""
        return QueueError(self.code, "" if self.custom is not None else self.text, self.custom)

    @classmethod
    def of(cls, e: QueueError, qp: int = 0) -> Reply:
        return cls(e.code, qp, 0, e.custom if e.custom is not None else str(e))


class Submission(Protocol):
    """One message on its way into the queue (module docstring)."""

    def write(self, data: bytes) -> None: ...
    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> Awaitable[Reply]: ...
    def abort(self) -> None: ...


class Submitter(Protocol):
    """``begin(sign=True)``: DKIM-sign the message (pyqmail.dkim) where the queue is
    written; a submitter that hands the message to another writer (a QMAILQUEUE program,
    QMQP, the queue service for a caller it does not sign for) ignores it."""

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> Submission: ...


class BlockingSubmission(ABC):
    """A Submission whose commit is blocking work; subclasses write ``_commit``.

    ``commit`` (from an event loop) runs ``commit_blocking`` in a worker thread of a pool
    shared by the process (``PYQMAIL_SMTP_THREADS``, default 64: a QMAILQUEUE program or
    the queue service per message, many at once); a subclass that can group commits
    overrides it.
    """

    qp: int = 0

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    @abstractmethod
    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        """The blocking commit; may raise QueueError."""

    def commit_blocking(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        """Blocking: make the message durable; its Reply, whatever happens."""
        try:
            return self._commit(sender, recipients)
        except QueueError as e:
            return Reply.of(e, self.qp)
        except Exception:
            log.exception("queue commit failed")
            try:
                self.abort()
            except Exception:
                log.exception("queue abort failed")
            return Reply(codes.INTERNAL_BUG, self.qp, 0, "unexpected error")

    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> Awaitable[Reply]:
        import asyncio  # not at module level: qmail-inject never needs an event loop

        loop = asyncio.get_running_loop()
        return loop.run_in_executor(_pool(), self.commit_blocking, sender, recipients)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        n = int(os.environ.get("PYQMAIL_SMTP_THREADS", "64"))
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="qq-commit")
    return _POOL


class BlockingSubmitter(Protocol):
    """A Submitter whose submissions also commit without an event loop."""

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission: ...
