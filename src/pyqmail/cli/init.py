"""``pyqmail init DIR [--me FQDN] [--create-users] [--single-user] [--sendmail-link [PATH]]``:
make a home, HOME/bin's qmail commands included, a self-signed control/servercert.pem for
STARTTLS when there is none (owned by qmaild, mode 0600: smtp/tls.py says why), an
existing control/smtproutesauth made qmailr's and mode 0600 (remote/smarthost.py), and on
request link /usr/sbin/sendmail to HOME/bin/sendmail (homebin.py)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pyqmail.home import HomeError, resolve_home
from pyqmail.homebin import SENDMAIL_LINK, BinError, sendmail_hint, sendmail_link
from pyqmail.layout import create_home, create_users, default_fqdn
from pyqmail.remote.smarthost import AUTHFILE, secure_authfile
from pyqmail.smtp.tls import SERVERCERT, ensure_servercert


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyqmail init", description=__doc__)
    p.add_argument("dir", nargs="?", help="the home to create (default: --home, PYQMAIL_HOME)")
    p.add_argument("--home", help="same as DIR")
    p.add_argument("--me", help="this host's fully qualified name (default: the system's)")
    p.add_argument("--create-users", action="store_true", help="create missing qmail accounts")
    p.add_argument("--single-user", action="store_true", help="everything as the invoking user")
    p.add_argument(
        "--sendmail-link",
        nargs="?",
        const=str(SENDMAIL_LINK),
        metavar="PATH",
        help=f"make PATH (default {SENDMAIL_LINK}) a link to HOME/bin/sendmail",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    home = resolve_home(a.dir or a.home, a.single_user)
    me = a.me or default_fqdn()
    if not me or "." not in me:
        print(
            f"pyqmail init: fatal: {me!r} is not a fully qualified name; give --me", file=sys.stderr
        )
        return 100
    made_users: list[str] = []
    if a.create_users:
        if os.geteuid() != 0:
            print("pyqmail init: fatal: --create-users needs root", file=sys.stderr)
            return 100
        made_users = create_users()
    try:
        ids = home.ids() if (os.geteuid() == 0 and not home.single_user) else None
    except HomeError as e:
        print(f"pyqmail init: fatal: {e}", file=sys.stderr)
        return 111
    try:
        report = create_home(home, me, ids)
        owner = None if ids is None else (ids.uid("daemon"), ids.gid("nofiles"))
        if ensure_servercert(home.control, me, owner):
            report.created.append(f"{home.control / SERVERCERT} (self-signed, for {me})")
        remote = None if ids is None else (ids.uid("remote"), ids.gid("qmail"))
        secured = secure_authfile(home, remote)  # the remote agent reads it as qmailr
    except BinError as e:
        print(f"pyqmail init: fatal: {e}", file=sys.stderr)
        return 111
    except OSError as e:
        print(f"pyqmail init: fatal: {e.filename}: {e.strerror}", file=sys.stderr)
        return 111
    if not a.quiet:
        for line in made_users + report.created:
            print(f"created {line}")
        for line in report.kept:
            print(f"kept {line}: not a pyqmail wrapper")
        if secured:
            who = "the remote agent's" if remote is not None else "its owner's"
            print(f"secured {home.control / AUTHFILE}: mode 600, {who} only")
        if not made_users and not report.created and not secured:
            print(f"{home.root}: complete; nothing to do")
    if a.sendmail_link:
        try:
            done, what = sendmail_link(home, Path(a.sendmail_link))
        except OSError as e:
            print(f"pyqmail init: unable to link {a.sendmail_link}: {e.strerror}", file=sys.stderr)
            return 111
        print(what if done else f"pyqmail init: {what}", file=sys.stdout if done else sys.stderr)
        return 0 if done else 1
    hint = sendmail_hint(home)
    if hint and not a.quiet and not home.single_user:
        print(hint)
    return 0
