"""qmail-send as an asyncio scheduler: todo -> info/local/remote -> deliveries -> done.

Owns the life of a queued message after ``todo/N`` exists (queue.md 4-6, send.md):

- preprocessing: woken in-process by the queue writer's ``notify`` (thread-safe), by a
  byte in ``lock/trigger`` and by a scan at start and every 1500 s; recipients are routed
  (todo.py), ``info``, ``local`` and ``remote`` are written O_EXCL and fsynced with their
  directories, and only then are ``intd/N`` and ``todo/N`` removed. Entries are handled in
  batches in a worker thread so the fsyncs of many messages share a journal commit.
- delivery: one min-heap per channel (schedule.py), concurrencylocal/remote delivery slots
  (0 holds the channel), one job per message and channel, each ``T`` record one delivery
  (remote recipients of one host with the same sender share one SMTP transaction, each
  still logged and numbered as its own delivery), results marked by overwriting ``T`` with
  ``D`` in place, deferrals retried at ``nextretry``; a dying job's deferrals fail.
- completion: a QSBMF bounce queued through the submitter with origin "bounce", double
  and triple bounces, ``end msg``, then info, mess and intd removed.
- start-up: exclusive flock on ``lock/sendmutex``; the schedule rebuilt from info/local/remote
  (the channel file's mtime is its next try), O(n log n) once; O(log n) per event after.
- signals (wired by the daemon): ``reload`` (HUP: routing, concurrency, lifetime, bounce
  settings), ``alarm`` (ALRM: everything due now), ``stop`` (TERM: no new deliveries,
  in-flight ones awaited up to a bound, next-try times written as mtimes).

Agents are plain async callables so the daemon passes the real LocalSpawner/RemoteAgent
and unit tests pass small functions; an agent that raises counts as a temporary failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pyqmail.control import Control
from pyqmail.durable import fsync_dir, write_all
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.queue import clean, records
from pyqmail.queue.layout import QueuePaths, msgnum
from pyqmail.send.bounce import bounce_chunks, bounce_envelope, dying_text, paragraph
from pyqmail.send.log import SendLog
from pyqmail.send.schedule import (
    CHANNEL_NAMES,
    CHANNELS,
    LOCAL,
    REMOTE,
    Entry,
    PrioQueue,
    dying,
    nextretry,
)
from pyqmail.send.todo import Routing, TodoError, decode, encode, parse_todo, verp_sender

LocalDeliver = Callable[[Path, str, str], Awaitable[Outcome]]
# qmail-clean's requests, for a scheduler that may not unlink queue files itself (root mode):
# ("todo", N) removes intd/N then todo/N; ("foop", N) removes intd/N and mess/S/N.
Cleaner = Callable[[str, int], Awaitable[bool]]
RemoteDeliver = Callable[[Path, str, list[str]], Awaitable[list[Outcome]]]

TODO_SCAN_INTERVAL = 1500.0  # qmail-send: todo scanned at least this often
SYSERR_RETRY = 123.0  # qmail-send: an item that hit a system error is retried this much later
TODO_BATCH = 256
REMOTE_BATCH = 50  # recipients of one host in one SMTP transaction
FAST_PER_SLOT = 4  # messages delivered straight from todo, per concurrencylocal slot
FAST_MAX_RCPTS = 16  # more local recipients than this always go through info/local
REPORTMAX = 10000  # qmail-send truncates a delivery report to this many bytes
_TEXT_INTERNAL = "Sorry, an internal error occurred while delivering. (#4.3.0)\n"


class StartError(Exception):
    """qmail-send cannot start; the text is qmail's ``alert: cannot start: ...`` reason."""


class PendingLike(Protocol):
    qp: int

    def write(self, data: bytes) -> None: ...
    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> int: ...
    def abort(self) -> None: ...


class SubmitterLike(Protocol):
    def begin(self, *, origin: str = ..., received: bytes = ...) -> PendingLike: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """The control values the scheduler reads, snapshotted at start and on HUP."""

    routing: Routing
    concurrency: tuple[int, int]
    queuelifetime: int
    bouncefrom: str
    bouncehost: str
    doublebounce: str

    @classmethod
    def from_control(cls, ctl: Control) -> Settings:
        return cls(
            Routing.from_control(ctl),
            (max(0, ctl.concurrencylocal), max(0, ctl.concurrencyremote)),
            ctl.queuelifetime,
            ctl.bouncefrom,
            ctl.bouncehost,
            ctl.doublebounceto + "@" + ctl.doublebouncehost,
        )


@dataclass(slots=True)
class _Pre:
    """The outcome of preprocessing one todo entry (worker thread -> loop)."""

    num: int
    size: int = 0
    sender: str = ""
    qp: int | None = None
    uid: int | None = None
    channels: int = 0  # bit mask of channels with a file
    warning: str = ""
    fast: list[str] | None = None  # local recipients to deliver straight from todo


@dataclass(slots=True)
class _Record:
    offset: int  # of the T byte in the channel file; -1 for a direct delivery
    recipient: str
    done: bool = False


@dataclass
class _Job:
    """One message on one channel, for one pass through its file."""

    channel: int
    num: int
    sender: str
    retry: int
    dying: bool
    fd: int
    records: list[_Record]
    left: int = 0  # T records still T after this pass
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class _Paths:
    """QueuePaths as plain strings: the scheduler builds several per message (and passes
    these to queue/clean.py and queue/records.py, which take str or Path)."""

    def __init__(self, qp: QueuePaths) -> None:
        self.root = str(qp.root)
        self.n = qp.nsplit

    def info(self, n: int) -> str:
        return f"{self.root}/info/{n % self.n}/{n}"

    def local(self, n: int) -> str:
        return f"{self.root}/local/{n % self.n}/{n}"

    def remote(self, n: int) -> str:
        return f"{self.root}/remote/{n % self.n}/{n}"

    def chan(self, c: int, n: int) -> str:
        return self.local(n) if c == LOCAL else self.remote(n)

    def mess(self, n: int) -> str:
        return f"{self.root}/mess/{n % self.n}/{n}"

    def todo(self, n: int) -> str:
        return f"{self.root}/todo/{n}"

    def intd(self, n: int) -> str:
        return f"{self.root}/intd/{n}"

    def bounce(self, n: int) -> str:
        return f"{self.root}/bounce/{n}"


class Scheduler:
    """qmail-send's job, in-process. Construct, ``await start()``, and ``await stop()``."""

    def __init__(
        self,
        home: Home,
        control: Callable[[], Control],
        *,
        local: LocalDeliver,
        remote: RemoteDeliver,
        submitter: SubmitterLike | None = None,
        log: SendLog | None = None,
        clock: Callable[[], float] = time.time,
        term_timeout: float = 60.0,
        scan_interval: float = TODO_SCAN_INTERVAL,
        use_trigger: bool = True,
        direct: bool = True,
        cleaner: Cleaner | None = None,
    ) -> None:
        self.home = home
        self.paths = QueuePaths(home.queue)
        self._p = _Paths(self.paths)
        self._control = control
        self._local = local
        self._remote = remote
        self.submitter = submitter
        self.log = log if log is not None else SendLog()
        self._clock = clock
        self._term_timeout = term_timeout
        self._scan_interval = scan_interval
        self._use_trigger = use_trigger
        self._direct = direct
        self._cleaner = cleaner
        self._fast: dict[int, _Job | None] = {}  # numbers held by direct deliveries
        self._finished: list[int] = []  # direct deliveries done, files not yet removed
        self._in_batch: set[int] = set()  # numbers being preprocessed in the worker thread
        self._renotify: set[int] = set()  # notified while busy: look again when free
        self._draining = False
        self.settings = Settings.from_control(control())
        self._heaps = [PrioQueue(), PrioQueue()]
        self._used = [0, 0]  # deliveries in flight per channel
        self._active = [0, 0]  # jobs open per channel
        self._wake = [asyncio.Event(), asyncio.Event()]
        self._pending_chan: dict[int, int] = {}  # num -> bit mask of channels not finished
        self._todo: set[int] = set()
        self._todo_event = asyncio.Event()
        self._todo_scan_wanted = True
        self._preprocessing = False
        self._delivery_id = 0
        self._exiting = False
        self._tasks: list[asyncio.Task[None]] = []
        self._jobs: set[asyncio.Task[None]] = set()
        self._done_retry: set[asyncio.TimerHandle] = set()
        self._lock_fd: int | None = None
        self._trigger_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.idle = asyncio.Event()  # set whenever no todo, job or delivery is outstanding
        self.stats = {"delivered": 0, "deferred": 0, "failed": 0, "bounced": 0}

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Take the mutex, rebuild the schedule from the queue, and start working."""
        self._loop = asyncio.get_running_loop()
        self._lock()
        loop = self._loop
        entries, done = await loop.run_in_executor(None, self._scan_info)
        for c in CHANNELS:
            self._heaps[c] = PrioQueue.from_entries(entries[c])
        self._tasks = [
            asyncio.create_task(self._guarded("todo", self._todo_loop), name="send-todo"),
            *(
                asyncio.create_task(
                    self._guarded(CHANNEL_NAMES[c], functools.partial(self._channel_loop, c)),
                    name=f"send-{c}",
                )
                for c in CHANNELS
            ),
        ]
        if self._use_trigger:
            self._open_trigger()
        for num in done:
            self._messdone(num)
        self._update_idle()

    def _lock(self) -> None:
        try:
            fd = os.open(self.paths.sendmutex, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StartError("unable to open mutex") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StartError("qmail-send is already running") from e
        self._lock_fd = fd

    def _open_trigger(self) -> None:
        # O_RDWR keeps a writer open, so the FIFO never reports EOF between pokes.
        try:
            fd = os.open(self.paths.trigger, os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            self.log.warning(f"unable to open lock/trigger: {e.strerror}")
            return
        self._trigger_fd = fd
        assert self._loop is not None
        self._loop.add_reader(fd, self._on_trigger)

    def _on_trigger(self) -> None:
        assert self._trigger_fd is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._trigger_fd, 4096):
                pass
        self._todo_scan_wanted = True
        self._todo_event.set()

    async def stop(self) -> None:
        """TERM: start nothing new, await in-flight deliveries (bounded), persist next tries."""
        if self._exiting:
            return
        self._exiting = True
        self._log_status()
        for c in CHANNELS:
            self._wake[c].set()
        self._todo_event.set()
        if self._jobs:
            _, pending = await asyncio.wait(set(self._jobs), timeout=self._term_timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for h in self._done_retry:
            h.cancel()
        if self._trigger_fd is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._trigger_fd)
            os.close(self._trigger_fd)
            self._trigger_fd = None
        assert self._loop is not None
        await self._loop.run_in_executor(None, self._persist_schedule)
        self.log.exiting()
        self.log.flush()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _persist_schedule(self) -> None:
        """Each pending channel file's atime/mtime := its next try (read back at start)."""
        for c in CHANNELS:
            path = self.paths.local if c == LOCAL else self.paths.remote
            for e in self._heaps[c]:
                with contextlib.suppress(OSError):
                    os.utime(path(e.num), (e.when, e.when))

    # ---------------------------------------------------------------- signals

    def notify(self, num: int) -> None:
        """A new todo/N exists (queue writer callback; safe from any thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._add_todo(num)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: the scan finds it later
                loop.call_soon_threadsafe(self._add_todo, num)

    def _add_todo(self, num: int) -> None:
        """todo/N wants preprocessing. If N is busy (in the batch being preprocessed, or a
        direct delivery still holding the number), remember it: when N is free again and
        todo/N still exists, it is a new message that reused the inode."""
        if num in self._fast or num in self._in_batch:
            self._renotify.add(num)
            return
        self._todo.add(num)
        self.idle.clear()
        self._todo_event.set()

    def _number_free(self, num: int) -> None:
        """N left the batch or the direct deliveries: take up a notify that was held back."""
        if num in self._renotify and num not in self._fast and num not in self._in_batch:
            self._renotify.discard(num)
            if os.path.exists(self._p.todo(num)):
                self._add_todo(num)

    def alarm(self) -> None:
        """ALRM: every queued message is due now."""
        now = self._clock()
        for c in CHANNELS:
            self._heaps[c].reschedule_all(now)
            self._wake[c].set()

    def reload(self) -> bool:
        """HUP: re-read the controls; False (and the old ones kept) if they cannot be read."""
        try:
            self.settings = Settings.from_control(self._control())
        except Exception as e:  # ControlError or a broken file: keep working with the old
            self.log.alert(f"unable to reread controls: {e}")
            return False
        for c in CHANNELS:
            self._wake[c].set()
        return True

    # ---------------------------------------------------------------- start-up scan

    def _scan_info(self) -> tuple[list[list[Entry]], list[int]]:
        """(per-channel entries at their files' mtimes, messages with no channel file left)."""
        entries: list[list[Entry]] = [[], []]
        done: list[int] = []
        todo = set()
        with contextlib.suppress(FileNotFoundError):
            todo = {n for n in map(msgnum, os.listdir(self.paths.dir("todo"))) if n is not None}
        for d in self.paths.split_dirs("info"):
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                num = msgnum(name)
                if num is None or num in todo:
                    continue
                mask = 0
                for c, path in ((LOCAL, self.paths.local(num)), (REMOTE, self.paths.remote(num))):
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    entries[c].append(Entry(st.st_mtime, num))
                    mask |= 1 << c
                if mask:
                    self._pending_chan[num] = mask
                else:
                    done.append(num)
        return entries, done

    # ---------------------------------------------------------------- todo

    async def _guarded(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a main loop; an unexpected error is logged and the loop restarted, so one
        bad message cannot stop all processing (qmail-send would sleep and carry on)."""
        while not self._exiting:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log.warning(f"internal error in {name}, restarting it: {e!r}")
                self._todo_scan_wanted = True
                self._preprocessing = False
                await asyncio.sleep(1.0)

    async def _todo_loop(self) -> None:
        assert self._loop is not None
        loop = self._loop
        next_scan = 0.0
        while not self._exiting:
            now = time.monotonic()
            if self._todo_scan_wanted or now >= next_scan:
                self._todo_scan_wanted = False
                next_scan = now + self._scan_interval
                self._preprocessing = True
                try:
                    names = await loop.run_in_executor(None, os.listdir, self._p.root + "/todo")
                except OSError as e:
                    self.log.alert(f"unable to opendir todo: {e.strerror}")
                    names = []
                finally:
                    self._preprocessing = False
                for name in names:
                    n = msgnum(name)
                    if n is not None:
                        self._add_todo(n)
            if not self._todo:
                self._update_idle()
                self._todo_event.clear()
                if self._todo or self._todo_scan_wanted:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._todo_event.wait(), max(0.0, next_scan - time.monotonic())
                    )
                continue
            batch = sorted(self._todo)[:TODO_BATCH]
            self._todo.difference_update(batch)
            routing = self.settings.routing
            fast_budget = self._fast_limit() - len(self._fast)
            self._preprocessing = True
            self._in_batch.update(batch)
            try:
                results = await loop.run_in_executor(
                    None, self._preprocess_batch, batch, routing, fast_budget
                )
            except BaseException:
                self._in_batch.difference_update(batch)
                raise
            finally:
                self._preprocessing = False
            for pre in results:  # direct deliveries hold their number from here on
                if not pre.warning and pre.fast is not None:
                    self._fast[pre.num] = None
            self._in_batch.difference_update(batch)
            for num in batch:
                self._number_free(num)
            now_s = self._clock()
            if self._cleaner is not None:
                for pre in results:
                    if not pre.warning and pre.fast is None:
                        await self._cleaner("todo", pre.num)
            for pre in results:
                if pre.warning:
                    self.log.warning(pre.warning)
                    continue
                self.log.new_msg(pre.num)
                self.log.info_msg(pre.num, pre.size, pre.sender, pre.qp, pre.uid)
                if pre.fast is not None:
                    self._start_fast(pre)
                elif pre.channels:
                    self._pending_chan[pre.num] = pre.channels
                    for c in CHANNELS:
                        if pre.channels & (1 << c):
                            self._heaps[c].push(now_s, pre.num)
                            self._wake[c].set()
                else:
                    self._messdone(pre.num)

    def _fast_limit(self) -> int:
        """How many messages may be delivered straight from todo at once (0: never)."""
        if not self._direct:
            return 0
        return FAST_PER_SLOT * self.settings.concurrency[LOCAL]

    def _preprocess_batch(self, nums: list[int], routing: Routing, fast_budget: int) -> list[_Pre]:
        """Worker thread: write info/local/remote for each, fsync, then remove the todos.

        Up to ``fast_budget`` messages whose recipients are all local get no files at all:
        they are delivered straight from todo (see ``_start_fast``).
        """
        results = []
        for n in nums:
            pre = self._preprocess(n, routing, fast_budget > 0)
            if pre.fast is not None:
                fast_budget -= 1
            results.append(pre)
        ok = [p for p in results if not p.warning and p.fast is None]
        dirs: set[str] = set()
        for p in ok:
            dirs.add(os.path.dirname(self._p.info(p.num)))
            if p.channels & 1:
                dirs.add(os.path.dirname(self._p.local(p.num)))
            if p.channels & 2:
                dirs.add(os.path.dirname(self._p.remote(p.num)))
        try:
            for d in dirs:
                fsync_dir(d)
        except OSError as e:
            for p in ok:
                p.warning = f"trouble fsyncing message {p.num}: {e.strerror}; will retry"
            return results
        if self._cleaner is None:
            for p in ok:
                self._clean_todo(p.num)
        return [p for p in results if p.warning != "gone"]

    def _clean_todo(self, num: int) -> None:
        # qmail-clean's "todo/N": intd first, then todo (the message is now in info/).
        try:
            clean.clean_todo(self._p, num)
        except OSError as e:
            self._unlink_warning(e)

    def _unlink_warning(self, e: OSError) -> None:
        self.log.warning(f"unable to unlink {e.filename}: {e.strerror}")

    def _preprocess(self, num: int, routing: Routing, fast_ok: bool) -> _Pre:
        pre = _Pre(num)
        p = self._p
        try:
            with open(p.todo(num), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            pre.warning = "gone"  # already handled (a scan raced a notify)
            return pre
        except OSError as e:
            pre.warning = f"unable to open todo/{num}: {e.strerror}"
            return pre
        try:
            env = parse_todo(data)
        except TodoError as e:
            pre.warning = f"{e} in todo/{num}"
            return pre
        try:
            pre.size = os.stat(p.mess(num)).st_size
        except OSError as e:
            pre.warning = f"unable to stat mess/{num % p.n}/{num}: {e.strerror}"
            return pre
        pre.sender, pre.qp, pre.uid = env.sender, env.qp, env.uid
        routed = [routing.route(rcpt) for rcpt in env.recipients]
        targets = (p.info(num), p.local(num), p.remote(num))
        try:
            for path in targets:  # leftovers of an earlier, interrupted attempt
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        except OSError as e:
            pre.warning = f"unable to unlink leftovers of {num}: {e.strerror}"
            return pre
        if (
            fast_ok
            and routed
            and len(routed) <= FAST_MAX_RCPTS
            and all(c == LOCAL for c, _ in routed)
        ):
            pre.fast = [a for _, a in routed]
            return pre
        chans: list[list[bytes]] = [[], []]
        for c, addr in routed:
            chans[c].append(encode(addr))
        try:
            records.write_info(targets[0], encode(env.sender), sync_dir=False)
            for c in CHANNELS:
                if chans[c]:
                    records.write_channel(targets[1 + c], chans[c], sync_dir=False)
                    pre.channels |= 1 << c
        except OSError as e:
            pre.warning = f"trouble writing info/local/remote for {num}: {e.strerror}"
        return pre

    # ---------------------------------------------------------------- direct delivery

    def _start_fast(self, pre: _Pre) -> None:
        """Deliver a new all-local message straight from todo, without info/local files.

        todo/N stays until every recipient has a result, so a crash meanwhile only means
        the message is preprocessed again at start (delivered twice at worst, the window
        qmail has between a delivery and its mark). If every delivery succeeds, the message
        is finished at once; otherwise info and local are written with the results so far
        (``D`` marks), fsynced, todo removed, and the rest goes the normal way.
        """
        assert pre.fast is not None
        now = int(self._clock())
        job = _Job(
            LOCAL,
            pre.num,
            pre.sender,
            nextretry(now, now, LOCAL),
            False,
            -1,
            [_Record(-1, r) for r in pre.fast],
        )
        self._fast[pre.num] = job
        task = asyncio.create_task(self._fast_job(job))
        self._jobs.add(task)
        task.add_done_callback(self._job_finished)

    async def _fast_job(self, job: _Job) -> None:
        self._active[LOCAL] += 1
        try:
            await self._run_deliveries(job)
        except asyncio.CancelledError:
            self._fast.pop(job.num, None)  # todo/N remains: handled again at the next start
            raise
        finally:
            self._active[LOCAL] -= 1
            self._wake[LOCAL].set()
        assert self._loop is not None
        num = job.num
        if not job.left and not os.path.exists(self._p.bounce(num)):
            self.log.end_msg(num)
            # The number stays in _fast until todo/N is gone, so no scan takes it again.
            if self._cleaner is None:
                self._queue_removal(num)
                return
            try:
                if await self._cleaner("todo", num):
                    await self._cleaner("foop", num)
            finally:
                self._release_fast(num)
            return
        ok = await self._loop.run_in_executor(None, self._fast_fallback, job)
        if not ok:
            self._fast.pop(num, None)
            return  # todo/N remains; the next todo scan starts it again
        if self._cleaner is not None:
            await self._cleaner("todo", num)
        self._release_fast(num)
        if job.left:
            self._pending_chan[num] = 1 << LOCAL
            self._heaps[LOCAL].push(job.retry, num)
            self._wake[LOCAL].set()
        else:
            self._messdone(num)

    def _release_fast(self, num: int) -> None:
        """Forget a direct delivery. Its mess inode may already be reused by a new message
        whose notify was held back while the number was reserved."""
        self._fast.pop(num, None)
        self._number_free(num)

    def _queue_removal(self, num: int) -> None:
        """Remove a finished direct delivery's files off the event loop (an unlink may wait
        for the disk), many per worker-thread hand-off when busy."""
        self._finished.append(num)
        if not self._draining:
            self._draining = True
            task = asyncio.create_task(self._drain_removals())
            self._jobs.add(task)
            task.add_done_callback(self._job_finished)

    async def _drain_removals(self) -> None:
        assert self._loop is not None
        try:
            while self._finished:
                batch, self._finished = self._finished, []
                try:
                    await self._loop.run_in_executor(None, self._remove_finished, batch)
                finally:
                    for num in batch:
                        self._release_fast(num)
        finally:
            self._draining = False

    def _remove_finished(self, nums: list[int]) -> None:
        """Worker thread: directly delivered messages are done; todo first, so that once it
        is gone nothing delivers the message again, then intd and mess."""
        for num in nums:
            try:
                clean.finish_direct(self._p, num)
            except OSError as e:
                self._unlink_warning(e)

    def _fast_fallback(self, job: _Job) -> bool:
        """Worker thread: write info and local (with D marks) durably, then clean todo."""
        num = job.num
        try:
            records.write_info(self._p.info(num), encode(job.sender), sync_dir=False)
            if job.left:
                records.write_channel(
                    self._p.local(num),
                    [encode(r.recipient) for r in job.records],
                    done=[r.done for r in job.records],
                    sync_dir=False,
                )
            fsync_dir(os.path.dirname(self._p.info(num)))
            fsync_dir(os.path.dirname(self._p.local(num)))
        except OSError as e:
            self.log.warning(f"trouble writing info/local for {num}: {e.strerror}; will retry")
            for path in (self._p.info(num), self._p.local(num)):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return False
        if self._cleaner is None:
            self._clean_todo(num)
        return True

    # ---------------------------------------------------------------- channels

    async def _channel_loop(self, c: int) -> None:
        heap = self._heaps[c]
        wake = self._wake[c]
        while not self._exiting:
            wake.clear()
            head = heap.peek()
            limit = self.settings.concurrency[c]
            if head is None or self._used[c] >= limit or self._active[c] >= limit:
                self._update_idle()
                await wake.wait()
                continue
            delay = head.when - self._clock()
            if delay > 0:
                self._update_idle()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(delay, 86400.0))
                continue
            heap.pop()
            self._start_job(c, head.num)

    def _start_job(self, c: int, num: int) -> None:
        self._active[c] += 1
        task = asyncio.create_task(self._job(c, num))
        self._jobs.add(task)
        task.add_done_callback(self._job_finished)

    def _job_finished(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning(f"internal error in a delivery job: {task.exception()!r}")
        self._update_idle()

    def _retry_later(self, c: int, num: int, delay: float = SYSERR_RETRY) -> None:
        self._heaps[c].push(self._clock() + delay, num)
        self._wake[c].set()

    def _open_job(self, c: int, num: int) -> _Job | None:
        recent = int(self._clock())
        info = self._p.info(num)
        try:
            with open(info, "rb") as f:
                birth = int(os.fstat(f.fileno()).st_mtime)
                raw = f.read()
        except OSError as e:
            self.log.warning(f"unable to open {info}: {e.strerror}")
            return None
        sender = decode(records.parse_info(raw, strict=True))
        path = self._p.chan(c, num)
        try:
            fd, data = records.open_channel(path)
        except OSError as e:
            self.log.warning(f"unable to open {path}: {e.strerror}")
            return None
        recs: list[_Record] = []
        for pos, kind, addr in records.iter_channel(data):
            if kind == b"T":
                recs.append(_Record(pos, decode(addr)))
            elif kind != b"D":
                self.log.warning(f"unknown record type in {path}")
        s = self.settings
        return _Job(
            c,
            num,
            sender,
            nextretry(birth, recent, c),
            dying(birth, recent, s.queuelifetime),
            fd,
            recs,
        )

    async def _job(self, c: int, num: int) -> None:
        try:
            await self._job_body(c, num)
        finally:
            self._active[c] -= 1
            self._wake[c].set()

    async def _job_body(self, c: int, num: int) -> None:
        job = self._open_job(c, num)
        if job is None:
            self._retry_later(c, num)
            return
        try:
            await self._run_deliveries(job)
        finally:
            os.close(job.fd)
        self._job_done(job)

    async def _run_deliveries(self, job: _Job) -> None:
        c = job.channel
        for group in self._groups(job):
            await self._acquire(c)
            if self._exiting:
                self._release(c)
                job.left += len(group)
                continue
            job.tasks.append(asyncio.create_task(self._deliver(job, group)))
        if job.tasks:
            await asyncio.gather(*job.tasks)

    def _groups(self, job: _Job) -> Iterable[list[_Record]]:
        if job.channel == LOCAL or job.sender.endswith("-@[]"):
            return [[r] for r in job.records]
        by_host: dict[str, list[list[_Record]]] = {}
        for r in job.records:
            host = r.recipient[r.recipient.rfind("@") + 1 :].lower()
            lists = by_host.setdefault(host, [[]])
            if len(lists[-1]) >= REMOTE_BATCH:
                lists.append([])
            lists[-1].append(r)
        return [g for lists in by_host.values() for g in lists]

    async def _acquire(self, c: int) -> None:
        while self._used[c] >= self.settings.concurrency[c] and not self._exiting:
            self._wake[c].clear()
            await self._wake[c].wait()
        self._used[c] += 1
        self._log_status()

    def _release(self, c: int) -> None:
        self._used[c] -= 1
        self._wake[c].set()

    def _log_status(self) -> None:
        conc = self.settings.concurrency
        self.log.status((self._used[0], self._used[1]), conc, self._exiting)

    async def _deliver(self, job: _Job, group: list[_Record]) -> None:
        c = job.channel
        mess = Path(self._p.mess(job.num))
        ids = []
        for r in group:
            self._delivery_id += 1
            ids.append(self._delivery_id)
            self.log.starting(self._delivery_id, job.num, CHANNEL_NAMES[c], r.recipient)
        try:
            if c == LOCAL:
                r = group[0]
                sender = verp_sender(job.sender, r.recipient)
                outcomes = [await self._local(mess, sender, r.recipient)]
            else:
                sender = verp_sender(job.sender, group[0].recipient)
                outcomes = await self._remote(mess, sender, [r.recipient for r in group])
                if len(outcomes) != len(group):
                    outcomes = [Outcome.temp(_TEXT_INTERNAL)] * len(group)
        except asyncio.CancelledError:
            job.left += len(group)
            self._release(c)
            raise
        except Exception:
            outcomes = [Outcome.temp(_TEXT_INTERNAL)] * len(group)
        for did, r, out in zip(ids, group, outcomes, strict=True):
            self._record(job, did, r, out)
        self._release(c)
        self._log_status()

    def _record(self, job: _Job, did: int, rec: _Record, out: Outcome) -> None:
        status, text = out.status, out.text[:REPORTMAX]
        if status is Status.TEMP and job.dying:
            status, text = Status.PERM, dying_text(text)
        self.log.result(did, status.value, text)
        if status is Status.TEMP:
            self.stats["deferred"] += 1
            job.left += 1
            return
        if status is Status.PERM:
            self.stats["failed"] += 1
            shown = self.settings.routing.strip_virtual(rec.recipient)
            if not self._add_bounce(job.num, paragraph(shown, text)):
                job.left += 1  # not recorded: try the recipient again rather than lose it
                return
        else:
            self.stats["delivered"] += 1
        rec.done = True
        if job.fd < 0:
            return  # a direct delivery: the mark is kept in memory
        try:
            records.mark_done_fd(job.fd, rec.offset)
        except OSError as e:
            self.log.warning(
                f"trouble marking {CHANNEL_NAMES[job.channel]}/{job.num}: {e.strerror}; "
                "message will be delivered twice!"
            )

    def _add_bounce(self, num: int, para: bytes) -> bool:
        """Append a failure paragraph to bounce/N durably (it must not be lost)."""
        try:
            fd = os.open(self._p.bounce(num), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                write_all(fd, para)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self.log.alert("unable to append to bounce message; HELP! sleeping...")
            return False
        return True

    def _job_done(self, job: _Job) -> None:
        c, num = job.channel, job.num
        if job.left:
            self._heaps[c].push(job.retry if not self._exiting else self._clock(), num)
            self._wake[c].set()
            return
        path = self._p.chan(c, num)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warning(f"unable to unlink {path}: {e.strerror}")
            self._retry_later(c, num)
            return
        mask = self._pending_chan.get(num, 0) & ~(1 << c)
        if mask:
            self._pending_chan[num] = mask
        else:
            self._pending_chan.pop(num, None)
            self._messdone(num)

    # ---------------------------------------------------------------- completion

    def _messdone(self, num: int) -> None:
        """No channel file left: bounce if needed, log end msg, remove the message."""
        task = asyncio.create_task(self._messdone_async(num))
        self._jobs.add(task)
        task.add_done_callback(self._job_finished)

    async def _messdone_async(self, num: int) -> None:
        if os.path.exists(self._p.bounce(num)):
            assert self._loop is not None
            ok, qp = await self._loop.run_in_executor(None, self._inject_bounce, num)
            if qp is None:
                self.log.triple_bounce(num)
            elif qp >= 0:
                self.log.bounce_msg(num, qp)
            if not ok:
                self._schedule_messdone(num, SYSERR_RETRY)
                return
        self.log.end_msg(num)
        # info first: a crash after it leaves an unreferenced mess that recovery removes
        try:
            if self._cleaner is None:
                clean.finish_message(self._p, num)
                return
            clean.remove_info(self._p, num)
        except OSError as e:
            self._unlink_warning(e)
            return  # info stays: the message is finished again at the next start
        await self._cleaner("foop", num)

    def _schedule_messdone(self, num: int, delay: float) -> None:
        assert self._loop is not None
        if self._exiting:
            return
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._done_retry.discard(handle)
            self._messdone(num)

        handle = self._loop.call_later(delay, fire)
        self._done_retry.add(handle)

    def _inject_bounce(self, num: int) -> tuple[bool, int | None]:
        """Worker thread: queue the bounce of ``num`` (or drop a triple bounce); unlink bounce/N.

        Returns (done, qp): qp of the queued bounce, None for a triple bounce, -1 if none
        was queued. Warnings are written from here; the loop logs the bounce itself.
        """
        s = self.settings
        info = self._p.info(num)
        bounce = self._p.bounce(num)
        try:
            with open(info, "rb") as f:
                raw = f.read()
        except OSError as e:
            self.log.warning(f"unable to read {info}: {e.strerror}")
            return False, -1
        sender = decode(records.parse_info(raw, strict=True))
        env = bounce_envelope(sender, s.doublebounce)
        qp: int | None = None
        if env is not None:
            if self.submitter is None:
                self.log.warning("unable to start qmail-queue, will try later")
                return False, -1
            try:
                pending = self.submitter.begin(origin="bounce")
            except Exception:
                self.log.warning("unable to start qmail-queue, will try later")
                return False, -1
            try:
                for chunk in bounce_chunks(
                    env,
                    sender,
                    Path(bounce),
                    Path(self._p.mess(num)),
                    bouncefrom=s.bouncefrom,
                    bouncehost=s.bouncehost,
                ):
                    pending.write(chunk)
                pending.commit(encode(env.sender), [encode(env.recipient)])
            except Exception:
                with contextlib.suppress(Exception):
                    pending.abort()
                self.log.warning("trouble injecting bounce message, will try later")
                return False, -1
            self.stats["bounced"] += 1
            qp = pending.qp
        try:
            os.unlink(bounce)
        except OSError as e:
            if e.errno != errno.ENOENT:
                self.log.warning(f"unable to unlink {bounce}: {e.strerror}")
                return False, qp
        return True, qp

    # ---------------------------------------------------------------- idleness

    def _update_idle(self) -> None:
        busy = (
            bool(self._todo)
            or self._preprocessing
            or self._todo_scan_wanted
            or bool(self._jobs)
            or any(self._used)
            or any(self._due(c) for c in CHANNELS)
        )
        if busy:
            self.idle.clear()
        else:
            self.idle.set()

    def _due(self, c: int) -> bool:
        head = self._heaps[c].peek()
        return head is not None and head.when <= self._clock() and self.settings.concurrency[c] > 0

    def queued(self) -> int:
        """Messages with a channel file still pending (for status and tests)."""
        return len(self._pending_chan)
