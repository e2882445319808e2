"""qmail-queue's envelope formats (queue.md sections 1 and 2). Pure: no I/O.

Input (fd 1 of qmail-queue): ``F<sender>\\0`` then ``T<rcpt>\\0`` ... then a final ``\\0``.
Stored (intd/N, todo/N): ``u<uid>\\0p<pid>\\0F<sender>\\0T<rcpt>\\0...`` without the
final ``\\0``.

Rules, as qmail-queue applies them while reading: the first byte must be ``F`` and every
later record ``T`` or the terminating empty record (else exit 91); an address longer
than MAX_ADDRESS bytes is exit 11; end of input before the final ``\\0`` is exit 54.
pyqmail's own bound: more than MAX_RECIPIENTS recipients is exit 31 (refused for good).
Bytes after the final ``\\0`` are not read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyqmail import mailbox
from pyqmail.queue import codes

MAX_ADDRESS = 1002  # qmail-queue's ADDR is 1003 including the record's NUL

# qmail has no limit on recipients: a client could make any receiver hold millions of
# them. 10,000 is 100 times RFC 5321's minimum (4.5.3.1.8) and 10 times Postfix's
# smtpd_recipient_limit, more than a list manager puts in one envelope, and with
# MAX_ADDRESS it bounds one envelope at about 10 MB (MAX_ENVELOPE) whoever sends it:
# the queue service, QMQP and QMTP refuse anything larger before holding it.
MAX_RECIPIENTS = 10_000
MAX_ENVELOPE = (MAX_RECIPIENTS + 1) * (MAX_ADDRESS + 2) + 1  # F/T, address, NUL; final NUL


TOO_MANY_RECIPIENTS = f"too many recipients: at most {MAX_RECIPIENTS} per message"


class EnvelopeError(Exception):
    """The envelope is refused; ``code`` is qmail-queue's exit code (11, 54 or 91)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class EnvelopeParser:
    """Incremental parser of qmail-queue's fd-1 envelope.

    ``feed(chunk)`` returns how many bytes of the chunk it consumed; once ``done`` is
    true the rest belongs to nobody. ``finish()`` at end of input raises 54 if the
    final NUL was not seen. Errors raise EnvelopeError as soon as they are visible.
    """

    def __init__(self) -> None:
        self.sender: bytes | None = None
        self.recipients: list[bytes] = []  # since the last take()
        self.count = 0  # recipients seen in all
        self.done = False
        self._cur = bytearray()
        self._kind = 0  # 0 = expecting a record type byte, else the record's type
        self._first = True

    def feed(self, chunk: bytes) -> int:
        i = 0
        n = len(chunk)
        while i < n and not self.done:
            if self._kind == 0:
                b = chunk[i]
                i += 1
                if self._first:
                    if b != 0x46:  # F
                        raise EnvelopeError(codes.FORMAT_ERROR, "envelope must start with F")
                    self._first = False
                    self._kind = b
                elif b == 0:
                    self.done = True
                elif b == 0x54:  # T
                    self._kind = b
                else:
                    raise EnvelopeError(codes.FORMAT_ERROR, "envelope record is not T")
                continue
            j = chunk.find(b"\0", i)
            end = n if j < 0 else j
            self._cur += chunk[i:end]
            if len(self._cur) > MAX_ADDRESS:
                raise EnvelopeError(codes.ADDRESS_TOO_LONG, "envelope address too long")
            i = end
            if j >= 0:
                i += 1
                addr = bytes(self._cur)
                self._cur.clear()
                if self._kind == 0x46:
                    self.sender = addr
                elif self.count >= MAX_RECIPIENTS:
                    raise EnvelopeError(codes.PERM_REFUSED, TOO_MANY_RECIPIENTS)
                else:
                    self.count += 1
                    self.recipients.append(addr)
                self._kind = 0
        return i

    def take(self) -> list[bytes]:
        """The recipients parsed since the last call, handed over (a streaming reader
        holds no more than one piece's worth)."""
        out, self.recipients = self.recipients, []
        return out

    def finish(self) -> tuple[bytes, list[bytes]]:
        """The envelope, or EnvelopeError(54) if input ended before the final NUL."""
        if not self.done or self.sender is None:
            raise EnvelopeError(codes.READ_ERROR, "envelope ended before its final NUL")
        return self.sender, self.recipients


def parse_envelope(data: bytes) -> tuple[bytes, list[bytes]]:
    """``F..\\0T..\\0\\0`` -> (sender, recipients); raises EnvelopeError(91/54/11)."""
    p = EnvelopeParser()
    p.feed(data)
    return p.finish()


def check_address(addr: bytes) -> None:
    """What the in-process writer checks of one address: qmail-queue's 11 and 91."""
    if len(addr) > MAX_ADDRESS:
        raise EnvelopeError(codes.ADDRESS_TOO_LONG, "envelope address too long")
    if b"\0" in addr:
        raise EnvelopeError(codes.FORMAT_ERROR, "NUL in an envelope address")


def format_input(sender: bytes, recipients: Sequence[bytes]) -> bytes:
    """The fd-1 form a caller writes to qmail-queue."""
    return b"".join([b"F", sender, b"\0", *(b"T" + r + b"\0" for r in recipients), b"\0"])


def format_service(sender: bytes, recipients: Sequence[bytes]) -> bytes:
    """The queue service's envelope: :func:`format_input` with each address written as
    an RFC 5321 mailbox (quoted where it needs it), which the service checks and unquotes."""
    return format_input(mailbox.quote(sender), [mailbox.quote(r) for r in recipients])


def service_mailbox(address: bytes, *, sender: bool) -> bytes:
    """What the queue service accepts: an RFC 5321 mailbox, as pyqmail.mailbox checks it.

    Returns the queue form (quotes removed). Anything else is qmail-queue's exit 11, a
    permanent refusal whose text, "#5.1.3", is the one for a bad address.
    """
    got = mailbox.check_envelope(address, sender=sender)
    if isinstance(got, mailbox.Refusal):
        what = "sender" if sender else "recipient"
        raise EnvelopeError(codes.ADDRESS_TOO_LONG, f"envelope {what}: {got.value}")
    return got


@dataclass(frozen=True)
class Todo:
    """A stored envelope (intd/N or todo/N)."""

    uid: int | None
    pid: int | None
    sender: bytes
    recipients: tuple[bytes, ...]


def format_todo(uid: int, pid: int, sender: bytes, recipients: Sequence[bytes]) -> bytes:
    """The bytes of intd/N and todo/N."""
    parts = [b"u%d\0p%d\0F" % (uid, pid), sender, b"\0"]
    for r in recipients:
        parts += (b"T", r, b"\0")
    return b"".join(parts)


def parse_todo(data: bytes) -> Todo:
    """Read a stored envelope; ValueError on an unknown record (qmail-send retries later).

    A trailing record without its NUL (a torn file) is an error too.
    """
    if data and not data.endswith(b"\0"):
        raise ValueError("todo file does not end with NUL")
    uid: int | None = None
    pid: int | None = None
    sender: bytes | None = None
    rcpts: list[bytes] = []
    for rec in data.split(b"\0")[:-1]:
        kind, value = rec[:1], rec[1:]
        if kind == b"u":
            uid = int(value)
        elif kind == b"p":
            pid = int(value)
        elif kind == b"F":
            sender = value
        elif kind == b"T":
            rcpts.append(value)
        else:
            raise ValueError(f"unknown todo record {rec[:20]!r}")
    if sender is None:
        raise ValueError("todo file has no F record")
    return Todo(uid, pid, sender, tuple(rcpts))
