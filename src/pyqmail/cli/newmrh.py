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

from pyqmail import cdb
from pyqmail.cli.common import fatal, split_home_args
from pyqmail.cli.tcprules import errtext
from pyqmail.control import NewmrhError, morercpthosts_keys, newmrh
from pyqmail.home import Home

PROG = "qmail-newmrh"


def main(argv: Sequence[str] | None = None) -> int:
    home, _ = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        newmrh(home)
    except NewmrhError as e:
        detail = errtext(e.cause) if isinstance(e.cause, OSError) else str(e.cause)
        return fatal(PROG, f"{e.what}: {detail}")
    return 0


def compile_list(home: Home, name: str, prog: str) -> int:
    """control/NAME -> control/NAME.cdb the way qmail-newmrh does it (each line lowercased
    a key with an empty value; NAME.tmp, fsync, rename); 0, or 111 after ``fatal``.
    Shared with ``pyqmail newvalidrcptto``."""
    src = home.control / name
    tmp = home.control / f"{name}.tmp"
    dst = home.control / f"{name}.cdb"
    try:
        raw = src.read_bytes()
    except OSError as e:
        return fatal(prog, f"unable to read control/{name}: {errtext(e)}")
    try:
        writer = cdb.Writer(dst, tmp)
    except OSError as e:
        return fatal(prog, f"unable to create control/{name}.tmp: {errtext(e)}")
    try:
        with writer:
            for key in morercpthosts_keys(raw):
                writer.add(key, b"")
    except OSError as e:
        if e.filename2 is not None:
            return fatal(
                prog,
                f"unable to move control/{name}.tmp to control/{name}.cdb: " + errtext(e),
            )
        return fatal(prog, f"unable to write control/{name}.tmp: {errtext(e)}")
    except cdb.CdbError as e:
        return fatal(prog, f"unable to write control/{name}.tmp: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
