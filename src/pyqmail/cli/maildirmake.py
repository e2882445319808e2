"""maildirmake DIR: DIR, DIR/tmp, DIR/new, DIR/cur, mode 0700 (tools.md)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal
from pyqmail.local.failure import strerror
from pyqmail.local.maildir import make


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("maildirmake: usage: maildirmake name", file=sys.stderr)
        return 100
    try:
        make(args[0])
    except OSError as e:
        where = args[0] if e.filename in (None, args[0]) else os.fsdecode(e.filename)
        return fatal("maildirmake", f"unable to mkdir {where}: {strerror(e)}")
    return 0
