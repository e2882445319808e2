"""qmail-inject [-nNaAhH] [-fsender] [recip ...]: the command around pyqmail.inject.inject."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.control import ControlError, load
from pyqmail.inject.inject import InjectError, Options, Settings, Sink, inject, parse_args
from pyqmail.queue.codes import qq_result
from pyqmail.queue.submit import QueueSubmitter, submitter
from pyqmail.queue.writer import QueueError

PROG = "qmail-inject"


class _Stdout:
    """-n: the message goes to stdout instead of the queue."""

    def write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)

    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> int:
        sys.stdout.buffer.flush()
        return 0

    def abort(self) -> None:
        sys.stdout.buffer.flush()


def run(argv: Sequence[str], prog: str = PROG) -> int:
    """qmail-inject's main after --home: options, controls, queue; returns the exit code."""
    home, rest = split_home_args(argv)
    try:
        opts: Options = parse_args(rest)
    except InjectError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 100
    try:
        ctl = load(home)
    except ControlError as e:
        return fatal(prog, f"unable to read controls: {e}", 111)
    settings = Settings.from_env(ctl, os.environ)
    try:
        sink: Sink
        if opts.print_only:
            sink = _Stdout()
        else:
            # QMAILQUEUE, mini-qmail's QMQP or the local queue: queue/submit.py decides
            sub = submitter(home, qmqpservers=ctl.qmqpservers)
            if isinstance(sub, QueueSubmitter):  # local injection is DKIM-signed (dkim.py)
                sink = sub.begin(origin="uid", sign=True)
            else:
                sink = sub.begin(origin="uid")
        inject(sys.stdin.buffer, opts, settings, sink)
    except InjectError as e:
        return fatal(prog, str(e), e.code)
    except QueueError as e:
        letter, text = qq_result(e.code, e.custom)
        return fatal(prog, text, 100 if letter == "D" else 111)
    except MemoryError:
        return fatal(prog, "out of memory", 111)
    except OSError as e:
        return fatal(prog, f"unable to queue the message: {e.strerror or e}", 111)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
