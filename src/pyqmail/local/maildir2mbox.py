"""maildir2mbox (tools.md): move a maildir's messages to the end of an mbox, safely.

Locks $MAIL, copies it to $MAILTMP, appends each message of new/ and cur/ in mtime order
(skipping any modified this very second, as qmail does) with a From_ line made from its
Return-Path and ``>From`` quoting, fsyncs, renames $MAILTMP over $MAIL, and only then
unlinks the maildir files: a crash at any point loses nothing (at worst a message is in
both places). tmp/ files untouched for 36 hours are removed first, as qmail does.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass

from pyqmail.durable import write_all
from pyqmail.local.failure import strerror
from pyqmail.local.mbox import needs_quote
from pyqmail.qdate import mbox_date


class Maildir2MboxError(Exception):
    """Fatal (exit 111); the message follows ``maildir2mbox: fatal: ``."""


@dataclass(frozen=True)
class Moved:
    count: int
    warnings: tuple[str, ...]


def _scan(maildir: str, now: float) -> list[tuple[float, str]]:
    found: list[tuple[float, str]] = []
    for sub in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(maildir, sub))
        except OSError as e:
            raise Maildir2MboxError(f"unable to scan $MAILDIR/{sub}: {strerror(e)}") from e
        for name in names:
            if name.startswith("."):
                continue
            rel = f"{sub}/{name}"
            try:
                st = os.stat(os.path.join(maildir, rel))
            except OSError:
                continue
            if st.st_mtime < int(now):
                found.append((st.st_mtime, rel))
    found.sort()
    return found


def _clean_tmp(maildir: str, now: float) -> None:
    tmp = os.path.join(maildir, "tmp")
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        path = os.path.join(tmp, name)
        try:
            if now > os.stat(path).st_atime + 129600:
                os.unlink(path)
        except OSError:
            pass


def _ufline(first: bytes, mtime: float) -> bytes:
    date = mbox_date(mtime).encode() + b"\n"
    if first.startswith(b"Return-Path: <") and first.endswith(b"\n"):
        if first[14:15] == b">":
            return b"From MAILER-DAEMON " + date
        addr = first[14:-2].replace(b" ", b"-").replace(b"\t", b"-")
        return b"From " + addr + b" " + date
    return b"From XXX " + date


def move(maildir: str, mail: str, mailtmp: str, *, now: float | None = None) -> Moved:
    """Do the whole job; raises Maildir2MboxError with qmail's texts."""
    t = time.time() if now is None else now
    _clean_tmp(maildir, t)
    messages = _scan(maildir, t)
    if not messages:
        return Moved(0, ())
    try:
        lockfd = os.open(mail, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(lockfd, fcntl.LOCK_EX)
    except OSError as e:
        raise Maildir2MboxError(f"unable to lock {mail}: {strerror(e)}") from e
    try:
        _copy_all(maildir, mail, mailtmp, messages)
    finally:
        os.close(lockfd)
    warnings = []
    for _mtime, rel in messages:
        try:
            os.unlink(os.path.join(maildir, rel))
        except OSError as e:
            warnings.append(
                f"$MAILDIR/{rel} will be delivered twice; unable to unlink: {strerror(e)}"
            )
    return Moved(len(messages), tuple(warnings))


def _copy_all(maildir: str, mail: str, mailtmp: str, messages: list[tuple[float, str]]) -> None:
    try:
        old = open(mail, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise Maildir2MboxError(f"unable to read {mail}: {strerror(e)}") from e
    try:
        try:
            out = os.open(mailtmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise Maildir2MboxError(f"unable to create {mailtmp}: {strerror(e)}") from e
        try:
            try:
                while chunk := old.read(65536):
                    write_all(out, chunk)
            except OSError as e:
                raise Maildir2MboxError(f"unable to write to {mailtmp}: {strerror(e)}") from e
            for mtime, rel in messages:
                _append(out, os.path.join(maildir, rel), rel, mtime, mailtmp)
            try:
                os.fsync(out)
            except OSError as e:
                raise Maildir2MboxError(f"unable to write to {mailtmp}: {strerror(e)}") from e
        finally:
            os.close(out)
    finally:
        old.close()
    try:
        os.rename(mailtmp, mail)
    except OSError as e:
        raise Maildir2MboxError(f"unable to move {mailtmp} to {mail}: {strerror(e)}") from e


def _append(out: int, path: str, rel: str, mtime: float, mailtmp: str) -> None:
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise Maildir2MboxError(f"unable to read $MAILDIR/{rel}: {strerror(e)}") from e
    buf = bytearray(_ufline(lines[0] if lines else b"", mtime))
    for line in lines:
        if needs_quote(line):
            buf += b">"
        buf += line
    if lines and not lines[-1].endswith(b"\n"):
        buf += b"\n"
    buf += b"\n"
    try:
        write_all(out, bytes(buf))
    except OSError as e:
        raise Maildir2MboxError(f"unable to write to {mailtmp}: {strerror(e)}") from e
