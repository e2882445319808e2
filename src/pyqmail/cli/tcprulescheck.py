"""``tcprulescheck rules.cdb``: show what tcpserver would do for the client described by
TCPREMOTEIP (default ``0.0.0.0``), TCPREMOTEHOST and TCPREMOTEINFO, as ucspi-tcp's does.

A variable set to the empty string counts as set (ucspi-tcp probes ``@IP`` and ``=``).
Output and exit codes match Debian's ucspi-tcp: 0 with the report on stdout, 100 for
usage, 111 with ``tcprulescheck: fatal: unable to read FILE: reason`` on errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail import cdb
from pyqmail.cli.tcprules import errtext
from pyqmail.tcprules import explain, find

PROG = "tcprulescheck"


def _fatal(path: str, reason: str) -> int:
    print(f"{PROG}: fatal: unable to read {path}: {reason}", file=sys.stderr)
    return 111


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"{PROG}: usage: tcprulescheck rules.cdb", file=sys.stderr)
        return 100
    path = args[0]
    env = os.environb
    ip = env.get(b"TCPREMOTEIP", b"0.0.0.0")
    host = env.get(b"TCPREMOTEHOST")
    info = env.get(b"TCPREMOTEINFO")
    try:
        with cdb.Reader.open(path) as reader:
            report = explain(find(reader, ip, host, info))
    except OSError as e:
        return _fatal(path, errtext(e))
    except cdb.CdbError as e:
        # ucspi-tcp: an empty file fails to map (EINVAL), a short one reads short (EPROTO)
        return _fatal(path, "invalid argument" if "empty" in str(e) else "protocol error")
    sys.stdout.buffer.write(report)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
