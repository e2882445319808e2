"""``control/destinationlimits``: per-destination concurrency and message rate (pure).

A pyqmail addition (docs/control.md). One line per destination::

    gmail.com:5:100          at most 5 deliveries at once, 100 started per minute
    .example.net:2:          the subdomains of example.net: 2 at once, no rate limit
    yahoo.com::60            no concurrency limit, 60 per minute
    *:10:                    every other destination: 10 at once each
    slow.example:0:          0 in either field holds the destination (nothing is sent)

Keys are recipient domains, matched as smtproutes' are: the domain itself, then each
``.suffix`` longest first, then the default (``*`` or the empty key, as smtproutes'
``:relay``). ASCII case-insensitive; when a key appears twice the last line wins (qmail's
constmap). An empty field is "no limit"; a missing third field is an empty one.

A *destination* is what the counters are kept for: an explicit line (exact or
``.suffix``) is ONE destination, shared by every domain it matches; the default line
gives each domain its own counters. A domain no line matches is its own destination with
no limits (the scheduler still backs it off after rate-limit replies, send/limits.py).

The limits are keyed by recipient domain, because the scheduler decides before the MX
lookup: keys naming an MX host are not supported (they would only ever match a domain of
that name).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pyqmail.control import domain_keys

DEFAULT_KEYS = ("*", "")


@dataclass(frozen=True, slots=True)
class Limit:
    """The limits for one destination. ``None``: no limit; 0 holds the destination."""

    key: str  # the counters' name: the matched key, or the domain under the default line
    concurrency: int | None = None
    rate: int | None = None  # deliveries started per minute
    line: int = 0  # the control file's line; 0 when no line applies
    pattern: str = ""  # the key as the line wrote it (``*`` for the default line)

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or self.rate is not None

    @property
    def held(self) -> bool:
        return self.concurrency == 0 or self.rate == 0

    def describe(self) -> str:
        """``at most 5 at once, 100 per minute`` (for explain and the log)."""
        if self.held:
            return "on hold (a limit of 0): nothing is sent"
        parts = []
        if self.concurrency is not None:
            parts.append(f"at most {self.concurrency} deliveries at once")
        if self.rate is not None:
            parts.append(f"at most {self.rate} started per minute")
        return ", ".join(parts) if parts else "no limit"


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line the parser ignored: its number, the line, and why."""

    line: int
    text: str
    reason: str


@dataclass(frozen=True)
class DestinationLimits:
    """The parsed file. :meth:`lookup` gives a domain's :class:`Limit`."""

    table: Mapping[str, tuple[int | None, int | None, int]] = field(
        default_factory=lambda: MappingProxyType({})
    )  # key -> (concurrency, rate, line)
    default: tuple[int | None, int | None, int] | None = None
    bad: tuple[BadLine, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.table) or self.default is not None

    def lookup(self, domain: str) -> Limit:
        domain = domain.lower()
        if self.table:
            for key in domain_keys(domain):
                hit = self.table.get(key)
                if hit is not None:
                    return Limit(key, *hit, pattern=key)
        if self.default is not None:
            return Limit(domain, *self.default, pattern="*")
        return Limit(domain)


def _number(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{text!r} is not a number")
    return int(text)


def parse(lines: tuple[tuple[str, int], ...]) -> DestinationLimits:
    """From the list reader's (line, number) pairs (control.parse_list)."""
    table: dict[str, tuple[int | None, int | None, int]] = {}
    default: tuple[int | None, int | None, int] | None = None
    bad: list[BadLine] = []
    for text, n in lines:
        parts = text.split(":")
        if len(parts) < 2 or len(parts) > 3:
            bad.append(BadLine(n, text, "write domain:concurrency:messages-per-minute"))
            continue
        key = parts[0].strip().lower()
        try:
            conc = _number(parts[1])
            rate = _number(parts[2]) if len(parts) == 3 else None
        except ValueError as e:
            bad.append(BadLine(n, text, f"{e}; the line is ignored"))
            continue
        if key in DEFAULT_KEYS:
            default = (conc, rate, n)
        else:
            table[key] = (conc, rate, n)
    return DestinationLimits(MappingProxyType(table), default, tuple(bad))
