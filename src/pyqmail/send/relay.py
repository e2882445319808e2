"""A submitter for a child that dropped from root, relayed through its root parent.

``pyqmail queue delete --bounce`` run by root on a multi-user home does qmail-send's part
of the work in a child that has become qmails (send/admin.py), as qmail-send does. qmail-send
queues its bounces through setuid qmail-queue; our equivalent for root is the parent's own
submitter (queue/submit.py: a child that becomes qmailq writes the message), which works
whether or not a queue service is running. The qmails child therefore gets a
:class:`RelaySubmitter` on one end of a socket pair, and the root parent runs
:func:`serve` on the other, copying the bytes into its submitter.

Root copies bytes only; it parses nothing the child wrote but the framing (netstrings with
length limits): the sender and recipients go to the queue writer, which checks them as it
checks anyone's. Only the ``bounce`` origin is relayed, so the Received line says what the
child is doing.

Frames, child to parent: ``B`` (begin; the parent answers ``+`` or ``!``), ``C`` + netstring
(a chunk of the message), ``A`` (abort), ``E`` + netstring(sender) + netstring(recipients,
each followed by NUL); the parent answers ``E`` with a netstring of the queue's reply
(``CODE QP MSGNUM[ TEXT]``, queue/service.py).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence

from pyqmail.home import Home
from pyqmail.queue import codes
from pyqmail.queue.contract import BlockingSubmission, Reply
from pyqmail.queue.envelope import MAX_ENVELOPE
from pyqmail.queue.service import (
    MAX_CHUNK,
    FrameError,
    decode_reply,
    encode_reply_body,
    netstring,
    read_netstring,
)
from pyqmail.queue.writer import QueueError


class RelaySubmitter:
    """The child's side: a BlockingSubmitter for bounces, over ``sock``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._in = sock.makefile("rb")

    def close(self) -> None:
        """Close this end (the parent's :func:`serve` then returns)."""
        self._in.close()
        self.sock.close()

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        if origin != "bounce":
            raise QueueError(codes.INTERNAL_BUG, "only bounces are relayed")
        self.sock.sendall(b"B")
        if self._in.read(1) != b"+":
            raise QueueError(codes.QUEUE_TROUBLE, "unable to start qmail-queue")
        return _RelayPending(self)


class _RelayPending(BlockingSubmission):
    def __init__(self, relay: RelaySubmitter) -> None:
        self.relay = relay

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_CHUNK):
            self.relay.sock.sendall(b"C" + netstring(data[i : i + MAX_CHUNK]))

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.relay.sock.sendall(b"A")

    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        rcpts = b"".join(r + b"\0" for r in recipients)
        self.relay.sock.sendall(b"E" + netstring(sender) + netstring(rcpts))
        try:
            return decode_reply(read_netstring(self.relay._in, 4096))
        except FrameError as e:
            raise QueueError(codes.COMM_FAILED, "lost the relay to qmail-queue") from e


def serve(sock: socket.socket, home: Home) -> None:
    """The root parent's side: relay until the child closes its end."""
    from pyqmail.queue.submit import submitter

    f = sock.makefile("rb")
    pending: BlockingSubmission | None = None
    failed = False
    try:
        while kind := f.read(1):
            if kind == b"B":
                if pending is not None:
                    pending.abort()
                try:
                    pending, failed = submitter(home).begin(origin="bounce"), False
                    sock.sendall(b"+")
                except Exception:
                    pending = None
                    sock.sendall(b"!")
            elif kind == b"C":
                data = read_netstring(f, MAX_CHUNK)
                if pending is not None and not failed:
                    try:
                        pending.write(data)
                    except Exception:
                        failed = True
            elif kind == b"A":
                if pending is not None:
                    pending.abort()
                pending = None
            elif kind == b"E":
                sender = read_netstring(f, MAX_ENVELOPE)
                rcpts = read_netstring(f, MAX_ENVELOPE).split(b"\0")[:-1]
                if pending is None or failed:
                    reply = Reply(codes.WRITE_ERROR, 0, 0, "the relayed message was lost")
                    if pending is not None:
                        pending.abort()
                else:
                    reply = pending.commit_blocking(sender, rcpts)
                pending = None
                sock.sendall(netstring(encode_reply_body(reply)))
            else:
                raise FrameError("bad relay frame")
    except (FrameError, OSError):
        pass
    finally:
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.abort()
        f.close()
