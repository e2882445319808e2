"""QMQP (inject.md section 3): the server, qmail-qmqpd and the listener.

One request per connection::

    netstring( netstring(message) netstring(sender) netstring(recip1) ... )
    -> netstring( "K" text | "Z" text | "D" text )

Owns:

* :class:`QmqpReceiver` — the sans-IO server core: bytes in, events out (message chunks,
  then the envelope). The outer length is the budget for everything inside it; a length
  prefix that is not digits, an inner netstring that runs past the budget, or a missing
  comma is a protocol error (exit 100, no reply, as notqmail 1.09's qmail-qmqpd); a length
  over the size limit (qmail: 200000000) is refused with a ``D`` reply before any of the
  body is read, and the connection closed. pyqmail's bounds, also answered with ``D`` and
  a close: a length field over 13 bytes, and more than queue/envelope.py's
  MAX_RECIPIENTS (10,000) recipients, refused as the next one starts. Addresses are kept
  only up to ADDRESS_LIMIT bytes each, so a request holds at most about 10 MB of
  envelope whatever length it declares; the message itself is streamed to the queue.
* :func:`serve_stdio` — qmail-qmqpd on stdin/stdout under tcpserver.
* :class:`QmqpServer` — the asyncio listener ``pyqmail run --qmqp`` starts, with access by
  ``control/tcp.qmqp.cdb`` (tcpserver's rules) when present, and for loopback clients
  only (127.0.0.0/8, ::1) when it is not: QMQP has no recipient check, so an open QMQP
  port is an open relay.
* the client (qmail-qmqpc, mini-qmail's QmqpSubmitter) lives in queue/qmqpc.py, without
  asyncio.

QMQP servers accept mail for any recipient: they are for trusted clients only, so the
listener is closed to every non-loopback client until tcp.qmqp.cdb names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pyqmail import netstring
from pyqmail.control import Control, ControlCache
from pyqmail.home import Home
from pyqmail.mailbox import queue_form
from pyqmail.netstring import NetstringError
from pyqmail.queue.codes import qq_result
from pyqmail.queue.contract import BlockingSubmission, BlockingSubmitter
from pyqmail.queue.envelope import MAX_RECIPIENTS
from pyqmail.queue.writer import QueueError
from pyqmail.smtp.netdoor import CHUNK, SESSION_TIMEOUT, NetstringListener, received_line

PORT = 628
MAX_LENGTH = 200_000_000  # qmail-qmqpd's limit on any length
ADDRESS_LIMIT = 1000

BAD_ADDRESS = b"Dsorry, I can't accept addresses like that (#5.1.3)"
NO_RECIPIENTS = b"Dsorry, a message needs at least one recipient (#5.1.3)"
TOO_BIG = b"Dsorry, that message size exceeds my databytes limit (#5.3.4)"
TOO_MANY_RECIPIENTS = b"Dsorry, too many recipients: at most %d per message (#5.5.3)" % (
    MAX_RECIPIENTS
)


# -- the sans-IO server core ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageData:
    """Message bytes, in order (the body of the first inner netstring)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Request:
    """The whole request has arrived. ``bad`` = some address was >= 1000 bytes or had NUL."""

    sender: bytes
    recipients: list[bytes]
    bad: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """The request cannot be served. ``reply`` is None for a protocol error (close only)."""

    code: int
    reply: bytes | None
    reason: str


Event = MessageData | Request | Refused


class QmqpReceiver:
    """The server side of one QMQP request, fed bytes in any pieces."""

    def __init__(self, limit: int = MAX_LENGTH) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._state = "outer"
        self._budget = 0
        self._left = 0  # bytes of the current inner netstring still to come
        self._item = 0  # 0 = message, 1 = sender, 2.. = recipients
        self._addr = bytearray()
        self._addr_bad = False
        self._sender = b""
        self._recipients: list[bytes] = []
        self._bad = False
        self.finished = False

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; returns the events it completes. After a Request or
        Refused event the receiver is finished and ignores further input."""
        if self.finished:
            return []
        self._buf += data
        out: list[Event] = []
        try:
            self._run(out)
        except NetstringError as e:
            self.finished = True
            reply = e.reply or (TOO_BIG if e.code == 111 else None)
            out.append(Refused(e.code, reply, str(e)))
        return out

    def eof(self) -> list[Event]:
        if self.finished:
            return []
        self.finished = True
        # qmail-qmqpd exits 0 without a reply when the client goes away mid-request
        return [Refused(0, None, "connection closed in the middle of the request")]

    def _run(self, out: list[Event]) -> None:
        buf = self._buf
        while True:
            st = self._state
            if st == "outer":
                got = netstring.parse_length(buf, 0, self.limit)
                if got is None:
                    return
                self._budget, used = got
                del buf[:used]
                self._state = "len"
            elif st == "len":
                if self._budget == 0:
                    self._state = "outer_comma"
                    continue
                if self._item >= 2 + MAX_RECIPIENTS:
                    raise NetstringError("too many recipients", 111, TOO_MANY_RECIPIENTS)
                limit = self.limit if self._item == 0 else self._budget
                got = netstring.parse_length(buf, 0, limit, self._budget)
                if got is None:
                    if len(buf) >= self._budget:
                        raise NetstringError("netstring runs past the request's length")
                    return
                n, used = got
                if used + n + 1 > self._budget:
                    raise NetstringError("netstring runs past the request's length")
                self._budget -= used + n + 1
                del buf[:used]
                self._left = n
                self._state = "body"
                self._addr.clear()
                self._addr_bad = n >= ADDRESS_LIMIT
            elif st == "body":
                if self._left and not buf:
                    return
                take = min(self._left, len(buf))
                piece = bytes(buf[:take])
                del buf[:take]
                self._left -= take
                if self._item == 0:
                    if piece:
                        out.append(MessageData(piece))
                elif not self._addr_bad:
                    self._addr += piece
                if self._left == 0:
                    self._state = "comma"
            elif st == "comma":
                if not buf:
                    return
                if buf[0] != 44:
                    raise NetstringError("netstring not terminated by a comma")
                del buf[:1]
                if self._item > 0:
                    # an RFC 5321 mailbox (pyqmail.mailbox), queued unquoted; else D
                    checked = queue_form(bytes(self._addr), sender=self._item == 1)
                    if self._addr_bad or checked is None:
                        self._bad = True
                    addr = checked or b""
                    if self._item == 1:
                        self._sender = addr
                    else:
                        self._recipients.append(addr)
                self._item += 1
                self._state = "len"
            elif st == "outer_comma":
                if not buf:
                    return
                if buf[0] != 44 or self._item < 2:
                    raise NetstringError("bad end of request")
                self.finished = True
                out.append(Request(self._sender, self._recipients, self._bad))
                return


def reply_for(code: int, qp: int, when: float | None = None, custom: str | None = None) -> bytes:
    """The K/Z/D text for a queue result."""
    if code == 0:
        return b"Kok %d qp %d" % (int(time.time() if when is None else when), qp)
    letter, text = qq_result(code, custom)
    return letter.encode() + text.encode()


def _finish(pending: BlockingSubmission, req: Request) -> bytes:
    """Commit or refuse a complete request (blocking: the queue's fsyncs)."""
    if req.bad:
        pending.abort()
        return BAD_ADDRESS
    if not req.recipients:
        pending.abort()
        return NO_RECIPIENTS
    # never a traceback to the peer: an unexpected error is a temporary failure
    r = pending.commit_blocking(req.sender, req.recipients)
    return reply_for(r.code, r.qp, custom=r.custom)


# -- qmail-qmqpd on stdin/stdout ---------------------------------------------------


def serve_stdio(
    rfile: BinaryIO,
    wfile: BinaryIO,
    submitter: BlockingSubmitter,
    env: Mapping[str, str],
    *,
    limit: int = MAX_LENGTH,
) -> int:
    """One QMQP request on ``rfile``/``wfile``; returns qmail-qmqpd's exit code."""
    rx = QmqpReceiver(limit)
    pending: BlockingSubmission | None = None
    try:
        while True:
            data = rfile.read1(CHUNK) if hasattr(rfile, "read1") else rfile.read(CHUNK)
            events = rx.feed(data) if data else rx.eof()
            for ev in events:
                if isinstance(ev, MessageData):
                    if pending is None:
                        pending = submitter.begin(
                            origin="network", received=received_line("QMQP", env)
                        )
                    pending.write(ev.data)
                elif isinstance(ev, Refused):
                    if ev.reply is not None:
                        wfile.write(netstring.encode(ev.reply))
                        wfile.flush()
                    return ev.code
                else:
                    if pending is None:
                        pending = submitter.begin(
                            origin="network", received=received_line("QMQP", env)
                        )
                    reply = _finish(pending, ev)
                    pending = None
                    wfile.write(netstring.encode(reply))
                    wfile.flush()
                    return 0
    except QueueError as e:
        with contextlib.suppress(OSError):
            wfile.write(netstring.encode(reply_for(e.code, 0, custom=e.custom)))
            wfile.flush()
        return 0
    except OSError:
        return 111
    finally:
        if pending is not None:
            pending.abort()


# -- the asyncio listener ------------------------------------------------------------


def loopback_only_note(home: Home, rules: Path | None = None) -> str | None:
    """What ``pyqmail check`` and the daemon's start-up log say when the QMQP listener
    serves loopback clients only (no rules file); None when rules decide."""
    path = rules if rules is not None else home.control / "tcp.qmqp.cdb"
    if path.exists():
        return None
    return (
        f"QMQP serves loopback clients only (127.0.0.0/8, ::1): there is no {path}; "
        "to let other hosts in, list them in control/tcp.qmqp and run tcprules"
    )


class QmqpServer(NetstringListener):
    """The QMQP listener of ``pyqmail run --qmqp``: one asyncio task per connection."""

    PROTO = "QMQP"
    RULES = "tcp.qmqp.cdb"
    LOOPBACK_ONLY = True

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        submitter: BlockingSubmitter,
        *,
        rules: Path | None = None,
        limit: int = MAX_LENGTH,
        max_conns: int = 100,
        max_per_ip: int = 20,
        timeout: float = SESSION_TIMEOUT,
    ) -> None:
        super().__init__(
            home, ctl, submitter,
            rules=rules, max_conns=max_conns, max_per_ip=max_per_ip, timeout=timeout,
        )  # fmt: skip
        self.limit = limit
        self.served = 0

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        env: dict[str, str],
        ctl: Control | None,
    ) -> None:
        rx = QmqpReceiver(self.limit)
        pending: BlockingSubmission | None = None
        loop = asyncio.get_running_loop()
        try:
            while not rx.finished:
                data = await reader.read(CHUNK)
                if data:
                    self.busy(writer, True)  # a request has begun: a drain lets it finish
                events = rx.feed(data) if data else rx.eof()
                for ev in events:
                    if isinstance(ev, Refused):
                        if ev.reply is not None:
                            writer.write(netstring.encode(ev.reply))
                            await writer.drain()
                        return
                    if pending is None:
                        pending = await loop.run_in_executor(None, self._begin, env)
                    if isinstance(ev, MessageData):
                        pending.write(ev.data)
                    else:
                        p, pending = pending, None
                        reply = await loop.run_in_executor(None, _finish, p, ev)
                        self.served += 1
                        writer.write(netstring.encode(reply))
                        await writer.drain()
                        return
        except QueueError as e:
            writer.write(netstring.encode(reply_for(e.code, 0, custom=e.custom)))
            await writer.drain()
        finally:
            if pending is not None:
                pending.abort()
