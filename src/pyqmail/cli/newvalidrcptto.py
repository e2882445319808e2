"""``pyqmail newvalidrcptto [--home DIR]``: compile control/validrcptto into validrcptto.cdb.

The recipient list for domains delivered by something else (smtp/rcptcheck.py,
docs/rcptcheck.md): an address or ``@domain`` per line. Compiled exactly as
qmail-newmrh compiles morercpthosts (cli/newmrh.py's code): each line lowercased is a
key with an empty value, written to control/validrcptto.tmp, fsynced and renamed, so
the SMTP server sees the old cdb or the new one. Errors print
``pyqmail newvalidrcptto: fatal: ...`` and exit 111 with the old cdb untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.cli.newmrh import compile_list

PROG = "pyqmail newvalidrcptto"


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(sys.argv[1:] if argv is None else argv)
    return compile_list(home, "validrcptto", PROG)


if __name__ == "__main__":
    sys.exit(main())
