"""Shared fixtures: a fresh single-user home in a temporary directory, free ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A complete home as ``pyqmail init --me mx.test.example`` makes it, single-user."""
    h = Home(tmp_path / "qmail", single_user=True)
    create_home(h, "mx.test.example", None)
    monkeypatch.setenv("PYQMAIL_HOME", str(h.root))
    monkeypatch.setenv("PYQMAIL_SINGLE_USER", "1")
    yield h


def write_control(home: Home, name: str, text: str) -> None:
    """Write control/NAME (tests' helper)."""
    (home.control / name).write_text(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_root() -> bool:
    return os.geteuid() == 0
