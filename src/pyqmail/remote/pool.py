"""Idle SMTP connections kept between messages to the same server address.

qmail-remote opens one connection per delivery. After a message was accepted (2xx after
the dot) the server is between transactions (RFC 5321 section 4.1.4), so the next
message for the same address can start with MAIL at once, saving the connect, the
greeting, EHLO and QUIT; Postfix does the same (its connection cache). Rules:

- only after an accepted message, only with no unread reply bytes, and never for domains
  that require TLS (their certificate check belongs to the domain, not the address);
- kept at most ``idle`` seconds (a timer, not a task, then QUIT and close), at most
  ``max_uses`` messages per connection and ``max_per_key`` idle connections per address;
- a kept connection that turns out dead (EOF, reset, or a 421 before any other reply) is
  dropped and the message goes over a new connection: nothing was accepted on it yet.

``idle=0`` turns the pool off (the qmail-remote command runs that way).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

Key = tuple[str, int, str]  # (ip, port, helohost)


@dataclass(eq=False)
class Idle:
    """A connection between transactions, with what its EHLO said."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    caps: frozenset[bytes]
    tls: bool
    uses: int = 1
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)


def _quit(conn: Idle) -> None:
    transport = conn.writer.transport
    if transport.is_closing():
        return
    try:
        conn.writer.write(b"QUIT\r\n")
    except (OSError, RuntimeError):
        pass
    if conn.tls or transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


class ConnectionPool:
    def __init__(self, idle: float = 5.0, *, max_per_key: int = 100, max_uses: int = 100):
        self.idle = idle
        self.max_per_key = max_per_key
        self.max_uses = max_uses
        self._idle: dict[Key, list[Idle]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def get(self, key: Key) -> Idle | None:
        """The most recently kept live connection for ``key``, taken out of the pool."""
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn._timer is not None:
                conn._timer.cancel()
                conn._timer = None
            if conn.writer.transport.is_closing() or conn.reader.at_eof():
                conn.writer.transport.abort()
                continue
            return conn
        return None

    def put(self, key: Key, conn: Idle) -> bool:
        """Keep ``conn`` for ``key``; False if the pool is off or full (caller closes it)."""
        if self.idle <= 0 or conn.uses >= self.max_uses:
            return False
        conns = self._idle.setdefault(key, [])
        if len(conns) >= self.max_per_key:
            return False
        loop = asyncio.get_running_loop()
        conn._timer = loop.call_later(self.idle, self._expire, key, conn)
        conns.append(conn)
        return True

    def _expire(self, key: Key, conn: Idle) -> None:
        conns = self._idle.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[key]
        _quit(conn)

    def close(self) -> None:
        """QUIT and close every kept connection."""
        for conns in self._idle.values():
            for conn in conns:
                if conn._timer is not None:
                    conn._timer.cancel()
                _quit(conn)
        self._idle.clear()
