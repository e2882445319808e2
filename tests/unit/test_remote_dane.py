"""remote/dane.py without I/O: which TLSA records are usable, and the certificate match for
every selector and matching type (trustme makes the certificate)."""

from __future__ import annotations

import hashlib

import dns.asyncresolver
import dns.flags
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pyqmail.remote.dane import Kind, Tlsa, ask_dnssec, matches, policy


def _cert() -> tuple[bytes, bytes]:
    pem = trustme.CA().issue_cert("mx.example.test").cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return cert.public_bytes(Encoding.DER), spki


def test_every_selector_and_matching_type_of_dane_ee() -> None:
    der, spki = _cert()
    for selector, data in ((0, der), (1, spki)):
        for mtype, value in ((0, data), (1, hashlib.sha256(data).digest()),
                             (2, hashlib.sha512(data).digest())):  # fmt: skip
            rec = Tlsa(3, selector, mtype, value)
            assert matches(der, [rec]), (selector, mtype)
            wrong = value[:-1] + bytes([value[-1] ^ 1])  # (a NUL could be the last byte)
            assert not matches(der, [Tlsa(3, selector, mtype, wrong)])


def test_only_dane_ee_records_can_match() -> None:
    der, spki = _cert()
    digest = hashlib.sha256(spki).digest()
    for usage in (0, 1, 2):  # PKIX-TA, PKIX-EE, DANE-TA: never matched here
        assert not matches(der, [Tlsa(usage, 1, 1, digest)])
    assert not matches(der, [Tlsa(3, 2, 1, digest), Tlsa(3, 1, 3, digest)])
    assert not matches(None, [Tlsa(3, 1, 1, digest)]) and not matches(
        b"junk", [Tlsa(3, 1, 1, digest)]
    )
    assert matches(der, [Tlsa(2, 1, 1, digest), Tlsa(3, 1, 1, b"x"), Tlsa(3, 1, 1, digest)])


def test_policy_of_a_validated_rrset() -> None:
    ee, ta = Tlsa(3, 1, 1, b"a" * 32), Tlsa(2, 0, 1, b"b" * 32)
    assert policy("mx.t", [ta, ee]).kind is Kind.AUTH
    assert policy("mx.t", [ta, ee]).records == (ee,)
    assert policy("mx.t", [ta, Tlsa(1, 0, 1, b"c")]).kind is Kind.ENCRYPT
    assert policy("mx.t", []).kind is Kind.NONE
    assert policy("mx.t", [ee]).label == "mx.t by its DANE TLSA records"


def test_ask_dnssec_sets_do_and_ad_on_a_loopback_resolver_only() -> None:
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    assert ask_dnssec(res)
    assert res.ednsflags & dns.flags.DO and res.flags is not None
    assert res.flags & dns.flags.AD and res.flags & dns.flags.RD
    remote = dns.asyncresolver.Resolver(configure=False)
    remote.nameservers = ["198.51.100.7"]
    assert not ask_dnssec(remote) and remote.flags is None
