"""DANE for SMTP (RFC 7672): the TLSA lookup of an MX host and the certificate match
(docs/remote.md, "DANE").

Trust model (Postfix's ``smtp_dns_support_level = dnssec``): pyqmail does not validate
DNSSEC itself. It asks with the DO and AD bits and believes the AD bit of the answer, and
only when every configured resolver is on loopback (a validating unbound, dnsmasq
``--dnssec``, systemd-resolved with DNSSEC on): an AD bit that crossed a network is
not trusted, so with a remote resolver DANE is off.

- Only an MX host whose MX RRset and address records were validated (``Address.secure``,
  remote/mx.py) gets a TLSA lookup, at ``_25._tcp.HOST`` (sections 2.2.1, 2.2.2).
- A validated TLSA RRset with at least one usable record (DANE-EE, usage 3, selector 0 or
  1, matching type 0, 1 or 2) makes the host :attr:`Kind.AUTH`: STARTTLS is required and
  the server's leaf certificate must match one record; neither its names nor its dates
  are checked (section 3.1.1).
- A validated RRset whose records are all unusable (PKIX-TA/PKIX-EE, section 3.1.3;
  DANE-TA, usage 2, which needs the peer's chain that Python's ssl module does not give;
  unknown parameters) is :attr:`Kind.ENCRYPT`: TLS stays mandatory, unauthenticated
  (section 2.2).
- No TLSA records, or an answer without the AD bit: :attr:`Kind.NONE`, delivery as ever.
- A failed lookup (SERVFAIL, which is what a validating resolver answers for a bogus
  signature, a timeout) of a secure host: :attr:`Kind.FAIL`, that host is not used
  (section 2.1.1).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DANE_EE = 3
EDNS_PAYLOAD = 1232


class Kind(enum.Enum):
    NONE = "none"  # no DANE for this host: today's TLS policy
    AUTH = "auth"  # usable TLSA records: TLS required, the certificate must match one
    ENCRYPT = "encrypt"  # only unusable records: TLS required, not authenticated
    FAIL = "fail"  # the TLSA lookup of a secure host failed: do not use this host


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def usable(self) -> bool:
        return self.usage == DANE_EE and self.selector in (0, 1) and self.mtype in (0, 1, 2)


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """What DANE makes of one MX host."""

    kind: Kind
    host: str
    records: tuple[Tlsa, ...] = ()

    @property
    def label(self) -> str:
        """What the #4.7.5 texts say TLS is required for."""
        return f"{self.host} by its DANE TLSA records"

    def failure_text(self) -> bytes:
        return (
            f"Sorry, the DANE TLSA lookup for {self.host} failed; its DNSSEC-signed zone "
            "requires it. (#4.7.5)\n"
        ).encode("utf-8", "replace")


NO_DANE = HostPolicy(Kind.NONE, "")


def _loopback(ns: object) -> bool:
    text = str(getattr(ns, "address", ns))
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def trusted(res: dns.resolver.BaseResolver) -> bool:
    """Whether the AD bit of ``res``'s answers may be believed: every server on loopback."""
    servers = list(res.nameservers)
    return bool(servers) and all(_loopback(ns) for ns in servers)


def ask_dnssec(res: dns.resolver.BaseResolver) -> bool:
    """Make ``res`` ask with DO and AD (RFC 6840 5.7) if it is trusted; True if it is."""
    if not trusted(res):
        return False
    res.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
    res.flags = (res.flags or dns.flags.RD) | dns.flags.RD | dns.flags.AD
    return True


def policy(host: str, records: Iterable[Tlsa]) -> HostPolicy:
    """The policy of a validated TLSA RRset."""
    recs = tuple(records)
    usable = tuple(r for r in recs if r.usable())
    if usable:
        return HostPolicy(Kind.AUTH, host, usable)
    if recs:
        return HostPolicy(Kind.ENCRYPT, host)
    return HostPolicy(Kind.NONE, host)


async def lookup(res: dns.asyncresolver.Resolver, host: str) -> HostPolicy:
    """The TLSA records at ``_25._tcp.HOST`` as :class:`HostPolicy` (call it only for a
    secure host of a trusted resolver)."""
    name = f"_25._tcp.{host.rstrip('.')}."
    try:
        ans = await res.resolve(name, "TLSA", search=False, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return HostPolicy(Kind.NONE, host)
    except (dns.exception.DNSException, OSError, ValueError):
        return HostPolicy(Kind.FAIL, host)
    if ans.rrset is None or not ans.response.flags & dns.flags.AD:
        return HostPolicy(Kind.NONE, host)  # none, or insecure: no DANE
    recs = [
        Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert))
        for r in ans.rrset
        if r.rdtype == dns.rdatatype.TLSA
    ]
    return policy(host, recs)


def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(der: bytes | None, records: Iterable[Tlsa]) -> bool:
    """Whether the server's leaf certificate (DER) matches one usable DANE-EE record."""
    if not der:
        return False
    spki: bytes | None = None
    for r in records:
        if not r.usable():
            continue
        if r.selector == 0:
            data = der
        else:
            if spki is None:
                try:
                    key = x509.load_der_x509_certificate(der).public_key()
                    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                except (ValueError, TypeError):
                    return False
            data = spki
        if _digest(r.mtype, data) == r.data:
            return True
    return False
