"""A test driver for the sans-IO SMTP core: feeds bytes, answers queue events, records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.smtp.protocol import (
    AuthNote,
    CheckPassword,
    Close,
    DataChunk,
    Event,
    Limits,
    MessageAbort,
    MessageEnd,
    MessageStart,
    Pause,
    Send,
    SmtpServerConnection,
)
from pyqmail.smtp.session import Session

ACCEPT = b"250 ok 1700000000 qp 4242\r\n"


@dataclass
class Message:
    sender: bytes
    recipients: tuple[bytes, ...]
    received: bytes
    body: bytes = b""
    auth: bytes | None = None


@dataclass
class Driver:
    conn: SmtpServerConnection
    start_ok: bool = True
    reply: bytes = ACCEPT
    out: bytes = b""
    messages: list[Message] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed: bool = False
    current: Message | None = None
    # AUTH: the right passwords (None: every check is a temporary failure), and what
    # the core asked and noted
    passwords: dict[bytes, bytes] | None = field(default_factory=dict)
    checked: list[CheckPassword] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)
    notes: list[AuthNote] = field(default_factory=list)

    def handle(self, events: list[Event]) -> None:
        while events:
            nxt: list[Event] = []
            for i, ev in enumerate(events):
                assert not self.closed, f"event after Close: {ev}"
                if isinstance(ev, Send):
                    self.out += ev.data
                elif isinstance(ev, DataChunk):
                    assert self.current is not None
                    self.current.body += ev.data
                elif isinstance(ev, MessageStart):
                    assert i == len(events) - 1, "MessageStart must end its event list"
                    self.current = Message(ev.sender, ev.recipients, ev.received, auth=ev.auth)
                    nxt = self.conn.start_result(self.start_ok)
                    if not self.start_ok:
                        self.current = None
                elif isinstance(ev, MessageEnd):
                    assert i == len(events) - 1, "MessageEnd must end its event list"
                    assert self.current is not None
                    self.messages.append(self.current)
                    self.current = None
                    nxt = self.conn.message_result(self.reply)
                elif isinstance(ev, MessageAbort):
                    self.aborted.append(ev.reason)
                    self.current = None
                elif isinstance(ev, CheckPassword):
                    assert i == len(events) - 1, "CheckPassword must end its event list"
                    self.checked.append(ev)
                    pw = self.passwords
                    nxt = self.conn.auth_result(
                        None if pw is None else pw.get(ev.user) == ev.password
                    )
                elif isinstance(ev, Pause):
                    assert i == len(events) - 1, "Pause must end its event list"
                    self.pauses.append(ev.seconds)
                    nxt = self.conn.pause_over()
                elif isinstance(ev, AuthNote):
                    self.notes.append(ev)
                elif isinstance(ev, Close):
                    self.closed = True
            events = nxt

    def greet(self) -> Driver:
        self.handle(self.conn.greet())
        return self

    def feed(self, data: bytes, piece: int = 0) -> bytes:
        """Feed ``data`` (in ``piece``-byte pieces; 0 = whole); returns what was sent."""
        before = len(self.out)
        if piece <= 0:
            self.handle(self.conn.receive_data(data))
        else:
            for i in range(0, len(data), piece):
                self.handle(self.conn.receive_data(data[i : i + piece]))
        return self.out[before:]

    def lines(self) -> list[bytes]:
        return self.out.split(b"\r\n")[:-1]

    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.lines() if line[3:4] == b" "]


def make(
    home: Home,
    env: Mapping[str, str] | None = None,
    limits: Limits | None = None,
    **session_kw: object,
) -> Driver:
    ctl = load(home)
    environ = {"TCPREMOTEIP": "192.0.2.7"} if env is None else dict(env)
    session = Session(ctl, environ, clock=lambda: 811486014.0, **session_kw)  # type: ignore[arg-type]
    return Driver(SmtpServerConnection(session, limits))
