"""Which .qmail file applies and how its lines parse (local.md 3.2-3.3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyqmail.local import dotqmail
from pyqmail.local.dotqmail import DotQmailError, Instruction, Kind


def _home(tmp_path: Path, names: list[str]) -> int:
    for n in names:
        (tmp_path / n).write_text("./Maildir/\n")
    return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize(
    ("files", "dash", "ext", "chosen", "default"),
    [
        ([".qmail-a-b-c", ".qmail-default"], "-", "a-b-c", ".qmail-a-b-c", None),
        ([".qmail-a-b-default", ".qmail-a-default"], "-", "a-b-c", ".qmail-a-b-default", "c"),
        ([".qmail-a-default", ".qmail-default"], "-", "a-b-c", ".qmail-a-default", "b-c"),
        ([".qmail-default"], "-", "a-b-c", ".qmail-default", "a-b-c"),
        ([".qmail-a-b-default"], "-", "a-b-", ".qmail-a-b-default", ""),
        ([".qmail-default"], "-", "A.B-C", ".qmail-default", "A.B-C"),  # DEFAULT keeps case
        ([".qmail-a:b-default"], "-", "A.B-C", ".qmail-a:b-default", "C"),  # dots -> colons
        ([".qmail-john:smith"], "-", "John.Smith", ".qmail-john:smith", None),
        ([".qmail-xdefault"], "-", "xdefault", ".qmail-xdefault", "default"),
        ([".qmail"], "", "", ".qmail", None),
        ([".qmaildefault"], "", "", ".qmaildefault", ""),  # qmail's odd probe, dash empty
        ([], "-", "x", None, None),
        ([".qmail-ab-default"], "-", "abc", None, None),  # only at '-' boundaries
    ],
)
def test_lookup_order(
    tmp_path: Path, files: list[str], dash: str, ext: str, chosen: str | None, default: str | None
) -> None:
    fd = _home(tmp_path, files)
    try:
        got = dotqmail.choose(dash, ext, fd)
    finally:
        os.close(fd)
    assert (got.name, got.default) == (chosen, default)


@pytest.mark.parametrize("ext", ["../../etc/passwd", "a/b", "..", "x\0y", "../.qmail"])
def test_names_never_leave_the_home(tmp_path: Path, ext: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / ".qmail-default").write_text("|evil\n")  # outside the home
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("|evil\n")
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert dotqmail.choose("-", ext, fd).name is None
    finally:
        os.close(fd)


def test_non_regular_file_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / ".qmail-x").mkdir()
    (tmp_path / ".qmail-default").write_text("&a\n")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert dotqmail.choose("-", "x", fd).name == ".qmail-default"
    finally:
        os.close(fd)


def test_world_writable_qmail_is_temporary(tmp_path: Path) -> None:
    p = tmp_path / ".qmail-x"
    p.write_text("&a\n")
    p.chmod(0o646)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(DotQmailError, match=r"Uh-oh: .qmail file is writable. \(#4.7.0\)"):
            dotqmail.choose("-", "x", fd)
        p.chmod(0o664)  # group-writable is allowed (conf-patrn 002)
        assert dotqmail.choose("-", "x", fd).name == ".qmail-x"
    finally:
        os.close(fd)


def test_x_bit_marks_forward_only(tmp_path: Path) -> None:
    p = tmp_path / ".qmail-x"
    p.write_text("&a\n")
    p.chmod(0o744)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = dotqmail.choose("-", "x", fd)
    finally:
        os.close(fd)
    assert got.forward_only and got.content == b"&a\n"


def test_parse_lines() -> None:
    text = (
        b"# comment\n"
        b"|prog arg  \t\n"
        b"./Maildir/\n"
        b"/var/mail/joe\n"
        b"&joe@example.com\n"
        b"bob@example.com\n"
        b"\n"
        b"+list\n"
        b"+other\n"
        b"./mbox"
    )
    assert dotqmail.parse(text) == [
        Instruction(Kind.PROGRAM, "prog arg"),
        Instruction(Kind.MAILDIR, "./Maildir/"),
        Instruction(Kind.MBOX, "/var/mail/joe"),
        Instruction(Kind.FORWARD, "joe@example.com"),
        Instruction(Kind.FORWARD, "bob@example.com"),
        Instruction(Kind.LIST, ""),
        Instruction(Kind.MBOX, "./mbox"),
    ]


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        (b"|echo hi\0; touch PWNED\n", Instruction(Kind.PROGRAM, "echo hi")),
        (b"./Mail\0box\n", Instruction(Kind.MBOX, "./Mail")),
        (b"./Maildir\0/\n", Instruction(Kind.MAILDIR, "./Maildir")),  # kind from the last byte
        (b"&a@x\0Tvictim@y\n", Instruction(Kind.FORWARD, "a@x")),
    ],
)
def test_nul_ends_the_argument_as_in_qmail(line: bytes, expect: Instruction) -> None:
    assert dotqmail.parse(line) == [expect]


@pytest.mark.parametrize("text", [b"\n./Maildir/\n", b"  \t\n&a\n"])
def test_first_line_blank(text: bytes) -> None:
    with pytest.raises(DotQmailError, match=r"first line of .qmail file is blank. \(#4.2.1\)"):
        dotqmail.parse(text)


def test_safe_ext() -> None:
    assert dotqmail.safe_ext("John.Smith-X.y") == "john:smith-x:y"
