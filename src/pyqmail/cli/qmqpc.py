"""qmail-qmqpc: qmail-queue's interface (message on fd 0, envelope on fd 1), but the
message goes to the first server of control/qmqpservers that answers (QMQP, port 628).

Exit codes are qmail-queue's (queue.md 2.1): 0 accepted (K), 31 refused (D), 71 deferred
(Z), 72 connect timeout, 73 connection refused, 74 conversation broken, 55 no server
configured or controls unreadable, 54 unreadable message or envelope, 91/11 bad envelope.
Symlink or install it as qmail-queue (or point QMAILQUEUE at it) for a mini-qmail host.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.control import ControlError, load
from pyqmail.queue import codes
from pyqmail.queue.envelope import EnvelopeError, parse_envelope
from pyqmail.queue.qmqpc import CHUNK, send_request, server_list

PROG = "qmail-qmqpc"


def main(argv: Sequence[str] | None = None) -> int:
    home, _rest = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        servers = server_list(load(home).qmqpservers)
    except ControlError:
        return codes.CONFIG_ERROR
    with tempfile.TemporaryFile() as msg:
        length = 0
        try:
            while chunk := os.read(0, CHUNK):
                msg.write(chunk)
                length += len(chunk)
            env = b""
            while chunk := os.read(1, CHUNK):
                env += chunk
                if env.endswith(b"\0\0"):  # the final NUL; "\0\0" occurs nowhere else
                    break
        except OSError:
            return codes.READ_ERROR
        try:
            sender, recipients = parse_envelope(env)
        except EnvelopeError as e:
            return e.code
        try:
            msg.flush()
        except OSError:
            return codes.WRITE_ERROR
        code, text = send_request(servers, msg, length, sender, recipients)
    if code and os.environ.get("PYQMAIL_VERBOSE"):
        print(f"{PROG}: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
