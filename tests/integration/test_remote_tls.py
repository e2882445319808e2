"""STARTTLS in remote delivery: opportunistic, required (control/tlsdestinations), failures."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote.deliver import RemoteAgent
from tests.conftest import write_control
from tests.integration.test_remote_peers import Peer, Script


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cert")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(crt), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


def server_ctx(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


@pytest.fixture
def mess(tmp_path: Path) -> Path:
    p = tmp_path / "mess"
    p.write_bytes(b"Subject: tls\n\nsecret body\n")
    return p


def run(home: Home, script: Script, mess: Path, cafile: str | None = None) -> tuple[Outcome, Peer]:
    async def go() -> tuple[Outcome, Peer]:
        async with Peer(script) as peer:
            write_control(home, "smtproutes", f"remote.example:[127.0.0.1]:{peer.port}\n")
            agent = RemoteAgent(home, ControlCache(home), tls_cafile=cafile)
            (o,) = await agent.deliver(mess, "a@test.example", ["b@remote.example"])
            await agent.close()
        return o, peer

    return asyncio.run(go())


def test_opportunistic_tls_is_used_when_offered(
    home: Home, mess: Path, cert: tuple[Path, Path]
) -> None:
    o, peer = run(home, Script(starttls=server_ctx(cert)), mess)
    assert o.status is Status.OK
    assert peer.tls_used == [True]
    assert peer.messages[0][2] == b"Subject: tls\r\n\r\nsecret body\r\n"
    # EHLO again after the handshake
    assert [c for c in peer.commands if c.startswith(b"EHLO")] == [b"EHLO mx.test.example\r\n"] * 2


def test_required_tls_with_a_verified_certificate(
    home: Home, mess: Path, cert: tuple[Path, Path]
) -> None:
    write_control(home, "tlsdestinations", ".example\n")
    o, peer = run(home, Script(starttls=server_ctx(cert)), mess, cafile=str(cert[0]))
    assert o.status is Status.OK and peer.tls_used == [True]


def test_required_tls_with_an_unverifiable_certificate_is_temporary(
    home: Home, mess: Path, cert: tuple[Path, Path]
) -> None:
    write_control(home, "tlsdestinations", "remote.example\n")
    o, peer = run(home, Script(starttls=server_ctx(cert)), mess)  # system CAs: no match
    assert o.status is Status.TEMP
    assert "TLS handshake failed" in o.text and "required for remote.example" in o.text
    assert peer.messages == [] and peer.connections == 1  # never plaintext


def test_required_tls_not_offered_is_temporary(home: Home, mess: Path) -> None:
    write_control(home, "tlsdestinations", "remote.example\n")
    o, peer = run(home, Script(), mess)
    assert o.status is Status.TEMP
    assert "does not offer STARTTLS" in o.text
    assert peer.messages == []


def test_handshake_failure_falls_back_to_plaintext_when_opportunistic(
    home: Home, mess: Path
) -> None:
    o, peer = run(home, Script(broken_tls=True), mess)
    assert o.status is Status.OK
    assert peer.connections == 2
    assert peer.tls_used == [False]
    assert peer.commands.count(b"STARTTLS\r\n") == 1


def test_plaintext_retry_never_tries_starttls_again(home: Home, mess: Path) -> None:
    o, peer = run(home, Script(broken_tls=True, tls_first_only=False), mess)
    assert o.status is Status.OK and peer.tls_used == [False]
    assert peer.commands.count(b"STARTTLS\r\n") == 1 and peer.connections == 2


def test_kept_tls_connection_is_reused_without_a_second_handshake(
    home: Home, mess: Path, cert: tuple[Path, Path]
) -> None:
    async def go() -> tuple[list[Status], Peer]:
        async with Peer(Script(starttls=server_ctx(cert))) as peer:
            write_control(home, "smtproutes", f"remote.example:[127.0.0.1]:{peer.port}\n")
            agent = RemoteAgent(home, ControlCache(home))
            got = []
            for i in range(3):
                (o,) = await agent.deliver(mess, "a@test.example", [f"b{i}@remote.example"])
                got.append(o.status)
            await agent.close()
        return got, peer

    got, peer = asyncio.run(go())
    assert got == [Status.OK] * 3
    assert peer.connections == 1 and peer.tls_used == [True, True, True]
    assert peer.commands.count(b"STARTTLS\r\n") == 1


def test_tls_required_domains_never_reuse(home: Home, mess: Path, cert: tuple[Path, Path]) -> None:
    write_control(home, "tlsdestinations", "remote.example\n")

    async def go() -> Peer:
        async with Peer(Script(starttls=server_ctx(cert), tls_first_only=False)) as peer:
            write_control(home, "smtproutes", f"remote.example:[127.0.0.1]:{peer.port}\n")
            agent = RemoteAgent(home, ControlCache(home), tls_cafile=str(cert[0]))
            for i in range(2):
                (o,) = await agent.deliver(mess, "a@test.example", [f"b{i}@remote.example"])
                assert o.status is Status.OK
            assert len(agent.pool) == 0
        return peer

    peer = asyncio.run(go())
    assert peer.connections == 2 and peer.tls_used == [True, True]
