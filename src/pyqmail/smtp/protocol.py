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
  (STARTTLS), or before :meth:`greet` on an implicit-TLS port (465, RFC 8314),
* :meth:`auth_result` after a :class:`CheckPassword` (smtp/passwords.py's verdict), and
  :meth:`pause_over` once the seconds of a :class:`Pause` have passed.

Each returns a list of events: :class:`Send` (bytes for the client, in order),
:class:`MailCheck`, :class:`CheckRcpt`, :class:`MessageStart`, :class:`DataChunk`,
:class:`MessageEnd`, :class:`MessageAbort`, :class:`StartTls`, :class:`CheckPassword`,
:class:`Pause`, :class:`AuthNote`, :class:`Close`. After a MailCheck, CheckRcpt,
CheckPassword, Pause, MessageStart or MessageEnd the connection waits (no further events in
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

AUTH (RFC 4954; PLAIN, RFC 4616, and LOGIN) is offered only inside TLS, to every client,
and only when the connection was made with ``auth=True`` (a password source exists).
Outside TLS it gets 538 5.7.11, without a source 503. It needs EHLO/HELO first, none
inside a transaction, and one success per session. The response (on the AUTH line or
after a ``334``) may be 12288 octets long (RFC 4954 section 4); longer is 500. ``*``
cancels (501 5.0.0), bad base64 or a malformed PLAIN response is 501 5.5.2, an unknown
mechanism 504 5.5.4. The credentials go out in a :class:`CheckPassword`; success is
235 2.7.0 and makes the session a relay client (RELAYCLIENT="" unless it is set already),
exempt from greylisting and the checks of incoming mail, its Received line ``with
ESMTPSA`` and its messages marked ``auth`` for DKIM signing; failure (or a user name or
password that cannot be valid) is 535 5.7.8, after the delay the failures record gives
(:class:`Pause`, smtp/authlimit.py), and once it has too many failures for the client's
network, AUTH gets 421 and the connection closes. A check that could not be made is
454 4.7.0. On the submission doors (587, 465) MAIL needs AUTH first (530 5.7.0, RFC
6409). control/authsenders (smtp/authsenders.py) limits an authenticated user's MAIL FROM
(553 5.7.1). :class:`AuthNote` tells the adapter's log the mechanism, user and result; the
password is in no event but CheckPassword (and not in its repr).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field
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
    from pyqmail.smtp.authlimit import AuthFailures
    from pyqmail.smtp.authsenders import AuthSenders
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
    max_auth_line: int = 12288  # an AUTH line or SASL response (RFC 4954 section 4)


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
    AUTH = "auth"  # a 334 sent: the next line is a SASL response
    WAIT_AUTH = "wait-auth"  # CheckPassword sent; waiting for auth_result()
    WAIT_PAUSE = "wait-pause"  # Pause sent; waiting for pause_over()
    CLOSED = "closed"

    # The machine tests its state against frozensets dozens of times per message; Enum's
    # own __hash__ is Python code hashing the name. Members are singletons compared by
    # identity, so the identity hash is the same relation at C speed.
    __hash__ = object.__hash__


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
    auth: bytes | None = None  # the authenticated user: DKIM-sign, no checks of incoming mail


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
class CheckPassword:
    """Check this user's password (smtp/passwords.py), then call ``auth_result``."""

    mechanism: str  # "PLAIN" or "LOGIN"
    user: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Pause:
    """Write what was sent, wait ``seconds`` (reading nothing), then call ``pause_over``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class AuthNote:
    """For the log: an AUTH attempt's mechanism, user (as the client sent it) and result:
    ``ok``, ``failed``, ``temp`` (the check could not be made) or ``blocked`` (421)."""

    mechanism: str
    user: bytes
    result: str


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
    | CheckPassword
    | Pause
    | AuthNote
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
        auth: bool = False,
        auth_failures: AuthFailures | None = None,
        authsenders: AuthSenders | None = None,
    ) -> None:
        self.session = session
        self.authsenders = authsenders  # control/authsenders (smtp/authsenders.py)
        self.auth = auth  # a password source exists: AUTH is offered inside TLS
        self.auth_failures = auth_failures  # failures per network (smtp/authlimit.py)
        self.user: bytes | None = None  # the authenticated user
        self._sasl_mech = ""  # the mechanism of the AUTH in progress
        self._sasl_user: bytes | None = None  # LOGIN: the user name, before the password
        self._sasl_reply = b""  # the reply a Pause holds back
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
        if state in _HOLDING:
            return []
        return self._run()

    @property
    def wants_input(self) -> bool:
        """False while waiting for the queue, or once the held input is over the bound."""
        if self.state in _HOLDING:
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

    def auth_result(self, verdict: bool | None) -> list[Event]:
        """After CheckPassword: True (the password is right), False (wrong, or no such
        user), None (the check could not be made: 454)."""
        if self.state is not State.WAIT_AUTH:
            return []
        self.state = State.COMMAND
        mech, user = self._sasl_mech, self._sasl_user or b""
        self._sasl_user = None
        events: list[Event] = []
        if verdict is True:
            self.user = user
            if self.session.relayclient is None:
                self.session.relayclient = b""  # as RELAYCLIENT does
            events += [AuthNote(mech, user, "ok"), Send(replies.AUTH_OK)]
        elif verdict is None:
            events.append(AuthNote(mech, user, "temp"))
            self._error(events, replies.AUTH_TEMP)
        else:
            self._auth_failed(mech, user, events)
        if self.state is State.COMMAND:
            events += self._run()
        return events

    def pause_over(self) -> list[Event]:
        """The Pause has passed: the held reply goes out."""
        if self.state is not State.WAIT_PAUSE:
            return []
        self.state = State.COMMAND
        events: list[Event] = []
        self._error(events, self._sasl_reply)
        self._sasl_reply = b""
        if self.state is State.COMMAND:
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
        while self.state in _READING:
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
            sasl = self.state is State.AUTH
            limit = limits.max_command
            if sasl or buf[pos : pos + 5].lower() == b"auth ":
                limit = max(limit, limits.max_auth_line)
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > limit + 1:
                    self._discarding = len(buf) - pos
                    pos = len(buf)
                    self._too_long(events, sasl)
                break
            end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            line = buf[pos:end]
            pos = nl + 1
            if len(line) > limit:
                self._too_long(events, sasl)
                continue
            if sasl:
                self._sasl_response(line, events)
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

    def _too_long(self, events: list[Event], sasl: bool) -> None:
        if sasl:
            self.state = State.COMMAND  # the AUTH exchange ends with the 500
            self._sasl_user = None
        self._error(events, replies.LINE_TOO_LONG)

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
                auth = self.auth and self.tls is not None and self.user is None
                ehlo = replies.ehlo(
                    self.session.greeting, self.session.databytes, starttls=offer, auth=auth
                )
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
            return self._auth(arg, events)
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

    # -- AUTH (RFC 4954; the rules are in the module docstring)

    def _auth(self, arg: bytes, events: list[Event]) -> bool:
        """The AUTH command; True: discard what was pipelined behind a refused one."""
        if not self.auth:
            self._error(events, replies.NO_AUTH)
            return True
        if self.tls is None:
            self._error(events, replies.AUTH_NEEDS_TLS)
            return True
        if self.user is not None:
            self._error(events, replies.AUTH_AGAIN)
            return True
        if self._helo is None:
            self._error(events, replies.AUTH_EHLO_FIRST)
            return True
        if self._sender is not None:
            self._error(events, replies.AUTH_IN_MAIL)
            return True
        words = arg.split(b" ")
        mech = words[0].upper()
        if len(words) > 2 or not mech:
            self._error(events, replies.AUTH_SYNTAX)
            return True
        if mech not in (b"PLAIN", b"LOGIN"):
            self._error(events, replies.AUTH_MECHANISM)
            return True
        self._sasl_mech = mech.decode()
        self._sasl_user = None
        failures = self.auth_failures
        if failures is not None and failures.blocked(self.session.remote_ip):
            self.state = State.CLOSED
            events += [AuthNote(self._sasl_mech, b"", "blocked"), Send(replies.AUTH_BLOCKED)]
            events.append(_CLOSE)
            return True
        if len(words) == 1:
            self.state = State.AUTH
            events.append(Send(replies.AUTH_PLAIN_GO if mech == b"PLAIN" else replies.AUTH_USER))
            return False
        self._sasl_step(words[1], events)
        return False

    def _sasl_response(self, line: bytes, events: list[Event]) -> None:
        """A line after our 334: ``*`` cancels, else a base64 response."""
        self.state = State.COMMAND
        if line == b"*":
            self._sasl_user = None
            self._error(events, replies.AUTH_CANCELLED)
            return
        self._sasl_step(line, events)

    def _sasl_step(self, response: bytes, events: list[Event]) -> None:
        """One base64 response (``=`` is the empty one, RFC 4954 section 4)."""
        try:
            data = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self._sasl_user = None
            self._error(events, replies.AUTH_BASE64)
            return
        if self._sasl_mech == "LOGIN" and self._sasl_user is None:
            self._sasl_user = data
            self.state = State.AUTH
            events.append(Send(replies.AUTH_PASSWORD))
            return
        if self._sasl_mech == "LOGIN":
            user, password = self._sasl_user or b"", data
        else:  # PLAIN: authzid NUL authcid NUL passwd (RFC 4616 section 2)
            parts = data.split(b"\0")
            if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
                self._error(events, replies.AUTH_BASE64 if len(parts) != 3 else replies.AUTH_AUTHZ)
                return
            user, password = parts[1], parts[2]
        self._sasl_user = user
        if not _plausible(user, password):
            self._sasl_user = None
            self._auth_failed(self._sasl_mech, user, events)
            return
        self.state = State.WAIT_AUTH
        events.append(CheckPassword(self._sasl_mech, user, password))

    def _auth_failed(self, mech: str, user: bytes, events: list[Event]) -> None:
        """535, after the failures record's delay."""
        events.append(AuthNote(mech, user, "failed"))
        failures = self.auth_failures
        delay = failures.failed(self.session.remote_ip) if failures is not None else 0.0
        if delay > 0:
            self.state = State.WAIT_PAUSE
            self._sasl_reply = replies.AUTH_FAILED
            events.append(Pause(delay))
            return
        self._error(events, replies.AUTH_FAILED)

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
        """RCPT's greylisting question (smtp/greylist.py). Relay clients and authenticated
        sessions are exempt."""
        grey = self.greylist
        session = self.session
        if grey is None or session.relayclient is not None or self._sender is None:
            return False
        if self.user is not None:
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
        if self.user is None and self.door is not Door.SMTP:
            self._error(events, replies.AUTH_REQUIRED)  # submission (RFC 6409)
            return
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
        senders = self.authsenders
        if (
            self.user is not None
            and senders is not None
            and not senders.allowed(self.user, address)
        ):
            self._error(events, replies.AUTH_SENDER)
            return
        if self.mail_hook and self.user is None:
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
        auth = self.user is not None
        received = self.session.received(self._helo, tls=self.tls, auth=auth)
        events.append(MessageStart(sender, rcpts, received, self.user))
        return False


_NOTED = frozenset({b"helo", b"ehlo", b"mail", b"rcpt"})
_HOLDING = frozenset(
    {
        State.WAIT_START,
        State.WAIT_END,
        State.WAIT_RCPT,
        State.WAIT_MAIL,
        State.WAIT_AUTH,
        State.WAIT_PAUSE,
    }
)
_READING = frozenset({State.COMMAND, State.DATA, State.AUTH})
_USER_BAD = frozenset(range(33)) | {0x7F}


def _plausible(user: bytes, password: bytes) -> bool:
    """Could these be checked at all? (smtp/passwords.py's valid_user/valid_password)"""
    if not 0 < len(user) <= 255 or not 0 < len(password) <= 1024 or b"\0" in password:
        return False
    return not any(b in _USER_BAD for b in user)


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
