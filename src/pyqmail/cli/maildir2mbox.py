"""maildir2mbox: $MAILDIR's messages to the end of $MAIL via $MAILTMP (tools.md)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyqmail.cli.common import fatal
from pyqmail.local.maildir2mbox import Maildir2MboxError, move


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)
    env = os.environ
    if "MAIL" not in env:
        return fatal("maildir2mbox", "MAIL not set")
    if "MAILTMP" not in env:
        return fatal("maildir2mbox", "MAILTMP not set")
    if "MAILDIR" not in env:
        return fatal("maildir2mbox", "MAILDIR not set")
    try:
        moved = move(env["MAILDIR"], env["MAIL"], env["MAILTMP"])
    except Maildir2MboxError as e:
        return fatal("maildir2mbox", str(e))
    for w in moved.warnings:
        print(f"maildir2mbox: warning: {w}", file=sys.stderr)
    return 0
