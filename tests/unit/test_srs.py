"""pyqmail.srs: the scheme (encode, decode, case folding, age, forgery), control/srs's
format and the foreign-sender rule. Interop with Mail::SRS: tests/interop/test_srs_mailsrs.py."""

from __future__ import annotations

import pytest

from pyqmail import srs
from pyqmail.srs import ConfigError, Failure, Srs, SrsError

SECRET = b"0123456789abcdefSECRET"
DAY = 86400.0
NOW = 1_796_000_000.0  # a fixed instant; every test passes the time


def mk(*secrets: bytes, maxage: int = srs.MAXAGE) -> Srs:
    return Srs(secrets or (SECRET,), "fwd.example.net", maxage=maxage)


def local(addr: str) -> str:
    return addr[: addr.rfind("@")]


def test_srs0_round_trip() -> None:
    s = mk()
    got = s.forward("bob@Example.org", NOW)
    tag, h, ts, host, user = local(got).split("=")
    assert (tag, ts, host, user) == ("SRS0", srs.timestamp(NOW), "Example.org", "bob")
    assert len(h) == 4
    assert got.endswith("@fwd.example.net")
    assert s.reverse(local(got), NOW) == "bob@Example.org"


def test_known_value_matches_mail_srs() -> None:
    # computed by Debian's `srs` (Mail::SRS 0.31) with the same secret on day 20794 (2026-12-07)
    s = mk()
    day = 20794 * DAY + 5
    assert s.forward("bob@Example.org", day) == "SRS0=xlAk=J2=Example.org=bob@fwd.example.net"


def test_local_part_with_separators_and_at() -> None:
    s = mk()
    for sender in ("a=b=c@example.org", "x-y+z@example.org", '"odd@user"@example.org'):
        assert s.reverse(local(s.forward(sender, NOW)), NOW) == sender


@pytest.mark.parametrize("fold", [str.lower, str.upper])
def test_case_folded_address_still_reverses(fold: object) -> None:
    s = mk()
    got = local(s.forward("Bob@Example.ORG", NOW))
    folded = fold(got)  # type: ignore[operator]
    assert s.reverse(folded, NOW).lower() == "bob@example.org"


@pytest.mark.parametrize("sep", ["-", "+", "="])
def test_any_initial_separator_is_read(sep: str) -> None:
    s = mk()
    got = local(s.forward("bob@example.org", NOW))
    assert s.reverse("SRS0" + sep + got[5:], NOW) == "bob@example.org"


def test_forged_hash_refused() -> None:
    s = mk()
    got = local(s.forward("bob@example.org", NOW))
    h = got.split("=")[1]
    other = ("A" if h[0] != "A" else "B") + h[1:]
    with pytest.raises(SrsError) as e:
        s.reverse(got.replace(h, other, 1), NOW)
    assert e.value.failure is Failure.FORGED


def test_changed_address_refused() -> None:
    s = mk()
    got = local(s.forward("bob@example.org", NOW))
    with pytest.raises(SrsError) as e:
        s.reverse(got.replace("=bob", "=mallory"), NOW)
    assert e.value.failure is Failure.FORGED


@pytest.mark.parametrize("short", ["", "x", "xy", "xyz"])
def test_short_hash_refused(short: str) -> None:
    # a one-character hash that happens to match must not pass: at least HASHLENGTH
    s = mk()
    got = local(s.forward("bob@example.org", NOW)).split("=")
    real = got[1]
    candidate = "=".join([got[0], real[: len(short)], *got[2:]])
    with pytest.raises(SrsError):
        s.reverse(candidate, NOW)


def test_other_secret_refused_old_secret_accepted() -> None:
    old = mk(b"an-older-secret-value")
    got = local(old.forward("bob@example.org", NOW))
    with pytest.raises(SrsError):
        mk().reverse(got, NOW)
    assert mk(SECRET, b"an-older-secret-value").reverse(got, NOW) == "bob@example.org"


@pytest.mark.parametrize(
    ("age", "ok"), [(0, True), (1, True), (21, True), (22, False), (400, False), (-1, False)]
)
def test_age(age: int, ok: bool) -> None:
    s = mk()
    got = local(s.forward("bob@example.org", NOW))
    later = NOW + age * DAY
    if ok:
        assert s.reverse(got, later) == "bob@example.org"
    else:
        with pytest.raises(SrsError) as e:
            s.reverse(got, later)
        assert e.value.failure is Failure.EXPIRED


def test_timestamp_wraps_after_1024_days() -> None:
    assert srs.timestamp(NOW) == srs.timestamp(NOW + 1024 * DAY)
    assert srs.timestamp_ok(srs.timestamp(NOW - 3 * DAY), NOW)
    assert not srs.timestamp_ok("A", NOW)
    assert not srs.timestamp_ok("A1", NOW)  # 1 is not in the alphabet


def test_srs1_from_someone_elses_srs0_and_back() -> None:
    s = mk()
    first = "SRS0=abcd=XY=example.org=bob@first.example"
    got = s.forward(first, NOW)
    assert got.startswith("SRS1=")
    assert "=first.example==abcd=XY=example.org=bob@" in got
    assert s.reverse(local(got), NOW) == first


def test_srs1_from_srs1_keeps_first_hop() -> None:
    s = mk()
    got = s.forward("SRS1=zzzz=first.example==abcd=XY=example.org=bob@second.example", NOW)
    assert local(got).split("=", 2)[2] == "first.example==abcd=XY=example.org=bob"
    assert s.reverse(local(got), NOW) == "SRS0=abcd=XY=example.org=bob@first.example"


def test_srs1_forged() -> None:
    with pytest.raises(SrsError) as e:
        mk().reverse("SRS1=abcd=first.example==abcd=XY=example.org=bob", NOW)
    assert e.value.failure is Failure.FORGED


@pytest.mark.parametrize(
    "bad",
    ["bob", "SRS0", "SRS0=", "SRS0=abcd=XY=example.org", "SRS0=abcd==example.org=bob",
     "SRS0=abcd=XY=a@b=bob", "SRS1=abcd=first.example", "SRS1=abcd==x", "SRS2=abcd=XY=a=b"],
)  # fmt: skip
def test_malformed(bad: str) -> None:
    with pytest.raises(SrsError) as e:
        mk().reverse(bad, NOW)
    assert e.value.failure in (Failure.MALFORMED, Failure.FORGED)


def test_no_rewrite_for_our_domain_or_no_at() -> None:
    s = mk()
    assert s.forward("SRS0=x=y=z=w@fwd.example.net", NOW) == "SRS0=x=y=z=w@fwd.example.net"
    assert s.forward("bob", NOW) == "bob"
    assert s.forward("", NOW) == ""


def test_is_srs() -> None:
    assert srs.is_srs("SRS0=a") and srs.is_srs("srs1-a") and srs.is_srs("Srs0+x")
    assert not srs.is_srs("SRS0") and not srs.is_srs("srs2=a") and not srs.is_srs("bob")


# --- control/srs -------------------------------------------------------------------------


def test_parse() -> None:
    got = srs.parse(b"0123456789abcdefgh  \nSRS.Example.net\nold-secret-1\n\n")
    assert got.secrets == (b"0123456789abcdefgh", b"old-secret-1")
    assert got.domain == "srs.example.net"


@pytest.mark.parametrize("raw", [b"", b"\n", b"secret-only\n", b"secret\n\n", b"\nexample.net\n"])
def test_parse_incomplete(raw: bytes) -> None:
    with pytest.raises(ConfigError):
        srs.parse(raw)


def test_load_missing_is_off(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    assert srs.load(d) is None
    (d / "srs").write_bytes(b"0123456789abcdefgh\nexample.net\n")
    got = srs.load(d)
    assert got is not None and got.domain == "example.net"


@pytest.mark.parametrize(
    ("raw", "lines"),
    [
        (b"0123456789abcdefgh\nsrs.example.net\n", []),
        (b"short\nsrs.example.net\n", [1]),
        (b"\nsrs.example.net\n", [1]),
        (b"0123456789abcdefgh\n", [2]),
        (b"0123456789abcdefgh\nnot a domain\n", [2]),
        (b"0123456789abcdefgh\nuser@example.net\n", [2]),
    ],
)
def test_problems(raw: bytes, lines: list[int]) -> None:
    assert [n for n, _ in srs.problems(raw)] == lines


# --- foreign ------------------------------------------------------------------------------

LOCALS = frozenset({"example.com", "srs.example.com"})
VIRTUAL = {"virt.example": "alice", ".wild.example": "bob"}


@pytest.mark.parametrize(
    ("sender", "rcpts", "want"),
    [
        ("bob@example.org", ["carol@elsewhere.net"], True),
        ("bob@example.org", ["carol@example.com"], False),
        ("bob@example.org", ["carol@example.com", "dan@elsewhere.net"], True),
        ("bob@example.org", ["carol"], False),
        ("bob@EXAMPLE.COM", ["carol@elsewhere.net"], False),
        ("bob@virt.example", ["carol@elsewhere.net"], False),
        ("bob@a.wild.example", ["carol@elsewhere.net"], False),
        ("bob@example.org", ["carol@x.virt.example"], True),
        ("", ["carol@elsewhere.net"], False),
        ("#@[]", ["carol@elsewhere.net"], False),
        ("bob", ["carol@elsewhere.net"], False),
    ],
)
def test_needs_rewrite(sender: str, rcpts: list[str], want: bool) -> None:
    assert srs.needs_rewrite(sender, rcpts, LOCALS, VIRTUAL) is want
