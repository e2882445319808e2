"""TLS over file descriptors through :class:`ssl.MemoryBIO`: the stdin/stdout door's STARTTLS.

qmail-smtpd under tcpserver gets the socket as fd 0 (read) and fd 1 (write), two
descriptors that ``ssl.wrap_socket`` cannot take. :class:`BioTls` is the TLS layer with
no I/O: ciphertext in, plaintext out, and the reverse, so the sans-IO SMTP core
(smtp/protocol.py) is driven the same way inside TLS. :func:`handshake` is the one
blocking piece: it runs the server handshake over the two descriptors with a deadline.

Invariant: nothing read from the client before the handshake begins is fed to the TLS
layer or to the SMTP core; the core already threw away what came behind STARTTLS, and
the handshake reads the descriptor afresh.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import time
from collections.abc import Callable

from pyqmail.smtp.session import TlsInfo
from pyqmail.smtp.tls import info

_READ = 65536


class TlsFailure(Exception):
    """The handshake or the TLS stream failed (the client gets nothing more)."""


class BioTls:
    """One server-side TLS connection over memory buffers."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.established = False
        self.closed = False  # the client sent close_notify, or the stream ended

    def outgoing(self) -> bytes:
        """Ciphertext waiting to be written to the client."""
        return self._out.read()

    def step(self, data: bytes) -> bool:
        """Handshake: feed ciphertext (``b""`` = end of file); True once established.
        Raises TlsFailure for a failed handshake (see ``outgoing`` for the alert)."""
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            if not data:
                raise TlsFailure("end of file during the TLS handshake") from None
            return False
        except (ssl.SSLError, OSError) as e:
            raise TlsFailure(str(e)) from e
        self.established = True
        return True

    def decrypt(self, data: bytes) -> bytes | None:
        """Ciphertext from the client -> plaintext; ``b""`` means the client is gone
        (end of file or close_notify), None means no whole record yet."""
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        return self._drain(eof=not data)

    def buffered(self) -> bytes:
        """Plaintext that arrived with the end of the handshake (a client may send its
        first command in the same segment as its Finished): it is not on the descriptor
        any more, so the caller must ask for it before waiting for input."""
        return self._drain(eof=False) or b""

    def _drain(self, *, eof: bool) -> bytes | None:
        out: list[bytes] = []
        while True:
            try:
                chunk = self._obj.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            except (ssl.SSLError, OSError):
                self.closed = True  # a bad record or a truncated stream: the end
                break
            if not chunk:
                self.closed = True
                break
            out.append(chunk)
        if out:
            return b"".join(out)
        return b"" if (self.closed or eof) else None

    def encrypt(self, data: bytes) -> bytes:
        """Plaintext for the client -> ciphertext to write."""
        try:
            self._obj.write(data)
        except (ssl.SSLError, OSError) as e:
            raise TlsFailure(str(e)) from e
        return self._out.read()

    def info(self) -> TlsInfo:
        return info(self._obj)


def handshake(
    ctx: ssl.SSLContext,
    infd: int,
    outfd: int,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> BioTls:
    """Run the server handshake over ``infd``/``outfd`` within ``timeout`` seconds."""
    tls = BioTls(ctx)
    deadline = clock() + timeout
    while True:
        left = deadline - clock()
        if left <= 0 or not select.select([infd], [], [], left)[0]:
            raise TlsFailure("timeout during the TLS handshake")
        try:
            data = os.read(infd, _READ)
        except OSError as e:
            raise TlsFailure(str(e)) from e
        try:
            done = tls.step(data)
        except TlsFailure:
            with contextlib.suppress(TlsFailure):  # the alert, if the client still listens
                write_all(outfd, tls.outgoing(), 1.0)
            raise
        write_all(outfd, tls.outgoing(), max(deadline - clock(), 1.0))
        if done:
            return tls


def write_all(fd: int, data: bytes, timeout: float) -> None:
    """Write ``data`` whole within ``timeout`` seconds; TlsFailure otherwise."""
    view = memoryview(data)
    while view:
        if timeout <= 0 or not select.select([], [fd], [], timeout)[1]:
            raise TlsFailure("write timeout")
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue
        except OSError as e:
            raise TlsFailure(str(e)) from e
