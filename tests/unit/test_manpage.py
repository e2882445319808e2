"""Manual pages: one per command, from the same argparse parsers as --help, and they render."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.cli import manpage
from pyqmail.cli.main import SUBCOMMANDS

PAGES = manpage.pages()


def test_a_page_for_pyqmail_and_each_subcommand() -> None:
    assert set(PAGES) == {"pyqmail.1"} | {f"pyqmail-{s}.1" for s in SUBCOMMANDS}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_structure_and_rendering(name: str) -> None:
    text = PAGES[name]
    lines = text.splitlines()
    assert lines[0].startswith(".TH PYQMAIL")
    for section in (".SH NAME", ".SH SYNOPSIS"):
        assert section in lines
    assert lines[lines.index(".SH NAME") + 1].startswith(name[:-2].replace("-", "\\-"))
    assert not any(line.startswith((".", "'")) and line[1:2] == " " for line in lines)
    groff = shutil.which("groff")
    if groff is not None:  # the real formatter, warnings on
        r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z"], input=text,
                           capture_output=True, text=True, check=False)  # fmt: skip
        assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("sub", ["run", "adopt", "check", "init", "smtpd"])
def test_options_match_help(sub: str) -> None:
    """Every option --help shows is on the page: both come from the same parser."""
    argv = [sys.executable, "-m", "pyqmail.cli.main", sub, *manpage.ARGPARSE_ARGV[sub]]
    env = dict(os.environ, COLUMNS="1000")  # no line wrapped inside an option name
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, check=False, env=env)
    assert r.returncode == 0, r.stderr
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", r.stdout)) - {"--help"}
    assert options
    page = PAGES[f"pyqmail-{sub}.1"].replace("\\-", "-")
    assert {o for o in options if f"\\fB{o}\\fR" not in page} == set()


def test_run_page_documents_rules() -> None:
    page = PAGES["pyqmail-run.1"]
    assert "\\fB\\-\\-rules\\fR\\fI CDB\\fR" in page
    assert "tcp.smtp.cdb" in page


def test_escaping() -> None:
    assert manpage._esc(".start\n'quote\na-b\\c") == "\\&.start\n\\&'quote\na\\-b\\ec"


def test_writes_the_directory(tmp_path: Path) -> None:
    assert manpage.main([str(tmp_path / "man1")]) == 0
    assert sorted(p.name for p in (tmp_path / "man1").iterdir()) == sorted(PAGES)
    assert manpage.main([]) == 100
