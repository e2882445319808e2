"""The DNS resolvers every part uses: one set-up, from ``PYQMAIL_RESOLVER`` or resolv.conf.

``PYQMAIL_RESOLVER=IP[:PORT]`` (``[v6]:PORT`` for IPv6) points pyqmail at one server (tests,
a local cache, a split-horizon site); unset, dnspython reads /etc/resolv.conf. The remote
agent's MX lookups (remote/mx.py, async), the SMTP listener's block lists (smtp/rbl.py)
and the checks of incoming mail (smtp/authcheck.py:
async DMARC lookups, and the synchronous ones pyspf and dkimpy make in worker threads) build
their resolvers here, so both always ask the same server. Every resolver has a ``lifetime``:
the longest one query may take, retries included; a silent or slow server costs at most that.
"""

from __future__ import annotations

import os
from typing import TypeVar

import dns.asyncresolver
import dns.resolver

DEFAULT_LIFETIME = 30.0


def split_hostport(spec: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[v6]``, ``[v6]:PORT`` -> (host, port); port 53 by default."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, 53


_R = TypeVar("_R", bound=dns.resolver.BaseResolver)


def _build(cls: type[_R], spec: str | None, lifetime: float) -> _R:
    spec = spec if spec is not None else os.environ.get("PYQMAIL_RESOLVER") or None
    res = cls(configure=spec is None)
    if spec is not None:
        host, port = split_hostport(spec)
        res.nameservers = [host]
        res.port = port
    res.lifetime = lifetime
    res.timeout = min(res.timeout, lifetime)
    res.cache = dns.resolver.LRUCache(10000)
    return res


def make_resolver(
    spec: str | None = None, *, lifetime: float = DEFAULT_LIFETIME
) -> dns.asyncresolver.Resolver:
    """An async resolver for ``spec`` (``IP[:PORT]``), else PYQMAIL_RESOLVER, else resolv.conf."""
    return _build(dns.asyncresolver.Resolver, spec, lifetime)


def make_sync_resolver(
    spec: str | None = None, *, lifetime: float = DEFAULT_LIFETIME
) -> dns.resolver.Resolver:
    """The same as :func:`make_resolver`, blocking (for libraries that run in a thread)."""
    return _build(dns.resolver.Resolver, spec, lifetime)
