"""A smarthost with AUTH: control/smtproutesauth, control/smtproutestls, implicit TLS.

The relay is a real SMTP server on 127.0.0.1 (asyncio streams) with STARTTLS and AUTH
PLAIN/LOGIN, its certificate issued by a trustme CA; it checks the credentials, refuses
MAIL before AUTH (530) and records every line it read, so a test can assert what was (not)
sent in clear.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote.deliver import RemoteAgent
from tests.conftest import write_control

USER = b"relayuser@test.example"
PASSWORD = b"s3cr:et pass#word"  # a colon, a space and a '#': only the first two colons split
AUTHLINE = "[127.0.0.1]:relayuser@test.example:s3cr:et pass#word\n"


@dataclass
class AuthRelay:
    """An SMTP relay that wants AUTH. ``tls``: STARTTLS with this context (None: none);
    ``implicit``: TLS from the first byte instead; ``clear_auth``: announce AUTH before
    TLS too (a trap for a client that would send credentials in clear)."""

    tls: ssl.SSLContext | None
    implicit: bool = False
    mechs: bytes = b"PLAIN LOGIN"
    clear_auth: bool = False
    echo_secret: bool = False  # the 535 reply quotes what the client sent
    require_auth: bool = True  # refuse MAIL before AUTH
    users: dict[bytes, bytes] = field(default_factory=lambda: {USER: PASSWORD})
    port: int = 0
    lines: list[tuple[bool, bytes]] = field(default_factory=list)  # (under TLS, line)
    authed: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    carried_by: list[tuple[int, bool]] = field(default_factory=list)  # (connection, authed)
    connections: int = 0
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> AuthRelay:
        ssl_ctx = self.tls if self.implicit else None
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        if self._tasks:  # the sessions end once the client has QUIT or closed
            await asyncio.wait(self._tasks, timeout=5)
        await self._server.wait_closed()

    def auth_lines(self) -> list[tuple[bool, bytes]]:
        return [(t, line) for t, line in self.lines if line.upper().startswith(b"AUTH")]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._talk(r, w)
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            w.transport.abort()

    async def _read(self, r: asyncio.StreamReader, tls: bool) -> bytes:
        line = await r.readline()
        self.lines.append((tls, line))
        return line

    async def _talk(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tls = self.implicit
        authed = False
        conn = self.connections
        w.write(b"220 relay.test ESMTP\r\n")
        while line := await self._read(r, tls):
            u = line.strip().upper()
            if u.startswith(b"EHLO"):
                caps = [b"relay.test", b"PIPELINING"]
                if not tls and self.tls is not None:
                    caps.append(b"STARTTLS")
                if tls or self.clear_auth:
                    caps.append(b"AUTH " + self.mechs)
                w.write(b"".join(b"250-" + c + b"\r\n" for c in caps[:-1]))
                w.write(b"250 " + caps[-1] + b"\r\n")
            elif u == b"STARTTLS" and self.tls is not None and not tls:
                w.write(b"220 go ahead\r\n")
                await w.drain()
                await w.start_tls(self.tls)
                tls = True
            elif u.startswith(b"AUTH "):
                user, password = await self._auth(r, w, line.strip().split(b" "), tls)
                if user is not None and self.users.get(user) == password:
                    authed = True
                    self.authed.append(user)
                    w.write(b"235 2.7.0 Authentication successful\r\n")
                else:
                    said = b" (" + line.strip() + b")" if self.echo_secret else b""
                    w.write(b"535 5.7.8 Authentication credentials invalid" + said + b"\r\n")
            elif u.startswith(b"MAIL"):
                ok = authed or not self.require_auth
                w.write(b"250 ok\r\n" if ok else b"530 5.7.0 Authentication required\r\n")
            elif u.startswith(b"RCPT"):
                ok = authed or not self.require_auth
                w.write(b"250 ok\r\n" if ok else b"554 5.7.1 Relay access denied\r\n")
            elif u == b"DATA":
                if not (authed or not self.require_auth):
                    w.write(b"503 no valid recipients\r\n")
                    continue
                w.write(b"354 go\r\n")
                body = bytearray()
                while (chunk := await r.readline()) not in (b".\r\n", b""):
                    body += chunk
                self.messages.append(bytes(body))
                self.carried_by.append((conn, authed))
                w.write(b"250 2.0.0 queued\r\n")
            elif u == b"QUIT":
                w.write(b"221 bye\r\n")
                await w.drain()
                return
            else:
                w.write(b"502 5.5.2 unknown\r\n")
            await w.drain()

    async def _auth(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, words: list[bytes], tls: bool
    ) -> tuple[bytes | None, bytes | None]:
        mech = words[1].upper()
        if mech == b"PLAIN":
            if len(words) > 2:
                blob = words[2]
            else:
                w.write(b"334 \r\n")
                await w.drain()
                blob = (await self._read(r, tls)).strip()
            parts = base64.b64decode(blob).split(b"\0")
            return (parts[1], parts[2]) if len(parts) == 3 else (None, None)
        if mech == b"LOGIN":
            got = []
            for prompt in (b"VXNlcm5hbWU6", b"UGFzc3dvcmQ6"):
                w.write(b"334 " + prompt + b"\r\n")
                await w.drain()
                got.append(base64.b64decode((await self._read(r, tls)).strip()))
            return got[0], got[1]
        return None, None


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cafile(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return str(p)


def server_ctx(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*(names or ("127.0.0.1",))).configure_cert(ctx)
    return ctx


@pytest.fixture
def mess(tmp_path: Path) -> Path:
    p = tmp_path / "mess"
    p.write_bytes(b"Subject: via the smarthost\n\nhello\n")
    return p


def deliver(
    home: Home,
    relay: AuthRelay,
    mess: Path,
    *,
    cafile: str | None,
    n: int = 1,
    implicit: bool = False,
) -> list[Outcome]:
    async def go() -> list[Outcome]:
        async with relay:
            write_control(home, "smtproutes", f":[127.0.0.1]:{relay.port}\n")
            agent = RemoteAgent(
                home,
                ControlCache(home),
                tls_cafile=cafile,
                implicit_tls_port=relay.port if implicit else 465,
            )
            got = []
            for i in range(n):
                got += await agent.deliver(mess, "a@test.example", [f"b{i}@far.example"])
            await agent.close()
        return got

    return asyncio.run(go())


def secrets() -> list[bytes]:
    return [
        PASSWORD,
        base64.b64encode(b"\0" + USER + b"\0" + PASSWORD),
        base64.b64encode(PASSWORD),
    ]


def assert_no_secret(text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for s in secrets():
        assert s not in data


def test_starttls_then_auth_plain_then_the_message(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(server_ctx(ca))
    (o,) = deliver(home, relay, mess, cafile=cafile)
    assert o.status is Status.OK, o.text
    assert relay.messages == [b"Subject: via the smarthost\r\n\r\nhello\r\n"]
    assert relay.authed == [USER]
    # AUTH went only over TLS, after the second EHLO; the password is the whole rest
    ((tls, line),) = relay.auth_lines()
    assert tls and line.startswith(b"AUTH PLAIN ")
    assert base64.b64decode(line.split()[2]) == b"\0" + USER + b"\0" + PASSWORD
    ehlo = [t for t, line in relay.lines if line.startswith(b"EHLO")]
    assert ehlo == [False, True]


def test_auth_login_when_only_login_is_offered(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(server_ctx(ca), mechs=b"LOGIN CRAM-MD5")
    (o,) = deliver(home, relay, mess, cafile=cafile)
    assert o.status is Status.OK, o.text
    assert relay.authed == [USER]
    assert [line for _, line in relay.auth_lines()] == [b"AUTH LOGIN\r\n"]


def test_no_starttls_defers_and_never_sends_credentials(
    home: Home, cafile: str, mess: Path
) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(None, clear_auth=True)  # offers AUTH in clear, no STARTTLS
    (o,) = deliver(home, relay, mess, cafile=cafile)
    assert o.status is Status.TEMP
    assert "does not offer STARTTLS" in o.text and "never sent in clear" in o.text
    assert relay.auth_lines() == [] and relay.messages == []
    assert not any(line.startswith(b"MAIL") for _, line in relay.lines)
    for _, line in relay.lines:
        assert_no_secret(line)


def test_unverifiable_certificate_defers_before_any_credentials(
    home: Home, ca: trustme.CA, mess: Path
) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(server_ctx(ca, "other.test"))  # not 127.0.0.1, and not our CA
    (o,) = deliver(home, relay, mess, cafile=None)
    assert o.status is Status.TEMP and "TLS handshake failed" in o.text
    assert relay.auth_lines() == [] and relay.connections == 1  # no plaintext retry


def test_wrong_password_defers_with_the_servers_text_and_no_secret(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(server_ctx(ca), users={USER: b"another password"}, echo_secret=True)
    (o,) = deliver(home, relay, mess, cafile=cafile)
    assert o.status is Status.TEMP  # our configuration is wrong: wait, do not bounce
    assert "authentication as relayuser@test.example failed" in o.text
    assert "535 5.7.8 Authentication credentials invalid" in o.text
    assert "[hidden]" in o.text  # the server quoted the AUTH line; it is not passed on
    assert_no_secret(o.text)
    assert relay.messages == []


def test_the_qmail_remote_reports_carry_no_secret(
    home: Home, ca: trustme.CA, cafile: str, mess: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    monkeypatch.setenv("PYQMAIL_TLS_CAFILE", cafile)
    relay = AuthRelay(server_ctx(ca), users={USER: b"x"}, echo_secret=True)

    async def go() -> bytes:
        async with relay:
            write_control(home, "smtproutes", f"far.example:[127.0.0.1]:{relay.port}\n")
            agent = RemoteAgent(home, ControlCache(home), idle_timeout=0)
            with open(mess, "rb") as f:
                res = await agent.transmit(f, "far.example", b"a@test.example", [b"b@far.example"])
            return res.reports()

    out = asyncio.run(go())
    assert out.startswith(b"ZConnected to 127.0.0.1 but authentication as") and b"(#4.7.8)" in out
    assert_no_secret(out)


def test_implicit_tls_port(home: Home, ca: trustme.CA, cafile: str, mess: Path) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(server_ctx(ca), implicit=True)
    (o,) = deliver(home, relay, mess, cafile=cafile, implicit=True)
    assert o.status is Status.OK, o.text
    assert all(tls for tls, _ in relay.lines)  # TLS from the first byte
    assert [line for _, line in relay.lines if line.startswith(b"STARTTLS")] == []
    assert relay.authed == [USER]


def test_implicit_tls_without_credentials_is_opportunistic(
    home: Home, ca: trustme.CA, mess: Path
) -> None:
    relay = AuthRelay(server_ctx(ca, "other.test"), implicit=True, users={})
    # no credentials: opportunistic TLS (the certificate is not checked), no AUTH; this
    # relay then refuses MAIL, which shows the dialogue ran over TLS
    (o,) = deliver(home, relay, mess, cafile=None, implicit=True)
    assert all(tls for tls, _ in relay.lines) and relay.auth_lines() == []
    assert o.status is Status.PERM and "530 5.7.0 Authentication required" in o.text


def test_a_route_without_credentials_is_unchanged(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    # credentials for another relay only: this route gets today's opportunistic TLS
    write_control(home, "smtproutesauth", "other.relay.example:u:p\n")
    relay = AuthRelay(server_ctx(ca, "other.test"))
    (o,) = deliver(home, relay, mess, cafile=None)
    assert relay.auth_lines() == [] and [t for t, _ in relay.lines][-1] is True
    assert o.status is Status.PERM and "530" in o.text  # this relay wants AUTH: refused


def test_authenticated_connection_is_reused(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(server_ctx(ca))
    got = deliver(home, relay, mess, cafile=cafile, n=3)
    assert [o.status for o in got] == [Status.OK] * 3
    assert relay.connections == 1 and len(relay.auth_lines()) == 1
    assert len(relay.messages) == 3


def test_pinned_certificate(home: Home, ca: trustme.CA, mess: Path, tmp_path: Path) -> None:
    leaf = ca.issue_cert("private-relay.internal")  # neither the name nor a known CA
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    digest = hashlib.sha256(der).hexdigest().upper()
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2))  # openssl's way
    write_control(home, "smtproutesauth", AUTHLINE)
    write_control(home, "smtproutestls", f"127.0.0.1:sha256:{colons}\n")
    relay = AuthRelay(ctx)
    (o,) = deliver(home, relay, mess, cafile=None)
    assert o.status is Status.OK, o.text
    # another pin: deferred, no AUTH
    write_control(home, "smtproutestls", f"127.0.0.1:sha256:{'00' * 32}\n")
    relay = AuthRelay(ctx)
    (o,) = deliver(home, relay, mess, cafile=None)
    assert o.status is Status.TEMP and "does not match the pin" in o.text
    assert relay.auth_lines() == []


def test_private_ca_file(home: Home, ca: trustme.CA, cafile: str, mess: Path) -> None:
    write_control(home, "smtproutesauth", AUTHLINE)
    write_control(home, "smtproutestls", f"[127.0.0.1]:{cafile}\n")
    relay = AuthRelay(server_ctx(ca))
    (o,) = deliver(home, relay, mess, cafile=None)  # not the agent's CA: the file's
    assert o.status is Status.OK, o.text


def test_a_malformed_line_defers_routed_mail_without_quoting_it(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    write_control(home, "smtproutesauth", "[127.0.0.1]-relayuser-hunter22\n")
    relay = AuthRelay(server_ctx(ca))
    (o,) = deliver(home, relay, mess, cafile=cafile)
    assert o.status is Status.TEMP and "smtproutesauth" in o.text
    assert "hunter22" not in o.text and relay.connections == 0


def test_an_unreadable_file_defers(
    home: Home, ca: trustme.CA, cafile: str, mess: Path, tmp_path: Path
) -> None:
    (home.control / "smtproutesauth").mkdir()  # exists, cannot be read as a file
    relay = AuthRelay(server_ctx(ca))
    (o,) = deliver(home, relay, mess, cafile=cafile)
    assert o.status is Status.TEMP and "Unable to read control files" in o.text
    assert relay.connections == 0


def test_an_edit_takes_effect_at_the_next_delivery(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    write_control(home, "smtproutesauth", "[127.0.0.1]:relayuser@test.example:wrong\n")
    relay = AuthRelay(server_ctx(ca))

    async def go() -> list[Status]:
        async with relay:
            write_control(home, "smtproutes", f":[127.0.0.1]:{relay.port}\n")
            agent = RemoteAgent(home, ControlCache(home), tls_cafile=cafile)
            (a,) = await agent.deliver(mess, "a@test.example", ["b@far.example"])
            write_control(home, "smtproutesauth", AUTHLINE)
            (b,) = await agent.deliver(mess, "a@test.example", ["b@far.example"])
            await agent.close()
        return [a.status, b.status]

    assert asyncio.run(go()) == [Status.TEMP, Status.OK]


def test_authenticated_and_plain_connections_are_never_swapped(
    home: Home, ca: trustme.CA, cafile: str, mess: Path
) -> None:
    """One server address, reached by the smarthost route (with AUTH) and by MX delivery
    (a domain literal, without): each kind of kept connection serves its own kind only."""
    write_control(home, "smtproutesauth", AUTHLINE)
    relay = AuthRelay(server_ctx(ca), require_auth=False)

    async def go() -> None:
        async with relay:
            write_control(home, "smtproutes", f"routed.example:[127.0.0.1]:{relay.port}\n")
            agent = RemoteAgent(
                home, ControlCache(home), tls_cafile=cafile, port=relay.port, own_ips=[]
            )
            for rcpt in ("x@[127.0.0.1]", "y@routed.example", "z@[127.0.0.1]", "w@routed.example"):
                (o,) = await agent.deliver(mess, "a@test.example", [rcpt])
                assert o.status is Status.OK, o.text
            await agent.close()

    asyncio.run(go())
    assert relay.connections == 2 and relay.authed == [USER]
    assert relay.carried_by == [(1, False), (2, True), (1, False), (2, True)]
