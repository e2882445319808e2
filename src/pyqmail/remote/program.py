"""The qmail-remote program's job: the message on fd 0 to one host, reports as bytes.

qmail-remote's reports (``r``/``h``/``s`` per recipient, then one of ``K``/``Z``/``D``,
each NUL-terminated; remote.md section 6) are the whole answer: the command exits 0
whenever it reports. cli/remote.py parses the arguments and writes what this returns.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.remote.deliver import RemoteAgent

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


def run(home: Home, host: bytes, sender: bytes, recipients: Sequence[bytes]) -> bytes:
    """Deliver fd 0 from ``sender`` to ``recipients`` at ``host``; qmail-remote's reports."""
    if not home.control.is_dir():
        return CHDIR
    agent = RemoteAgent(home, ControlCache(home), idle_timeout=0)
    with _message() as stdin:
        result = asyncio.run(
            agent.transmit(stdin, host.decode("utf-8", "surrogateescape"), sender, list(recipients))
        )
    return result.reports()
