"""The SMTP listener's session log lines and counters (qmail-smtpd writes none).

One :class:`SessionLog` per connection; the asyncio adapter (smtp/server.py) calls it at
the points that matter: connect (IP and the rules decision), HELO, MAIL, each RCPT
accepted or refused with the reason, DATA size, the queue's reply with qp and message
number, disconnect with the session's counts. Lines look like qmail's (one event, words
and ``key value`` pairs, variable parts through qmail-send's ``safe``)::

    smtp 7: connect 127.0.0.2 rules allow relay no
    smtp 7: rcpt <victim@notours.example> refused rcpthosts: 553_sorry,_that_domain..._(#5.7.1)
    smtp 7: auth PLAIN alice from 127.0.0.2 ok
    smtp 7: queued msg 131147 qp 4242 bytes 312
    smtp 7: disconnect msgs 1 rcpts 1 refused 1 tls - auth -

``smtp 7`` is the session id; the ``queued`` line names the message number that qmail-send's
``new msg``/``delivery``/``end msg`` lines carry, so one message is followed from its
session to its end. With ``--log-format json`` the same events are objects with the
fields (``sid``, ``event``, ``rcpt``, ``reason``, ``msg``...).

Refused-RCPT lines are rate-limited per session (at most ``RCPT_LINES`` in ``WINDOW``
seconds; then one ``suppressed K lines`` line when the window ends or the session does),
so one client's dictionary attack cannot flood the log. Counting is always on (a few
integer additions per event, :class:`SmtpStats`, read by the metrics); formatting happens
only when the sink is enabled.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pyqmail.logsink import LogSink
from pyqmail.logsink import safe as _safe
from pyqmail.smtp import replies

RCPT_LINES = 20  # refused-RCPT lines per session per WINDOW before they are suppressed
WINDOW = 60.0

# Why a reply refused an address, for the log and the metrics' `reason` label.
_REASONS: dict[bytes, str] = {
    replies.NOT_RCPTHOSTS: "rcpthosts",
    replies.BMF: "badmailfrom",
    replies.TOO_MANY_RCPTS: "too_many_rcpts",
    replies.MAIL_FIRST: "sequence",
    replies.EMPTY_RCPT: "syntax",
    replies.BAD_PARAM: "parameter",
}


# AuthNote results -> the metrics' label (daemon/http.py's pyqmail_smtp_auth)
_AUTH_LABEL = {"ok": "success", "failed": "failure", "temp": "temporary", "blocked": "blocked"}


def reason_of(reply: bytes) -> str:
    """A short reason for a refusal reply (``rcpthosts``, ``syntax``, ``code_550``...)."""
    hit = _REASONS.get(reply)
    if hit is not None:
        return hit
    code = reply[:3]
    if code in (b"501", b"553", b"555"):
        return "syntax"
    return "code_" + code.decode("ascii", "replace")


def _path(arg: bytes) -> bytes:
    """The address of ``TO:<a@b> PARAMS`` as written (the text between ``<`` and ``>``)."""
    lt = arg.find(b"<")
    gt = arg.find(b">", lt + 1)
    if lt >= 0 and gt > lt:
        return arg[lt + 1 : gt]
    colon = arg.find(b":")
    return arg[colon + 1 :].strip().split(b" ")[0]


@dataclass
class SmtpStats:
    """The listener's counters (plain integers: no metrics library in the SMTP process).

    ``snapshot()`` is what the metrics exporter reads, in this process or, in root mode,
    sent from the smtpd part to the HTTP server's process."""

    connections: Counter[str] = field(default_factory=Counter)  # by rules decision
    rcpts: Counter[str] = field(default_factory=Counter)  # "accepted" or a refusal reason
    messages: Counter[str] = field(default_factory=Counter)  # "accepted" / "refused"
    bytes_accepted: int = 0
    tls: int = 0  # sessions that started TLS (none until STARTTLS exists)
    auth: Counter[str] = field(default_factory=Counter)  # AUTH results: ok, failed, temp, blocked

    def snapshot(self) -> dict[str, object]:
        return {
            "connections": dict(self.connections),
            "rcpts": dict(self.rcpts),
            "messages": dict(self.messages),
            "bytes_accepted": self.bytes_accepted,
            "tls": self.tls,
            "auth": dict(self.auth),
        }


_ids = itertools.count(1)


class SessionLog:
    """One SMTP session's log lines and counts (see the module docstring)."""

    __slots__ = (
        "_clock",
        "_shown",
        "_suppressed",
        "_window",
        "auth",
        "ip",
        "msgs",
        "rcpts",
        "refused",
        "sid",
        "sink",
        "stats",
        "tls",
    )

    def __init__(
        self,
        sink: LogSink | None,
        stats: SmtpStats,
        ip: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink if sink is not None and sink.enabled else None
        self.stats = stats
        self.ip = ip
        self.sid = next(_ids)
        self.msgs = self.rcpts = self.refused = 0
        self.tls: str | None = None  # the TLS fact once STARTTLS exists ("TLSv1.3 ...")
        self.auth: str | None = None  # the authenticated user
        self._clock = clock
        self._window = 0.0
        self._shown = 0
        self._suppressed = 0

    def _emit(self, event: str, text: bytes, **fields: object) -> None:
        sink = self.sink
        if sink is None:
            return
        line = b"smtp %d: %s" % (self.sid, text)
        if sink.json:
            sink.emit("smtp", line, {"sid": self.sid, "event": event, "ip": self.ip, **fields})
        else:
            sink.emit("smtp", line)

    def connect(self, allow: bool, env: dict[str, str] | None = None) -> None:
        """A client connected; ``allow`` is the tcprules decision (RELAYCLIENT from env)."""
        self.stats.connections["allow" if allow else "deny"] += 1
        if self.sink is not None:
            relay = env is not None and "RELAYCLIENT" in env
            self._emit(
                "connect",
                b"connect %s rules %s relay %s"
                % (
                    _safe(self.ip.encode()),
                    b"allow" if allow else b"deny",
                    b"yes" if relay else b"no",
                ),
                rules="allow" if allow else "deny",
                relay=relay,
            )

    def note(self, verb: bytes, arg: bytes, reply: bytes) -> None:
        """HELO/EHLO/MAIL/RCPT and the reply it got (the protocol's Note event)."""
        ok = reply[:1] == b"2"
        if verb == b"rcpt":
            if ok:
                self.rcpts += 1
                self.stats.rcpts["accepted"] += 1
                if self.sink is not None:
                    addr = _path(arg)
                    self._emit("rcpt", b"rcpt <%s> accepted" % _safe(addr),
                               rcpt=_text(addr), result="accepted")  # fmt: skip
                return
            self.refused += 1
            why = reason_of(reply)
            self.stats.rcpts[why] += 1
            if self.sink is not None and self._allow_refusal_line():
                addr = _path(arg)
                text = reply.rstrip(b"\r\n")
                self._emit(
                    "rcpt",
                    b"rcpt <%s> refused %s: %s" % (_safe(addr), why.encode(), _safe(text)),
                    rcpt=_text(addr),
                    result="refused",
                    reason=why,
                    reply=_text(text),
                )
            return
        if self.sink is None:
            return
        if verb == b"mail":
            addr = _path(arg)
            word = b"accepted" if ok else b"refused " + reason_of(reply).encode()
            self._emit("mail", b"mail <%s> %s" % (_safe(addr), word), sender=_text(addr),
                       result="accepted" if ok else "refused",
                       reply=_text(reply.rstrip(b"\r\n")))  # fmt: skip
        else:
            self._emit("helo", b"%s %s" % (verb, _safe(arg)), helo=_text(arg))

    def auth_attempt(self, mechanism: str, user: bytes, result: str) -> None:
        """An AUTH attempt (protocol.py's AuthNote): counted by result, and logged with
        the client's address and the user name as sent, never the password::

            smtp 7: auth PLAIN alice from 192.0.2.7 ok
        """
        self.stats.auth[_AUTH_LABEL.get(result, result)] += 1
        if result == "ok":
            self.auth = user.decode("utf-8", "replace")
        if self.sink is not None:
            self._emit(
                "auth",
                b"auth %s %s from %s %s"
                % (mechanism.encode(), _safe(user or b"-"), _safe(self.ip.encode()),
                   result.encode()),
                mechanism=mechanism,
                user=_text(user),
                result=result,
            )  # fmt: skip

    def _allow_refusal_line(self) -> bool:
        now = self._clock()
        if now - self._window >= WINDOW:
            self._flush_suppressed()
            self._window = now
            self._shown = 0
        if self._shown >= RCPT_LINES:
            self._suppressed += 1
            return False
        self._shown += 1
        return True

    def _flush_suppressed(self) -> None:
        if self._suppressed:
            k, self._suppressed = self._suppressed, 0
            self._emit("suppressed", b"suppressed %d lines" % k, suppressed=k)

    def data(self, size: int) -> None:
        """The message's data is complete (``size`` bytes after dot-unstuffing)."""
        if self.sink is not None:
            self._emit("data", b"data bytes %d" % size, bytes=size)

    def queued(self, ok: bool, msgnum: int, qp: int, size: int, text: str) -> None:
        """The queue's reply: ``msg`` is the number qmail-send's ``new msg`` line names."""
        if ok:
            self.msgs += 1
            self.stats.messages["accepted"] += 1
            self.stats.bytes_accepted += size
        else:
            self.stats.messages["refused"] += 1
        if self.sink is None:
            return
        if ok:
            self._emit("queued", b"queued msg %d qp %d bytes %d" % (msgnum, qp, size),
                       msg=msgnum, qp=qp, bytes=size)  # fmt: skip
        else:
            raw = text.encode("utf-8", "replace")
            self._emit("queue_refused", b"queue refused: %s" % _safe(raw), reply=text)

    def disconnect(self) -> None:
        self._flush_suppressed()
        if self.sink is None:
            return
        tls = (self.tls or "-").encode("utf-8", "replace")
        auth = (self.auth or "-").encode("utf-8", "replace")
        self._emit(
            "disconnect",
            b"disconnect msgs %d rcpts %d refused %d tls %s auth %s"
            % (self.msgs, self.rcpts, self.refused, _safe(tls), _safe(auth)),
            msgs=self.msgs,
            rcpts=self.rcpts,
            refused=self.refused,
            tls=self.tls,
            auth=self.auth,
        )


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
