"""MTA-STS in remote delivery, end to end over real sockets: Debian's dnsmasq serves the MX,
``_mta-sts`` TXT and ``mta-sts.DOMAIN`` records, an HTTPS server with a trustme certificate
serves the policies, and the SMTP peers offer STARTTLS with trustme certificates for the MX
names (or for the wrong name, or no STARTTLS at all)."""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import shutil
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.remote.mtastscache import read_cached
from pyqmail.remote.mx import make_resolver
from pyqmail.send.explain import explain_address
from tests.conftest import dnsmasq_server, is_root, qmail_ids, require_tools, write_control
from tests.integration.test_remote_peers import Peer, Script

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.{d}\nmax_age: 86400\n"
TESTING = "version: STSv1\nmode: testing\nmx: mx.{d}\nmax_age: 86400\n"

# Two MX hosts on one port need two addresses: this module's own, in 127/8.
_R = os.urandom(2)
MX_A, MX_B = f"127.{_R[0] % 200 + 20}.{_R[1]}.11", f"127.{_R[0] % 200 + 20}.{_R[1]}.12"
# The root test's MX and policy host: the real ports 25 and 443 on an address of its own.
MX_C = f"127.{_R[0] % 200 + 20}.{_R[1]}.13"

DOMAINS = [
    "good.test", "wrongmx.test", "wrongcert.test", "notls.test", "testing.test",
    "cached.test", "redirect.test", "html.test", "none.test", "routed.test", "refresh.test",
    "wild.test", "untrusted.test",
]  # fmt: skip


def records() -> list[str]:
    out = []
    for d in DOMAINS:
        out += [f"--mx-host={d},mx.{d},10", f"--host-record=mx.{d},127.0.0.1",
                f"--txt-record=_mta-sts.{d},v=STSv1; id=1",
                f"--host-record=mta-sts.{d},127.0.0.1"]  # fmt: skip
    # two MX hosts, the better one with a certificate for the wrong name
    out += ["--mx-host=two.test,mx1.two.test,10", "--mx-host=two.test,mx2.two.test,20",
            f"--host-record=mx1.two.test,{MX_A}", f"--host-record=mx2.two.test,{MX_B}",
            "--txt-record=_mta-sts.two.test,v=STSv1; id=7",
            "--host-record=mta-sts.two.test,127.0.0.1"]  # fmt: skip
    out += ["--mx-host=root.test,mx.root.test,10", f"--host-record=mx.root.test,{MX_C}",
            "--txt-record=_mta-sts.root.test,v=STSv1; id=1",
            f"--host-record=mta-sts.root.test,{MX_C}"]  # fmt: skip
    # a TXT record but no mta-sts host at all; and a domain without MTA-STS
    out += ["--mx-host=nohost.test,mx.nohost.test,10", "--host-record=mx.nohost.test,127.0.0.1",
            "--txt-record=_mta-sts.nohost.test,v=STSv1; id=1",
            "--mx-host=plain.test,mx.plain.test,10",
            "--host-record=mx.plain.test,127.0.0.1"]  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_tools("dnsmasq")
    d = tmp_path_factory.mktemp("dnsmasq")
    with dnsmasq_server(d, records(), "mx.good.test") as spec:
        yield spec


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cafile(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return str(p)


@dataclass
class Served:
    status: int = 200
    body: str = ""
    ctype: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


class PolicyServer:
    """HTTPS on 127.0.0.1: ``policies[domain]`` answers GET /.well-known/mta-sts.txt for
    Host: mta-sts.DOMAIN; ``hits`` counts the requests per domain."""

    def __init__(self, ctx: ssl.SSLContext, addr: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.policies: dict[str, Served] = {}
        self.hits: dict[str, int] = {}
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0]
                domain = host.removeprefix("mta-sts.")
                outer.hits[domain] = outer.hits.get(domain, 0) + 1
                outer.paths.append(self.path)
                got = outer.policies.get(domain, Served(404, "no"))
                data = got.body.encode()
                self.send_response(got.status)
                self.send_header("Content-Type", got.ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in got.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(addr, Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def https(ca: trustme.CA) -> Iterator[PolicyServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    names = [f"mta-sts.{d}" for d in [*DOMAINS, "two.test"] if d != "untrusted.test"]
    ca.issue_cert(*names).configure_cert(ctx)
    srv = PolicyServer(ctx)
    yield srv
    srv.stop()


def smtp_ctx(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@pytest.fixture
def mess(tmp_path: Path) -> Path:
    p = tmp_path / "mess"
    p.write_bytes(b"Subject: sts\n\nsecret body\n")
    return p


def make_agent(home: Home, dns: str, port: int, cafile: str, https_port: int) -> RemoteAgent:
    return RemoteAgent(
        home, ControlCache(home), port=port, resolver=make_resolver(dns, lifetime=2),
        own_ips=[], tls_cafile=cafile, mtasts_port=https_port, idle_timeout=0,
    )  # fmt: skip


def send(
    home: Home, dns: str, cafile: str, https: PolicyServer, script: Script, mess: Path,
    domain: str,
) -> tuple[Outcome, Peer, RemoteAgent]:  # fmt: skip
    async def go() -> tuple[Outcome, Peer, RemoteAgent]:
        async with Peer(script) as peer:
            agent = make_agent(home, dns, peer.port, cafile, https.port)
            (o,) = await agent.deliver(mess, "a@mx.test.example", [f"b@{domain}"])
            await agent.close()
        return o, peer, agent

    return asyncio.run(go())


Env = tuple[Home, str, str, PolicyServer, Path]


@pytest.fixture
def env(home: Home, dnsmasq: str, cafile: str, https: PolicyServer, mess: Path) -> Env:
    return home, dnsmasq, cafile, https, mess


def test_enforce_with_a_valid_certificate_delivers_over_tls(env: Env, ca: trustme.CA) -> None:
    home, dns, cafile, https, mess = env
    https.policies["good.test"] = Served(body=ENFORCE.format(d="good.test"))
    o, peer, _ = send(home, dns, cafile, https, Script(starttls=smtp_ctx(ca, "mx.good.test")),
                      mess, "good.test")  # fmt: skip
    assert o.status is Status.OK, o.text
    assert peer.tls_used == [True] and len(peer.messages) == 1
    assert https.paths == ["/.well-known/mta-sts.txt"]
    rec = read_cached(home, "good.test")
    assert rec is not None and rec.id == "1" and rec.policy.mx == ("mx.good.test",)
    assert (home.root / "mtasts" / "good.test").stat().st_mode & 0o077 == 0


def test_enforce_with_an_mx_not_in_the_policy_defers_without_connecting(
    env: Env, ca: trustme.CA
) -> None:
    home, dns, cafile, https, mess = env
    https.policies["wrongmx.test"] = Served(body=ENFORCE.format(d="elsewhere.test"))
    script = Script(starttls=smtp_ctx(ca, "mx.wrongmx.test"))
    o, peer, _ = send(home, dns, cafile, https, script, mess, "wrongmx.test")
    assert o.status is Status.TEMP
    assert "no mail exchanger of wrongmx.test matches its MTA-STS policy" in o.text
    assert peer.connections == 0


def test_enforce_with_a_certificate_for_another_name_defers(env: Env, ca: trustme.CA) -> None:
    home, dns, cafile, https, mess = env
    https.policies["wrongcert.test"] = Served(body=ENFORCE.format(d="wrongcert.test"))
    script = Script(starttls=smtp_ctx(ca, "mx.someone-else.test"), tls_first_only=False)
    o, peer, _ = send(home, dns, cafile, https, script, mess, "wrongcert.test")
    assert o.status is Status.TEMP
    assert "TLS handshake failed" in o.text and "by its MTA-STS policy" in o.text, o.text
    assert peer.messages == [] and peer.connections == 1  # never plaintext


def test_enforce_without_starttls_defers(env: Env) -> None:
    home, dns, cafile, https, mess = env
    https.policies["notls.test"] = Served(body=ENFORCE.format(d="notls.test"))
    o, peer, _ = send(home, dns, cafile, https, Script(), mess, "notls.test")
    assert o.status is Status.TEMP
    assert "does not offer STARTTLS; TLS is required for notls.test by its MTA-STS" in o.text
    assert peer.messages == []


def test_testing_mode_delivers_and_logs(
    env: Env, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    home, dns, cafile, https, mess = env
    https.policies["testing.test"] = Served(body=TESTING.format(d="testing.test"))
    script = Script(starttls=smtp_ctx(ca, "mx.someone-else.test"), tls_first_only=False)
    with caplog.at_level(logging.WARNING, "pyqmail.remote"):
        o, peer, _ = send(home, dns, cafile, https, script, mess, "testing.test")
    assert o.status is Status.OK, o.text
    assert len(peer.messages) == 1
    # the verified handshake failed, then the message went over opportunistic TLS
    assert peer.connections == 2 and peer.tls_used == [True]
    assert "MTA-STS (testing) testing.test" in caplog.text
    assert "TLS handshake failed" in caplog.text and "delivering anyway" in caplog.text


def test_testing_mode_does_not_override_tlsdestinations(env: Env, ca: trustme.CA) -> None:
    home, dns, cafile, https, mess = env
    write_control(home, "tlsdestinations", "testing.test\n")
    https.policies["testing.test"] = Served(body=TESTING.format(d="testing.test"))
    script = Script(starttls=smtp_ctx(ca, "mx.someone-else.test"), tls_first_only=False)
    o, peer, _ = send(home, dns, cafile, https, script, mess, "testing.test")
    assert o.status is Status.TEMP and "TLS is required for testing.test. (#4.7.5)" in o.text
    assert peer.messages == [] and peer.connections == 1


def test_testing_mode_with_an_mx_not_in_the_policy_delivers_and_logs(
    env: Env, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    home, dns, cafile, https, mess = env
    https.policies["testing.test"] = Served(body=TESTING.format(d="elsewhere.test"))
    script = Script(starttls=smtp_ctx(ca, "mx.testing.test"))
    with caplog.at_level(logging.WARNING, "pyqmail.remote"):
        o, peer, _ = send(home, dns, cafile, https, script, mess, "testing.test")
    assert o.status is Status.OK and peer.tls_used == [True]
    assert "MX mx.testing.test not in the policy; delivering anyway" in caplog.text


def test_cached_policy_is_enforced_with_the_https_server_gone(env: Env, ca: trustme.CA) -> None:
    home, dns, cafile, https, mess = env
    https.policies["cached.test"] = Served(body=ENFORCE.format(d="cached.test"))
    good = Script(starttls=smtp_ctx(ca, "mx.cached.test"))
    o, _, _ = send(home, dns, cafile, https, good, mess, "cached.test")
    assert o.status is Status.OK and https.hits["cached.test"] == 1
    https.stop()
    # a new agent (a restart): the policy comes from HOME/mtasts, and still rules
    o, peer, agent = send(home, dns, cafile, https, Script(), mess, "cached.test")
    assert o.status is Status.TEMP and "by its MTA-STS policy" in o.text
    assert peer.messages == [] and agent.mtasts.fetches == 0
    o, peer, _ = send(home, dns, cafile, https, good, mess, "cached.test")
    assert o.status is Status.OK and peer.tls_used == [True]


def test_a_new_txt_id_fetches_the_policy_again(env: Env, ca: trustme.CA) -> None:
    home, dns, cafile, https, mess = env
    # the cache holds a testing policy under id 0; DNS now says id 1 and the policy enforces
    https.policies["refresh.test"] = Served(body=TESTING.format(d="refresh.test"))
    agent_send = send(home, dns, cafile, https, Script(), mess, "refresh.test")
    assert agent_send[0].status is Status.OK  # testing: delivered without TLS
    path = home.root / "mtasts" / "refresh.test"
    path.write_bytes(path.read_bytes().replace(b'"id": "1"', b'"id": "0"'))
    https.policies["refresh.test"] = Served(body=ENFORCE.format(d="refresh.test"))
    o, peer, agent = send(home, dns, cafile, https, Script(), mess, "refresh.test")
    assert agent.mtasts.fetches == 1 and https.hits["refresh.test"] == 2
    assert o.status is Status.TEMP and peer.messages == []
    rec = read_cached(home, "refresh.test")
    assert rec is not None and rec.id == "1" and rec.policy.mode.value == "enforce"


@pytest.mark.parametrize(
    ("domain", "served"),
    [
        ("redirect.test", Served(301, "", headers={"Location": "https://mta-sts.good.test/"})),
        ("html.test", Served(200, ENFORCE.format(d="html.test"), ctype="text/html")),
        ("none.test", Served(200, "version: STSv1\nmode: none\nmax_age: 600\n")),
        ("untrusted.test", Served(200, ENFORCE.format(d="untrusted.test"))),  # cert: no SAN
        ("nohost.test", Served(200, ENFORCE.format(d="nohost.test"))),  # no mta-sts host
        (
            "wild.test",
            Served(200, "version: STSv1\nmode: enforce\nmx: mx.wild.test\n" + "#" * 70000),
        ),
    ],
)
def test_no_usable_policy_means_delivery_as_without_mta_sts(
    env: Env, domain: str, served: Served
) -> None:
    """A redirect, a wrong media type, mode none, a certificate not for mta-sts.DOMAIN, no
    policy host, a policy over 64 KB: no policy, so plaintext delivery is allowed."""
    home, dns, cafile, https, mess = env
    https.policies[domain] = served
    o, peer, _ = send(home, dns, cafile, https, Script(), mess, domain)
    assert o.status is Status.OK, o.text
    assert len(peer.messages) == 1 and peer.tls_used == [False]
    assert https.hits.get("good.test", 0) == 0  # the redirect was not followed


def test_a_failed_fetch_is_not_repeated_at_once(env: Env) -> None:
    home, dns, cafile, https, mess = env
    https.policies["html.test"] = Served(200, ENFORCE.format(d="html.test"), ctype="text/html")

    async def go() -> RemoteAgent:
        async with Peer(Script()) as peer:
            agent = make_agent(home, dns, peer.port, cafile, https.port)
            outs = await asyncio.gather(
                *(agent.deliver(mess, "a@x.test", [f"b{i}@html.test"]) for i in range(3))
            )
            outs.append(await agent.deliver(mess, "a@x.test", ["c@html.test"]))
            assert all(o.status is Status.OK for (o,) in outs)
            await agent.close()
        return agent

    agent = asyncio.run(go())
    assert agent.mtasts.fetches == 1 and https.hits["html.test"] == 1


def test_smtproutes_route_is_not_subject_to_mta_sts(env: Env) -> None:
    home, dns, cafile, https, mess = env
    https.policies["routed.test"] = Served(body=ENFORCE.format(d="routed.test"))

    async def go() -> tuple[Outcome, Peer, RemoteAgent]:
        async with Peer(Script()) as peer:
            write_control(home, "smtproutes", f"routed.test:[127.0.0.1]:{peer.port}\n")
            agent = make_agent(home, dns, 9, cafile, https.port)
            (o,) = await agent.deliver(mess, "a@x.test", ["b@routed.test"])
            await agent.close()
        return o, peer, agent

    o, peer, agent = asyncio.run(go())
    assert o.status is Status.OK and peer.tls_used == [False]
    assert agent.mtasts.fetches == 0 and "routed.test" not in https.hits


def test_domain_without_mta_sts_is_unchanged(env: Env) -> None:
    home, dns, cafile, https, mess = env
    o, peer, agent = send(home, dns, cafile, https, Script(), mess, "plain.test")
    assert o.status is Status.OK and peer.tls_used == [False]
    assert agent.mtasts.fetches == 0 and not (home.root / "mtasts" / "plain.test").exists()


def test_enforce_tries_the_next_mx_when_one_fails_the_policy(env: Env, ca: trustme.CA) -> None:
    """RFC 8461 5.1: an MX that fails the TLS check is skipped for the next one."""
    home, dns, cafile, https, mess = env
    https.policies["two.test"] = Served(body="version: STSv1\nmode: enforce\nmx: *.two.test\n"
                                        "max_age: 600\n")  # fmt: skip

    async def go() -> tuple[Outcome, Peer, Peer]:
        bad = Peer(Script(starttls=smtp_ctx(ca, "mx1.elsewhere.test")))
        good = Peer(Script(starttls=smtp_ctx(ca, "mx2.two.test")))
        await good.start(MX_B)
        bad._server = await asyncio.start_server(bad._handle, MX_A, good.port)
        bad.port = good.port
        try:
            agent = make_agent(home, dns, good.port, cafile, https.port)
            (o,) = await agent.deliver(mess, "a@x.test", ["b@two.test"])
            await agent.close()
        finally:
            await bad.close()
            await good.close()
        return o, bad, good

    o, bad, good = asyncio.run(go())
    assert o.status is Status.OK, o.text
    assert bad.connections == 1 and bad.messages == []
    assert good.tls_used == [True] and len(good.messages) == 1


def test_explain_shows_the_cached_policy(env: Env, ca: trustme.CA) -> None:
    home, dns, cafile, https, mess = env
    ex = explain_address(home, "b@good.test", dns=False)
    assert any("MTA-STS: no cached policy" in line for line in ex.lines), ex.lines
    https.policies["good.test"] = Served(body=ENFORCE.format(d="good.test"))
    o, _, _ = send(home, dns, cafile, https, Script(starttls=smtp_ctx(ca, "mx.good.test")),
                   mess, "good.test")  # fmt: skip
    assert o.status is Status.OK
    text = explain_address(home, "b@good.test", dns=False).text()
    assert "MTA-STS: cached policy id 1, mode enforce, in force until" in text
    assert "mx: mx.good.test" in text
    write_control(home, "smtproutes", "good.test:[127.0.0.1]:2525\n")
    text = explain_address(home, "b@good.test", dns=False).text()
    assert "MTA-STS: not applied" in text


@pytest.mark.skipif(not is_root(), reason="needs root: qmailr's agent, ports 25 and 443")
def test_root_mode_agent_as_qmailr_fetches_from_443_and_caches(
    dnsmasq: str, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pyqmail run``'s remote agent (remote/agentproc.py, dropped to qmailr) with the
    RFC's port 443 for the policy and 25 for SMTP: it makes HOME/mtasts (missing in a home
    made before it existed) before the drop, and keeps the policy there as qmailr."""
    from pyqmail.remote.agentproc import RemoteProcess
    from tests.security._support import root_home

    ids = qmail_ids()
    home = root_home("pyqmail-mtasts-root-")
    try:
        shutil.rmtree(home.root / "mtasts")
        cafile = home.root.parent / "ca.pem"
        ca.cert_pem.write_to_path(str(cafile))
        cafile.chmod(0o644)
        mess = home.root.parent / "mess"
        mess.write_bytes(b"Subject: root\n\nbody\n")
        mess.chmod(0o644)
        monkeypatch.setenv("PYQMAIL_RESOLVER", dnsmasq)
        monkeypatch.setenv("PYQMAIL_TLS_CAFILE", str(cafile))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("mta-sts.root.test").configure_cert(ctx)
        https = PolicyServer(ctx, (MX_C, 443))
        https.policies["root.test"] = Served(body=ENFORCE.format(d="root.test"))

        async def go() -> tuple[list[Outcome], Peer]:
            peer = Peer(Script(starttls=smtp_ctx(ca, "mx.root.test")))
            peer._server = await asyncio.start_server(peer._handle, MX_C, 25)
            agent = RemoteProcess(home)
            agent.start(user=(ids.uid("remote"), ids.gid("qmail")))
            try:
                outs = await agent.deliver(mess, "a@mx.test.example", ["b@root.test"])
            finally:
                await agent.close()
                await peer.close()
            return outs, peer

        try:
            (o,), peer = asyncio.run(go())
        finally:
            https.stop()
        assert o.status is Status.OK, o.text
        assert peer.tls_used == [True] and https.hits == {"root.test": 1}
        d = home.root / "mtasts"
        assert d.stat().st_uid == ids.uid("remote") and d.stat().st_mode & 0o777 == 0o700
        assert (d / "root.test").stat().st_uid == ids.uid("remote")
        rec = read_cached(home, "root.test")
        assert rec is not None and rec.policy.mode.value == "enforce"
    finally:
        shutil.rmtree(home.root.parent)


def test_a_policy_past_half_its_max_age_is_refreshed_in_the_background(
    home: Home, dnsmasq: str, cafile: str, https: PolicyServer
) -> None:
    from pyqmail.remote.mtastscache import MtaSts, cache_dir

    now = [1_000_000.0]
    https.policies["good.test"] = Served(body=ENFORCE.format(d="good.test"))
    res = make_resolver(dnsmasq, lifetime=2)

    async def go() -> tuple[str, str, str]:
        sts = MtaSts(cache_dir(home), lambda: res, cafile=cafile, port=https.port,
                     clock=lambda: now[0])  # fmt: skip
        first = await sts.policy("good.test")
        https.policies["good.test"] = Served(body=TESTING.format(d="good.test"))
        now[0] += 40000  # before half of max_age: the cached one, no fetch
        second = await sts.policy("good.test")
        assert https.hits["good.test"] == 1
        now[0] += 10000  # past half: still the cached one, and a fetch behind it
        third = await sts.policy("good.test")
        await asyncio.gather(*sts._inflight.values())  # the background fetch
        fourth = await sts.policy("good.test")
        assert first and second and third and fourth
        return second.policy.mode.value, third.policy.mode.value, fourth.policy.mode.value

    assert asyncio.run(go()) == ("enforce", "enforce", "testing")
    assert https.hits["good.test"] == 2
    rec = read_cached(home, "good.test")
    assert rec is not None and rec.fetched == 1_050_000.0
