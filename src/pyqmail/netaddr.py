"""Client addresses as the listeners judge them, and the addresses they listen on.

Owns two questions every listener (SMTP, QMQP, QMTP) asks of a peer's address text:

* :func:`is_loopback` — 127.0.0.0/8, ::1, or either written as IPv4-mapped IPv6. What the
  daemon lets in (QMQP) or lets relay (SMTP) when no tcprules cdb exists.
* :func:`limit_key` — the key a per-client connection limit counts under: an IPv4 client
  by its address, an IPv6 client by its /64 (RFC 6177: a site is given at least a /64, so
  one site holds 2^64 addresses and would otherwise take every slot by rotating them),
  IPv4-mapped IPv6 as the IPv4 address it carries. Text that is not an address (a Unix
  socket, "unknown") counts as itself.

and one about the listener's own address:

* :func:`parse_listen` — a listen address (``ADDR:PORT``, ``[V6]:PORT``, ...) -> (host,
  port), for ``pyqmail run`` and the servers' ``--listen`` modes.
"""

from __future__ import annotations

import ipaddress


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


def limit_key(ip: str) -> str:
    addr = _parse(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


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
