"""Netstrings (``<decimal length>:<bytes>,``), the framing of QMQP and QMTP.

Owns encoding and the incremental reading of a length prefix. The QMQP and QMTP servers
(smtp/qmqpd.py, smtp/qmtpd.py) and clients (queue/qmqpc.py, remote/qmtp.py) drive these
over their own buffers; nothing here does I/O.

A length prefix is decimal digits then ``:``. Anything else where a digit is due is a
protocol error (:class:`NetstringError` code 100, as notqmail 1.09's qmail-qmqpd exits);
a length above the caller's limit is code 111 (qmail-qmqpd's "resources" exit). A length
field is read from at most MAX_FIELD (13) bytes: a longer one (leading zeros included) is
a protocol error that is answered before the connection closes, so no peer makes the
parser scan or hold an endless run of digits.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_FIELD = 13  # bytes of a length field, the colon included: 12 digits, up to 10^12 - 1

BAD_LENGTH_FIELD = b"Dsorry, that netstring length field is too long (#5.5.2)"


class NetstringError(ValueError):
    """Malformed or oversized netstring; ``code`` is the exit status qmail uses.

    ``reply`` is the refusal the server sends before closing, when there is one (qmail
    closes without a word on its own protocol errors)."""

    def __init__(self, message: str, code: int = 100, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reply = reply


def encode(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def encode_all(items: Iterable[bytes]) -> bytes:
    return b"".join(encode(i) for i in items)


def parse_length(
    buf: bytes | bytearray, start: int, limit: int, end: int | None = None
) -> tuple[int, int] | None:
    """Read ``digits:`` at ``buf[start:end]`` (``end`` bounds the bytes that may belong
    to it; None = all of ``buf``). At most MAX_FIELD bytes are ever looked at.

    Returns (length, index after the colon), or None if more bytes are needed. Raises
    NetstringError(100) for a non-digit or a field over MAX_FIELD bytes (with a reply),
    NetstringError(111) for a length over ``limit``.
    """
    stop = min(len(buf), start + MAX_FIELD, len(buf) if end is None else end)
    n = 0
    i = start
    while i < stop:
        c = buf[i]
        if c == 58:  # ':'
            if i == start:
                raise NetstringError("empty netstring length")
            return n, i + 1
        if not 48 <= c <= 57:
            raise NetstringError(f"bad netstring length byte {bytes([c])!r}")
        n = n * 10 + (c - 48)
        if n > limit:
            raise NetstringError(f"netstring length over {limit}", 111)
        i += 1
    if i - start >= MAX_FIELD:
        raise NetstringError("netstring length field too long", 100, BAD_LENGTH_FIELD)
    return None


def decode_one(
    buf: bytes | bytearray, start: int = 0, limit: int = 1 << 30
) -> tuple[bytes, int] | None:
    """One whole netstring at ``buf[start:]``: (payload, index after the comma), or None
    if incomplete. Raises NetstringError."""
    got = parse_length(buf, start, limit)
    if got is None:
        return None
    n, i = got
    if len(buf) < i + n + 1:
        return None
    if buf[i + n] != 44:  # ','
        raise NetstringError("netstring not terminated by a comma")
    return bytes(buf[i : i + n]), i + n + 1


def decode_all(data: bytes) -> list[bytes]:
    """Every netstring in ``data``, which must hold whole netstrings only."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        got = decode_one(data, i)
        if got is None:
            raise NetstringError("truncated netstring")
        item, i = got
        out.append(item)
    return out
