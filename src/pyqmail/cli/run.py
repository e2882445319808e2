"""``pyqmail run [--home DIR] [--smtp A:P ...] [--smtps A:P ...] [--submission A:P ...]
[--qmqp A:P ...] [--qmtp A:P ...] [--rules CDB] [--http ADDR:PORT] [--log-format qmail|json]
[--log-stamps none|tai64n] [--no-session-log] [--single-user]``.

Parses the arguments and hands them to :mod:`pyqmail.daemon.run`. Addresses are
``HOST:PORT`` or ``[IPv6]:PORT``; without ``--smtp`` the MTA delivers the queue but listens
nowhere (as qmail-send alone does). ``--smtps`` is SMTP with TLS from the first byte (465,
RFC 8314), ``--submission`` SMTP with STARTTLS (587); both need control/servercert.pem.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pyqmail.cli.common import fatal
from pyqmail.daemon.run import main_args, run
from pyqmail.home import resolve_home

PROG = "pyqmail run"


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The listener and log options of ``pyqmail run`` (``pyqmail service install`` takes
    them too, for the command line it writes)."""
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
    p.add_argument("--http", metavar="ADDR:PORT",
                   help="serve /metrics (Prometheus) and a status page at / (PORT alone: "
                        "127.0.0.1; another address needs control/httpauth)")  # fmt: skip
    p.add_argument("--log-format", choices=("qmail", "json"), default="qmail",
                   help="qmail's log lines (default), or one JSON object a line")  # fmt: skip
    p.add_argument("--log-stamps", choices=("none", "tai64n"), default="none",
                   help="tai64n: a tai64n stamp before each line (multilog t)")  # fmt: skip
    p.add_argument("--no-session-log", action="store_true",
                   help="no SMTP session lines (counted for the metrics all the same)")  # fmt: skip
    p.add_argument("--single-user", action="store_true",
                   help="everything as the invoking user (or PYQMAIL_SINGLE_USER=1)")  # fmt: skip


def run_argv(a: argparse.Namespace) -> list[str]:
    """The options ``add_run_options`` parsed into ``a``, as a command line again."""
    out: list[str] = []
    for name in ("smtp", "smtps", "submission", "qmqp", "qmtp"):
        for addr in getattr(a, name):
            out += [f"--{name}", addr]
    for name in ("rules", "http"):
        if getattr(a, name):
            out += [f"--{name}", getattr(a, name)]
    if a.log_format != "qmail":
        out += ["--log-format", a.log_format]
    if a.log_stamps != "none":
        out += ["--log-stamps", a.log_stamps]
    if a.no_session_log:
        out.append("--no-session-log")
    if a.single_user:
        out.append("--single-user")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="run the whole MTA in the foreground")
    p.add_argument("--home", help="the qmail home (else PYQMAIL_HOME, else /var/qmail)")
    add_run_options(p)
    a = p.parse_args(argv)
    home = resolve_home(a.home, a.single_user)
    try:
        cfg = main_args(home, a.smtp, a.qmqp, a.qmtp, a.rules, smtps=a.smtps,
                        submission=a.submission, http=a.http, log_format=a.log_format,
                        log_stamps=a.log_stamps, session_log=not a.no_session_log)  # fmt: skip
    except ValueError as e:
        return fatal(PROG, str(e), 100)
    return run(cfg)
