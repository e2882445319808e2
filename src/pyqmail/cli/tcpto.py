"""qmail-tcpto: print the addresses in queue/lock/tcpto that recently timed out."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.remote.tcpto import format_entries, read_table


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(list(sys.argv[1:] if argv is None else argv))
    path = home.queue / "lock" / "tcpto"
    try:
        data = read_table(path)
    except OSError as e:
        return fatal("qmail-tcpto", f"unable to read {path}: {e.strerror}")
    sys.stdout.write(format_entries(data, int(time.time())))
    sys.stdout.flush()
    return 0
