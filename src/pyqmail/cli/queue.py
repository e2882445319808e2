"""qmail-queue: queue the message on fd 0 for the envelope on fd 1; exit code only.

As in qmail: fd 0 is read to its end first, then fd 1 up to the envelope's final NUL.
It writes the queue itself in single-user mode, as root (after dropping to qmailq, like
qmail's setuid bit, keeping the caller's real uid for the Received line) or as the
queue user; any other user goes through the queue service (queue/service.py). A
failure is reported by qmail's exit code plus one line on stderr.

On a mini-qmail host (control/qmqpservers lists a server, queue/submit.py's
``qmqp_servers``) qmail-queue is qmail-qmqpc, as mini-qmail links it: the message goes to
a QMQP server and nothing is written here.

``qmail-queue --serve`` runs the queue service itself (see queue/service.py).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Sequence
from types import FrameType

from pyqmail.cli.common import split_home_args
from pyqmail.control import ControlError
from pyqmail.home import Home, HomeError
from pyqmail.queue import codes
from pyqmail.queue.envelope import EnvelopeError, EnvelopeParser, format_service
from pyqmail.queue.service import ServiceClient, origin_of, socket_path
from pyqmail.queue.submit import drop_to_queue_user, qmqp_servers
from pyqmail.queue.writer import QueueError, QueueWriter

PROG = "qmail-queue"
DEATH = 86400
_CHUNK = 65536


def _die(code: int, message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


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


def _in_process(home: Home, uid: int, origin: str) -> int:
    writer = QueueWriter(home)
    try:
        p = writer.begin(uid=uid, origin=origin)
    except QueueError as e:
        return _die(e.code, str(e))
    try:
        try:
            for chunk in _message_chunks():
                p.write(chunk)
        except OSError as e:
            p.abort()
            return _die(codes.READ_ERROR, f"unable to read message: {e}")
        try:
            sender, rcpts = _read_envelope()
        except EnvelopeError as e:
            p.abort()
            return _die(e.code, str(e))
        p.commit(sender, rcpts)
    except QueueError as e:
        return _die(e.code, str(e))
    except BaseException:
        p.abort()
        raise
    return 0


def _via_service(home: Home) -> int:
    client = ServiceClient(socket_path(home))

    def envelope() -> bytes:
        sender, rcpts = _read_envelope()
        return format_service(sender, rcpts)

    try:
        reply = client.submit(_message_chunks(), envelope)
    except EnvelopeError as e:
        return _die(e.code, str(e))
    except OSError as e:
        return _die(codes.READ_ERROR, f"unable to read message: {e}")
    if reply.code != 0:
        return _die(reply.code, reply.text or f"queue service refused: {reply.code}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except MemoryError:
        return _die(codes.NO_MEMORY, "out of memory")
    except Exception as e:  # never a traceback: qmail's "internal bug", a temporary code
        return _die(codes.INTERNAL_BUG, f"internal error: {type(e).__name__}: {e}")


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--serve" in args:
        # ``qmail-queue [--home H] [--single-user] --serve [--socket P]``: run the queue
        # service (queue/service.py) in the foreground; as root it drops to qmailq.
        args.remove("--serve")
        from pyqmail.queue import service

        return service.main(args)
    home, _ = split_home_args(args)
    try:
        mini_qmail = bool(qmqp_servers(home))
    except ControlError as e:
        return _die(codes.CONFIG_ERROR, str(e))
    if mini_qmail:
        from pyqmail.cli import qmqpc

        return qmqpc.main(args)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(DEATH)
    os.umask(0o033)
    ruid = os.getuid()
    if home.single_user:
        return _in_process(home, ruid, "uid")
    try:
        ids = home.ids()
    except HomeError as e:
        return _die(codes.HOME_TROUBLE, str(e))
    origin = origin_of(ruid, ids)
    if os.geteuid() == 0:
        try:
            drop_to_queue_user(ids)
        except OSError as e:
            return _die(codes.HOME_TROUBLE, f"unable to switch to the queue user: {e}")
        return _in_process(home, ruid, origin)
    if os.geteuid() == ids.uid("queue"):
        return _in_process(home, ruid, origin)
    return _via_service(home)


if __name__ == "__main__":
    sys.exit(main())
