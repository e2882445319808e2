"""What the QMQP and QMTP listeners of ``pyqmail run`` share: the connection's life.

Owns :class:`NetstringListener`, the asyncio part of both netstring doors: bind (bound
but idle until ``start_serving`` after the privilege drop), a cap on connections and on
connections per client IP, the tcprules decision for the client (``control/tcp.qmqp.cdb``
or ``tcp.qmtp.cdb``, with tcpserver's environment), the session's time limit, and the
close. A subclass says how one accepted connection is served (``_serve``) and is named by
its protocol word for the Received line its messages get (``_begin``).

Also owns :func:`received_line`, the Received line of both doors (and of qmail-qmqpd and
qmail-qmtpd on stdio), and the session's time limit and read size.

Stopping (SIGTERM, :meth:`NetstringListener.drain`, with SMTP's drain and the same
``control/timeoutdrain`` bound): the listening sockets close at once; a connection that is
idle (no byte of a request read yet) is closed at once; one receiving or committing a
request goes on until its reply, and then the connection closes (QMQP has one request per
connection; QMTP's ``_serve`` stops after the current message's replies, seeing
``stopping``). Connections still open after the bound are cut off (their transport
aborted: the receiver sees the end of input and aborts the unacknowledged message; a
commit already under way completes, without a reply).

A peer never sees a traceback: an I/O error, a timeout or a client that goes away just
ends the connection; anything else is logged here, on the server's side, and ends it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pyqmail import listener
from pyqmail.control import Control, ControlCache
from pyqmail.home import Home
from pyqmail.qdate import date822
from pyqmail.queue.contract import BlockingSubmission, BlockingSubmitter, QueueError
from pyqmail.smtp.session import safe

log = logging.getLogger(__name__)

SESSION_TIMEOUT = 3600.0  # qmail-qmqpd's and qmail-qmtpd's alarm
CHUNK = 65536
DRAIN = 30.0  # control/timeoutdrain's default
LINGER = 5.0  # after a cut: how long drain() waits for the connections' own ends


def received_line(proto: str, env: Mapping[str, str], when: float | None = None) -> bytes:
    """``Received: from HOST (INFO@IP)\\n  by LOCAL with PROTO; DATE`` (smtpd.md 6)."""

    def b(s: str) -> bytes:
        return safe(s.encode("utf-8", "surrogateescape"))

    host = env.get("TCPREMOTEHOST") or "unknown"
    info = env.get("TCPREMOTEINFO")
    ip = env.get("TCPREMOTEIP") or "unknown"
    local = env.get("TCPLOCALHOST") or env.get("TCPLOCALIP") or "unknown"
    who = (b(info) + b"@" if info is not None else b"") + b(ip)
    return (
        b"Received: from " + b(host) + b" (" + who + b")\n  by " + b(local)
        + b" with " + proto.encode() + b"; " + date822(when).encode() + b"\n"
    )  # fmt: skip


class NetstringListener(ABC):
    """One asyncio task per connection; see the module docstring."""

    PROTO: ClassVar[str]  # the Received line's "with" word
    RULES: ClassVar[str]  # the tcprules file under control/
    LOOPBACK_ONLY: ClassVar[bool] = False  # no rules file: loopback clients only

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        submitter: BlockingSubmitter,
        *,
        rules: Path | None = None,
        max_conns: int = 100,
        max_per_ip: int = 20,
        timeout: float = SESSION_TIMEOUT,
    ) -> None:
        self.home = home
        self.ctl = ctl
        self.submitter = submitter
        self.rules = rules if rules is not None else home.control / self.RULES
        self._rules = listener.Rules(self.rules, loopback_only=self.LOOPBACK_ONLY)
        self.timeout = timeout
        self._sem = asyncio.Semaphore(max_conns)
        self._per_ip = listener.PerIp(max_per_ip)
        self._servers: list[asyncio.AbstractServer] = []
        # open connections: True while a request is being received or committed
        self._conns: dict[asyncio.StreamWriter, bool] = {}
        self.stopping = False  # drain() began: finish the request in progress, then close
        self._gone: asyncio.Event | None = None  # set when the last connection has ended

    async def start(
        self, host: str, port: int, *, start_serving: bool = True
    ) -> asyncio.AbstractServer:
        """Listen on ``host:port``; with ``start_serving=False`` the socket is bound but
        accepts nothing until ``await server.start_serving()`` (after a privilege drop)."""
        server = await asyncio.start_server(
            self._client, host, port, reuse_address=True, start_serving=start_serving
        )
        self._servers.append(server)
        return server

    async def drain(self, timeout: float | None = None) -> int:
        """SIGTERM (see the module docstring): stop accepting, close the idle connections,
        let the requests in progress get their replies for at most ``timeout`` seconds
        (None: control/timeoutdrain); the number of connections cut off."""
        self.stopping = True
        for server in self._servers:
            server.close()
        if timeout is None:
            try:
                timeout = float(self.ctl.get().timeoutdrain)
            except Exception:  # unreadable control files: the default
                timeout = DRAIN
        for writer, busy in list(self._conns.items()):
            if not busy:
                writer.transport.abort()
        cut = await self._wait_gone(timeout)
        for writer in cut:
            peer = writer.get_extra_info("peername")
            log.warning(
                "stopping: cut off the %s connection with %s after %g s",
                self.PROTO, peer[0] if peer else "unknown", timeout,
            )  # fmt: skip
            writer.transport.abort()  # the reader sees EOF: the message in progress aborts
        if cut:
            await self._wait_gone(LINGER)
        return len(cut)

    async def _wait_gone(self, timeout: float) -> list[asyncio.StreamWriter]:
        """Wait up to ``timeout`` seconds for every connection to end; those still open."""
        if self._conns:
            self._gone = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), max(timeout, 0.0))
        return list(self._conns)

    def busy(self, writer: asyncio.StreamWriter, busy: bool) -> None:
        """``_serve`` says a request is (True) or is not (False) in progress."""
        if writer in self._conns:
            self._conns[writer] = busy

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stopping:  # accepted just before the listening socket closed
            writer.transport.abort()
            return
        self._conns[writer] = False
        try:
            async with self._sem:
                try:
                    ctl: Control | None = self.ctl.get()
                except Exception as e:  # unreadable control files: serve with defaults
                    log.warning("%s: control files: %s", self.PROTO, e)
                    ctl = None
                env = listener.peer_env(
                    writer.get_extra_info("peername"),
                    writer.get_extra_info("sockname"),
                    ctl.me if ctl is not None else None,
                )
                decision = self._rules.decide(env["TCPREMOTEIP"])
                if decision is None or not decision.allow:
                    return
                env.update(decision.env)
                with self._per_ip.hold(env["TCPREMOTEIP"]) as ok:
                    if ok:
                        async with asyncio.timeout(self.timeout):
                            await self._serve(reader, writer, env, ctl)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, QueueError):
            pass  # the client goes, times out, or the queue cannot take mail now
        except Exception:
            log.exception("%s connection ended by an unexpected error", self.PROTO)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._conns.pop(writer, None)
            if not self._conns and self._gone is not None:
                self._gone.set()

    @abstractmethod
    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        env: dict[str, str],
        ctl: Control | None,
    ) -> None:
        """Serve one accepted, allowed connection (the protocol's own part)."""

    def _begin(self, env: Mapping[str, str]) -> BlockingSubmission:
        """Open a message in the queue, below this door's Received line (blocking)."""
        return self.submitter.begin(origin="network", received=received_line(self.PROTO, env))
