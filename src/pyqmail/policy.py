"""What qmail-smtpd and qmail-qmtpd decide alike: relay control and the size limit.

One copy for smtp/session.py (SMTP), smtp/qmtpd.py (QMTP) and check.py. Owns:

* :class:`RcptHosts` — qmail's rcpthosts.c. A recipient without ``@`` passes; else its
  domain, ASCII-lowercased and nothing more (qmail's case_lowerb), must be a line of
  control/rcpthosts (compared ignoring ASCII case, as constmap does) or a key of
  morercpthosts.cdb, whole or from any ``.`` on (``.example.com`` lists every
  subdomain). No rcpthosts file: every recipient passes, morercpthosts.cdb unread.
  The domain stays bytes throughout: it is never decoded, so non-ASCII bytes match only
  themselves (no Unicode case folding: ``K``, the Kelvin sign, is not ``k``), and no two
  different domains compare equal after a lossy decode.
* :func:`relayclient` — ``$RELAYCLIENT`` as bytes (None: unset; set, even empty, it skips
  relay control and is appended to every recipient).
* :func:`databytes` — control/databytes, overridden by ``$DATABYTES`` read as qmail's
  scan_ulong (leading digits; none = 0 = no limit).
"""

from __future__ import annotations

from collections.abc import Mapping

from pyqmail import cdb
from pyqmail.control import Control

_DOT = 0x2E


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


_ENCODED: dict[int, tuple[Control, frozenset[bytes] | None]] = {}


def rcpthosts_bytes(ctl: Control) -> frozenset[bytes] | None:
    """control/rcpthosts as ASCII-lowercased byte strings (None: no file), computed once
    per control snapshot."""
    hit = _ENCODED.get(id(ctl))
    if hit is not None and hit[0] is ctl:
        return hit[1]
    hosts: frozenset[bytes] | None = None
    if ctl.rcpthosts is not None:
        raw = ctl.raw_lists.get("rcpthosts")
        if raw is not None:  # the lines as written: Control.rcpthosts is Unicode-lowered
            hosts = frozenset(_b(line).lower() for line, _ in raw)
        else:
            hosts = frozenset(_b(line).lower() for line in ctl.rcpthosts)
    if len(_ENCODED) > 8:
        _ENCODED.clear()
    _ENCODED[id(ctl)] = (ctl, hosts)
    return hosts


class RcptHosts:
    """Relay control for one connection (see the module docstring)."""

    __slots__ = ("hosts", "more")

    def __init__(self, hosts: frozenset[bytes] | None, more: cdb.Reader | None = None) -> None:
        self.hosts = hosts
        self.more = more

    @classmethod
    def of(cls, ctl: Control, more: cdb.Reader | None = None) -> RcptHosts:
        return cls(rcpthosts_bytes(ctl), more)

    def allowed(self, rcpt: bytes) -> bool:
        """May this recipient be accepted from a client that may not relay?"""
        hosts = self.hosts
        if hosts is None:
            return True
        at = rcpt.rfind(b"@")
        if at < 0:
            return True
        domain = rcpt[at + 1 :].lower()  # bytes.lower: ASCII letters only
        keys = [domain[j:] for j in range(len(domain)) if j == 0 or domain[j] == _DOT]
        if any(k in hosts for k in keys):
            return True
        more = self.more
        return more is not None and any(more.get(k) is not None for k in keys)


def relayclient(env: Mapping[str, str]) -> bytes | None:
    rc = env.get("RELAYCLIENT")
    return None if rc is None else _b(rc)


def databytes(ctl: Control, env: Mapping[str, str]) -> int:
    """The size limit in bytes (0: none)."""
    text = env.get("DATABYTES")
    if text is None:
        return ctl.databytes
    n = 0
    while n < len(text) and "0" <= text[n] <= "9":
        n += 1
    return int(text[:n]) if n else 0
