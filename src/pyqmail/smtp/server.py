"""The adapters that put the SMTP conversation on a socket: asyncio listener and stdio.

Both drive :class:`~pyqmail.smtp.protocol.SmtpServerConnection` and hand the message to a
queue :class:`~pyqmail.queue.submit.Submitter`; neither decides anything about SMTP.

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
  process with one committer thread instead. Other submitters' commits run in a worker
  thread each.
  ``250 ok`` is written only after the message's commit returned.
  STARTTLS (control/servercert.pem, smtp/tls.py) upgrades the transport in place with
  ``loop.start_tls``. Reading is paused from the STARTTLS line until the handshake, so
  nothing the client sent before it reaches the TLS layer or the core. A listener
  started with ``Door.SMTPS`` (port 465) is a TLS server from the first byte (the
  certificate is switched per handshake: CertStore.front_context).
* :func:`run_stdio` is ``qmail-smtpd`` under tcpserver: the socket on fd 0/1 and the
  environment tcpserver set; its STARTTLS runs over ssl.MemoryBIO (smtp/tlsbio.py).

An unexpected exception never reaches the client: it is logged and the client gets a 451
and the connection is closed; any message in progress is aborted (nothing queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from pyqmail import cdb, netaddr, tcprules
from pyqmail.control import Control, ControlCache, ControlError, load
from pyqmail.home import Home
from pyqmail.queue import codes
from pyqmail.queue import submit as qsubmit
from pyqmail.queue.committer import CommitProcess, ProcPending
from pyqmail.queue.writer import Pending, QueueError, commit_many
from pyqmail.smtp import replies, tlsbio
from pyqmail.smtp.protocol import (
    Close,
    DataChunk,
    Door,
    Event,
    Limits,
    MessageAbort,
    MessageEnd,
    MessageStart,
    Send,
    SmtpServerConnection,
    StartTls,
    State,
    TlsOffer,
)
from pyqmail.smtp.session import CdbCache, IPAddress, Session, SessionError, local_addresses
from pyqmail.smtp.tls import SERVERCERT, CertStore
from pyqmail.smtp.tls import info as tls_info

log = logging.getLogger("pyqmail.smtpd")

LINGER = 2.0  # seconds a closing connection may keep sending before we drop it


class _Message:
    """The queue side of one session: at most one message open at a time."""

    __slots__ = ("_error", "_lock", "_pending", "_rcpts", "_sender", "origin", "submitter")

    def __init__(self, submitter: qsubmit.Submitter, origin: str = "network") -> None:
        self.submitter = submitter
        self.origin = origin  # qmail-queue's "invoked from network" unless told otherwise
        # commit runs in a worker thread and abort (connection lost) in the loop's: whoever
        # takes the pending entry first owns it, never both.
        self._lock = threading.Lock()
        self._pending: qsubmit.PendingLike | None = None
        self._sender = b""
        self._rcpts: tuple[bytes, ...] = ()
        self._error: bytes | None = None

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
            self._error = codes.smtp_reply(e.code, e.custom)
        except Exception:
            log.exception("queue write failed")
            self._error = codes.smtp_reply(codes.WRITE_ERROR)

    def take(self) -> tuple[qsubmit.PendingLike, bytes, tuple[bytes, ...]] | bytes:
        """Take the open message for committing (its owner from now on: a later abort
        does nothing), or the reply when there is nothing to commit."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is None:
            return codes.smtp_reply(codes.INTERNAL_BUG)
        if self._error is not None:
            with contextlib.suppress(Exception):
                p.abort()
            return self._error
        return p, self._sender, self._rcpts

    def commit(self) -> bytes:
        """Blocking: make the message durable; the reply line for the client."""
        job = self.take()
        if isinstance(job, bytes):
            return job
        return _commit_other(*job)

    def abort(self) -> None:
        with self._lock:
            p, self._pending = self._pending, None
        if p is not None:
            try:
                p.abort()
            except Exception:
                log.exception("queue abort failed")


def _peer_ip(addr: object) -> tuple[str, str]:
    """(ip, port) as tcpserver writes them; IPv4-mapped IPv6 becomes plain IPv4."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return "unknown", "0"
    ip = str(addr[0])
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip, str(addr[1])


_Job = tuple[Pending, bytes, Sequence[bytes], "asyncio.Future[bytes]"]


class _Committer:
    """One thread committing the in-process writer's messages, in batches.

    ``submit`` (event loop) queues a message and returns a future for its reply line;
    the thread takes everything queued, commits it with ``commit_many`` (grouped by
    writer), and resolves the batch's futures with one call into the loop. The thread
    is woken only when it is waiting: while it commits, new messages simply gather for
    the next batch. Each message's reply still comes only after its own commit.
    """

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
    ) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = loop.create_future()
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
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bytes], bytes]]]
            by_loop = {}
            try:
                results = self._commit(batch)
            except Exception:  # never let the thread die: every later message would hang
                log.exception("committer failed")
                results = []
                for loop, (p, _s, _r, fut) in batch:
                    with contextlib.suppress(Exception):
                        p.abort()
                    results.append((loop, (fut, codes.smtp_reply(codes.INTERNAL_BUG))))
            for loop, replies_ in results:
                by_loop.setdefault(loop, []).append(replies_)
            for loop, done in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(_resolve, done)

    @staticmethod
    def _commit(
        batch: list[tuple[asyncio.AbstractEventLoop, _Job]],
    ) -> list[tuple[asyncio.AbstractEventLoop, tuple[asyncio.Future[bytes], bytes]]]:
        out: list[tuple[asyncio.AbstractEventLoop, tuple[asyncio.Future[bytes], bytes]]] = []
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
            now = int(time.time())
            for (loop, (p, _s, _r, fut)), res in zip(group, results, strict=True):
                if isinstance(res, QueueError):
                    reply = codes.smtp_reply(res.code, res.custom)
                else:
                    reply = replies.accepted(now, p.qp)
                out.append((loop, (fut, reply)))
        return out


_COMMITTER = _Committer()  # one per process, shared by every listener in it


def _resolve(done: list[tuple[asyncio.Future[bytes], bytes]]) -> None:
    for fut, reply in done:
        if not fut.done():
            fut.set_result(reply)


def _commit_other(p: qsubmit.PendingLike, sender: bytes, rcpts: Sequence[bytes]) -> bytes:
    """Blocking: commit one message (stdio, or a worker thread); its reply line."""
    try:
        p.commit(sender, rcpts)
    except QueueError as e:
        return codes.smtp_reply(e.code, e.custom)
    except Exception:
        log.exception("queue commit failed")
        with contextlib.suppress(Exception):
            p.abort()
        return codes.smtp_reply(codes.INTERNAL_BUG)
    return replies.accepted(int(time.time()), p.qp)


class SmtpServer:
    """The SMTP listener (see the module docstring). ``start`` binds and returns the server."""

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        submitter: qsubmit.Submitter,
        *,
        rules: Path | None = None,
        max_conns: int = 100,
        max_per_ip: int = 20,
        limits: Limits | None = None,
        greet_delay: float = 0.0,
        linger: float = LINGER,
        local_ips: frozenset[IPAddress] | None = None,
        executor: ThreadPoolExecutor | None = None,
        reuse_port: bool = False,
        control_ttl: float = 1.0,
        limit_loopback: bool = False,
        commit_process: bool | None = None,
        ip_key: Callable[[str], str] = netaddr.limit_key,
        tls_ttl: float = 1.0,
    ) -> None:
        self.home = home
        self.ctl = ctl
        self.submitter = submitter
        if commit_process is None:
            commit_process = os.environ.get("PYQMAIL_SMTP_COMMIT", "process") != "thread"
        self.commit_process = commit_process
        self.proc: CommitProcess | None = None
        self._held_back: set[_SmtpProtocol] = set()  # not read while the committer lags
        self.rules_path = rules if rules is not None else home.control / "tcp.smtp.cdb"
        self.max_conns = max_conns
        self.max_per_ip = max_per_ip
        # Loopback clients are local programs, exempt from the per-IP limit as Postfix
        # exempts $mynetworks (smtpd_client_event_limit_exceptions); the total still holds.
        self.limit_loopback = limit_loopback
        # What max_per_ip counts: an IPv4 address, an IPv6 /64 (netaddr.limit_key).
        self.ip_key = ip_key
        self.limits = limits or Limits()
        self.greet_delay = greet_delay
        self.linger = linger
        self.local_ips = local_ips if local_ips is not None else local_addresses()
        self.executor = executor or ThreadPoolExecutor(
            max_workers=int(os.environ.get("PYQMAIL_SMTP_THREADS", "64")),
            thread_name_prefix="smtpq",
        )
        self.reuse_port = reuse_port
        self.committer = _COMMITTER
        self.control_ttl = control_ttl
        self._ctl: Control | None = None
        self._ctl_at = 0.0
        self.conns = 0
        self.per_ip: dict[str, int] = {}
        self._rules = CdbCache(self.rules_path, control_ttl)
        self._more = CdbCache(home.control / "morercpthosts.cdb", control_ttl)
        # control/servercert.pem, re-checked at most every tls_ttl seconds (smtp/tls.py)
        self.certs = CertStore(home.control / SERVERCERT, ttl=tls_ttl)
        self._certs_loaded = False
        self._servers: list[asyncio.AbstractServer] = []
        self.base_env: dict[str, str] = {}
        if "DATABYTES" in os.environ:
            self.base_env["DATABYTES"] = os.environ["DATABYTES"]
        self.accepted = 0  # messages acknowledged with 250 (for logs and tests)

    async def start(self, host: str, port: int, door: Door = Door.SMTP) -> asyncio.AbstractServer:
        """Listen on ``host:port`` (``::`` or an IPv6 address for IPv6; port 0 = any).

        The certificate is loaded here, at the first start (as root in root mode, before
        the listener drops to qmaild): a bad or missing one is a warning, not a failure."""
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
        )
        self._servers.append(server)
        return server

    # -- per connection ---------------------------------------------------------------

    def decide(self, ip: str) -> tcprules.Decision | None:
        """The tcprules decision; None when the rules file cannot be read (drop)."""
        try:
            reader = self._rules.get()
            if reader is None:
                return tcprules.Decision(True, {}, None)
            return tcprules.lookup(reader, ip)
        except (OSError, cdb.CdbError) as e:
            log.warning(
                "dropping connection from %s, unable to read %s: %s", ip, self.rules_path, e
            )
            return None

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

    def submitter_for(self, env: Mapping[str, str]) -> qsubmit.Submitter:
        """A rule may set QMAILQUEUE for its clients (a per-client filter), as with tcpserver."""
        program = env.get("QMAILQUEUE")
        if program:
            return qsubmit.ProgramSubmitter(self.home, program)
        return self.submitter


class _SmtpProtocol(asyncio.Protocol):
    """One connection: bytes to the core, events to the transport and the queue."""

    __slots__ = (
        "closing",
        "conn",
        "door",
        "ip",
        "ip_key",
        "last",
        "loop",
        "msg",
        "partial_since",
        "server",
        "timeout_s",
        "timer",
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
        self.msg: _Message | None = None
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
        ip, port = _peer_ip(transport.get_extra_info("peername"))
        lip, lport = _peer_ip(transport.get_extra_info("sockname"))
        self.ip = ip
        key = self.ip_key = srv.ip_key(ip)
        if srv.conns >= srv.max_conns or (
            srv.per_ip.get(key, 0) >= srv.max_per_ip
            and (srv.limit_loopback or not netaddr.is_loopback(ip))
        ):
            transport.write(replies.TOO_MANY_CONNS)
            self.ip = ""
            self._close_now()
            return
        srv.conns += 1
        srv.per_ip[key] = srv.per_ip.get(key, 0) + 1
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
            ctl_me = ctl.me
            self.timeout_s = float(ctl.timeoutsmtpd)
            env.update(
                PROTO="TCP", TCPLOCALIP=lip, TCPLOCALPORT=lport, TCPREMOTEIP=ip, TCPREMOTEPORT=port
            )
            if ctl_me:
                env["TCPLOCALHOST"] = ctl_me
            env.update(decision.env)
            try:
                session = srv.session(env, ctl)
            except (SessionError, ControlError) as e:
                log.warning("%s: %s", ip, e)
                transport.write(replies.CONTROLS)
                self._close_now()
                return
            self.msg = _Message(srv.submitter_for(env))
            offer = srv.certs.get()
            self.tls_ctx = offer.context
            implicit = self.door is Door.SMTPS
            self.conn = SmtpServerConnection(
                session, srv.limits, tls=TlsOffer.OFF if implicit else offer.offer, door=self.door
            )
            self.last = self.loop.time()
            if implicit:  # the handshake is done (create_server's ssl); the greeting is TLS's
                obj = transport.get_extra_info("ssl_object")
                self.conn.tls_started(tls_info(obj))
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
            n = srv.per_ip.get(self.ip_key, 1) - 1
            if n <= 0:
                srv.per_ip.pop(self.ip_key, None)
            else:
                srv.per_ip[self.ip_key] = n
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
        if self.msg is not None and conn.state.value == "wait-end":
            self._arm(1.0)  # the queue is committing; its own reply ends the wait
            return
        if conn.state is State.WAIT_TLS:
            self._arm(1.0)  # the handshake has its own deadline
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
                elif kind is StartTls:
                    if out:
                        transport.write(b"".join(out))
                    transport.pause_reading()  # not one more plaintext byte is read
                    self.loop.create_task(self._upgrade())
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

    async def _commit(self) -> None:
        msg, conn = self.msg, self.conn
        if msg is None or conn is None:
            return  # the client went away first: connection_lost aborted the message
        try:
            job = msg.take()
            if isinstance(job, bytes):
                reply = job
            elif isinstance(job[0], ProcPending):
                res = await job[0].commit_async(job[1], job[2])
                if res.code == 0:
                    reply = replies.accepted(int(time.time()), res.qp)
                else:
                    log.warning("queue refused a message from %s: %s", self.ip, res.text)
                    reply = codes.smtp_reply(res.code)
            elif isinstance(job[0], Pending):
                reply = await self.server.committer.submit(self.loop, job[0], job[1], job[2])
            else:
                reply = await self.loop.run_in_executor(
                    self.server.executor, _commit_other, job[0], job[1], job[2]
                )
        except Exception:
            log.exception("commit crashed")
            reply = codes.smtp_reply(codes.INTERNAL_BUG)
        if reply[:3] == b"250":
            self.server.accepted += 1
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


# ------------------------------------------------------------------------- stdin/stdout


def run_stdio(
    home: Home,
    env: Mapping[str, str] | None = None,
    *,
    infd: int = 0,
    outfd: int = 1,
    limits: Limits | None = None,
    submitter: qsubmit.Submitter | None = None,
    clock: Callable[[], float] = time.monotonic,
    origin: str = "network",
) -> int:
    """qmail-smtpd: one SMTP session on ``infd``/``outfd``. Returns qmail-smtpd's exit
    code: 0 after QUIT, 1 when the session ended any other way or could not start.

    ``origin``: the Received wording of the queue (``uid`` for ``sendmail -bs``, whose
    qmail-smtpd runs as the caller, so qmail-queue writes "invoked by uid N")."""
    env = os.environ if env is None else env
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    out = _Writer(outfd)
    try:
        ctl = load(home)
        more = CdbCache(home.control / "morercpthosts.cdb").get()
        session = Session(ctl, env, morercpthosts=more, local_ips=local_addresses())
        certs = CertStore(home.control / SERVERCERT, warn=_stderr).load(warn_missing=False)
    except (ControlError, SessionError, OSError, cdb.CdbError) as e:
        print(f"qmail-smtpd: {e}", file=sys.stderr)
        with contextlib.suppress(_WriteFailed):
            out.write(replies.CONTROLS)
        _drain(infd, outfd)
        return 1
    try:
        msg = _Message(submitter or qsubmit.submitter(home, env=dict(env)), origin)
    except Exception as e:
        print(f"qmail-smtpd: unable to reach the queue: {e}", file=sys.stderr)
        with contextlib.suppress(_WriteFailed):
            out.write(replies.CONTROLS)
        _drain(infd, outfd)
        return 1
    conn = SmtpServerConnection(session, limits, tls=certs.offer)
    tls: tlsbio.BioTls | None = None
    timeout = float(ctl.timeoutsmtpd)
    out.timeout = timeout
    events = conn.greet()
    partial_since = 0.0
    try:
        while True:
            for ev in events:
                kind = type(ev)
                if kind is Send:
                    out.buffer(ev.data)  # type: ignore[union-attr]
                elif kind is DataChunk:
                    msg.write(ev.data)  # type: ignore[union-attr]
                elif kind is MessageStart:
                    events = conn.start_result(msg.start(ev))  # type: ignore[arg-type]
                    break
                elif kind is MessageEnd:
                    out.flush()
                    events = conn.message_result(msg.commit())
                    break
                elif kind is MessageAbort:
                    msg.abort()
                elif kind is StartTls and certs.context is not None:
                    out.flush()  # the 220 in clear; then nothing read before the handshake
                    try:
                        tls = tlsbio.handshake(certs.context, infd, outfd, timeout)
                    except tlsbio.TlsFailure:
                        return 1
                    out.encode = tls.encrypt
                    events = conn.tls_started(tls.info())
                    if early := tls.buffered():  # sent with the client's Finished
                        events += conn.receive_data(early)
                    break
                elif kind is Close:
                    out.flush()
                    _drain(infd, outfd)
                    # qmail-smtpd exits 0 after QUIT and 1 for every other end (EOF,
                    # read or write error, timeout, bare LF); tcpserver logs the status.
                    return 0 if conn.quit_seen else 1
            else:
                events = []
            if events:
                continue
            out.flush()
            wait = timeout
            if conn.partial:
                wait = min(wait, partial_since + min(timeout, 120.0) - clock())
            if wait <= 0 or not select.select([infd], [], [], wait)[0]:
                events = conn.timeout()
                continue
            try:
                data = os.read(infd, 65536)
            except OSError:
                data = b""
            if tls is not None and (data := tls.decrypt(data)) is None:  # type: ignore[assignment]
                events = []
                continue  # no whole TLS record yet
            was_partial = conn.partial
            events = conn.receive_data(data)
            if conn.partial and not was_partial:
                partial_since = clock()
    except _WriteFailed:
        msg.abort()
        return 1
    except Exception:
        log.exception("qmail-smtpd: unexpected error")
        msg.abort()
        with contextlib.suppress(_WriteFailed):
            out.write(replies.TEMP_ERROR)
        _drain(infd, outfd)
        return 1


class _WriteFailed(Exception):
    pass


class _Writer:
    """Output buffered until the next read (qmail's substdio), then written whole."""

    def __init__(self, fd: int, timeout: float = 1200.0) -> None:
        self.fd = fd
        self.timeout = timeout  # qmail-smtpd's write timeout is timeoutsmtpd too
        self._out: list[bytes] = []
        self.encode: Callable[[bytes], bytes] | None = None  # TLS: plaintext -> ciphertext

    def buffer(self, data: bytes) -> None:
        self._out.append(data)

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self.flush()

    def flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        if self.encode is not None:
            try:
                data = self.encode(data)
            except tlsbio.TlsFailure as e:
                raise _WriteFailed(str(e)) from e
        view = memoryview(data)
        while view:
            try:
                if not select.select([], [self.fd], [], self.timeout)[1]:
                    raise _WriteFailed("write timeout")
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                raise _WriteFailed(str(e)) from e
            view = view[n:]


def _stderr(text: str) -> None:
    print(f"qmail-smtpd: {text}", file=sys.stderr)


def _drain(infd: int, outfd: int, limit: float = LINGER) -> None:
    """Half-close a socket and discard what the client still sends, for a moment.

    Closing a socket with unread input makes the kernel send RST, which can destroy our
    last reply before the client reads it.
    """
    try:
        s = socket.socket(fileno=os.dup(outfd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        s.close()
        return
    s.close()
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            if not select.select([infd], [], [], left)[0]:
                return
            if not os.read(infd, 65536):
                return
        except OSError as e:
            if e.errno != errno.EINTR:
                return
