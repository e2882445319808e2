"""The parts ``pyqmail run`` is assembled from, written once for both arrangements.

daemon/run.py puts every part in one process (single-user mode, or an ordinary user);
daemon/split.py runs them as separate processes under qmail's users (root, multi-user).
Both take from here:

* :class:`RunConfig` — what ``pyqmail run`` was asked to start (the listen addresses, the
  log, the stop timeout);
* :func:`check_home` — the start-up checks both make before anything starts (home,
  queue, controls readable), each failure a :class:`RunError` saying why;
* :class:`SteadyControl` — the daemon's control cache (looked at once a second);
* :func:`start_listeners` — the SMTP, QMQP and QMTP listeners a RunConfig names, as
  :class:`Listeners` (closed in one step; with ``serving=False`` bound but accepting
  nothing until ``start_serving()``, for a process that has yet to drop privileges);
  :class:`DaemonSmtpServer` is the SMTP listener with the daemon's loopback relay rule;
* :func:`make_scheduler`, :func:`start_sending`, :func:`stop_sending` — qmail-send with
  its local and remote agents, started with qmail-send's alert on failure and stopped in
  order (the scheduler's deliveries in flight first, then the agents);
* :class:`CleanSweep` — qmail-clean's periodic sweep of what crashed writers left, in a
  thread of the process that may remove queue files.

Nothing here forks, drops privileges or installs signal handlers: that is the
arrangements' job, as is which process each part lives in.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from pyqmail import netaddr
from pyqmail.control import Control, ControlCache, ControlError, Finding, load
from pyqmail.daemon import http
from pyqmail.daemon.http import HttpAuth
from pyqmail.home import Home
from pyqmail.logsink import LogSink
from pyqmail.outcome import Outcome
from pyqmail.queue.clean import Cleaner
from pyqmail.queue.contract import BlockingSubmitter, Submitter
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import clean_stale
from pyqmail.send.log import SendLog
from pyqmail.send.manager import Scheduler, StartError
from pyqmail.send.rcptverdict import rcpt_checks as make_rcpt_checks
from pyqmail.send.stats import SendStats
from pyqmail.smtp.authcheck import AuthChecker
from pyqmail.smtp.netdoor import NetstringListener
from pyqmail.smtp.passwords import PasswordCheck
from pyqmail.smtp.protocol import Door
from pyqmail.smtp.rcptcheck import RcptChecks
from pyqmail.smtp.server import PasswordChecker, SmtpServer
from pyqmail.tcprules import Decision

PROG = "pyqmail run"
CLEAN_INTERVAL = 76431.0  # qmail-send's period for removing what crashed writers left
STOP_TIMEOUT = 60.0


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
    # --rules: the site's tcprules cdb where it is (qmail-smtpd under `tcpserver -x PATH`);
    # None: HOME/control/tcp.smtp.cdb
    rules: Path | None = None
    # --http ADDR:PORT (metrics and the status page, daemon/http.py); --log-format and
    # --log-stamps (logsink.py); session_log=False keeps SMTP session lines out of the log
    http: tuple[str, int] | None = None
    log_format: str = "qmail"
    log_stamps: str = "none"
    session_log: bool = True

    def listens(self) -> bool:
        """Whether any listener is asked for (else only the queue is delivered)."""
        return bool(self.smtp or self.smtps or self.submission or self.qmqp or self.qmtp)

    def smtp_doors(self) -> list[tuple[Door, list[tuple[str, int]]]]:
        """The SMTP listeners beyond port 25, with the door each one is."""
        return [(Door.SMTPS, self.smtps), (Door.SUBMISSION, self.submission)]


def check_home(home: Home) -> Control:
    """The checks made before any part starts; the controls as read, or RunError."""
    if not (home.root / "control").is_dir():
        raise RunError(f"unable to switch to home directory {home.root}")
    if not home.queue.is_dir():
        raise RunError(f"unable to switch to queue directory {home.queue}")
    try:
        return load(home)
    except (ControlError, OSError) as e:
        raise RunError(f"unable to read controls: {e}") from e


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


# -- the listeners ---------------------------------------------------------------------------


class DaemonSmtpServer(SmtpServer):
    """The daemon's SMTP listener: with no tcp.smtp.cdb, loopback clients may relay.

    That is qmail's documented starting rule set (``127.:allow,RELAYCLIENT=""``), so local
    programs and tests on 127.0.0.1/::1 can send anywhere out of the box, while every other
    client is held to rcpthosts. Once a tcp.smtp.cdb exists, it alone decides.
    """

    def decide(self, ip: str) -> Decision | None:
        if not self.rules_path.exists() and netaddr.is_loopback(ip):
            return Decision(True, {"RELAYCLIENT": ""}, None)
        return super().decide(ip)


class Listeners:
    """The servers ``start_listeners`` bound, and what they bound."""

    def __init__(self, smtp: DaemonSmtpServer) -> None:
        self.smtp = smtp
        self.doors: list[NetstringListener] = []  # QMQP and QMTP, drained with SMTP
        self.servers: list[asyncio.AbstractServer] = []
        self.bound: list[tuple[str, str, int]] = []  # (kind, host, port) actually bound

    def add(self, kind: str, server: asyncio.AbstractServer) -> None:
        """Keep ``server`` (closed by ``close()``) and note what it bound."""
        self.servers.append(server)
        for sock in getattr(server, "sockets", ()):
            name = sock.getsockname()
            self.bound.append((kind, str(name[0]), int(name[1])))

    async def start_serving(self) -> None:
        """Accept connections on listeners bound with ``serving=False``."""
        for server in self.servers:
            await server.start_serving()

    async def close(self) -> None:
        """Stop accepting; SMTP sessions in DATA finish (control/timeoutdrain), the others
        get 421 (SmtpServer.drain), and so do QMQP and QMTP requests in progress, idle
        connections closing at once (NetstringListener.drain), all within the same bound;
        then the messages being committed get their replies."""
        for server in self.servers:
            server.close()
        await asyncio.gather(self.smtp.drain(), *(d.drain() for d in self.doors))
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers.clear()
        await self.smtp.aclose()


async def start_listeners(
    cfg: RunConfig,
    ctl: ControlCache,
    submitter: BlockingSubmitter,
    *,
    warn: Callable[[str], None],
    smtp_submitter: Submitter | None = None,
    serving: bool = True,
    sink: LogSink | None = None,
    rcpt_checks: RcptChecks | None = None,
    passwords: PasswordChecker | None = None,
) -> Listeners:
    """Bind the SMTP, QMQP and QMTP listeners ``cfg`` names (OSError if one cannot bind).

    Messages are queued through ``submitter``, SMTP's through ``smtp_submitter`` when
    given (root mode's committer process). ``warn`` gets the start-up warning that QMQP
    serves loopback clients only. With ``serving=False`` every socket is bound but accepts
    nothing until ``Listeners.start_serving()``.

    SMTP checks recipients at RCPT (smtp/rcptcheck.py) with ``rcpt_checks``; the default
    looks local addresses up in this process (single-user mode; root mode passes the
    client of its lookup process, daemon/rcptlookup.py).

    AUTH checks passwords with ``passwords``; the default reads the home's control files
    in this process (smtp/passwords.py; root mode passes the client of its password
    process, daemon/authproc.py).
    """
    home = cfg.home
    smtp = DaemonSmtpServer(
        home,
        ctl,
        smtp_submitter if smtp_submitter is not None else submitter,
        rules=cfg.rules,
        sink=sink if cfg.session_log else None,
        limits_from_control=True,  # control/concurrencyincoming, concurrencyperip
        rcpt_checks=rcpt_checks if rcpt_checks is not None else make_rcpt_checks(home),
        auth=AuthChecker(home.control),  # SPF, DKIM, DMARC of mail from the network
        passwords=passwords if passwords is not None else PasswordCheck(home),
    )
    out = Listeners(smtp)
    for host, port in cfg.smtp:
        out.add("smtp", await smtp.start(host, port, start_serving=serving))
    for door, addrs in cfg.smtp_doors():
        for host, port in addrs:
            out.add(door.value, await smtp.start(host, port, door, start_serving=serving))
    if cfg.qmqp:
        from pyqmail.smtp.qmqpd import QmqpServer, loopback_only_note

        qmqp = QmqpServer(home, ctl, submitter)
        out.doors.append(qmqp)
        for host, port in cfg.qmqp:
            out.add("qmqp", await qmqp.start(host, port, start_serving=serving))
        if (note := loopback_only_note(home, qmqp.rules)) is not None:
            warn(note)
    if cfg.qmtp:
        from pyqmail.smtp.qmtpd import QmtpServer

        qmtp = QmtpServer(home, ctl, submitter)
        out.doors.append(qmtp)
        for host, port in cfg.qmtp:
            out.add("qmtp", await qmtp.start(host, port, start_serving=serving))
    return out


# -- qmail-send and its agents ----------------------------------------------------------------


class LocalAgent(Protocol):
    """The local channel's agent: the worker pool or the root spawner."""

    async def deliver(self, mess: Path, sender: str, recipient: str) -> Outcome: ...
    async def close(self) -> None: ...


class RemoteAgentLike(Protocol):
    """The remote channel's agent: RemoteProcess (its own process: as qmailr in root mode, as
    the invoking user otherwise) or a RemoteAgent in the calling process."""

    async def deliver(self, mess: Path, sender: str, recipients: list[str]) -> list[Outcome]: ...
    async def close(self) -> None: ...


def make_scheduler(
    home: Home,
    local: LocalAgent,
    remote: RemoteAgentLike,
    log: SendLog,
    *,
    stop_timeout: float,
    submitter: BlockingSubmitter | None = None,
    cleaner: Cleaner | None = None,
    control_socket: socket.socket | bool = False,
) -> Scheduler:
    """qmail-send over the two agents; it re-reads the controls itself (``load``).
    ``control_socket``: serve `pyqmail queue` (send/admin.py), as Scheduler takes it."""
    return Scheduler(
        home,
        lambda: load(home),
        local=local.deliver,
        remote=remote.deliver,
        submitter=submitter,
        log=log,
        term_timeout=stop_timeout,
        cleaner=cleaner,
        control_socket=control_socket,
    )


async def start_sending(sched: Scheduler, log: SendLog) -> None:
    """Take lock/sendmutex and rebuild the schedule; qmail-send's alert and RunError if not."""
    try:
        await sched.start()
    except StartError as e:
        log.alert(f"cannot start: {e}")
        raise RunError(str(e)) from e


async def stop_sending(sched: Scheduler, local: LocalAgent, remote: RemoteAgentLike) -> None:
    """Let the deliveries in flight finish (bounded), then close the agents."""
    await sched.stop()
    await remote.close()
    await local.close()


# -- qmail-clean's sweep ---------------------------------------------------------------------


class CleanSweep:
    """Every CLEAN_INTERVAL, remove what crashed writers left (pid files, unclaimed mess,
    intd without todo: queue/recover.py), as qmail-send has qmail-clean do; in a daemon
    thread, since the sweep is file work and its process may have no event loop (root
    mode's queue part). Run it in the queue owner's process."""

    def __init__(self, paths: QueuePaths, interval: float = CLEAN_INTERVAL) -> None:
        self.paths = paths
        self.interval = interval
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="qmail-clean", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                clean_stale(self.paths)


# -- the HTTP door: metrics and the status page (daemon/http.py) --------------------------


def check_http(cfg: RunConfig) -> HttpAuth | None:
    """Before anything starts: a non-loopback ``--http`` needs control/httpauth (RunError)."""
    if cfg.http is None:
        return None
    try:
        return http.check_http(cfg.home, cfg.http[0])
    except http.HttpError as e:
        raise RunError(str(e)) from e


async def start_http(
    cfg: RunConfig,
    auth: HttpAuth | None,
    smtp_snapshot: http.SmtpSnapshot,
    send_stats: SendStats | None,
    *,
    sock: socket.socket | None = None,
) -> http.StatusServer | None:
    """The metrics and status server ``--http`` asks for (None without it)."""
    if cfg.http is None:
        return None
    srv = http.StatusServer(cfg.home, smtp_snapshot=smtp_snapshot, send_stats=send_stats,
                            auth=auth)  # fmt: skip
    await srv.start(cfg.http[0], cfg.http[1], sock=sock)
    return srv
