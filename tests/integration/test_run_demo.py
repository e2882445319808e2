"""``python -m pyqmail.demo HOME`` (what ``make run`` calls): the demo user and the hints."""

from __future__ import annotations

import subprocess
import sys

from pyqmail.home import Home
from pyqmail.local.users import resolve


def test_demo_user_is_created_once_and_instructions_printed(home: Home) -> None:
    r = subprocess.run([sys.executable, "-m", "pyqmail.demo", str(home.root)],
                       capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    maildir = home.root / "demo" / "Maildir"
    assert (maildir / "new").is_dir() and (maildir / "tmp").is_dir()
    assert "swaks --server 127.0.0.1:2525" in r.stdout
    assert "demo@mx.test.example" in r.stdout
    assert f"{maildir}/new/" in r.stdout
    info = resolve(home, "demo-anything")
    assert info.home == str(home.root / "demo") and info.ext == "anything"
    assign = (home.users / "assign").read_text()
    (home.users / "assign").write_text(assign + "# mine\n")
    subprocess.run([sys.executable, "-m", "pyqmail.demo", str(home.root)],
                   capture_output=True, timeout=60, check=True)  # fmt: skip
    assert (home.users / "assign").read_text().endswith("# mine\n")  # left alone


def test_demo_refuses_a_non_home(tmp_path: object) -> None:
    r = subprocess.run([sys.executable, "-m", "pyqmail.demo", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 111 and "not a home" in r.stderr
