"""qmail-send as an asyncio scheduler: the event loop, the job queues and concurrency.

Owns the life of a queued message after ``todo/N`` exists (queue.md 4-6, send.md), and
hands each piece of file work to the module that owns it:

- todo: woken in-process by the queue writer's ``notify`` (thread-safe), by a byte in
  ``lock/trigger`` and by a scan at start and every 1500 s; entries are preprocessed in
  batches in a worker thread (preprocess.py), then scheduled, delivered directly
  (direct.py) or finished.
- delivery: one min-heap per channel (schedule.py), concurrencylocal/remote delivery slots
  (0 holds the channel; a freed slot goes to the first job waiting for one, and only that
  job is woken), one job per message and channel (job.py), each ``T`` record one
  delivery (remote recipients of one host with the same sender share one SMTP
  transaction, each still logged and numbered as its own delivery), results marked by
  overwriting ``T`` with ``D`` in place, deferrals retried at ``nextretry``; a dying job's
  deferrals fail, each failure is added to bounce/N (bounce.py).
- destination limits (remote only; control/destinationlimits, limits.py): before a host's
  group starts, its destination must have room (concurrency, rate per minute, no back-off
  after a 421/4.7.x reply). A group without room is held back: the rest of the pass goes
  on, and the message is then *parked* on the destinations it waits for, out of the heap,
  with no file written and no retry time charged. When a destination has room again (one
  of its deliveries ended, or a timer for its rate window or back-off fired) its parked
  messages go back into the heap at their old due time, and the same pass continues: the
  recipients it already tried and deferred are not tried again before their retry time.
  So a slow destination holds at most its own limit of the concurrencyremote slots.
- completion: the bounce queued (bounce.py), ``end msg``, then info, mess and intd removed.
- start-up: exclusive flock on ``lock/sendmutex``; the schedule rebuilt from info/local/remote
  (the channel file's mtime is its next try), O(n log n) once; O(log n) per event after.
- signals (wired by the daemon): ``reload`` (HUP: routing, concurrency, lifetime, bounce
  settings, destination limits; parked messages are looked at again under the new limits),
  ``alarm`` (ALRM: everything in the schedule due now; a message parked at its
  destination's limit stays parked), ``stop`` (TERM: no new deliveries,
  in-flight ones awaited up to a bound, next-try times written as mtimes).

Agents are plain async callables so the daemon passes the real LocalSpawner/RemoteAgent
and unit tests pass small functions; an agent that raises counts as a temporary failure.
Queue files are read and written only through queue/records.py and removed only through
queue/clean.py or the ``cleaner`` (qmail-clean in another process).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail import destlimits
from pyqmail.control import Control
from pyqmail.destlimits import DestinationLimits, Limit
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.queue import clean, records
from pyqmail.queue.clean import Cleaner
from pyqmail.queue.contract import BlockingSubmitter
from pyqmail.queue.layout import QueuePaths, msgnum
from pyqmail.send import admin, bounce
from pyqmail.send.admin import AdminError, Attempt, MessageState
from pyqmail.send.direct import After, DirectDeliveries
from pyqmail.send.job import Job, Record
from pyqmail.send.limits import DestinationLimiter, verdict
from pyqmail.send.log import SendLog, safe
from pyqmail.send.preprocess import (
    GONE,
    Preprocessed,
    examine_batch,
    finish_batch,
    needs_files,
    preprocess_batch,
)
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
from pyqmail.send.stats import SendStats
from pyqmail.send.todo import Routing, decode, verp_sender

LocalDeliver = Callable[[Path, str, str], Awaitable[Outcome]]
RemoteDeliver = Callable[[Path, str, list[str]], Awaitable[list[Outcome]]]

TODO_SCAN_INTERVAL = 1500.0  # qmail-send: todo scanned at least this often
SYSERR_RETRY = 123.0  # qmail-send: an item that hit a system error is retried this much later
TODO_BATCH = 256
REMOTE_BATCH = 50  # recipients of one host in one SMTP transaction
REPORTMAX = 10000  # qmail-send truncates a delivery report to this many bytes
_TEXT_INTERNAL = "Sorry, an internal error occurred while delivering. (#4.3.0)\n"


class StartError(Exception):
    """qmail-send cannot start; the text is qmail's ``alert: cannot start: ...`` reason."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The control values the scheduler reads, snapshotted at start and on HUP."""

    routing: Routing
    concurrency: tuple[int, int]
    queuelifetime: int
    bouncefrom: str
    bouncehost: str
    doublebounce: str
    limits: DestinationLimits = field(default_factory=DestinationLimits)

    @classmethod
    def from_control(cls, ctl: Control) -> Settings:
        return cls(
            Routing.from_control(ctl),
            (max(0, ctl.concurrencylocal), max(0, ctl.concurrencyremote)),
            ctl.queuelifetime,
            ctl.bouncefrom,
            ctl.bouncehost,
            ctl.doublebounceto + "@" + ctl.doublebouncehost,
            destlimits.parse(ctl.raw_lists.get("destinationlimits", ())),
        )


@dataclass(frozen=True, slots=True)
class _Parked:
    """A message waiting for room at the destinations ``keys`` (see the module docstring)."""

    when: float  # its place in the schedule, kept for when it goes back
    gen: int  # tells this parking from an earlier one in the destinations' queues
    keys: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Carry:
    """A remote pass that held recipients back: the offsets it tried (and deferred), which
    its continuation skips, and the domains it waits for."""

    tried: frozenset[int]
    domains: frozenset[str]


def _domain(recipient: str) -> str:
    return recipient[recipient.rfind("@") + 1 :].lower()


class Scheduler:
    """qmail-send's job, in-process. Construct, ``await start()``, and ``await stop()``."""

    def __init__(
        self,
        home: Home,
        control: Callable[[], Control],
        *,
        local: LocalDeliver,
        remote: RemoteDeliver,
        submitter: BlockingSubmitter | None = None,
        log: SendLog | None = None,
        clock: Callable[[], float] = time.time,
        term_timeout: float = 60.0,
        scan_interval: float = TODO_SCAN_INTERVAL,
        use_trigger: bool = True,
        direct: bool = True,
        cleaner: Cleaner | None = None,
        control_socket: socket.socket | bool = False,
    ) -> None:
        self.home = home
        self.paths = QueuePaths(home.queue)
        self._control = control
        self._local = local
        self._remote = remote
        self.submitter = submitter
        self.log = log if log is not None else SendLog()
        self._clock = clock
        self._term_timeout = term_timeout
        self._scan_interval = scan_interval
        self._use_trigger = use_trigger
        self._cleaner = cleaner
        self._direct = DirectDeliveries(
            self.paths,
            self.log,
            enabled=direct,
            cleaner=cleaner,
            spawn=self._spawn,
            on_release=self._number_free,
        )
        self._in_batch: set[int] = set()  # numbers being preprocessed in the worker thread
        self._renotify: set[int] = set()  # notified while busy: look again when free
        self.settings = Settings.from_control(control())
        self._heaps = [PrioQueue(), PrioQueue()]
        self._used = [0, 0]  # deliveries in flight per channel
        self._active = [0, 0]  # jobs open per channel
        self._wake = [asyncio.Event(), asyncio.Event()]
        # deliveries waiting for a slot, first come first served (_acquire)
        self._slot_waiters: list[deque[asyncio.Future[None]]] = [deque(), deque()]
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
        # the queue manager (admin.py): True = bind HOME/run/control.sock at start
        self._control_socket = control_socket
        self._control_server: admin.ControlServer | None = None
        self._attempts: dict[int, dict[str, Attempt]] = {}  # tries and last error, in memory
        self._held: set[int] = set()
        self._doomed: dict[int, str | None] = {}  # delete when its running job ends
        self._retry_now: set[int] = set()  # retry at once when its running job ends
        self._running: dict[int, int] = {}  # jobs in flight per message
        self.metrics = SendStats(clock)  # for daemon/http.py's /metrics and status page
        # destination limits (limits.py): parked messages, each destination's queue of
        # (num, gen), the passes to continue, and a timer per destination waiting for time
        self.limiter = DestinationLimiter()
        self._parked: dict[int, _Parked] = {}
        self._waiting: dict[str, tuple[Limit, deque[tuple[int, int]]]] = {}
        self._carry: dict[int, _Carry] = {}
        self._dest_timers: dict[str, asyncio.TimerHandle] = {}
        self._park_gen = 0
        self._log_limit_problems()

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
        await self._start_control()

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
        if self._control_server is not None:
            await self._control_server.close()
        self._log_status()
        for c in CHANNELS:
            self._hand_slots(c)
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
        for h in self._dest_timers.values():
            h.cancel()
        self._dest_timers.clear()
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
            kind = CHANNEL_NAMES[c]
            for e in self._heaps[c]:
                with contextlib.suppress(OSError):
                    records.set_next_try(self.paths.name(kind, e.num), e.when)
        for num, p in list(self._parked.items()):
            with contextlib.suppress(OSError):
                records.set_next_try(self.paths.name("remote", num), p.when)

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
        if num in self._direct or num in self._in_batch:
            self._renotify.add(num)
            return
        self._todo.add(num)
        self.idle.clear()
        self._todo_event.set()

    def _number_free(self, num: int) -> None:
        """N left the batch or the direct deliveries: take up a notify that was held back."""
        if num in self._renotify and num not in self._direct and num not in self._in_batch:
            self._renotify.discard(num)
            if os.path.exists(self.paths.name("todo", num)):
                self._add_todo(num)

    def summary(self) -> str:
        """One line for systemd's STATUS= (daemon/notify.py): the messages the schedule
        holds and the deliveries in flight, as qmail-send's status line counts them."""
        conc = self.settings.concurrency
        queued = len(self._pending_chan) + len(self._todo)
        return (f"queue {queued}, local {self._used[0]}/{conc[0]}, "
                f"remote {self._used[1]}/{conc[1]}")  # fmt: skip

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
        self._log_limit_problems()
        # the destinations' keys and limits may have changed: every parked message goes
        # back into the schedule and is looked at again under the new limits
        for h in self._dest_timers.values():
            h.cancel()
        self._dest_timers.clear()
        self._waiting.clear()
        for num in list(self._parked):
            self._unpark(num)
        for c in CHANNELS:
            self._hand_slots(c)  # a higher concurrency lets waiters through now
            self._wake[c].set()
        return True

    def _log_limit_problems(self) -> None:
        for bad in self.settings.limits.bad:
            self.log.warning(f"control/destinationlimits:{bad.line}: {bad.text!r}: {bad.reason}")

    # ---------------------------------------------------------------- start-up scan

    def _scan_info(self) -> tuple[list[list[Entry]], list[int]]:
        """(per-channel entries at their files' mtimes, messages with no channel file left)."""
        entries: list[list[Entry]] = [[], []]
        done: list[int] = []
        todo = set()
        self._held = admin.held_numbers(self.paths)
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
                for c in CHANNELS:
                    path = self.paths.name(CHANNEL_NAMES[c], num)
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    if num not in self._held:
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
                    names = await loop.run_in_executor(None, os.listdir, self.paths.dir("todo"))
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
            budget = self._direct.budget(self.settings.concurrency[LOCAL])
            self._preprocessing = True
            self._in_batch.update(batch)
            try:
                # read and decide on the loop; a thread only for files to write and sync
                examined = self._examine_batch(batch, routing, budget)
                if needs_files(examined):
                    results = await loop.run_in_executor(
                        None, self._preprocess_batch, batch, routing, budget, examined
                    )
                else:
                    results = [p for p in examined if p.warning != GONE]
            except BaseException:
                self._in_batch.difference_update(batch)
                raise
            finally:
                self._preprocessing = False
            for pre in results:  # direct deliveries hold their number from here on
                if not pre.warning and pre.direct is not None:
                    self._direct.hold(pre.num)
            self._in_batch.difference_update(batch)
            for num in batch:
                self._number_free(num)
            now_s = self._clock()
            if self._cleaner is not None:  # all at once: qmail-clean's link is pipelined
                cleaner = self._cleaner
                await asyncio.gather(
                    *(
                        cleaner("todo", pre.num)
                        for pre in results
                        if not pre.warning and pre.direct is None
                    )
                )
            for pre in results:
                if pre.warning:
                    self.log.warning(pre.warning)
                    continue
                self.log.new_msg(pre.num)
                self.log.info_msg(pre.num, pre.size, pre.sender, pre.qp, pre.uid)
                if pre.direct is not None:
                    self._start_direct(pre, pre.direct)
                elif pre.channels:
                    self._pending_chan[pre.num] = pre.channels
                    for c in CHANNELS:
                        if pre.channels & (1 << c):
                            self._heaps[c].push(now_s, pre.num)
                            self._wake[c].set()
                else:
                    self._messdone(pre.num)

    def _examine_batch(
        self, nums: list[int], routing: Routing, direct_budget: int
    ) -> list[Preprocessed]:
        """On the loop: preprocess.py's reading and deciding (no file written, no fsync)."""
        return examine_batch(self.paths, nums, routing, direct_budget=direct_budget)

    def _preprocess_batch(
        self,
        nums: list[int],
        routing: Routing,
        direct_budget: int,
        examined: list[Preprocessed] | None = None,
    ) -> list[Preprocessed]:
        """Worker thread: preprocess.py's batch (the rest of it, after ``examined``); its
        todos removed here unless a cleaner does it."""
        clean_todo = self._cleaner is None
        if examined is not None:
            return finish_batch(self.paths, examined, clean_todo=clean_todo, log=self.log)
        return preprocess_batch(
            self.paths,
            nums,
            routing,
            direct_budget=direct_budget,
            clean_todo=clean_todo,
            log=self.log,
        )

    # ---------------------------------------------------------------- direct delivery

    def _start_direct(self, pre: Preprocessed, recipients: list[str]) -> None:
        """Deliver a new all-local message straight from todo (direct.py)."""
        job = self._direct.start(pre.num, pre.sender, recipients, int(self._clock()))
        self._spawn(self._direct_job(job))

    async def _direct_job(self, job: Job) -> None:
        self._active[LOCAL] += 1
        try:
            await self._run_deliveries(job)
        except asyncio.CancelledError:
            self._direct.drop(job.num)  # todo/N remains: handled again at the next start
            raise
        finally:
            self._active[LOCAL] -= 1
            self._wake[LOCAL].set()
        after = await self._direct.settle(job)
        if after is After.REQUEUE:
            self._pending_chan[job.num] = 1 << LOCAL
            self._heaps[LOCAL].push(job.retry, job.num)
            self._wake[LOCAL].set()
        elif after is After.MESSDONE:
            self._messdone(job.num)

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
            if c == REMOTE and self._park_again(head):
                continue
            self._start_job(c, head.num, head.when)

    def _start_job(self, c: int, num: int, due: float) -> None:
        self._active[c] += 1
        self._running[num] = self._running.get(num, 0) + 1
        self._spawn(self._job(c, num, due))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        """Run ``coro`` as a job: awaited by ``stop``, counted as work by ``idle``."""
        task = asyncio.create_task(coro)
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

    def _open_job(self, c: int, num: int) -> Job | None:
        recent = int(self._clock())
        info = self.paths.name("info", num)
        try:
            raw, birth = records.read_info_birth(info)
        except OSError as e:
            self.log.warning(f"unable to open {info}: {e.strerror}")
            return None
        sender = decode(raw)
        path = self.paths.name(CHANNEL_NAMES[c], num)
        try:
            fd, data = records.open_channel(path)
        except OSError as e:
            self.log.warning(f"unable to open {path}: {e.strerror}")
            return None
        recs: list[Record] = []
        for pos, kind, addr in records.iter_channel(data):
            if kind == b"T":
                recs.append(Record(pos, decode(addr)))
            elif kind != b"D":
                self.log.warning(f"unknown record type in {path}")
        s = self.settings
        return Job(
            c,
            num,
            sender,
            nextretry(birth, recent, c),
            dying(birth, recent, s.queuelifetime),
            fd,
            recs,
            birth=birth,
        )

    async def _job(self, c: int, num: int, due: float) -> None:
        try:
            await self._job_body(c, num, due)
        finally:
            self._active[c] -= 1
            self._wake[c].set()
            left = self._running.pop(num, 1) - 1
            if left:
                self._running[num] = left
            elif num in self._doomed and not self._exiting:
                reason = self._doomed.pop(num)
                if num in self._pending_chan:  # not finished by the job itself meanwhile
                    self._delete_now(num, reason)

    async def _job_body(self, c: int, num: int, due: float) -> None:
        job = self._open_job(c, num)
        if job is None:
            self._retry_later(c, num)
            return
        job.due = due
        carry = self._carry.get(num) if c == REMOTE else None
        if carry is not None and carry.tried:
            # the continuation of a pass: what it tried already waits for its retry time
            kept = [r for r in job.records if r.offset not in carry.tried]
            job.left += len(job.records) - len(kept)
            job.tried.update(carry.tried)
            job.records = kept
        try:
            await self._run_deliveries(job)
        finally:
            os.close(job.fd)
        self._job_done(job)

    async def _run_deliveries(self, job: Job) -> None:
        c = job.channel
        groups = self._groups(job)
        for group in groups:
            lim: Limit | None = None
            started = 0.0
            if c == REMOTE:
                domain = _domain(group[0].recipient)
                lim = self.settings.limits.lookup(domain)
                started = self._clock()
                if self.limiter.blocked(lim, started) is not None:
                    job.held.add(domain)  # no room at its destination: parked at the end
                    self.metrics.held()
                    continue
                self.limiter.start(lim, started)
            await self._acquire(c)
            if self._exiting:
                self._release(c)
                job.left += len(group)
                if lim is not None:
                    self.limiter.cancel(lim.key, started)
                continue
            if len(groups) == 1:  # the usual case: no task and gather around the one delivery
                await self._deliver(job, group, lim, started)
                return
            job.tasks.append(asyncio.create_task(self._deliver(job, group, lim, started)))
        if job.tasks:
            await asyncio.gather(*job.tasks)

    def _groups(self, job: Job) -> list[list[Record]]:
        if job.channel == LOCAL or job.sender.endswith("-@[]"):
            return [[r] for r in job.records]
        by_host: dict[str, list[list[Record]]] = {}
        for r in job.records:
            lists = by_host.setdefault(_domain(r.recipient), [[]])
            if len(lists[-1]) >= REMOTE_BATCH:
                lists.append([])
            lists[-1].append(r)
        return [g for lists in by_host.values() for g in lists]

    async def _acquire(self, c: int) -> None:
        """Take one of channel ``c``'s delivery slots, waiting in line for it. A freed slot
        is handed to the first waiter only (``_hand_slots``): with many direct jobs waiting,
        waking them all for each freed slot cost a wake-up of every waiter per delivery.
        While exiting every waiter gets through at once (the caller then gives it back)."""
        waiters = self._slot_waiters[c]
        if self._exiting or (not waiters and self._used[c] < self.settings.concurrency[c]):
            self._used[c] += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            try:
                await fut  # resolved with the slot already counted in _used
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release(c)  # handed a slot just as it was cancelled: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        waiters.remove(fut)
                raise
        self._log_status()

    def _release(self, c: int) -> None:
        self._used[c] -= 1
        self._hand_slots(c)
        self._wake[c].set()

    def _hand_slots(self, c: int) -> None:
        """Give channel ``c``'s free slots to its first waiters (all of them while exiting)."""
        waiters = self._slot_waiters[c]
        limit = self.settings.concurrency[c]
        while waiters and (self._exiting or self._used[c] < limit):
            fut = waiters.popleft()
            if not fut.done():
                self._used[c] += 1
                fut.set_result(None)

    def _log_status(self) -> None:
        conc = self.settings.concurrency
        self.log.status((self._used[0], self._used[1]), conc, self._exiting)

    async def _deliver(
        self, job: Job, group: list[Record], lim: Limit | None = None, started: float = 0.0
    ) -> None:
        c = job.channel
        mess = Path(self.paths.name("mess", job.num))
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
            if lim is not None:
                self.limiter.cancel(lim.key, started)
            raise
        except Exception:
            outcomes = [Outcome.temp(_TEXT_INTERNAL)] * len(group)
        for did, r, out in zip(ids, group, outcomes, strict=True):
            self._record(job, did, r, out)
        self._release(c)
        self._log_status()
        if lim is not None:
            self._dest_finished(lim, started, outcomes)

    def _record(self, job: Job, did: int, rec: Record, out: Outcome) -> None:
        status, text = out.status, out.text[:REPORTMAX]
        if status is Status.TEMP and job.dying:
            status, text = Status.PERM, bounce.dying_text(text)
        if status is not Status.OK:  # for `pyqmail queue show`: tries and the last error
            tried = self._attempts.setdefault(job.num, {})
            before = tried.get(rec.recipient)
            tried[rec.recipient] = Attempt(
                (before.tries if before else 0) + 1, text.strip(), self._clock()
            )
        self.log.result(did, status.value, text)
        self.metrics.delivery(
            CHANNEL_NAMES[job.channel], job.num, rec.recipient, status.value, text, job.birth
        )
        if status is Status.TEMP:
            self.stats["deferred"] += 1
            job.left += 1
            job.tried.add(rec.offset)
            return
        if status is Status.PERM:
            self.stats["failed"] += 1
            shown = self.settings.routing.strip_virtual(rec.recipient)
            if not bounce.record_failure(self.paths, job.num, shown, text, self.log):
                job.left += 1  # not recorded: try the recipient again rather than lose it
                job.tried.add(rec.offset)
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

    def _job_done(self, job: Job) -> None:
        c, num = job.channel, job.num
        if job.left or job.held:
            if num in self._held or num in self._doomed:  # the queue manager's
                self._carry.pop(num, None)
                with contextlib.suppress(OSError):
                    records.set_next_try(self.paths.name(CHANNEL_NAMES[c], num), job.retry)
                return
            if job.held:  # the pass goes on when its destinations have room
                self._retry_now.discard(num)
                self._carry[num] = _Carry(frozenset(job.tried), frozenset(job.held))
                self._park(num, job.due, job.held)
                return
            self._carry.pop(num, None)
            now = self._exiting
            if num in self._retry_now:  # asked for during this pass: once, at once
                self._retry_now.discard(num)
                now = True
            self._heaps[c].push(self._clock() if now else job.retry, num)
            self._wake[c].set()
            return
        if c == REMOTE:
            self._carry.pop(num, None)
        path = self.paths.name(CHANNEL_NAMES[c], num)
        try:
            clean.remove_channel(path)
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

    # ---------------------------------------------------------------- destination limits

    def _park_again(self, head: Entry) -> bool:
        """A pass to continue whose destinations all still have no room is parked again
        without opening its file (at the front: it keeps its turn). True if parked."""
        carry = self._carry.get(head.num)
        if carry is None or not carry.domains or not self._all_blocked(carry.domains):
            return False
        self._park(head.num, head.when, carry.domains, front=True)
        return True

    def _all_blocked(self, domains: Iterable[str]) -> bool:
        now = self._clock()
        limits = self.settings.limits
        return all(self.limiter.blocked(limits.lookup(d), now) is not None for d in domains)

    def _park(self, num: int, when: float, domains: Iterable[str], front: bool = False) -> None:
        """Wait for room at ``domains``' destinations; at once back in the schedule if one
        of them has room already (its delivery ended while this pass was running)."""
        now = self._clock()
        waits: dict[str, tuple[Limit, float]] = {}
        for d in domains:
            lim = self.settings.limits.lookup(d)
            until = self.limiter.blocked(lim, now)
            if until is None:
                self._heaps[REMOTE].push(when, num)
                self._wake[REMOTE].set()
                return
            waits[lim.key] = (lim, until)
        self._park_gen += 1
        self._parked[num] = _Parked(when, self._park_gen, frozenset(waits))
        for key, (lim, until) in waits.items():
            got = self._waiting.get(key)
            if got is None:
                got = self._waiting[key] = (lim, deque())
            queue = got[1]
            self._waiting[key] = (lim, queue)  # the newest limit (after a HUP)
            if front:
                queue.appendleft((num, self._park_gen))
            else:
                queue.append((num, self._park_gen))
            if until != math.inf:
                self._arm_timer(key, until)
        self.metrics.held_back = len(self._parked)

    def _unpark(self, num: int) -> None:
        """Back into the schedule at its old due time."""
        p = self._parked.pop(num)
        self.metrics.held_back = len(self._parked)
        self._heaps[REMOTE].push(p.when, num)
        self._wake[REMOTE].set()

    def _wake_dest(self, key: str) -> None:
        """Send as many of ``key``'s parked messages back as it has room for now."""
        got = self._waiting.get(key)
        if got is None:
            return
        lim, queue = got
        now = self._clock()
        room = self.limiter.room(lim, now)
        if room == 0:
            until = self.limiter.blocked(lim, now)
            if until is not None and until != math.inf:
                self._arm_timer(key, until)
            return
        while queue and (room is None or room > 0):
            num, gen = queue.popleft()
            p = self._parked.get(num)
            if p is None or p.gen != gen:
                continue  # stale: released by another destination, held, deleted
            self._unpark(num)
            if room is not None:
                room -= 1
        if not queue:
            del self._waiting[key]

    def _arm_timer(self, key: str, until: float) -> None:
        if self._loop is None or self._exiting:
            return
        old = self._dest_timers.get(key)
        if old is not None:
            if old.when() <= self._loop.time() + max(0.0, until - self._clock()):
                return
            old.cancel()

        def fire() -> None:
            self._dest_timers.pop(key, None)
            self._wake_dest(key)

        # a little late rather than early: the window's edge must have passed
        delay = max(0.0, until - self._clock()) + 0.01
        self._dest_timers[key] = self._loop.call_later(delay, fire)

    def _dest_finished(self, lim: Limit, started: float, outcomes: list[Outcome]) -> None:
        """A transaction to ``lim``'s destination ended: the limiter learns its verdict
        (a rate-limit reply backs the destination off), then its parked messages may go."""
        interval = self.limiter.finish(lim.key, started, self._clock(), verdict(outcomes))
        if interval is not None:
            self.metrics.backoff(lim.key)
            self.log.line(
                b"destination %s: rate-limit reply; holding its deliveries for %d seconds"
                % (safe(lim.key), int(interval))
            )
        self._wake_dest(lim.key)

    # ---------------------------------------------------------------- queue manager
    # admin.py's ControlServer calls these in the loop; each change applies here so the
    # schedule agrees with the files.

    async def _start_control(self) -> None:
        sock = self._control_socket
        if sock is False:
            return
        gid = admin.qmail_group(self.home)
        if sock is True:
            try:
                sock = admin.bind_control(admin.control_path(self.home), gid)
            except OSError as e:
                self.log.warning(f"unable to bind the control socket: {e.strerror}")
                return
        assert isinstance(sock, socket.socket)
        self._control_server = admin.ControlServer(self, sock, gid)
        await self._control_server.start()

    def admin_log(self, text: str) -> None:
        self.log.line(b"queue manager: " + b" ".join(safe(w) for w in text.split(" ")))

    def admin_states(self, nums: Sequence[int] | None) -> list[MessageState]:
        out = []
        due: dict[int, dict[int, float]] = {}
        for c in CHANNELS:
            for e in self._heaps[c]:
                due.setdefault(e.num, {})[c] = e.when
        for num, p in self._parked.items():
            due.setdefault(num, {})[REMOTE] = p.when
        for n in admin.queued_numbers(self.paths) if nums is None else nums:
            if n not in self._pending_chan:
                continue
            when = due.get(n, {})
            with contextlib.suppress(OSError):
                out.append(
                    admin.read_message(
                        self.paths,
                        n,
                        held=n in self._held,
                        history=self._attempts.get(n, {}),
                        next_try=when,
                    )
                )
        return out

    async def admin_action(self, op: str, num: int, reason: str | None) -> str:
        """Apply one queue-manager action to message ``num``; AdminError if it cannot."""
        if num not in self._pending_chan:
            if num in self._direct or num in self._todo or num in self._in_batch:
                raise AdminError("being delivered from todo; try again shortly")
            raise AdminError(f"no message {num} in the queue")
        running = num in self._running
        if op == "hold":
            if num in self._held:
                return "already held"
            admin.write_hold(self.paths, num)
            self._held.add(num)
            for c in CHANNELS:
                for e in self._heaps[c].remove(num):
                    with contextlib.suppress(OSError):
                        records.set_next_try(self.paths.name(CHANNEL_NAMES[c], num), e.when)
            self._carry.pop(num, None)
            parked = self._parked.pop(num, None)
            self.metrics.held_back = len(self._parked)
            if parked is not None:
                with contextlib.suppress(OSError):
                    records.set_next_try(self.paths.name("remote", num), parked.when)
            return "held" + (" (after the delivery in progress)" if running else "")
        if op == "release":
            if num not in self._held:
                return "not held"
            admin.remove_hold(self.paths, num)
            self._held.discard(num)
            if not running:
                self._push_pending(num, None)
            return "released"
        if op == "retry":
            if num in self._held:
                raise AdminError("held; release it first")
            if running:
                self._retry_now.add(num)
                return "being delivered now; again at once if it is deferred"
            for c in CHANNELS:
                self._heaps[c].remove(num)
            self._carry.pop(num, None)  # every recipient, now
            parked = self._parked.pop(num, None)
            self.metrics.held_back = len(self._parked)
            self._push_pending(num, self._clock())
            return "due now" + (" (its destination's limits still apply)" if parked else "")
        if op == "delete":
            if running:
                self._doomed[num] = reason
                return "deleted after the delivery in progress"
            self._delete_now(num, reason)
            return "deleted" + (" and bounced" if reason is not None else "")
        raise AdminError(f"unknown action {op!r}")

    def _push_pending(self, num: int, when: float | None) -> None:
        """Schedule each pending channel of ``num`` at ``when`` (None: the file's mtime)."""
        mask = self._pending_chan.get(num, 0)
        for c in CHANNELS:
            if mask & (1 << c):
                at = when
                if at is None:
                    try:
                        at = os.stat(self.paths.name(CHANNEL_NAMES[c], num)).st_mtime
                    except OSError:
                        at = self._clock()
                self._heaps[c].push(at, num)
                self._wake[c].set()

    def _delete_now(self, num: int, reason: str | None) -> None:
        """Take ``num`` out of the schedule and the queue; with a reason, bounce the
        recipients not yet done first (via bounce/N and the usual completion)."""
        for c in CHANNELS:
            self._heaps[c].remove(num)
        self._carry.pop(num, None)
        self._parked.pop(num, None)
        self.metrics.held_back = len(self._parked)
        self._held.discard(num)
        self._retry_now.discard(num)
        if reason is not None:
            try:
                admin.record_failures(
                    self.paths, num, reason, self.settings.routing.strip_virtual, self.log
                )
            except AdminError as e:
                self.log.warning(f"queue manager: message {num} kept: {e}")
                self._push_pending(num, None)
                return
        else:
            with contextlib.suppress(OSError):
                clean.remove_bounce(self.paths, num)
        for c in CHANNELS:
            with contextlib.suppress(OSError):
                clean.remove_channel(self.paths.name(CHANNEL_NAMES[c], num))
        admin.remove_hold(self.paths, num)
        self._pending_chan.pop(num, None)
        self._messdone(num)

    # ---------------------------------------------------------------- completion

    def _messdone(self, num: int) -> None:
        """No channel file left: bounce if needed, log end msg, remove the message."""
        self._spawn(self._messdone_async(num))

    async def _messdone_async(self, num: int) -> None:
        if os.path.exists(self.paths.name("bounce", num)):
            assert self._loop is not None
            s = self.settings
            ok, qp = await self._loop.run_in_executor(
                None,
                functools.partial(
                    bounce.queue_bounce,
                    self.paths,
                    num,
                    self.submitter,
                    self.log,
                    bouncefrom=s.bouncefrom,
                    bouncehost=s.bouncehost,
                    doublebounce=s.doublebounce,
                ),
            )
            if qp is not None and qp >= 0:
                self.stats["bounced"] += 1
            if qp is None:
                self.log.triple_bounce(num)
            elif qp >= 0:
                self.log.bounce_msg(num, qp)
            if not ok:
                self._schedule_messdone(num, SYSERR_RETRY)
                return
        self.log.end_msg(num)
        self._attempts.pop(num, None)
        self._retry_now.discard(num)
        if num in self._held:  # held while its last delivery was in flight
            self._held.discard(num)
            admin.remove_hold(self.paths, num)
        # info first: a crash after it leaves an unreferenced mess that recovery removes
        try:
            if self._cleaner is None:
                clean.finish_message(self.paths, num)
                return
            clean.remove_info(self.paths, num)
        except OSError as e:
            self.log.unlink_warning(e)
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
