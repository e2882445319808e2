"""qmail-queue: queue the message on fd 0 for the envelope on fd 1; exit code only.

The work is queue/program.py's. On a mini-qmail host (control/qmqpservers lists a
server, queue/submit.py's ``qmqp_servers``) qmail-queue is qmail-qmqpc, as mini-qmail
links it: the message goes to a QMQP server and nothing is written here. A failure is
reported by qmail's exit code plus one line on stderr.

``qmail-queue --serve`` runs the queue service itself (see queue/service.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.control import ControlError
from pyqmail.queue import codes, program
from pyqmail.queue.submit import qmqp_servers

PROG = "qmail-queue"


def _die(code: int, message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


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
    result = program.run(home)
    return _die(result.code, result.message) if result.code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
