"""MTA-STS (RFC 8461) without I/O: the TXT record, the policy file, MX patterns, the cache
record, and what a policy does to the list of addresses (docs/remote.md, "MTA-STS").

- ``_mta-sts.DOMAIN`` TXT (section 3.1): of the records, those starting ``v=STSv1`` count;
  exactly one must remain and parse (``v=STSv1; id=1*32(ALPHA / DIGIT)``), or the domain
  has no policy available.
- The policy file (section 3.2): ``key: value`` lines ending in LF or CRLF; ``version:
  STSv1``, ``mode:`` enforce / testing / none, ``max_age:`` seconds (capped at one year,
  31557600), ``mx:`` patterns (one a line, ``*.`` only as the whole left-most label).
  Unknown keys are ignored; of a repeated key other than ``mx`` the first one counts. A
  policy in enforce or testing mode without an ``mx`` line is invalid (it could match
  nothing).
- MX matching (section 4.1): case-insensitive, trailing dot ignored; ``*.example.net``
  matches ``mx1.example.net`` only (one label, never ``example.net`` or ``a.b.example.net``).

A :class:`Cached` record (the policy's text, the TXT id it came with, when it was fetched
and when it expires) is what remote/mtastscache.py keeps on disk; :func:`Cached.load`
re-parses the text, so a damaged cache file is no policy, never a wrong one.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

MAX_AGE_CAP = 31557600  # section 3.2: at most one year
MAX_POLICY_BYTES = 64 * 1024  # section 3.3: senders may cap the body; 64 KB as Postfix's
POLICY_PATH = "/.well-known/mta-sts.txt"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class PolicyError(ValueError):
    """A policy file or TXT record that does not parse."""


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the TXT records of ``_mta-sts.DOMAIN`` (each record's strings
    already joined); None if no single valid ``v=STSv1`` record is there."""
    sts = [r for r in records if r.startswith("v=STSv1")]
    if len(sts) != 1:
        return None
    fields = [f.strip(" \t") for f in sts[0].split(";")]
    if fields[0] != "v=STSv1":
        return None
    if fields[-1] == "":
        fields.pop()  # an optional final ';'
    ident: str | None = None
    for f in fields[1:]:
        key, eq, value = f.partition("=")
        if not eq:
            return None
        if key == "id":
            if ident is None:
                if not _ID.fullmatch(value):
                    return None
                ident = value
        elif not (_EXT_KEY.fullmatch(key) and _EXT_VALUE.fullmatch(value)):
            return None
    return ident


def normalize_host(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _valid_pattern(p: str) -> bool:
    labels = p[2:].split(".") if p.startswith("*.") else p.split(".")
    return len(labels) >= 1 and all(_LABEL.fullmatch(x) for x in labels)


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode
    max_age: int
    mx: tuple[str, ...]

    def matches(self, host: str) -> bool:
        """Whether the MX host name ``host`` is allowed (section 4.1)."""
        host = normalize_host(host)
        for p in self.mx:
            if p.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == p[2:]:
                    return True
            elif host == p:
                return True
        return False


def parse_policy(body: bytes) -> Policy:
    """The policy file's body (section 3.2); raises :class:`PolicyError`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError("the policy is not UTF-8") from e
    seen: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"not a 'key: value' line: {line[:60]!r}")
        key, value = key.strip(), value.strip(" \t")
        if key == "mx":
            p = normalize_host(value)
            if not _valid_pattern(p):
                raise PolicyError(f"bad mx pattern: {value[:60]!r}")
            mx.append(p)
        else:
            seen.setdefault(key, value)
    if seen.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    try:
        mode = Mode(seen.get("mode", ""))
    except ValueError:
        raise PolicyError(f"bad mode: {seen.get('mode', '')[:20]!r}") from None
    age = seen.get("max_age", "")
    if not age.isascii() or not age.isdigit() or len(age) > 10:
        raise PolicyError(f"bad max_age: {age[:20]!r}")
    if mode is not Mode.NONE and not mx:
        raise PolicyError(f"a {mode.value} policy without mx lines")
    return Policy(mode, min(int(age), MAX_AGE_CAP), tuple(dict.fromkeys(mx)))


@dataclass(frozen=True, slots=True)
class Cached:
    """A fetched policy as the cache keeps it; times are seconds since the epoch."""

    domain: str
    id: str
    text: bytes
    policy: Policy
    fetched: float
    expires: float

    @classmethod
    def make(cls, domain: str, ident: str, text: bytes, now: float) -> Cached:
        policy = parse_policy(text)
        return cls(domain, ident, text, policy, now, now + policy.max_age)

    def dump(self) -> bytes:
        return json.dumps({
            "domain": self.domain, "id": self.id, "fetched": self.fetched,
            "expires": self.expires, "policy": self.text.decode("utf-8"),
        }).encode() + b"\n"  # fmt: skip

    @classmethod
    def load(cls, data: bytes) -> Cached:
        """Raises ValueError (PolicyError included) for anything but a valid record."""
        try:
            d = json.loads(data)
            text = d["policy"].encode("utf-8")
            rec = cls(str(d["domain"]), str(d["id"]), text, parse_policy(text),
                      float(d["fetched"]), float(d["expires"]))  # fmt: skip
        except (KeyError, TypeError, AttributeError, UnicodeError) as e:
            raise ValueError(f"bad cache record: {e}") from e
        return rec

    def valid(self, now: float) -> bool:
        return now < self.expires


def media_type_ok(content_type: str | None) -> bool:
    """Section 3.3: the policy is served as ``text/plain`` (parameters allowed)."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/plain"


# -- applying a policy (remote/deliver.py) ------------------------------------------------

log = logging.getLogger("pyqmail.remote")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_A = TypeVar("_A", bound=_Named)


@dataclass(frozen=True, slots=True)
class Plan(Generic[_A]):
    """What a policy makes of one delivery: its mode (NONE: no policy, deliver as ever),
    the addresses to try, the name the #4.7.5 texts give, and a refusal text when no
    MX is left (enforce mode)."""

    mode: Mode
    addrs: list[_A]
    label: str
    refused: bytes | None = None


def plan(cached: Cached | None, domain: str, addrs: list[_A], listed: bool) -> Plan[_A]:
    """Apply ``cached`` (the policy in force, or None) to the MX addresses of ``domain``
    (section 5.1): enforce keeps only the addresses of matching MX hosts; testing keeps
    them all and logs the others. ``listed``: control/tlsdestinations requires TLS for
    the domain anyway, so the texts name the domain as they always did."""
    if cached is None or cached.policy.mode is Mode.NONE:
        return Plan(Mode.NONE, addrs, domain)
    policy = cached.policy
    label = domain if listed else tls_label(domain)
    allowed = [a for a in addrs if policy.matches(a.name)]
    if len(allowed) < len(addrs):
        others = " ".join(sorted({a.name for a in addrs} - {a.name for a in allowed}))
        anyway = "" if policy.mode is Mode.ENFORCE else "; delivering anyway"
        log.warning("MTA-STS (%s) %s: MX %s not in the policy%s", policy.mode.value, domain,
                    others, anyway)  # fmt: skip
    if policy.mode is Mode.TESTING:
        return Plan(Mode.TESTING, addrs, label)
    return Plan(Mode.ENFORCE, allowed, label, None if allowed else no_mx_text(domain))


def tls_label(domain: str) -> str:
    """What the #4.7.5 texts say TLS is required for under a policy."""
    return f"{domain} by its MTA-STS policy"


def tls_failed(report: bytes, label: str) -> bool:
    """Whether a message report is the TLS failure (no STARTTLS, refused, handshake or
    certificate) of a session that required TLS for ``label``: the first line is ours,
    the server's text can only follow it."""
    first = report.split(b"\n", 1)[0]
    return first.endswith(b"; TLS is required for " + label.encode("utf-8", "replace")
                          + b". (#4.7.5)")  # fmt: skip


def no_mx_text(domain: str) -> bytes:
    return (f"Sorry, no mail exchanger of {domain} matches its MTA-STS policy. (#4.7.5)\n").encode(
        "utf-8", "replace"
    )
