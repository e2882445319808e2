"""Would this envelope recipient be delivered, bounced or deferred by local delivery?

:class:`RecipientVerdicts` is qmail-send's routing (:class:`pyqmail.send.todo.Routing`:
envnoathost, the percent hack, locals, virtualdomains and their prepend) followed by the
local part's verdict (:mod:`pyqmail.local.verdict`): the same two steps a queued message
takes to a local delivery, without the message. It answers None for an address that is
not local (the remote channel); nothing here guesses about other hosts.

Used by the SMTP recipient check (injected into smtp/ by daemon/ and cli/, which may
import send/) and by ``pyqmail explain``.
"""

from __future__ import annotations

import os
from typing import Protocol

from pyqmail.control import Control
from pyqmail.home import Home
from pyqmail.local.users import UserInfo
from pyqmail.local.verdict import CachedVerdicts, LocalVerdicts, mailbox_status
from pyqmail.outcome import Outcome, Status
from pyqmail.send.schedule import LOCAL
from pyqmail.send.todo import Routing
from pyqmail.smtp.rcptcheck import RcptChecks


class LocalPartVerdicts(Protocol):
    """Answers for a local part: :class:`LocalVerdicts`, or root mode's lookup client."""

    def verdict(self, local: str) -> Outcome: ...

    def answers_now(self, local: str) -> bool: ...


class RecipientVerdicts:
    """Route, then ask :class:`LocalVerdicts` (or root mode's lookup client,
    daemon/rcptlookup.py, which asks a process that may become each user)."""

    def __init__(self, local: LocalPartVerdicts) -> None:
        self.local = local
        self._routing: tuple[Control, Routing] | None = None

    def routing(self, ctl: Control) -> Routing:
        cached = self._routing
        if cached is not None and cached[0] is ctl:
            return cached[1]
        routing = Routing.from_control(ctl)
        self._routing = (ctl, routing)
        return routing

    def local_part(self, ctl: Control, address: str) -> str | None:
        """The local part a local delivery of ``address`` would get (virtualdomains'
        prepend included), None if ``address`` goes to the remote channel."""
        channel, stored = self.routing(ctl).route(address)
        if channel != LOCAL:
            return None
        return stored[: stored.rfind("@")]

    def answers_now(self, ctl: Control, address: str) -> bool:
        """True unless :meth:`verdict` would wait for another process (root mode's
        lookup, not cached): the listener then asks from a worker thread."""
        local = self.local_part(ctl, address)
        return local is None or self.local.answers_now(local)

    def verdict(self, ctl: Control, address: str) -> Outcome | None:
        """OK / PERM / TEMP for a local recipient, None for a remote one."""
        local = self.local_part(ctl, address)
        if local is None:
            return None
        return self.local.verdict(local)


def rcpt_checks(home: Home, *, local: LocalPartVerdicts | None = None) -> RcptChecks:
    """The SMTP recipient checks for ``home`` (smtp/rcptcheck.py), answering for local
    parts with ``local``: by default local delivery's own lookup in this process, its
    answers kept 5 seconds (local/verdict.py's CachedVerdicts)
    (single-user mode, or a process that may read the homes; see :func:`guarded`);
    root mode passes the client of its lookup process (daemon/rcptlookup.py), whose
    answers may block."""
    if local is None:
        local = CachedVerdicts(LocalVerdicts(home, mailbox=guarded))
        return RcptChecks(home, RecipientVerdicts(local))
    return RcptChecks(home, RecipientVerdicts(local))


def guarded(info: UserInfo) -> Outcome:
    """:func:`mailbox_status` in a process that is neither the user nor root (qmail-smtpd
    under tcpserver as qmaild in a multi-user home): a temporary answer may only mean
    that this uid may not look (a private home), which says nothing about delivery, so
    it accepts, as qmail would; a missing mailbox it can see is still refused."""
    got = mailbox_status(info)
    if got.status is Status.TEMP and os.geteuid() not in (0, info.uid):
        return Outcome.ok("")
    return got
