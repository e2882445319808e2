"""policy.py: the relay check and databytes that SMTP, QMTP and `pyqmail check` share.

There were three relay checks, and they decoded the domain two ways: SMTP as ASCII with
replacement (every non-ASCII byte became ``?``), QMTP and `pyqmail check` as UTF-8 with
Unicode lower-casing (and `check` re-encoded strictly, which raised on a non-UTF-8 byte).
qmail's rcpthosts.c compares bytes, lower-casing ASCII letters only. The table says what
qmail decides and, in the last column, which old check decided otherwise.
"""

from __future__ import annotations

import pytest

from pyqmail import cdb, policy
from pyqmail.check import check
from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.smtp.qmtpd import QmtpPolicy
from pyqmail.smtp.session import Session

E_ACUTE, E_ACUTE_UP, KELVIN = b"\xc3\xa9", b"\xc3\x89", b"\xe2\x84\xaa"

CASES = [
    # rcpthosts, morercpthosts keys, recipient, qmail's answer, the old check that differed
    (b"test.example\n.wild.example\n", [], b"x@TEST.Example", True, None),
    (b"test.example\n.wild.example\n", [], b"x@a.wild.example", True, None),
    (b"test.example\n.wild.example\n", [], b"x@wild.example", False, None),
    (b"Test.Example\n", [], b"x@test.example", True, None),
    (b"test.example\n", [], b"local-only", True, None),
    (b"test.example\n", [], b"x@", False, None),
    (E_ACUTE + b".example\n", [], b"x@" + E_ACUTE + b".example", True, "smtp"),
    (E_ACUTE + b".example\n", [], b"x@" + E_ACUTE_UP + b".example", False, "qmtp"),
    (E_ACUTE_UP + b".example\n", [], b"x@" + E_ACUTE_UP + b".example", True, "smtp"),
    (b"k.example\n", [], b"x@" + KELVIN + b".example", False, "qmtp"),  # K lowers to k
    (b"?.example\n", [], b"x@\xff.example", False, "smtp"),  # \xff read as ?
    (b"test.example\n", [E_ACUTE + b".example"], b"x@" + E_ACUTE + b".example", True, "smtp"),
    (b"test.example\n", [b"\xff.example"], b"x@\xff.example", True, "smtp"),
    (b"test.example\n", [b"more.example"], b"x@MORE.example", True, None),
    (b"test.example\n", [b"more.example"], b"x@sub.more.example", False, None),
]


def _setup(home: Home, rcpthosts: bytes, more: list[bytes]) -> cdb.Reader | None:
    (home.control / "rcpthosts").write_bytes(rcpthosts)
    if not more:
        return None
    path = home.control / "morercpthosts.cdb"
    with cdb.Writer(path) as w:
        for key in more:
            w.add(key, b"")
    return cdb.Reader.open(path)


@pytest.mark.parametrize(("rcpthosts", "more", "rcpt", "expect", "_was"), CASES)
def test_smtp_and_qmtp_decide_as_rcpthosts_c(
    home: Home, rcpthosts: bytes, more: list[bytes], rcpt: bytes, expect: bool, _was: str | None
) -> None:
    reader = _setup(home, rcpthosts, more)
    try:
        ctl = load(home)
        assert policy.RcptHosts.of(ctl, reader).allowed(rcpt) is expect
        assert Session(ctl, {}, morercpthosts=reader).rcpt_allowed(rcpt) is expect
        assert QmtpPolicy(ctl, {}, reader).allowed(rcpt) is expect
    finally:
        if reader is not None:
            reader.close()


def test_no_rcpthosts_file_lets_everything_through(home: Home) -> None:
    (home.control / "rcpthosts").unlink()
    ctl = load(home)
    assert ctl.rcpthosts is None
    assert policy.RcptHosts.of(ctl).allowed(b"x@anywhere.example")


def test_relayclient_skips_the_check(home: Home) -> None:
    (home.control / "rcpthosts").write_bytes(b"test.example\n")
    ctl = load(home)
    assert policy.relayclient({}) is None
    assert policy.relayclient({"RELAYCLIENT": ""}) == b""
    assert QmtpPolicy(ctl, {"RELAYCLIENT": ""}, None).allowed(b"x@elsewhere.example")
    assert Session(ctl, {"RELAYCLIENT": ""}).rcpt_allowed(b"x@elsewhere.example")


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        ({}, 5000),
        ({"DATABYTES": "123"}, 123),
        ({"DATABYTES": "12k"}, 12),
        ({"DATABYTES": ""}, 0),
        ({"DATABYTES": "x"}, 0),
    ],
)
def test_databytes_is_one_reader(home: Home, env: dict[str, str], expect: int) -> None:
    (home.control / "databytes").write_bytes(b"5000\n")
    ctl = load(home)
    assert policy.databytes(ctl, env) == expect
    assert Session(ctl, env).databytes == expect
    assert QmtpPolicy(ctl, env, None).databytes == expect


def test_check_reads_a_non_utf8_local_domain(home: Home) -> None:
    """`pyqmail check` used to raise UnicodeEncodeError here (strict re-encoding)."""
    (home.control / "locals").write_bytes(b"mx.test.example\n\xff.example\n")
    reader = _setup(home, b"mx.test.example\n", [b"\xff.example"])
    assert reader is not None
    reader.close()
    assert not [p for p in check(home) if p.file == "control/locals"]
