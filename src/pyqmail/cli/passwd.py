"""``pyqmail passwd USER`` (and ``--delete USER``): SMTP AUTH's password file.

Sets USER's password in ``control/authusers`` as an argon2id hash (smtp/passwords.py;
``user:$argon2id$...`` lines, replaced atomically, mode 0600, owned by qmailp in root mode:
the account of the password process). The password is read from stdin when stdin is not
a terminal (its first line, without the line end), else asked for twice without echo.
It is never printed or logged. Exit 0; 100 on a usage error (a bad user name or
password, no such user to delete, the two entries differ); 111 if the file could not be
read or written.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence

from pyqmail.home import HomeError, resolve_home
from pyqmail.smtp.passwords import PasswordError, set_password

PROG = "pyqmail passwd"


def _read_password() -> bytes | None:
    if os.isatty(sys.stdin.fileno()):
        first = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != first:
            print(f"{PROG}: the two passwords differ", file=sys.stderr)
            return None
        return first.encode("utf-8", "surrogateescape")
    line = sys.stdin.buffer.readline(4096)
    return line.rstrip(b"\n").rstrip(b"\r")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("user")
    p.add_argument("--delete", "-d", action="store_true", help="remove the user")
    p.add_argument("--home", help="the qmail home (else PYQMAIL_HOME, else /var/qmail)")
    p.add_argument("--single-user", action="store_true", help="single-user mode")
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    home = resolve_home(ns.home, ns.single_user)
    user = ns.user.encode("utf-8", "surrogateescape")
    password = None
    if not ns.delete:
        password = _read_password()
        if password is None:
            return 100
        if not password:
            print(f"{PROG}: an empty password is not allowed", file=sys.stderr)
            return 100
    try:
        if not set_password(home, user, password):
            print(f"{PROG}: no user {ns.user} in control/authusers", file=sys.stderr)
            return 100
    except PasswordError as e:
        code = 100 if "user name" in str(e) or "password is" in str(e) else 111
        print(f"{PROG}: {e}", file=sys.stderr)
        return code
    except (OSError, HomeError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 111
    return 0
