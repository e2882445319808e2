"""``pyqmail run``: the whole MTA in the foreground (qmail-start + its daemons, as asyncio).

The one-process arrangement of the parts in daemon/parts.py, and ``run(cfg)``, which
picks it or daemon/split.py's. Owns the order of start-up and shutdown in one process:

1. the checks (``alert: cannot start: unable to read controls`` and the like), then
   remove what a crash left in the queue (queue/recover.py);
2. fork the listener process (daemon/listenproc.py: the SMTP, QMQP and QMTP listeners
   bind there, with their own event loop and committer; a listener that cannot bind
   stops the start), then the local delivery workers and the remote agent's process
   (remote/agentproc.py, as root mode runs it but without a change of user), before any
   thread exists;
3. in the event loop: the scheduler (send/manager.py) takes lock/sendmutex and rebuilds its
   schedule; the listener process tells it each new message's number;
4. signals: TERM/INT stop (the listener process first: listeners close and SMTP sessions
   in DATA finish within control/timeoutdrain, QMQP and QMTP requests too; then
   deliveries in flight finish, bounded), HUP re-reads the controls (in both processes),
   ALRM retries everything now, PIPE is ignored; a listener process or remote agent
   that dies stops the daemon with exit 111 (qmail-send's "lost connection");
5. under systemd (NOTIFY_SOCKET): READY=1 once 3 is done, then STATUS= and WATCHDOG=1 from
   the event loop, STOPPING=1 on TERM (daemon/notify.py).

Identities (design.md): in single-user mode, or when started by an ordinary user, every part
runs as the invoking user (a warning once if that is root): the scheduler in this
process, the listeners in the listener process, local deliveries in pre-forked workers
(local/pool.py), the remote agent's SMTP clients in a process of their own (their
Python work would otherwise share the scheduler's core: a backlog to a remote host
drained at one core's pace). Started as root in multi-user mode, the
parts run as separate processes under qmail's users instead (daemon/split.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pyqmail.daemon import notify
from pyqmail.daemon.http import HttpAuth, StatusServer, parse_http
from pyqmail.daemon.listenproc import ListenerProcess
from pyqmail.daemon.parts import (
    PROG,
    CleanSweep,
    RunConfig,
    RunError,
    SteadyControl,
    check_home,
    check_http,
    make_scheduler,
    start_http,
    start_sending,
    stop_sending,
)
from pyqmail.eventloop import new_loop
from pyqmail.home import Home, warn_if_root_single_user
from pyqmail.listener import parse_listen
from pyqmail.local.pool import WorkerPoolLocal
from pyqmail.logsink import LineWriter, LogSink
from pyqmail.queue import submit as qsubmit
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import clean_stale
from pyqmail.remote.agentproc import RemoteProcess
from pyqmail.sdnotify import Notifier
from pyqmail.send.log import SendLog
from pyqmail.send.manager import Scheduler

__all__ = ["Daemon", "RunConfig", "RunError", "main_args", "run"]


class Daemon:
    """The running MTA: delivery workers and scheduler in one event loop, the listeners
    and the remote agent in processes of their own."""

    def __init__(
        self, cfg: RunConfig, sink: LogSink | None = None, notifier: Notifier | None = None
    ) -> None:
        self.cfg = cfg
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.home = cfg.home
        if sink is None:
            sink = LogSink(cfg.log, fmt=cfg.log_format, stamps=cfg.log_stamps)
        self.sink = sink
        self.log = SendLog(sink=self.sink)
        self.ctl = SteadyControl(self.home, log=self.log)
        self.spawner: WorkerPoolLocal | None = None
        self.scheduler: Scheduler | None = None
        self.listeners: ListenerProcess | None = None
        self.agent: RemoteProcess | None = None
        self.lost = False  # the listener process or the remote agent died: exit 111
        self.http: StatusServer | None = None
        self._auth: HttpAuth | None = None
        self._stop = asyncio.Event()
        self._reloads: set[asyncio.Task[None]] = set()

    def prepare(self) -> None:
        """Everything that must happen before threads exist (controls, recovery, fork)."""
        home = self.home
        ctl = check_home(home)
        self._auth = check_http(self.cfg)
        warn_if_root_single_user(home, PROG)
        clean_stale(QueuePaths(home.queue))
        if self.cfg.listens():  # first: it must not inherit the delivery workers' sockets
            self.listeners = ListenerProcess(self.cfg, self.sink)
            self.listeners.start()
        # enough for concurrencylocal (a HUP that raises it beyond this queues deliveries)
        workers = min(64, max(10, ctl.concurrencylocal))
        self.spawner = WorkerPoolLocal(home, self.ctl, workers=workers)
        self.spawner.start()
        self.agent = RemoteProcess(home)  # it zeroes lock/tcpto as it starts (qmail-rspawn)
        self.agent.start()

    async def serve(self) -> None:
        """Start every part, run until ``stop()``, then shut down in order."""
        loop = asyncio.get_running_loop()
        spawner, agent = self.spawner, self.agent
        assert spawner is not None and agent is not None, "prepare() first"
        agent.on_lost = self._lost_agent
        agent.watch()
        sched = make_scheduler(
            self.home,
            spawner,
            agent,
            self.log,
            stop_timeout=self.cfg.stop_timeout,
            control_socket=True,  # `pyqmail queue` (send/admin.py)
        )
        self.scheduler = sched
        sched.submitter = qsubmit.submitter(self.home, notify=sched.notify)  # bounces
        listeners = self.listeners
        if listeners is not None:
            listeners.attach(sched.notify, self._lost)
        snapshot = listeners.snapshot if listeners is not None else dict
        try:
            self.http = await start_http(self.cfg, self._auth, snapshot, sched.metrics)
        except OSError:
            if listeners is not None:
                await listeners.stop()
            raise
        for sig, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.hup),
            (signal.SIGALRM, sched.alarm),
        ):
            loop.add_signal_handler(sig, handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            await start_sending(sched, self.log)
        except RunError:
            if listeners is not None:
                await listeners.stop()
            raise
        if listeners is not None:
            listeners.go()
        sweep = CleanSweep(QueuePaths(self.home.queue))
        sweep.start()
        beating: asyncio.Task[None] | None = None
        if self.notifier.enabled:  # systemd's Type=notify
            self.notifier.ready(self.status())

            def speak() -> None:
                self.notifier.watchdog(self.status())

            beating = loop.create_task(notify.beat(speak, notify.beat_interval(self.notifier)))
        try:
            await self._stop.wait()
        finally:
            if beating is not None:
                beating.cancel()
            sweep.stop()
            if self.http is not None:
                await self.http.close()
            if listeners is not None:
                await listeners.stop()
            await stop_sending(sched, spawner, agent)

    def hup(self) -> None:
        """HUP: every part sees the control files as they are now."""
        self.ctl.refresh()
        if self.listeners is not None:
            self.listeners.hup()
        if self.scheduler is not None:
            self.scheduler.reload()
        if self.agent is not None:
            task = asyncio.get_running_loop().create_task(self.agent.reload())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    def status(self) -> str:
        """The STATUS= line: the scheduler's counts and the SMTP sessions open."""
        parts = []
        if self.scheduler is not None:
            parts.append(self.scheduler.summary())
        if self.listeners is not None:
            parts.append(f"smtp sessions {self.listeners.sessions()}")
        return ", ".join(parts)

    def _lost(self) -> None:
        """The listener process died on its own: stop everything, exit 111."""
        self.lost = True
        self.log.alert("lost the listener process, dying")
        self.stop()

    def _lost_agent(self) -> None:
        """The remote agent's process died on its own: stop everything, exit 111."""
        self.lost = True
        self.log.alert("lost connection to the remote agent")
        self.stop()

    def stop(self) -> None:
        """TERM/INT: begin an orderly shutdown (safe to call more than once)."""
        if not self._stop.is_set():
            self.notifier.stopping(f"stopping: {self.status()}")
        self._stop.set()


def run(cfg: RunConfig) -> int:
    """Run the MTA until TERM/INT; 0 after a clean stop, 111 if it cannot start."""
    sink = LogSink(cfg.log, fmt=cfg.log_format, stamps=cfg.log_stamps)
    if sink.json or sink.tai:  # every line in the chosen form, prints and warnings included
        sys.stderr = LineWriter(sink, "pyqmail")
        sys.stdout = LineWriter(sink, "pyqmail")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    # systemd's variables, taken out of the environment before any child is forked
    notifier = Notifier.from_environ()
    if os.geteuid() == 0 and not cfg.home.single_user:
        from pyqmail.daemon.split import run_split

        return run_split(cfg, notifier)
    daemon = Daemon(cfg, sink, notifier)

    def early(signum: int, frame: FrameType | None) -> None:
        daemon.stop()  # a TERM while the parts start: stop as soon as they are up

    # Until the loop's handlers are installed (the listener process may already serve)
    signal.signal(signal.SIGTERM, early)
    signal.signal(signal.SIGINT, early)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    try:
        daemon.prepare()
    except RunError as e:
        print(f"alert: cannot start: {e}", file=sys.stderr)
        return 111
    loop = new_loop()
    try:
        loop.run_until_complete(daemon.serve())
    except RunError:
        return 111
    except OSError as e:
        print(f"alert: cannot start: {e}", file=sys.stderr)
        return 111
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    return 111 if daemon.lost else 0


def main_args(
    home: Home,
    smtp: Sequence[str],
    qmqp: Sequence[str],
    qmtp: Sequence[str] = (),
    rules: str | None = None,
    *,
    smtps: Sequence[str] = (),
    submission: Sequence[str] = (),
    http: str | None = None,
    log_format: str = "qmail",
    log_stamps: str = "none",
    session_log: bool = True,
) -> RunConfig:
    """A RunConfig from command-line strings (raises ValueError for a bad address)."""
    return RunConfig(
        home,
        smtp=[parse_listen(a, 25) for a in smtp],
        qmqp=[parse_listen(a, 628) for a in qmqp],
        qmtp=[parse_listen(a, 209) for a in qmtp],
        rules=Path(rules) if rules else None,
        smtps=[parse_listen(a, 465) for a in smtps],
        submission=[parse_listen(a, 587) for a in submission],
        http=parse_http(http) if http else None,
        log_format=log_format,
        log_stamps=log_stamps,
        session_log=session_log,
    )
