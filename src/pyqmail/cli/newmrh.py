"""``qmail-newmrh [--home DIR]``: compile control/morercpthosts into morercpthosts.cdb.

The work is control.newmrh(). As qmail's: each line lowercased is a key with an empty
value (comments and empty lines skipped, duplicates kept); written to
control/morercpthosts.tmp, fsynced and renamed, so qmail-smtpd sees the old cdb or the
new one. Errors print ``qmail-newmrh: fatal: ...`` and exit 111 with the old cdb
untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.cli.tcprules import errtext
from pyqmail.control import NewmrhError, newmrh

PROG = "qmail-newmrh"


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        newmrh(home)
    except NewmrhError as e:
        detail = errtext(e.cause) if isinstance(e.cause, OSError) else str(e.cause)
        return fatal(PROG, f"{e.what}: {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
