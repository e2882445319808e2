"""control/authsenders: which MAIL FROM addresses each authenticated user may use.

Optional; without the file an authenticated user may use any sender (as RELAYCLIENT
may). With it, each line is ``USER: PATTERN PATTERN...`` (``#`` comments, blank lines
ignored; the user name as AUTH gave it, case-sensitive) and a pattern is:

* ``local@domain``: that address (case-insensitive),
* ``@domain``: any address at that domain (not its sub-domains),
* ``<>``: the null sender (autoresponders, bounces a user's program sends),
* ``*``: any sender.

A line for ``*`` gives every user its patterns too. A user with no line of its own and no
``*`` line may use its login name as the sender when it is an address
(``alice@example.com``), and nothing else. The refusal is
``553 5.7.1 sorry, you may not send as that address`` (protocol.py). Parsing is here, pure;
:class:`AuthSendersFile` re-reads the file when it changes (size, mtime, inode).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FILE = "authsenders"


@dataclass(frozen=True, slots=True)
class AuthSenders:
    rules: dict[bytes, frozenset[bytes]]

    @classmethod
    def parse(cls, raw: bytes) -> AuthSenders:
        rules: dict[bytes, set[bytes]] = {}
        for line in raw.splitlines():
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            user, sep, rest = line.partition(b":")
            if not sep or not user.strip():
                continue
            pats = rules.setdefault(user.strip(), set())
            for word in rest.split():
                pats.add(word if word in (b"*", b"<>") else word.lower())
        return cls({u: frozenset(p) for u, p in rules.items()})

    def allowed(self, user: bytes, sender: bytes) -> bool:
        """May ``user`` use ``sender`` (queue form: b"" for <>) as MAIL FROM?"""
        mine = self.rules.get(user)
        anyone = self.rules.get(b"*")
        if mine is None and anyone is None:
            return b"@" in user and sender.lower() == user.lower()
        low = sender.lower()
        domain = b"@" + low.rpartition(b"@")[2] if b"@" in low else None
        for pats in (mine, anyone):
            if pats is None:
                continue
            if b"*" in pats:
                return True
            if not sender:
                if b"<>" in pats:
                    return True
                continue
            if low in pats or (domain is not None and domain in pats):
                return True
        return False


class AuthSendersFile:
    """The file, parsed again when it changes. ``get`` is None while it is missing (no
    limit); a file that exists but cannot be read allows nobody (failing open would lift
    the limit it sets)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value: AuthSenders | None = None

    def get(self) -> AuthSenders | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return _NOBODY
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            try:
                self._value = AuthSenders.parse(self.path.read_bytes())
            except FileNotFoundError:
                return None
            except OSError:
                return _NOBODY
            self._stamp = stamp
        return self._value


_NOBODY = AuthSenders({b"*": frozenset()})
