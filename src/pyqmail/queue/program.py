"""The qmail-queue program's job: the message on fd 0, the envelope on fd 1, an exit code.

As in qmail: fd 0 is read to its end first, then fd 1 up to the envelope's final NUL.
The queue is written here in single-user mode, as root (after dropping to qmailq, like
qmail's setuid bit, keeping the caller's real uid for the Received line) or as the
queue user; any other user goes through the queue service (queue/service.py). The
answer is an :class:`Exit`: qmail's exit code and, on failure, the one line the command
prints on stderr. cli/queue.py parses the arguments and picks this or mini-qmail's
QMQP client.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from pyqmail.home import Home, HomeError
from pyqmail.queue import codes
from pyqmail.queue.envelope import EnvelopeError, EnvelopeParser, format_service
from pyqmail.queue.recover import DEATH
from pyqmail.queue.service import ServiceClient, origin_of, socket_path
from pyqmail.queue.submit import drop_to_queue_user
from pyqmail.queue.writer import QueueError, QueueWriter

_CHUNK = 65536


@dataclass(frozen=True)
class Exit:
    """qmail-queue's exit code, and the line it prints on stderr ("" when it succeeds)."""

    code: int
    message: str = ""


def _alarm(signum: int, frame: FrameType | None) -> None:
    # qmail: the 24-hour alarm exits 52 without cleaning up, so that a hung writer's
    # files are left to the 36-hour reaper rather than racing a reused inode.
    os._exit(codes.TIMEOUT)


def _message_chunks() -> Iterator[bytes]:
    while chunk := os.read(0, _CHUNK):
        yield chunk


def _read_envelope() -> tuple[bytes, list[bytes]]:
    """Read fd 1 up to the envelope's final NUL (not further); EnvelopeError."""
    parser = EnvelopeParser()
    while not parser.done:
        try:
            chunk = os.read(1, _CHUNK)
        except OSError as e:
            raise EnvelopeError(codes.READ_ERROR, f"unable to read envelope: {e}") from e
        if not chunk:
            break
        parser.feed(chunk)
    return parser.finish()


def _in_process(home: Home, uid: int, origin: str) -> Exit:
    writer = QueueWriter(home)
    try:
        p = writer.begin(uid=uid, origin=origin)
    except QueueError as e:
        return Exit(e.code, str(e))
    try:
        try:
            for chunk in _message_chunks():
                p.write(chunk)
        except OSError as e:
            p.abort()
            return Exit(codes.READ_ERROR, f"unable to read message: {e}")
        try:
            sender, rcpts = _read_envelope()
        except EnvelopeError as e:
            p.abort()
            return Exit(e.code, str(e))
        p.commit(sender, rcpts)
    except QueueError as e:
        return Exit(e.code, str(e))
    except BaseException:
        p.abort()
        raise
    return Exit(0)


def _via_service(home: Home) -> Exit:
    client = ServiceClient(socket_path(home))

    def envelope() -> bytes:
        sender, rcpts = _read_envelope()
        return format_service(sender, rcpts)

    try:
        reply = client.submit(_message_chunks(), envelope)
    except EnvelopeError as e:
        return Exit(e.code, str(e))
    except OSError as e:
        return Exit(codes.READ_ERROR, f"unable to read message: {e}")
    if reply.code != 0:
        return Exit(reply.code, reply.text or f"queue service refused: {reply.code}")
    return Exit(0)


def run(home: Home) -> Exit:
    """Queue fd 0 for the envelope on fd 1, as this process's user may (module docstring)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(DEATH)
    os.umask(0o033)
    ruid = os.getuid()
    if home.single_user:
        return _in_process(home, ruid, "uid")
    try:
        ids = home.ids()
    except HomeError as e:
        return Exit(codes.HOME_TROUBLE, str(e))
    origin = origin_of(ruid, ids)
    if os.geteuid() == 0:
        try:
            drop_to_queue_user(ids)
        except OSError as e:
            return Exit(codes.HOME_TROUBLE, f"unable to switch to the queue user: {e}")
        return _in_process(home, ruid, origin)
    if os.geteuid() == ids.uid("queue"):
        return _in_process(home, ruid, origin)
    return _via_service(home)
