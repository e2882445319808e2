"""The Sender Rewriting Scheme (SRS), as Shevek's Mail::SRS and libsrs2 (postsrsd) write it.

A forward that sends a foreign sender's mail on to a foreign address would fail the next
hop's SPF check of the sender's domain; SRS replaces the envelope sender with an address
of ours that encodes the original one and is signed, so that a bounce comes back to us,
is checked and goes on to the original sender (docs/srs.md).

Formats (the "Guarded" scheme; ``=`` is the separator after the tag here, ``-``/``+``
are accepted there too):

    SRS0=HHHH=TT=domain=local@srsdomain          (we are the first forwarder)
    SRS1=HHHH=firsthop.example==HHHH=TT=...@srsdomain   (the sender already was SRS0/SRS1)

``HHHH``: base64 of HMAC-SHA1(secret, the fields concatenated and ASCII-lower-cased), its
first 4 characters; ``TT``: the day number modulo 1024 in the base-32 alphabet
``A-Z2-7``. A hash is accepted case-insensitively (some MTAs fold the local part), with
at least 4 characters, against each secret in turn (old secrets still reverse); a
timestamp is accepted for ``maxage`` days (21).

This module owns the scheme and control/srs's format (the secret on line 1, the SRS
domain on line 2, older secrets on further lines); who may read the secret and where the
rewriting and the reversal happen is decided by local/ and daemon/. Pure: the time is a
parameter, the HMAC comes from the standard library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

FILE = "srs"  # control/srs
MAXAGE = 21  # days a SRS0 address may be reversed
HASHLENGTH = 4  # base64 characters written; also the fewest accepted
MIN_SECRET = 16  # characters `pyqmail check` asks of a secret

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_BASE32_VALUE = {c: i for i, c in enumerate(_BASE32)}
_SLOTS = len(_BASE32) ** 2  # two characters: 1024 days
_DAY = 86400
_TAG = re.compile(r"SRS([01])[-+=]", re.IGNORECASE)


class Failure(Enum):
    """Why an SRS address does not reverse."""

    MALFORMED = "malformed"
    FORGED = "forged"  # the hash does not match
    EXPIRED = "expired"  # the timestamp is too old (or from the future)


class SrsError(Exception):
    """An address that does not reverse; ``failure`` says why."""

    def __init__(self, failure: Failure, address: str) -> None:
        super().__init__(f"{failure.value} SRS address: {address}")
        self.failure = failure


class ConfigError(Exception):
    """control/srs is present but does not hold a secret and a domain."""


def is_srs(local: str) -> bool:
    """Does the local part have an SRS0/SRS1 tag and separator (case-insensitive)?"""
    return _TAG.match(local) is not None


def _lower(s: str) -> bytes:
    """Mail::SRS's ``lc``: ASCII letters only, on the UTF-8 bytes."""
    return s.encode("utf-8", "surrogateescape").lower()


def _hash(secret: bytes, parts: Iterable[str], length: int) -> str:
    mac = hmac.new(secret, b"".join(_lower(p) for p in parts), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")[:length]


def timestamp(now: float) -> str:
    """Today's two-character timestamp."""
    day = int(now // _DAY)
    return _BASE32[(day >> 5) & 31] + _BASE32[day & 31]


def timestamp_ok(ts: str, now: float, maxage: int = MAXAGE) -> bool:
    """Was ``ts`` written at most ``maxage`` days ago (modulo 1024 days, as libsrs2)?"""
    if len(ts) != 2:
        return False
    try:
        then = _BASE32_VALUE[ts[0].upper()] * 32 + _BASE32_VALUE[ts[1].upper()]
    except KeyError:
        return False
    today = int(now // _DAY) % _SLOTS
    age = (today - then) % _SLOTS
    return age <= maxage


@dataclass(frozen=True)
class Srs:
    """A configured SRS: ``secrets[0]`` signs, each of them verifies."""

    secrets: tuple[bytes, ...]
    domain: str
    maxage: int = MAXAGE
    hashlength: int = HASHLENGTH

    def __post_init__(self) -> None:
        if not self.secrets or not all(self.secrets):
            raise ConfigError("no secret")
        if not self.domain:
            raise ConfigError("no domain")

    # --- forward ----------------------------------------------------------------------

    def forward(self, sender: str, now: float | None = None) -> str:
        """The SRS address for ``sender`` (``local@domain``) at our domain: SRS0, or SRS1
        when the sender already is an SRS0/SRS1 address of another host. A sender without
        ``@`` or at our own SRS domain is returned as it is."""
        at = sender.rfind("@")
        if at <= 0 or at == len(sender) - 1:
            return sender
        user, host = sender[:at], sender[at + 1 :]
        if host.lower() == self.domain.lower():
            return sender
        local = self._compile(host, user, time.time() if now is None else now)
        return f"{local}@{self.domain}"

    def _compile(self, host: str, user: str, now: float) -> str:
        m = _TAG.match(user)
        secret = self.secrets[0]
        if m is not None and m.group(1) == "1":
            # SRS1 from hop n: keep its first hop and opaque part, sign them ourselves
            fields = user[m.end() :].split("=", 2)
            if len(fields) == 3 and fields[1] and fields[2]:
                _old, first, opaque = fields
                h = _hash(secret, (first, opaque), self.hashlength)
                return f"SRS1={h}={first}={opaque}"
        elif m is not None:
            # SRS0 of the first hop: keep it whole but for the tag (its separator stays)
            opaque = user[4:]
            h = _hash(secret, (host, opaque), self.hashlength)
            return f"SRS1={h}={host}={opaque}"
        ts = timestamp(now)
        h = _hash(secret, (ts, host, user), self.hashlength)
        return f"SRS0={h}={ts}={host}={user}"

    # --- reverse ----------------------------------------------------------------------

    def reverse(self, local: str, now: float | None = None) -> str:
        """The address an SRS local part of ours stands for (SRS0: the original sender;
        SRS1: the first hop's SRS0 address). Raises :class:`SrsError`."""
        m = _TAG.match(local)
        if m is None:
            raise SrsError(Failure.MALFORMED, local)
        rest = local[m.end() :]
        if m.group(1) == "1":
            fields = rest.split("=", 2)
            if len(fields) != 3 or not all(fields) or len(fields[2]) < 2:
                raise SrsError(Failure.MALFORMED, local)
            h, first, opaque = fields
            if "@" in first:
                raise SrsError(Failure.MALFORMED, local)
            self._verify(h, (first, opaque), local)
            return f"SRS0{opaque}@{first}"
        fields = rest.split("=", 3)
        if len(fields) != 4 or not all(fields):
            raise SrsError(Failure.MALFORMED, local)
        h, ts, host, user = fields
        if "@" in host:
            raise SrsError(Failure.MALFORMED, local)
        self._verify(h, (ts, host, user), local)
        if not timestamp_ok(ts, time.time() if now is None else now, self.maxage):
            raise SrsError(Failure.EXPIRED, local)
        return f"{user}@{host}"

    def _verify(self, h: str, parts: tuple[str, ...], local: str) -> None:
        if len(h) < self.hashlength or not h.isascii():
            raise SrsError(Failure.FORGED, local)
        given = h.encode("ascii")
        folded = h.lower().encode("ascii")
        for secret in self.secrets:
            want = _hash(secret, parts, len(h)).encode("ascii")
            # exact first; then as a folded local part would carry it (libsrs2, Mail::SRS)
            if hmac.compare_digest(given, want) or hmac.compare_digest(folded, want.lower()):
                return
        raise SrsError(Failure.FORGED, local)


# --- control/srs ---------------------------------------------------------------------------


def _lines(raw: bytes) -> list[str]:
    return [ln.rstrip(b" \t\r").decode("utf-8", "surrogateescape") for ln in raw.split(b"\n")]


def parse(raw: bytes) -> Srs:
    """control/srs's bytes: the secret, the domain, then any older secrets. ConfigError
    when the secret or the domain is missing."""
    lines = _lines(raw)
    secret = lines[0] if lines else ""
    domain = lines[1].strip().lower() if len(lines) > 1 else ""
    if not secret:
        raise ConfigError("control/srs: the first line (the secret) is empty")
    if not domain:
        raise ConfigError("control/srs: the second line (the SRS domain) is missing")
    old = [ln for ln in lines[2:] if ln]
    return Srs(tuple(s.encode("utf-8", "surrogateescape") for s in (secret, *old)), domain)


def read(control_dir: Path) -> bytes | None:
    """control/srs's bytes, None if it does not exist (SRS is off). OSError otherwise."""
    try:
        return (control_dir / FILE).read_bytes()
    except FileNotFoundError:
        return None


def load(control_dir: Path) -> Srs | None:
    """The configured SRS, None if control/srs does not exist. OSError or ConfigError."""
    raw = read(control_dir)
    return None if raw is None else parse(raw)


def problems(raw: bytes) -> list[tuple[int, str]]:
    """What ``pyqmail check`` says of control/srs's bytes: (line, message) pairs."""
    lines = _lines(raw)
    out: list[tuple[int, str]] = []
    secret = lines[0] if lines else ""
    if not secret:
        out.append((1, "no secret on the first line"))
    elif len(secret) < MIN_SECRET:
        out.append((1, f"the secret is shorter than {MIN_SECRET} characters"))
    domain = lines[1].strip() if len(lines) > 1 else ""
    if not domain:
        out.append((2, "no SRS domain on the second line"))
    elif "@" in domain or "=" in domain or " " in domain or "." not in domain:
        out.append((2, f"{domain!r} is not a domain name"))
    return out


# --- who is foreign --------------------------------------------------------------------


def ours(domain: str, locals_: frozenset[str], virtualdomains: Mapping[str, str]) -> bool:
    """Is ``domain`` one we deliver (locals, or virtualdomains by domain or ``.suffix``)?
    Those are the domains whose SPF names us; any other sender is foreign."""
    d = domain.lower()
    if d in locals_:
        return True
    if d in virtualdomains:
        return True
    i = d.find(".")
    while i != -1:
        if d[i:] in virtualdomains:
            return True
        i = d.find(".", i + 1)
    return False


def _domain(address: str) -> str | None:
    at = address.rfind("@")
    return address[at + 1 :] if at >= 0 else None


def needs_rewrite(
    sender: str,
    recipients: Iterable[str],
    locals_: frozenset[str],
    virtualdomains: Mapping[str, str],
) -> bool:
    """Should a forward from ``sender`` to ``recipients`` carry an SRS sender? Yes when
    the sender is foreign (not the null sender ``<>`` nor qmail's ``#@[]``) and at least
    one recipient is foreign too (mail that stays here needs no SPF pass)."""
    if not sender or sender == "#@[]":
        return False
    host = _domain(sender)
    if not host or ours(host, locals_, virtualdomains):
        return False
    for r in recipients:
        d = _domain(r)
        if d and not ours(d, locals_, virtualdomains):
            return True
    return False
