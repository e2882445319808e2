"""qmail-remote HOST SENDER RECIP...: deliver the message on fd 0 to HOST over SMTP.

Prints qmail-remote's reports on stdout (``r``/``h``/``s`` per recipient, then one of
``K``/``Z``/``D``, each NUL-terminated; remote.md section 6) and exits 0 whenever it
reports, as qmail-remote does. Leading ``--home DIR`` / ``--single-user`` are accepted;
otherwise PYQMAIL_HOME names the home.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from pyqmail.cli.common import split_home_args
from pyqmail.control import ControlCache
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.smtp.client import SessionResult

USAGE = b"DI (qmail-remote) was invoked improperly. (#5.3.5)\n\0"
CHDIR = b"ZUnable to switch to home directory. (#4.3.0)\n\0"


def _message() -> BinaryIO:
    """fd 0 if it is seekable (qmail gives the queue file), else a spooled copy of it."""
    try:
        os.lseek(0, 0, os.SEEK_CUR)
        return os.fdopen(os.dup(0), "rb", buffering=0)
    except OSError:
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (returned, closed by the caller)
        with os.fdopen(os.dup(0), "rb") as f:
            shutil.copyfileobj(f, spool)
        spool.seek(0)
        return spool


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    home, rest = split_home_args(args)
    out = sys.stdout.buffer
    if len(rest) < 3:
        out.write(USAGE)
        out.flush()
        return 0
    if not home.control.is_dir():
        out.write(CHDIR)
        out.flush()
        return 0
    host, sender, *recipients = (os.fsencode(a) for a in rest)
    agent = RemoteAgent(home, ControlCache(home), idle_timeout=0)
    with _message() as stdin:
        result: SessionResult = asyncio.run(
            agent.transmit(stdin, host.decode("utf-8", "surrogateescape"), sender, recipients)
        )
    out.write(result.reports())
    out.flush()
    return 0
