"""Every file in control/, read with qmail's rules into one immutable snapshot.

qmail has three readers (control.md section 1): *line* files use only the first line with
trailing spaces, tabs and newlines removed (an empty file is the empty string); *int*
files are a line parsed as an unsigned decimal from the first character (a first
character that is not a digit makes the file count as absent); *list* files keep every
line that is not empty and does not start with ``#``. A missing file is its default,
often the value of ``me``. A file that exists but cannot be read is a temporary failure
(:class:`ControlError`), never an empty value.

Where qmail silently ignores a bad value (``abc`` in concurrencyremote) we keep qmail's
behaviour but record a :class:`Finding`, so the log and ``pyqmail check`` name it.

:class:`ControlCache` re-reads the snapshot only when a file in control/ changed, so a
per-connection or per-delivery read costs one ``stat`` per file.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pyqmail import cdb
from pyqmail.home import Home

# Upper bound for concurrencylocal/concurrencyremote (qmail's conf-spawn, 120 and at most
# 255 by recompiling). A value in control/spawnlimit replaces it; no compile-time cap.
DEFAULT_SPAWN_LIMIT = 1000


class ControlError(Exception):
    """A control file exists but could not be read: a temporary failure, as in qmail."""

    def __init__(self, name: str, err: OSError) -> None:
        super().__init__(f"unable to read control/{name}: {err.strerror or err}")
        self.name = name
        self.err = err


@dataclass(frozen=True, slots=True)
class Finding:
    """A problem in a control file that qmail would silently ignore."""

    file: str
    line: int
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"control/{self.file}:{self.line}: {self.message}"
        return f"{text} ({self.fix})" if self.fix else text


def _read_bytes(path: Path, name: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        raise ControlError(name, e) from e


def read_file(home: Home, name: str) -> bytes | None:
    """The bytes of control/NAME; None if it is missing; ControlError if unreadable."""
    return _read_bytes(home.control / name, name)


def _strip(line: bytes) -> bytes:
    return line.rstrip(b" \t\n")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_line(raw: bytes) -> str:
    """qmail's line reader on a file's bytes: the first line, trailing white space gone."""
    return _decode(_strip(raw.split(b"\n", 1)[0]))


def qmail_int(value: int) -> int:
    """What qmail makes of a decimal number: an unsigned long (64-bit) stored in an int
    (32-bit); a negative result counts as 0 (as qmail-showctl shows it)."""
    v = value % (1 << 64) % (1 << 32)
    return v if v < (1 << 31) else 0


def parse_int(raw: bytes) -> tuple[int | None, str | None]:
    """qmail's int reader. Returns (value or None for 'treat as absent', problem text)."""
    line = parse_line(raw)
    digits = ""
    for ch in line:
        if "0" <= ch <= "9":
            digits += ch
        else:
            break
    if not digits:
        return None, f"{line!r} is not a number; qmail ignores it and uses the default"
    value = qmail_int(int(digits))
    if value != int(digits):
        return value, f"{digits} is too large for qmail's int; qmail uses {value}"
    if len(digits) != len(line):
        return value, f"{line!r} has text after the number; qmail uses {value}"
    return value, None


def parse_list(raw: bytes) -> tuple[tuple[str, int], ...]:
    """qmail's list reader: (line, line number) for every non-empty, non-comment line.

    qmail keeps the lines NUL-separated in memory, so a NUL inside a line splits it into
    several entries (empty ones included), and a line starting with NUL counts as empty.
    """
    out: list[tuple[str, int]] = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        line = _strip(line)
        if line and line[:1] not in (b"#", b"\0"):
            out.extend((_decode(piece), n) for piece in line.split(b"\0"))
    return tuple(out)


def morercpthosts_keys(raw: bytes) -> list[bytes]:
    """qmail-newmrh's keys: every list line, ASCII-lowercased, duplicates kept, in order."""
    out = []
    for line in raw.split(b"\n"):
        line = _strip(line)
        if line and not line.startswith(b"#"):
            out.append(line.lower())
    return out


class NewmrhError(Exception):
    """Why qmail-newmrh stopped: ``what`` it was doing, in its words, and the ``cause``
    (an OSError or a CdbError)."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(f"{what}: {cause}")
        self.what = what
        self.cause = cause


def newmrh(home: Home) -> None:
    """qmail-newmrh: control/morercpthosts -> morercpthosts.cdb, written to
    morercpthosts.tmp, fsynced and renamed (the old cdb or the new one, never a part).
    Raises NewmrhError; the old cdb is then untouched."""
    src = home.control / "morercpthosts"
    tmp = home.control / "morercpthosts.tmp"
    dst = home.control / "morercpthosts.cdb"
    try:
        raw = src.read_bytes()
    except OSError as e:
        raise NewmrhError("unable to read control/morercpthosts", e) from e
    try:
        writer = cdb.Writer(dst, tmp)
    except OSError as e:
        raise NewmrhError("unable to create control/morercpthosts.tmp", e) from e
    try:
        with writer:
            for key in morercpthosts_keys(raw):
                writer.add(key, b"")
    except OSError as e:
        if e.filename2 is not None:
            what = "unable to move control/morercpthosts.tmp to control/morercpthosts.cdb"
            raise NewmrhError(what, e) from e
        raise NewmrhError("unable to write control/morercpthosts.tmp", e) from e
    except cdb.CdbError as e:
        raise NewmrhError("unable to write control/morercpthosts.tmp", e) from e


def colon_map(lines: tuple[tuple[str, int], ...]) -> dict[str, str]:
    """A ``key:value`` list file as qmail's constmap: key lowercased, last line wins."""
    out: dict[str, str] = {}
    for line, _ in lines:
        if ":" in line:
            key, value = line.split(":", 1)
            out[key.lower()] = value
    return out


def domain_keys(domain: str) -> list[str]:
    """The lookup keys for a domain: itself, then each ``.suffix``, longest first."""
    domain = domain.lower()
    keys = [domain]
    i = domain.find(".")
    while i != -1:
        keys.append(domain[i:])
        i = domain.find(".", i + 1)
    return keys


def virtual_lookup(virtualdomains: Mapping[str, str], address: str) -> str | None:
    """The virtualdomains value for ``address`` by qmail's key order (the whole address,
    the domain, each ``.suffix`` longest first, the empty key); None if no key matches.
    ``""`` is an exception (the address stays remote). Shared with send/todo.py's routing."""
    if not virtualdomains:
        return None
    at = address.rfind("@")
    domain = address[at + 1 :] if at >= 0 else ""
    keys = [address.lower(), *domain_keys(domain), ""] if domain else [address.lower(), ""]
    for key in keys:
        if key in virtualdomains:
            return virtualdomains[key]
    return None


def host_listed(domain: str, hosts: frozenset[str]) -> bool:
    """rcpthosts matching: exact domain, or a ``.suffix`` line for a subdomain."""
    return any(k in hosts for k in domain_keys(domain))


@dataclass(frozen=True)
class Control:
    """The effective value of every control file. Build with :func:`load`."""

    me: str | None
    badmailfrom: frozenset[str]
    bouncefrom: str
    bouncehost: str
    concurrencylocal: int
    concurrencyremote: int
    databytes: int
    defaultdomain: str
    defaulthost: str
    doublebouncehost: str
    doublebounceto: str
    envnoathost: str
    helohost: str | None
    idhost: str
    localiphost: str | None
    locals: frozenset[str]
    morercpthosts: tuple[str, ...]
    percenthack: frozenset[str]
    plusdomain: str
    qmqpservers: tuple[str, ...]
    queuelifetime: int
    rcpthosts: frozenset[str] | None  # None: the file is missing (qmail relays for anyone)
    smtpgreeting: str | None
    smtproutes: Mapping[str, str]
    timeoutconnect: int
    timeoutremote: int
    timeoutsmtpd: int
    virtualdomains: Mapping[str, str]
    defaultdelivery: str
    # pyqmail additions (documented in docs/control.md)
    spawnlimit: int
    qmtproutes: Mapping[str, str]
    tlsdestinations: frozenset[str]
    rcptchecks: int  # 0: no recipient check against local delivery at RCPT (docs/rcptcheck.md)
    # where each value came from: "file", "default", or "me"; and what looked wrong
    sources: Mapping[str, str] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()
    raw_lists: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    # the front door (docs/control.md): block lists, greylisting, connection limits
    rbllist: tuple[tuple[str, str | None], ...] = ()  # (zone, reply text; None: the TXT)
    greylist: int = 0  # seconds a new triplet waits; 0: greylisting is off
    greylistexpire: int = 35 * 86400  # a triplet unseen this long is forgotten
    concurrencyincoming: int = 0  # SMTP connections at once; 0: the listener's default
    concurrencyperip: int = 0  # per client (IPv4 address, IPv6 /64); 0: the default
    # pyqmail run's SIGTERM: seconds SMTP sessions in DATA get to finish (smtp/server.py)
    timeoutdrain: int = 30


_LINE_ME = ("bouncehost", "defaultdomain", "defaulthost", "doublebouncehost", "envnoathost",
            "idhost", "plusdomain")  # fmt: skip
_INTS = {
    "concurrencylocal": 10,
    "concurrencyremote": 20,
    "databytes": 0,
    "queuelifetime": 604800,
    "timeoutconnect": 60,
    "timeoutremote": 1200,
    "timeoutsmtpd": 1200,
    "spawnlimit": DEFAULT_SPAWN_LIMIT,
    "rcptchecks": 1,
}
# the front door's files: ints, 0 = off or the listener's default (Control's comments)
_FRONT_INTS = {"greylist": 0, "greylistexpire": 35 * 86400, "concurrencyincoming": 0,
               "concurrencyperip": 0}  # fmt: skip
_DAEMON_INTS = {"timeoutdrain": 30}
_LISTS = ("badmailfrom", "locals", "morercpthosts", "percenthack", "qmqpservers", "rcpthosts",
          "smtproutes", "virtualdomains", "qmtproutes", "tlsdestinations",
          "destinationlimits")  # fmt: skip

# Every file qmail or pyqmail reads from control/ (qmail-showctl reports the others).
KNOWN_FILES = frozenset(
    {"me", "bouncefrom", "doublebounceto", "helohost", "localiphost", "smtpgreeting",
     "defaultdelivery", "morercpthosts.cdb", "morercpthosts.tmp", "tcp.smtp", "tcp.smtp.cdb",
     "tcp.qmqp", "tcp.qmqp.cdb", "tcp.qmtp", "tcp.qmtp.cdb", "validrcptto",
     "validrcptto.cdb", "validrcptto.tmp", *_LINE_ME, *_INTS, *_LISTS, "rbllist", *_FRONT_INTS,
     *_DAEMON_INTS}
)  # fmt: skip


def load(home: Home) -> Control:
    """Read every control file of ``home``. Raises ControlError for an unreadable file."""
    cdir = home.control
    sources: dict[str, str] = {}
    findings: list[Finding] = []
    raw: dict[str, bytes | None] = {}

    def get(name: str) -> bytes | None:
        if name not in raw:
            raw[name] = _read_bytes(cdir / name, name)
        return raw[name]

    me_raw = get("me")
    me = parse_line(me_raw) if me_raw is not None else None
    sources["me"] = "file" if me is not None else "default"

    def line(name: str, default: str | None, me_fallback: bool) -> str | None:
        data = get(name)
        if data is not None:
            sources[name] = "file"
            return parse_line(data)
        if me_fallback and me is not None:
            sources[name] = "me"
            return me
        sources[name] = "default"
        return default

    values: dict[str, Any] = {}
    for name in _LINE_ME:
        values[name] = line(name, name, True)
    values["bouncefrom"] = line("bouncefrom", "MAILER-DAEMON", False)
    values["doublebounceto"] = line("doublebounceto", "postmaster", False)
    values["helohost"] = line("helohost", None, True)
    values["localiphost"] = line("localiphost", None, True)
    values["smtpgreeting"] = line("smtpgreeting", None, True)

    dd = get("defaultdelivery")
    if dd is not None:
        sources["defaultdelivery"] = "file"
        text = _decode(dd)
        values["defaultdelivery"] = text if text.endswith("\n") or not text else text + "\n"
        if not text.strip():
            values["defaultdelivery"] = "./Mailbox\n"
    else:
        sources["defaultdelivery"] = "default"
        values["defaultdelivery"] = "./Mailbox\n"

    for name, default in (_INTS | _FRONT_INTS | _DAEMON_INTS).items():
        data = get(name)
        value: int | None = None
        if data is not None:
            value, problem = parse_int(data)
            if problem:
                findings.append(Finding(name, 1, problem, f"write a decimal number into {name}"))
        sources[name] = "file" if value is not None else "default"
        values[name] = default if value is None else value
    if values["timeoutsmtpd"] <= 0:
        values["timeoutsmtpd"] = 1
    limit = max(1, values["spawnlimit"])
    values["spawnlimit"] = limit
    for name in ("concurrencylocal", "concurrencyremote"):
        if values[name] > limit:
            findings.append(
                Finding(
                    name,
                    1,
                    f"{values[name]} is over the spawn limit {limit}; using {limit}",
                    "raise control/spawnlimit to allow more",
                )
            )
            values[name] = limit

    lists: dict[str, tuple[tuple[str, int], ...]] = {}
    for name in _LISTS:
        data = get(name)
        lists[name] = parse_list(data) if data is not None else ()
        sources[name] = "file" if data is not None else "default"
        if data is not None and b"\r" in data:
            n = data[: data.index(b"\r")].count(b"\n") + 1
            findings.append(Finding(name, n, "line ends in a carriage return (CR LF file)",
                                    "convert the file to Unix line ends"))  # fmt: skip
        for entry, n in lists[name]:
            if name in ("smtproutes", "virtualdomains", "qmtproutes") and ":" not in entry:
                findings.append(Finding(name, n, f"line {entry!r} has no ':'; qmail ignores it",
                                        "write domain:value"))  # fmt: skip

    def lower_set(name: str) -> frozenset[str]:
        return frozenset(entry.lower() for entry, _ in lists[name])

    if get("locals") is not None:
        locals_ = lower_set("locals")
    else:
        locals_ = frozenset({me.lower()}) if me else frozenset()
        sources["locals"] = "me" if me else "default"

    rbl = get("rbllist")
    sources["rbllist"] = "file" if rbl is not None else "default"
    entries = (_rbl_entry(e) for e, _ in parse_list(rbl)) if rbl else ()
    values["rbllist"] = tuple(e for e in entries if e[0])

    return Control(
        me=me,
        badmailfrom=lower_set("badmailfrom"),
        locals=locals_,
        morercpthosts=tuple(e for e, _ in lists["morercpthosts"]),
        percenthack=lower_set("percenthack"),
        qmqpservers=tuple(e for e, _ in lists["qmqpservers"]),
        rcpthosts=lower_set("rcpthosts") if get("rcpthosts") is not None else None,
        smtproutes=MappingProxyType(colon_map(lists["smtproutes"])),
        virtualdomains=MappingProxyType(colon_map(lists["virtualdomains"])),
        qmtproutes=MappingProxyType(colon_map(lists["qmtproutes"])),
        tlsdestinations=lower_set("tlsdestinations"),
        sources=MappingProxyType(sources),
        findings=tuple(findings),
        raw_lists=MappingProxyType(lists),
        **values,
    )


def _rbl_entry(line: str) -> tuple[str, str | None]:
    """An rbllist line: ``zone`` (the TXT record is the reply text) or ``zone:text``
    (an address record lists the client; rblsmtpd's ``-r base:text``)."""
    zone, sep, text = line.partition(":")
    return zone.strip().strip(".").lower(), (text.strip() if sep else None)


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        return (-1, -1, -1)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ControlCache:
    """Hands out the current :class:`Control`, re-reading only after a change.

    A change is seen through the control directory's mtime (files added or removed) and
    each known file's (inode, mtime, size); editors that rewrite in place are caught by
    the per-file check.
    """

    def __init__(
        self,
        home: Home,
        loader: Callable[[Home], Control] = load,
        *,
        on_findings: Callable[[tuple[Finding, ...]], None] | None = None,
        max_age: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_findings`` is called after a (re)load whose findings differ from the last
        ones (and are not empty), so a daemon logs each problem once per change, e.g.
        ``on_findings=lambda fs: [log(f"warning: {f}") for f in fs]``.

        ``max_age`` > 0 checks the files at most once per that many seconds (a busy
        server then pays the ~40 ``stat`` calls once a second, not per message)."""
        self.home = home
        self._loader = loader
        self._on_findings = on_findings
        self._max_age = max_age
        self._clock = clock
        self._checked = -float("inf")
        self._key: tuple[object, ...] | None = None
        self._value: Control | None = None

    def refresh(self) -> None:
        """Look at the files on the next ``get`` even within ``max_age`` (SIGHUP)."""
        self._checked = -float("inf")

    def _current_key(self) -> tuple[object, ...]:
        cdir = self.home.control
        return (_stat_key(cdir), *(_stat_key(cdir / n) for n in sorted(KNOWN_FILES)))

    def get(self) -> Control:
        if self._max_age > 0:
            now = self._clock()
            if self._value is not None and now - self._checked < self._max_age:
                return self._value
            self._checked = now
        key = self._current_key()
        if self._value is None or key != self._key:
            before = self._value.findings if self._value is not None else ()
            self._value = self._loader(self.home)
            self._key = key
            found = self._value.findings
            if self._on_findings is not None and found and found != before:
                self._on_findings(found)
        return self._value
