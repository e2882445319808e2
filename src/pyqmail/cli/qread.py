"""qmail-qread: list the preprocessed messages in the queue with their recipients."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.reader import format_message, messages, qmail_strerror

PROG = "qmail-qread"


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(sys.argv[1:] if argv is None else argv)
    paths = QueuePaths(home.queue)
    out = sys.stdout
    # qmail-qread writes its warnings and its fatal errors on stdout, exit 111.
    try:
        os.listdir(paths.root)
    except OSError as e:
        out.write(f"fatal: unable to chdir: {qmail_strerror(e)}\n")
        return 111
    try:
        for m in messages(paths):
            if isinstance(m, tuple):
                out.write(f"warning: trouble with #{m[0]}: {m[1]}\n")
            else:
                out.write(format_message(m))
    except OSError as e:
        out.write(f"fatal: trouble reading queue: {qmail_strerror(e)}\n")
        return 111
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
