"""The asyncio SMTP listener (the stdio adapter, qmail-smtpd under tcpserver, is smtp/stdio.py).

Both drive :class:`~pyqmail.smtp.protocol.SmtpServerConnection` and hand the message to a
queue :class:`~pyqmail.queue.contract.Submitter`; neither decides anything about SMTP.

* :class:`SmtpServer` is the listener ``pyqmail run`` and ``pyqmail smtpd --listen`` use:
  asyncio (uvloop when installed), IPv4 and IPv6, one tcprules lookup per connection in
  tcpserver's order (default ``control/tcp.smtp.cdb``; a missing file allows everyone, as
  tcpserver without ``-x``; an unreadable one drops the connection; like the control
  files it is re-checked at most every ``control_ttl`` seconds), the environment
  tcpserver would set plus the rule's variables, a connection limit and a per-IP limit.
  The queue's file work runs outside the event loop: when this process may write the
  queue, its messages stream to a committer process (queue/committer.py: qmail-queue's
  job, commits whatever has gathered in one batch with ``writer.commit_many``), so no
  thread of the listener competes with the loop for the GIL; a client is held back
  while that process lags. ``PYQMAIL_SMTP_COMMIT=thread`` keeps the writer in this
  process with one committer thread instead (queue/committhread.py). Whatever the
  submitter, a message's commit is one ``await`` of the queue contract
  (queue/contract.py), and ``250 ok`` is written only after it returned.
* ``qmail-smtpd`` under tcpserver (the socket on fd 0/1) is :func:`pyqmail.smtp.stdio.run_stdio`.

Checks of incoming mail (smtp/authcheck.py; ``auth=``): for a connection they apply to, the
protocol's MAIL waits for SPF (``MailCheck`` -> :meth:`_SmtpProtocol._check_mail`), the
message is spooled by smtp/authspool.py, and the end of DATA asks its verdict before the
commit (:meth:`_Message.verdict`): a refusal aborts the message, else the commit queues it
with the Authentication-Results header.

An unexpected exception never reaches the client: it is logged and the client gets a 451
and the connection is closed; any message in progress is aborted (nothing queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

from pyqmail import cdb, listener, netaddr, tcprules
from pyqmail.control import Control, ControlCache, ControlError
from pyqmail.home import Home
from pyqmail.queue import codes
from pyqmail.queue import submit as qsubmit
from pyqmail.queue.committer import CommitProcess
from pyqmail.queue.contract import BlockingSubmission, QueueError, Reply, Submission, Submitter
from pyqmail.smtp import replies
from pyqmail.smtp.authcheck import AuthChecker, ConnectionChecks, Mode
from pyqmail.smtp.authspool import CheckedSubmission, CheckingSubmitter
from pyqmail.smtp.protocol import (
    Close,
    DataChunk,
    Event,
    Limits,
    MailCheck,
    MessageAbort,
    MessageEnd,
    MessageStart,
    Send,
    SmtpServerConnection,
)
from pyqmail.smtp.session import CdbCache, IPAddress, Session, SessionError, local_addresses

log = logging.getLogger("pyqmail.smtpd")

LINGER = 2.0  # seconds a closing connection may keep sending before we drop it

_S = TypeVar("_S", bound=Submission)
_S_co = TypeVar("_S_co", bound=Submission, covariant=True)


class _Opens(Protocol[_S_co]):
    def begin(self, *, origin: str = ..., received: bytes = ...) -> _S_co: ...


class _Message(Generic[_S]):
    """The queue side of one session: at most one message open at a time."""

    __slots__ = ("_error", "_pending", "_rcpts", "_sender", "origin", "submitter")

    def __init__(self, submitter: _Opens[_S], origin: str = "network") -> None:
        self.submitter = submitter
        self.origin = origin  # qmail-queue's "invoked from network" unless told otherwise
        self._pending: _S | None = None
        self._sender = b""
        self._rcpts: tuple[bytes, ...] = ()
        self._error: Reply | None = None

    def start(self, ev: MessageStart) -> bool:
        self.abort()
        try:
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
        auth: AuthChecker | None = None,
    ) -> None:
        self.home = home
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
        self._servers: list[asyncio.AbstractServer] = []
        self.base_env: dict[str, str] = {}
        if "DATABYTES" in os.environ:
            self.base_env["DATABYTES"] = os.environ["DATABYTES"]
        self.accepted = 0  # messages acknowledged with 250 (for logs and tests)

    async def start(
        self, host: str, port: int, *, start_serving: bool = True
    ) -> asyncio.AbstractServer:
        """Listen on ``host:port`` (``::`` or an IPv6 address for IPv6; port 0 = any).

        With ``start_serving=False`` the socket is bound but accepts nothing until
        ``await server.start_serving()`` (the daemon's root mode: after the drop)."""
        self._use_commit_process()
        try:
            if self.control().rcpthosts is None:
                log.warning(
                    "warning: control/rcpthosts is missing: this server is an open relay "
                    "(it relays mail for anyone to anywhere, as qmail does)"
                )
        except ControlError as e:
            log.warning("warning: %s", e)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _SmtpProtocol(self),
            host,
            port,
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

    def session(self, env: Mapping[str, str], ctl: Control) -> Session:
        try:
            more = self._more.get()
        except (OSError, cdb.CdbError) as e:
            raise SessionError(f"unable to read morercpthosts.cdb: {e}") from e
        return Session(ctl, env, morercpthosts=more, local_ips=self.local_ips)

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

    async def aclose(self) -> None:
        """After the listeners are closed: wait for the messages being committed."""
        if self.proc is not None:
            await self.proc.close()

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
        "ip",
        "ip_key",
        "last",
        "loop",
        "msg",
        "partial_since",
        "server",
        "timeout_s",
        "timer",
        "transport",
        "write_paused",
    )

    def __init__(self, server: SmtpServer) -> None:
        self.server = server
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
        self.closing = False
        self.timeout_s = 1200.0
        self.write_paused = False

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        srv = self.server
        peername = transport.get_extra_info("peername")
        ip = listener.peer_address(peername)[0]
        key = srv.per_ip.take(ip) if srv.conns < srv.max_conns else None
        if key is None:
            transport.write(replies.TOO_MANY_CONNS)
            self._close_now()
            return
        self.ip, self.ip_key = ip, key
        srv.conns += 1
        try:
            decision = srv.decide(ip)
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
            sub = srv.submitter_for(env)
            self.checks = checks = srv.auth_checks(session, ctl, ip)
            if checks is not None:
                sub = CheckingSubmitter(sub, checks)
            self.msg = _Message(sub)
            hook = checks is not None and checks.policy.spf is not Mode.OFF
            self.conn = SmtpServerConnection(session, srv.limits, mail_hook=hook)
            self.last = self.loop.time()
            if srv.greet_delay > 0:
                self.timer = self.loop.call_later(srv.greet_delay, self._greet)
            else:
                self._greet()
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
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.msg is not None:
            self.msg.abort()
        self.server._held_back.discard(self)
        if self.ip:
            srv = self.server
            srv.conns -= 1
            srv.per_ip.give_back(self.ip_key)
            self.ip = ""
        self.conn = None
        self.closing = True

    # -- helpers

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
                elif kind is MessageStart:
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
                elif kind is MailCheck:
                    if out:
                        transport.write(b"".join(out))
                        out = []
                    transport.pause_reading()
                    self.loop.create_task(self._check_mail(ev))  # type: ignore[arg-type]
                    return
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
        reply = refusal if refusal is not None else smtp_reply(result)
        if self.conn is None or self.transport is None or self.closing:
            return
        self.last = self.loop.time()
        try:
            events = conn.message_result(reply)
        except Exception:
            log.exception("protocol error with %s", self.ip)
            events = conn.fail()
        self._handle(events)
        if (
            self.conn is not None
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
