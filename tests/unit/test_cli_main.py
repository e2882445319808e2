"""The command table: every console script and every subcommand resolves to a main()."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pyqmail.cli.main import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_has_a_main(name: str) -> None:
    module, func = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_a_main(name: str) -> None:
    mod = importlib.import_module(f"pyqmail.cli.{SUBCOMMANDS[name][0]}")
    assert callable(mod.main)


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("init", "check", "run", "smtpd"):
        assert f"  {name} " in out


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 100
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 100


def test_qmail_names_are_accepted_as_subcommands(home: object) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pyqmail.cli.main", "qmail-qstat"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "messages in queue: 0" in r.stdout


def test_queue_is_the_manager_and_qmail_queue_keeps_its_name(home: object) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pyqmail.cli.main", "queue", "list", "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    # qmail-queue: an empty envelope on fd 1 is qmail-queue's "trouble reading envelope"
    r = subprocess.run(
        [sys.executable, "-m", "pyqmail.cli.main", "qmail-queue"],
        input=b"",
        stdout=subprocess.DEVNULL,
        capture_output=False,
        stderr=subprocess.PIPE,
    )
    assert r.returncode != 0 and b"qmail-queue" in r.stderr
