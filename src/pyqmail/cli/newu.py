"""qmail-newu: compile users/assign into users/cdb (local.md 2).

Errors print ``qmail-newu: fatal: ...`` and exit 111, leaving the old users/cdb.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.local.users import AssignError, newu


def main(argv: Sequence[str] | None = None) -> int:
    home, _args = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        newu(home)
    except AssignError as e:
        return fatal("qmail-newu", str(e))
    return 0
