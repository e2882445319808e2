"""``pyqmail explain``: what would happen to mail for an address, or from a client (read only).

    pyqmail explain [--no-dns] [--dns-timeout S] ADDRESS...
    pyqmail explain --client IP [--helo HOST]

The answers come from send/explain.py. Exit 0, or 1 when the mail (or the client) would
be refused or bounced, 100 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyqmail.cli.common import printable, split_home_args
from pyqmail.send import explain

PROG = "pyqmail explain"


def main(argv: Sequence[str] | None = None) -> int:
    home, rest = split_home_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=PROG, description="what would happen to mail, and why")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--client", metavar="IP", help="what tcp.smtp.cdb decides for this client")
    p.add_argument("--helo", metavar="HOST", help="with --client: the HELO name")
    p.add_argument("--no-dns", action="store_true", help="do not ask DNS for MX records")
    p.add_argument("--dns-timeout", type=float, default=explain.DNS_TIMEOUT, metavar="S")
    try:
        a = p.parse_args(rest)
    except SystemExit as e:
        return 0 if e.code == 0 else 100
    if not a.addresses and a.client is None:
        p.print_usage(sys.stderr)
        return 100
    refused = False
    results = []
    if a.client is not None:
        results.append(explain.explain_client(home, a.client, a.helo))
    for addr in a.addresses:
        results.append(explain.explain_address(home, addr, dns=not a.no_dns, timeout=a.dns_timeout))
    for i, ex in enumerate(results):
        if i:
            print()
        sys.stdout.write(printable(ex.text()))
        refused = refused or ex.refused
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
