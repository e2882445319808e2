"""control/servercert.pem: the context, the reload rules, init's certificate, check's findings."""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pyqmail.smtp import tls
from pyqmail.smtp.protocol import TlsOffer
from tests.conftest import is_root, require


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(path: Path, ca: trustme.CA, name: str = "mx.test.example") -> trustme.LeafCert:
    cert = ca.issue_cert(name)
    tmp = path.with_suffix(".new")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp))
    os.replace(tmp, path)  # a new inode, as an operator's mv does
    return cert


def leaf_der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def served_der(ctx: ssl.SSLContext, ca: trustme.CA) -> bytes:
    """The certificate a handshake against ``ctx`` presents (in memory, no socket)."""
    client = ssl.create_default_context()
    client.check_hostname = False  # the chain is still verified
    ca.configure_trust(client)
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(cin, cout, server_hostname="mx.test.example")
    s = ctx.wrap_bio(sin, sout, server_side=True)
    for _ in range(10):
        for obj in (c, s):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        sin.write(cout.read())
        cin.write(sout.read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_the_context_has_key_and_chain_from_one_file_and_tls12_at_least(
    tmp_path: Path, ca: trustme.CA
) -> None:
    pem = tmp_path / "servercert.pem"
    cert = write_cert(pem, ca)
    ctx = tls.server_context(pem)
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert served_der(ctx, ca) == leaf_der(cert)


def _encrypted_key(ca: trustme.CA) -> bytes:
    cert = ca.issue_cert("mx.test.example")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    enc = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    return enc + cert.cert_chain_pems[0].bytes()


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("garbage", lambda ca: b"this is not a certificate\n", "not a key and certificate"),
        ("empty", lambda ca: b"", "not a key and certificate"),
        ("cert only", lambda ca: ca.issue_cert("x.example").cert_chain_pems[0].bytes(), "PEM"),
        ("key only", lambda ca: ca.issue_cert("x.example").private_key_pem.bytes(), "PEM"),
        (
            "key of another cert",
            lambda ca: (
                ca.issue_cert("a.example").private_key_pem.bytes()
                + ca.issue_cert("b.example").cert_chain_pems[0].bytes()
            ),
            "PEM",
        ),
        ("encrypted key", _encrypted_key, "encrypted"),
    ],
)
def test_an_unusable_file_is_a_tls_error_never_a_prompt(
    tmp_path: Path, ca: trustme.CA, name: str, content: object, why: str
) -> None:
    pem = tmp_path / "servercert.pem"
    pem.write_bytes(content(ca))  # type: ignore[operator]
    with pytest.raises(tls.TlsError, match=why):
        tls.server_context(pem)


def test_a_missing_file_is_a_tls_error(tmp_path: Path) -> None:
    with pytest.raises(tls.TlsError, match="no such file"):
        tls.server_context(tmp_path / "servercert.pem")


def store(pem: Path, clock: Clock, warnings: list[str]) -> tls.CertStore:
    return tls.CertStore(pem, ttl=1.0, clock=clock, warn=warnings.append)


def test_missing_certificate_warns_at_start_and_offers_nothing(tmp_path: Path) -> None:
    warnings: list[str] = []
    s = store(tmp_path / "servercert.pem", Clock(), warnings)
    assert s.load() == tls.Offer(TlsOffer.OFF, None)
    assert warnings == ["warning: no control/servercert.pem: STARTTLS is not offered"]
    assert s.load(warn_missing=False).offer is TlsOffer.OFF and len(warnings) == 1


def test_bad_certificate_warns_once_and_is_unavailable(tmp_path: Path) -> None:
    pem = tmp_path / "servercert.pem"
    pem.write_text("this is not a certificate\n")
    warnings: list[str] = []
    clock = Clock()
    s = store(pem, clock, warnings)
    assert s.load() == tls.Offer(TlsOffer.UNAVAILABLE, None)
    clock.now += 5
    assert s.get().offer is TlsOffer.UNAVAILABLE
    assert len(warnings) == 1
    assert "control/servercert.pem cannot be used" in warnings[0]
    assert "STARTTLS is not offered" in warnings[0]


def test_a_replaced_certificate_reaches_the_next_connection_after_the_ttl(
    tmp_path: Path, ca: trustme.CA
) -> None:
    pem = tmp_path / "servercert.pem"
    first = write_cert(pem, ca, "one.test.example")
    clock = Clock()
    warnings: list[str] = []
    s = store(pem, clock, warnings)
    ctx1 = s.load().context
    assert ctx1 is not None and served_der(ctx1, ca) == leaf_der(first)
    clock.now += 2
    assert s.get().context is ctx1  # unchanged file: the same context, nothing re-read
    second = write_cert(pem, ca, "two.test.example")
    clock.now += 0.5
    assert s.get().context is ctx1  # within the ttl the file is not even looked at
    clock.now += 0.6
    ctx2 = s.get().context
    assert ctx2 is not None and ctx2 is not ctx1
    assert served_der(ctx2, ca) == leaf_der(second)
    assert warnings == []


def test_a_bad_replacement_keeps_the_old_certificate_and_removal_turns_tls_off(
    tmp_path: Path, ca: trustme.CA
) -> None:
    pem = tmp_path / "servercert.pem"
    write_cert(pem, ca)
    clock = Clock()
    warnings: list[str] = []
    s = store(pem, clock, warnings)
    ctx1 = s.load().context
    pem.write_text("half a file")
    clock.now += 2
    assert s.get() == tls.Offer(TlsOffer.ON, ctx1)
    assert len(warnings) == 1 and "keeping the previous certificate" in warnings[0]
    pem.unlink()
    clock.now += 2
    assert s.get() == tls.Offer(TlsOffer.OFF, None)


def test_init_makes_a_self_signed_key_and_certificate_once(tmp_path: Path) -> None:
    assert tls.ensure_servercert(tmp_path, "mx.init.example", None)
    pem = tmp_path / "servercert.pem"
    st = pem.stat()
    assert st.st_mode & 0o777 == 0o600
    data = pem.read_bytes()
    assert b"PRIVATE KEY" in data
    cert = x509.load_pem_x509_certificates(data)[0]
    assert cert.subject.rfc4514_string() == "CN=mx.init.example"
    assert cert.issuer == cert.subject
    tls.server_context(pem)  # usable as it is
    assert not tls.ensure_servercert(tmp_path, "other.example", None)
    assert pem.read_bytes() == data  # never replaced
    assert [p.name for p in tmp_path.iterdir()] == ["servercert.pem"]  # no temporary left


def test_init_gives_the_certificate_to_its_reader(tmp_path: Path) -> None:
    require(is_root(), "chown needs root", "run the tests as root (CI does)")
    assert tls.ensure_servercert(tmp_path, "mx.init.example", (65534, 65534))
    st = (tmp_path / "servercert.pem").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)


def _messages(pem: Path, **kw: object) -> list[tuple[bool, str]]:
    return [(p.error, p.message) for p in tls.cert_problems(pem, **kw)]  # type: ignore[arg-type]


def test_check_is_quiet_without_a_file_and_errs_on_a_bad_one(tmp_path: Path) -> None:
    pem = tmp_path / "servercert.pem"
    assert tls.cert_problems(pem) == []
    pem.write_text("nonsense")
    [(error, message)] = _messages(pem)
    assert error and "cannot be used" in message


def test_check_flags_self_signed_expiring_expired_and_open_modes(tmp_path: Path) -> None:
    pem = tmp_path / "servercert.pem"
    now = datetime.datetime.now(datetime.UTC)
    pem.write_bytes(tls.self_signed("mx.example", days=3650))
    pem.chmod(0o600)
    assert [m for _, m in _messages(pem)] == [
        "the certificate is self-signed: clients encrypt but cannot authenticate this "
        "server (fine for opportunistic STARTTLS on port 25)"
    ]
    pem.write_bytes(tls.self_signed("mx.example", days=10))
    found = _messages(pem)
    assert (False, f"the certificate expires on {(now + datetime.timedelta(days=10)):%Y-%m-%d}, "
            "in 9 days") in found  # fmt: skip
    pem.write_bytes(tls.self_signed("mx.example", days=1, now=now - datetime.timedelta(days=3)))
    found = _messages(pem)
    assert any(err and "expired on" in m for err, m in found)
    pem.chmod(0o644)
    assert any(not err and "mode 644" in m for err, m in _messages(pem))
    owner = pem.stat().st_uid
    assert any(err and "qmaild does not own it" in m for err, m in
               _messages(pem, reader=(owner + 1, 0)))  # fmt: skip
    assert not any("qmaild" in m for _, m in _messages(pem, reader=(owner, 0)))


def test_a_ca_issued_certificate_far_from_expiry_has_no_findings(
    tmp_path: Path, ca: trustme.CA
) -> None:
    pem = tmp_path / "servercert.pem"
    write_cert(pem, ca)
    pem.chmod(0o600)
    assert tls.cert_problems(pem) == []
