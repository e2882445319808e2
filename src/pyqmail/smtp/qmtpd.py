"""QMTP (inject.md section 4): the server, qmail-qmtpd and the listener. The client used
for remote delivery where control/qmtproutes says so is remote/qmtp.py.

Several messages per connection, each::

    netstring( "\\n" message-with-LF | "\\r" message-with-CRLF )
    netstring( sender )
    netstring( netstring(recip1) ... netstring(recipN) )
    -> one netstring per recipient, in order: "K" | "Z" | "D" + text

Owns:

* :class:`QmtpReceiver` — sans-IO: bytes in, events out (message bytes already turned
  from CR LF to LF in ``\\r`` mode, a lone CR kept; then the envelope). A zero-length
  message, a first byte other than LF/CR, a bad length or a missing comma is a protocol
  error (qmail-qmtpd exits 100, no reply). pyqmail's bounds end the session with one
  ``D`` reply instead of one per recipient (the list is not whole): a length field over
  13 bytes, a recipient list declared longer than queue/envelope.py's MAX_ENVELOPE
  (about 10 MB), or more than MAX_RECIPIENTS (10,000) recipients in it. A client that
  reads replies sees the first recipient refused and the others unanswered (temporary).
  So at most about 10 MB of envelope is held; the message is streamed to the queue.
* :class:`QmtpPolicy` — what qmail-qmtpd shares with qmail-smtpd: rcpthosts and
  morercpthosts.cdb, RELAYCLIENT appended to each recipient, databytes/DATABYTES; the
  rules themselves are policy.py's, the same objects SMTP uses.
* :func:`serve_stdio` (qmail-qmtpd) and :class:`QmtpServer` (``pyqmail run --qmtp``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from pyqmail import cdb, netstring, policy
from pyqmail.control import Control
from pyqmail.home import Home
from pyqmail.mailbox import queue_form
from pyqmail.netstring import NetstringError
from pyqmail.queue.contract import BlockingSubmission, BlockingSubmitter
from pyqmail.queue.envelope import MAX_ENVELOPE, MAX_RECIPIENTS
from pyqmail.queue.writer import QueueError
from pyqmail.smtp.netdoor import CHUNK, NetstringListener, received_line
from pyqmail.smtp.qmqpd import reply_for

PORT = 209
MAX_LENGTH = 2_000_000_000
ADDRESS_LIMIT = 1000

BAD_RECIPIENT = b"Dsorry, I can't handle that recipient (#5.1.3)"
NOT_RCPTHOST = b"Dsorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
BAD_SENDER = b"Dunacceptable sender (#5.1.7)"
TOO_MANY_RECIPIENTS = b"Dsorry, too many recipients: at most %d per message (#5.5.3)" % (
    MAX_RECIPIENTS
)
TOO_BIG = b"Dsorry, that message size exceeds my databytes limit (#5.3.4)"


# -- sans-IO core ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageData:
    data: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """The end of one message. A None address was >= 1000 bytes (not kept)."""

    sender: bytes | None
    recipients: list[bytes | None]


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The session ends; ``reply`` (a ``D`` text) is sent first when it is not None."""

    code: int
    reason: str
    reply: bytes | None = None


Event = MessageData | Envelope | ProtocolError


class QmtpReceiver:
    """The server side of a QMTP connection, fed bytes in any pieces."""

    def __init__(self, limit: int = MAX_LENGTH) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._state = "msg_len"
        self._left = 0
        self._crlf = False
        self._cr = False  # a CR held back at a chunk's end (CR mode)
        self._addr = bytearray()
        self._addr_bad = False
        self._sender: bytes | None = None
        self._rcpts: list[bytes | None] = []
        self._budget = 0
        self.failed = False

    @property
    def idle(self) -> bool:
        """True between messages (EOF here is a clean end of the session)."""
        return self._state == "msg_len" and not self._buf

    def feed(self, data: bytes) -> list[Event]:
        if self.failed:
            return []
        self._buf += data
        out: list[Event] = []
        try:
            self._run(out)
        except NetstringError as e:
            self.failed = True
            out.append(ProtocolError(e.code, str(e), e.reply))
        return out

    def _addr_start(self, n: int) -> None:
        self._left = n
        self._addr.clear()
        self._addr_bad = n >= ADDRESS_LIMIT

    def _addr_take(self) -> bool:
        """Move address bytes from the buffer; True when the address is complete."""
        take = min(self._left, len(self._buf))
        if not self._addr_bad:
            self._addr += self._buf[:take]
        del self._buf[:take]
        self._left -= take
        return self._left == 0

    def _comma(self) -> bool:
        if not self._buf:
            return False
        if self._buf[0] != 44:
            raise NetstringError("netstring not terminated by a comma")
        del self._buf[:1]
        return True

    def _run(self, out: list[Event]) -> None:
        buf = self._buf
        while True:
            st = self._state
            if st == "msg_len":
                got = netstring.parse_length(buf, 0, self.limit)
                if got is None:
                    return
                n, used = got
                if n == 0:
                    raise NetstringError("empty message netstring")
                del buf[:used]
                self._left = n
                self._state = "msg_first"
            elif st == "msg_first":
                if not buf:
                    return
                first = buf[0]
                if first not in (10, 13):
                    raise NetstringError("message does not start with LF or CR")
                self._crlf = first == 13
                self._cr = False
                del buf[:1]
                self._left -= 1
                self._state = "msg_body"
            elif st == "msg_body":
                if self._left and not buf:
                    return
                take = min(self._left, len(buf))
                piece = bytes(buf[:take])
                del buf[:take]
                self._left -= take
                if self._crlf:
                    piece = self._convert(piece, final=self._left == 0)
                if piece:
                    out.append(MessageData(piece))
                if self._left == 0:
                    self._state = "msg_comma"
            elif st == "msg_comma":
                if not self._comma():
                    return
                self._state = "sender_len"
            elif st == "sender_len":
                got = netstring.parse_length(buf, 0, self.limit)
                if got is None:
                    return
                n, used = got
                del buf[:used]
                self._addr_start(n)
                self._state = "sender"
            elif st == "sender":
                if not self._addr_take():
                    return
                self._state = "sender_comma"
            elif st == "sender_comma":
                if not self._comma():
                    return
                # an RFC 5321 mailbox (pyqmail.mailbox), queued unquoted; else D
                self._sender = (
                    None if self._addr_bad else queue_form(bytes(self._addr), sender=True)
                )
                self._rcpts = []
                self._state = "rcpts_len"
            elif st == "rcpts_len":
                got = netstring.parse_length(buf, 0, self.limit)
                if got is None:
                    return
                self._budget, used = got
                if self._budget > MAX_ENVELOPE:
                    raise NetstringError("recipient list too long", 111, TOO_MANY_RECIPIENTS)
                del buf[:used]
                self._state = "rcpt_len"
            elif st == "rcpt_len":
                if self._budget == 0:
                    self._state = "rcpts_comma"
                    continue
                if len(self._rcpts) >= MAX_RECIPIENTS:
                    raise NetstringError("too many recipients", 111, TOO_MANY_RECIPIENTS)
                got = netstring.parse_length(buf, 0, self._budget, self._budget)
                if got is None:
                    if len(buf) >= self._budget:
                        raise NetstringError("recipient runs past its list")
                    return
                n, used = got
                if used + n + 1 > self._budget:
                    raise NetstringError("recipient runs past its list")
                self._budget -= used + n + 1
                del buf[:used]
                self._addr_start(n)
                self._state = "rcpt"
            elif st == "rcpt":
                if not self._addr_take():
                    return
                self._state = "rcpt_comma"
            elif st == "rcpt_comma":
                if not self._comma():
                    return
                self._rcpts.append(
                    None if self._addr_bad else queue_form(bytes(self._addr), sender=False)
                )
                self._state = "rcpt_len"
            elif st == "rcpts_comma":
                if not self._comma():
                    return
                out.append(Envelope(self._sender, self._rcpts))
                self._state = "msg_len"

    def _convert(self, piece: bytes, *, final: bool) -> bytes:
        """CR LF -> LF; a lone CR stays. A CR at the end of a piece waits for the next."""
        if self._cr:
            piece = b"\r" + piece
            self._cr = False
        if piece.endswith(b"\r") and not final:
            piece = piece[:-1]
            self._cr = True
        return piece.replace(b"\r\n", b"\n")


# -- policy ------------------------------------------------------------------------------


class QmtpPolicy:
    """rcpthosts, morercpthosts.cdb, RELAYCLIENT and databytes, as qmail-qmtpd uses them."""

    def __init__(self, ctl: Control, env: Mapping[str, str], more: cdb.Reader | None) -> None:
        self.rcpthosts = policy.RcptHosts.of(ctl, more)
        self.relayclient = policy.relayclient(env)
        self.databytes = policy.databytes(ctl, env)

    def allowed(self, rcpt: bytes) -> bool:
        return self.relayclient is not None or self.rcpthosts.allowed(rcpt)

    def check(self, rcpt: bytes | None) -> tuple[bytes | None, bytes | None]:
        """(the recipient to queue, None) or (None, the D reply)."""
        if rcpt is None:
            return None, BAD_RECIPIENT
        if self.relayclient is not None:
            rcpt += self.relayclient
        if len(rcpt) >= ADDRESS_LIMIT or b"\0" in rcpt:
            return None, BAD_RECIPIENT
        if not self.allowed(rcpt):
            return None, NOT_RCPTHOST
        return rcpt, None


def open_more(home: Home) -> cdb.Reader | None:
    try:
        return cdb.Reader.open(home.control / "morercpthosts.cdb")
    except FileNotFoundError:
        return None


class _Message:
    """One message being received: its Pending and its size against databytes."""

    def __init__(self, pending: BlockingSubmission, databytes: int) -> None:
        self.pending = pending
        self.size = 0
        self.databytes = databytes
        self.too_big = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.databytes and self.size > self.databytes:
            self.too_big = True
        if not self.too_big:
            self.pending.write(data)


def _finish(msg: _Message, env: Envelope, policy: QmtpPolicy) -> list[bytes]:
    """Commit (blocking) or refuse one message; one reply per recipient."""
    replies: list[bytes | None] = []
    accepted: list[bytes] = []
    for r in env.recipients:
        ok, refusal = policy.check(r)
        replies.append(refusal)
        if ok is not None:
            accepted.append(ok)
    final: bytes
    sender = env.sender
    if not accepted:
        msg.pending.abort()
        final = b""
    elif sender is None or b"\0" in sender:
        msg.pending.abort()
        final = BAD_SENDER
    elif msg.too_big:
        msg.pending.abort()
        final = TOO_BIG
    else:
        q = msg.pending.commit_blocking(sender, accepted)
        final = reply_for(q.code, q.qp, custom=q.custom)
    return [final if r is None else r for r in replies]


# -- qmail-qmtpd on stdin/stdout -----------------------------------------------------


def serve_stdio(
    rfile: BinaryIO,
    wfile: BinaryIO,
    submitter: BlockingSubmitter,
    policy: QmtpPolicy,
    env: Mapping[str, str],
) -> int:
    """A QMTP session on ``rfile``/``wfile``; returns qmail-qmtpd's exit code."""
    rx = QmtpReceiver()
    msg: _Message | None = None
    try:
        while True:
            data = rfile.read(CHUNK)
            if not data:
                return 0  # EOF, even mid-message: qmail-qmtpd exits quietly
            for ev in rx.feed(data):
                if isinstance(ev, ProtocolError):
                    if ev.reply is not None:
                        wfile.write(netstring.encode(ev.reply))
                        wfile.flush()
                    return ev.code
                if msg is None:
                    p = submitter.begin(origin="network", received=received_line("QMTP", env))
                    msg = _Message(p, policy.databytes)
                if isinstance(ev, MessageData):
                    msg.write(ev.data)
                else:
                    replies = _finish(msg, ev, policy)
                    msg = None
                    wfile.write(b"".join(netstring.encode(r) for r in replies))
                    wfile.flush()
    except QueueError:
        return 111
    except OSError:
        return 0  # qmail-qmtpd: a write error ends the session quietly
    finally:
        if msg is not None:
            msg.pending.abort()


# -- the asyncio listener ---------------------------------------------------------------


class QmtpServer(NetstringListener):
    """The QMTP listener of ``pyqmail run --qmtp``."""

    PROTO = "QMTP"
    RULES = "tcp.qmtp.cdb"

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        env: dict[str, str],
        ctl: Control | None,
    ) -> None:
        if ctl is None:
            return  # rcpthosts unknown: no recipient can be checked
        more = open_more(self.home)
        try:
            await self._messages(reader, writer, QmtpPolicy(ctl, env, more), env)
        finally:
            if more is not None:
                more.close()

    async def _messages(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        policy: QmtpPolicy,
        env: Mapping[str, str],
    ) -> None:
        rx = QmtpReceiver()
        msg: _Message | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                self.busy(writer, True)  # a message has begun: a drain lets it finish
                for ev in rx.feed(data):
                    if isinstance(ev, ProtocolError):
                        if ev.reply is not None:
                            writer.write(netstring.encode(ev.reply))
                            await writer.drain()
                        return
                    if msg is None:
                        self.busy(writer, True)  # the next message of this chunk
                        p = await loop.run_in_executor(None, self._begin, env)
                        msg = _Message(p, policy.databytes)
                    if isinstance(ev, MessageData):
                        msg.write(ev.data)
                    else:
                        m, msg = msg, None
                        replies = await loop.run_in_executor(None, _finish, m, ev, policy)
                        writer.write(b"".join(netstring.encode(r) for r in replies))
                        await writer.drain()
                        if self.stopping:
                            return  # drain(): no next message
                        if rx.idle:
                            self.busy(writer, False)
        finally:
            if msg is not None:
                msg.pending.abort()
