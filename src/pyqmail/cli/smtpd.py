"""``qmail-smtpd`` (stdin/stdout, under tcpserver) and ``pyqmail smtpd --listen ADDR:PORT``.

Without ``--listen`` this is qmail-smtpd: the socket is fd 0/1 and the environment is
what tcpserver set (TCPREMOTEIP, TCPREMOTEHOST, TCPREMOTEINFO, TCPLOCALIP, TCPLOCALHOST,
RELAYCLIENT, DATABYTES, QMAILQUEUE). The checks of incoming mail (control/authchecks) apply
as in the listener. Arguments as qmail's AUTH patches take them,
``qmail-smtpd HOSTNAME CHECKPROG SUBPROG...``, name the checkpassword program for AUTH
(smtp/passwords.py; HOSTNAME is not used: PLAIN and LOGIN have no challenge); a lone
HOSTNAME is ignored.

With ``--listen`` it is the asyncio listener alone (smtp/listen.py), with
``--rules CDB`` (default HOME/control/tcp.smtp.cdb), ``--max-conns``, ``--max-per-ip``
(loopback clients exempt unless ``--limit-loopback``), ``--greet-delay`` (talking before
the greeting gets 554), ``--control-ttl`` (how often control/ and the cdbs are re-checked)
and ``--workers N`` (N processes sharing the port by SO_REUSEPORT, each with its share of
the connection limit). It prints ``pyqmail smtpd: listening on ADDR:PORT`` on stderr once
bound (per worker). TERM/INT drains it as ``pyqmail run``'s listener: no new connections,
a session in DATA gets its reply and then 421, the others 421 at once, all within
control/timeoutdrain seconds; then it exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.home import resolve_home
from pyqmail.listener import parse_listen

PROG = "pyqmail smtpd"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--listen" or a.startswith("--listen=") for a in args):
        home, rest = split_home_args(args)
        from pyqmail.send.rcptverdict import rcpt_checks
        from pyqmail.smtp.passwords import PasswordCheck
        from pyqmail.smtp.stdio import run_stdio

        passwords = PasswordCheck(home, program=rest[1:] if len(rest) >= 2 else None)
        return run_stdio(home, rcpt_checks=rcpt_checks(home), auth_checks=True, passwords=passwords)
    p = argparse.ArgumentParser(prog=PROG, description="the SMTP listener")
    p.add_argument("--listen", action="append", required=True, metavar="ADDR:PORT")
    p.add_argument("--rules", type=Path, default=None, metavar="CDB")
    p.add_argument("--home", default=None)
    p.add_argument("--single-user", action="store_true")
    p.add_argument("--max-conns", type=int, default=100)
    p.add_argument("--max-per-ip", type=int, default=20)
    p.add_argument(
        "--limit-loopback",
        action="store_true",
        help="apply --max-per-ip to loopback clients too (exempt by default)",
    )
    p.add_argument("--greet-delay", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--control-ttl",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="re-check control/ and the rules cdb at most this often (0: every connection)",
    )
    ns = p.parse_args(args)
    home = resolve_home(ns.home, ns.single_user)
    try:
        addrs = [parse_listen(a) for a in ns.listen]
    except ValueError as e:
        return fatal(PROG, str(e), 100)
    if ns.workers < 1 or ns.max_conns < 1 or ns.max_per_ip < 1:
        return fatal(PROG, "--workers, --max-conns and --max-per-ip must be positive", 100)
    from pyqmail.send.rcptverdict import rcpt_checks
    from pyqmail.smtp.listen import ListenOptions, serve

    opts = ListenOptions(
        rules=ns.rules,
        max_conns=ns.max_conns,
        max_per_ip=ns.max_per_ip,
        limit_loopback=ns.limit_loopback,
        greet_delay=ns.greet_delay,
        workers=ns.workers,
        control_ttl=ns.control_ttl,
        rcpt_checks=rcpt_checks(home),
    )
    return serve(home, addrs, opts)
