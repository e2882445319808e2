"""sendmail: qmail's sendmail wrapper (see pyqmail.inject.sendmail for the options).

Runs qmail-inject (in this process, as qmail's wrapper execs it), the SMTP server on
stdin/stdout for ``-bs``, or the queue listing for ``-bp``. The home comes from
``--home DIR`` before the options, else PYQMAIL_HOME, else /var/qmail.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.inject.sendmail import USAGE, UsageError, plan

PROG = "sendmail"


def main(argv: Sequence[str] | None = None) -> int:
    prog = os.path.basename(sys.argv[0]) if argv is None else PROG
    home, rest = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        p = plan(rest, os.environ, prog)
    except UsageError as e:
        if str(e).startswith("newaliases"):
            return fatal("newaliases", str(e).split(": ", 1)[1], 100)
        if str(e):
            print(f"{PROG}: {e}", file=sys.stderr)
        print(f"{PROG}: {USAGE}", file=sys.stderr)
        return 100
    # what the programs we run read: the home, and the plan's environment changes
    os.environ["PYQMAIL_HOME"] = str(home.root)
    if home.single_user:
        os.environ["PYQMAIL_SINGLE_USER"] = "1"
    for name in p.unsetenv:
        os.environ.pop(name, None)
    os.environ.update(p.setenv)
    try:
        os.chdir(home.root)
    except OSError as e:
        return fatal(PROG, f"unable to switch to {home.root}: {e.strerror}", 111)
    if p.action == "qread":
        from pyqmail.cli import qread

        return qread.main([])
    if p.action == "smtp":
        # on a mini-qmail host the SMTP server's submitter() hands the message to QMQP.
        # qmail's qmail-smtpd runs as the caller here, so qmail-queue writes "invoked by
        # uid N", not "from network"
        from pyqmail.smtp.stdio import run_stdio

        return run_stdio(home, origin="uid")
    from pyqmail.cli import inject

    return inject.run(p.args)


if __name__ == "__main__":
    sys.exit(main())
