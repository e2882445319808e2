"""``qmail-newmrh [--home DIR]``: compile control/morercpthosts into morercpthosts.cdb.

As qmail's: each line lowercased is a key with an empty value (comments and empty lines
skipped, duplicates kept); written to control/morercpthosts.tmp, fsynced and renamed,
so qmail-smtpd sees the old cdb or the new one. Errors print
``qmail-newmrh: fatal: ...`` and exit 111 with the old cdb untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail import cdb
from pyqmail.cli.common import fatal, split_home_args
from pyqmail.cli.tcprules import errtext
from pyqmail.control import morercpthosts_keys

PROG = "qmail-newmrh"


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(sys.argv[1:] if argv is None else argv)
    src = home.control / "morercpthosts"
    tmp = home.control / "morercpthosts.tmp"
    dst = home.control / "morercpthosts.cdb"
    try:
        raw = src.read_bytes()
    except OSError as e:
        return fatal(PROG, f"unable to read control/morercpthosts: {errtext(e)}")
    try:
        writer = cdb.Writer(dst, tmp)
    except OSError as e:
        return fatal(PROG, f"unable to create control/morercpthosts.tmp: {errtext(e)}")
    try:
        with writer:
            for key in morercpthosts_keys(raw):
                writer.add(key, b"")
    except OSError as e:
        if e.filename2 is not None:
            return fatal(
                PROG,
                "unable to move control/morercpthosts.tmp to control/morercpthosts.cdb: "
                + errtext(e),
            )
        return fatal(PROG, f"unable to write control/morercpthosts.tmp: {errtext(e)}")
    except cdb.CdbError as e:
        return fatal(PROG, f"unable to write control/morercpthosts.tmp: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
