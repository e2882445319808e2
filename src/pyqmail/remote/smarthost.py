"""Smarthosts: the credentials and the certificate trust for relays named in smtproutes.

Two pyqmail control files, both keyed by the relay host as control/smtproutes writes it
(``relay.example``, ``10.0.0.1`` or ``[10.0.0.1]``; case and brackets do not matter):

- ``control/smtproutesauth``: ``host:user:password`` lines. The password is the rest of
  the line after the second colon (so it may contain ``:``); trailing spaces and tabs are
  dropped, as qmail's list reader drops them; ``[ipv6]:user:password`` for IPv6 relays.
  The file holds secrets: the remote agent reads it as qmailr, so it must be qmailr's and
  mode 0600 (``pyqmail init`` makes it so, ``pyqmail check`` reports anything else).
- ``control/smtproutestls``: ``host:sha256:HEX`` (pin the relay's certificate by its
  SHA-256 fingerprint, as ``openssl x509 -noout -fingerprint -sha256`` prints it; several
  lines for one host allow a key roll-over) or ``host:/path/ca.pem`` (verify the chain and
  the host name against that CA file instead of the system's). For private relays with
  their own CA or a self-signed certificate.

Policy (docs/remote.md, "Smarthost with AUTH"): a relay with credentials or a trust line
requires TLS (STARTTLS, or implicit TLS on port 465): a relay that does not offer it, a
failed handshake or a certificate that does not verify is a temporary failure, and no
AUTH line is ever sent in clear. Without a trust line the certificate is verified against
the system's CAs (or ``PYQMAIL_TLS_CAFILE``) and the relay's host name.

A file that cannot be read, or a line that cannot be parsed, defers every routed delivery
(``Z``): sending without the intended credentials would only get the mail refused by the
relay. Texts never quote a line of these files.

:class:`Smarthosts` re-reads the files when their (inode, size, mtime, ctime) change; a
look-up costs two ``stat`` calls, so an edit takes effect with the next delivery (no HUP
needed).
"""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pyqmail.control import ControlError
from pyqmail.home import Home
from pyqmail.remote.routes import Route
from pyqmail.smtp.clientauth import Credentials

AUTHFILE = "smtproutesauth"
TLSFILE = "smtproutestls"
IMPLICIT_TLS_PORT = 465  # RFC 8314 section 3: TLS from the first byte


@dataclass(frozen=True, slots=True)
class Trust:
    """How to check a relay's certificate instead of the system's CAs."""

    cafile: str | None = None  # verify chain and host name against this file
    pins: frozenset[bytes] = frozenset()  # SHA-256 digests of the certificate (DER)


@dataclass(frozen=True, slots=True)
class Relay:
    """What a connection to one smtproutes relay needs: TLS, and maybe AUTH."""

    name: str  # the relay, as the route names it
    creds: Credentials | None
    trust: Trust | None

    @property
    def required_for(self) -> str:
        """The words after "TLS is required for" in a failure text."""
        if self.creds is not None:
            return f"{self.name} (credentials are never sent in clear)"
        return f"{self.name} (control/{TLSFILE})"

    def pool_tag(self) -> str:
        """What sets an authenticated connection apart in the connection pool."""
        user = self.creds.user.decode("utf-8", "surrogateescape") if self.creds else ""
        return f"\0auth\0{self.name}\0{user}"


class SmarthostError(Exception):
    """A line of smtproutesauth or smtproutestls cannot be used (text without the line)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"control/{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


def host_key(host: str) -> str:
    """The look-up key of a relay: lower case, without brackets or a final dot."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    return h.rstrip(".").lower()


def _split_host(line: str) -> tuple[str, str] | None:
    """``host:rest`` -> (host, rest), with ``[ipv6]:rest`` for IPv6; None: no colon."""
    if line.startswith("["):
        end = line.find("]")
        if end < 0 or line[end + 1 : end + 2] != ":":
            return None
        return line[: end + 1], line[end + 2 :]
    host, sep, rest = line.partition(":")
    return (host, rest) if sep else None


def _lines(raw: bytes) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b" \t\r")
        if line and not line.startswith(b"#"):
            out.append((n, line.decode("utf-8", "surrogateescape")))
    return out


def parse_auth(raw: bytes) -> dict[str, Credentials]:
    """smtproutesauth's lines -> {host key: credentials}; the last line for a host wins."""
    out: dict[str, Credentials] = {}
    for n, line in _lines(raw):
        split = _split_host(line)
        if split is None or ":" not in split[1]:
            raise SmarthostError(AUTHFILE, n, "not host:user:password")
        host, rest = split
        user, _, password = rest.partition(":")
        if not host_key(host) or not user:
            raise SmarthostError(AUTHFILE, n, "the host or the user is empty")
        enc = "utf-8", "surrogateescape"
        out[host_key(host)] = Credentials(user.encode(*enc), password.encode(*enc))
    return out


def parse_trust(raw: bytes) -> dict[str, Trust]:
    """smtproutestls's lines -> {host key: trust}; pins for one host add up."""
    cafiles: dict[str, str] = {}
    pins: dict[str, set[bytes]] = {}
    for n, line in _lines(raw):
        split = _split_host(line)
        if split is None or not host_key(split[0]):
            raise SmarthostError(TLSFILE, n, "not host:sha256:HEX or host:/path/ca.pem")
        host, value = host_key(split[0]), split[1].strip()
        if value.lower().startswith("sha256:"):
            hexdigits = value[7:].replace(":", "").strip()
            try:
                digest = bytes.fromhex(hexdigits)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise SmarthostError(TLSFILE, n, "a SHA-256 fingerprint has 64 hex digits")
            pins.setdefault(host, set()).add(digest)
        elif value.startswith("/"):
            cafiles[host] = value
        else:
            raise SmarthostError(TLSFILE, n, "the value is neither sha256:HEX nor /path/ca.pem")
    both = set(cafiles) & set(pins)
    if both:
        raise SmarthostError(TLSFILE, 0, f"{sorted(both)[0]} has a pin and a CA file; keep one")
    out = {h: Trust(cafile=c) for h, c in cafiles.items()}
    out.update({h: Trust(pins=frozenset(p)) for h, p in pins.items()})
    return out


def pin_matches(der: bytes | None, pins: frozenset[bytes]) -> bool:
    """True if the certificate ``der`` (binary form) has one of the pinned digests."""
    return der is not None and hashlib.sha256(der).digest() in pins


@dataclass(frozen=True)
class Table:
    """Both files, parsed (or the reason they cannot be used)."""

    auth: Mapping[str, Credentials] = field(default_factory=dict)
    trust: Mapping[str, Trust] = field(default_factory=dict)
    error: SmarthostError | None = None

    def relay(self, route: Route) -> Relay | None:
        """What the route's relay needs; None: nothing (today's opportunistic TLS).
        Raises the parse error, if any: the route cannot be used safely."""
        if self.error is not None:
            raise self.error
        if not self.auth and not self.trust:
            return None
        key = host_key(route.relay)
        creds, trust = self.auth.get(key), self.trust.get(key)
        if creds is None and trust is None:
            return None
        return Relay(route.relay, creds, trust)


def _stat(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return (-1,)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read(path: Path, name: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ControlError(name, e) from e


def load(home: Home) -> Table:
    """Read both files. ControlError: one exists but cannot be read."""
    raw_auth = _read(home.control / AUTHFILE, AUTHFILE)
    raw_tls = _read(home.control / TLSFILE, TLSFILE)
    try:
        auth = parse_auth(raw_auth) if raw_auth else {}
        trust = parse_trust(raw_tls) if raw_tls else {}
    except SmarthostError as e:
        return Table(error=e)
    return Table(MappingProxyType(auth), MappingProxyType(trust))


class Smarthosts:
    """The current :class:`Table` for a home, re-read after a change; TLS contexts for
    the CA files it names (each built once)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._key: tuple[object, ...] | None = None
        self._table = Table()
        self._contexts: dict[str, ssl.SSLContext] = {}

    def table(self) -> Table:
        c = self.home.control
        key = (_stat(c / AUTHFILE), _stat(c / TLSFILE))
        if key != self._key:
            self._table = load(self.home)  # raises before the key is kept: tried again
            self._key = key
            self._contexts.clear()
        return self._table

    def relay(self, route: Route) -> Relay | None:
        """:meth:`Table.relay` on the current files (ControlError, SmarthostError)."""
        return self.table().relay(route)

    def context(self, trust: Trust) -> ssl.SSLContext:
        """The client context for ``trust``: its CA file (chain and host name checked), or,
        for pins, one that checks nothing itself (the caller compares the digest)."""
        key = trust.cafile or ""
        ctx = self._contexts.get(key)
        if ctx is None:
            if trust.cafile is None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx = ssl.create_default_context(cafile=trust.cafile)
            self._contexts[key] = ctx
        return ctx


# -- pyqmail check / pyqmail init ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileProblem:
    error: bool
    file: str
    line: int
    message: str
    fix: str


def file_problems(home: Home, reader_uid: int | None) -> list[FileProblem]:
    """What is wrong with smtproutesauth and smtproutestls: a secret file readable by
    group or other, or not owned by the remote agent's user (``reader_uid``, qmailr in
    root mode); a line that cannot be parsed."""
    out: list[FileProblem] = []
    path = home.control / AUTHFILE
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        out.append(FileProblem(True, AUTHFILE, 0, f"cannot be examined ({e.strerror})", ""))
        st = None
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            out.append(FileProblem(True, AUTHFILE, 0,
                                   f"holds passwords but is readable by group or other "
                                   f"(mode {mode:o})", f"chmod 600 {path}"))  # fmt: skip
        if reader_uid is not None and st.st_uid != reader_uid:
            why = "the remote agent runs as qmailr, which does not own it"
            out.append(FileProblem(True, AUTHFILE, 0, why, f"chown qmailr {path}"))
    for name in (AUTHFILE, TLSFILE):
        try:
            raw = _read(home.control / name, name)
        except ControlError:
            continue  # readable() in check.py reports it
        if not raw:
            continue
        try:
            if name == AUTHFILE:
                parse_auth(raw)
            else:
                parse_trust(raw)
        except SmarthostError as e:
            why = e.message + "; every routed delivery is deferred"
            out.append(FileProblem(True, name, e.line, why, "see docs/remote.md, Smarthosts"))
    return out


def secure_authfile(home: Home, owner: tuple[int, int] | None) -> bool:
    """Make an existing smtproutesauth mode 0600 and (root mode) ``owner``'s (qmailr);
    True if something changed. Never follows a symlink; a missing file is left missing."""
    path = home.control / AUTHFILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing, or a symlink (ELOOP)
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        changed = False
        if stat.S_IMODE(st.st_mode) & 0o177:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o600 or 0o600)
            changed = True
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
            changed = True
        return changed
    finally:
        os.close(fd)
