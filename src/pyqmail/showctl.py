"""qmail-showctl's report: every control file's effective value, source and meaning.

The first part is qmail-showctl's (notqmail 1.09) layout, order and texts, so an admin
can diff ours against theirs: the settings header, then one entry per file qmail knows,
each after a blank line, as ``NAME: [(Default.) ]meaning``; list files print ``NAME: ``
and one line per entry. ``(Default.)`` marks a value that does not come from the file.
A file that cannot be read shows ``Oops! Trouble reading this file.``; bytes outside
33..126 (space excepted) print as ``?``. Files nobody knows get ``I have no idea what
this file does.`` in directory order, as qmail does.

A second part, after the qmail part, shows what pyqmail reads that qmail does not:
spawnlimit, qmtproutes, tlsdestinations, defaultdelivery and the tcprules files, and
(only when present) smtproutesauth, with its hosts and users but never a password, and
smtproutestls.

The values shown are the files' values, as qmail-showctl shows them (timeoutsmtpd 0 is
shown as 0 though the server uses 1; concurrencyremote over spawnlimit is shown as
written though the scheduler caps it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pyqmail import srs
from pyqmail.control import DEFAULT_SPAWN_LIMIT, ControlError, parse_int, parse_line, parse_list
from pyqmail.control import read_file as _read_control
from pyqmail.home import BREAK, SPLIT, Home, HomeError
from pyqmail.remote import smarthost

PATERNALISM = 2  # qmail's conf-patrn: group-writable .qmail and home refused (local.md)


def safe(text: str | bytes) -> str:
    """qmail-showctl's safe printing: anything but printable ASCII (and space) is ``?``."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return "".join(chr(c) if 32 <= c <= 126 else "?" for c in data)


class _Unreadable(Exception):
    pass


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: str  # "line", "int", "list"
    prefix: str
    suffix: str = "."
    default: str | None = None  # line/int: literal default; list: the (Default.) text
    me_default: bool = False  # line: missing file -> me, else the file's own name


# qmail-showctl's entries, in its order.
_QMAIL: tuple[_Entry, ...] = (
    _Entry("badmailfrom", "list", "", " not accepted in MAIL FROM.", "Any MAIL FROM is allowed."),
    _Entry("bouncefrom", "line", "Bounce user name is ", ".", "MAILER-DAEMON"),
    _Entry("bouncehost", "line", "Bounce host name is ", ".", me_default=True),
    _Entry("concurrencylocal", "int", "Local concurrency is ", ".", "10"),
    _Entry("concurrencyremote", "int", "Remote concurrency is ", ".", "20"),
    _Entry("databytes", "int", "SMTP DATA limit is ", " bytes.", "0"),
    _Entry("defaultdomain", "line", "Default domain name is ", ".", me_default=True),
    _Entry("defaulthost", "line", "Default host name is ", ".", me_default=True),
    _Entry("doublebouncehost", "line", "2B recipient host: ", ".", me_default=True),
    _Entry("doublebounceto", "line", "2B recipient user: ", ".", "postmaster"),
    _Entry("envnoathost", "line", "Presumed domain name is ", ".", me_default=True),
    _Entry("helohost", "line", "SMTP client HELO host name is ", ".", me_default=True),
    _Entry("idhost", "line", "Message-ID host name is ", ".", me_default=True),
    _Entry("localiphost", "line", "Local IP address becomes ", ".", me_default=True),
    _Entry(
        "locals",
        "list",
        "Messages for ",
        " are delivered locally.",
        "Messages for me are delivered locally.",
    ),
    _Entry("me", "line", "My name is ", ".", "undefined! Uh-oh"),
    _Entry(
        "percenthack",
        "list",
        "The percent hack is allowed for user%host@",
        ".",
        "The percent hack is not allowed.",
    ),
    _Entry("plusdomain", "line", "Plus domain name is ", ".", me_default=True),
    _Entry("qmqpservers", "list", "QMQP server: ", ".", "No QMQP servers."),
    _Entry("queuelifetime", "int", "Message lifetime in the queue is ", " seconds.", "604800"),
    _Entry(
        "rcpthosts",
        "list",
        "SMTP clients may send messages to recipients at ",
        ".",
        "SMTP clients may send messages to any recipient.",
    ),
    _Entry("morercpthosts", "list", "", ".", "No effect."),  # prefix depends on rcpthosts
    _Entry("morercpthosts.cdb", "cdb", ""),
    _Entry("smtpgreeting", "line", "SMTP greeting: 220 ", ".", me_default=True),
    _Entry("smtproutes", "list", "SMTP route: ", "", "No artificial SMTP routes."),
    _Entry("timeoutconnect", "int", "SMTP client connection timeout is ", " seconds.", "60"),
    _Entry("timeoutremote", "int", "SMTP client data timeout is ", " seconds.", "1200"),
    _Entry("timeoutsmtpd", "int", "SMTP server data timeout is ", " seconds.", "1200"),
    _Entry("virtualdomains", "list", "Virtual domain: ", "", "No virtual domains."),
)

# What pyqmail reads that qmail does not (docs/control.md, "pyqmail's additions").
_PYQMAIL: tuple[_Entry, ...] = (
    _Entry(
        "spawnlimit",
        "int",
        "Upper bound for concurrencylocal and concurrencyremote is ",
        ".",
        str(DEFAULT_SPAWN_LIMIT),
    ),
    _Entry("qmtproutes", "list", "QMTP route: ", "", "No QMTP routes."),
    _Entry(
        "tlsdestinations",
        "list",
        "TLS required when delivering to ",
        ".",
        "TLS is used when the server offers it; never required.",
    ),
    _Entry(
        "destinationlimits",
        "list",
        "Destination limit (domain:concurrency:per-minute): ",
        "",
        "No per-destination limits.",
    ),
    _Entry(
        "defaultdelivery",
        "list",
        "Delivery instruction for users without .qmail: ",
        "",
        "Users without .qmail get ./Mailbox.",
    ),
)
_RULES = ("tcp.smtp", "tcp.qmqp", "tcp.qmtp")
_PYQMAIL_FILES = frozenset(
    {e.name for e in _PYQMAIL} | set(_RULES) | {r + ".cdb" for r in _RULES}
    | {r + ".tmp" for r in _RULES} | {smarthost.AUTHFILE, smarthost.TLSFILE, srs.FILE}
)  # fmt: skip
_QMAIL_FILES = frozenset(e.name for e in _QMAIL)


def _header(home: Home, spawnlimit: int) -> list[str]:
    lines = [
        f"qmail home directory: {safe(str(home.root))}.",
        f"user-ext delimiter: {BREAK}.",
        f"paternalism (in decimal): {PATERNALISM}.",
        f"silent concurrency limit: {spawnlimit}.",
        f"subdirectory split: {SPLIT}.",
    ]
    try:
        ids = home.ids()
    except HomeError as e:
        lines.append(f"user ids: unknown ({e}).")
        lines.append("group ids: unknown.")
        return lines
    order = ("alias", "daemon", "log", "owner", "passwd", "queue", "remote", "send")
    uids = [ids.uid(r) for r in order]
    lines.append("user ids: " + ", ".join(map(str, uids)) + ".")
    lines.append(f"group ids: {ids.gid('nofiles')}, {ids.gid('qmail')}.")
    return lines


class _Reader:
    """Reads each control file once; remembers which were missing or unreadable."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._cache: dict[str, bytes | _Unreadable | None] = {}

    def raw(self, name: str) -> bytes | None:
        if name not in self._cache:
            try:
                self._cache[name] = _read_control(self.home, name)
            except ControlError:
                self._cache[name] = _Unreadable()
        value = self._cache[name]
        if isinstance(value, _Unreadable):
            raise value
        return value

    def exists(self, name: str) -> bool:
        try:
            return self.raw(name) is not None
        except _Unreadable:
            return True

    def me(self) -> str | None:
        try:
            data = self.raw("me")
        except _Unreadable:
            return None
        return parse_line(data) if data is not None else None


def _mtime(path: os.PathLike[str] | str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _entry_lines(entry: _Entry, rd: _Reader) -> list[str]:
    head = f"{entry.name}: "
    if entry.kind == "cdb":
        return [head + _cdb_text(rd.home, entry.name[: -len(".cdb")])]
    try:
        data = rd.raw(entry.name)
    except _Unreadable:
        return [head + "Oops! Trouble reading this file."]
    if entry.kind == "list":
        if data is None:
            if entry.name == "morercpthosts" and not rd.exists("rcpthosts"):
                return [head + "(Default.) No rcpthosts; morercpthosts is irrelevant."]
            return [head + f"(Default.) {entry.default}"]
        prefix = entry.prefix
        if entry.name == "morercpthosts":
            prefix = (
                "SMTP clients may send messages to recipients at "
                if rd.exists("rcpthosts")
                else "No rcpthosts; doesn't matter that morercpthosts has "
            )
        return [head] + [safe(prefix + line + entry.suffix) for line, _ in parse_list(data)]
    if entry.kind == "int":
        value = parse_int(data)[0] if data is not None else None
        if value is None:
            return [head + f"(Default.) {entry.prefix}{entry.default}{entry.suffix}"]
        return [head + f"{entry.prefix}{value}{entry.suffix}"]
    if data is not None:
        return [head + safe(entry.prefix + parse_line(data) + entry.suffix)]
    default = entry.default
    if entry.me_default:
        me = rd.me()
        default = me if me is not None else entry.name  # an empty me counts as present
    return [head + "(Default.) " + safe(f"{entry.prefix}{default}{entry.suffix}")]


def _cdb_text(home: Home, source: str) -> str:
    """qmail-showctl's freshness check of SOURCE.cdb against SOURCE."""
    cdb_time = _mtime(home.control / f"{source}.cdb")
    src_time = _mtime(home.control / source)
    if cdb_time is None:
        if src_time is None:
            return "(Default.) No effect."
        return f"Oops! {source} exists but {source}.cdb doesn't."
    if src_time is None:
        return f"Oops! {source}.cdb exists but {source} doesn't."
    if cdb_time < src_time:
        return f"Oops! {source}.cdb is older than {source}."
    return "Modified recently enough; hopefully up to date."


def _rules_lines(home: Home, name: str) -> list[str]:
    head = f"{name}: "
    what = {"tcp.smtp": "SMTP", "tcp.qmqp": "QMQP", "tcp.qmtp": "QMTP"}[name]
    src = _mtime(home.control / name)
    cdb_time = _mtime(home.control / f"{name}.cdb")
    if src is None and cdb_time is None:
        text = f"(Default.) No {what} access rules; every client is allowed"
        if name == "tcp.qmqp":
            text += " (and may relay: QMQP has no recipient check)"
        return [head + text + "."]
    text = f"{what} access rules (tcprules); "
    if cdb_time is None:
        text += f"Oops! {name} exists but {name}.cdb doesn't: run tcprules."
    elif src is None:
        text += f"compiled in {name}.cdb, but {name} (the source) is missing."
    elif cdb_time < src:
        text += f"Oops! {name}.cdb is older than {name}: run tcprules."
    else:
        text += f"{name}.cdb is up to date."
    return [head + text]


def report(home: Home, listdir: Callable[[str], list[str]] = os.listdir) -> str:
    """The whole qmail-showctl text for ``home`` (ends with a newline)."""
    rd = _Reader(home)
    try:
        limit_raw = rd.raw("spawnlimit")
    except _Unreadable:
        limit_raw = None
    limit = (parse_int(limit_raw)[0] if limit_raw is not None else None) or DEFAULT_SPAWN_LIMIT
    lines = _header(home, limit)
    for entry in _QMAIL:
        lines.append("")
        lines += _entry_lines(entry, rd)
    try:
        names = listdir(str(home.control))
    except OSError:
        names = []
    for name in names:
        if name not in _QMAIL_FILES and name not in _PYQMAIL_FILES:
            lines.append("")
            lines.append(f"{safe(name)}: I have no idea what this file does.")
    lines += ["", "", "pyqmail additions (qmail does not read these files):"]
    for entry in _PYQMAIL:
        lines.append("")
        lines += _entry_lines(entry, rd)
    lines.append("")
    lines += _srs_lines(home)
    for name in _RULES:
        lines.append("")
        lines += _rules_lines(home, name)
    lines += _smarthost_lines(rd)
    return "\n".join(lines) + "\n"


def _smarthost_lines(rd: _Reader) -> list[str]:
    """smtproutesauth (hosts and users; the passwords are never shown) and smtproutestls,
    each only if it exists."""
    out: list[str] = []
    for name in (smarthost.AUTHFILE, smarthost.TLSFILE):
        head = f"{name}: "
        try:
            data = rd.raw(name)
        except _Unreadable:
            out += ["", head + "Oops! Trouble reading this file."]
            continue
        if data is None:
            continue
        out += ["", head]
        try:
            if name == smarthost.AUTHFILE:
                auth = smarthost.parse_auth(data)
                out += [safe(f"AUTH to {h} as {c.user.decode('utf-8', 'replace')} (password "
                             "not shown).") for h, c in auth.items()]  # fmt: skip
            else:
                for h, t in smarthost.parse_trust(data).items():
                    how = f"CA file {t.cafile}" if t.cafile else f"{len(t.pins)} pinned key(s)"
                    out.append(safe(f"TLS to {h} verified by {how}."))
        except smarthost.SmarthostError as e:
            out.append(safe(f"Unusable: line {e.line}: {e.message}; routed mail is deferred."))
    return out


def _srs_lines(home: Home) -> list[str]:
    """control/srs's domain, never its secret (docs/srs.md)."""
    try:
        raw = srs.read(home.control)
    except OSError as e:
        return [f"srs: Oops! Trouble reading this file: {safe(e.strerror or str(e))}."]
    if raw is None:
        return ["srs: (Default.) Forwards keep the original envelope sender (no SRS)."]
    try:
        config = srs.parse(raw)
    except srs.ConfigError as e:
        return [f"srs: {safe(str(e))}."]
    return [
        f"srs: Forwards of foreign senders get SRS addresses at {safe(config.domain)}"
        " (the secret is not shown)."
    ]
