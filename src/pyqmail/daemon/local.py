"""The local agent without a fork: qmail-lspawn's checks and qmail-local, in worker threads.

When nothing needs a different uid (single-user mode, or the daemon started by an ordinary
user), a fork per delivery buys no separation and costs most of a delivery's CPU (page
table copies and copy-on-write faults of a large interpreter). This agent runs the same
code the spawner's child runs (users lookup, local/qlocal.py) in a thread pool, with the
same answers as qmail-lspawn for the cases it checks itself (no ``@``, the trash address
``@host``, an unreadable message). qlocal never changes the cwd or the umask and holds
the user's home as a directory descriptor, so deliveries in parallel threads do not meet.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.local import program, qlocal, users
from pyqmail.local.spawn import split_recipient
from pyqmail.outcome import Outcome

_CONTROL_TTL = 1.0  # seconds a defaultdelivery value is reused before the cache is asked again


class InProcessLocal:
    """``deliver(mess, sender, recipient) -> Outcome`` as LocalSpawner, without forking."""

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        *,
        workers: int = 32,
        program_timeout: float = program.DEFAULT_TIMEOUT,
        lock_timeout: float = 30.0,
    ) -> None:
        self.home = home
        self.ctl = ctl
        self.program_timeout = program_timeout
        self.lock_timeout = lock_timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="local")
        self._dd: tuple[float, str] | None = None

    def start(self) -> None:
        """Nothing to fork (LocalSpawner's interface)."""

    def _defaultdelivery(self) -> str:
        now = time.monotonic()
        if self._dd is None or now - self._dd[0] > _CONTROL_TTL:
            self._dd = (now, self.ctl.get().defaultdelivery)
        return self._dd[1]

    async def deliver(self, mess: Path, sender: str, recipient: str) -> Outcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.deliver_sync, mess, sender, recipient)

    def deliver_sync(self, mess: Path, sender: str, recipient: str) -> Outcome:
        """One delivery, blocking (worker thread)."""
        split = split_recipient(recipient)
        if split is None:
            return Outcome.perm("Sorry, address must include host name. (#5.1.3)\n")
        local, domain = split
        if not local:
            return Outcome.ok("")  # qmail-lspawn's trash address: success, no delivery
        try:
            defaultdelivery = self._defaultdelivery()
        except Exception:
            return Outcome.temp("Unable to read control files. (#4.3.0)\n")
        try:
            mfd = os.open(mess, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return Outcome.temp("qmail-spawn unable to open message. (#4.3.0)\n")
        try:
            if not stat.S_ISREG(os.fstat(mfd).st_mode):
                return Outcome.temp("Sorry, message has wrong type. (#4.3.5)\n")
            try:
                info = users.resolve(self.home, local)
            except users.UserError as e:
                return qlocal.outcome_of(e.code, b"")
            if not info.home.startswith("/"):
                return qlocal.outcome_of(users.QLX_USAGE, b"")
            req = qlocal.Request(
                info.user,
                info.home,
                local,
                info.dash,
                info.ext,
                domain,
                sender,
                defaultdelivery,
                program_timeout=self.program_timeout,
                lock_timeout=self.lock_timeout,
            )
            try:
                return qlocal.deliver(req, mfd, self.home)
            except Exception:
                return Outcome.temp("Unexpected error in local delivery. (#4.3.0)\n")
        finally:
            os.close(mfd)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pool.shutdown, True)
