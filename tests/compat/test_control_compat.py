"""qmail-showctl and qmail-newmrh against notqmail's, on the same control files.

Our qmail-showctl's qmail part (everything after the user/group id lines, up to
pyqmail's own section) must be byte-identical to notqmail's; qmail-newmrh must write the
same cdb bytes and fail the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyqmail.home import Home
from pyqmail.showctl import report
from tests.compat.conftest import Reference

PYQMAIL_SECTION = "pyqmail additions (qmail does not read these files):"

LINE_FILES = ["bouncefrom", "bouncehost", "defaultdomain", "defaulthost", "doublebouncehost",
              "doublebounceto", "envnoathost", "helohost", "idhost", "localiphost", "me",
              "plusdomain", "smtpgreeting"]  # fmt: skip
INT_FILES = ["concurrencylocal", "concurrencyremote", "databytes", "queuelifetime",
             "timeoutconnect", "timeoutremote", "timeoutsmtpd"]  # fmt: skip
LIST_FILES = ["badmailfrom", "locals", "percenthack", "qmqpservers", "rcpthosts",
              "morercpthosts", "smtproutes", "virtualdomains"]  # fmt: skip


def ours_qmail_part(control: Path) -> list[str]:
    text = report(Home(control.parent, single_user=True))
    lines = text.splitlines()
    end = lines.index(PYQMAIL_SECTION)
    return [lines[1], lines[2], lines[4], *lines[7 : end - 2]]


def theirs_qmail_part(reference: Reference, control: Path) -> list[str]:
    p = reference.run("qmail-showctl", control)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode("latin-1").splitlines()
    return [lines[1], lines[2], lines[4], *lines[7:]]


def control_dir(tmp: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    c = tmp / "control"
    if c.exists():
        for p in c.iterdir():
            p.rmdir() if p.is_dir() else p.unlink()
    c.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (c / name).write_bytes(data)
    for name in dirs:
        (c / name).mkdir()
    return c


SCENARIOS: dict[str, tuple[dict[str, bytes], tuple[str, ...]]] = {
    "empty": ({}, ()),
    "config-fast": (
        {
            "me": b"mx.test.example\n",
            "locals": b"mx.test.example\n",
            "rcpthosts": b"mx.test.example\n",
            "defaultdomain": b"test.example\n",
            "plusdomain": b"test.example\n",
        },
        (),
    ),
    "everything": (
        {
            **{n: f"{n}.value \t\nsecond\n".encode() for n in LINE_FILES},
            **{n: b"77s\n" for n in INT_FILES},
            **{n: b"# c\na.example\n\n  b.example \nc:d:e" for n in LIST_FILES},
            "unknown": b"x",
        },
        (),
    ),
    "unreadable": ({"me": b"m\n"}, ("badmailfrom", "bouncefrom", "databytes", "rcpthosts")),
    "odd bytes": (
        {"me": b"a\xe9%\x7f\x01b\n", "smtpgreeting": b"\tx y\r\n", "locals": b"\xff\xfe\n#x\n"},
        (),
    ),
    "mrh only": ({"morercpthosts": b"m.example\n", "morercpthosts.cdb": b""}, ()),
    "big numbers": (
        dict(
            zip(
                INT_FILES,
                [
                    b"2147483647\n",
                    b"2147483648\n",
                    b"4294967306\n",
                    b"18446744073709551616\n",
                    b"99999999999999999999\n",
                    b"00000000000000000000000000012\n",
                    b"4294967295x\n",
                ],
                strict=True,
            )
        ),
        (),
    ),
    "empty files": ({n: b"" for n in LINE_FILES + INT_FILES + LIST_FILES}, ()),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_showctl_same_as_qmail(reference: Reference, tmp_path: Path, name: str) -> None:
    files, dirs = SCENARIOS[name]
    control = control_dir(tmp_path, files, dirs)
    if name == "mrh only":
        os.utime(control / "morercpthosts.cdb", (1_500_000_000, 1_500_000_000))
    assert ours_qmail_part(control) == theirs_qmail_part(reference, control)


_CONTENT = st.binary(max_size=30) | st.sampled_from(
    [b"", b"\n", b"0\n", b"12\n", b"x.example\n", b"#\n", b" 5\n", b"a:b\n:c\n"]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(LINE_FILES + INT_FILES + LIST_FILES), _CONTENT, max_size=8))
def test_showctl_differential(
    reference: Reference, tmp_path: Path, files: dict[str, bytes]
) -> None:
    control = control_dir(tmp_path, files)
    assert ours_qmail_part(control) == theirs_qmail_part(reference, control)


def run_ours_newmrh(control: Path) -> tuple[int, bytes]:
    import subprocess

    code = "import sys; from pyqmail.cli.newmrh import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "--home", str(control.parent)],
                       capture_output=True)  # fmt: skip
    return p.returncode, p.stderr


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=200) | st.lists(st.sampled_from(
    ["A.Example", "# c", "", "  sp ", "\t", "b.example", "x" * 300]), max_size=20).map(
    lambda lines: "\n".join(lines).encode()))  # fmt: skip
def test_newmrh_same_bytes(reference: Reference, tmp_path: Path, content: bytes) -> None:
    control = control_dir(tmp_path, {"morercpthosts": content})
    p = reference.run("qmail-newmrh", control)
    assert p.returncode == 0, p.stderr
    theirs = (control / "morercpthosts.cdb").read_bytes()
    (control / "morercpthosts.cdb").unlink()
    code, err = run_ours_newmrh(control)
    assert code == 0, err
    assert (control / "morercpthosts.cdb").read_bytes() == theirs
    assert not (control / "morercpthosts.tmp").exists()


def test_newmrh_missing_source_same_failure(reference: Reference, tmp_path: Path) -> None:
    control = control_dir(tmp_path, {})
    p = reference.run("qmail-newmrh", control)
    code, err = run_ours_newmrh(control)
    assert (code, err) == (p.returncode, p.stderr)
