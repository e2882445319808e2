"""``qmail-showctl [--home DIR]``: print every control file's effective value.

Layout and texts are qmail-showctl's (see pyqmail.showctl), then pyqmail's additions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.showctl import report

PROG = "qmail-showctl"


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(sys.argv[1:] if argv is None else argv)
    if not home.control.is_dir():
        return fatal(PROG, f"unable to chdir to {home.control}: no such directory", 111)
    sys.stdout.write(report(home))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
