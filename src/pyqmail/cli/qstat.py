"""qmail-qstat: how many messages are in the queue and how many are not yet preprocessed."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.reader import count, qstat_text

PROG = "qmail-qstat"


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(sys.argv[1:] if argv is None else argv)
    errors: list[str] = []
    c = count(QueuePaths(home.queue), errors)
    for e in errors:
        print(f"{PROG}: {e}", file=sys.stderr)
    sys.stdout.write(qstat_text(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
