"""``python -m pyqmail.demo HOME``: a demo user for ``make run``, and how to mail it.

``make run`` makes HOME with ``pyqmail init`` and then calls this before starting
``pyqmail run --single-user`` on 127.0.0.1:2525. If HOME has no users/assign yet, it adds
one user, ``demo``, owned by the invoking user, whose home is HOME/demo with a Maildir
(so ``demo@ME`` and ``demo-anything@ME`` land in HOME/demo/Maildir/new), and compiles
users/cdb. An existing users/assign is left alone. Then it prints how to send a first
message with swaks or Python's smtplib and where it will land.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pyqmail.control import load
from pyqmail.home import Home

DEMO_USER = "demo"
PORT = 2525


def setup(home: Home) -> Path:
    """Create the demo user if users/assign does not exist; return its Maildir."""
    user_home = home.root / DEMO_USER
    maildir = user_home / "Maildir"
    assign = home.users / "assign"
    if not assign.exists():
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        uid, gid = os.getuid(), os.getgid()
        assign.write_text(
            f"={DEMO_USER}:{DEMO_USER}:{uid}:{gid}:{user_home}:::\n"
            f"+{DEMO_USER}-:{DEMO_USER}:{uid}:{gid}:{user_home}:-::\n.\n"
        )
        from pyqmail.cli import newu

        code = newu.main(["--home", str(home.root)])
        if code != 0:
            raise SystemExit(f"pyqmail.demo: qmail-newu failed ({code})")
    return maildir


def instructions(home: Home, maildir: Path) -> str:
    me = load(home).me or "localhost"
    to = f"{DEMO_USER}@{me}"
    return f"""\
pyqmail demo home: {home.root}
  SMTP:      127.0.0.1:{PORT}
  demo user: {to}  (and {DEMO_USER}-anything@{me})
  lands in:  {maildir}/new/
  the log (qmail-send's lines) is what `make run` prints below.

Send a first message, from another terminal:
  swaks --server 127.0.0.1:{PORT} --from you@example.com --to {to}
or with Python:
  python3 -c "import smtplib; smtplib.SMTP('127.0.0.1', {PORT}).sendmail('you@example.com', \\
['{to}'], 'Subject: hello\\r\\n\\r\\nfirst mail\\r\\n')"
Then:  ls {maildir}/new/
Mail to an unknown user (nobody@{me}) bounces to the sender; the postmaster's mail
lands in {home.alias}/Maildir/new/. Stop with Ctrl-C.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pyqmail.demo HOME", file=sys.stderr)
        return 100
    home = Home(Path(os.path.abspath(args[0])), single_user=True)
    if not (home.root / "control").is_dir():
        print(f"pyqmail.demo: {home.root} is not a home (run pyqmail init first)", file=sys.stderr)
        return 111
    maildir = setup(home)
    print(instructions(home, maildir), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
