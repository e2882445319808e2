"""What every TCP listener (SMTP, QMQP, QMTP) does with a connection before its protocol.

tcpserver's part of qmail's servers, in one place for the three listeners
(smtp/server.py, smtp/qmqpd.py, smtp/qmtpd.py). Owns:

* :func:`parse_listen` — a listen address (``ADDR:PORT``, ``[V6]:PORT``, ...) -> (host, port).
* :func:`peer_env` — the environment tcpserver sets for a client (``PROTO``,
  ``TCPREMOTEIP``, ``TCPREMOTEPORT``, ``TCPLOCALIP``, ``TCPLOCALPORT``, ``TCPLOCALHOST``),
  IPv4-mapped IPv6 written as plain IPv4, as tcpserver writes it, so ``127.:allow`` rules
  match a client that reached an IPv6 socket over IPv4.
* :class:`Rules` — the tcprules decision from a cdb (tcpserver's order): a missing file
  allows every client (tcpserver without ``-x``), or with ``loopback_only`` loopback
  clients only (QMQP: no recipient check, so an open port is an open relay); an unreadable
  or corrupt file drops the client, nothing written.
* :class:`CdbCache` — an open cdb re-opened when its file changes (rules, morercpthosts).
* :class:`PerIp` — connections per client: an IPv4 address or an IPv6 /64
  (``netaddr.limit_key``); loopback clients may be exempt (SMTP, as Postfix exempts
  $mynetworks).

No protocol, no asyncio: the listeners call these from their own connection handlers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pyqmail import cdb, netaddr, tcprules

log = logging.getLogger("pyqmail.listener")


# -- listen addresses --------------------------------------------------------------------


def parse_listen(text: str, default_port: int | None = None) -> tuple[str, int]:
    """A listen address -> (host, port). Raises ValueError with the reason.

    ``ADDR:PORT``, ``[V6]:PORT``, ``V6-ADDRESS:PORT`` (the last colon splits), ``:PORT``;
    with a ``default_port`` (``pyqmail run``) also ``ADDR``, ``[V6]`` and a bare IPv6
    address, which then is never split (write ``[::1]:25`` for a port). ``""``,
    ``0`` and ``*`` as the host mean every IPv4 address (``0.0.0.0``).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad listen address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad listen address {text!r}")
        port = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        host, port = (host, port_text) if sep else (text, None)
        if default_port is not None and _is_ipv6(text):
            host, port = text, None  # a bare IPv6 address: its last group is not a port
    if port is None:
        if default_port is None:
            raise ValueError(f"bad listen address {text!r}: no port")
        port = str(default_port)
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad port in {text!r}")
    if host in ("", "0", "*"):
        host = "0.0.0.0"
    return host, int(port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# -- the peer's environment --------------------------------------------------------------


def peer_address(addr: object) -> tuple[str, str]:
    """A socket address -> (ip, port) as tcpserver writes them; IPv4-mapped IPv6 becomes
    plain IPv4; anything that is not an (ip, port, ...) tuple is ("unknown", "0")."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return "unknown", "0"
    ip = str(addr[0])
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip, str(addr[1])


def peer_env(peername: object, sockname: object, me: str | None) -> dict[str, str]:
    """tcpserver's variables for a connection; ``me`` (control/me) is TCPLOCALHOST."""
    ip, port = peer_address(peername)
    lip, lport = peer_address(sockname)
    env = {"PROTO": "TCP", "TCPLOCALIP": lip, "TCPLOCALPORT": lport,
           "TCPREMOTEIP": ip, "TCPREMOTEPORT": port}  # fmt: skip
    if me:
        env["TCPLOCALHOST"] = me
    return env


# -- the rules cdb -----------------------------------------------------------------------


class CdbCache:
    """An open cdb that is reopened when its file changes.

    The file is stat'ed at most once every ``ttl`` seconds (0: on every use, which is what
    tcpserver's reopen per connection amounts to).
    """

    def __init__(self, path: Path, ttl: float = 0.0) -> None:
        self.path = path
        self.ttl = ttl
        self._key: tuple[int, int, int] | None = None
        self._reader: cdb.Reader | None = None
        self._checked = -1e9

    def get(self) -> cdb.Reader | None:
        """The current reader, or None if the file does not exist. OSError if unreadable."""
        if self.ttl > 0:
            now = time.monotonic()
            if now - self._checked < self.ttl:
                return self._reader
            self._checked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._close()
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._reader is None or key != self._key:
            self._close()
            self._reader = cdb.Reader.open(self.path)
            self._key = key
        return self._reader

    def _close(self) -> None:
        # Sessions may still hold the old reader: let it go with its last user.
        self._reader = None
        self._key = None


class Rules:
    """tcpserver's access decision from the rules cdb at ``path`` (see the module
    docstring). ``ttl``: how long a look at the file holds (0: every connection)."""

    def __init__(self, path: Path, *, ttl: float = 0.0, loopback_only: bool = False) -> None:
        self.path = path
        self.loopback_only = loopback_only
        self._cache = CdbCache(path, ttl)

    def decide(self, ip: str) -> tcprules.Decision | None:
        """The decision for client ``ip``; None when the file cannot be read (drop)."""
        try:
            reader = self._cache.get()
            if reader is None:
                allow = not self.loopback_only or netaddr.is_loopback(ip)
                return tcprules.Decision(allow, {}, None)
            return tcprules.lookup(reader, ip)
        except (OSError, cdb.CdbError) as e:
            log.warning("dropping connection from %s, unable to read %s: %s", ip, self.path, e)
            return None


# -- connections per client --------------------------------------------------------------


class PerIp:
    """Connections per client, counted under ``key(ip)`` (an IPv4 address, an IPv6 /64);
    one over ``limit`` is refused. With ``exempt_loopback`` loopback clients are never
    refused (they are still counted)."""

    def __init__(
        self,
        limit: int,
        key: Callable[[str], str] = netaddr.limit_key,
        *,
        exempt_loopback: bool = False,
    ) -> None:
        self.limit = limit
        self.key = key
        self.exempt_loopback = exempt_loopback
        self.count: dict[str, int] = {}

    def take(self, ip: str) -> str | None:
        """Count a connection from ``ip``: its key, to give back later; None (nothing
        counted) when that key is at its limit."""
        key = self.key(ip)
        n = self.count.get(key, 0)
        if n >= self.limit and not (self.exempt_loopback and netaddr.is_loopback(ip)):
            return None
        self.count[key] = n + 1
        return key

    def give_back(self, key: str) -> None:
        left = self.count.get(key, 1) - 1
        if left > 0:
            self.count[key] = left
        else:
            self.count.pop(key, None)

    @contextlib.contextmanager
    def hold(self, ip: str) -> Iterator[bool]:
        """Yields False (and counts nothing) when ``ip``'s key is at its limit."""
        key = self.take(ip)
        if key is None:
            yield False
            return
        try:
            yield True
        finally:
            self.give_back(key)
