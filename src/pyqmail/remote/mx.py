"""Which addresses to try for a domain: MX, address records, literals, the self-MX rule.

qmail-remote's dns_mxip / dns_ip (remote.md section 2) over dnspython's async resolver:

- an IP literal (``1.2.3.4``, ``[1.2.3.4]``, ``[IPv6:2001:db8::1]``) is itself, preference 0;
- otherwise MX records, ascending preference, **random order among equal preferences**;
  each MX target contributes its address records (A first, then AAAA: qmail knew only A,
  pyqmail keeps its order and adds IPv6) with the MX preference; a target whose lookup
  fails permanently is skipped, a temporary failure matters only if nothing is left;
- NXDOMAIN or no MX records (CNAMEs are followed by the resolver) -> the host's own
  address records, preference 0; a null MX (RFC 7505, target ``.``) has no addresses;
- the self-MX rule (:func:`eligible`): if one of our own addresses is in the list, only
  addresses of strictly better preference are eligible, so we never loop to ourselves.

Failures carry qmail's texts as :class:`DnsFailure` (an :class:`Outcome`): a temporary DNS
failure (SERVFAIL, timeout, no server) is ``Z ... (#4.1.2)``; NXDOMAIN is ``D ... (#5.1.2)``;
nothing at all is ``D ... (#5.4.4)``.

The resolver comes from ``PYQMAIL_RESOLVER=IP[:PORT]`` (``[v6]:PORT`` for IPv6), else from
/etc/resolv.conf (:func:`pyqmail.resolver.make_resolver`, shared with the SMTP block lists and
smtp/authcheck.py).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import ipaddress
import random
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver

from pyqmail.outcome import Outcome
from pyqmail.resolver import DEFAULT_LIFETIME as DEFAULT_LIFETIME
from pyqmail.resolver import make_resolver as make_resolver


@dataclass(frozen=True, slots=True)
class Address:
    """One address to try: MX preference, the IP as text, and the name it came from."""

    pref: int
    ip: str
    name: str  # the MX/relay host name (for TLS verification); the IP for literals
    # The MX RRset (or its secure denial) and this host's address records came with the
    # AD bit of a trusted resolver (remote/dane.py): only then may DANE apply to it.
    secure: bool = False


class DnsFailure(Exception):
    """A lookup ended the delivery attempt: its qmail outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


def _safe(host: str) -> str:
    # qmail's outsafe(): bytes outside 33..126 are shown as '?'
    return "".join(ch if 33 <= ord(ch) <= 126 else "?" for ch in host)


def temp_dns() -> DnsFailure:
    return DnsFailure(Outcome.temp("Sorry, I couldn't find any host by that name. (#4.1.2)\n"))


def perm_dns(host: str) -> DnsFailure:
    return DnsFailure(
        Outcome.perm(f"Sorry, I couldn't find any host named {_safe(host)}. (#5.1.2)\n")
    )


def perm_nomx() -> DnsFailure:
    return DnsFailure(
        Outcome.perm("Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n")
    )


def perm_ambigmx() -> DnsFailure:
    return DnsFailure(
        Outcome.perm(
            "Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
            "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n"
        )
    )


def ip_literal(host: str) -> str | None:
    """The address if ``host`` is an IP literal, else None."""
    text = host
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class _Lookup:
    """Outcome of the A+AAAA lookups for one name."""

    def __init__(self) -> None:
        self.ips: list[str] = []
        self.hard = False
        self.soft = False
        self.secure = True  # every answer had the AD bit (DNSSEC-validated)


async def _query(res: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[str] | str:
    """Answer texts, or "hard" (NXDOMAIN), or "soft" (anything temporary)."""
    return (await _query_ad(res, name, rdtype))[0]


async def _query_ad(
    res: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> tuple[list[str] | str, bool]:
    """:func:`_query`'s result and whether the answer (or the NODATA) had the AD bit."""
    try:
        ans = await res.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return "hard", False
    except (dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        return [], False
    except (dns.exception.DNSException, OSError, ValueError):
        return "soft", False
    ad = bool(ans.response.flags & dns.flags.AD)
    if ans.rrset is None:
        return [], ad
    return [r.to_text() for r in ans.rrset], ad


async def host_addresses(
    res: dns.asyncresolver.Resolver, name: str, *, ipv6: bool = True
) -> _Lookup:
    kinds = ["A", "AAAA"] if ipv6 else ["A"]
    results = await asyncio.gather(*(_query_ad(res, name, k) for k in kinds))
    out = _Lookup()
    for r, ad in results:
        out.secure = out.secure and ad
        if r == "hard":
            out.hard = True
        elif r == "soft":
            out.soft = True
        else:
            out.ips.extend(r)
    return out


async def relay_addresses(
    res: dns.asyncresolver.Resolver, relay: str, *, ipv6: bool = True
) -> list[Address]:
    """dns_ip for an smtproutes relay: a literal, or the name's address records (no MX)."""
    lit = ip_literal(relay)
    if lit is not None:
        return [Address(0, lit, lit)]
    found = await host_addresses(res, relay, ipv6=ipv6)
    if found.ips:
        return [Address(0, ip, relay) for ip in found.ips]
    if found.hard:
        raise perm_dns(relay)
    if found.soft:
        raise temp_dns()
    raise perm_nomx()


async def mx_addresses(
    res: dns.asyncresolver.Resolver,
    host: str,
    *,
    ipv6: bool = True,
    rng: random.Random | None = None,
) -> list[Address]:
    """dns_mxip: every address for mail to ``host``, in the order to try them."""
    lit = ip_literal(host)
    if lit is not None:
        return [Address(0, lit, lit)]
    mx, mx_secure = await _query_ad(res, host, "MX")
    if mx == "soft":
        raise temp_dns()
    if mx == "hard" or not mx:
        found = await host_addresses(res, host, ipv6=ipv6)
        if found.ips:
            secure = mx_secure and found.secure  # RFC 7672 2.2.1: a secure "no MX"
            return [Address(0, ip, host, secure) for ip in found.ips]
        if found.hard:
            raise perm_dns(host)
        if found.soft:
            raise temp_dns()
        raise perm_nomx()
    rng = rng or random.Random()
    targets: list[tuple[int, float, str]] = []
    for text in mx:
        pref_text, _, target = text.partition(" ")
        targets.append((int(pref_text), rng.random(), target.rstrip(".")))
    targets.sort()
    names = list(dict.fromkeys(t for _, _, t in targets if t))  # "." (null MX): none
    lookups = await asyncio.gather(*(host_addresses(res, n, ipv6=ipv6) for n in names))
    by_name = dict(zip(names, lookups, strict=True))
    out: list[Address] = []
    soft = False
    for pref, _, target in targets:
        if not target:
            continue
        found = by_name[target]
        soft = soft or (found.soft and not found.ips)
        secure = mx_secure and found.secure  # RFC 7672 2.2.2
        out.extend(Address(pref, ip, target, secure) for ip in found.ips)
    if not out:
        if soft:
            raise temp_dns()
        raise perm_nomx()
    return out


def eligible(
    addrs: list[Address], own_ips: Iterable[str], own_names: Iterable[str] = ()
) -> list[Address]:
    """The self-MX rule: only addresses better than our own best preference.

    An address is ours if it is one of ``own_ips`` (interfaces and 0.0.0.0) or came from
    an MX target in ``own_names`` (me, locals, localiphost). Raises the #5.4.6 failure if
    that leaves nothing.
    """
    ips = {_norm(ip) for ip in own_ips}
    names = {n.lower().rstrip(".") for n in own_names}
    mine = [a.pref for a in addrs if _norm(a.ip) in ips or a.name.lower() in names]
    if not mine:
        return addrs
    best = min(mine)
    out = [a for a in addrs if a.pref < best]
    if not out:
        raise perm_ambigmx()
    return out


def _norm(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


_SIOCGIFCONF = 0x8912


def own_addresses() -> frozenset[str]:
    """This host's interface addresses (qmail's ipme: SIOCGIFCONF) plus 0.0.0.0 and ::.

    IPv6 addresses come from /proc/net/if_inet6 where it exists.
    """
    out = {"0.0.0.0", "::"}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            size = 40  # struct ifreq on 64-bit Linux
            buf = array.array("B", bytes(size * 256))
            addr, _ = buf.buffer_info()
            req = struct.pack("iL", len(buf), addr)
            res = fcntl.ioctl(s.fileno(), _SIOCGIFCONF, req)
            length = struct.unpack("iL", res)[0]
            raw = buf.tobytes()[:length]
            for i in range(0, length, size):
                rec = raw[i : i + size]
                if struct.unpack_from("H", rec, 16)[0] == socket.AF_INET:
                    out.add(socket.inet_ntoa(rec[20:24]))
    except OSError:
        out.add("127.0.0.1")
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                out.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(out)
