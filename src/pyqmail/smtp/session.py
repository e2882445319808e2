"""qmail-smtpd's per-connection policy: who may relay, whose mail is refused, what we say.

A :class:`Session` is built once per connection from the control snapshot and the
connection's environment (what tcpserver or our listener set, plus the tcprules
variables). It owns the decisions qmail-smtpd makes from them (smtpd.md sections 1, 3,
6, 7 and 8):

* ``smtpgreeting`` (falls back to ``me``; neither present = cannot run: 421),
* databytes: ``control/databytes``, overridden by ``$DATABYTES`` (policy.py),
* badmailfrom: the whole address or ``@domain``, case-insensitive,
* relay control: ``$RELAYCLIENT`` set (even empty) skips it and is appended to every
  recipient; else a recipient without ``@`` passes, and one with a domain must be in
  rcpthosts (exact or ``.suffix``) or morercpthosts.cdb; no rcpthosts = open relay
  (policy.py's RcptHosts, shared with QMTP),
* ``[ip]`` literals naming one of our addresses become localiphost,
* the Received line with qmail's ``?`` substitution, and RFC 3848's protocol word
  (``ESMTPS`` after STARTTLS, ``ESMTPA``/``ESMTPSA`` once AUTH exists) with the TLS
  version and cipher (:class:`TlsInfo`, filled in by the adapter after the handshake).

No I/O happens here except what the caller hands in (the control snapshot, an open cdb
reader, the set of local addresses); :func:`local_addresses` is the small helper the
adapters use to get those (and ``listener.CdbCache``, re-exported here, the open cdbs).
"""

from __future__ import annotations

import fcntl
import ipaddress
import re
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pyqmail import cdb, policy
from pyqmail.control import Control
from pyqmail.listener import CdbCache as CdbCache  # its home was here; adapters use it
from pyqmail.qdate import date822
from pyqmail.smtp.address import domain_of, ip_literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# notqmail's safe characters for the fields of the Received line (received.c).
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.@%+/=:-[]")
_SAFE_TABLE = bytes(c if c in _SAFE else 0x3F for c in range(256))


_TLS_WORD = re.compile(rb"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the TLS handshake agreed (``TLSv1.3``, ``TLS_AES_256_GCM_SHA384``)."""

    version: str
    cipher: str

    def comment(self) -> bytes:
        """``(TLSv1.3 TLS_AES_256_GCM_SHA384)`` for the Received line. The names come from
        our TLS library, not the client, but are reduced to ``[A-Za-z0-9._-]`` anyway."""
        words = (_TLS_WORD.sub(b"?", _b(w)) for w in (self.version, self.cipher))
        return b"(" + b" ".join(words) + b")"


def protocol_word(*, tls: bool, auth: bool) -> bytes:
    """The ``with`` word of the Received line (RFC 3848): qmail's ``SMTP`` for a plain
    session (qmail says SMTP after EHLO too), ``ESMTPS`` with TLS, ``ESMTPA`` with AUTH,
    ``ESMTPSA`` with both."""
    if not tls and not auth:
        return b"SMTP"
    return b"ESMTP" + (b"S" if tls else b"") + (b"A" if auth else b"")


class SessionError(Exception):
    """The session cannot start (qmail's 421 at start-up); the message is for the log."""


def safe(text: bytes) -> bytes:
    """qmail's Received-line substitution: every unsafe byte becomes ``?``."""
    return text.translate(_SAFE_TABLE)


class Session:
    """The policy of one SMTP connection. See the module docstring."""

    __slots__ = (
        "_bmf",
        "_local_ips",
        "_localiphost",
        "_rcpthosts",
        "_tcplocalip",
        "_when",
        "check_rcpt",
        "databytes",
        "greeting",
        "local_host",
        "relayclient",
        "remote_host",
        "remote_info",
        "remote_ip",
    )  # fmt: skip

    def __init__(
        self,
        ctl: Control,
        env: Mapping[str, str],
        *,
        morercpthosts: cdb.Reader | None = None,
        local_ips: frozenset[IPAddress] = frozenset(),
        clock: Callable[[], float] = time.time,
        check_rcpt: bool = False,
    ) -> None:
        """``check_rcpt``: the adapter has recipient checks (smtp/rcptcheck.py) and wants
        a :class:`~pyqmail.smtp.protocol.CheckRcpt` for each recipient rcpthosts allows."""
        greeting = ctl.smtpgreeting
        if greeting is None:
            raise SessionError("neither control/smtpgreeting nor control/me exists")
        self.greeting = greeting
        self.databytes = policy.databytes(ctl, env)
        self.remote_ip = env.get("TCPREMOTEIP") or "unknown"
        self.remote_host = env.get("TCPREMOTEHOST") or "unknown"
        self.remote_info = env.get("TCPREMOTEINFO")
        self.local_host = env.get("TCPLOCALHOST") or env.get("TCPLOCALIP") or "unknown"
        self.relayclient = policy.relayclient(env)
        self._bmf = _badmailfrom(ctl)
        self._rcpthosts = policy.RcptHosts.of(ctl, morercpthosts)
        self._localiphost = None if ctl.localiphost is None else _b(ctl.localiphost)
        self._local_ips = local_ips
        self._tcplocalip = env.get("TCPLOCALIP", "")
        self._when = clock
        self.check_rcpt = check_rcpt

    def badmailfrom(self, sender: bytes) -> bool:
        """qmail's bmfcheck: the address, or ``@domain``, listed (case-insensitive)."""
        if not self._bmf:
            return False
        low = sender.lower()
        if low in self._bmf:
            return True
        at = low.rfind(b"@")
        return at >= 0 and low[at:] in self._bmf

    def rcpt_allowed(self, rcpt: bytes) -> bool:
        """Relay control for one recipient (RELAYCLIENT is the caller's first check)."""
        return self.relayclient is not None or self._rcpthosts.allowed(rcpt)

    def rewrite_literal(self, address: bytes) -> bytes:
        """``user@[one of our IPs]`` -> ``user@localiphost`` (qmail-smtpd's addrparse)."""
        if self._localiphost is None or not address.endswith(b"]"):
            return address
        ip = ip_literal(domain_of(address))
        if ip is None:
            return address
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip not in self._local_ips and ip != _ANY and str(ip) != self._tcplocalip:
            return address
        return address[: address.rfind(b"@") + 1] + self._localiphost

    def received(
        self, helo: bytes | None, *, tls: TlsInfo | None = None, auth: bool = False
    ) -> bytes:
        """The Received line qmail-smtpd puts above the message (smtpd.md section 6);
        with TLS, ``with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384);`` (RFC 3848)."""
        host = _b(self.remote_host)
        out = [b"Received: from ", safe(host)]
        if helo is not None and helo.lower() != host.lower():
            out += [b" (HELO ", safe(helo), b")"]
        out.append(b" (")
        if self.remote_info is not None:
            out += [safe(_b(self.remote_info)), b"@"]
        out += [safe(_b(self.remote_ip)), b")\n  by ", safe(_b(self.local_host))]
        out += [b" with ", protocol_word(tls=tls is not None, auth=auth)]
        if tls is not None:
            out += [b" ", tls.comment()]
        out += [b"; ", date822(self._when()).encode(), b"\n"]
        return b"".join(out)


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


_ANY = ipaddress.IPv4Address("0.0.0.0")
_ENCODED: dict[int, tuple[Control, frozenset[bytes]]] = {}


def _badmailfrom(ctl: Control) -> frozenset[bytes]:
    """badmailfrom as a byte set, computed once per control snapshot."""
    hit = _ENCODED.get(id(ctl))
    if hit is not None and hit[0] is ctl:
        return hit[1]
    bmf = frozenset(_b(x) for x in ctl.badmailfrom)
    if len(_ENCODED) > 8:
        _ENCODED.clear()
    _ENCODED[id(ctl)] = (ctl, bmf)
    return bmf


def local_addresses() -> frozenset[IPAddress]:
    """This host's interface addresses (IPv4 by SIOCGIFADDR, IPv6 from /proc), for localiphost."""
    out: set[IPAddress] = set()
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(s.fileno(), siocgifaddr, req)
                out.add(ipaddress.IPv4Address(res[20:24]))
            except OSError:
                continue
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                out.add(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
    except (OSError, ValueError, IndexError):
        pass
    out.add(ipaddress.IPv4Address("127.0.0.1"))
    return frozenset(out)
