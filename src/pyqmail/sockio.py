"""Blocking exact reads from the socket pairs between pyqmail's own processes (the local
delivery workers, the recipient-lookup and password processes): :func:`recv_exact`."""

from __future__ import annotations

import socket


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes from ``sock``, or None if the peer closed before they came."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
