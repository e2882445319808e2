"""qmail-pw2u [-/ohHuUC] [-c CHAR] < passwd > assign (local.md 2)."""

from __future__ import annotations

import getopt
import sys
from collections.abc import Sequence
from dataclasses import replace

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.local.pw2u import Options, Pw2uError, convert


def main(argv: Sequence[str] | None = None) -> int:
    home, args = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        opts_list, _rest = getopt.getopt(args, "/ohHuUc:C")
    except getopt.GetoptError:
        return 100
    opts = Options()
    for opt, val in opts_list:
        if opt == "-/":
            opts = replace(opts, dashcolon=b"-/:")
        elif opt == "-o":
            opts = replace(opts, home_strategy=2)
        elif opt == "-h":
            opts = replace(opts, home_strategy=1)
        elif opt == "-H":
            opts = replace(opts, home_strategy=0)
        elif opt == "-u":
            opts = replace(opts, noupper=False)
        elif opt == "-U":
            opts = replace(opts, noupper=True)
        elif opt == "-c":
            opts = replace(opts, brk=val.encode()[:1])
        elif opt == "-C":
            opts = replace(opts, brk=b"")
    try:
        out = convert(sys.stdin.buffer.read().split(b"\n"), home.users, opts)
    except Pw2uError as e:
        return fatal("qmail-pw2u", str(e))
    except OSError:
        return fatal("qmail-pw2u", "unable to read input")
    try:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    except OSError:
        return fatal("qmail-pw2u", "unable to write output")
    return 0
