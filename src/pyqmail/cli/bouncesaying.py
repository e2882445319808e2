"""bouncesaying ERROR [PROG [ARGS]]: bounce with ERROR (if PROG exits 0)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.local.tools import ToolExit, child_verdict, finish


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return finish(
            ToolExit(100, "bouncesaying: usage: bouncesaying error [ program [ arg ... ] ]")
        )
    try:
        if len(args) > 1 and child_verdict("bouncesaying", args[1:]) != 0:
            return 0
    except ToolExit as e:
        return finish(e)
    return finish(ToolExit(100, args[0]))
