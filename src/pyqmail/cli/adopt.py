"""``pyqmail adopt HOME [--dry-run] [--service DIR]...`` and ``pyqmail adopt --rollback HOME``.

Prints, line by line, what pyqmail makes of a qmail installation (pyqmail.adopt.plan) and,
unless ``--dry-run``, makes the changes, keeping a copy of every file it replaces. Exit 0
when done, 1 when something blocks adopting (named in the report), 100 on usage errors.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pyqmail.adopt.plan import STATE, apply, make_plan, rollback
from pyqmail.home import single_user_requested

PROG = "pyqmail adopt"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="inspect a live qmail installation and make pyqmail run it",
        epilog=f"Backups of the files it replaces: HOME/{STATE}/backup/; the list of changes: "
        f"HOME/{STATE}/manifest.json.",
    )
    p.add_argument("home", metavar="HOME", help="qmail's home, e.g. /var/qmail")
    p.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    p.add_argument(
        "--service",
        action="append",
        type=Path,
        metavar="DIR",
        help="a service directory (or a directory of them) with qmail's run scripts "
        "(default: /service, /etc/service, /var/service, HOME/supervise)",
    )
    p.add_argument(
        "--single-user",
        action="store_true",
        help="a single-user pyqmail home (or PYQMAIL_SINGLE_USER=1)",
    )
    p.add_argument(
        "--rollback", action="store_true", help="put back what an earlier adopt of HOME changed"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    home = Path(a.home).absolute()
    single_user = single_user_requested(a.single_user)
    if not (home / "control").is_dir():
        print(f"{PROG}: {home} has no control/ directory: not a qmail home")
        return 100
    if a.rollback:
        lines, ok = rollback(home, single_user=single_user)
        print("\n".join(lines))
        return 0 if ok else 1
    plan = make_plan(home, a.service, single_user=single_user)
    mode = "dry run: nothing is changed" if a.dry_run else "changes follow the plan"
    print(f"pyqmail adopt {home} ({mode})")
    print("\n".join(plan.lines()))
    if plan.blocked:
        print(f"{PROG}: not adopting: see the blocker lines above")
        return 1
    if not a.dry_run:
        print("\n".join(apply(plan)))
    return 0
