"""The DNS resolver every part of pyqmail uses (remote delivery's MX lookups, the SMTP
listener's block lists): dnspython's async resolver, set up once, here.

``PYQMAIL_RESOLVER=IP[:PORT]`` (``[v6]:PORT`` for IPv6) names the one server to ask;
without it /etc/resolv.conf is read. ``lifetime`` bounds a whole lookup (every server and
retry together), so a slow or silent server costs a caller at most that long. A leaf of
the foundation: remote/ and smtp/ both import it.
"""

from __future__ import annotations

import os

import dns.asyncresolver
import dns.resolver

DEFAULT_LIFETIME = 30.0


def make_resolver(
    spec: str | None = None, *, lifetime: float = DEFAULT_LIFETIME
) -> dns.asyncresolver.Resolver:
    """A resolver for ``spec`` (``IP[:PORT]``), else PYQMAIL_RESOLVER, else resolv.conf."""
    spec = spec if spec is not None else os.environ.get("PYQMAIL_RESOLVER") or None
    if spec is None:
        res = dns.asyncresolver.Resolver()
    else:
        host, port = split_hostport(spec)
        res = dns.asyncresolver.Resolver(configure=False)
        res.nameservers = [host]
        res.port = port
    res.lifetime = lifetime
    res.timeout = min(res.timeout, lifetime)
    res.cache = dns.resolver.LRUCache(10000)
    return res


def split_hostport(spec: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[V6]``, ``[V6]:PORT`` or a bare IPv6 address -> (ip, port)."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, 53
