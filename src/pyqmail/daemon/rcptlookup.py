"""Root mode's recipient lookup: the SMTP part asks a process that may become each user.

In root mode the listeners run as qmaild, which may not look into users' homes; the
RCPT check (smtp/rcptcheck.py) must still give local delivery's own answer
(local/verdict.py). So, before it drops, the smtpd part forks :class:`LookupProcess`,
which keeps root the way qmail-lspawn does and does qmail-lspawn's part of a delivery
and no more:

* it reads a local part from its socket pair (a 2-byte length and at most
  ``MAX_LOCAL`` bytes: nothing else is parsed, and only the smtpd part holds the
  other end, so no other account can ask);
* it resolves the owner as the spawner does (users/cdb, qmail-getpw's accounts, the
  alias user: root-owned files and the passwd database, as qmail-lspawn reads them);
* it forks a child that drops to the owner's uid and gid (no supplementary groups,
  never uid 0) *before* it opens anything in the home, and that child runs
  :func:`~pyqmail.local.verdict.mailbox_status` (home and .qmail files opened by
  descriptor relative to the home); its exit code (0, 100, 111) is the answer. Root
  never follows a path inside a directory the user owns.

:class:`LookupClient` is the smtpd part's side, behind local/verdict.py's short cache
(``CachedVerdicts``, 5 seconds per lower-cased local part). A dead lookup process answers
TEMP (451), never 550.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from pyqmail.home import Home
from pyqmail.local.users import UserInfo
from pyqmail.local.verdict import (
    CACHE_TTL,
    NO_MAILBOX,
    CachedVerdicts,
    LocalVerdicts,
    mailbox_status,
)
from pyqmail.outcome import Outcome, Status
from pyqmail.sockio import recv_exact

MAX_LOCAL = 1024
_CODE = {Status.OK: 0, Status.PERM: 100, Status.TEMP: 111}
_BY_LETTER = {s.value.encode(): s for s in Status}
_LEN = struct.Struct(">H")


def _as_user(info: UserInfo) -> Outcome:
    """mailbox_status in a child that has become the user first."""
    pid = os.fork()
    if pid == 0:
        code = 111
        try:
            os.setgroups([])
            os.setgid(info.gid)
            os.setuid(info.uid)
            if os.getuid() != 0 and os.geteuid() != 0:
                code = _CODE[mailbox_status(info).status]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return Outcome.ok("")
    if code == 100:
        return Outcome.perm(NO_MAILBOX)
    return Outcome.temp("lookup failed")


class LookupProcess:
    """The root child; ``start()`` forks it and returns the smtpd part's client."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.pid = 0

    def start(self) -> CachedVerdicts:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            code = 111
            try:
                mine.close()
                code = self._serve(theirs)
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        return CachedVerdicts(LookupClient(mine), CACHE_TTL)

    def _serve(self, sock: socket.socket) -> int:
        verdicts = LocalVerdicts(self.home, mailbox=_as_user)
        while True:
            head = recv_exact(sock, _LEN.size)
            if head is None:
                return 0  # the smtpd part is gone
            (n,) = _LEN.unpack(head)
            if n > MAX_LOCAL:
                return 111
            raw = recv_exact(sock, n)
            if raw is None:
                return 0
            try:
                status = verdicts.verdict(raw.decode("utf-8", "surrogateescape")).status
            except Exception:
                status = Status.TEMP
            sock.sendall(status.value.encode())


class LookupClient:
    """``verdict(local)`` over the socket pair, one question at a time (a lock: the
    listener asks from its worker threads); cached by :func:`client` for ``CACHE_TTL``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def answers_now(self, local: str) -> bool:
        return False  # a round trip to the lookup process (and a fork there)

    def verdict(self, local: str) -> Outcome:
        raw = local.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_LOCAL:
            return Outcome.perm(NO_MAILBOX)  # no account or .qmail name is that long
        with self._lock:
            try:
                self.sock.sendall(_LEN.pack(len(raw)) + raw)
                got = recv_exact(self.sock, 1)
            except OSError:
                got = None
        return Outcome(_BY_LETTER.get(got or b"", Status.TEMP), "")
