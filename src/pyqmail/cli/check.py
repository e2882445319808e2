"""``pyqmail check [--home DIR] [-q]``: lint a home; exit 1 if any error was found.

Prints one line per problem (``error: control/locals:2: ... ; fix: ...``), a ``note:``
line for each default worth knowing (QMQP loopback-only without tcp.qmqp.cdb), and a
summary.
``-q`` prints errors only. Exit 0: no errors (warnings allowed); 1: errors; 111: the
home could not be examined.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyqmail.check import Severity, check, errors, notes
from pyqmail.home import resolve_home


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyqmail check", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="the qmail home (else PYQMAIL_HOME, else /var/qmail)")
    parser.add_argument("--single-user", action="store_true", help="single-user mode")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    home = resolve_home(args.home, args.single_user)
    dns_notes: list[str] = []
    problems = check(home, dns_notes=dns_notes)
    bad = errors(problems)
    for p in problems:
        if p.severity is Severity.ERROR or not args.quiet:
            print(p)
    if not args.quiet:
        for note in [*notes(home), *dns_notes]:
            print(f"note: {note}")
        warnings = len(problems) - len(bad)
        print(f"{home.root}: {len(bad)} error(s), {warnings} warning(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
