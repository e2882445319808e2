"""``pyqmail run [--home DIR] [--smtp A:P ...] [--smtps A:P ...] [--submission A:P ...]
[--qmqp A:P ...] [--qmtp A:P ...] [--rules CDB] [--single-user] [--log-format text|json]``.

Parses the arguments and hands them to :mod:`pyqmail.daemon.run`. Addresses are
``HOST:PORT`` or ``[IPv6]:PORT``; without ``--smtp`` the MTA delivers the queue but listens
nowhere (as qmail-send alone does). ``--smtps`` is SMTP with TLS from the first byte (465,
RFC 8314), ``--submission`` SMTP with STARTTLS (587); both need control/servercert.pem.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pyqmail.cli.common import fatal
from pyqmail.daemon import logjson
from pyqmail.daemon.run import main_args, run
from pyqmail.home import resolve_home

PROG = "pyqmail run"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="run the whole MTA in the foreground")
    p.add_argument("--home", help="the qmail home (else PYQMAIL_HOME, else /var/qmail)")
    p.add_argument("--smtp", action="append", default=[], metavar="ADDR:PORT",
                   help="an SMTP listener (repeatable; [::1]:25 for IPv6)")  # fmt: skip
    p.add_argument("--smtps", action="append", default=[], metavar="ADDR:PORT",
                   help="an SMTP listener with implicit TLS (465; repeatable)")  # fmt: skip
    p.add_argument("--submission", action="append", default=[], metavar="ADDR:PORT",
                   help="a submission listener, SMTP with STARTTLS (587; repeatable)")  # fmt: skip
    p.add_argument("--qmqp", action="append", default=[], metavar="ADDR:PORT",
                   help="a QMQP listener (repeatable)")  # fmt: skip
    p.add_argument("--qmtp", action="append", default=[], metavar="ADDR:PORT",
                   help="a QMTP listener (repeatable)")  # fmt: skip
    p.add_argument("--rules", metavar="CDB",
                   help="the SMTP tcprules cdb (default HOME/control/tcp.smtp.cdb; "
                        "qmail sites often keep it at /etc/tcp.smtp.cdb)")  # fmt: skip
    p.add_argument("--single-user", action="store_true",
                   help="everything as the invoking user (or PYQMAIL_SINGLE_USER=1)")  # fmt: skip
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: every log line as one JSON object (daemon/logjson.py)")  # fmt: skip
    a = p.parse_args(argv)
    home = resolve_home(a.home, a.single_user)
    try:
        cfg = main_args(
            home, a.smtp, a.qmqp, a.qmtp, a.rules, smtps=a.smtps, submission=a.submission
        )
    except ValueError as e:
        return fatal(PROG, str(e), 100)
    if a.log_format == "json":
        logjson.start(home)
    return run(cfg)
