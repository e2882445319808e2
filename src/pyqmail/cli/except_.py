"""except PROG [ARGS]: invert PROG's verdict for .qmail (0 -> 100, 111 -> 111, else 0)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.local.tools import ToolExit, child_verdict, finish


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return finish(ToolExit(100, "except: usage: except program [ arg ... ]"))
    try:
        return 100 if child_verdict("except", args) == 0 else 0
    except ToolExit as e:
        return finish(e)
