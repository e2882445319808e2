"""``pyqmail run``: the whole MTA in the foreground (qmail-start + its daemons, as asyncio).

Owns the wiring and the order of start-up and shutdown:

1. resolve the home, read the controls once (``alert: cannot start: unable to read
   controls`` otherwise), remove what a crash left in the queue (queue/recover.py);
2. fork the local delivery workers (before any thread exists);
3. in the event loop: the scheduler (send/manager.py) takes lock/sendmutex and rebuilds its
   schedule; the submitter wakes it in-process; the SMTP, QMQP and QMTP listeners bind;
4. signals: TERM/INT stop (listeners close first, then deliveries in flight finish, bounded),
   HUP re-reads the controls, ALRM retries everything now, PIPE is ignored.

Identities (design.md): in single-user mode, or when started by an ordinary user, every part
runs in this process as the invoking user (a warning once if that is root), with local
deliveries in pre-forked workers (daemon/local.py). Started as root in multi-user mode, the
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
from dataclasses import dataclass, field
from typing import BinaryIO

from pyqmail import netaddr
from pyqmail.cli.common import parse_listen
from pyqmail.control import ControlCache, ControlError, Finding, load
from pyqmail.daemon.local import WorkerPoolLocal
from pyqmail.home import Home, warn_if_root_single_user
from pyqmail.queue import submit as qsubmit
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import clean_stale
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.send.log import SendLog
from pyqmail.send.manager import Scheduler, StartError
from pyqmail.smtp.protocol import Door
from pyqmail.smtp.server import SmtpServer
from pyqmail.tcprules import Decision

PROG = "pyqmail run"
CLEAN_INTERVAL = 76431.0  # qmail-send's mess cleanup period
STOP_TIMEOUT = 60.0


class SteadyControl(ControlCache):
    """The daemon's control cache: the files are looked at most once a second (ControlCache
    stats some fifty files per look, and the daemon asks several times per message), at
    once after ``refresh()`` (HUP), and each new problem qmail would silently ignore is
    logged once as a qmail-send style warning line."""

    def __init__(self, home: Home, interval: float = 1.0, log: SendLog | None = None) -> None:
        def report(findings: tuple[Finding, ...]) -> None:
            for f in findings:
                if log is not None:
                    log.warning(str(f))
                else:
                    print(f"{PROG}: warning: {f}", file=sys.stderr)

        super().__init__(home, max_age=interval, on_findings=report)


class RunError(Exception):
    """The daemon cannot start; the text says why."""


@dataclass
class RunConfig:
    """What ``pyqmail run`` was asked to start."""

    home: Home
    smtp: list[tuple[str, int]] = field(default_factory=list)
    qmqp: list[tuple[str, int]] = field(default_factory=list)
    qmtp: list[tuple[str, int]] = field(default_factory=list)
    # TLS doors (smtp/tls.py): 465 implicit TLS (RFC 8314), 587 submission with STARTTLS
    smtps: list[tuple[str, int]] = field(default_factory=list)
    submission: list[tuple[str, int]] = field(default_factory=list)
    log: BinaryIO | None = None
    stop_timeout: float = STOP_TIMEOUT


class Daemon:
    """The running MTA: spawner, scheduler, remote agent and listeners in one event loop."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.home = cfg.home
        self.log = SendLog(cfg.log)
        self.ctl = SteadyControl(self.home, log=self.log)
        self.spawner: WorkerPoolLocal | None = None
        self.scheduler: Scheduler | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.smtp: SmtpServer | None = None
        self.bound: list[tuple[str, str, int]] = []  # (kind, host, port) actually bound
        self._stop = asyncio.Event()

    def prepare(self) -> None:
        """Everything that must happen before threads exist (controls, recovery, fork)."""
        home = self.home
        if not (home.root / "control").is_dir():
            raise RunError(f"unable to switch to home directory {home.root}")
        if not home.queue.is_dir():
            raise RunError(f"unable to switch to queue directory {home.queue}")
        try:
            ctl = load(home)
        except ControlError as e:
            raise RunError(f"unable to read controls: {e}") from e
        warn_if_root_single_user(home, PROG)
        clean_stale(QueuePaths(home.queue))
        # enough for concurrencylocal (a HUP that raises it beyond this queues deliveries)
        workers = min(64, max(10, ctl.concurrencylocal))
        self.spawner = WorkerPoolLocal(home, self.ctl, workers=workers)
        self.spawner.start()

    async def serve(self) -> None:
        """Start every part, run until ``stop()``, then shut down in order."""
        loop = asyncio.get_running_loop()
        spawner = self.spawner
        assert spawner is not None, "prepare() first"
        agent = RemoteAgent(self.home, self.ctl)
        agent.reset_tcpto()  # qmail-rspawn zeroes lock/tcpto when qmail starts
        sched = Scheduler(
            self.home,
            lambda: load(self.home),
            local=spawner.deliver,
            remote=agent.deliver,
            log=self.log,
            term_timeout=self.cfg.stop_timeout,
        )
        self.scheduler = sched
        submitter = qsubmit.submitter(self.home, notify=sched.notify)
        sched.submitter = submitter
        await self._listen(submitter)
        for sig, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.hup),
            (signal.SIGALRM, sched.alarm),
        ):
            loop.add_signal_handler(sig, handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            await sched.start()
        except StartError as e:
            self.log.alert(f"cannot start: {e}")
            await self._close_listeners()
            raise RunError(str(e)) from e
        cleaner = asyncio.create_task(self._cleaner())
        try:
            await self._stop.wait()
        finally:
            cleaner.cancel()
            await self._close_listeners()
            await sched.stop()
            await agent.close()
            await spawner.close()

    async def _listen(self, submitter: qsubmit.Submitter) -> None:
        smtp = _server_class()(self.home, self.ctl, submitter)
        self.smtp = smtp
        for host, port in self.cfg.smtp:
            server = await smtp.start(host, port)
            self._record(server, "smtp")
        for door, addrs in smtp_doors(self.cfg):
            for host, port in addrs:
                self._record(await smtp.start(host, port, door), door.value)
        if self.cfg.qmqp:
            from pyqmail.inject.qmqp import QmqpServer, loopback_only_note

            qmqp = QmqpServer(self.home, self.ctl, submitter)
            for host, port in self.cfg.qmqp:
                self._record(await qmqp.start(host, port), "qmqp")
            if (note := loopback_only_note(self.home, qmqp.rules)) is not None:
                self.log.warning(note)
        if self.cfg.qmtp:
            from pyqmail.inject.qmtp import QmtpServer

            qmtp = QmtpServer(self.home, self.ctl, submitter)
            for host, port in self.cfg.qmtp:
                self._record(await qmtp.start(host, port), "qmtp")

    def _record(self, server: asyncio.AbstractServer, kind: str) -> None:
        self.servers.append(server)
        for sock in getattr(server, "sockets", ()):
            name = sock.getsockname()
            self.bound.append((kind, str(name[0]), int(name[1])))

    async def _close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers.clear()
        if self.smtp is not None:
            await self.smtp.aclose()  # the messages being committed get their replies

    async def _cleaner(self) -> None:
        """qmail-clean's periodic sweep of what crashed writers left."""
        loop = asyncio.get_running_loop()
        paths = QueuePaths(self.home.queue)
        while True:
            await asyncio.sleep(CLEAN_INTERVAL)
            with contextlib.suppress(OSError):
                await loop.run_in_executor(None, clean_stale, paths)

    def hup(self) -> None:
        """HUP: every part sees the control files as they are now."""
        self.ctl.refresh()
        if self.scheduler is not None:
            self.scheduler.reload()

    def stop(self) -> None:
        """TERM/INT: begin an orderly shutdown (safe to call more than once)."""
        self._stop.set()


def smtp_doors(cfg: RunConfig) -> list[tuple[Door, list[tuple[str, int]]]]:
    """The SMTP listeners beyond port 25, with the door each one is."""
    return [(Door.SMTPS, cfg.smtps), (Door.SUBMISSION, cfg.submission)]


def _server_class() -> type[SmtpServer]:
    return _DaemonSmtpServer


class _DaemonSmtpServer(SmtpServer):
    """The daemon's SMTP listener: with no tcp.smtp.cdb, loopback clients may relay.

    That is qmail's documented starting rule set (``127.:allow,RELAYCLIENT=""``), so local
    programs and tests on 127.0.0.1/::1 can send anywhere out of the box, while every other
    client is held to rcpthosts. Once a tcp.smtp.cdb exists, it alone decides.
    """

    def decide(self, ip: str) -> Decision | None:
        if not self.rules_path.exists() and netaddr.is_loopback(ip):
            return Decision(True, {"RELAYCLIENT": ""}, None)
        return super().decide(ip)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(cfg: RunConfig) -> int:
    """Run the MTA until TERM/INT; 0 after a clean stop, 111 if it cannot start."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    if os.geteuid() == 0 and not cfg.home.single_user:
        from pyqmail.daemon.split import run_split

        return run_split(cfg)
    daemon = Daemon(cfg)
    try:
        daemon.prepare()
    except RunError as e:
        print(f"alert: cannot start: {e}", file=sys.stderr)
        return 111
    loop = _new_loop()
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
    return 0


def main_args(
    home: Home,
    smtp: Sequence[str],
    qmqp: Sequence[str],
    qmtp: Sequence[str] = (),
    *,
    smtps: Sequence[str] = (),
    submission: Sequence[str] = (),
) -> RunConfig:
    """A RunConfig from command-line strings (raises ValueError for a bad address)."""
    return RunConfig(
        home,
        smtp=[parse_listen(a, 25) for a in smtp],
        qmqp=[parse_listen(a, 628) for a in qmqp],
        qmtp=[parse_listen(a, 209) for a in qmtp],
        smtps=[parse_listen(a, 465) for a in smtps],
        submission=[parse_listen(a, 587) for a in submission],
    )
