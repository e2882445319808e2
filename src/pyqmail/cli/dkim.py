"""``pyqmail dkim keygen DOMAIN [--selector S] [--ed25519] [--bits N]``: make a DKIM key.

Writes ``control/dkim/DOMAIN/S.key`` (mode 0600; owned by the queue user in root mode,
the account that signs, else by the caller), names S in ``control/dkim/DOMAIN/selector``
when no selector is named yet (else the new key signs only once its selector is added
there, after its record is published: a key rotation), and prints the TXT record to
publish: its name (``S._domainkey.DOMAIN``) on the first line, its value on the second.
Exit 0; 100 on a usage error or an existing key; 111 if the key could not be written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyqmail.dkim import KeygenError, keygen, signing_account
from pyqmail.home import HomeError, resolve_home


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyqmail dkim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    kg = sub.add_parser("keygen", help="make a signing key and print its DNS record")
    kg.add_argument("domain")
    kg.add_argument("--selector", help="default: rsa2048 (or ed25519 with --ed25519)")
    kg.add_argument("--ed25519", action="store_true", help="an Ed25519 key (RFC 8463)")
    kg.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    kg.add_argument("--home", help="the qmail home (else PYQMAIL_HOME, else /var/qmail)")
    kg.add_argument("--single-user", action="store_true", help="single-user mode")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    home = resolve_home(args.home, args.single_user)
    selector = args.selector or ("ed25519" if args.ed25519 else f"rsa{args.bits}")
    try:
        owner = signing_account(home)
        record, _named = keygen(
            home, args.domain, selector, ed=args.ed25519, bits=args.bits, owner=owner
        )
    except (KeygenError, ValueError) as e:
        print(f"pyqmail dkim: {e}", file=sys.stderr)
        return 100
    except (OSError, HomeError) as e:
        print(f"pyqmail dkim: unable to write the key: {e}", file=sys.stderr)
        return 111
    # Nothing else is printed: scripts take the value as everything after the name.
    # Without `named`, an existing selector file was kept: the new key signs once its
    # selector is added there (a key rotation publishes the record first).
    print(record.name)
    print(record.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
