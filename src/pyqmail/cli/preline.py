"""preline [-frdFRD] PROG [ARGS]: feed PROG $UFLINE $RPLINE $DTLINE + stdin (tools.md)."""

from __future__ import annotations

import getopt
import os
import sys
from collections.abc import Sequence

from pyqmail.local.tools import ToolExit, finish, preline

USAGE = "preline: usage: preline cmd [ arg ... ]"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environb
    lines = {k: env.get(k) for k in (b"UFLINE", b"RPLINE", b"DTLINE")}
    if any(v is None for v in lines.values()):
        print(USAGE, file=sys.stderr)
        return 100
    want = {b"UFLINE": True, b"RPLINE": True, b"DTLINE": True}
    try:
        opts, rest = getopt.getopt(args, "frdFRD")
    except getopt.GetoptError:
        print(USAGE, file=sys.stderr)
        return 100
    names = {"f": b"UFLINE", "r": b"RPLINE", "d": b"DTLINE"}
    for opt, _ in opts:
        ch = opt[1]
        want[names[ch.lower()]] = ch.isupper()
    if not rest:
        print(USAGE, file=sys.stderr)
        return 100
    head = b"".join(v or b"" for k, v in lines.items() if want[k])
    try:
        return preline(head, rest)
    except ToolExit as e:
        return finish(e)
