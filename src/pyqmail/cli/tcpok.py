"""qmail-tcpok: forget every timeout in queue/lock/tcpto (zero the table)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.remote.tcpto import Tcpto


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(list(sys.argv[1:] if argv is None else argv))
    path = home.queue / "lock" / "tcpto"
    try:
        Tcpto(path).clear()
    except OSError:
        return fatal("qmail-tcpok", f"unable to open {path} for writing")
    return 0
