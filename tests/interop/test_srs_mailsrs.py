"""pyqmail.srs against the reference implementation: Shevek's Mail::SRS, through Debian's
``srs`` command (package srs, libmail-srs-perl). Each side reverses what the other wrote,
SRS0 and SRS1, and both write the same address for the same sender on the same day."""

from __future__ import annotations

import subprocess

import pytest

from pyqmail.srs import Srs
from tests.conftest import require_tools

pytestmark = pytest.mark.interop

SECRET = "interop-secret-0123456789"
ALIAS = "fwd.example.net"


def perl_srs(*args: str) -> str:
    require_tools("srs")
    out = subprocess.run(
        ["srs", f"--secret={SECRET}", *args], capture_output=True, check=True, timeout=30
    )
    return out.stdout.decode().strip()


def ours() -> Srs:
    return Srs((SECRET.encode(),), ALIAS)


@pytest.mark.parametrize(
    "sender",
    ["bob@example.org", "Mixed.Case@Example.ORG", "a=b@example.org", "x-y+z@sub.example.org",
     "SRS0=abcd=XY=example.org=bob@first.example",
     "SRS1=zzzz=first.example==abcd=XY=example.org=bob@second.example"],
)  # fmt: skip
def test_same_address_and_reversed_both_ways(sender: str) -> None:
    theirs = perl_srs("--forward", sender, "--alias", ALIAS)
    mine = ours().forward(sender)
    assert mine == theirs
    expect = perl_srs("--reverse", theirs)
    assert ours().reverse(theirs[: theirs.rfind("@")]) == expect
    assert perl_srs("--reverse", mine) == ours().reverse(mine[: mine.rfind("@")])


def test_their_forged_address_is_forged_for_us_too() -> None:
    good = perl_srs("--forward", "bob@example.org", "--alias", ALIAS)
    forged = good.replace("=bob@", "=mallory@")
    proc = subprocess.run(
        ["srs", f"--secret={SECRET}", "--reverse", forged], capture_output=True, timeout=30
    )
    assert proc.returncode != 0 or not proc.stdout.strip()
    with pytest.raises(Exception, match="forged"):
        ours().reverse(forged[: forged.rfind("@")])
