"""qmail-qmqpc: the QMQP client, and mini-qmail's way of queueing (inject.md section 3).

Owns :class:`QmqpSubmitter` — a Submitter whose messages are spooled to an unlinked
temporary file (the length must be known before sending) and then offered to each server
of control/qmqpservers in turn — and :func:`send_request`, which maps the reply to
qmail-queue's codes (K 0, D 31, Z 71; 72 connect timeout, 73 refused, 74 broken
conversation; 55 when no server is configured). Whether a host is a mini-qmail null
client at all is decided in one place for every caller: queue/submit.py's ``submitter``
(QMAILQUEUE, else QMQP when control/qmqpservers lists a server, else the local queue).

Kept apart from the server (smtp/qmqpd.py) so that qmail-inject does not import asyncio.
"""

from __future__ import annotations

import ipaddress
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from pyqmail import netstring
from pyqmail.mailbox import quote
from pyqmail.netstring import NetstringError
from pyqmail.queue import codes
from pyqmail.queue.contract import BlockingSubmission, QueueError, Reply

if TYPE_CHECKING:  # queue/submit.py imports this module
    pass

PORT = 628
CONNECT_TIMEOUT = 10.0
SESSION_TIMEOUT = 3600.0
CHUNK = 65536


# -- the client: qmail-qmqpc -----------------------------------------------------------


def server_list(lines: Sequence[str], default_port: int = PORT) -> list[tuple[str, int]]:
    """qmqpservers lines -> (ip, port); lines that are not an IP address are skipped.

    pyqmail extension: ``IP:PORT`` (IPv4) or ``[IPv6]:PORT`` names another port."""
    out: list[tuple[str, int]] = []
    for line in lines:
        host, port = line.strip(), default_port
        if host.startswith("[") and "]" in host:
            host, _, rest = host[1:].partition("]")
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
        elif host.count(":") == 1:
            host, _, p = host.partition(":")
            if not p.isdigit():
                continue
            port = int(p)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            continue
        out.append((host, port))
    return out


def _iter_file(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def send_request(
    servers: Sequence[tuple[str, int]],
    message: IO[bytes],
    length: int,
    sender: bytes,
    recipients: Sequence[bytes],
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    timeout: float = SESSION_TIMEOUT,
) -> tuple[int, str]:
    """Offer the request to each server in turn. Returns (qmail-queue code, reply text)."""
    if not servers:
        return codes.CONFIG_ERROR, "no QMQP servers in control/qmqpservers"
    # written as RFC 5321 mailboxes: a QMQP server (ours) refuses "a b@x" but takes '"a b"@x'
    envelope = netstring.encode(quote(sender)) + netstring.encode_all(
        [quote(r) for r in recipients]
    )
    body_len = len(b"%d:" % length) + length + 1 + len(envelope)
    head = b"%d:%d:" % (body_len, length)
    result = (codes.CONFIG_ERROR, "no usable QMQP server")
    for host, port in servers:
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError:
            result = (codes.CONN_TIMEOUT, f"connection to {host} timed out")
            continue
        except OSError as e:
            result = (codes.CONN_REJECTED, f"connection to {host} failed: {e.strerror}")
            continue
        with sock:
            try:
                sock.settimeout(timeout)
                message.seek(0)
                sock.sendall(head)
                for chunk in _iter_file(message):
                    sock.sendall(chunk)
                sock.sendall(b"," + envelope + b",")
                reply = _read_reply(sock)
            except (OSError, NetstringError) as e:
                result = (codes.COMM_FAILED, f"communication with {host} failed: {e}")
                continue
        if reply[:1] == b"K":
            return 0, reply[1:].decode("utf-8", "replace")
        text = reply[1:].decode("utf-8", "replace")
        if reply[:1] == b"D":
            return codes.PERM_REFUSED, text
        if reply[:1] == b"Z":
            result = (codes.TEMP_REFUSED, text)
            continue
        result = (codes.COMM_FAILED, f"bad reply from {host}")
    return result


def _read_reply(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        got = netstring.decode_one(buf, 0, 1 << 20)
        if got is not None:
            return got[0]
        data = sock.recv(4096)
        if not data:
            raise NetstringError("connection closed before the reply")
        buf += data


@dataclass
class _QmqpPending(BlockingSubmission):
    """A message spooled for QMQP; commit sends it (blocking)."""

    servers: list[tuple[str, int]]
    connect_timeout: float
    received: bytes
    msgnum: int = 0
    qp: int = 0
    reply: str = ""
    _tmp: IO[bytes] | None = field(default=None, repr=False)
    _length: int = 0

    def __post_init__(self) -> None:
        self._tmp = tempfile.TemporaryFile(buffering=CHUNK)  # noqa: SIM115
        if self.received:
            self.write(self.received)

    def write(self, data: bytes) -> None:
        if self._tmp is None:
            raise RuntimeError("write after commit or abort")
        self._tmp.write(data)
        self._length += len(data)

    def abort(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None

    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        if self._tmp is None:
            raise RuntimeError("commit after commit or abort")
        tmp, self._tmp = self._tmp, None
        with tmp:
            try:
                tmp.flush()
            except OSError as e:
                raise QueueError(codes.WRITE_ERROR) from e
            code, text = send_request(
                self.servers, tmp, self._length, sender, recipients,
                connect_timeout=self.connect_timeout,
            )  # fmt: skip
        self.reply = text
        return Reply(code, 0, 0, text)


class QmqpSubmitter:
    """mini-qmail: a Submitter that hands every message to control/qmqpservers."""

    kind = "qmqp"

    def __init__(
        self,
        servers: Sequence[str],
        *,
        port: int = PORT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.servers = server_list(servers, port)
        self.connect_timeout = connect_timeout

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        return _QmqpPending(self.servers, self.connect_timeout, received)
