"""homebin.py: HOME/bin's qmail commands bound to their home, and the sendmail link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.homebin import COMMANDS, BinError, install_wrappers, sendmail_link, wrapper
from pyqmail.layout import create_home
from pyqmail.queue import submit
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths

ROOT = Path(__file__).resolve().parents[2]


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYQMAIL_SINGLE_USER="1")
    return subprocess.run(
        [sys.executable, "-m", "pyqmail.cli.main", "init", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def _todo(home: Home) -> list[bytes]:
    q = QueuePaths(home.queue)
    return [q.todo(int(n)).read_bytes() for n in sorted(os.listdir(home.queue / "todo"))]


def test_every_qmail_command_has_a_wrapper() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ours = {name: target for name, target in scripts.items()}
    for admin in ("pyqmail", "tcprules", "tcprulescheck"):
        ours.pop(admin)
    assert {n: f"pyqmail.cli.{m}:main" for n, m in COMMANDS} == ours


def test_init_fills_bin(tmp_path: Path) -> None:
    root = tmp_path / "q"
    r = _init(str(root), "--me", "mx.test.example")
    assert r.returncode == 0, r.stderr
    for name, _ in COMMANDS:
        st = (root / "bin" / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == os.geteuid()
    again = _init(str(root), "--me", "mx.test.example")
    assert "nothing to do" in again.stdout, again.stdout


def test_foreign_programs_kept_and_old_wrappers_updated(home: Home) -> None:
    real = home.root / "bin" / "qmail-remote"
    real.write_bytes(b"\x7fELF a real qmail-remote")
    old = home.root / "bin" / "qmail-inject"
    old.write_bytes(wrapper(home, "qmail-inject", "inject", "/old/venv/python"))
    report = install_wrappers(home, None)
    assert report.kept == [str(real)] and report.created == [str(old)]
    assert real.read_bytes() == b"\x7fELF a real qmail-remote"
    assert old.read_bytes() == wrapper(home, "qmail-inject", "inject")


def test_bin_writable_by_others_refused(home: Home) -> None:
    os.chmod(home.root / "bin", 0o777)
    ids = Home(home.root, single_user=False).ids() if os.geteuid() == 0 else None
    if ids is None:  # not root: the same check, asked directly
        from pyqmail.homebin import _check_dir

        with pytest.raises(BinError):
            _check_dir(home.root / "bin", True)
        return
    with pytest.raises(BinError):
        install_wrappers(Home(home.root, single_user=False), ids)


def test_bin_qmail_queue_as_qmailqueue(home: Home) -> None:
    """QMAILQUEUE=bin/qmail-queue (qmail's usual filter tail) queues into this home."""
    p = submit.submitter(home, env={"QMAILQUEUE": "bin/qmail-queue"}).begin()
    p.write(b"Subject: through bin\n\nx\n")
    assert p.commit_blocking(b"a@b.example", [b"c@d.example"]).code == 0
    (todo,) = _todo(home)
    assert parse_todo(todo).recipients == (b"c@d.example",)


def test_bin_sendmail_goes_to_its_own_home(home: Home, tmp_path: Path) -> None:
    """HOME/bin/sendmail is bound to HOME, whatever the caller's PYQMAIL_HOME says; and
    it imports nothing from the caller's directory (python -I)."""
    other = Home(tmp_path / "other", single_user=True)
    create_home(other, "other.example", None)
    planted = tmp_path / "cwd" / "pyqmail"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = dict(os.environ, PYQMAIL_HOME=str(other.root), PYTHONPATH=str(planted.parent))
    r = subprocess.run(
        [str(home.root / "bin" / "sendmail"), "-t"],
        input=b"To: rcpt@x.example\nSubject: s\n\nbody\n",
        capture_output=True,
        env=env,
        cwd=planted.parent,
    )
    assert r.returncode == 0, r.stderr
    (todo,) = _todo(home)
    assert parse_todo(todo).recipients == (b"rcpt@x.example",)
    assert _todo(other) == [] and not marker.exists()


def _fake_qmail(top: Path) -> Path:
    (top / "bin").mkdir(parents=True)
    for name in ("sendmail", "qmail-inject"):
        (top / "bin" / name).write_text("#!/bin/sh\n")
    return top / "bin" / "sendmail"


def test_sendmail_link(home: Home, tmp_path: Path) -> None:
    link = tmp_path / "sbin" / "sendmail"
    link.parent.mkdir()
    ours = str(home.root / "bin" / "sendmail")
    assert sendmail_link(home, link) == (True, f"created {link} -> {ours}")
    assert os.readlink(link) == ours
    assert sendmail_link(home, link)[0] and os.readlink(link) == ours
    # a link to another qmail's sendmail is replaced, and the message says so
    old = _fake_qmail(tmp_path / "var-qmail")
    link.unlink()
    link.symlink_to(old)
    done, what = sendmail_link(home, link)
    assert done and f"it linked to {old}" in what and os.readlink(link) == ours


@pytest.mark.parametrize("kind", ["file", "postfix-link"])
def test_sendmail_link_leaves_other_mtas_alone(home: Home, tmp_path: Path, kind: str) -> None:
    link = tmp_path / "sendmail"
    if kind == "file":
        link.write_bytes(b"postfix's sendmail")
    else:
        (tmp_path / "sendmail.postfix").write_bytes(b"x")
        link.symlink_to(tmp_path / "sendmail.postfix")
    r = _init(str(home.root), "--me", "mx.test.example", "--sendmail-link", str(link))
    assert r.returncode == 1 and "not replacing" in r.stderr and "ln -sf" in r.stderr
    if kind == "file":
        assert link.read_bytes() == b"postfix's sendmail"
    else:
        assert os.readlink(link) == str(tmp_path / "sendmail.postfix")
