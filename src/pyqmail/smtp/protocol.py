"""The SMTP server conversation as a state machine with no I/O (in the style of h11).

An adapter (the asyncio listener, or qmail-smtpd on stdin/stdout) owns the socket and
the queue; this module owns everything said on the wire. The adapter calls:

* :meth:`SmtpServerConnection.greet` once (or :meth:`receive_data` first: an early
  talker, refused with 554),
* :meth:`receive_data` with whatever it read (``b""`` = end of file),
* :meth:`rcpt_result` after a :class:`CheckRcpt` (the recipient check's refusal, or None),
* :meth:`mail_result` after a :class:`MailCheck` (the checks of incoming mail at MAIL:
  SPF, smtp/authcheck.py; only when the connection was made with ``mail_hook=True``),
* :meth:`start_result` after a :class:`MessageStart` (did the queue open?),
* :meth:`message_result` after a :class:`MessageEnd` (the queue's reply line),
* :meth:`timeout` when a read timed out,
* :meth:`shutdown` when the server stops (SIGTERM): a message being received or committed
  goes on to its reply, then (or at once, when there is none) ``421`` and close,
* :meth:`tls_started` once a TLS handshake is done: after a :class:`StartTls` event
  (STARTTLS), or before :meth:`greet` on an implicit-TLS port (465, RFC 8314).

Each returns a list of events: :class:`Send` (bytes for the client, in order),
:class:`MailCheck`, :class:`CheckRcpt`, :class:`MessageStart`, :class:`DataChunk`,
:class:`MessageEnd`, :class:`MessageAbort`, :class:`StartTls`, :class:`Close`. After a
MailCheck, CheckRcpt, MessageStart or MessageEnd the connection waits (no further events in
that list) until the adapter reports the result (``mail_result``, ``rcpt_result``...); input
that arrives meanwhile is held, so pipelined commands are answered in order with none lost.

The adapter writes the Sends of one call together, before its next read: that is how
qmail-smtpd answers a pipelined batch in one write (smtpd.md section 2).

qmail's commands and replies are in smtpd.md section 3; the stricter rules (line limits,
control bytes, addresses that are not RFC 5321 mailboxes (pyqmail.mailbox), empty
recipients, parameters, HTTP and TLS probes, BDAT/AUTH, stuffing
after a refused DATA, recipient and error floods, early talkers) are in its last section.
Each rule is a few lines in :meth:`SmtpServerConnection._command` and its helpers.

STARTTLS (RFC 3207): the 220 is followed by a :class:`StartTls` event and nothing else;
every byte already received behind the STARTTLS line is thrown away, never run inside
TLS (the STARTTLS command injection of CVE-2011-0411 and its 2021 siblings), and
input is ignored until the adapter calls :meth:`tls_started`. Then the session starts
over: no HELO name, no envelope, the client must EHLO again, and EHLO no longer
offers STARTTLS. Refusals (``replies.TLS_*``): 502 with no certificate configured (qmail),
503 inside TLS or inside a transaction, 501 with an argument, 454 when the configured
certificate cannot be used; each drops what was pipelined behind it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyqmail import mailbox
from pyqmail.smtp import replies
from pyqmail.smtp.address import (
    asks_utf8,
    check_address,
    check_bytes,
    check_rcpt_params,
    parse_mail_params,
    split_path,
)
from pyqmail.smtp.data import DataDecoder, DataError
from pyqmail.smtp.session import Session, TlsInfo

if TYPE_CHECKING:
    from pyqmail.smtp.greylist import Greylist


@dataclass(frozen=True, slots=True)
class Limits:
    """pyqmail's caps (qmail has none). Octet counts exclude the line's CRLF."""

    max_command: int = 512  # a longer command line gets 500 and is discarded
    max_text_line: int = 1000  # a longer line in DATA fails the message (554)
    max_rcpts: int = 100  # further RCPTs in the transaction get 452
    max_errors: int = 20  # the 20th error reply is followed by 421 and close
    max_discard: int = 65536  # an over-long line still without LF after this: 421, close
    max_held: int = 1 << 20  # input held while waiting for the queue before we stop reading


class TlsOffer(enum.Enum):
    """Whether STARTTLS is offered on this connection."""

    OFF = "off"  # no certificate configured: qmail's 502 unimplemented
    UNAVAILABLE = "unavailable"  # configured but unusable (bad file): 454
    ON = "on"


class Door(enum.Enum):
    """Which listener the client came through: the policy hook for what differs per
    port. Today only SMTPS differs (TLS from the first byte); the submission ports are
    where AUTH will be required before MAIL (RFC 6409), decided here, not in the adapter."""

    SMTP = "smtp"  # port 25, STARTTLS optional
    SUBMISSION = "submission"  # port 587, STARTTLS
    SMTPS = "smtps"  # port 465, implicit TLS (RFC 8314)


class State(enum.Enum):
    GREETING = "greeting"  # nothing sent yet
    COMMAND = "command"
    DATA = "data"
    WAIT_RCPT = "wait-rcpt"  # CheckRcpt sent; waiting for rcpt_result()
    WAIT_MAIL = "wait-mail"  # MailCheck sent; waiting for mail_result()
    WAIT_START = "wait-start"  # MessageStart sent; waiting for start_result()
    WAIT_END = "wait-end"  # MessageEnd sent; waiting for message_result()
    WAIT_TLS = "wait-tls"  # StartTls sent; waiting for tls_started()
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class CheckRcpt:
    """Check this recipient (smtp/rcptcheck.py), then call ``rcpt_result``. ``relayed``:
    the client may relay (RELAYCLIENT set; its suffix is already in ``address``)."""

    sender: bytes
    address: bytes
    relayed: bool


@dataclass(frozen=True, slots=True)
class MailCheck:
    """A valid MAIL FROM to be checked (SPF) before it is answered: call ``mail_result``."""

    sender: bytes
    helo: bytes | None


@dataclass(frozen=True, slots=True)
class MessageStart:
    """Open a queue entry: ``received`` is our Received line (LF-terminated)."""

    sender: bytes
    recipients: tuple[bytes, ...]
    received: bytes


@dataclass(frozen=True, slots=True)
class DataChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The data is complete and valid: commit it, then call ``message_result``."""


@dataclass(frozen=True, slots=True)
class MessageAbort:
    """Throw the open queue entry away (nothing may be queued)."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """Write what was sent (the 220), then run the TLS handshake as the server and call
    ``tls_started``; on failure, close the connection."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing what was sent."""


@dataclass(frozen=True, slots=True)
class Note:
    """For the session log and counters (only when ``notes`` is set): a HELO/EHLO/MAIL/RCPT
    command's verb, its argument, and the reply it got. Placed before that reply's Send."""

    verb: bytes
    arg: bytes
    reply: bytes


Event = (
    Send
    | MailCheck
    | CheckRcpt
    | MessageStart
    | DataChunk
    | MessageEnd
    | MessageAbort
    | StartTls
    | Close
    | Note
)

_BAD_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_HTTP = frozenset({b"get", b"post", b"connect", b"head", b"put", b"options", b"delete"})
_END_MESSAGE = MessageEnd()
_CLOSE = Close()
_START_TLS = StartTls()


class SmtpServerConnection:
    """One SMTP conversation. See the module docstring for how an adapter drives it."""

    def __init__(
        self,
        session: Session,
        limits: Limits | None = None,
        *,
        tls: TlsOffer = TlsOffer.OFF,
        door: Door = Door.SMTP,
        greylist: Greylist | None = None,
        mail_hook: bool = False,
    ) -> None:
        self.session = session
        self.mail_hook = mail_hook  # MAIL waits for mail_result (checks of incoming mail)
        self._mail_checking: bytes | None = None  # the sender waiting for mail_result
        self._mail_utf8 = False  # and whether its MAIL gave SMTPUTF8
        self.limits = limits or Limits()
        self.tls_offer = tls
        self.door = door
        self.tls: TlsInfo | None = None  # set by tls_started()
        self.greylist = greylist  # smtp/greylist.py, asked at RCPT; None: off
        self.blocked: bytes | None = None  # a block list's refusal (block())
        self.state = State.GREETING
        self._buf = b""
        self._discarding = 0  # >0: inside an over-long command line, bytes thrown away
        self._first = True  # no command seen yet (for HTTP/TLS probes)
        self._helo: bytes | None = None
        self._sender: bytes | None = None
        self._barf = False
        self._rcpts: list[bytes] = []
        self._utf8 = False  # this transaction's MAIL gave SMTPUTF8 (RFC 6531)
        self._checking = b""  # the recipient a CheckRcpt asked about
        self._errors = 0
        self._decoder: DataDecoder | None = None
        self.quit_seen = False  # the session ended with QUIT (qmail-smtpd exits 0 only then)
        self.notes = False  # emit Note events (the listener's session log sets it)
        self._noting = b""  # the command line whose Note waits for its check's answer
        self.stopping = False  # shutdown() was called: no new transaction starts

    # ----------------------------------------------------------------- adapter calls

    @property
    def partial(self) -> bool:
        """True while an incomplete line is held (the adapter's slowloris deadline runs)."""
        if self.state is State.DATA and self._decoder is not None:
            return self._decoder.partial
        return bool(self._buf) or self._discarding > 0

    def greet(self) -> list[Event]:
        """The 220 greeting; call once, when the connection is up."""
        if self.state is not State.GREETING:
            return []
        self.state = State.COMMAND
        if self.blocked is not None:
            return [Send(replies.RBL_GREETING)]
        return [Send(replies.greeting(self.session.greeting))]

    def block(self, refusal: bytes) -> None:
        """Before greet: hold rblsmtpd's conversation instead of SMTP (smtp/rbl.py), every
        command but HELO, EHLO, MAIL, RSET, NOOP and QUIT answered with ``refusal``."""
        self.blocked = refusal

    def timeout(self) -> list[Event]:
        """A read timed out: ``451 timeout`` and close, dropping any message in progress."""
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        if self.state in (State.DATA, State.WAIT_START):
            events.append(MessageAbort("timeout"))
        self.state = State.CLOSED
        if self.blocked is not None:
            return [_CLOSE]  # rblsmtpd's alarm: the connection is dropped
        events += [Send(replies.TIMEOUT), _CLOSE]
        return events

    def shutdown(self) -> list[Event]:
        """The server is stopping. A message in DATA (or being opened, or committed) goes
        on to its reply; then, or now when none is in progress, the client gets ``421``
        and the connection closes (a QUIT already sent behind the message still gets its
        221). A recipient or sender check in progress is answered with the 421 instead;
        a TLS handshake in progress is finished first, so that the 421 goes out inside it."""
        if self.state is State.CLOSED or self.stopping:
            return []
        self.stopping = True
        if self.state in (State.DATA, State.WAIT_START, State.WAIT_END, State.WAIT_TLS):
            return []
        return self._stop_now()

    def _stop_now(self) -> list[Event]:
        self.state = State.CLOSED
        self._buf = b""
        self._noting = b""
        return [Send(replies.SHUTTING_DOWN), _CLOSE]

    def fail(self) -> list[Event]:
        """An unexpected local error: a temporary 451 and close (never a traceback)."""
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        if self.state in (State.DATA, State.WAIT_START, State.WAIT_END):
            events.append(MessageAbort("local error"))
        self.state = State.CLOSED
        return [*events, Send(replies.TEMP_ERROR), _CLOSE]

    def tls_started(self, info: TlsInfo) -> list[Event]:
        """The TLS handshake is done. After STARTTLS the session starts over (RFC 3207
        section 4.2): no HELO name, no envelope; the client speaks first. Before
        ``greet`` (implicit TLS) it only records ``info``."""
        if self.state is State.GREETING:
            self.tls = info
            return []
        if self.state is not State.WAIT_TLS:
            return []
        self.tls = info
        self.state = State.COMMAND
        self._buf = b""
        self._discarding = 0
        self._helo = None
        self._reset()
        if self.stopping:
            return self._stop_now()
        return []

    def receive_data(self, data: bytes) -> list[Event]:
        """Bytes from the client; ``b""`` means the client closed its side."""
        state = self.state
        if state is State.CLOSED:
            return []
        if state is State.WAIT_TLS and data:
            return []  # not the adapter's to give: nothing from before TLS runs inside it
        if not data:
            self.state = State.CLOSED
            if state in (State.DATA, State.WAIT_START, State.WAIT_END):
                return [MessageAbort("connection closed in DATA"), _CLOSE]
            return [_CLOSE]
        if state is State.GREETING:
            self.state = State.CLOSED
            return [Send(replies.EARLY_TALKER), _CLOSE]
        if self._first and not self._buf and (data[0] == 0x16 or data[0] >= 0x80):
            # A TLS ClientHello (or SSLv2 hello) on the plain port.
            self.state = State.CLOSED
            return [Send(replies.TLS_HELLO), _CLOSE]
        self._buf = self._buf + data if self._buf else data
        if state in (State.WAIT_START, State.WAIT_END, State.WAIT_RCPT, State.WAIT_MAIL):
            return []
        return self._run()

    @property
    def wants_input(self) -> bool:
        """False while waiting for the queue, or once the held input is over the bound."""
        if self.state in (State.WAIT_START, State.WAIT_END, State.WAIT_RCPT, State.WAIT_MAIL):
            return len(self._buf) < self.limits.max_held
        return self.state is not State.CLOSED and self.state is not State.WAIT_TLS

    def rcpt_result(self, refusal: bytes | None) -> list[Event]:
        """After CheckRcpt: None accepts the recipient (250), else the refusal line."""
        if self.state is not State.WAIT_RCPT:
            return []
        self.state = State.COMMAND
        events: list[Event] = []
        if refusal is None:
            self._rcpts.append(self._checking)
            events.append(Send(replies.OK))
        else:
            self._error(events, refusal)
        self._checking = b""
        self._note_answer(events)
        if self.state is not State.CLOSED:
            events += self._run()
        return events

    def _note_answer(self, events: list[Event]) -> None:
        """The Note of a command whose answer waited for a check (RCPT, MAIL)."""
        if self.notes and self._noting:
            _note(self._noting, events, 0)
        self._noting = b""

    def mail_result(self, refusal: bytes | None) -> list[Event]:
        """After MailCheck: None accepts the sender (250), else the refusal reply line."""
        if self.state is not State.WAIT_MAIL:
            return []
        self.state = State.COMMAND
        sender, self._mail_checking = self._mail_checking, None
        events: list[Event] = []
        if refusal is None and sender is not None:
            self._accept_mail(sender, self._mail_utf8, events)
        else:
            self._error(events, refusal or replies.TEMP_ERROR)
        self._note_answer(events)
        if self.state is not State.CLOSED:
            events += self._run()
        return events

    def start_result(self, ok: bool) -> list[Event]:
        """After MessageStart: did the queue entry open? (qmail: ``451 qqt failure``)."""
        if self.state is not State.WAIT_START:
            return []
        events: list[Event] = []
        if ok:
            self.state = State.DATA
            self._decoder = DataDecoder(self.session.databytes, max_line=self.limits.max_text_line)
            events.append(Send(replies.GO_AHEAD))
        else:
            self.state = State.COMMAND
            self._error(events, replies.QQT_FAILURE)
            self._buf = b""  # what was pipelined after a refused DATA is not run
        if self.state is not State.CLOSED:
            events += self._run()
        return events

    def message_result(self, reply: bytes) -> list[Event]:
        """After MessageEnd: the queue's answer (``250 ok T qp N`` or a 451/554 line)."""
        if self.state is not State.WAIT_END:
            return []
        self.state = State.COMMAND
        events: list[Event] = []
        if reply[:1] in (b"4", b"5"):
            self._error(events, reply)
        else:
            events.append(Send(reply))
        if self.state is not State.CLOSED:
            events += self._run()
        return events

    # ----------------------------------------------------------------- the machine

    def _run(self) -> list[Event]:
        events: list[Event] = []
        buf = self._buf
        pos = 0
        limits = self.limits
        while self.state is State.COMMAND or self.state is State.DATA:
            if self.state is State.DATA:
                buf, pos = self._data(buf[pos:] if pos else buf, events), 0
                if self.state is State.DATA:  # needs more input
                    break
                continue
            if self.stopping and not _is_quit(buf, pos, buf.find(b"\n", pos)):
                # the message's reply is out: nothing new starts (shutdown())
                events += self._stop_now()
                buf, pos = b"", 0
                break
            if self._discarding:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    self._discarding += len(buf) - pos
                    pos = len(buf)
                    if self._discarding > limits.max_discard:
                        self.state = State.CLOSED
                        events += [Send(replies.LONG_LINE_CLOSE), _CLOSE]
                    break
                self._discarding = 0
                pos = nl + 1
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > limits.max_command + 1:
                    self._discarding = len(buf) - pos
                    pos = len(buf)
                    self._error(events, replies.LINE_TOO_LONG)
                break
            end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            line = buf[pos:end]
            pos = nl + 1
            if len(line) > limits.max_command:
                self._error(events, replies.LINE_TOO_LONG)
                continue
            n = len(events)
            discard = self._command(line, events)
            if self.notes:
                if self.state in _WAITING_FOR_CHECK:
                    self._noting = line  # answered later: noted with rcpt/mail_result's reply
                else:
                    _note(line, events, n)
            if discard:
                pos = len(buf)
        self._buf = buf[pos:] if pos else buf
        if self.state is State.CLOSED:
            self._buf = b""
        return events

    def _error(self, events: list[Event], reply: bytes) -> None:
        events.append(Send(reply))
        self._errors += 1
        if self._errors >= self.limits.max_errors and self.state is not State.CLOSED:
            if self.state in (State.DATA, State.WAIT_START, State.WAIT_END):
                events.append(MessageAbort("too many errors"))
            self.state = State.CLOSED
            events += [Send(replies.TOO_MANY_ERRORS), _CLOSE]

    def _refuse(self, events: list[Event], address: bytes, reply: bytes) -> None:
        self._error(events, reply)  # the session log sees it as a Note (smtp/sessionlog.py)

    def _reset(self) -> None:
        self._sender = None
        self._utf8 = False
        self._barf = False
        self._rcpts = []

    def _data(self, buf: bytes, events: list[Event]) -> bytes:
        """Feed DATA bytes; returns what follows the final dot (pipelined commands)."""
        dec = self._decoder
        assert dec is not None
        res = dec.feed(buf)
        for chunk in res.chunks:
            events.append(DataChunk(chunk))
        if res.fatal is not None:
            self.state = State.CLOSED
            reply = replies.BARE_LF if res.fatal is DataError.BARE_LF else replies.BARE_CR
            events += [MessageAbort(res.fatal.value), Send(reply), _CLOSE]
            return b""
        if not res.done:
            return b""
        self._decoder = None
        failure = dec.failure
        if failure is None:
            self.state = State.WAIT_END
            events.append(_END_MESSAGE)
            return res.rest
        self.state = State.COMMAND
        events.append(MessageAbort(failure.value))
        if failure is DataError.TOO_MANY_HOPS:
            self._error(events, replies.TOO_MANY_HOPS)
        elif failure is DataError.TOO_BIG:
            self._error(events, replies.TOO_BIG)
        else:
            self._error(events, replies.TEXT_TOO_LONG)
        return res.rest

    def _command(self, line: bytes, events: list[Event]) -> bool:
        """Run one command line; True means: discard the rest of the input read so far."""
        first = self._first
        self._first = False
        sp = line.find(b" ")
        verb = (line if sp < 0 else line[:sp]).lower()
        if self.blocked is not None:
            return self._blocked_command(verb, events)
        if verb in _HTTP and (first or sp >= 0):
            self.state = State.CLOSED
            events += [Send(replies.NOT_SMTP), _CLOSE]
            return True
        if _BAD_BYTES.search(line) is not None:
            self._error(events, replies.BAD_BYTES)
            return False
        arg = line[sp + 1 :].lstrip(b" ") if sp >= 0 else b""
        if verb == b"rcpt":
            self._rcpt(arg, events)
        elif verb == b"mail":
            self._mail(arg, events)
        elif verb == b"data":
            return self._data_command(events)
        elif verb == b"quit":
            self.state = State.CLOSED
            self.quit_seen = True
            events += [Send(replies.quit_(self.session.greeting)), _CLOSE]
            return True
        elif verb == b"helo" or verb == b"ehlo":
            self._helo = arg
            self._reset()
            if verb == b"helo":
                events.append(Send(replies.helo(self.session.greeting)))
            else:
                offer = self.tls_offer is TlsOffer.ON and self.tls is None
                ehlo = replies.ehlo(self.session.greeting, self.session.databytes, starttls=offer)
                events.append(Send(ehlo))
        elif verb == b"rset":
            self._reset()
            events.append(Send(replies.FLUSHED))
        elif verb == b"noop":
            events.append(Send(replies.OK))
        elif verb == b"vrfy":
            events.append(Send(replies.VRFY))
        elif verb == b"help":
            events.append(Send(replies.HELP))
        elif verb == b"bdat":
            # CHUNKING is not offered: the chunk that follows must never run as commands,
            # and its length cannot be trusted, so the connection ends here.
            self.state = State.CLOSED
            events += [Send(replies.NO_CHUNKING), _CLOSE]
            return True
        elif verb == b"auth":
            self._error(events, replies.NO_AUTH)
            return True
        elif verb == b"starttls":
            # Whatever was sent behind it (a handshake, injected commands) is dropped.
            self._starttls(sp >= 0, events)
            return True
        else:
            self._error(events, replies.UNIMPLEMENTED)
        return False

    def _starttls(self, has_arg: bool, events: list[Event]) -> None:
        """RFC 3207 section 4; the reply codes are in the module docstring."""
        if self.tls is not None:
            self._error(events, replies.TLS_ACTIVE)
        elif self.tls_offer is TlsOffer.OFF:
            self._error(events, replies.UNIMPLEMENTED)
        elif has_arg:
            self._error(events, replies.TLS_SYNTAX)
        elif self._sender is not None:
            self._error(events, replies.TLS_IN_MAIL)
        elif self.tls_offer is TlsOffer.UNAVAILABLE:
            self._error(events, replies.TLS_UNAVAILABLE)
        else:
            self.state = State.WAIT_TLS
            events += [Send(replies.TLS_GO), _START_TLS]

    def _blocked_command(self, verb: bytes, events: list[Event]) -> bool:
        """rblsmtpd's commands(): a listed client's every command (smtp/rbl.py)."""
        if verb == b"quit":
            self.state = State.CLOSED
            self.quit_seen = True
            events += [Send(replies.RBL_QUIT), _CLOSE]
            return True
        if verb in (b"helo", b"ehlo", b"mail", b"rset", b"noop"):
            events.append(Send(replies.RBL_OK))
        else:
            assert self.blocked is not None
            events.append(Send(self.blocked))
        return False

    def _greylisted(self, address: bytes) -> bool:
        """RCPT's greylisting question (smtp/greylist.py). Relay clients are exempt; an
        authenticated session will be too, once AUTH exists (the hook is here)."""
        grey = self.greylist
        session = self.session
        if grey is None or session.relayclient is not None or self._sender is None:
            return False
        return not grey.check(session.remote_ip, self._sender, address)

    def _path(
        self, arg: bytes, events: list[Event], *, rcpt: bool, utf8: bool = False
    ) -> tuple[bytes, bytes] | None:
        """(address in queue form, parameter text), or None after sending the refusal.
        With ``utf8`` (the transaction's MAIL gave SMTPUTF8) the address may be UTF-8.

        The path must be an RFC 5321 path (pyqmail.mailbox); the null path gives b"".
        A recipient may lack a domain if it is postmaster, or if a non-empty RELAYCLIENT
        will be appended to it (qmail's ``RELAYCLIENT="@fixme.example"``).
        """
        if not arg.isascii() and not utf8:
            self._error(events, replies.EIGHTBIT_ADDRESS)
            return None
        split = split_path(arg)
        if split is None:
            self._error(events, replies.bad_mailbox(mailbox.Refusal.SYNTAX, sender=not rcpt))
            return None
        path, params = split
        bad = check_bytes(path, utf8=utf8)
        if bad is not None:
            self._error(events, bad)
            return None
        bare_ok = rcpt and bool(self.session.relayclient)
        got = mailbox.parse_path(path, rcpt=rcpt, bare_ok=bare_ok, utf8=utf8)
        if isinstance(got, mailbox.Refusal):
            self._error(events, replies.bad_mailbox(got, sender=not rcpt))
            return None
        address = b"" if got is None else got.address
        bad = check_address(address, utf8=utf8)
        if bad is not None:
            self._error(events, bad)
            return None
        return self.session.rewrite_literal(address), params

    def _mail(self, arg: bytes, events: list[Event]) -> None:
        split = split_path(arg)
        utf8 = split is not None and asks_utf8(split[1])  # RFC 6531 section 3.4
        parsed = self._path(arg, events, rcpt=False, utf8=utf8)
        if parsed is None:
            return
        address, params = parsed
        checked = parse_mail_params(params, self.session.databytes)
        if isinstance(checked, bytes):
            self._error(events, checked)
            return
        if self.mail_hook:
            self._reset()  # a new MAIL ends the old transaction, accepted or not
            self._mail_checking = address
            self._mail_utf8 = checked.smtputf8
            self.state = State.WAIT_MAIL
            events.append(MailCheck(address, self._helo))
            return
        self._accept_mail(address, checked.smtputf8, events)

    def _accept_mail(self, address: bytes, utf8: bool, events: list[Event]) -> None:
        self._sender = address
        self._utf8 = utf8
        self._rcpts = []
        self._barf = self.session.badmailfrom(address)
        events.append(Send(replies.OK))

    def _rcpt(self, arg: bytes, events: list[Event]) -> None:
        if self._sender is None:
            self._error(events, replies.MAIL_FIRST)
            return
        parsed = self._path(arg, events, rcpt=True, utf8=self._utf8)
        if parsed is None:
            return
        address, params = parsed
        bad = check_rcpt_params(params)
        if bad is not None:
            self._refuse(events, address, bad)
            return
        if not address:
            self._error(events, replies.EMPTY_RCPT)
            return
        if len(self._rcpts) >= self.limits.max_rcpts:
            # not counted as an error, and not logged: a flood would become one of log lines
            events.append(Send(replies.TOO_MANY_RCPTS))
            return
        if self._barf:
            self._refuse(events, address, replies.BMF)
            return
        session = self.session
        if session.relayclient is not None:
            address += session.relayclient
        elif not session.rcpt_allowed(address):
            self._refuse(events, address, replies.NOT_RCPTHOSTS)
            return
        if self._greylisted(address):
            events.append(Send(replies.GREYLISTED))  # not counted as an error: it will retry
            return
        if session.check_rcpt:
            self.state = State.WAIT_RCPT
            self._checking = address
            events.append(CheckRcpt(self._sender, address, session.relayclient is not None))
            return
        self._rcpts.append(address)
        events.append(Send(replies.OK))

    def _data_command(self, events: list[Event]) -> bool:
        if self._sender is None:
            self._error(events, replies.MAIL_FIRST)
            return True
        if not self._rcpts:
            self._error(events, replies.RCPT_FIRST)
            return True
        sender, rcpts = self._sender, tuple(self._rcpts)
        self._reset()
        self.state = State.WAIT_START
        events.append(MessageStart(sender, rcpts, self.session.received(self._helo, tls=self.tls)))
        return False


_NOTED = frozenset({b"helo", b"ehlo", b"mail", b"rcpt"})


def _is_quit(buf: bytes, pos: int, nl: int) -> bool:
    """Whether the command line at ``pos`` (ending at ``nl``; -1: not yet complete) is QUIT."""
    return nl >= 0 and buf[pos:nl].rstrip(b"\r").lower() == b"quit"


_WAITING_FOR_CHECK = frozenset({State.WAIT_RCPT, State.WAIT_MAIL})


def _note(line: bytes, events: list[Event], n: int) -> None:
    """Put a Note for the command ``line`` before its reply (events from index ``n``)."""
    sp = line.find(b" ")
    verb = (line if sp < 0 else line[:sp]).lower()
    if verb not in _NOTED:
        return
    for ev in events[n:]:
        if type(ev) is Send:
            events.insert(n, Note(verb, line[sp + 1 :] if sp >= 0 else b"", ev.data))
            return
