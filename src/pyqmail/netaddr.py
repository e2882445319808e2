"""Client addresses as the listeners judge them, and the addresses they listen on.

Owns two questions every listener (SMTP, QMQP, QMTP) asks of a peer's address text:

* :func:`is_loopback` — 127.0.0.0/8, ::1, or either written as IPv4-mapped IPv6. What the
  daemon lets in (QMQP) or lets relay (SMTP) when no tcprules cdb exists.
* :func:`limit_key` — the key a per-client connection limit counts under: an IPv4 client
  by its address, an IPv6 client by its /64 (RFC 6177: a site is given at least a /64, so
  one site holds 2^64 addresses and would otherwise take every slot by rotating them),
  IPv4-mapped IPv6 as the IPv4 address it carries. Text that is not an address (a Unix
  socket, "unknown") counts as itself.
"""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)  # a busy listener sees the same clients again
def _parse(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # a zone id names no host
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(ip: str) -> bool:
    addr = _parse(ip)
    return addr is not None and addr.is_loopback


@functools.lru_cache(maxsize=4096)
def limit_key(ip: str) -> str:
    addr = _parse(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
