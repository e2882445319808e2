"""MTA-STS without I/O (remote/mtasts.py): the TXT record, the policy file, MX patterns, the
cache record, and the plan a policy makes of the MX addresses."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from pyqmail.remote import mtasts
from pyqmail.remote.mtasts import Cached, Mode, PolicyError, parse_policy, parse_txt

POLICY = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    b"max_age: 86400\r\n"
)


@pytest.mark.parametrize(
    ("records", "ident"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1;  id=abc  ;  ext_x=1 "], "abc"),
        (["v=spf1 -all", "v=STSv1; id=1"], "1"),  # other TXT records do not count
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # two: no policy (3.1)
        (["v=STSv1"], None),  # no id
        (["v=STSv1; id=" + "a" * 33], None),  # id too long
        (["v=STSv1; id=a-b"], None),  # id is ALPHA / DIGIT only
        (["v=STSv10; id=1"], None),
        (["v=STSv1; junk"], None),
        ([], None),
    ],
)
def test_txt_record(records: list[str], ident: str | None) -> None:
    assert parse_txt(records) == ident


def test_policy_fields() -> None:
    p = parse_policy(POLICY)
    assert p.mode is Mode.ENFORCE and p.max_age == 86400
    assert p.mx == ("mail.example.com", "*.example.net")


def test_policy_lf_lines_unknown_keys_first_value_wins_and_max_age_capped() -> None:
    p = parse_policy(
        b"version: STSv1\nmode: testing\nmode: enforce\nfuture: x\nmx: MX.Example.COM.\n"
        b"max_age: 9999999999\n"
    )
    assert p.mode is Mode.TESTING
    assert p.mx == ("mx.example.com",)
    assert p.max_age == mtasts.MAX_AGE_CAP


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 60\n").mode is Mode.NONE


@pytest.mark.parametrize(
    "body",
    [
        b"mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
        b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
        b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",  # 1*10DIGIT
        b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a*.example\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nnot a field\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n\xff\n",
    ],
)
def test_bad_policies(body: bytes) -> None:
    with pytest.raises(PolicyError):
        parse_policy(body)


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("mail.example.com", True),
        ("MAIL.EXAMPLE.COM.", True),
        ("other.example.com", False),
        ("mx1.example.net", True),
        ("example.net", False),  # the wildcard needs a label
        ("a.b.example.net", False),  # and matches one label only
        ("xexample.net", False),
    ],
)
def test_mx_patterns(host: str, ok: bool) -> None:
    assert parse_policy(POLICY).matches(host) is ok


def test_cache_record_round_trip_and_damage() -> None:
    rec = Cached.make("example.com", "id1", POLICY, 1000.0)
    assert rec.expires == 1000.0 + 86400
    back = Cached.load(rec.dump())
    assert back == rec
    assert back.valid(1000.0 + 86399) and not back.valid(1000.0 + 86400)
    for bad in (b"", b"{}", b"not json", rec.dump().replace(b"STSv1", b"STSv9")):
        with pytest.raises(ValueError):
            Cached.load(bad)


def test_media_type() -> None:
    assert mtasts.media_type_ok("text/plain")
    assert mtasts.media_type_ok("Text/Plain; charset=utf-8")
    assert not mtasts.media_type_ok("text/html")
    assert not mtasts.media_type_ok(None)


@dataclass(frozen=True)
class A:
    name: str
    ip: str = "192.0.2.1"


def test_plan_enforce_keeps_only_matching_mx(caplog: pytest.LogCaptureFixture) -> None:
    rec = Cached.make("example.com", "1", POLICY, 0.0)
    addrs = [A("evil.example.org"), A("mail.example.com"), A("mx2.example.net")]
    with caplog.at_level(logging.WARNING, "pyqmail.remote"):
        plan = mtasts.plan(rec, "example.com", addrs, listed=False)
    assert plan.mode is Mode.ENFORCE and plan.refused is None
    assert [a.name for a in plan.addrs] == ["mail.example.com", "mx2.example.net"]
    assert plan.label == "example.com by its MTA-STS policy"
    assert "evil.example.org not in the policy" in caplog.text


def test_plan_enforce_without_a_matching_mx_is_refused() -> None:
    rec = Cached.make("example.com", "1", POLICY, 0.0)
    plan = mtasts.plan(rec, "example.com", [A("evil.example.org")], listed=True)
    assert plan.addrs == [] and plan.label == "example.com"
    assert plan.refused is not None
    assert b"MTA-STS" in plan.refused and plan.refused.endswith(b"(#4.7.5)\n")


def test_plan_testing_keeps_every_mx_and_none_is_no_policy() -> None:
    body = POLICY.replace(b"enforce", b"testing")
    addrs = [A("evil.example.org")]
    plan = mtasts.plan(Cached.make("example.com", "1", body, 0.0), "example.com", addrs, False)
    assert plan.mode is Mode.TESTING and plan.addrs == addrs and plan.refused is None
    none = Cached.make("example.com", "1", b"version: STSv1\nmode: none\nmax_age: 5\n", 0.0)
    assert mtasts.plan(none, "example.com", addrs, False).mode is Mode.NONE
    assert mtasts.plan(None, "example.com", addrs, False).label == "example.com"


def test_tls_failure_is_recognised_by_our_first_line_only() -> None:
    label = mtasts.tls_label("example.com")
    ours = (
        b"Connected to 192.0.2.1 but it does not offer STARTTLS; TLS is required for "
        b"example.com by its MTA-STS policy. (#4.7.5)\n"
    )
    assert mtasts.tls_failed(ours, label)
    assert not mtasts.tls_failed(ours, "example.com")
    spoof = b"Connected to 192.0.2.1 but greeting failed.\nRemote host said: " + ours
    assert not mtasts.tls_failed(spoof, label)
