"""The .qmail helper programs' shared parts (tools.md): run a child, requeue stdin.

``forward``, ``condredirect``, ``bouncesaying``, ``except`` and ``preline`` are small
filters used from ``|`` lines in .qmail files. Their command modules parse arguments;
the behaviour lives here. Fatal conditions are :class:`ToolExit` (qmail's exit code and
``prog: fatal: ...`` text). ``forward`` and ``condredirect`` send a foreign sender's mail
to a foreign address with ``$SRSSENDER`` when qmail-local set it (docs/srs.md).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from pyqmail import srs
from pyqmail.control import ControlError, load
from pyqmail.durable import write_all
from pyqmail.home import Home
from pyqmail.local.failure import DeliveryFailure, strerror
from pyqmail.local.forward import forward
from pyqmail.local.users import is_temp_errno


class ToolExit(Exception):
    """Exit with ``code`` after printing ``message`` (if any) on stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def run_child(argv: Sequence[str], *, stdin: int | None = None) -> int | None:
    """Run ``argv`` (PATH search) with our stdin; its exit code, None if it crashed.

    An exec failure is exit 111 when temporary, else 100, as qmail's tools' children do.
    """
    try:
        proc = subprocess.Popen(list(argv), stdin=stdin, close_fds=False)
    except OSError as e:
        code = e.errno or 0
        return 111 if is_temp_errno(code) or code == errno.ENOMEM else 100
    rc = proc.wait()
    return None if rc < 0 else rc


def child_verdict(prog: str, argv: Sequence[str]) -> int:
    """Run the child and return its exit code; crash and 111 become ToolExit(111)."""
    code = run_child(argv)
    if code is None:
        raise ToolExit(111, f"{prog}: fatal: child crashed")
    if code == 111:
        raise ToolExit(111, f"{prog}: fatal: temporary child error")
    return code


def requeue(prog: str, home: Home, sender_var: str, recipients: Sequence[str]) -> int:
    """Queue $DTLINE + stdin from the env var's sender to ``recipients``; the qp."""
    sender = os.environ.get(sender_var)
    if sender is None:
        raise ToolExit(100, f"{prog}: fatal: {sender_var} not set")
    dtline = os.environb.get(b"DTLINE")
    if dtline is None:
        raise ToolExit(100, f"{prog}: fatal: DTLINE not set")
    sender = _srs_sender(home, sender, recipients)
    fd = seekable_stdin()
    try:
        return forward(home, fd, dtline, sender, recipients)
    except DeliveryFailure as f:
        text = f.text.removeprefix("Unable to forward message: ").removesuffix(".")
        raise ToolExit(f.code, f"{prog}: fatal: {text}") from f


def _srs_sender(home: Home, sender: str, recipients: Sequence[str]) -> str:
    """``$SRSSENDER`` (qmail-local's SRS form of ``$SENDER``, docs/srs.md) instead of
    ``sender`` when that is the original sender and a recipient is foreign; else
    ``sender``. Control files that cannot be read leave the sender as it is."""
    srs_sender = os.environ.get("SRSSENDER")
    if not srs_sender or sender != os.environ.get("SENDER"):
        return sender
    try:
        ctl = load(home)
    except ControlError:
        return sender
    if srs.needs_rewrite(sender, recipients, ctl.locals, ctl.virtualdomains):
        return srs_sender
    return sender


def seekable_stdin() -> int:
    """fd 0 if it can seek (rewound to 0), else a copy of it in an unlinked temp file."""
    try:
        os.lseek(0, 0, os.SEEK_SET)
        return 0
    except OSError:
        pass
    with tempfile.TemporaryFile() as tmp:
        while chunk := os.read(0, 65536):
            tmp.write(chunk)
        tmp.flush()
        return os.dup(tmp.fileno())


def preline(head: bytes, argv: Sequence[str]) -> int:
    """Feed ``argv`` ``head`` + stdin and return its exit code (preline's job).

    Raises ToolExit: the program cannot run (111 if temporary, else 100), it stopped
    reading before the end (111, ``unable to copy input``), or it crashed (111).
    """
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE)
    except OSError as e:
        code = 111 if is_temp_errno(e.errno) else 100
        raise ToolExit(code, f"preline: fatal: unable to run {argv[0]}: {strerror(e)}") from e
    assert proc.stdin is not None
    pipe = proc.stdin.fileno()
    try:
        write_all(pipe, head)
        while chunk := os.read(0, 65536):
            write_all(pipe, chunk)
    except OSError as e:
        proc.stdin.close()
        proc.wait()
        raise ToolExit(111, f"preline: fatal: unable to copy input: {strerror(e)}") from e
    proc.stdin.close()
    rc = proc.wait()
    if rc < 0:
        raise ToolExit(111, "preline: fatal: child crashed")
    return rc


def finish(e: ToolExit) -> int:
    """Print the ToolExit's message (if any) on stderr; its exit code."""
    if e.message:
        print(e.message, file=sys.stderr)
    return e.code
