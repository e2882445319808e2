"""qmail-local [-nN] user home local dash ext domain sender defaultdelivery (local.md 3).

The message is on fd 0 (copied to a temporary file first if fd 0 cannot seek); the
report goes to stdout/stderr; the exit code is 0, 100 or 111 (a usage error is 100,
as in qmail). ``PYQMAIL_PROGRAM_TIMEOUT``
(seconds) bounds each ``|program``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from pyqmail.cli.common import split_home_args
from pyqmail.local.program import exec_environment
from pyqmail.local.qlocal import UsageError, parse_args, run
from pyqmail.local.tools import seekable_stdin

USAGE = (
    "qmail-local: usage: qmail-local [ -nN ] user homedir local dash ext domain sender aliasempty"
)


def main(argv: Sequence[str] | None = None) -> int:
    home, args = split_home_args(sys.argv[1:] if argv is None else argv)
    try:
        req = parse_args(args)
    except UsageError as e:
        if str(e):
            print(f"qmail-local: {e}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 100  # qmail-local's usage() exits 100 (a permanent failure)
    timeout = os.environ.get("PYQMAIL_PROGRAM_TIMEOUT")
    if timeout:
        try:
            req = replace(req, program_timeout=float(timeout))
        except ValueError:
            print("qmail-local: bad PYQMAIL_PROGRAM_TIMEOUT", file=sys.stderr)
            return 111
    os.umask(0o077)
    sys.stdout.flush()
    return run(req, seekable_stdin(), home, environ=exec_environment())


if __name__ == "__main__":
    sys.exit(main())
