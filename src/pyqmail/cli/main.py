"""``pyqmail SUBCOMMAND``: the one command that fronts all the others.

``pyqmail init|check|run|smtpd|qmqpd|qmtpd|showctl|...``: each subcommand is a module in
``pyqmail.cli`` with a ``main(argv) -> int``. The qmail command names (``qmail-qread``)
are also accepted as subcommands (``pyqmail qmail-qread``); ``pyqmail qmail-queue`` is
qmail-queue and ``pyqmail queue`` the queue manager.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "init": ("init", "create a home (control/, alias/, users/, queue/) as qmail's install does"),
    "check": ("check", "lint a home's configuration; exit 1 on errors"),
    "run": ("run", "run the whole MTA in the foreground"),
    "service": ("service", "write a systemd unit or daemontools run scripts for pyqmail run"),
    "adopt": ("adopt", "take over a live qmail installation (and --rollback)"),
    "smtpd": ("smtpd", "the SMTP server: on stdin/stdout, or --listen ADDR:PORT"),
    "qmqpd": ("qmqpd", "the QMQP server: on stdin/stdout, or --listen ADDR:PORT"),
    "qmtpd": ("qmtpd", "the QMTP server: on stdin/stdout, or --listen ADDR:PORT"),
    "dkim": ("dkim", "dkim keygen DOMAIN: make a DKIM signing key, print its DNS record"),
    "passwd": ("passwd", "passwd USER: set an SMTP AUTH password in control/authusers"),
    "showctl": ("showctl", "print every control file's effective value"),
    "queue": ("queuectl", "the queue manager: list, show, hold, release, delete, retry"),
    "explain": ("explain", "what would happen to mail for an address, or from a client"),
    "qread": ("qread", "list the queue's messages"),
    "qstat": ("qstat", "count the queue's messages"),
    "newu": ("newu", "compile users/assign into users/cdb"),
    "newmrh": ("newmrh", "compile control/morercpthosts into morercpthosts.cdb"),
    "newvalidrcptto": ("newvalidrcptto", "compile control/validrcptto into validrcptto.cdb"),
    "inject": ("inject", "qmail-inject: fix a message's header and queue it"),
    "sendmail": ("sendmail", "the sendmail interface programs use"),
    "qmqpc": ("qmqpc", "qmail-qmqpc: hand a message to a QMQP server (mini-qmail)"),
    "remote": ("remote", "qmail-remote: deliver one message by SMTP"),
    "local": ("local", "qmail-local: deliver one message to a local user"),
    "getpw": ("getpw", "qmail-getpw: which account owns a local part"),
    "pw2u": ("pw2u", "qmail-pw2u: users/assign lines from a passwd file"),
    "tcpto": ("tcpto", "qmail-tcpto: hosts remembered as timing out"),
    "tcpok": ("tcpok", "qmail-tcpok: forget them"),
    "tcprules": ("tcprules", "compile tcprules text into a cdb"),
    "tcprulescheck": ("tcprulescheck", "show which rule a client matches"),
}


def _usage() -> str:
    lines = ["usage: pyqmail SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:14s} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Every subcommand takes --home DIR (else PYQMAIL_HOME, else /var/qmail)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 100
    if args[0] == "--version":
        from pyqmail import __version__

        print(f"pyqmail {__version__}")
        return 0
    name = args[0]
    if name == "qmail-queue":  # qmail's program keeps its name; `queue` is the manager
        module = "queue"
    elif name in SUBCOMMANDS:
        module = SUBCOMMANDS[name][0]
    elif name.startswith("qmail-") and name[6:] in SUBCOMMANDS:
        module = SUBCOMMANDS[name[6:]][0]
    else:
        print(f"pyqmail: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 100
    mod = importlib.import_module(f"pyqmail.cli.{module}")
    result: int = mod.main(args[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())
