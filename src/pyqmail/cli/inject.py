"""qmail-inject [-nNaAhH] [-fsender] [recip ...]: the command around pyqmail.inject.inject.run."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.inject import inject
from pyqmail.inject.inject import InjectError, Options, parse_args

PROG = "qmail-inject"


def run(argv: Sequence[str], prog: str = PROG) -> int:
    """qmail-inject's main after --home: options, then inject.run; returns the exit code."""
    home, rest = split_home_args(argv)
    try:
        opts: Options = parse_args(rest)
    except InjectError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 100
    try:
        inject.run(home, opts, sys.stdin.buffer, sys.stdout.buffer, os.environ)
    except InjectError as e:
        return fatal(prog, str(e), e.code)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
