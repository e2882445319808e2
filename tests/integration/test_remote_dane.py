"""DANE (RFC 7672) in remote delivery, end to end over real sockets and a real DNSSEC chain:
Debian's NSD serves a zone ``test.`` signed here with dnspython (ECDSA P-256, NSEC) and an
unsigned child ``insecure.test.`` (a delegation without DS); Debian's dnsmasq with
``--dnssec`` and ``test.``'s key as trust anchor is the validating resolver on loopback
that the agent asks. The SMTP peers offer STARTTLS with a trustme certificate (DANE-EE
needs no CA: the TLSA records name the certificate's key or the certificate itself)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.asyncresolver
import dns.dnssec
import dns.exception
import dns.flags
import dns.resolver
import dns.zone
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote import dane
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.remote.mx import make_resolver
from pyqmail.send.explain import explain_address
from tests.conftest import free_port, require_tools, write_control
from tests.integration.test_remote_peers import Peer, Script

_R = os.urandom(2)
MX_A, MX_B = f"127.{_R[0] % 200 + 20}.{_R[1]}.21", f"127.{_R[0] % 200 + 20}.{_R[1]}.22"
WRONG = "ab" * 32  # a SHA-256 that matches no certificate
ROOT_DS = "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"  # the root KSK


@pytest.fixture(scope="module")
def leaf() -> trustme.LeafCert:
    names = ["mx.good.test", "mx1.two.test", "mx2.two.test", "mx.notls.test", "mx.ta.test"]
    return trustme.CA().issue_cert(*names)


def _der(leaf: trustme.LeafCert) -> bytes:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return cert.public_bytes(Encoding.DER)


def zone_text(leaf: trustme.LeafCert) -> str:
    der = _der(leaf)
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    spki256, cert256 = hashlib.sha256(spki).hexdigest(), hashlib.sha256(der).hexdigest()
    return f"""$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
ns A 127.0.0.1
good MX 10 mx.good.test.
mx.good A 127.0.0.1
_25._tcp.mx.good TLSA 3 1 1 {spki256}
two MX 10 mx1.two.test.
two MX 20 mx2.two.test.
mx1.two A {MX_A}
mx2.two A {MX_B}
_25._tcp.mx1.two TLSA 3 1 1 {WRONG}
_25._tcp.mx2.two TLSA 3 0 1 {cert256}
notls MX 10 mx.notls.test.
mx.notls A 127.0.0.1
_25._tcp.mx.notls TLSA 3 1 1 {spki256}
ta MX 10 mx.ta.test.
mx.ta A 127.0.0.1
_25._tcp.mx.ta TLSA 2 0 1 {WRONG}
plain MX 10 mx.plain.test.
mx.plain A 127.0.0.1
bogus MX 10 mx.bogus.test.
mx.bogus A 127.0.0.1
_25._tcp.mx.bogus TLSA 3 1 1 {"cd" * 32}
insecure NS ns.insecure.test.
ns.insecure A 127.0.0.1
"""


INSECURE_ZONE = f"""$TTL 300
@ SOA ns.insecure.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.insecure.test.
ns A 127.0.0.1
@ MX 10 mx.insecure.test.
mx A 127.0.0.1
_25._tcp.mx TLSA 3 1 1 {WRONG}
"""


def sign(text: str) -> tuple[str, str]:
    """The signed zone ``test.`` (one record's data changed after signing, so that its
    signature is bogus) and dnsmasq's ``--trust-anchor`` for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    dnskey = dns.dnssec.make_dnskey(
        key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256, flags=257
    )
    z = dns.zone.from_text(text, "test.", relativize=False)
    now = datetime.now(UTC)
    dns.dnssec.sign_zone(
        z, keys=[(key, dnskey)], inception=now - timedelta(hours=1),
        expiration=now + timedelta(days=2),
    )  # fmt: skip
    signed = z.to_text(relativize=False)
    assert signed.count("cd" * 32) == 1
    signed = signed.replace("cd" * 32, "ce" * 32)  # mx.bogus's TLSA: a bogus signature
    ds = dns.dnssec.make_ds("test.", dnskey, "SHA256")
    anchor = f"test.,{ds.key_tag},{ds.algorithm},{ds.digest_type},{ds.digest.hex()}"
    return signed, anchor


def _wait_answer(port: int, name: str, proc: subprocess.Popen[bytes], what: str) -> None:
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port, res.lifetime = ["127.0.0.1"], port, 0.3
    deadline = time.monotonic() + 10
    while True:
        try:
            res.resolve(name, "A")
            return
        except dns.exception.DNSException:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _, err = proc.communicate()
                raise RuntimeError(f"{what} did not start: {err!r}") from None


@pytest.fixture(scope="module")
def resolver_spec(
    tmp_path_factory: pytest.TempPathFactory, leaf: trustme.LeafCert
) -> Iterator[str]:
    """NSD (authoritative, signed ``test.``) behind dnsmasq --dnssec; yields dnsmasq's
    ``127.0.0.1:PORT``."""
    require_tools("nsd", "dnsmasq")
    d = tmp_path_factory.mktemp("dnssec")
    signed, anchor = sign(zone_text(leaf))
    (d / "test.zone").write_text(signed)
    (d / "insecure.zone").write_text(INSECURE_ZONE)
    nsd_port, dns_port = free_port(), free_port()
    (d / "nsd.conf").write_text(f"""server:
  ip-address: 127.0.0.1@{nsd_port}
  port: {nsd_port}
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  pidfile: "{d}/nsd.pid"
  xfrdfile: "{d}/xfrd.state"
  zonelistfile: "{d}/zone.list"
  server-count: 1
remote-control:
  control-enable: no
zone:
  name: test.
  zonefile: test.zone
zone:
  name: insecure.test.
  zonefile: insecure.zone
""")
    nsd = subprocess.Popen(["nsd", "-d", "-c", str(d / "nsd.conf")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    masq: subprocess.Popen[bytes] | None = None
    try:
        _wait_answer(nsd_port, "mx.good.test", nsd, "nsd")
        # dnsmasq insists on a root anchor; the root's own (never used: only test. is
        # forwarded anywhere) and test.'s, which anchors everything these tests ask.
        root = "--trust-anchor=.,20326,8,2," + ROOT_DS
        masq = subprocess.Popen(
            ["dnsmasq", "-k", "--no-resolv", "--no-hosts", f"--port={dns_port}",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--pid-file={d / 'dm.pid'}",
             *(["--user=root"] if os.geteuid() == 0 else []), "--dnssec", root,
             f"--trust-anchor={anchor}", f"--server=/test/127.0.0.1#{nsd_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _wait_answer(dns_port, "mx.good.test", masq, "dnsmasq")
        yield f"127.0.0.1:{dns_port}"
    finally:
        for p in (masq, nsd):
            if p is not None:
                p.terminate()
                p.wait(5)


@pytest.fixture
def mess(tmp_path: Path) -> Path:
    p = tmp_path / "mess"
    p.write_bytes(b"Subject: dane\n\nsecret body\n")
    return p


def server_ctx(leaf: trustme.LeafCert) -> object:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    return ctx


def make_agent(home: Home, spec: str, port: int) -> RemoteAgent:
    # No CA file: a DANE-EE match is the only thing that can authenticate these peers.
    return RemoteAgent(
        home, ControlCache(home), port=port, resolver=make_resolver(spec, lifetime=3),
        own_ips=[], idle_timeout=0, mtasts_port=free_port(),
    )  # fmt: skip


def send(home: Home, spec: str, script: Script, mess: Path, domain: str) -> tuple[Outcome, Peer]:
    async def go() -> tuple[Outcome, Peer]:
        async with Peer(script) as peer:
            agent = make_agent(home, spec, peer.port)
            (o,) = await agent.deliver(mess, "a@mx.test.example", [f"b@{domain}"])
            await agent.close()
        return o, peer

    return asyncio.run(go())


def tls_script(leaf: trustme.LeafCert) -> Script:
    return Script(starttls=server_ctx(leaf), tls_first_only=False)  # type: ignore[arg-type]


def test_the_resolver_validates(resolver_spec: str) -> None:
    """The set-up itself: AD on the signed zone, none on the unsigned child, SERVFAIL for
    the record whose signature was changed."""
    res = make_resolver(resolver_spec, lifetime=3)
    assert dane.ask_dnssec(res)

    async def ask(name: str) -> dns.resolver.Answer:
        return await res.resolve(name, "TLSA")

    good = asyncio.run(ask("_25._tcp.mx.good.test"))
    assert good.response.flags & dns.flags.AD
    insecure = asyncio.run(ask("_25._tcp.mx.insecure.test"))
    assert insecure.rrset is not None and not insecure.response.flags & dns.flags.AD
    with pytest.raises(dns.resolver.NoNameservers):
        asyncio.run(ask("_25._tcp.mx.bogus.test"))


def test_a_matching_tlsa_record_delivers_over_tls(
    home: Home, resolver_spec: str, leaf: trustme.LeafCert, mess: Path
) -> None:
    o, peer = send(home, resolver_spec, tls_script(leaf), mess, "good.test")
    assert o.status is Status.OK, o.text
    assert peer.tls_used == [True] and len(peer.messages) == 1


def test_a_mismatching_tlsa_record_defers_that_mx_and_the_next_one_delivers(
    home: Home, resolver_spec: str, leaf: trustme.LeafCert, mess: Path
) -> None:
    async def go() -> tuple[Outcome, Peer, Peer]:
        bad = Peer(tls_script(leaf))
        good = Peer(tls_script(leaf))
        await good.start(MX_B)
        bad._server = await asyncio.start_server(bad._handle, MX_A, good.port)
        bad.port = good.port
        try:
            agent = make_agent(home, resolver_spec, good.port)
            (o,) = await agent.deliver(mess, "a@x.test", ["b@two.test"])
            await agent.close()
        finally:
            await bad.close()
            await good.close()
        return o, bad, good

    o, bad, good = asyncio.run(go())
    assert o.status is Status.OK, o.text
    assert bad.connections == 1 and bad.messages == []  # the handshake, then nothing
    assert good.tls_used == [True] and len(good.messages) == 1  # TLSA 3 0 1: whole cert


def test_only_a_mismatching_mx_defers_naming_dane(
    home: Home, resolver_spec: str, leaf: trustme.LeafCert, mess: Path
) -> None:
    async def go() -> tuple[Outcome, Peer]:
        async with Peer(tls_script(leaf)) as peer:
            # mx2 (its TLSA matches) is down: only mx1, whose TLSA does not match, answers.
            peer._server.close()  # type: ignore[union-attr]
            await peer._server.wait_closed()  # type: ignore[union-attr]
            peer._server = await asyncio.start_server(peer._handle, MX_A, peer.port)
            agent = make_agent(home, resolver_spec, peer.port)
            (o,) = await agent.deliver(mess, "a@x.test", ["b@two.test"])
            await agent.close()
        return o, peer

    o, peer = asyncio.run(go())
    assert o.status is Status.TEMP, o.text
    assert "matches none of the DANE TLSA records" in o.text, o.text
    assert "TLS is required for mx1.two.test by its DANE TLSA records. (#4.7.5)" in o.text
    assert peer.messages == [] and peer.connections == 1  # never plaintext


def test_a_server_without_starttls_defers(home: Home, resolver_spec: str, mess: Path) -> None:
    o, peer = send(home, resolver_spec, Script(), mess, "notls.test")
    assert o.status is Status.TEMP
    assert "does not offer STARTTLS; TLS is required for mx.notls.test by its DANE" in o.text
    assert peer.messages == []


def test_a_bogus_tlsa_signature_defers_without_connecting(
    home: Home, resolver_spec: str, mess: Path
) -> None:
    o, peer = send(home, resolver_spec, Script(), mess, "bogus.test")
    assert o.status is Status.TEMP
    assert "DANE TLSA lookup for mx.bogus.test failed" in o.text and "(#4.7.5)" in o.text
    assert peer.connections == 0


def test_tlsa_in_an_insecure_zone_is_ignored(home: Home, resolver_spec: str, mess: Path) -> None:
    o, peer = send(home, resolver_spec, Script(), mess, "insecure.test")
    assert o.status is Status.OK, o.text
    assert peer.tls_used == [False] and len(peer.messages) == 1


def test_a_signed_zone_without_tlsa_delivers_as_ever(
    home: Home, resolver_spec: str, mess: Path
) -> None:
    o, peer = send(home, resolver_spec, Script(), mess, "plain.test")
    assert o.status is Status.OK, o.text
    assert peer.tls_used == [False]


def test_only_unusable_records_mean_tls_without_authentication(
    home: Home, resolver_spec: str, leaf: trustme.LeafCert, mess: Path
) -> None:
    """DANE-TA (usage 2) is not supported: TLS is mandatory, the certificate unchecked."""
    o, peer = send(home, resolver_spec, tls_script(leaf), mess, "ta.test")
    assert o.status is Status.OK, o.text
    assert peer.tls_used == [True]
    o, peer = send(home, resolver_spec, Script(), mess, "ta.test")
    assert o.status is Status.TEMP and "by its DANE TLSA records" in o.text
    assert peer.messages == []


def test_a_route_skips_dane(home: Home, resolver_spec: str, mess: Path) -> None:
    async def go() -> tuple[Outcome, Peer]:
        async with Peer(Script()) as peer:
            write_control(home, "smtproutes", f"notls.test:127.0.0.1:{peer.port}\n")
            agent = make_agent(home, resolver_spec, peer.port)
            (o,) = await agent.deliver(mess, "a@x.test", ["b@notls.test"])
            await agent.close()
        return o, peer

    o, peer = asyncio.run(go())
    assert o.status is Status.OK, o.text
    assert peer.tls_used == [False]


def test_a_resolver_off_loopback_is_not_trusted() -> None:
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = ["192.0.2.1"]
    assert not dane.trusted(res) and not dane.ask_dnssec(res)
    res.nameservers = ["127.0.0.1", "::1"]
    assert dane.trusted(res)
    res.nameservers = ["127.0.0.1", "192.0.2.1"]
    assert not dane.trusted(res)


def test_explain_shows_the_tlsa_state(home: Home, resolver_spec: str) -> None:
    def text(addr: str) -> str:
        return explain_address(home, addr, resolver=make_resolver(resolver_spec, lifetime=3)).text()

    assert "DANE: mx.good.test: TLSA records (DANE-EE): TLS required" in text("b@good.test")
    assert "DANE: mx.ta.test: only unusable TLSA records" in text("b@ta.test")
    assert "DANE: mx.bogus.test: the TLSA lookup failed" in text("b@bogus.test")
    assert "DANE: mx.plain.test: validated, no TLSA records" in text("b@plain.test")
    assert "DANE: mx.insecure.test: not used" in text("b@insecure.test")
    assert "DANE" not in explain_address(home, "b@good.test", dns=False).text()
