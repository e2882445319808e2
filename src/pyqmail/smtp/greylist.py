"""Greylisting at RCPT: a triplet seen for the first time is refused for a while.

The triplet is the client's network (an IPv4 /24, an IPv6 /64: a sender's pool of
outgoing hosts retries from a neighbour), the envelope sender and the recipient, both
lowercased. A new triplet gets ``451 4.7.1`` (also when it is retried at once); from
``delay`` seconds after it was first seen it passes, and then keeps passing while it is
seen at least once every ``expire`` seconds. It is off unless ``control/greylist`` holds
the delay (``control/greylistexpire``: the expiry, default 35 days).

Invariants:

* The database cannot grow without bound. A triplet that never passed is forgotten after
  ``PENDING_TTL`` (a day), one that passed after ``expire``; a sweep runs every
  ``sweep_every`` seconds or after ``max_rows / 10`` new triplets, whichever comes first,
  and past ``max_rows`` triplets deletes the least recently seen ones down to nine tenths
  of it, so the table never holds more than 1.1 times ``max_rows``: a client inventing
  senders costs a bounded file.
* A database error never refuses mail: the check answers "pass" and logs one line
  (fail open). sqlite waits at most ``busy_ms`` for another process's lock (several
  ``qmail-smtpd`` under tcpserver, or listener workers), so a lock never stalls a session.
* Nothing here must survive a crash: the file is written without fsync (synchronous=OFF);
  a lost triplet is greylisted once more.

Where the file lives: ``HOME/greylist/greylist.sqlite``; in root mode the directory is
qmaild's (mode 0700, made by ``pyqmail init``, or by :func:`prepare_dir` in ``pyqmail run``
before the drop), the SMTP processes' account, and nobody else's (HOME/run is the queue
user's, so it cannot hold it). The file is made with umask 077. Relay clients
(RELAYCLIENT) and, once AUTH exists, authenticated sessions are not greylisted (the
caller decides: protocol.py).
The clock is a parameter, so tests need not wait.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from pyqmail.home import Home, make_account_dir

log = logging.getLogger("pyqmail.smtpd")

PENDING_TTL = 86400.0
MAX_ROWS = 200_000
_KEY_BYTES = 2100  # two addresses of at most 1000 bytes and a network: anything longer is cut

_SCHEMA = """CREATE TABLE IF NOT EXISTS triplets (
    k TEXT PRIMARY KEY, first REAL NOT NULL, last REAL NOT NULL, passed INTEGER NOT NULL)"""


def greylist_path(home: Home) -> Path:
    """Where the database lives (its directory is the SMTP account's; see the docstring)."""
    return home.root / "greylist" / "greylist.sqlite"


def prepare_dir(home: Home, uid: int, gid: int) -> None:
    """As root: make HOME/greylist (0700, qmaild's) if it is missing (home.make_account_dir)."""
    make_account_dir(home, "greylist", uid, gid)


def network(ip: str) -> str:
    """The part of a client's address that names its sender pool: IPv4 /24, IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:64]
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class Greylist:
    """The triplet database (see the module docstring). ``check`` is the only question."""

    def __init__(
        self,
        path: Path,
        delay: float,
        *,
        expire: float = 35 * 86400.0,
        max_rows: int = MAX_ROWS,
        sweep_every: float = 300.0,
        busy_ms: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.delay = delay
        self.expire = expire
        self.max_rows = max_rows
        self.sweep_every = sweep_every
        self.busy_ms = busy_ms
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._swept = -float("inf")
        self._failed = False  # the last error is logged once, not per recipient
        self._inserted = 0  # new triplets since the last sweep

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            old = os.umask(0o077)  # the file is the SMTP account's alone
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self.busy_ms / 1000, isolation_level=None)
            finally:
                os.umask(old)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=OFF")
                db.execute(_SCHEMA)
                db.execute("CREATE INDEX IF NOT EXISTS by_last ON triplets(last)")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def check(self, ip: str, sender: bytes, rcpt: bytes) -> bool:
        """True: the triplet may pass; False: answer 451 4.7.1. Never raises."""
        key = b"\0".join((network(ip).encode(), sender.lower(), rcpt.lower()))[:_KEY_BYTES]
        k = key.decode("utf-8", "backslashreplace")  # sqlite's TEXT is UTF-8
        now = self.clock()
        try:
            db = self._open()
            if now - self._swept >= self.sweep_every or self._inserted > self.max_rows // 10:
                self._sweep(db, now)
            passed = self._check(db, k, now)
        except (sqlite3.Error, OSError) as e:
            if not self._failed:
                log.warning("greylist: %s: %s; letting mail through", self.path, e)
            self._failed = True
            self.close()
            return True
        self._failed = False
        return passed

    def _check(self, db: sqlite3.Connection, k: str, now: float) -> bool:
        row = db.execute("SELECT first, last, passed FROM triplets WHERE k = ?", (k,)).fetchone()
        if row is not None:
            first, last, passed = float(row[0]), float(row[1]), bool(row[2])
            if passed and now - last < self.expire:
                db.execute("UPDATE triplets SET last = ? WHERE k = ?", (now, k))
                return True
            if not passed and now - first < PENDING_TTL:
                if now - first >= self.delay:
                    db.execute("UPDATE triplets SET last = ?, passed = 1 WHERE k = ?", (now, k))
                    return True
                return False
        # new, or forgotten: it starts its wait now
        self._inserted += 1
        db.execute(
            "INSERT OR REPLACE INTO triplets (k, first, last, passed) VALUES (?, ?, ?, 0)",
            (k, now, now),
        )
        return False

    def _sweep(self, db: sqlite3.Connection, now: float) -> None:
        self._swept, self._inserted = now, 0
        db.execute(
            "DELETE FROM triplets WHERE (passed = 0 AND first < ?) OR last < ?",
            (now - PENDING_TTL, now - self.expire),
        )
        count = int(db.execute("SELECT COUNT(*) FROM triplets").fetchone()[0])
        if count > self.max_rows:
            keep = self.max_rows * 9 // 10
            db.execute(
                "DELETE FROM triplets WHERE k IN (SELECT k FROM triplets ORDER BY last LIMIT ?)",
                (count - keep,),
            )
            log.warning("greylist: %d triplets, over %d: the oldest were forgotten",
                        count, self.max_rows)  # fmt: skip

    def rows(self) -> int:
        """How many triplets are kept (for tests and status)."""
        return int(self._open().execute("SELECT COUNT(*) FROM triplets").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
