"""Hostile inputs to the checks of incoming mail, each with its defined result and no crash,
the session going on (issue 17's table; test_authcheck_dns.py has the first cases: the
include chain over 10 lookups, three void lookups, a DMARC record with garbage, two DMARC
records, the 100 KB header through the listener):

* DKIM-Signature fields with malformed tags: a missing required tag, an unknown version
  or algorithm, h= without From, b= or bh= not base64, an expired x=, an i= outside d=,
  l= longer than the body, a selector DNS cannot carry, a 100 KB field, NUL and 8-bit
  bytes, more signatures than are verified: ``permerror`` (RFC 6376 6.1.1, RFC 8601 2.7.1:
  it cannot be verified at all) when the field is unusable before its key is fetched,
  ``fail`` when the key is there and the hash or the signature do not match;
* SPF records that recurse (an include loop, a self-include, a redirect loop), ask for
  more than 10 MX names, have two ``v=spf1`` records, include a domain without a record,
  or are garbage: ``permerror`` (RFC 7208 4.5, 4.6.4, 5.2, 6.1);
* DMARC records with garbage: ``permerror``, or ``none`` when no record is DMARC's;
* all of it in one SMTP session through each door (qmail-smtpd on stdio, the listener),
  tag mode: every message accepted with its header, the last one after all the others.

DNS is Debian's dnsmasq on loopback."""

# ruff: noqa: F811  (dkim_key is test_authcheck_dns.py's fixture, imported by name)

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.queue import submit as qsubmit
from pyqmail.smtp import authcheck as ac
from pyqmail.smtp.authcheck import AuthChecker, Mode, Policy
from pyqmail.smtp.server import SmtpServer
from tests.conftest import dnsmasq_server, require_tools, write_control
from tests.integration.test_authcheck_dns import (  # noqa: F401
    ME,
    Client,
    _queued,
    _txt,
    dkim_key,
)
from tests.integration.test_authcheck_stdio import ar_header, stdio_session, transaction


@pytest.fixture(scope="module")
def hostile_dns(
    tmp_path_factory: pytest.TempPathFactory, dkim_key: tuple[bytes, str]
) -> Iterator[str]:
    require_tools("dnsmasq")
    d = tmp_path_factory.mktemp("dnsmasq-hostile")
    records = [
        _txt("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
        _txt("loop.test", "v=spf1 include:loop2.test -all"),
        _txt("loop2.test", "v=spf1 include:loop.test -all"),
        _txt("self.test", "v=spf1 include:self.test ip4:127.0.0.1 -all"),
        _txt("redir.test", "v=spf1 redirect=redir2.test"),
        _txt("redir2.test", "v=spf1 redirect=redir.test"),
        _txt("mx11.test", "v=spf1 mx ip4:127.0.0.1 -all"),
        *[f"--mx-host=mx11.test,m{i}.mx11.test,{i}" for i in range(11)],
        *[f"--host-record=m{i}.mx11.test,192.0.2.{i + 1}" for i in range(11)],
        _txt("mx10.test", "v=spf1 mx ip4:127.0.0.1 -all"),
        *[f"--mx-host=mx10.test,m{i}.mx10.test,{i}" for i in range(10)],
        *[f"--host-record=m{i}.mx10.test,192.0.2.{i + 1}" for i in range(10)],
        _txt("two.test", "v=spf1 ip4:127.0.0.1 -all"), _txt("two.test", "v=spf1 -all"),
        _txt("incnone.test", "v=spf1 include:nothing.test ip4:127.0.0.1 -all"),
        _txt("junk.test", "v=spf1 ip4:127.0.0.1 +frob:bar -all"),
        _txt("cidr.test", "v=spf1 ip4:127.0.0.1/99 -all"),
        _txt("macro.test", "v=spf1 exists:%{z}.macro.test -all"),
        _txt("_dmarc.pass.test", "v=DMARC1; p=reject"),
        _txt("_dmarc.junk.test", "v=DMARC1; p=whatever; \x01\x7f;;=="),
        _txt("_dmarc.nop.test", "v=DMARC1; rua=mailto:x@nop.test"),
        _txt("_dmarc.spfonly.test", "v=spf1 -all"),
        _txt("_dmarc.long.test", "v=DMARC1; p=reject; " + "x" * 200),
        _txt("sel._domainkey.dkim.test", f"v=DKIM1; k=rsa; p={dkim_key[1]}"),
        _txt("bad._domainkey.dkim.test", "v=DKIM1; k=rsa; p=!!notbase64!!"),
        _txt("rev._domainkey.dkim.test", "v=DKIM1; k=rsa; p="),  # a revoked key
    ]  # fmt: skip
    with dnsmasq_server(d, records, "pass.test", "TXT") as server:
        yield server


def checker(tmp_path: Path, spec: str) -> AuthChecker:
    return AuthChecker(tmp_path, resolver=spec, ttl=0)


# -- SPF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "want"),
    [
        ("loop.test", "permerror"),  # include loop: stopped by the 10-lookup limit
        ("self.test", "permerror"),
        ("redir.test", "permerror"),  # redirect loop
        ("mx11.test", "permerror"),  # 11 MX names (RFC 7208 4.6.4)
        ("mx10.test", "pass"),  # 10: within it
        ("two.test", "permerror"),  # two v=spf1 records (4.5)
        ("incnone.test", "permerror"),  # include: of a domain with no record (5.2)
        ("junk.test", "permerror"),  # an unknown mechanism (4.6.1: a syntax error)
        ("cidr.test", "permerror"),  # a prefix over 32
        ("macro.test", "permerror"),  # an unknown macro letter (7.1)
        ("nothing.test", "none"),
    ],
)
def test_spf_hostile_records(tmp_path: Path, hostile_dns: str, domain: str, want: str) -> None:
    got = asyncio.run(checker(tmp_path, hostile_dns).spf("127.0.0.1", f"bob@{domain}", "x.test"))
    assert got == want


# -- DMARC ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "want"),
    [
        ("junk.test", "permerror"),
        ("nop.test", "permerror"),  # no p= (RFC 7489 6.6.3: no valid policy)
        ("spfonly.test", "none"),  # a TXT record there, but not DMARC's
        ("long.test", "fail"),  # an unknown long tag is ignored: p=reject holds
    ],
)
def test_dmarc_hostile_records(tmp_path: Path, hostile_dns: str, domain: str, want: str) -> None:
    c = checker(tmp_path, hostile_dns).connection(Policy(dmarc=Mode.ENFORCE), ME, "127.0.0.1")
    asyncio.run(c.mail(b"bob@pass.test", b"x.test"))  # SPF passes, for pass.test only
    v = asyncio.run(c.message(b"From: bob@" + domain.encode() + b"\n", lambda: b""))
    assert v.dmarc is not None and v.dmarc.result == want
    assert (v.refusal == ac.DMARC_REJECT) is (want == "fail")  # only fail with p=reject


# -- DKIM ----------------------------------------------------------------------------------

BODY = b"From: bob@dkim.test\nTo: x@y.test\nSubject: s\n\nhello\n"


def signed(key: bytes, **kw: object) -> bytes:
    crlf = BODY.replace(b"\n", b"\r\n")
    sig = dkim.sign(crlf, b"sel", b"dkim.test", key, include_headers=[b"from", b"subject"],
                    linesep=b"\n", **kw)  # fmt: skip
    return bytes(sig) + BODY


def with_field(field: bytes) -> bytes:
    return b"DKIM-Signature: " + field + b"\n" + BODY


def tag(msg: bytes, name: bytes, value: bytes | None) -> bytes:
    """The signature of ``msg`` with tag ``name`` replaced (None: removed; added if absent)."""
    head, rest = msg.split(b"\nFrom:", 1)
    unfolded = re.sub(rb"\n[ \t]+", b" ", head)
    parts = [p.strip() for p in unfolded.split(b":", 1)[1].split(b";")]
    out = []
    for p in parts:
        k = p.split(b"=", 1)[0].strip()
        if k == name:
            if value is not None:
                out.append(name + b"=" + value)
        elif p:
            out.append(p)
    if value is not None and not any(p.split(b"=", 1)[0].strip() == name for p in parts):
        out.insert(1, name + b"=" + value)
    return b"DKIM-Signature: " + b"; ".join(out) + b"\nFrom:" + rest


def signed_without_from(key: bytes) -> bytes:
    """A signature that verifies but whose h= has no From (dkimpy's sign() refuses to make
    one; its own signing steps, with h=subject)."""
    import hashlib

    crlf = BODY.replace(b"\n", b"\r\n")
    d = dkim.DKIM(crlf, signature_algorithm=b"rsa-sha256", linesep=b"\n")
    canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    d.hasher = dkim.HASH_ALGORITHMS[b"rsa-sha256"]
    bh = base64.b64encode(hashlib.sha256(canon.canonicalize_body(d.body)).digest())
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"),
              (b"d", b"dkim.test"), (b"s", b"sel"), (b"h", b"subject"), (b"bh", bh),
              (b"b", b"0" * 60)]  # fmt: skip
    pk = dkim.crypto.parse_pem_private_key(key)
    value = d.gen_header(fields, (b"subject",), canon, b"DKIM-Signature", pk)
    return b"DKIM-Signature: " + value + BODY


# 100 KB of z= in lines of 900 octets (SMTP's limit is 1000: qmail-smtpd refuses longer)
HUGE_FIELD = with_field(b"v=1; a=rsa-sha256; z=" + b"\n\t".join([b"A" * 900] * 112))


def hostile_dkim(key: bytes) -> list[tuple[str, bytes, str]]:
    good = signed(key)
    return [
        ("good", good, "pass"),
        ("no b=", tag(good, b"b", None), "permerror"),
        ("no bh=", tag(good, b"bh", None), "permerror"),
        ("no d=", tag(good, b"d", None), "permerror"),
        ("no s=", tag(good, b"s", None), "permerror"),
        ("no h=", tag(good, b"h", None), "permerror"),
        ("v=2", tag(good, b"v", b"2"), "permerror"),
        ("a=rsa-md5", tag(good, b"a", b"rsa-md5"), "permerror"),
        ("h= without from", signed_without_from(key), "permerror"),  # RFC 6376 6.1.1
        ("h= changed", tag(good, b"h", b"subject : from"), "fail"),
        ("b= not base64", tag(good, b"b", b"!!!%%%"), "permerror"),
        ("bh= not base64", tag(good, b"bh", b"@@@"), "permerror"),
        ("bh= of another body", tag(good, b"bh", base64.b64encode(b"x" * 32)), "fail"),
        ("b= of another header", tag(good, b"b", base64.b64encode(b"x" * 128)), "fail"),
        ("x= expired", signed(key).replace(b"t=", b"x=1000000000; t=", 1), "permerror"),
        ("i= outside d=", tag(good, b"i", b"@evil.test"), "permerror"),
        ("l= added", tag(good, b"l", b"3"), "fail"),  # the field is hashed too
        ("l= not a number", tag(good, b"l", b"-1"), "permerror"),
        ("l= over 76 digits", tag(good, b"l", b"9" * 77), "permerror"),
        ("l=, then text appended", signed(key, length=True) + b"appended\n", "pass"),
        ("s= no DNS name", tag(good, b"s", b"a" * 300), "permerror"),
        ("s= with a NUL", tag(good, b"s", b"se\x00l"), "permerror"),
        ("8-bit tags", tag(good, b"d", b"d\xe9kim.test"), "permerror"),
        ("duplicate tag", tag(good, b"q", b"dns/txt; q=dns/txt"), "permerror"),
        ("no key", tag(good, b"s", b"nokey"), "permerror"),
        ("key not base64", tag(good, b"s", b"bad"), "permerror"),
        ("revoked key", tag(good, b"s", b"rev"), "permerror"),
        ("garbage field", with_field(b";;;==;\x01\x02=;" * 10), "permerror"),
        ("empty field", with_field(b""), "permerror"),
        ("100 KB field", HUGE_FIELD, "permerror"),
    ]


@pytest.fixture(scope="module")
def dkim_cases(dkim_key: tuple[bytes, str]) -> list[tuple[str, bytes, str]]:
    return hostile_dkim(dkim_key[0])


def test_dkim_malformed_signatures(
    tmp_path: Path, hostile_dns: str, dkim_cases: list[tuple[str, bytes, str]]
) -> None:
    c = checker(tmp_path, hostile_dns).connection(Policy(dkim=Mode.ENFORCE), ME, "127.0.0.1")
    got = {}
    for name, msg, _want in dkim_cases:
        header = msg.split(b"\n\n", 1)[0] + b"\n"
        v = asyncio.run(c.message(header, lambda m=msg: m))  # type: ignore[misc]
        assert len(v.dkim) == 1, (name, v)
        got[name] = v.dkim[0].result
        assert (v.refusal is None) is (got[name] == "pass"), name
    assert got == {name: want for name, _, want in dkim_cases}


def test_dkim_verifies_at_most_max_sigs(
    tmp_path: Path, hostile_dns: str, dkim_key: tuple[bytes, str]
) -> None:
    one = signed(dkim_key[0])
    sig = one[: one.index(b"\nFrom:") + 1]
    many = sig * (ac.MAX_SIGS + 20) + BODY
    c = checker(tmp_path, hostile_dns).connection(Policy(), ME, "127.0.0.1")
    v = asyncio.run(c.message(many.split(b"\n\n", 1)[0] + b"\n", lambda: many))
    assert [d.result for d in v.dkim] == ["pass"] * ac.MAX_SIGS


# -- one session, each door ----------------------------------------------------------------


def session_cases(key: bytes) -> list[tuple[bytes, bytes, dict[str, str]]]:
    """(sender, message, results the header must give by method.property) in one session."""
    big = b"".join(b"X-F-%d: %s\n" % (i, b"y" * 90) for i in range(1100))  # a 100 KB header
    bad_sig = signed_without_from(key)
    return [
        (b"bob@loop.test", b"From: bob@loop.test\n\nx\n", {"spf": "permerror"}),
        (b"bob@mx11.test", b"From: bob@mx11.test\n\nx\n", {"spf": "permerror"}),
        (b"bob@pass.test", b"From: bob@junk.test\n\nx\n", {"dmarc": "permerror"}),
        (b"bob@pass.test", bad_sig, {"dkim": "permerror"}),
        (b"bob@pass.test", HUGE_FIELD, {"dkim": "permerror"}),
        (b"bob@pass.test", big + b"From: bob@pass.test\n\nx\n", {"spf": "pass", "dmarc": "pass"}),
        (b"bob@pass.test", b"From: bob@pass.test\n\nlast\n", {"spf": "pass", "dmarc": "pass"}),
    ]  # fmt: skip


def results(ar: bytes) -> dict[str, str]:
    """method -> result of the first result of each method in our header."""
    out: dict[str, str] = {}
    for m in re.finditer(rb"\t(\w+)=(\w+)", ar):
        out.setdefault(m.group(1).decode(), m.group(2).decode())
    return out


def check_queued(home: Home, cases: list[tuple[bytes, bytes, dict[str, str]]]) -> None:
    queued = _queued(home)
    assert len(queued) == len(cases)
    by_body = {m.rsplit(b"\n\n", 1)[1]: m for m in queued}
    got = [results(ar_header(m)) for m in queued]
    for _sender, msg, want in cases:
        if msg.endswith(b"last\n"):
            assert b"last\n" in by_body
        assert any(all(g.get(k) == v for k, v in want.items()) for g in got), (want, got)


def test_one_stdio_session_goes_on(
    home: Home, hostile_dns: str, dkim_key: tuple[bytes, str]
) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    cases = session_cases(dkim_key[0])
    script = [b"HELO client.test\r\n"]
    for sender, msg, _ in cases:
        script += transaction(sender, msg)
    out = stdio_session(home, hostile_dns, [*script, b"QUIT\r\n"])
    ends = [r for r in out if re.match(rb"250 ok \d+ qp \d+", r)]
    assert len(ends) == len(cases) and out[-1].startswith(b"221 "), out
    check_queued(home, cases)


def listener_session(home: Home, spec: str, script: list[bytes]) -> list[bytes]:
    """One connection to the listener (``pyqmail run``'s), one reply per line of script."""

    async def main() -> list[bytes]:
        auth = AuthChecker(home.control, resolver=spec, ttl=0)
        srv = SmtpServer(home, ControlCache(home), qsubmit.submitter(home), commit_process=False,
                         auth=auth)  # fmt: skip
        server = await srv.start("127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        c = Client(r, w)
        try:
            out = [await c.reply()]
            for line in script:
                w.write(line)
                out.append(await c.reply())
            return out
        finally:
            w.close()
            server.close()
            await server.wait_closed()
            await srv.aclose()

    return asyncio.run(main())


def test_one_listener_session_goes_on(
    home: Home, hostile_dns: str, dkim_key: tuple[bytes, str]
) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    cases = session_cases(dkim_key[0])
    script = [b"HELO client.test\r\n"]
    for sender, msg, _ in cases:
        script += transaction(sender, msg)
    out = listener_session(home, hostile_dns, [*script, b"QUIT\r\n"])
    ends = [r for r in out if re.match(rb"250 ok \d+ qp \d+", r)]
    assert len(ends) == len(cases) and out[-1].startswith(b"221 "), out
    check_queued(home, cases)
