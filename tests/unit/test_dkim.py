"""pyqmail/dkim.py: keys, which mail is signed with which key, hostile headers, the memory
bound, and the signatures checked with dkimpy's verifier against the keygen record (the
verifiers no one here wrote, over real DNS, are in tests/interop/test_dkim_verifiers.py)."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import dkim as dkimpy  # type: ignore[import-untyped]
import pytest

from pyqmail import dkim
from pyqmail.home import Home

MSG = (
    b"From: Someone <someone@example.test>\nTo: dest@remote.example\nSubject: hi\n"
    b"Date: 7 Dec 2026 11:00:00 -0000\nMessage-ID: <1@example.test>\n\nbody marker-abc\n"
)


def records(home: Home) -> dict[str, str]:
    out = {}
    for d in (home.control / "dkim").iterdir():
        for key in dkim.load_keys(home, d.name):
            r = dkim.record_for(key)
            out[r.name] = r.value
    return out


def verify(message: bytes, recs: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each signature of ``message`` (LF line ends)."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return recs.get(name.decode().rstrip("."), "").encode()

    crlf = message.replace(b"\n", b"\r\n")
    d = dkimpy.DKIM(crlf)
    n = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
    out = []
    for i in range(n):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkimpy.ValidationError:
            out.append(False)
    return out


@pytest.fixture
def keyed(home: Home) -> Home:
    dkim.keygen(home, "example.test", "s1")
    return home


def test_keygen_writes_a_private_key_names_the_selector_and_gives_the_record(home: Home) -> None:
    rec, named = dkim.keygen(home, "Example.Test.", "s1")
    key = home.control / "dkim" / "example.test" / "s1.key"
    st = key.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert named and (key.parent / "selector").read_text() == "s1\n"
    assert rec.name == "s1._domainkey.example.test"
    assert rec.value.startswith("v=DKIM1; k=rsa; p=MII")
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    pub = load_der_public_key(base64.b64decode(rec.value.split("p=")[1]))
    assert pub.key_size == 2048  # type: ignore[union-attr]
    assert not list(key.parent.glob(".*tmp"))


def test_keygen_never_replaces_a_key_and_keeps_the_named_selector(home: Home) -> None:
    dkim.keygen(home, "example.test", "s1")
    before = (home.control / "dkim/example.test/s1.key").read_bytes()
    with pytest.raises(dkim.KeygenError, match="exists"):
        dkim.keygen(home, "example.test", "s1")
    assert (home.control / "dkim/example.test/s1.key").read_bytes() == before
    rec, named = dkim.keygen(home, "example.test", "e1", ed=True)
    assert not named and (home.control / "dkim/example.test/selector").read_text() == "s1\n"
    assert rec.value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(rec.value.split("p=")[1])) == 32


@pytest.mark.parametrize("domain", ["../etc", "a/b", "", "ex ample.test", "é.test", "-a.test"])
def test_keygen_refuses_what_is_not_a_domain(home: Home, domain: str) -> None:
    with pytest.raises(dkim.KeygenError):
        dkim.keygen(home, domain, "s1")
    with pytest.raises(dkim.KeygenError):
        dkim.keygen(home, "example.test", "../s1")


def test_keygen_refuses_a_weak_rsa_key(home: Home) -> None:
    with pytest.raises(ValueError):
        dkim.keygen(home, "example.test", "s1", bits=512)


def test_signed_mail_verifies_and_a_changed_body_byte_fails(keyed: Home) -> None:
    sig = dkim.Signer(keyed).signature(MSG)
    assert sig.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test")
    assert b"\r" not in sig and sig.endswith(b"\n")
    recs = records(keyed)
    assert verify(sig + MSG, recs) == [True]
    assert verify(sig + MSG.replace(b"marker-abc", b"marker-abd"), recs) == [False]
    assert verify(sig + MSG.replace(b"Subject: hi", b"Subject: ho"), recs) == [False]


def test_header_fields_of_rfc6376_5_4_1_are_signed_and_from_is_oversigned(keyed: Home) -> None:
    msg = b"Cc: c@x\nReply-To: r@x\nMIME-Version: 1.0\nContent-Type: text/plain\nX-Other: 1\n" + MSG
    sig = dkim.Signer(keyed).signature(msg)
    h = dkimpy.util.parse_tag_value(sig.split(b":", 1)[1].replace(b"\n", b""))[b"h"]
    signed = [f.strip().lower() for f in h.split(b":")]
    for f in (b"from", b"to", b"subject", b"date", b"message-id", b"cc", b"reply-to",
              b"mime-version", b"content-type"):  # fmt: skip
        assert f in signed
    assert signed.count(b"from") == 2 and b"x-other" not in signed
    added = b"From: evil@example.test\n" + sig + msg
    assert verify(sig + msg, records(keyed)) == [True]
    assert verify(added, records(keyed)) == [False]  # a second From breaks it


def test_rsa_and_ed25519_selectors_give_two_signatures(keyed: Home) -> None:
    dkim.keygen(keyed, "example.test", "e1", ed=True)
    (keyed.control / "dkim/example.test/selector").write_text("s1\n# comment\ne1\n")
    sig = dkim.Signer(keyed).signature(MSG)
    assert sig.count(b"DKIM-Signature:") == 2
    assert b"a=ed25519-sha256" in sig and b"a=rsa-sha256" in sig
    assert verify(sig + MSG, records(keyed)) == [True, True]
    assert verify(sig + MSG + b"x\n", records(keyed)) == [False, False]


@pytest.mark.parametrize(
    "header",
    [
        b"From: someone@nokey.test\n",  # a domain with no key
        b"From: someone@sub.example.test\n",  # exact domain only: no parent fall-back
        b"To: x@y\n",  # no From
        b"From: a@example.test\nFrom: b@example.test\n",  # two From fields
        b"From: a@example.test, b@example.test\n",  # two authors
        b"From: undisclosed\n",
        b"From: a@\xe9xample.test\n",  # 8-bit domain
        b"From: a@../../etc\n",
        b"From: <>\n",
    ],
)
def test_what_is_not_signed(keyed: Home, header: bytes) -> None:
    logged: list[str] = []
    assert dkim.Signer(keyed, log=logged.append).signature(header + b"\nbody\n") == b""


@pytest.mark.parametrize(
    ("header", "domain"),
    [
        (b"From: someone@example.test\n", "example.test"),
        (b'from:   "A, B" <a@EXAMPLE.test.>\n', "example.test"),
        (b"From: A\n <a@example.test>\nSubject: x\n", "example.test"),
        (b"Subject: From: x@evil.test\nFrom: a@example.test\n", "example.test"),
        (b"From: =?utf-8?q?=C3=A9?= \xe9\xff <a@example.test>\n", "example.test"),
        (b"From: a@example.test\r\nTo: b\r\n", "example.test"),
    ],
)
def test_from_domain(header: bytes, domain: str) -> None:
    assert dkim.from_domain(header) == domain


def test_hostile_headers_have_a_defined_result(keyed: Home) -> None:
    s = dkim.Signer(keyed, log=lambda _: None)
    big = b"X-Big: " + b"a" * 100_000 + b"\n" + MSG
    sig = s.signature(big)
    assert verify(sig + big, records(keyed)) == [True]
    eight = b"Subject: caf\xe9 \xff\xfe\n" + MSG
    sig = s.signature(eight)
    assert sig and verify(sig + eight, records(keyed)) == [True]
    many = b"".join(b"X-%d: v\n" % i for i in range(5000)) + MSG
    assert verify(s.signature(many) + many, records(keyed)) == [True]
    assert s.signature(b"") == b"" and s.signature(b"\n\n\n") == b""
    assert s.signature(b"From: a@example.test") != b""  # no body, no final newline


def test_an_unreadable_or_missing_key_is_no_signature_and_a_log_line(keyed: Home) -> None:
    logged: list[str] = []
    (keyed.control / "dkim/example.test/selector").write_text("s1\nnone\n")
    sig = dkim.Signer(keyed, log=logged.append).signature(MSG)
    assert sig.count(b"DKIM-Signature") == 1 and any("none.key" in x for x in logged)
    (keyed.control / "dkim/example.test/s1.key").write_bytes(b"-----BEGIN junk\n")
    logged.clear()
    assert dkim.Signer(keyed, log=logged.append).signature(MSG) == b""
    assert any("not signed with s1._domainkey.example.test" in x for x in logged)


class Inner:
    """A queue Pending as the writer's: records what reaches it."""

    def __init__(self) -> None:
        self.msgnum, self.qp = 0, 42
        self.data = bytearray()
        self.committed: tuple[bytes, list[bytes]] | None = None
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def commit(self, sender: bytes, recipients: Iterable[bytes]) -> int:
        self.committed = (sender, list(recipients))
        self.msgnum = 7
        return 7

    def abort(self) -> None:
        self.aborted = True


def test_signing_pending_signs_at_commit(keyed: Home) -> None:
    inner = Inner()
    p = dkim.signing(keyed, inner)
    assert isinstance(p, dkim.SigningPending) and p.qp == 42
    for i in range(0, len(MSG), 7):
        p.write(MSG[i : i + 7])
    assert inner.data == b""  # held until commit
    assert p.commit(b"s@x", iter([b"r@y"])) == 7 and p.msgnum == 7
    assert inner.committed == (b"s@x", [b"r@y"])
    assert inner.data.startswith(b"DKIM-Signature:") and inner.data.endswith(MSG)
    assert verify(bytes(inner.data), records(keyed)) == [True]


def test_a_message_over_the_bound_is_queued_unsigned(keyed: Home) -> None:
    inner, logged = Inner(), []
    p = dkim.SigningPending(inner, dkim.Signer(keyed, log=logged.append), limit=1000)
    p.write(MSG)
    p.write(b"x" * 1000 + b"\n")
    assert inner.data == MSG + b"x" * 1000 + b"\n"  # written through at once
    p.write(b"more\n")
    p.commit(b"", [b"r@y"])
    assert b"DKIM-Signature" not in inner.data and inner.data.endswith(b"more\n")
    assert logged == ["message over 1000 bytes: queued unsigned"]


def test_abort_reaches_the_queue_and_no_keys_means_no_wrapper(home: Home, keyed: Home) -> None:
    inner = Inner()
    p = dkim.signing(keyed, inner)
    p.write(MSG)
    p.abort()
    assert inner.aborted and inner.data == b""
    other = Home(Path(str(keyed.root) + "-none"), single_user=True)
    assert dkim.signing(other, inner) is inner


@pytest.mark.parametrize(
    ("bits", "fmt", "algorithm"),
    [
        (2048, "TraditionalOpenSSL", b"rsa-sha256"),
        (1024, "PKCS8", b"rsa-sha256"),
        (3072, "TraditionalOpenSSL", b"rsa-sha256"),
        (1024, "TraditionalOpenSSL", b"rsa-sha1"),
    ],
)
def test_fast_rsa_gives_dkimpys_own_bytes(
    monkeypatch: pytest.MonkeyPatch, bits: int, fmt: str, algorithm: bytes
) -> None:
    """The signature made through OpenSSL (dkim.fast_rsa) is byte for byte the one dkimpy
    computes alone (RSASSA-PKCS1-v1_5 is deterministic), and dkimpy verifies it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, getattr(serialization.PrivateFormat, fmt),
                            serialization.NoEncryption())  # fmt: skip
    monkeypatch.setattr(dkimpy.time, "time", lambda: 1_765_000_000)  # the same t= twice
    crlf = MSG.replace(b"\n", b"\r\n")

    def sign() -> bytes:
        return bytes(dkimpy.sign(crlf, b"s1", b"example.test", pem, signature_algorithm=algorithm))

    original = dkimpy.RSASSA_PKCS1_v1_5_sign
    assert original is dkimpy.crypto.RSASSA_PKCS1_v1_5_sign or original is dkim._rsa_sign
    monkeypatch.setattr(dkimpy, "RSASSA_PKCS1_v1_5_sign", dkimpy.crypto.RSASSA_PKCS1_v1_5_sign)
    slow = sign()
    assert dkim.fast_rsa(dkimpy) and dkimpy.RSASSA_PKCS1_v1_5_sign is dkim._rsa_sign
    fast = sign()
    assert fast == slow
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    rec = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    assert dkimpy.verify(fast + crlf, dnsfunc=lambda name, timeout=5: rec, minkey=1024)


def test_fast_rsa_leaves_an_unexpected_dkimpy_alone() -> None:
    class Other:
        RSASSA_PKCS1_v1_5_sign = staticmethod(lambda h, k: b"")
        crypto = None

    other = Other()
    assert not dkim.fast_rsa(other)
    assert other.RSASSA_PKCS1_v1_5_sign is Other.RSASSA_PKCS1_v1_5_sign
