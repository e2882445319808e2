"""smtp/authcheck.py without DNS: the policy file, DMARC records and alignment, the From
domain, the Authentication-Results header (parsed back with authres)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import authres  # type: ignore[import-untyped]
import pytest

from pyqmail.smtp.authcheck import (
    DkimResult,
    DmarcRecord,
    DmarcResult,
    Mode,
    Policy,
    PolicyFile,
    SpfResult,
    Verdict,
    aligned,
    build_header,
    evaluate_dmarc,
    from_domain,
    is_domain,
    org_domain,
    parse_dmarc,
    parse_policy,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", Policy()),
        ("spf=enforce\n", Policy(spf=Mode.ENFORCE)),
        ("SPF = Enforce\ndkim=off\n# dmarc=off\n", Policy(Mode.ENFORCE, Mode.OFF, Mode.TAG)),
        ("dmarc=enforce\ndmarc=off\n", Policy(dmarc=Mode.OFF)),  # the last line wins
        ("spf=reject\nbogus=tag\nno equals sign\n", Policy()),  # ignored, defaults kept
    ],
)
def test_parse_policy(text: str, want: Policy) -> None:
    assert parse_policy(text) == want


def test_policy_active_only_when_a_check_is_on() -> None:
    assert Policy().active
    assert not Policy(Mode.OFF, Mode.OFF, Mode.OFF).active


def test_policy_file_rereads_on_change(tmp_path: Path) -> None:
    pf = PolicyFile(tmp_path / "authchecks", ttl=0)
    assert pf.get() == Policy()
    (tmp_path / "authchecks").write_text("spf=enforce\n")
    assert pf.get().spf is Mode.ENFORCE
    (tmp_path / "authchecks").write_text("spf=off\ndkim=off\n")
    os.utime(tmp_path / "authchecks", ns=(time.time_ns() + 10**9,) * 2)
    assert pf.get() == Policy(Mode.OFF, Mode.OFF, Mode.TAG)
    (tmp_path / "authchecks").unlink()
    assert pf.get() == Policy()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("v=DMARC1; p=reject", DmarcRecord("reject")),
        (
            "v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20",
            DmarcRecord("quarantine", "none", "s", "s"),
        ),
        ("v = DMARC1 ; P=Reject ; rua=mailto:x@y", DmarcRecord("reject")),
        ("v=DMARC1; p=none; sp=bogus; adkim=x", DmarcRecord("none")),  # bad sp/adkim: defaults
        ("v=DMARC1; p=reject; p=none", DmarcRecord("reject")),  # the first p counts
        ("v=DMARC1", None),  # no p: permerror
        ("v=DMARC1; p=discard", None),
        ("p=reject; v=DMARC1", None),  # v= must come first
        ("v=DMARC2; p=reject", None),
        ("\x00\xff;;;===;;p", None),
        ("v=DMARC1;" + "x" * 100_000, None),
    ],
)
def test_parse_dmarc(text: str, want: DmarcRecord | None) -> None:
    assert parse_dmarc(text) == want


def test_org_domain_uses_the_public_suffix_list() -> None:
    assert org_domain("a.b.example.com") == "example.com"
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    assert org_domain("Example.COM.") == "example.com"
    assert org_domain("co.uk") == "co.uk"  # a public suffix is its own


@pytest.mark.parametrize(
    ("a", "b", "strict", "want"),
    [
        ("example.com", "example.com", True, True),
        ("mail.example.com", "example.com", False, True),
        ("mail.example.com", "example.com", True, False),
        ("example.co.uk", "other.co.uk", False, False),
        ("", "example.com", False, False),
    ],
)
def test_alignment(a: str, b: str, strict: bool, want: bool) -> None:
    assert aligned(a, b, strict) is want


SPF_PASS = SpfResult("pass", "mailfrom", "bounce.example.com", "x@bounce.example.com")


@pytest.mark.parametrize(
    ("rec", "at_org", "spf", "dkims", "want"),
    [
        (DmarcRecord("reject"), False, SPF_PASS, [], "pass"),  # relaxed SPF alignment
        (DmarcRecord("reject", aspf="s"), False, SPF_PASS, [], "fail"),
        (
            DmarcRecord("reject", adkim="s"),
            False,
            None,
            [DkimResult("pass", "example.com")],
            "pass",
        ),
        (DmarcRecord("reject"), False, None, [DkimResult("pass", "evil.example")], "fail"),
        (DmarcRecord("reject"), False, None, [DkimResult("fail", "example.com")], "fail"),
        (DmarcRecord("reject"), False, None, [DkimResult("temperror", "example.com")], "temperror"),
        (
            DmarcRecord("reject"),
            False,
            SpfResult("temperror", "mailfrom", "example.com", ""),
            [],
            "temperror",
        ),
    ],
)
def test_evaluate_dmarc(
    rec: DmarcRecord, at_org: bool, spf: SpfResult | None, dkims: list[DkimResult], want: str
) -> None:
    assert evaluate_dmarc("example.com", rec, at_org, spf, dkims).result == want


def test_subdomain_policy_applies_when_the_record_is_the_organisations() -> None:
    rec = DmarcRecord("reject", sp="none")
    assert evaluate_dmarc("a.example.com", rec, True, None, []).policy == "none"
    assert evaluate_dmarc("example.com", rec, False, None, []).policy == "reject"
    assert evaluate_dmarc("a.example.com", DmarcRecord("quarantine"), True, None, []).policy == (
        "quarantine"
    )


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (b"From: Bob <bob@Example.COM>\nTo: x@y.z\n", "example.com"),
        (b"From: a@example.com, b@example.com\n", "example.com"),
        (b"From: a@example.com, b@other.example\n", None),  # two domains
        (b"From: a@example.com\nFrom: b@example.com\n", None),  # two From fields
        (b"To: x@y.z\n", None),
        (b"From: not an address\n", None),
        (b"From: x@localhost\n", None),
        (b"From: x@" + b"a" * 5000 + b".com\n", None),
        (b"From: =?utf-8?q?B=C3=B6b?= <bob@example.com>\n", "example.com"),
        (b"From: \xff\xfe@\xff.example\n", None),
    ],
)
def test_from_domain(header: bytes, want: str | None) -> None:
    assert from_domain(header) == want


def test_from_domain_in_a_100k_header_is_found_fast() -> None:
    header = b"".join(b"X-Filler-%d: %s\n" % (i, b"y" * 90) for i in range(1100))
    header += b"From: bob@example.com\n"
    assert len(header) > 100_000
    t = time.monotonic()
    assert from_domain(header) == "example.com"
    assert time.monotonic() - t < 2.0


def test_is_domain() -> None:
    assert is_domain("mail.example.com")
    assert is_domain("mail.example.com.")
    for bad in ("localhost", "[1.2.3.4]", "a b.com", "", "-x.com", "x" * 64 + ".com", "1.2.3.4x;"):
        assert not is_domain(bad), bad


def _parse(raw: bytes) -> authres.AuthenticationResultsHeader:
    assert raw.endswith(b"\n") and raw.count(b"\n") == raw.count(b"\n\t") + 1
    text = raw.decode().replace("\n\t", " ").strip()
    return authres.AuthenticationResultsHeader.parse(text)


def test_header_round_trips_through_authres() -> None:
    v = Verdict(
        spf=[
            SpfResult("fail", "mailfrom", "x.example", '"a; spf=pass (b"@x.example'),
            SpfResult("pass", "helo", "mx.x.example", "mx.x.example"),
        ],
        dkim=[DkimResult("pass", "x.example", "sel"), DkimResult("permerror")],
        dmarc=DmarcResult("fail", "x.example", "reject"),
    )
    raw = build_header("mx.local.test", v)
    assert raw.startswith(b"Authentication-Results: mx.local.test;\n\t")
    h = _parse(raw)
    assert h.authserv_id == "mx.local.test"
    got = [(r.method, r.result) for r in h.results]
    assert got == [("spf", "fail"), ("spf", "pass"), ("dkim", "pass"), ("dkim", "permerror"),
                   ("dmarc", "fail")]  # fmt: skip
    props = {(p.type, p.name): p.value for r in h.results for p in r.properties}
    assert props[("smtp", "mailfrom")] == '"a; spf=pass (b"@x.example'  # quoted, not injected
    assert props[("header", "d")] == "x.example"
    assert props[("policy", "dmarc")] == "reject"


def test_header_with_no_results_says_none() -> None:
    raw = build_header("mx.local.test", Verdict())
    assert raw == b"Authentication-Results: mx.local.test; none\n"
    assert _parse(raw).results == []
