"""Would local delivery deliver to this local part, bounce it, or defer it?

The pure question behind the SMTP recipient check (docs/rcptcheck.md) and ``pyqmail
explain``: it walks the same code as a delivery, and only that code, so the two cannot
disagree:

1. an empty local part is qmail-lspawn's trash address (delivered);
2. users/cdb, then qmail-getpw's system accounts, then the alias user
   (:func:`pyqmail.local.users.resolve_with`, as the spawner and the worker pool do);
   trouble there (an unreadable users/cdb, no alias user) is temporary;
3. as the user: the home opened and checked (:func:`pyqmail.local.qlocal.home_refusal`),
   and the .qmail file chosen (:func:`pyqmail.local.dotqmail.choose`, which reads a file
   it finds); no file for a non-base address is the one permanent answer
   (:func:`pyqmail.local.dotqmail.no_mailbox`, qmail-local's ``Sorry, no mailbox here by
   that name. (#5.1.1)``); a .qmail that exists but cannot be opened is temporary.

An SRS local part (``SRS0=``/``SRS1=``, docs/srs.md) with control/srs present is not
looked up in a home: delivery forwards it to the address it stands for, before any
.qmail file, so the answer is that of its hash and age (a forged or expired one is
permanent). A control/srs this process may not read (qmail-smtpd as qmaild, with the
secret kept from it) leaves the answer to delivery: accepted, as ``guarded`` accepts.

What it does not look at: the file's instructions (a program may still exit 100, a
forward may bounce later), the message (the Delivered-To loop check) and anything that
depends on the sender. Those can only be known by delivering; the check answers for
the address alone.

Step 3 opens files in a user's home; in root mode it must run as that user
(:class:`LocalVerdicts` takes the step as a parameter for that: daemon/rcptlookup.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pyqmail import srs
from pyqmail.home import Home
from pyqmail.local import dotqmail, qlocal, users
from pyqmail.local.dotqmail import DotQmailError
from pyqmail.outcome import Outcome

NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"
CACHE_TTL = 5.0  # seconds an answer is reused by CachedVerdicts


class _Answers(Protocol):
    def verdict(self, local: str) -> Outcome: ...

    def answers_now(self, local: str) -> bool: ...


MailboxCheck = Callable[[users.UserInfo], Outcome]


def mailbox_status(info: users.UserInfo) -> Outcome:
    """Step 3, in this process: does ``info``'s home hold a mailbox for its dash/ext?

    Run it as ``info.uid`` (or in single-user mode): it opens the home and the .qmail
    files by descriptor, relative to the home, never following a name out of it."""
    try:
        hfd = os.open(users.enc(info.home), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return Outcome.temp("Unable to switch to the home directory. (#4.3.0)")
    try:
        refusal = qlocal.home_refusal(os.fstat(hfd).st_mode)
        if refusal is not None:
            return Outcome.temp(refusal)
        chosen = dotqmail.choose(info.dash, info.ext, hfd)
    except (DotQmailError, OSError) as e:
        return Outcome.temp(str(e) or "Unable to read the .qmail file. (#4.3.0)")
    finally:
        os.close(hfd)
    if dotqmail.no_mailbox(chosen, info.dash):
        return Outcome.perm(NO_MAILBOX)
    return Outcome.ok("")


class LocalVerdicts:
    """Steps 1-3 for one home, with users/cdb kept open between questions."""

    def __init__(
        self,
        home: Home,
        *,
        mailbox: MailboxCheck = mailbox_status,
        lookup: users.PasswdLookup | None = None,
        users_cdb: Path | None = None,
        srs_source: qlocal.SrsSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self.mailbox = mailbox
        self.srs_source = srs_source or (lambda: srs.read(home.control))
        self.clock = clock
        self._lookup = lookup
        self._cdb = users.CdbCache(users_cdb or home.users / "cdb")

    def owner(self, local: str) -> users.UserInfo | Outcome:
        """Steps 1-2: who would get ``local`` (the UserInfo the spawner would use), or the
        Outcome when that already decides (trash: OK; trouble: TEMP)."""
        if not local:
            return Outcome.ok("")
        try:
            reader = self._cdb.reader()
            if self._lookup is None:
                info = users.resolve_with(self.home, local, reader)
            else:
                info = users.resolve_with(self.home, local, reader, self._lookup)
        except users.UserError as e:
            return Outcome.temp(e.text)
        if not info.home.startswith("/"):
            return Outcome.temp("Internal qmail-lspawn bug.")
        if info.uid == 0 and not self.home.single_user:
            return Outcome.temp("Not allowed to perform deliveries as root.")
        return info

    def answers_now(self, local: str) -> bool:
        """True: :meth:`verdict` works in this process, without waiting for another."""
        return True

    def verdict(self, local: str) -> Outcome:
        """OK (delivered), PERM (bounced: no such address) or TEMP (deferred)."""
        got = self.owner(local)
        if isinstance(got, Outcome):
            return got
        if srs.is_srs(local):
            answer = self._srs(local)
            if answer is not None:
                return answer
        return self.mailbox(got)

    def _srs(self, local: str) -> Outcome | None:
        """The answer for an SRS local part; None when SRS is off (an ordinary lookup)."""
        try:
            raw = self.srs_source()
        except PermissionError:
            return Outcome.ok("")  # not ours to read: delivery decides (module docstring)
        except OSError:
            return Outcome.temp("Unable to read control/srs. (#4.3.0)")
        if raw is None:
            return None
        try:
            config = srs.parse(raw)
        except srs.ConfigError as e:
            return Outcome.temp(f"{e}. (#4.3.0)")
        refusal = qlocal.srs_refusal(config, local, self.clock())
        return Outcome.ok("") if refusal is None else Outcome.perm(refusal)


class CachedVerdicts:
    """Answers of ``inner`` (anything with ``verdict(local)``) kept ``ttl`` seconds per
    lower-cased local part: every step of the lookup is case-insensitive (users/cdb and
    getpw lower-case, .qmail names are the lower-cased extension). The SMTP check's
    short cache; a user added or a .qmail made counts within ``ttl``. Thread-safe
    enough for the listener's worker threads (a race costs one extra lookup)."""

    def __init__(self, inner: _Answers, ttl: float = CACHE_TTL, size: int = 10000) -> None:
        self.inner = inner
        self.ttl = ttl
        self.size = size
        self._cache: dict[str, tuple[float, Outcome]] = {}

    def answers_now(self, local: str) -> bool:
        """A fresh answer is kept, or ``inner`` answers without waiting."""
        hit = self._cache.get(local.lower())
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return True
        return self.inner.answers_now(local)

    def verdict(self, local: str) -> Outcome:
        key = local.lower()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        got = self.inner.verdict(local)
        if len(self._cache) >= self.size:
            self._cache.clear()
        self._cache[key] = (now, got)
        return got


def would_deliver(home: Home, local: str) -> Outcome:
    """Would a local delivery to the local part ``local`` (after virtualdomains'
    prepend: ``alice-lists``, ``postmaster``) be delivered (OK), bounced for want of a
    mailbox (PERM) or deferred (TEMP)? In this process and with its privileges; see the
    module docstring for what it does and does not look at."""
    return LocalVerdicts(home).verdict(local)
