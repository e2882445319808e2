"""`pyqmail service install --daemontools` run by Debian's daemontools, as root.

svscan starts supervise for the service directory and its log/, as on a real qmail site;
pyqmail run comes up in root mode on a free port, mail is accepted and delivered,
``svc -t`` (TERM) stops it cleanly (supervise starts it again), ``svc -d`` leaves it down,
and multilog has written the log with tai64n stamps.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.conftest import free_port, is_root, require_tools
from tests.integration.test_run_daemon import files, listening, wait_for
from tests.integration.test_run_root import root_home

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]
__all__ = ["root_home"]


def _svstat(service: Path) -> str:
    r = subprocess.run(["svstat", str(service)], capture_output=True, text=True, check=False)
    return r.stdout


def _pid(service: Path) -> int | None:
    m = re.search(r": up \(pid (\d+)\)", _svstat(service))
    return int(m.group(1)) if m else None


@pytest.fixture
def scan(root_home: tuple[Home, Path]) -> Iterator[Path]:
    """An svscan directory of its own, svscan running on it; everything stopped after."""
    require_tools("svscan", "supervise", "svc", "svstat", "multilog", "setuidgid")
    d = root_home[0].root.parent / "scan"
    d.mkdir()
    proc = subprocess.Popen(["svscan", str(d)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    yield d
    for svc in d.iterdir():
        subprocess.run(["svc", "-dx", str(svc), str(svc / "log")], check=False)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    wait_for(lambda: not any(_svstat(s).count(": up") for s in d.iterdir()), 30,
             what="every supervised process down")  # fmt: skip


def test_supervise_runs_pyqmail_and_multilog(root_home: tuple[Home, Path], scan: Path) -> None:
    home, user = root_home
    (home.control / "rcptchecks").write_text("0\n")
    port = free_port()
    dest = home.root.parent / "pyqmail-service"
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    r = subprocess.run(
        [str(BIN / "pyqmail"), "service", "install", "--daemontools", "--dest", str(dest),
         "--home", str(home.root), "--smtp", f"127.0.0.1:{port}"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"wrote {dest / 'run'}" in r.stdout and f"wrote {dest / 'log' / 'run'}" in r.stdout
    assert "exec setuidgid qmaill multilog t ./main" in (dest / "log" / "run").read_text()
    (scan / "pyqmail").symlink_to(dest)  # what the admin does: link it into the scan dir
    service = scan / "pyqmail"
    wait_for(lambda: listening(port), 60, what="pyqmail run under supervise")
    first = _pid(service)
    assert first is not None
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("joe@test.example", ["joe@test.example"], "Subject: supervised\r\n\r\nx\r\n")
    new = user / "Maildir" / "new"
    wait_for(lambda: len(files(new)) == 1, what="delivery")
    assert b"Subject: supervised" in files(new)[0].read_bytes()

    current = dest / "log" / "main" / "current"
    subprocess.run(["svc", "-t", str(service)], check=True)  # TERM: a clean stop...
    wait_for(lambda: current.exists() and "status: exiting" in current.read_text(), 60,
             what="the clean stop in multilog's log")  # fmt: skip
    wait_for(lambda: (_pid(service) or first) != first and listening(port), 60,
             what="supervise to start it again")  # fmt: skip
    subprocess.run(["svc", "-d", str(service)], check=True)  # down: TERM, not restarted
    wait_for(lambda: ": down " in _svstat(service), 60, what="the service down")
    assert not listening(port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and current.read_text().count("status: exiting") < 2:
        time.sleep(0.05)
    log = current.read_text()
    assert log.count("status: exiting") == 2
    lines = [line for line in log.splitlines() if line]
    assert all(re.match(r"@4000[0-9a-f]{20} ", line) for line in lines)  # multilog t
    assert any("new msg " in line for line in lines)
    assert "alert" not in log
    st = current.stat()
    assert st.st_uid == home.ids().uid("log")  # multilog ran as qmaill
