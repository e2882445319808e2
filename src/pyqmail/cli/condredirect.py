"""condredirect NEWADDR PROG [ARGS]: if PROG exits 0, redirect to NEWADDR and exit 99."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.local.tools import ToolExit, child_verdict, finish, requeue, seekable_stdin


def main(argv: Sequence[str] | None = None) -> int:
    home, args = split_home_args(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        return finish(
            ToolExit(100, "condredirect: usage: condredirect newaddress program [ arg ... ]")
        )
    fd = seekable_stdin()  # the message must still be there after the program read it
    if fd != 0:
        os.dup2(fd, 0)
        os.close(fd)
    try:
        if child_verdict("condredirect", args[1:]) != 0:
            return 0
        qp = requeue("condredirect", home, "SENDER", [args[0]])
    except ToolExit as e:
        return finish(e)
    print(f"condredirect: qp {qp}", file=sys.stderr)
    return 99
