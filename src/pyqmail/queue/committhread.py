"""Group commit for an event loop in one thread of its own process (the thread committer).

The in-process writer's submissions (queue/submit.py) commit from an event loop through
here: ``COMMIT_THREAD.submit`` queues a message and returns a future for its
:class:`~pyqmail.queue.contract.Reply`; one thread takes everything queued, commits it
with :func:`~pyqmail.queue.writer.commit_many` (grouped by writer, so the fsyncs of a
batch are shared), and resolves the batch's futures with one call into each loop. The
thread is woken only when it waits: while it commits, new messages gather for the next
batch. Each message's reply still comes only after its own commit.

The SMTP listener normally streams its messages to a committer process instead
(queue/committer.py), where the file work does not compete with the loop for the GIL;
this thread serves it under ``PYQMAIL_SMTP_COMMIT=thread``, and any other caller that
awaits an in-process submission's commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence

from pyqmail.queue import codes
from pyqmail.queue.contract import QueueError, Reply
from pyqmail.queue.writer import Pending, commit_many

log = logging.getLogger("pyqmail.queue")

_Job = tuple[Pending, bytes, Sequence[bytes], "asyncio.Future[Reply]"]
_Done = tuple["asyncio.Future[Reply]", Reply]


class CommitThread:
    """One thread committing in-process messages in batches (module docstring)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[tuple[asyncio.AbstractEventLoop, _Job]] = deque()
        self._waiting = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def submit(
        self, loop: asyncio.AbstractEventLoop, p: Pending, sender: bytes, rcpts: Sequence[bytes]
    ) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = loop.create_future()
        if self._pid != os.getpid():  # a forked child: the parent's thread is not here
            self._reset()
        with self._cond:
            self._jobs.append((loop, (p, sender, rcpts, fut)))
            if self._thread is None:
                # Not a daemon: at exit the batch in hand is finished, not cut short.
                self._thread = threading.Thread(target=self._run, name="smtpq-commit")
                self._thread.start()
            elif self._waiting:
                self._cond.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    if not threading.main_thread().is_alive():
                        self._thread = None
                        return  # interpreter exit: every taken batch has finished
                    self._waiting = True
                    self._cond.wait(0.5)
                self._waiting = False
                batch = list(self._jobs)
                self._jobs.clear()
            by_loop: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
            try:
                results = self._commit(batch)
            except Exception:  # never let the thread die: every later message would hang
                log.exception("committer failed")
                results = []
                for loop, (p, _s, _r, fut) in batch:
                    with contextlib.suppress(Exception):
                        p.abort()
                    results.append((loop, (fut, Reply(codes.INTERNAL_BUG, p.qp))))
            for loop, done in results:
                by_loop.setdefault(loop, []).append(done)
            for loop, dones in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(_resolve, dones)

    @staticmethod
    def _commit(
        batch: list[tuple[asyncio.AbstractEventLoop, _Job]],
    ) -> list[tuple[asyncio.AbstractEventLoop, _Done]]:
        out: list[tuple[asyncio.AbstractEventLoop, _Done]] = []
        groups: dict[int, list[tuple[asyncio.AbstractEventLoop, _Job]]] = {}
        for entry in batch:
            groups.setdefault(id(entry[1][0]._w), []).append(entry)
        for group in groups.values():
            try:
                results = commit_many([(p, s, r) for _, (p, s, r, _f) in group])
            except Exception:
                log.exception("queue commit failed")
                for _, (p, _s, _r, _f) in group:
                    with contextlib.suppress(Exception):
                        p.abort()
                results = [QueueError(codes.INTERNAL_BUG)] * len(group)
            for (loop, (p, _s, _r, fut)), res in zip(group, results, strict=True):
                if isinstance(res, QueueError):
                    reply = Reply.of(res, p.qp)
                else:
                    reply = Reply(codes.OK, p.qp, res)
                out.append((loop, (fut, reply)))
        return out


COMMIT_THREAD = CommitThread()  # one per process, shared by every listener in it


def _resolve(done: list[_Done]) -> None:
    for fut, reply in done:
        if not fut.done():
            fut.set_result(reply)
