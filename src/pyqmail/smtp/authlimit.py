"""Failed SMTP AUTH attempts per client network: the growing delay and the lock-out.

The key is the client's address (IPv4) or its /64 (IPv6): netaddr.limit_key. Each failed
password check is recorded with its time; the failures of the last ``window`` seconds
decide:

* the ``535`` of the k-th failure waits ``min(k * step, max_delay)`` seconds (a guesser's
  rate falls, a user's typo costs a second);
* from ``max_failures`` failures on, the next AUTH from that network gets ``421`` and the
  connection is closed (protocol.py asks :meth:`AuthFailures.blocked`), until the window
  has passed over the oldest of them. A success does not clear the count (one valid
  account must not reset the guessing of others).

Two stores, one interface: :class:`MemoryFailures` for the listener (one process holds
every connection of ``pyqmail run``), bounded to ``max_keys`` networks (the oldest goes);
:class:`FileFailures` for qmail-smtpd under tcpserver (a process per connection) in an
sqlite file beside the greylist database (HOME/greylist/, the SMTP account's directory),
written without fsync (a lost row costs a guesser nothing much) and failing open with one
log line when it cannot be used: then each connection still has its delay and the
protocol's error limit. The clock is a parameter, so tests need not wait.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyqmail import netaddr
from pyqmail.home import Home

log = logging.getLogger("pyqmail.smtpd")


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    max_failures: int = 8  # failures in the window before AUTH gets 421
    window: float = 900.0  # seconds
    step: float = 1.0  # seconds of delay per failure in the window
    max_delay: float = 5.0

    def delay(self, failures: int) -> float:
        return min(failures * self.step, self.max_delay)


class AuthFailures(ABC):
    """The interface protocol.py uses."""

    policy: AuthPolicy

    def blocked(self, ip: str) -> bool:
        """Has this network used up its failures?"""
        return self.count(ip) >= self.policy.max_failures

    @abstractmethod
    def count(self, ip: str) -> int:
        """Failures recorded for this network within the window."""

    @abstractmethod
    def failed(self, ip: str) -> float:
        """Record a failure; the delay before its 535."""


class MemoryFailures(AuthFailures):
    def __init__(
        self,
        policy: AuthPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.policy = policy or AuthPolicy()
        self.clock = clock
        self.max_keys = max_keys
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def _times(self, key: str) -> deque[float] | None:
        times = self._seen.get(key)
        if times is None:
            return None
        edge = self.clock() - self.policy.window
        while times and times[0] <= edge:
            times.popleft()
        if not times:
            del self._seen[key]
            return None
        return times

    def count(self, ip: str) -> int:
        times = self._times(netaddr.limit_key(ip))
        return 0 if times is None else len(times)

    def failed(self, ip: str) -> float:
        key = netaddr.limit_key(ip)
        times = self._times(key)
        if times is None:
            times = self._seen[key] = deque(maxlen=self.policy.max_failures + 1)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(key)
        times.append(self.clock())
        return self.policy.delay(len(times))


def failures_path(home: Home) -> Path:
    return home.root / "greylist" / "authfail.sqlite"


class FileFailures(AuthFailures):
    """The sqlite store for one qmail-smtpd process (module docstring)."""

    def __init__(
        self,
        path: Path,
        policy: AuthPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        busy_ms: int = 200,
    ) -> None:
        self.policy = policy or AuthPolicy()
        self.path = path
        self.clock = clock
        self.busy_ms = busy_ms
        self._db: sqlite3.Connection | None = None
        self._broken = False
        self._local: list[float] = []  # this connection's failures (the fall-back)

    def _open(self) -> sqlite3.Connection | None:
        if self._db is not None or self._broken:
            return self._db
        try:
            db = sqlite3.connect(self.path, timeout=self.busy_ms / 1000, isolation_level=None)
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE IF NOT EXISTS fails (k TEXT NOT NULL, t REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS fails_k ON fails (k, t)")
        except (sqlite3.Error, OSError) as e:
            self._fail_open(e)
            return None
        self._db = db
        return db

    def _fail_open(self, e: Exception) -> None:
        if not self._broken:
            log.warning("auth failures: %s: %s (each connection is limited alone)", self.path, e)
        self._broken = True
        self._db = None

    def count(self, ip: str) -> int:
        db = self._open()
        edge = self.clock() - self.policy.window
        if db is None:
            return sum(1 for t in self._local if t > edge)
        try:
            row = db.execute(
                "SELECT COUNT(*) FROM fails WHERE k = ? AND t > ?", (netaddr.limit_key(ip), edge)
            ).fetchone()
        except sqlite3.Error as e:
            self._fail_open(e)
            return sum(1 for t in self._local if t > edge)
        return int(row[0])

    def failed(self, ip: str) -> float:
        now = self.clock()
        self._local.append(now)
        db = self._open()
        if db is not None:
            try:
                db.execute("DELETE FROM fails WHERE t <= ?", (now - self.policy.window,))
                db.execute("INSERT INTO fails (k, t) VALUES (?, ?)", (netaddr.limit_key(ip), now))
            except sqlite3.Error as e:
                self._fail_open(e)
        return self.policy.delay(self.count(ip))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
