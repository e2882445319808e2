"""The SMTP client conversation of remote delivery, without I/O (remote.md section 3).

:class:`ReplyParser` turns the bytes a server sends into :class:`Reply` values the way
qmail-remote reads them: the code is the first line's three digits (notqmail 1.09's smtpcode
reads it there; RFC 5321 wants every line to carry the same code, so this matters only for a
broken server, e.g. ``250-ok`` then ``550 no`` is a 250), ``-`` after them marks a
continuation, CRs are dropped, the kept text is capped at 5000 bytes (the rest is read and
thrown away, so a 10 MB reply line costs no memory).

:class:`ClientSession` is the dialogue as a state machine. The driver (remote/deliver.py)
feeds it replies and carries out the :data:`Action` values it returns: bytes to send, a TLS
handshake, the message body, and finally a :class:`SessionResult` with qmail-remote's
recipient reports (``r``/``h``/``s``) and one message report (``K``/``Z``/``D``), each with
qmail's exact text. Where pyqmail goes beyond qmail-remote (EHLO, PIPELINING, 8BITMIME,
STARTTLS, AUTH to a smarthost, several recipients on one connection) it keeps qmail's
texts and adds only new texts for new failure points.

Stricter than qmail, on purpose: a reply whose code is not three digits is a temporary
failure of that step, and the message counts as delivered only on a 2xx reply to the end of
data (qmail takes anything below 400).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pyqmail.smtp.clientauth import ClientAuth, auth_mechanisms

TEXT_CAP = 5000  # qmail-remote's HUGESMTPTEXT

# quote.c's atom characters: printable ASCII without "(),:;<>@[\]
_ATOM = frozenset(
    c for c in range(33, 127) if chr(c) not in '"(),:;<>@[\\]'
)  # fmt: skip
# with SMTPUTF8, RFC 6531's UTF8-non-ascii is atom text too
_ATOM_UTF8 = _ATOM | frozenset(range(128, 256))


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete server reply. ``code`` is None when it was not three digits."""

    code: int | None
    text: bytes  # every line, CRs dropped, LFs kept, at most TEXT_CAP bytes

    @property
    def kind(self) -> int:
        """The first digit (2..5), or 4 for a malformed reply (treated as temporary)."""
        if self.code is None or not 200 <= self.code <= 599:
            return 4
        return self.code // 100


class ReplyParser:
    """Incremental reply reader: ``feed(bytes) -> [Reply, ...]``."""

    def __init__(self) -> None:
        self._head = b""  # first bytes of the current line (code + continuation mark)
        self._code: bytes | None = None  # the first line's three bytes, once that line ended
        self._text = bytearray()

    @property
    def idle(self) -> bool:
        """No partial reply is buffered."""
        return not self._head and not self._text and self._code is None

    def feed(self, data: bytes) -> list[Reply]:
        out: list[Reply] = []
        pos = 0
        n = len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            seg = data[pos:end]
            if len(self._head) < 4:
                self._head += seg[: 4 - len(self._head)]
            room = TEXT_CAP - len(self._text)
            if room > 0:
                self._text += seg.replace(b"\r", b"")[:room]
            pos = end
            if nl >= 0:
                head = self._head
                self._head = b""
                if self._code is None:
                    self._code = head[:3]
                if head[3:4] == b"-":
                    continue
                digits, self._code = self._code, None
                code = int(digits) if len(digits) == 3 and digits.isdigit() else None
                out.append(Reply(code, bytes(self._text)))
                self._text.clear()
        return out


def needs_quote(local: bytes, *, utf8: bool = False) -> bool:
    """quote.c's quote_need: empty, a non-atom byte, or a dot at an end or doubled."""
    if not local:
        return True
    atom = _ATOM_UTF8 if utf8 else _ATOM
    if any(c not in atom for c in local):
        return True
    return local.startswith(b".") or local.endswith(b".") or b".." in local


def quote_address(addr: bytes, *, utf8: bool = False) -> bytes:
    """An envelope address as qmail-remote sends it (quote2): local part quoted if needed
    (``utf8``: sent with SMTPUTF8, so UTF-8 needs no quotes)."""
    if not addr:
        return b""
    at = addr.rfind(b"@")
    local, domain = (addr, b"") if at < 0 else (addr[:at], addr[at:])
    if needs_quote(local, utf8=utf8):
        esc = bytearray(b'"')
        for c in local:
            if c in b'\r\n"\\':
                esc += b"\\"
            esc.append(c)
        local = bytes(esc + b'"')
    return local + domain


class TlsMode(enum.Enum):
    """What the session does about STARTTLS."""

    OFF = "off"  # never (a fallback connection after a failed handshake)
    OPPORTUNISTIC = "opportunistic"  # when offered, unverified; failure -> plaintext retry
    REQUIRED = "required"  # must be offered and verify; failure -> temporary


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Run the TLS handshake now, then call :meth:`ClientSession.tls_done`."""

    verify: bool


@dataclass(frozen=True, slots=True)
class SendBody:
    """Stream the message (remote/transmit.py) and the final ``.``, call
    :meth:`ClientSession.body_sent`, then feed the reply."""


@dataclass(frozen=True, slots=True)
class SessionResult:
    """qmail-remote's output: recipient reports in RCPT order, then the message report.

    ``recipients`` may be shorter than the recipient list when the message failed early.
    Each report is (letter, text) with qmail's text including its final newline.
    """

    recipients: tuple[tuple[str, bytes], ...]
    message: tuple[str, bytes]
    tls_fallback: bool = False  # the handshake failed and the policy allows plaintext
    quit: bool = True  # send QUIT before closing
    # The recipients the server at ``ip`` refused at RCPT. qmail sends each recipient in a
    # run of its own, which then ends "Giving up on IP."; remote/deliver.py's fold adds
    # that line to these recipients' texts (reports() stays as qmail-remote prints it).
    refused: frozenset[int] = frozenset()
    ip: str = ""

    def reports(self) -> bytes:
        """The bytes qmail-remote writes on stdout (remote.md section 6)."""
        out = bytearray()
        for letter, text in (*self.recipients, self.message):
            out += letter.encode() + text + b"\0"
        return bytes(out)


@dataclass(frozen=True, slots=True)
class Done:
    result: SessionResult


Action = Send | StartTls | SendBody | Done


class _St(enum.Enum):
    GREETING = 1
    EHLO = 2
    HELO = 3
    STARTTLS = 4
    TLS = 5
    MAIL = 6
    RCPT = 7
    DATA = 8
    BODY = 9
    DONE = 10
    AUTH = 11


def said(reply: Reply | None) -> bytes:
    """``Remote host said: <reply>`` as qmail appends it (NULs shown as ``?``)."""
    if reply is None or not reply.text:
        return b""
    return b"Remote host said: " + reply.text.replace(b"\0", b"?")


def _has_bad_bytes(addr: bytes) -> bool:
    return b"\r" in addr or b"\n" in addr or b"\0" in addr


@dataclass
class ClientSession:
    """One SMTP transaction for one message to one server address."""

    ip: str
    helohost: bytes
    sender: bytes
    recipients: list[bytes]
    tls: TlsMode = TlsMode.OPPORTUNISTIC
    tls_required_for: str = ""  # the domain, for the text when TLS is required
    is_8bit: Callable[[], bool] = lambda: False
    # A smarthost's credentials (control/smtproutesauth): AUTH after TLS, before MAIL; the
    # driver also sets tls=REQUIRED, and without TLS no AUTH line is ever sent.
    auth: ClientAuth | None = None
    implicit_tls: bool = False  # the connection is TLS from the start (port 465, RFC 8314)
    _state: _St = _St.GREETING
    _caps: set[bytes] = field(default_factory=set)
    _tls_active: bool = False
    _pending: deque[tuple[_St, int]] = field(default_factory=deque)
    _reports: list[tuple[str, bytes] | None] = field(default_factory=list)
    _accepted: int = 0
    _refused: set[int] = field(default_factory=set)
    _body_sent: bool = False
    _pipelined: bool = False
    _replies: int = 0
    _queued: deque[bytes] = field(default_factory=deque)
    _mechs: frozenset[bytes] = frozenset()
    _auth_rounds: int = 0

    def __post_init__(self) -> None:
        self._reports = [None] * len(self.recipients)
        self._ipb = self.ip.encode()
        self._tls_active = self._tls_active or self.implicit_tls

    # -- results ---------------------------------------------------------------------
    def _rcpt_reports(self) -> tuple[tuple[str, bytes], ...]:
        out: list[tuple[str, bytes]] = []
        for r in self._reports:
            if r is None:
                break
            out.append(r)
        return tuple(out)

    def _result(self, letter: str, text: bytes, *, quit: bool = True) -> SessionResult:
        rcpts = self._rcpt_reports()
        refused = frozenset(i for i in self._refused if i < len(rcpts))
        return SessionResult(rcpts, (letter, text), quit=quit, refused=refused, ip=self.ip)

    def _finish(self, letter: str, text: bytes, reply: Reply | None) -> list[Action]:
        self._state = _St.DONE
        return [Done(self._result(letter, text + said(reply)))]

    def _quit(self, letter: str, prefix: str, suffix: str, reply: Reply | None) -> list[Action]:
        # qmail's quit(): "<prefix><IP><suffix>.\n" then the server's text.
        text = prefix.encode() + self._ipb + suffix.encode() + b".\n"
        return self._finish(letter, text, reply)

    def connection_lost(self) -> SessionResult:
        """The peer closed or a read/write timed out (remote.md section 3)."""
        dup = "Possible duplicate! " if self._body_sent else ""
        text = f"Connected to {self.ip} but connection died. {dup}(#4.4.2)\n".encode()
        self._state = _St.DONE
        return self._result("Z", text, quit=False)

    @property
    def done(self) -> bool:
        return self._state is _St.DONE

    # -- the dialogue ----------------------------------------------------------------
    def resume(self, caps: frozenset[bytes], tls_active: bool) -> list[Action]:
        """Start on a connection kept from an earlier transaction (greeting and EHLO done):
        go straight to MAIL with the capabilities learnt then."""
        self._caps = set(caps)
        self._tls_active = tls_active
        return self._mail()

    @property
    def caps(self) -> frozenset[bytes]:
        """The server's EHLO keywords (empty after HELO)."""
        return frozenset(self._caps)

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def replies_seen(self) -> int:
        return self._replies

    def reply(self, reply: Reply) -> list[Action]:
        """Feed one server reply; returns what to do next."""
        self._replies += 1
        st = self._state
        if st is _St.GREETING:
            if reply.code != 220:
                return self._quit("Z", "Connected to ", " but greeting failed", reply)
            return self._ehlo()
        if st is _St.EHLO:
            if reply.kind != 2:
                self._state = _St.HELO
                return [Send(b"HELO " + self.helohost + b"\r\n")]
            self._caps = _parse_ehlo(reply.text)
            self._mechs = auth_mechanisms(reply.text)
            return self._after_hello()
        if st is _St.HELO:
            if reply.code != 250:
                return self._quit("Z", "Connected to ", " but my name was rejected", reply)
            self._caps = set()
            self._mechs = frozenset()
            return self._after_hello()
        if st is _St.STARTTLS:
            if reply.code != 220:
                if self.tls is TlsMode.REQUIRED:
                    return self._tls_required_fail("STARTTLS was refused", reply)
                return self._mail()  # RFC 3207: carry on in plaintext
            self._state = _St.TLS
            return [StartTls(verify=self.tls is TlsMode.REQUIRED)]
        if st is _St.AUTH:
            return self._auth_reply(reply)
        if st in (_St.MAIL, _St.RCPT, _St.DATA):
            return self._transaction_reply(reply)
        if st is _St.BODY:
            self._state = _St.DONE
            if reply.kind == 5:
                return self._quit("D", "", " failed after I sent the message", reply)
            if reply.kind != 2:
                return self._quit("Z", "", " failed after I sent the message", reply)
            return self._quit("K", "", " accepted message", reply)
        return []

    def tls_done(self, ok: bool, error: str = "") -> list[Action]:
        """The handshake finished (``ok``) or failed (the connection is then unusable)."""
        if ok:
            self._tls_active = True
            return self._ehlo()
        if self.tls is TlsMode.REQUIRED:
            text = (
                f"Connected to {self.ip} but the TLS handshake failed"
                f" ({error or 'no detail'}); TLS is required for {self.tls_required_for}."
                " (#4.7.5)\n"
            ).encode()
            self._state = _St.DONE
            return [Done(SessionResult((), ("Z", text), quit=False))]
        text = f"Connected to {self.ip} but the TLS handshake failed. (#4.7.5)\n".encode()
        self._state = _St.DONE
        return [Done(SessionResult((), ("Z", text), tls_fallback=True, quit=False))]

    def _ehlo(self) -> list[Action]:
        self._state = _St.EHLO
        return [Send(b"EHLO " + self.helohost + b"\r\n")]

    def _tls_required_fail(self, what: str, reply: Reply | None) -> list[Action]:
        text = (
            f"Connected to {self.ip} but {what}; TLS is required for"
            f" {self.tls_required_for}. (#4.7.5)\n"
        ).encode()
        return self._finish("Z", text, reply)

    def _after_hello(self) -> list[Action]:
        if not self._tls_active and self.tls is not TlsMode.OFF:
            if b"STARTTLS" in self._caps:
                self._state = _St.STARTTLS
                return [Send(b"STARTTLS\r\n")]
            if self.tls is TlsMode.REQUIRED:
                return self._tls_required_fail("it does not offer STARTTLS", None)
        if self.auth is not None:
            return self._auth_start()
        return self._mail()

    # -- AUTH (smtp/clientauth.py) ----------------------------------------------------
    def _auth_start(self) -> list[Action]:
        assert self.auth is not None
        if not self._tls_active:  # never credentials in clear, whatever the TLS mode
            return self._tls_required_fail("TLS is not active", None)
        line = self.auth.start(self._mechs)
        if line is None:
            offered = b" ".join(sorted(self._mechs)).decode("ascii", "replace") or "none"
            text = (
                f"Connected to {self.ip} but it offers no AUTH mechanism I use"
                f" (PLAIN or LOGIN; offered: {offered}). (#4.7.0)\n"
            ).encode()
            return self._finish("Z", text, None)
        self._state = _St.AUTH
        return [Send(line)]

    def _auth_reply(self, reply: Reply) -> list[Action]:
        assert self.auth is not None
        if reply.code == 334 and self._auth_rounds < 4:
            self._auth_rounds += 1
            return [Send(self.auth.answer())]
        if reply.code == 235:
            return self._mail()
        # Any refusal, 5xx included, is temporary: the credentials are this host's
        # configuration, so the mail waits for the fix instead of bouncing (as Postfix's
        # smtp_sasl_auth_soft_bounce does). The reply is quoted without the secret.
        user = self.auth.creds.user.decode("utf-8", "replace")
        text = f"Connected to {self.ip} but authentication as {user} failed. (#4.7.8)\n"
        shown = Reply(reply.code, self.auth.scrub(reply.text))
        return self._finish("Z", text.encode(), shown)

    def _mail(self) -> list[Action]:
        if _has_bad_bytes(self.sender):
            text = b"Sorry, the sender address contains a line break or NUL. (#5.1.7)\n"
            return self._finish("D", text, None)
        params = b""
        utf8 = False
        if b"8BITMIME" in self._caps and self.is_8bit():
            params = b" BODY=8BITMIME"
        if not self.sender.isascii() or not all(r.isascii() for r in self.recipients):
            # RFC 6531 section 3.2: UTF-8 addresses only to a server that offers SMTPUTF8;
            # there is no downgrade, so the message bounces.
            if b"SMTPUTF8" not in self._caps:
                text = (
                    f"Sorry, the envelope has UTF-8 addresses and {self.ip} does not offer"
                    " SMTPUTF8 (RFC 6531). (#5.6.7)\n"
                ).encode()
                return self._finish("D", text, None)
            params += b" SMTPUTF8"
            utf8 = True
        sender = quote_address(self.sender, utf8=utf8)
        cmds = [(_St.MAIL, -1, b"MAIL FROM:<" + sender + b">" + params)]
        for i, rcpt in enumerate(self.recipients):
            if _has_bad_bytes(rcpt):
                text = b"Sorry, the address contains a line break or NUL; not sent. (#5.1.3)\n"
                self._reports[i] = ("h", text)
                continue
            cmds.append((_St.RCPT, i, b"RCPT TO:<" + quote_address(rcpt, utf8=utf8) + b">"))
        if len(cmds) == 1:
            return self._finish("D", b"Sorry, no recipient address can be sent. (#5.1.3)\n", None)
        cmds.append((_St.DATA, -1, b"DATA"))
        self._pending = deque((st, i) for st, i, _ in cmds)
        self._state = _St.MAIL
        if b"PIPELINING" in self._caps:
            # RFC 2920: MAIL, every RCPT and DATA in one write, replies read in order.
            self._pipelined = True
            return [Send(b"".join(c + b"\r\n" for _, _, c in cmds))]
        self._pipelined = False
        self._queued = deque(c + b"\r\n" for _, _, c in cmds)
        return [Send(self._queued.popleft())]

    def _next_unpipelined(self) -> list[Action]:
        if self._pipelined:
            return []
        return [Send(self._queued.popleft())]

    def _transaction_reply(self, reply: Reply) -> list[Action]:
        st, i = self._pending.popleft()
        if st is _St.MAIL:
            if reply.kind == 5:
                return self._quit("D", "Connected to ", " but sender was rejected", reply)
            if reply.kind != 2:
                return self._quit("Z", "Connected to ", " but sender was rejected", reply)
            self._state = _St.RCPT
            return self._next_unpipelined()
        if st is _St.RCPT:
            if reply.kind == 2:
                self._reports[i] = ("r", b"")
                self._accepted += 1
            else:
                letter = "h" if reply.kind == 5 else "s"
                text = self._ipb + b" does not like recipient.\n" + said(reply)
                self._reports[i] = (letter, text)
                self._refused.add(i)
            if self._pending[0][0] is _St.DATA:
                self._state = _St.DATA
                if not self._accepted:
                    # qmail: no recipient accepted -> give up (with pipelining DATA was
                    # already sent; its reply is not awaited). The last reply was already
                    # reported with its recipient, so qmail adds no "Remote host said".
                    return self._quit("D", "Giving up on ", "", None)
            return self._next_unpipelined()
        # DATA
        if reply.kind == 5:
            return self._quit("D", "", " failed on DATA command", reply)
        if reply.code != 354:
            return self._quit("Z", "", " failed on DATA command", reply)
        self._state = _St.BODY
        return [SendBody()]

    def body_sent(self) -> None:
        """The final ``.`` was written: from now on a lost connection may mean a duplicate."""
        self._body_sent = True


def _parse_ehlo(text: bytes) -> set[bytes]:
    caps: set[bytes] = set()
    for line in text.split(b"\n")[1:]:
        word = line[4:].split(b" ", 1)[0].upper().strip()
        if word:
            caps.add(word)
    return caps
