"""The asyncio SMTP listener (the stdio adapter, qmail-smtpd under tcpserver, is smtp/stdio.py).

Both drive :class:`~pyqmail.smtp.protocol.SmtpServerConnection` and hand the message to a
queue :class:`~pyqmail.queue.contract.Submitter`; neither decides anything about SMTP.

* :class:`SmtpServer` is the listener ``pyqmail run`` and ``pyqmail smtpd --listen`` use:
  asyncio (uvloop when installed), IPv4 and IPv6, one tcprules lookup per connection in
  tcpserver's order (default ``control/tcp.smtp.cdb``; a missing file allows everyone, as
  tcpserver without ``-x``; an unreadable one drops the connection; like the control
  files it is re-checked at most every ``control_ttl`` seconds), the environment
  tcpserver would set plus the rule's variables, a connection limit and a per-IP limit.
  The front door (:class:`SmtpServer`'s "front door" methods): with ``limits_from_control``
  (``pyqmail run``) the limits are
  ``control/concurrencyincoming`` and ``control/concurrencyperip`` when set (re-read with
  the other control files; a client over either gets ``421`` and is closed, never a 220:
  refused rather than held back as tcpserver ``-c`` holds it, so a flood cannot fill the
  kernel's backlog with clients that wait); ``control/rbllist`` is looked up before the
  greeting (smtp/rbl.py, rblsmtpd's rules, without blocking other sessions); with
  ``control/greylist`` each RCPT asks smtp/greylist.py.
  The queue's file work runs outside the event loop: when this process may write the
  queue, its messages stream to a committer process (queue/committer.py: qmail-queue's
  job, commits whatever has gathered in one batch with ``writer.commit_many``), so no
  thread of the listener competes with the loop for the GIL; a client is held back
  while that process lags. ``PYQMAIL_SMTP_COMMIT=thread`` keeps the writer in this
  process with one committer thread instead (queue/committhread.py). Whatever the
  submitter, a message's commit is one ``await`` of the queue contract
  (queue/contract.py), and ``250 ok`` is written only after it returned.
  STARTTLS (control/servercert.pem, smtp/tls.py) upgrades the transport in place with
  ``loop.start_tls``. Reading is paused from the STARTTLS line until the handshake, so
  nothing the client sent before it reaches the TLS layer or the core. A listener
  started with ``Door.SMTPS`` (port 465) is a TLS server from the first byte (the
  certificate is switched per handshake: CertStore.front_context).
* ``qmail-smtpd`` under tcpserver (the socket on fd 0/1) is :func:`pyqmail.smtp.stdio.run_stdio`;
  its STARTTLS runs over ssl.MemoryBIO (smtp/tlsbio.py).

Checks of incoming mail (smtp/authcheck.py; ``auth=``): for a connection they apply to, the
protocol's MAIL waits for SPF (``MailCheck`` -> :meth:`_SmtpProtocol._check_mail`), the
message is spooled by smtp/authspool.py, and the end of DATA asks its verdict before the
commit (:meth:`_Message.verdict`): a refusal aborts the message, else the commit queues it
with the Authentication-Results header.

AUTH (protocol.py): the password check (smtp/passwords.py, or root mode's password
process, daemon/authproc.py: ``passwords=``) runs in a worker thread, never in the event
loop; the failures record (smtp/authlimit.py) is one per listener process; a failure's
:class:`Pause` is a timer with reading paused. An authenticated session's messages bypass
the checks of incoming mail and are DKIM-signed by the process that writes the queue
(``begin(sign=True)``).
Stopping (SIGTERM, :meth:`SmtpServer.drain`): the listening sockets close at once; a
session receiving or committing a message goes on until its reply, every other session
gets ``421 shutting down`` and is closed (the protocol's ``shutdown``); sessions still
open after ``control/timeoutdrain`` seconds are cut off, their unacknowledged message
aborted (a commit already under way completes: the client may send it again, nothing
acknowledged is lost).

An unexpected exception never reaches the client: it is logged and the client gets a 451
and the connection is closed; any message in progress is aborted (nothing queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

import dns.asyncresolver

from pyqmail import cdb, listener, netaddr, tcprules
from pyqmail.control import Control, ControlCache, ControlError
from pyqmail.home import Home
from pyqmail.logsink import LogSink
from pyqmail.outcome import Status
from pyqmail.queue import codes
from pyqmail.queue import submit as qsubmit
from pyqmail.queue.committer import CommitProcess
from pyqmail.queue.contract import BlockingSubmission, QueueError, Reply, Submission, Submitter
from pyqmail.resolver import make_resolver
from pyqmail.smtp import rbl, replies
from pyqmail.smtp.authcheck import AuthChecker, ConnectionChecks, Mode
from pyqmail.smtp.authlimit import MemoryFailures
from pyqmail.smtp.authsenders import FILE as AUTHSENDERS
from pyqmail.smtp.authsenders import AuthSendersFile
from pyqmail.smtp.authspool import CheckedSubmission, CheckingSubmitter
from pyqmail.smtp.greylist import Greylist, greylist_path
from pyqmail.smtp.passwords import Verdict
from pyqmail.smtp.protocol import (
    AuthNote,
    CheckPassword,
    CheckRcpt,
    Close,
    DataChunk,
    Door,
    Event,
    Limits,
    MailCheck,
    MessageAbort,
    MessageEnd,
    MessageStart,
    Note,
    Pause,
    Send,
    SmtpServerConnection,
    StartTls,
    State,
    TlsOffer,
)
from pyqmail.smtp.rcptcheck import RcptChecks, reply_for
from pyqmail.smtp.session import CdbCache, IPAddress, Session, SessionError, local_addresses
from pyqmail.smtp.sessionlog import SessionLog, SmtpStats
from pyqmail.smtp.tls import SERVERCERT, CertStore
from pyqmail.smtp.tls import info as tls_info

log = logging.getLogger("pyqmail.smtpd")

LINGER = 2.0  # seconds a closing connection may keep sending before we drop it
DRAIN = 30.0  # control/timeoutdrain's default (seconds a stopping server lets a message finish)
_CHECKING: set[asyncio.Task[None]] = set()  # recipient checks running in worker threads

_PASSWORDS: ThreadPoolExecutor | None = None


def _password_pool() -> ThreadPoolExecutor:
    """The threads password checks run in: their own, so a flood of AUTH attempts waits
    here and never takes the threads of recipient checks and commits."""
    global _PASSWORDS
    if _PASSWORDS is None:
        _PASSWORDS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="auth-check")
    return _PASSWORDS


_S = TypeVar("_S", bound=Submission)
_S_co = TypeVar("_S_co", bound=Submission, covariant=True)


class _Opens(Protocol[_S_co]):
    def begin(self, *, origin: str = ..., received: bytes = ...) -> _S_co: ...


class PasswordChecker(Protocol):
    """What AUTH needs (smtp/passwords.py's PasswordCheck, daemon/authproc.py's client)."""

    def available(self) -> bool: ...
    def check(self, user: bytes, password: bytes, remote_ip: str = "") -> Verdict: ...


class _Message(Generic[_S]):
    """The queue side of one session: at most one message open at a time."""

    __slots__ = ("_error", "_pending", "_rcpts", "_sender", "origin", "plain", "submitter")

    def __init__(
        self, submitter: _Opens[_S], origin: str = "network", plain: object = None
    ) -> None:
        """``plain``: the submitter for an authenticated session's messages, which it
        begins with ``sign=True`` (DKIM, queue/submit.py); default ``submitter``."""
        self.submitter = submitter
        self.plain = plain if plain is not None else submitter
        self.origin = origin  # qmail-queue's "invoked from network" unless told otherwise
        self._pending: _S | None = None
        self._sender = b""
        self._rcpts: tuple[bytes, ...] = ()
        self._error: Reply | None = None

    def start(self, ev: MessageStart) -> bool:
        self.abort()
        try:
            if ev.auth is not None:
                self._pending = self.plain.begin(  # type: ignore[attr-defined]
                    origin=self.origin, received=ev.received, sign=True
                )
            else:
                self._pending = self.submitter.begin(origin=self.origin, received=ev.received)
        except QueueError as e:
            log.warning("queue refused a new message: %s", e)
            return False
        except Exception:
            log.exception("unable to start a queue entry")
            return False
        self._sender, self._rcpts, self._error = ev.sender, ev.recipients, None
        return True

    def write(self, data: bytes) -> None:
        p = self._pending
        if p is None or self._error is not None:
            return
        try:
            p.write(data)
        except QueueError as e:
            self._error = Reply.of(e)
        except Exception:
            log.exception("queue write failed")
            self._error = Reply(codes.WRITE_ERROR)

    def _take(self) -> _S | Reply:
        """Take the open message for committing (its owner from now on: a later abort
        does nothing), or the reply when there is nothing to commit."""
        p, self._pending = self._pending, None
        if p is None:
            return Reply(codes.INTERNAL_BUG)
        if self._error is not None:
            with contextlib.suppress(Exception):
                p.abort()
            return self._error
        return p

    async def verdict(self) -> bytes | None:
        """The checks of incoming mail on the message (a refusal reply), if it has them."""
        p = self._pending
        if isinstance(p, CheckedSubmission) and self._error is None:
            return await p.verdict()
        return None

    async def commit(self) -> Reply:
        """Make the message durable (from the event loop); the queue's reply."""
        p = self._take()
        if isinstance(p, Reply):
            return p
        return await p.commit(self._sender, self._rcpts)

    def commit_blocking(self: _Message[BlockingSubmission]) -> Reply:
        """The same without an event loop (qmail-smtpd on stdio)."""
        p = self._take()
        if isinstance(p, Reply):
            return p
        return p.commit_blocking(self._sender, self._rcpts)

    def abort(self) -> None:
        p, self._pending = self._pending, None
        if p is not None:
            try:
                p.abort()
            except Exception:
                log.exception("queue abort failed")


def smtp_reply(r: Reply) -> bytes:
    """qmail-smtpd's reply for the queue's: ``250 ok T qp P``, else ``554``/``451`` + text."""
    if r.ok:
        return replies.accepted(int(time.time()), r.qp)
    return codes.smtp_reply(r.code, r.custom)


class SmtpServer:
    """The SMTP listener (see the module docstring). ``start`` binds and returns the server."""

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        submitter: Submitter,
        *,
        rules: Path | None = None,
        max_conns: int = 100,
        max_per_ip: int = 20,
        limits: Limits | None = None,
        greet_delay: float = 0.0,
        linger: float = LINGER,
        local_ips: frozenset[IPAddress] | None = None,
        reuse_port: bool = False,
        control_ttl: float = 1.0,
        limit_loopback: bool = False,
        commit_process: bool | None = None,
        ip_key: Callable[[str], str] = netaddr.limit_key,
        tls_ttl: float = 1.0,
        sink: LogSink | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
        rbl_timeout: float = rbl.TIMEOUT,
        limits_from_control: bool = False,
        rcpt_checks: RcptChecks | None = None,
        auth: AuthChecker | None = None,
        passwords: PasswordChecker | None = None,
        auth_failures: MemoryFailures | None = None,
    ) -> None:
        self.home = home
        self.passwords = passwords  # SMTP AUTH's password check; None: AUTH not offered
        self.auth_failures = auth_failures or MemoryFailures()
        self._auth_ok = False
        self._auth_at = -1e9
        self.authsenders = AuthSendersFile(home.control / AUTHSENDERS)
        self.rcpt_checks = rcpt_checks  # recipient checks at RCPT (smtp/rcptcheck.py)
        self.auth = auth  # checks of incoming mail (SPF, DKIM, DMARC); None: none
        self.ctl = ctl
        self.submitter = submitter
        if commit_process is None:
            commit_process = os.environ.get("PYQMAIL_SMTP_COMMIT", "process") != "thread"
        self.commit_process = commit_process
        self.proc: CommitProcess | None = None
        self._held_back: set[_SmtpProtocol] = set()  # not read while the committer lags
        self.rules_path = rules if rules is not None else home.control / "tcp.smtp.cdb"
        self.max_conns = max_conns
        # Loopback clients are local programs, exempt from the per-IP limit as Postfix
        # exempts $mynetworks (smtpd_client_event_limit_exceptions); the total still holds.
        # What max_per_ip counts: an IPv4 address, an IPv6 /64 (netaddr.limit_key).
        self.per_ip = listener.PerIp(max_per_ip, ip_key, exempt_loopback=not limit_loopback)
        self.limits = limits or Limits()
        self.greet_delay = greet_delay
        self.linger = linger
        self.local_ips = local_ips if local_ips is not None else local_addresses()
        self.reuse_port = reuse_port
        self.control_ttl = control_ttl
        self._ctl: Control | None = None
        self._ctl_at = 0.0
        self.conns = 0
        self._rules = listener.Rules(self.rules_path, ttl=control_ttl)
        self._more = CdbCache(home.control / "morercpthosts.cdb", control_ttl)
        # control/servercert.pem, re-checked at most every tls_ttl seconds (smtp/tls.py)
        self.certs = CertStore(home.control / SERVERCERT, ttl=tls_ttl)
        self._certs_loaded = False
        self._servers: list[asyncio.AbstractServer] = []
        self.base_env: dict[str, str] = {}
        if "DATABYTES" in os.environ:
            self.base_env["DATABYTES"] = os.environ["DATABYTES"]
        self.accepted = 0  # messages acknowledged with 250 (for logs and tests)
        # session log lines (None: none written) and the counters the metrics read
        self.sink = sink
        self.stats = SmtpStats()
        # pyqmail run's listener takes its limits from control/ (one listener process);
        # `pyqmail smtpd --listen` from its options (shared among its workers)
        self.limits_from_control = limits_from_control
        self.default_conns, self.default_per_ip = max_conns, max_per_ip
        self._resolver = resolver
        self.rbl_timeout = rbl_timeout
        self._greylist: Greylist | None = None
        self.sessions: set[_SmtpProtocol] = set()  # open connections past the limits
        self.stopping = False  # drain() began: new connections get 421
        self._gone: asyncio.Event | None = None  # set when the last session has ended

    async def start(
        self, host: str, port: int, door: Door = Door.SMTP, *, start_serving: bool = True
    ) -> asyncio.AbstractServer:
        """Listen on ``host:port`` (``::`` or an IPv6 address for IPv6; port 0 = any).

        With ``start_serving=False`` the socket is bound but accepts nothing until
        ``await server.start_serving()`` (the daemon's root mode: after the drop). The
        certificate is loaded here, at the first start (as root in root mode, before the
        listener drops to qmaild): a bad or missing one is a warning, not a failure."""
        self._use_commit_process()
        try:
            if self.control().rcpthosts is None:
                log.warning(
                    "warning: control/rcpthosts is missing: this server is an open relay "
                    "(it relays mail for anyone to anywhere, as qmail does)"
                )
        except ControlError as e:
            log.warning("warning: %s", e)
        if not self._certs_loaded:
            self._certs_loaded = True
            self.certs.load()
        loop = asyncio.get_running_loop()
        implicit = door is Door.SMTPS
        server = await loop.create_server(
            lambda: _SmtpProtocol(self, door),
            host,
            port,
            ssl=self.certs.front_context() if implicit else None,
            ssl_handshake_timeout=60.0 if implicit else None,
            backlog=1024,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            start_serving=start_serving,
        )
        self._servers.append(server)
        return server

    # -- per connection ---------------------------------------------------------------

    def decide(self, ip: str) -> tcprules.Decision | None:
        """The tcprules decision; None when the rules file cannot be read (drop)."""
        return self._rules.decide(ip)

    def control(self) -> Control:
        """The control snapshot, re-checked at most every ``control_ttl`` seconds.

        ControlCache stats every control file; once per connection would cost more than
        the rest of the connection set-up, so a change is seen within ``control_ttl``.
        """
        now = time.monotonic()
        if self._ctl is None or now - self._ctl_at >= self.control_ttl:
            self._ctl = self.ctl.get()
            self._ctl_at = now
        return self._ctl

    # -- the front door: limits, block lists, greylisting ----------------------------

    def apply_limits(self) -> None:
        """control/concurrencyincoming and concurrencyperip, when set, over the defaults."""
        if not self.limits_from_control:
            return
        try:
            ctl = self.control()
        except ControlError:
            return  # the connection itself will answer 421 for the controls
        self.max_conns = ctl.concurrencyincoming or self.default_conns
        self.per_ip.limit = ctl.concurrencyperip or self.default_per_ip

    def resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            self._resolver = make_resolver(lifetime=self.rbl_timeout)
        return self._resolver

    def greylist(self, ctl: Control) -> Greylist | None:
        """The greylist database for control/greylist's delay (None: greylisting is off)."""
        if ctl.greylist <= 0:
            if self._greylist is not None:
                self._greylist.close()
                self._greylist = None
            return None
        grey = self._greylist
        if grey is None:
            grey = self._greylist = Greylist(greylist_path(self.home), ctl.greylist)
        grey.delay, grey.expire = ctl.greylist, ctl.greylistexpire
        return grey

    def session(self, env: Mapping[str, str], ctl: Control) -> Session:
        try:
            more = self._more.get()
        except (OSError, cdb.CdbError) as e:
            raise SessionError(f"unable to read morercpthosts.cdb: {e}") from e
        return Session(
            ctl,
            env,
            morercpthosts=more,
            local_ips=self.local_ips,
            check_rcpt=self.rcpt_checks is not None,
        )

    def _use_commit_process(self) -> None:
        """Messages this process would write into the queue itself go to a committer
        process instead (queue/committer.py); other submitters stay as they are."""
        sub = self.submitter
        if self.proc is not None:
            return
        if isinstance(sub, CommitProcess):  # made by the caller (root mode: as qmailq)
            proc = sub
        elif (
            self.commit_process
            and isinstance(sub, qsubmit.QueueSubmitter)
            and qsubmit.can_write_queue(self.home)
        ):
            proc = CommitProcess(self.home, notify=sub.notify)
        else:
            return
        proc.on_resume = self._resume_held
        try:
            proc.start()
        except QueueError as e:
            log.warning("%s; each message will try again", e)
        self.proc = proc
        self.submitter = proc

    def _resume_held(self) -> None:
        held, self._held_back = self._held_back, set()
        for proto in held:
            proto.resume_if_wanted()

    async def drain(self, timeout: float | None = None) -> int:
        """SIGTERM (see the module docstring): stop accepting, let the messages in
        progress get their replies for at most ``timeout`` seconds (None: the
        control/timeoutdrain value), 421 the others; the number of sessions cut off."""
        self.stopping = True
        for server in self._servers:
            server.close()
        if timeout is None:
            try:
                timeout = float(self.control().timeoutdrain)
            except ControlError:
                timeout = DRAIN
        for proto in list(self.sessions):
            proto.shutdown()
        if self.sessions:
            self._gone = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), max(timeout, 0.0))
        cut = list(self.sessions)
        for proto in cut:
            log.warning("stopping: cut off the session with %s after %g s", proto.ip, timeout)
            proto.abort()
        if cut:
            await asyncio.sleep(0)  # let connection_lost run for the aborted transports
        return len(cut)

    def _session_ended(self, proto: _SmtpProtocol) -> None:
        self.sessions.discard(proto)
        if not self.sessions and self._gone is not None:
            self._gone.set()

    async def aclose(self) -> None:
        """After the listeners are closed: wait for the messages being committed."""
        if self.proc is not None:
            await self.proc.close()

    def auth_available(self) -> bool:
        """Is a password source configured? (re-checked at most every control_ttl)"""
        pw = self.passwords
        if pw is None:
            return False
        now = time.monotonic()
        if now - self._auth_at >= self.control_ttl:
            try:
                self._auth_ok = pw.available()
            except Exception:
                log.exception("password source check failed")
                self._auth_ok = False
            self._auth_at = now
        return self._auth_ok

    def auth_checks(self, session: Session, ctl: Control, ip: str) -> ConnectionChecks | None:
        """The checks of incoming mail for this connection, if any apply to it."""
        if self.auth is None or ctl.me is None:
            return None
        policy = self.auth.applies(relayclient=session.relayclient is not None)
        return None if policy is None else self.auth.connection(policy, ctl.me, ip)

    def submitter_for(self, env: Mapping[str, str]) -> Submitter:
        """A rule may set QMAILQUEUE for its clients (a per-client filter), as with tcpserver."""
        program = env.get("QMAILQUEUE")
        if program:
            return qsubmit.ProgramSubmitter(self.home, program)
        return self.submitter


class _SmtpProtocol(asyncio.Protocol):
    """One connection: bytes to the core, events to the transport and the queue."""

    __slots__ = (
        "checks",
        "closing",
        "conn",
        "door",
        "ip",
        "ip_key",
        "last",
        "loop",
        "msg",
        "partial_since",
        "rbl_task",
        "rcpt_ctx",
        "server",
        "size",
        "slog",
        "timeout_s",
        "timer",
        "timer_pause",
        "tls_ctx",
        "transport",
        "write_paused",
    )

    def __init__(self, server: SmtpServer, door: Door = Door.SMTP) -> None:
        self.server = server
        self.door = door
        self.tls_ctx: ssl.SSLContext | None = None
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: SmtpServerConnection | None = None
        self.msg: _Message[Submission] | None = None
        self.checks: ConnectionChecks | None = None
        self.ip = ""
        self.ip_key = ""
        self.last = 0.0
        self.partial_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_pause: asyncio.TimerHandle | None = None
        self.closing = False
        self.timeout_s = 1200.0
        self.write_paused = False
        self.slog: SessionLog | None = None  # the session log (smtp/sessionlog.py)
        self.size = 0  # the current message's data bytes, for the session log
        self.rbl_task: asyncio.Task[None] | None = None
        self.rcpt_ctx: tuple[Control, dict[str, str]] | None = None

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        srv = self.server
        if srv.stopping:  # accepted just before the listening socket closed
            transport.write(replies.SHUTTING_DOWN)
            self._close_now()
            return
        peername = transport.get_extra_info("peername")
        ip = listener.peer_address(peername)[0]
        srv.apply_limits()
        key = srv.per_ip.take(ip) if srv.conns < srv.max_conns else None
        if key is None:
            transport.write(replies.TOO_MANY_CONNS)
            self._close_now()
            return
        self.ip, self.ip_key = ip, key
        srv.conns += 1
        srv.sessions.add(self)
        try:
            decision = srv.decide(ip)
            self.slog = SessionLog(srv.sink, srv.stats, ip)
            self.slog.connect(decision is not None and decision.allow,
                              decision.env if decision is not None else None)  # fmt: skip
            if decision is None or not decision.allow:
                self._close_now()  # tcpserver: closed, nothing written
                return
            env = dict(srv.base_env)
            try:
                ctl = srv.control()
            except ControlError as e:
                log.warning("%s: %s", ip, e)
                transport.write(replies.CONTROLS)
                self._close_now()
                return
            self.timeout_s = float(ctl.timeoutsmtpd)
            env.update(listener.peer_env(peername, transport.get_extra_info("sockname"), ctl.me))
            env.update(decision.env)
            try:
                session = srv.session(env, ctl)
            except (SessionError, ControlError) as e:
                log.warning("%s: %s", ip, e)
                transport.write(replies.CONTROLS)
                self._close_now()
                return
            plain = sub = srv.submitter_for(env)
            self.checks = checks = srv.auth_checks(session, ctl, ip)
            if checks is not None:
                sub = CheckingSubmitter(sub, checks)
            self.msg = _Message(sub, plain=plain)
            hook = checks is not None and checks.policy.spf is not Mode.OFF
            self.rcpt_ctx = (ctl, env)
            offer = srv.certs.get()
            self.tls_ctx = offer.context
            implicit = self.door is Door.SMTPS
            self.conn = SmtpServerConnection(
                session,
                srv.limits,
                tls=TlsOffer.OFF if implicit else offer.offer,
                door=self.door,
                greylist=srv.greylist(ctl),
                mail_hook=hook,
                auth=srv.auth_available(),
                auth_failures=srv.auth_failures,
                authsenders=srv.authsenders.get(),
            )
            self.conn.notes = True  # the session log counts (and maybe logs) each command
            self.last = self.loop.time()
            if implicit:  # the handshake is done (create_server's ssl); the greeting is TLS's
                obj = transport.get_extra_info("ssl_object")
                self.conn.tls_started(tls_info(obj))
            checked = rbl.from_env(env)
            if checked is True and ctl.rbllist:
                self.rbl_task = self.loop.create_task(self._rbl(ctl.rbllist))
            else:
                self._ready(checked if isinstance(checked, rbl.Block) else None)
        except Exception:
            log.exception("connection setup failed for %s", ip)
            transport.write(replies.TEMP_ERROR)
            self._close_now()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.closing:
            return  # lingering after our last reply: input is discarded
        self.last = now = self.loop.time()
        was_partial = conn.partial
        try:
            events = conn.receive_data(data)
        except Exception:
            log.exception("protocol error with %s", self.ip)
            events = conn.fail()
        if conn.partial and not was_partial:
            self.partial_since = now
        self._handle(events)
        proc = self.server.proc
        if proc is not None and proc.paused and self.transport is not None and not self.closing:
            self.transport.pause_reading()
            self.server._held_back.add(self)

    def shutdown(self) -> None:
        """The server stops: 421 now, or after the message in progress (drain())."""
        conn = self.conn
        if conn is None or self.closing:
            return
        self._handle(conn.shutdown())

    def abort(self) -> None:
        """The drain's bound is over: drop the connection (connection_lost aborts any
        message not yet committed)."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def resume_if_wanted(self) -> None:
        """The committer caught up: read again unless something else holds us back."""
        conn = self.conn
        if self.transport is None or conn is None or self.closing or self.write_paused:
            return
        if conn.wants_input:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its commands (no unbounded
        buffer of replies); the timeout ends the connection if it stays that way."""
        self.write_paused = True
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        conn = self.conn
        if self.transport is not None and conn is not None and not self.closing:
            self.last = self.loop.time()
            if conn.wants_input:
                self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self.conn is not None and not self.closing:
            self._handle(self.conn.receive_data(b""))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rbl_task is not None:
            self.rbl_task.cancel()
            self.rbl_task = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.timer_pause is not None:
            self.timer_pause.cancel()
            self.timer_pause = None
        if self.msg is not None:
            self.msg.abort()
        self.server._held_back.discard(self)
        self.server._session_ended(self)
        if self.slog is not None:
            self.slog.disconnect()
            self.slog = None
        if self.ip:
            srv = self.server
            srv.conns -= 1
            srv.per_ip.give_back(self.ip_key)
            self.ip = ""
        self.conn = None
        self.closing = True

    # -- helpers

    async def _rbl(self, zones: tuple[tuple[str, str | None], ...]) -> None:
        """The block lists, then the greeting (rblsmtpd's or ours)."""
        try:
            block = await rbl.lookup(
                self.server.resolver(), self.ip, zones, timeout=self.server.rbl_timeout
            )
        except Exception:
            log.exception("rbl: lookup for %s failed; not refused", self.ip)
            block = None
        self.rbl_task = None
        if self.conn is not None and not self.closing:
            self._ready(block)

    def _ready(self, block: rbl.Block | None) -> None:
        """The connection checks are done: refuse as rblsmtpd, or greet after greet_delay."""
        conn = self.conn
        if conn is None:
            return
        if block is not None:
            reply = block.reply()
            conn.block(reply)
            self.timeout_s = min(self.timeout_s, 60.0)  # rblsmtpd's -t default
            log.warning("rblsmtpd: %s pid %d: %s", self.ip, os.getpid(), reply[:-2].decode())
        if self.server.greet_delay > 0:
            self.timer = self.loop.call_later(self.server.greet_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        if self.conn is None or self.closing:
            return
        self._handle(self.conn.greet())
        self._arm(self.timeout_s)

    def _arm(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(max(delay, 0.01), self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        conn = self.conn
        if conn is None or self.closing:
            return
        if self.msg is not None and conn.state.value in ("wait-end", "wait-mail"):
            self._arm(1.0)  # the queue (or a bounded check) is working; its reply ends the wait
            return
        if conn.state in (State.WAIT_TLS, State.WAIT_AUTH, State.WAIT_PAUSE):
            self._arm(1.0)  # the handshake, the password check and the delay are bounded
            return
        timeout = self.timeout_s
        due = self.last + timeout
        if conn.partial:
            due = min(due, self.partial_since + min(timeout, 120.0))
        now = self.loop.time()
        if now < due:
            self._arm(due - now)
        elif self.write_paused and self.transport is not None:
            # The client neither reads our replies nor sends: nothing more can reach it.
            self.closing = True
            self.transport.abort()
        else:
            self._handle(conn.timeout())

    def _handle(self, events: list[Event]) -> None:
        """Carry out the core's events, in order; one write for all replies."""
        transport = self.transport
        conn = self.conn
        msg = self.msg
        if transport is None or conn is None or msg is None:
            return
        out: list[bytes] = []
        while events:
            nxt: list[Event] = []
            for ev in events:
                kind = type(ev)
                if kind is Send:
                    out.append(ev.data)  # type: ignore[union-attr]
                elif kind is DataChunk:
                    msg.write(ev.data)  # type: ignore[union-attr]
                    self.size += len(ev.data)  # type: ignore[union-attr]
                elif kind is Note:
                    if self.slog is not None:
                        n = cast(Note, ev)
                        self.slog.note(n.verb, n.arg, n.reply)
                elif kind is CheckRcpt:
                    decided = self._check_rcpt(ev)  # type: ignore[arg-type]
                    if decided is None:  # answered later, by _rcpt_done
                        if out:
                            transport.write(b"".join(out))
                        return
                    nxt = decided
                    break
                elif kind is MessageStart:
                    self.size = 0
                    ok = msg.start(ev)  # type: ignore[arg-type]
                    nxt = conn.start_result(ok)
                    break
                elif kind is MessageEnd:
                    if out:
                        transport.write(b"".join(out))
                        out = []
                    transport.pause_reading()
                    self.loop.create_task(self._commit())
                    return
                elif kind is MessageAbort:
                    msg.abort()
                elif kind is StartTls:
                    if out:
                        transport.write(b"".join(out))
                    transport.pause_reading()  # not one more plaintext byte is read
                    self.loop.create_task(self._upgrade())
                    return
                elif kind is MailCheck:
                    if out:
                        transport.write(b"".join(out))
                        out = []
                    transport.pause_reading()
                    self.loop.create_task(self._check_mail(ev))  # type: ignore[arg-type]
                    return
                elif kind is CheckPassword:
                    if out:
                        transport.write(b"".join(out))
                    transport.pause_reading()
                    task = self.loop.create_task(self._check_password(ev))  # type: ignore[arg-type]
                    _CHECKING.add(task)
                    task.add_done_callback(_CHECKING.discard)
                    return
                elif kind is Pause:
                    if out:
                        transport.write(b"".join(out))
                    transport.pause_reading()
                    secs = cast(Pause, ev).seconds
                    self.timer_pause = self.loop.call_later(secs, self._pause_over)
                    return
                elif kind is AuthNote:
                    self._auth_note(cast(AuthNote, ev))
                elif kind is Close:
                    if out:
                        transport.write(b"".join(out))
                    self._linger()
                    return
            events = nxt
        if out:
            transport.write(b"".join(out))
        if not conn.wants_input or self.write_paused:
            transport.pause_reading()

    # -- AUTH: the password check in a worker thread, the failure's delay as a timer

    async def _check_password(self, ev: CheckPassword) -> None:
        checker, conn = self.server.passwords, self.conn
        if conn is None:
            return
        verdict = Verdict.TEMP
        if checker is not None:
            try:
                verdict = await self.loop.run_in_executor(
                    _password_pool(), checker.check, ev.user, ev.password, self.ip
                )
            except Exception:  # never the exception text: it could hold the password
                log.error("password check for %s failed", self.ip)
        if self.conn is not conn or self.transport is None or self.closing:
            return
        ok = None if verdict is Verdict.TEMP else verdict is Verdict.OK
        self._resume(conn, lambda: conn.auth_result(ok))

    def _pause_over(self) -> None:
        self.timer_pause = None
        conn = self.conn
        if conn is None or self.transport is None or self.closing:
            return
        self._resume(conn, conn.pause_over)

    def _auth_note(self, note: AuthNote) -> None:
        """The AUTH fact for the session log and the counters (never the password)."""
        slog = self.slog
        if slog is not None:
            slog.auth_attempt(note.mechanism, note.user, note.result)  # counts, maybe logs
        if (slog is None or slog.sink is None) and note.result != "ok":
            user = note.user.decode("utf-8", "replace").encode("unicode_escape").decode()
            log.warning("auth %s %s from %s: %s", note.mechanism, user, self.ip, note.result)

    async def _upgrade(self) -> None:
        """The TLS handshake after STARTTLS's 220; the connection is closed if it fails."""
        transport, conn, ctx = self.transport, self.conn, self.tls_ctx
        if transport is None or conn is None or ctx is None or self.closing:
            return
        try:
            new = await self.loop.start_tls(
                transport,
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=min(self.timeout_s, 60.0),
            )
        except Exception as e:
            log.info("TLS handshake with %s failed: %s", self.ip, e)
            transport.abort()
            self.connection_lost(None)  # start_tls does not report a failed handshake
            return
        if new is None or self.conn is not conn or self.closing:
            return
        self.transport = new
        self.last = self.loop.time()
        obj = new.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
            self._close_now()
            return
        self._handle(conn.tls_started(tls_info(obj)))
        if self.conn is not None and not self.closing and conn.wants_input:
            new.resume_reading()
        self._arm(self.timeout_s)

    # -- the recipient check (smtp/rcptcheck.py): inline when it cannot block, in a
    # thread when it may (a program, root mode's lookup process); a refusal or deferral
    # goes out no sooner than the checks' floor after the check began.

    def _check_rcpt(self, ev: CheckRcpt) -> list[Event] | None:
        checks, ctx, conn = self.server.rcpt_checks, self.rcpt_ctx, self.conn
        if checks is None or ctx is None or conn is None:
            return [] if conn is None else conn.rcpt_result(None)
        ctl, env = ctx
        start = self.loop.time()
        sender = ev.sender.decode("utf-8", "surrogateescape")
        address = ev.address.decode("utf-8", "surrogateescape")
        if checks.blocking(env, ctl, address):
            task = self.loop.create_task(
                self._check_in_thread(checks, ctx, sender, address, ev, start)
            )
            _CHECKING.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(_CHECKING.discard)
            return None
        try:
            status = checks.check(ctl, env, sender, address, ev.relayed)
        except Exception:
            log.exception("recipient check failed for %s", self.ip)
            status = Status.TEMP
        reply = reply_for(status, address)
        if reply is None:
            return conn.rcpt_result(None)
        self.loop.call_at(start + checks.floor, self._rcpt_done, reply)
        return None

    async def _check_in_thread(
        self,
        checks: RcptChecks,
        ctx: tuple[Control, dict[str, str]],
        sender: str,
        address: str,
        ev: CheckRcpt,
        start: float,
    ) -> None:
        ctl, env = ctx
        try:
            status = await self.loop.run_in_executor(
                None, checks.check, ctl, env, sender, address, ev.relayed
            )
        except Exception:
            log.exception("recipient check failed for %s", self.ip)
            status = Status.TEMP
        reply = reply_for(status, address)
        if reply is not None:
            await asyncio.sleep(max(0.0, start + checks.floor - self.loop.time()))
        self._rcpt_done(reply)

    def _rcpt_done(self, reply: bytes | None) -> None:
        conn = self.conn
        if conn is None or self.transport is None or self.closing:
            return
        self._resume(conn, lambda: conn.rcpt_result(reply))

    async def _commit(self) -> None:
        msg, conn = self.msg, self.conn
        if msg is None or conn is None:
            return  # the client went away first: connection_lost aborted the message
        refusal: bytes | None = None
        try:
            refusal = await msg.verdict()  # checks of incoming mail
            if refusal is not None:
                msg.abort()
                log.info("message from %s refused: %s", self.ip, refusal.decode().strip())
                result = Reply(codes.OK)
            else:
                result = await msg.commit()
        except Exception:
            log.exception("commit crashed")
            msg.abort()
            result, refusal = Reply(codes.INTERNAL_BUG), None
        if refusal is None and result.ok:
            self.server.accepted += 1
        elif refusal is None and result.text:
            log.warning("queue refused a message from %s: %s", self.ip, result.text)
        if self.slog is not None:
            self.slog.data(self.size)
            self.slog.queued(result.ok, result.msgnum, result.qp, self.size, result.text)
        reply = refusal if refusal is not None else smtp_reply(result)
        if self.conn is None or self.transport is None or self.closing:
            return
        self._resume(conn, lambda: conn.message_result(reply))

    def _resume(self, conn: SmtpServerConnection, step: Callable[[], list[Event]]) -> None:
        """The answer the core waited for (the queue's, the recipient check's) is in:
        carry out what ``step`` returns, then read again if the core wants input."""
        self.last = self.loop.time()
        try:
            events = step()
        except Exception:
            log.exception("protocol error with %s", self.ip)
            events = conn.fail()
        self._handle(events)
        if (
            self.transport is not None
            and self.conn is not None
            and not self.closing
            and conn.wants_input
            and not self.write_paused
        ):
            self.transport.resume_reading()

    async def _check_mail(self, ev: MailCheck) -> None:
        """SPF for a MAIL FROM (smtp/authcheck.py, bounded in time), then its reply."""
        checks, conn = self.checks, self.conn
        if checks is None or conn is None:
            return
        try:
            refusal = await checks.mail(ev.sender, ev.helo)
        except Exception:
            log.exception("SPF check crashed")
            refusal = replies.TEMP_ERROR
        if self.conn is None or self.transport is None or self.closing:
            return
        self.last = self.loop.time()
        try:
            events = conn.mail_result(refusal)
        except Exception:
            log.exception("protocol error with %s", self.ip)
            events = conn.fail()
        self._handle(events)
        # Not while the commands held behind MAIL have started a message (WAIT_END):
        # reading then would see a half-close as the client leaving mid-message.
        live = self.conn is not None and not self.closing and not self.write_paused
        if live and conn.wants_input and conn.state.value in ("command", "data"):
            self.transport.resume_reading()

    def _linger(self) -> None:
        """Our last reply is written: send FIN, discard input for a moment, then close."""
        self.closing = True
        transport = self.transport
        if transport is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        try:
            if transport.can_write_eof():
                transport.write_eof()
                transport.resume_reading()
                self.timer = self.loop.call_later(self.server.linger, self._end)
                return
        except (OSError, RuntimeError):
            pass
        transport.close()

    def _end(self) -> None:
        """The linger is over: close, or drop the connection if the client reads nothing."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() > 0:
            transport.abort()
        else:
            transport.close()

    def _close_now(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


def install_uvloop() -> bool:
    """Use uvloop for new event loops when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
