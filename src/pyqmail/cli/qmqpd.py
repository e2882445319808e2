"""qmail-qmqpd on stdin/stdout (under tcpserver), or ``--listen ADDR:PORT`` for the
asyncio listener alone (what ``pyqmail run --qmqp`` embeds), with ``--rules CDB``
(default HOME/control/tcp.qmqp.cdb; a missing file admits loopback clients only).

QMQP relays for anyone who can connect: allow only trusted clients in the rules. Under
tcpserver, tcpserver's own rules decide who connects.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pyqmail.cli.common import serve_listener, split_home_args
from pyqmail.control import ControlCache
from pyqmail.home import resolve_home
from pyqmail.queue.submit import submitter
from pyqmail.smtp.qmqpd import QmqpServer, loopback_only_note, serve_stdio

PROG = "qmail-qmqpd"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--listen" or a.startswith("--listen=") for a in args):
        if "--help" in args or "-h" in args:
            print(__doc__)
            return 0
        home, _rest = split_home_args(args)
        signal.alarm(3600)  # qmail's one-hour limit per connection (SIGALRM ends us)
        stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
        stdout = os.fdopen(1, "wb", buffering=0, closefd=False)
        return serve_stdio(stdin, stdout, submitter(home), os.environ)
    p = argparse.ArgumentParser(prog="pyqmail qmqpd", description="the QMQP listener")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT")
    p.add_argument("--rules", type=Path, default=None, metavar="CDB")
    p.add_argument("--home", default=None)
    p.add_argument("--single-user", action="store_true")
    ns = p.parse_args(args)
    home = resolve_home(ns.home, ns.single_user)
    server = QmqpServer(home, ControlCache(home), submitter(home), rules=ns.rules)
    if (note := loopback_only_note(home, server.rules)) is not None:
        print(f"{PROG}: warning: {note}", file=sys.stderr, flush=True)
    return serve_listener(PROG, ns.listen, server.start)


if __name__ == "__main__":
    sys.exit(main())
