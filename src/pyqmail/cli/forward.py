"""forward ADDR...: queue stdin with $DTLINE from $NEWSENDER to ADDR... (tools.md)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.local.tools import ToolExit, finish, requeue


def main(argv: Sequence[str] | None = None) -> int:
    home, args = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        qp = requeue("forward", home, "NEWSENDER", args)
    except ToolExit as e:
        return finish(e)
    print(f"forward: qp {qp}", file=sys.stderr)
    return 0
