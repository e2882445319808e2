"""qmail-remote HOST SENDER RECIP...: deliver the message on fd 0 to HOST over SMTP.

The work is remote/program.py's. Prints qmail-remote's reports on stdout (``r``/``h``/
``s`` per recipient, then one of ``K``/``Z``/``D``, each NUL-terminated; remote.md
section 6) and exits 0 whenever it reports, as qmail-remote does. Leading ``--home DIR``
/ ``--single-user`` are accepted; otherwise PYQMAIL_HOME names the home.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.remote.program import USAGE, run


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    home, rest = split_home_args(args)
    out = sys.stdout.buffer
    if len(rest) < 3:
        out.write(USAGE)
    else:
        host, sender, *recipients = (os.fsencode(a) for a in rest)
        out.write(run(home, host, sender, recipients))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
