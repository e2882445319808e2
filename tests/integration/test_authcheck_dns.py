"""SPF, DKIM and DMARC against a real DNS server (Debian's dnsmasq on loopback), a silent
one (a UDP socket that never answers), and through the SMTP listener on a real socket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import authres  # type: ignore[import-untyped]
import dkim  # type: ignore[import-untyped]
import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.queue import submit as qsubmit
from pyqmail.smtp import authcheck as ac
from pyqmail.smtp.authcheck import AuthChecker, Mode, Policy
from pyqmail.smtp.server import SmtpServer
from tests.conftest import dnsmasq_server, require_tools

ME = "mx.test.example"


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """(private key PEM, the p= of its DNS record), made by Debian's openssl."""
    require_tools("openssl")
    d = tmp_path_factory.mktemp("dkim")
    subprocess.run(["openssl", "genrsa", "-out", str(d / "k.pem"), "1024"], check=True,
                   capture_output=True)  # fmt: skip
    der = subprocess.run(["openssl", "rsa", "-in", str(d / "k.pem"), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout  # fmt: skip
    return (d / "k.pem").read_bytes(), base64.b64encode(der).decode()


NINE = " ".join(f"a:h{i}.nine.test" for i in range(9))


def _txt(name: str, value: str) -> str:
    return f"--txt-record={name},{value}"


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory, dkim_key: tuple[bytes, str]) -> Iterator[str]:
    require_tools("dnsmasq")
    d = tmp_path_factory.mktemp("dnsmasq")
    chain = [_txt(f"l{i}.test", f"v=spf1 include:l{i + 1}.test -all") for i in range(12)]
    records = [
        _txt("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
        _txt("fail.test", "v=spf1 -all"),
        _txt("neutral.test", "v=spf1 ?all"),
        _txt("soft.test", "v=spf1 ~all"),
        _txt("helo.test", "v=spf1 ip4:127.0.0.1 -all"),
        _txt("nine.test", f"v=spf1 {NINE} ip4:127.0.0.1 -all"),
        *[f"--host-record=h{i}.nine.test,192.0.2.{i + 1}" for i in range(9)],
        _txt("l12.test", "v=spf1 ip4:127.0.0.1 -all"), *chain,
        _txt("void.test", "v=spf1 a:v1.void.test a:v2.void.test a:v3.void.test ip4:127.0.0.1 -all"),
        _txt("bad.test", "v=spf1 ip4:not-an-ip -all"),
        _txt("_dmarc.pass.test", "v=DMARC1; p=reject"),
        _txt("_dmarc.fail.test", "v=DMARC1; p=reject"),
        _txt("_dmarc.neutral.test", "v=DMARC1; p=reject"),
        _txt("_dmarc.soft.test", "v=DMARC1; p=quarantine"),
        _txt("_dmarc.garbage.test", "v=DMARC1; p=whatever; \x01\x7f;;=="),
        _txt("_dmarc.two.test", "v=DMARC1; p=reject"), _txt("_dmarc.two.test", "v=DMARC1; p=none"),
        _txt("_dmarc.org.test", "v=DMARC1; p=none; sp=reject"),
        _txt("_dmarc.dkim.test", "v=DMARC1; p=reject; adkim=s"),
        _txt("sel._domainkey.dkim.test", f"v=DKIM1; k=rsa; p={dkim_key[1]}"),
    ]  # fmt: skip
    with dnsmasq_server(d, records, "pass.test", "TXT") as server:
        yield server


@pytest.fixture
def silent() -> Iterator[str]:
    """A DNS server that reads every query and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def checker(tmp_path: Path, spec: str, **kw: float) -> AuthChecker:
    return AuthChecker(tmp_path, resolver=spec, ttl=0, **kw)  # type: ignore[arg-type]


def spf(c: AuthChecker, sender: str, ip: str = "127.0.0.1", helo: str = "client.test") -> str:
    return asyncio.run(c.spf(ip, sender, helo))


@pytest.mark.parametrize(
    ("sender", "ip", "want"),
    [
        ("bob@pass.test", "127.0.0.1", "pass"),
        ("bob@pass.test", "192.0.2.9", "fail"),
        ("bob@fail.test", "127.0.0.1", "fail"),
        ("bob@neutral.test", "127.0.0.1", "neutral"),
        ("bob@soft.test", "127.0.0.1", "softfail"),
        ("bob@nothing.test", "127.0.0.1", "none"),
        ("bob@nine.test", "127.0.0.1", "pass"),  # 9 lookups: within the limit
        ("bob@l2.test", "127.0.0.1", "pass"),  # 10 includes: the limit (RFC 7208 4.6.4)
        ("bob@l1.test", "127.0.0.1", "permerror"),  # 11 includes: over it
        ("bob@void.test", "127.0.0.1", "permerror"),  # 3 void lookups
        ("bob@bad.test", "127.0.0.1", "permerror"),
        ("bob@pass.test", "not-an-ip", "permerror"),
    ],
)
def test_spf_results(tmp_path: Path, dnsmasq: str, sender: str, ip: str, want: str) -> None:
    assert spf(checker(tmp_path, dnsmasq), sender, ip) == want


def test_spf_lookups_stay_within_ten(tmp_path: Path, dnsmasq: str) -> None:
    t = time.monotonic()
    assert spf(checker(tmp_path, dnsmasq), "bob@l0.test") == "permerror"
    assert time.monotonic() - t < 5


def _conn(tmp_path: Path, spec: str, policy: Policy, **kw: float) -> ac.ConnectionChecks:
    return checker(tmp_path, spec, **kw).connection(policy, ME, "127.0.0.1")


def test_mail_under_enforce_and_tag(tmp_path: Path, dnsmasq: str) -> None:
    enforce = _conn(tmp_path, dnsmasq, Policy(spf=Mode.ENFORCE))
    assert asyncio.run(enforce.mail(b"bob@fail.test", b"client.test")) == ac.SPF_FAIL
    assert asyncio.run(enforce.mail(b"bob@neutral.test", b"client.test")) is None
    assert asyncio.run(enforce.mail(b"bob@pass.test", b"helo.test")) is None
    assert [(r.identity, r.result) for r in enforce.spf_results] == [
        ("mailfrom", "pass"), ("helo", "pass")]  # fmt: skip
    # the null sender: the HELO identity stands for it (RFC 7208 2.4)
    assert asyncio.run(enforce.mail(b"", b"fail.test")) == ac.SPF_FAIL
    assert enforce.spf_results[0].address == "postmaster@fail.test"
    tag = _conn(tmp_path, dnsmasq, Policy())
    assert asyncio.run(tag.mail(b"bob@fail.test", b"[127.0.0.1]")) is None
    assert [(r.identity, r.result) for r in tag.spf_results] == [("mailfrom", "fail")]


def _signed(key: bytes, body: bytes = b"hello\n", frm: bytes = b"bob@dkim.test") -> bytes:
    msg = b"From: " + frm + b"\nTo: x@y.test\nSubject: s\n\n" + body
    sig = dkim.sign(msg, b"sel", b"dkim.test", key, include_headers=[b"from", b"subject"])
    return bytes(sig) + msg


def _verdict(c: ac.ConnectionChecks, msg: bytes) -> ac.Verdict:
    header = msg.split(b"\n\n", 1)[0] + b"\n"
    return asyncio.run(c.message(header, lambda: msg))


def test_dkim_pass_fail_and_unknown_key(
    tmp_path: Path, dnsmasq: str, dkim_key: tuple[bytes, str]
) -> None:
    c = _conn(tmp_path, dnsmasq, Policy(Mode.TAG, Mode.ENFORCE, Mode.ENFORCE))
    asyncio.run(c.mail(b"bob@fail.test", b"client.test"))  # SPF fails: DKIM must carry DMARC
    good = _signed(dkim_key[0])
    v = _verdict(c, good)
    assert v.dkim == [ac.DkimResult("pass", "dkim.test", "sel")]
    assert v.dmarc == ac.DmarcResult("pass", "dkim.test", "reject") and v.refusal is None
    v = _verdict(c, good.replace(b"hello", b"HELLO"))
    assert v.dkim[0].result == "fail"
    assert v.dmarc is not None and v.dmarc.result == "fail" and v.refusal == ac.DMARC_REJECT
    v = _verdict(c, good.replace(b"s=sel", b"s=nokey"))
    assert v.dkim[0].result == "permerror" and v.refusal == ac.DMARC_REJECT
    v = _verdict(c, good.replace(b"b=", b"b=;;;garbage", 1))
    assert v.dkim[0].result in ("permerror", "fail")


def test_dkim_enforce_alone(tmp_path: Path, dnsmasq: str, dkim_key: tuple[bytes, str]) -> None:
    c = _conn(tmp_path, dnsmasq, Policy(Mode.OFF, Mode.ENFORCE, Mode.OFF))
    bad = _signed(dkim_key[0]).replace(b"hello", b"HELLO")
    assert _verdict(c, bad).refusal == ac.DKIM_FAIL
    assert _verdict(c, b"From: a@b.test\n\nunsigned\n").refusal is None


def test_dkim_not_verified_beyond_the_bound(
    tmp_path: Path, dnsmasq: str, dkim_key: tuple[bytes, str]
) -> None:
    c = _conn(tmp_path, dnsmasq, Policy(dkim=Mode.ENFORCE))
    msg = _signed(dkim_key[0])
    header = msg.split(b"\n\n", 1)[0] + b"\n"
    v = asyncio.run(c.message(header, None))
    assert v.dkim == [ac.DkimResult("policy")] and v.refusal is None


@pytest.mark.parametrize(
    ("sender", "frm", "want", "policy"),
    [
        (b"bob@pass.test", b"bob@pass.test", "pass", "reject"),
        (b"bob@fail.test", b"bob@fail.test", "fail", "reject"),
        (b"bob@soft.test", b"bob@soft.test", "fail", "quarantine"),
        (b"bob@pass.test", b"bob@nothing.test", "none", ""),
        (b"bob@pass.test", b"bob@garbage.test", "permerror", ""),
        (b"bob@pass.test", b"bob@two.test", "permerror", ""),
        (b"bob@pass.test", b"bob@sub.org.test", "fail", "reject"),  # sp= of the organisation
        (b"bob@pass.test", b"bob@org.test", "fail", "none"),
        (b"bob@pass.test", b"bob@sub.pass.test", "pass", "reject"),  # relaxed alignment
    ],
)
def test_dmarc(
    tmp_path: Path, dnsmasq: str, sender: bytes, frm: bytes, want: str, policy: str
) -> None:
    c = _conn(tmp_path, dnsmasq, Policy(dmarc=Mode.ENFORCE))
    asyncio.run(c.mail(sender, b"client.test"))
    v = _verdict(c, b"From: " + frm + b"\n\nx\n")
    assert v.dmarc is not None and (v.dmarc.result, v.dmarc.policy) == (want, policy)
    assert (v.refusal == ac.DMARC_REJECT) is (want == "fail" and policy == "reject")


def test_silent_dns_is_bounded_and_never_blocks_the_loop(tmp_path: Path, silent: str) -> None:
    """A DNS server that never answers: temperror within the bound, the loop keeps running,
    and enforce defers (451) rather than refusing."""
    c = _conn(tmp_path, silent, Policy(Mode.ENFORCE, Mode.TAG, Mode.ENFORCE),
              lifetime=0.3, spf_time=0.6, dkim_time=1.0)  # fmt: skip

    async def main() -> tuple[bytes | None, ac.Verdict, int, float]:
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.get_running_loop().create_task(ticker())
        start = time.monotonic()
        mail, verdict = await asyncio.gather(
            c.mail(b"bob@pass.test", b"client.test"),
            c.message(b"From: bob@pass.test\nDKIM-Signature: v=1; d=x.test; s=s\n\n",
                      lambda: b"From: bob@pass.test\nDKIM-Signature: v=1; d=x.test; s=s\n\nx\n"),
        )  # fmt: skip
        took = time.monotonic() - start
        stop = True
        await t
        return mail, verdict, ticks, took

    mail, verdict, ticks, took = asyncio.run(main())
    assert mail == ac.SPF_TEMP
    assert verdict.dmarc is not None and verdict.dmarc.result == "temperror"
    assert verdict.refusal == ac.AUTH_TEMP
    assert took < 4.0
    assert ticks >= took / 0.01 / 4  # the loop ran all along


def test_tag_mode_records_temperror_and_accepts(tmp_path: Path, silent: str) -> None:
    c = _conn(tmp_path, silent, Policy(), lifetime=0.3, spf_time=0.6)
    assert asyncio.run(c.mail(b"bob@pass.test", b"client.test")) is None
    assert c.spf_results[0].result == "temperror"
    v = _verdict(c, b"From: bob@pass.test\n\nx\n")
    assert v.refusal is None and v.dmarc is not None and v.dmarc.result == "temperror"


# -- through the listener ------------------------------------------------------------------


class Client:
    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    async def reply(self) -> bytes:
        out = b""
        while True:
            line = await asyncio.wait_for(self.r.readline(), 20)
            out += line
            if line[3:4] != b"-":
                return out

    async def cmd(self, line: bytes) -> bytes:
        self.w.write(line + b"\r\n")
        return await self.reply()


async def _session(
    port: int, sender: bytes, message: bytes, helo: bytes = b"client.test"
) -> list[bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    c = Client(r, w)
    out = [await c.reply(), await c.cmd(b"HELO " + helo)]
    out.append(await c.cmd(b"MAIL FROM:<" + sender + b">"))
    if out[-1].startswith(b"250"):
        out.append(await c.cmd(b"RCPT TO:<alice@test.example>"))
        out.append(await c.cmd(b"DATA"))
        w.write(message.replace(b"\n", b"\r\n") + b".\r\n")
        out.append(await c.reply())
    out.append(await c.cmd(b"QUIT"))
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return out


def _queued(home: Home) -> list[bytes]:
    return [f.read_bytes() for f in sorted((home.queue / "mess").rglob("*")) if f.is_file()]


def _serve(home: Home, spec: str, sessions: list[tuple[bytes, bytes]]) -> list[list[bytes]]:
    async def main() -> list[list[bytes]]:
        auth = AuthChecker(home.control, resolver=spec, ttl=0)
        sub = qsubmit.submitter(home)
        srv = SmtpServer(home, ControlCache(home), sub, commit_process=False, auth=auth)
        server = await srv.start("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return list(await asyncio.gather(*(_session(port, s, m) for s, m in sessions)))
        finally:
            server.close()
            await server.wait_closed()
            await srv.aclose()

    return asyncio.run(main())


FORGED = b"Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=x@fail.test\n"


def test_listener_tags_and_removes_the_forged_header(home: Home, dnsmasq: str) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    big = b"".join(b"X-F-%d: %s\n" % (i, b"y" * 90) for i in range(1100))  # a 100 KB header
    out = _serve(home, dnsmasq, [
        (b"bob@pass.test", FORGED + b"From: bob@pass.test\nSubject: p\n\nhello\n"),
        (b"bob@fail.test", big + b"From: bob@fail.test\nSubject: f\n\n" + FORGED),
    ])  # fmt: skip
    for replies in out:
        assert replies[-2].startswith(b"250 ok"), replies
    by_subject = {m.split(b"Subject: ")[1][:1]: m for m in _queued(home)}
    for key, spf_res, dmarc_res in ((b"p", "pass", "pass"), (b"f", "fail", "fail")):
        mess = by_subject[key]
        first, second, third = mess.split(b"\n", 2)[0], *mess.split(b"\n")[1:3]
        assert first.startswith(b"Received: (qmail ") and second.startswith(b"Received: from ")
        assert mess.count(b"Authentication-Results:") == (1 if key == b"p" else 2)  # body kept
        assert b"Authentication-Results: mx.test.example;" in mess.split(b"\n\n")[0]
        ar_start = mess.index(b"Authentication-Results:")
        ar_end = mess.index(b"\n", mess.index(b"dmarc=", ar_start))
        assert mess[:ar_start].count(b"\n") == 3  # right after the Received lines
        h = authres.AuthenticationResultsHeader.parse(
            mess[ar_start:ar_end].decode().replace("\n\t", " "))  # fmt: skip
        mailfrom = [
            r for r in h.results if r.method == "spf" and r.properties[0].name == "mailfrom"
        ]
        helo = [r for r in h.results if r.method == "spf" and r.properties[0].name == "helo"]
        dmarc = [r for r in h.results if r.method == "dmarc"]
        assert [r.result for r in mailfrom + helo + dmarc] == [spf_res, "none", dmarc_res]
        assert b"spf=pass smtp.mailfrom=x@fail.test" not in mess.split(b"\n\n")[0]
        del third


def test_listener_enforces(home: Home, dnsmasq: str) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    (home.control / "authchecks").write_text("spf=enforce\ndmarc=enforce\n")
    out = _serve(home, dnsmasq, [
        (b"bob@fail.test", b"From: bob@fail.test\n\nx\n"),
        (b"bob@neutral.test", b"From: bob@neutral.test\n\nx\n"),
        (b"bob@pass.test", b"From: bob@pass.test\n\nx\n"),
    ])  # fmt: skip
    assert out[0][2].startswith(b"550 5.7.23 ") and len(out[0]) == 4
    assert out[1][2].startswith(b"250") and out[1][-2].startswith(b"550 5.7.1 ")
    assert out[2][-2].startswith(b"250 ok")
    assert len(_queued(home)) == 1


def test_listener_relay_clients_are_not_checked(home: Home, silent: str) -> None:
    """RELAYCLIENT (here from tcprules) skips the checks: no DNS, no header."""
    from pyqmail import tcprules

    (home.control / "rcpthosts").write_text("test.example\n")
    tcprules.compile_cdb(
        [b'127.:allow,RELAYCLIENT=""\n'],
        home.control / "tcp.smtp.cdb",
        home.control / "tcp.smtp.tmp",
    )
    out = _serve(home, silent, [(b"bob@fail.test", b"From: bob@fail.test\n\nx\n")])
    assert out[0][-2].startswith(b"250 ok")
    (mess,) = _queued(home)
    assert b"Authentication-Results" not in mess


def test_listener_spf_only_streams_with_the_header(home: Home, dnsmasq: str) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    (home.control / "authchecks").write_text("dkim=off\ndmarc=off\n")
    out = _serve(home, dnsmasq, [(b"bob@fail.test", FORGED + b"From: bob@fail.test\n\nx\n")])
    assert out[0][-2].startswith(b"250 ok")
    (mess,) = _queued(home)
    head = mess.split(b"\n\n")[0]
    assert (
        b"Authentication-Results: mx.test.example;\n\tspf=fail smtp.mailfrom=bob@fail.test" in head
    )
    assert b"dmarc=" not in head and b"x@fail.test" not in head


def test_spf_evaluations_per_connection_are_bounded(tmp_path: Path, dnsmasq: str) -> None:
    c = _conn(tmp_path, dnsmasq, Policy(spf=Mode.ENFORCE))

    async def many() -> list[bytes | None]:
        return [await c.mail(b"bob@pass.test", b"[127.0.0.1]") for _ in range(ac.MAX_SPF + 3)]

    got = asyncio.run(many())
    assert got[: ac.MAX_SPF] == [None] * ac.MAX_SPF
    assert got[ac.MAX_SPF :] == [ac.SPF_TEMP] * 3


def test_listener_pipelined_transaction_then_half_close(home: Home, dnsmasq: str) -> None:
    """Everything in one write, then EOF: MAIL waits for SPF, the rest is held, and the
    message is still queued (the EOF is not read while the message commits)."""
    (home.control / "rcpthosts").write_text("test.example\n")

    async def main() -> bytes:
        srv = SmtpServer(home, ControlCache(home), qsubmit.submitter(home), commit_process=False,
                         auth=AuthChecker(home.control, resolver=dnsmasq, ttl=0))  # fmt: skip
        server = await srv.start("127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            w.write(b"HELO client.test\r\nMAIL FROM:<bob@pass.test>\r\nRCPT TO:<a@test.example>\r\n"
                    b"DATA\r\nFrom: bob@pass.test\r\n\r\nbody\r\n.\r\n")  # fmt: skip
            w.write_eof()
            return await asyncio.wait_for(r.read(), 20)
        finally:
            w.close()
            server.close()
            await server.wait_closed()
            await srv.aclose()

    out = asyncio.run(main())
    assert [line[:3] for line in out.split(b"\r\n")[:-1]] == [b"220", b"250", b"250", b"250",
                                                               b"354", b"250"]  # fmt: skip
    (mess,) = _queued(home)
    assert b"spf=pass smtp.mailfrom=bob@pass.test" in mess
