"""Direct delivery: a new all-local message delivered straight from todo/N.

pyqmail's shortcut past qmail-send's preprocessing for the commonest local message: when
every recipient of a new message is local (at most DIRECT_MAX_RCPTS of them) and fewer
than DIRECT_PER_SLOT messages per concurrencylocal slot are already being delivered this
way, preprocessing writes no info/local files for it (preprocess.py asks ``qualifies``)
and the scheduler delivers it from todo/N at once, in its ordinary local slots.

Invariants:

- todo/N stays until every recipient has a result, so a crash meanwhile only means the
  message is preprocessed again at start (delivered twice at worst: the window qmail has
  between a delivery and its mark). Its number is *held* (``num in deliveries``) from
  the end of its preprocessing batch until todo/N is gone, so no todo scan takes it again.
- every delivery succeeded: ``end msg``, then todo/N, intd/N and mess/S/N are removed
  (queue/clean.py ``finish_direct``, todo first; batched off the event loop), or the
  cleaner is asked ``todo`` then ``foop``.
- otherwise (a deferral or a failure): info and local are written with the results so
  far (``D`` marks), fsynced, todo removed, and the message goes the normal way.

:class:`DirectDeliveries` keeps the held numbers and the removal batch; the scheduler
runs the deliveries themselves and is told by ``settle`` what is left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import os
from collections.abc import Callable, Coroutine

from pyqmail.durable import fsync_all, fsync_dir
from pyqmail.queue import clean, records
from pyqmail.queue.clean import Cleaner
from pyqmail.queue.layout import QueuePaths
from pyqmail.send.job import Job, Record
from pyqmail.send.log import SendLog
from pyqmail.send.schedule import LOCAL, nextretry
from pyqmail.send.todo import encode

# Messages delivered straight from todo, per concurrencylocal slot. 16 keeps a burst of
# 50 SMTP sessions on this path (4 sent a quarter of it through info/local files, each
# message then costing two more files and their journal commit); a held message costs
# only its Job in memory.
DIRECT_PER_SLOT = 16
DIRECT_MAX_RCPTS = 16  # more local recipients than this always go through info/local
# Finished messages' files are removed in a worker thread: wait this long for more to
# finish (unless this many already have), so one hand-off removes several.
REMOVAL_GATHER = 0.01
REMOVAL_BATCH = 32

Spawn = Callable[[Coroutine[None, None, None]], None]


def qualifies(routed: list[tuple[int, str]]) -> bool:
    """May a message with these (channel, address) recipients be delivered directly?"""
    return bool(routed) and len(routed) <= DIRECT_MAX_RCPTS and all(c == LOCAL for c, _ in routed)


class After(enum.Enum):
    """What the scheduler does once ``settle`` has handled a direct delivery's results."""

    NOTHING = 0  # finished and removed (or todo/N left for the next scan)
    REQUEUE = 1  # now in info/local with recipients left: schedule it at job.retry
    MESSDONE = 2  # now in info (with bounce/N): finish it as any message


class DirectDeliveries:
    """The messages being delivered straight from todo, by number."""

    def __init__(
        self,
        paths: QueuePaths,
        log: SendLog,
        *,
        enabled: bool,
        cleaner: Cleaner | None,
        spawn: Spawn,
        on_release: Callable[[int], None],
    ) -> None:
        self.paths = paths
        self.log = log
        self.enabled = enabled
        self.cleaner = cleaner
        self._spawn = spawn  # runs a coroutine as one of the scheduler's tracked jobs
        self._on_release = on_release
        self._held: dict[int, Job | None] = {}
        self._finished: list[int] = []  # done, files not yet removed
        self._draining = False

    def __contains__(self, num: int) -> bool:
        return num in self._held

    def budget(self, concurrency_local: int) -> int:
        """How many more messages may be taken for direct delivery now (<= 0: none)."""
        if not self.enabled:
            return 0
        return DIRECT_PER_SLOT * concurrency_local - len(self._held)

    def hold(self, num: int) -> None:
        """Reserve ``num`` as soon as its preprocessing batch ends (before ``start``)."""
        self._held[num] = None

    def start(self, num: int, sender: str, recipients: list[str], now: int) -> Job:
        """The job that delivers a held message from todo (no channel file: fd -1)."""
        job = Job(
            LOCAL,
            num,
            sender,
            nextretry(now, now, LOCAL),
            False,
            -1,
            [Record(-1, r) for r in recipients],
            birth=now,
        )
        self._held[num] = job
        return job

    def drop(self, num: int) -> None:
        """A cancelled delivery: forget the number; todo/N remains for the next start."""
        self._held.pop(num, None)

    def release(self, num: int) -> None:
        """Forget a direct delivery whose todo/N is gone. Its mess inode may already be
        reused by a new message whose notify was held back while the number was held."""
        self._held.pop(num, None)
        self._on_release(num)

    async def settle(self, job: Job) -> After:
        """Every delivery of ``job`` has reported: finish the message or fall back."""
        num = job.num
        if not job.left and not os.path.exists(self.paths.name("bounce", num)):
            self.log.end_msg(num)
            # The number stays held until todo/N is gone, so no scan takes it again.
            if self.cleaner is None:
                self._queue_removal(num)
                return After.NOTHING
            try:
                if await self.cleaner("todo", num):
                    await self.cleaner("foop", num)
            finally:
                self.release(num)
            return After.NOTHING
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._fallback, job):
            self._held.pop(num, None)
            return After.NOTHING  # todo/N remains; the next todo scan starts it again
        if self.cleaner is not None:
            await self.cleaner("todo", num)
        self.release(num)
        return After.REQUEUE if job.left else After.MESSDONE

    def _fallback(self, job: Job) -> bool:
        """Worker thread: write info and local (with D marks) durably, then clean todo."""
        num = job.num
        info, local = self.paths.name("info", num), self.paths.name("local", num)
        fds: list[int] = []
        try:
            fds.append(records.create_unsynced(info, records.format_info(encode(job.sender))))
            if job.left:
                data = records.format_channel(
                    [encode(r.recipient) for r in job.records], [r.done for r in job.records]
                )
                fds.append(records.create_unsynced(local, data))
            # both at once: one journal commit, not one per file
            err = next(
                (e for e in fsync_all([functools.partial(os.fsync, fd) for fd in fds]) if e), None
            )
            if err is not None:
                raise err
            fsync_dir(os.path.dirname(info))
            fsync_dir(os.path.dirname(local))
        except OSError as e:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds = []
            self.log.warning(f"trouble writing info/local for {num}: {e.strerror}; will retry")
            with contextlib.suppress(OSError):
                clean.remove_leftovers(self.paths, num)
            return False
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.cleaner is None:
            try:
                clean.clean_todo(self.paths, num)
            except OSError as e:
                self.log.unlink_warning(e)
        return True

    def _queue_removal(self, num: int) -> None:
        """Remove a finished message's files off the event loop (an unlink may wait for
        the disk), many per worker-thread hand-off when busy."""
        self._finished.append(num)
        if not self._draining:
            self._draining = True
            self._spawn(self._drain_removals())

    async def _drain_removals(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._finished:
                if len(self._finished) < REMOVAL_BATCH:
                    # not urgent (the mail is delivered): gather more per thread hand-off
                    await asyncio.sleep(REMOVAL_GATHER)
                batch, self._finished = self._finished, []
                try:
                    await loop.run_in_executor(None, self._remove_finished, batch)
                finally:
                    for num in batch:
                        self.release(num)
        finally:
            self._draining = False

    def _remove_finished(self, nums: list[int]) -> None:
        """Worker thread: the messages are done; todo first, so that once it is gone
        nothing delivers the message again, then intd and mess."""
        for num in nums:
            try:
                clean.finish_direct(self.paths, num)
            except OSError as e:
                self.log.unlink_warning(e)
