"""control/smtproutes: which relay (and port) carries mail for a domain (control.md).

Lookup order is qmail's: the host itself, then each ``.suffix`` longest first, then the
empty key (the default route ``:relay``). The first key present wins (for a key given twice
the last line wins: :func:`pyqmail.control.colon_map`). A present key with an empty relay
(``domain:``) means "no route: use MX" and stops the search. A relay is a host name (its
address records are used, never its MX), a dotted quad, or ``[ip]``; ``:port`` after it
selects the port (default 25). IPv6 relays are written in brackets: ``[::1]:2525``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pyqmail.control import domain_keys

SMTP_PORT = 25


@dataclass(frozen=True, slots=True)
class Route:
    """A relay from smtproutes: a host name or an IP literal (without brackets), a port."""

    relay: str
    port: int = SMTP_PORT
    literal: bool = False  # relay is an IP address, not a name


class RouteError(ValueError):
    """An smtproutes line qmail would misread (a port that is not a number)."""


def parse_relay(value: str) -> Route | None:
    """``relay``, ``relay:port``, ``[ip]``, ``[ip]:port`` -> Route; empty -> None (use MX)."""
    if not value:
        return None
    port_text = ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise RouteError(f"unterminated [ in relay {value!r}")
        relay, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise RouteError(f"text after ] in relay {value!r}")
            port_text = rest[1:]
        literal = True
    else:
        relay, _, port_text = value.partition(":")
        literal = _is_ipv4(relay)
    port = SMTP_PORT
    if port_text:
        # qmail scans a decimal number (scan_ulong); text after it is ignored.
        digits = ""
        for ch in port_text:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            raise RouteError(f"port {port_text!r} is not a number")
        port = int(digits)
    if not relay:
        return None
    return Route(relay, port, literal)


def lookup(routes: Mapping[str, str], host: str) -> Route | None:
    """The route for ``host`` (the recipient domain), or None for DNS (MX) delivery."""
    for key in [*domain_keys(host), ""]:
        if key in routes:
            return parse_relay(routes[key])
    return None


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts)
