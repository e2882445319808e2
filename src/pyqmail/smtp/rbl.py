"""DNS block lists at connect: rblsmtpd's decision, made before the SMTP greeting.

What rblsmtpd (ucspi-tcp 0.88, tcprules.md section 5) decides, with its lists in
``control/rbllist`` instead of ``-r`` arguments:

* ``$RBLSMTPD`` (from tcprules, or tcpserver's environment) comes first: set and empty, the
  client is not looked up; ``-text``, a permanent refusal (553) with that text; any other
  text, a temporary refusal (451) with it. ``$RELAYCLIENT`` set: not looked up either
  (a relay client is one of ours).
* Each line of ``control/rbllist`` is a zone. ``zone`` alone: a TXT record at
  ``d.c.b.a.zone`` lists client ``a.b.c.d``, and its text is the reply (``-r base``);
  ``zone:text``: an address record lists it and ``text`` is the reply, ``%IP%`` replaced
  by the client's address (``-r base:text``). IPv6 clients are looked up by their 32
  reversed nibbles (as ucspi-tcp6 does). The first list (in file order) that lists the
  client decides. A listing is a temporary refusal, as rblsmtpd's without ``-b``.
  An address answer outside 127.0.0.0/8, or in 127.255.255.0/24 (the lists' "you may not
  query" codes), does not list anyone.
* A lookup that fails or times out lets the client through (rblsmtpd without ``-c``) and
  logs a line. All lists are asked at once and the whole check is bounded by ``timeout``
  seconds, so a slow or hostile DNS server delays only the client it is asked about.

The refusal itself is the conversation rblsmtpd holds (protocol.py: ``block``): greeting
``220 rblsmtpd.local``, ``250 rblsmtpd.local`` to HELO, EHLO, MAIL, RSET and NOOP, ``221`` to
QUIT, and the refusal (``451 text`` or ``553 text``, the text cut to 200 characters and
every byte outside 32..126 made ``?``) to every other command, RCPT and DATA included, so
the client's queue keeps or bounces the mail with the list's text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

log = logging.getLogger("pyqmail.smtpd")

TIMEOUT = 10.0  # seconds for all the lists together


@dataclass(frozen=True, slots=True)
class Block:
    """A refusal: its text, and whether it is permanent (553) or temporary (451)."""

    text: str
    permanent: bool = False

    def reply(self) -> bytes:
        """rblsmtpd's reply line (section ``rblsmtpd()`` of rblsmtpd.c)."""
        line = ("553 " if self.permanent else "451 ") + self.text[:200]
        return "".join(c if 32 <= ord(c) <= 126 else "?" for c in line).encode() + b"\r\n"


def from_env(env: Mapping[str, str]) -> Block | bool:
    """What the environment decides: a Block ($RBLSMTPD text), False (no lookup: $RBLSMTPD
    empty, or a relay client), True (look the client up)."""
    preset = env.get("RBLSMTPD")
    if preset is not None:
        if not preset:
            return False
        if preset.startswith("-"):
            return Block(preset[1:], permanent=True)
        return Block(preset)
    return "RELAYCLIENT" not in env


def query_name(ip: str, zone: str) -> str | None:
    """``d.c.b.a.zone`` (IPv4) or the nibbles of an IPv6 address; None if ``ip`` is no IP."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.version == 4:
        labels = reversed(str(addr).split("."))
    else:
        labels = reversed(addr.exploded.replace(":", ""))
    return ".".join([*labels, zone]) + "."


def _listed_address(text: str) -> bool:
    try:
        a = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return a in _LOOPBACK_NET and a not in _ERROR_NET


_LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")


async def _one(
    res: dns.asyncresolver.Resolver, ip: str, zone: str, text: str | None
) -> Block | None:
    name = query_name(ip, zone)
    if name is None:
        return None
    try:
        answer = await res.resolve(name, "TXT" if text is None else "A", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.DNSException as e:
        log.warning("rbl: %s: lookup of %s failed (%s); not refused", ip, name, type(e).__name__)
        return None
    if text is None:
        for rr in answer:
            strings = getattr(rr, "strings", ())
            return Block(b"".join(strings).decode("utf-8", "replace"))
        return None
    if any(_listed_address(rr.to_text()) for rr in answer):
        return Block(text.replace("%IP%", ip))
    return None


async def lookup(
    res: dns.asyncresolver.Resolver,
    ip: str,
    zones: Sequence[tuple[str, str | None]],
    *,
    timeout: float = TIMEOUT,
) -> Block | None:
    """The first list (in ``zones`` order) that lists ``ip``, as a Block; None if none does
    (or the lists did not answer within ``timeout``)."""
    if not zones:
        return None
    tasks = [asyncio.ensure_future(_one(res, ip, zone, text)) for zone, text in zones]
    try:
        async with asyncio.timeout(timeout):
            for task in tasks:  # in file order: the first list that lists the client decides
                block = await task
                if block is not None:
                    return block
    except TimeoutError:
        log.warning("rbl: %s: the block lists gave no answer in %.0f s; not refused", ip, timeout)
    finally:
        for task in tasks:
            task.cancel()
    return None
