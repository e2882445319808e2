"""qmail-qmtpd on stdin/stdout (under tcpserver), or ``--listen ADDR:PORT`` for the
asyncio listener alone (what ``pyqmail run --qmtp`` embeds), with ``--rules CDB``
(default HOME/control/tcp.qmtp.cdb; a missing file allows everyone).

Like qmail-smtpd it honours rcpthosts/morercpthosts.cdb, RELAYCLIENT and
databytes/DATABYTES from the environment tcpserver (or the rules) set.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pyqmail.cli.common import serve_listener, split_home_args
from pyqmail.control import ControlCache, ControlError, load
from pyqmail.home import resolve_home
from pyqmail.queue.submit import submitter
from pyqmail.smtp.qmtpd import QmtpPolicy, QmtpServer, open_more, serve_stdio

PROG = "qmail-qmtpd"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--listen" or a.startswith("--listen=") for a in args):
        if "--help" in args or "-h" in args:
            print(__doc__)
            return 0
        home, _rest = split_home_args(args)
        try:
            policy = QmtpPolicy(load(home), os.environ, open_more(home))
        except (ControlError, OSError):
            return 111
        signal.alarm(3600)  # qmail's one-hour limit per connection (SIGALRM ends us)
        stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
        stdout = os.fdopen(1, "wb", buffering=0, closefd=False)
        return serve_stdio(stdin, stdout, submitter(home), policy, os.environ)
    p = argparse.ArgumentParser(prog="pyqmail qmtpd", description="the QMTP listener")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT")
    p.add_argument("--rules", type=Path, default=None, metavar="CDB")
    p.add_argument("--home", default=None)
    p.add_argument("--single-user", action="store_true")
    ns = p.parse_args(args)
    home = resolve_home(ns.home, ns.single_user)
    server = QmtpServer(home, ControlCache(home), submitter(home), rules=ns.rules)
    return serve_listener(PROG, ns.listen, server.start)


if __name__ == "__main__":
    sys.exit(main())
