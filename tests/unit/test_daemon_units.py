"""The service files `pyqmail service install` writes (daemon/units.py, cli/service.py).

The systemd unit is checked by systemd's own ``systemd-analyze verify``; the run scripts
by ``sh -n`` here, and by really running them under daemontools in
tests/integration/test_service_daemontools.py.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyqmail.cli.service import main as service_main
from pyqmail.daemon import units
from pyqmail.home import Home
from tests.conftest import require_tools, write_control


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    require_tools("systemd-analyze")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, check=False)  # fmt: skip


def _keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def test_systemd_unit_verifies_and_says_what_it_must(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "units"
    argv = ["install", "--systemd", "--dest", str(dest), "--home", str(home.root),
            "--smtp", "0.0.0.0:25", "--smtp", "[::]:25", "--http", "9100"]  # fmt: skip
    assert service_main(argv) == 0
    unit = dest / "pyqmail.service"
    assert f"wrote {unit}" in capsys.readouterr().out
    r = _verify(unit)
    assert r.returncode == 0, r.stderr
    k = _keys(unit.read_text())
    assert k["Type"] == ["notify"] and k["NotifyAccess"] == ["main"]
    assert k["Restart"] == ["on-failure"] and k["KillSignal"] == ["SIGTERM"]
    assert k["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert k["WatchdogSec"] == ["60"]
    assert int(k["TimeoutStopSec"][0]) > 30 + 60  # the drain, then deliveries in flight
    (start,) = k["ExecStart"]
    assert start.endswith(f"run --home {home.root} --smtp 0.0.0.0:25 --smtp [::]:25 "
                          "--http 9100 --single-user")  # fmt: skip
    assert "ProtectHome" not in k and "NoNewPrivileges" not in k  # deliveries into homes
    assert "User" not in k


def test_stop_timeout_follows_timeoutdrain(home: Home) -> None:
    write_control(home, "timeoutdrain", "300\n")
    unit = units.systemd_unit("/usr/bin/pyqmail", home, ["--smtp", "0.0.0.0:25"]).text
    assert "TimeoutStopSec=420\n" in unit and "(300 s)" in unit
    assert "ReadWritePaths=-" + str(home.root) + "\n" in unit


def test_single_user_unit_names_its_account(home: Home, tmp_path: Path) -> None:
    assert service_main(["install", "--systemd", "--dest", str(tmp_path), "--home",
                         str(home.root), "--user", "nobody"]) == 0  # fmt: skip
    text = (tmp_path / "pyqmail.service").read_text()
    k = _keys(text)
    assert k["User"] == ["nobody"]
    assert k["ExecStart"][0].endswith("--smtp 0.0.0.0:25 --single-user")  # the default listener
    assert _verify(tmp_path / "pyqmail.service").returncode == 0


def test_verify_would_catch_a_broken_unit(home: Home, tmp_path: Path) -> None:
    """The check above means something: systemd-analyze refuses a bad unit."""
    text = units.systemd_unit("/usr/bin/true", home, []).text.replace("Type=notify", "Type=nope")
    (tmp_path / "broken.service").write_text(text)
    r = _verify(tmp_path / "broken.service")
    assert r.returncode != 0 or "Failed to parse service type" in r.stderr


def test_an_existing_different_file_is_refused_without_force(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["install", "--systemd", "--dest", str(tmp_path), "--home", str(home.root)]
    assert service_main(argv) == 0
    assert service_main(argv) == 0  # the same file again: left as it is
    assert "unchanged" in capsys.readouterr().out
    unit = tmp_path / "pyqmail.service"
    unit.write_text("# the site's own\n")
    assert service_main([*argv, "--smtp", "127.0.0.1:25"]) == 100
    assert "exists and differs" in capsys.readouterr().err
    assert unit.read_text() == "# the site's own\n"
    assert service_main([*argv, "--force"]) == 0
    assert "Type=notify" in unit.read_text()


def test_daemontools_scripts(home: Home, tmp_path: Path) -> None:
    dest = tmp_path / "svc"
    assert service_main(["install", "--daemontools", "--dest", str(dest), "--home",
                         str(home.root), "--smtp", "127.0.0.1:2525",
                         "--log-stamps", "tai64n"]) == 0  # fmt: skip
    run, log_run = dest / "run", dest / "log" / "run"
    for script in (run, log_run):
        assert stat.S_IMODE(script.stat().st_mode) == 0o755
        assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    assert (dest / "log" / "main").is_dir()
    text = run.read_text()
    assert "exec 2>&1\n" in text
    assert f"run --home {home.root} --smtp 127.0.0.1:2525 --log-stamps tai64n" in text
    assert "multilog ./main\n" in log_run.read_text()  # stamped by pyqmail: no 't'
    files = units.daemontools_scripts("/p", home, [], log_user="qmaill")
    assert "exec setuidgid qmaill multilog t ./main\n" in files[1].text
    as_user = units.daemontools_scripts("/p", home, [], user="nobody")[0].text
    assert "exec setuidgid nobody /p run" in as_user


def test_unknown_account_is_refused(home: Home, tmp_path: Path) -> None:
    dest = tmp_path / "units"
    assert service_main(["install", "--systemd", "--dest", str(dest),
                         "--user", "no-such-user-here"]) == 100  # fmt: skip
    assert not dest.exists()


def test_tools_present() -> None:
    """make deps installs systemd (systemd-analyze) and daemontools for these tests."""
    require_tools("systemd-analyze", "supervise", "multilog")
    assert shutil.which("svscan") is not None


@pytest.mark.parametrize(
    ("arg", "word"),
    [("/var/qmail", "/var/qmail"), ("[::]:25", "[::]:25"), ("/srv/50%", "/srv/50%%"),
     ("/srv/$HOME", "/srv/$$HOME"), ("/srv/my mail", '"/srv/my mail"'),
     ('a"b', '"a\\"b"'), ("a;b", '"a;b"')],
)  # fmt: skip
def test_execstart_words_reach_the_program_unchanged(
    home: Home, tmp_path: Path, arg: str, word: str
) -> None:
    unit = units.systemd_unit("/usr/bin/pyqmail", home, ["--rules", arg]).text
    assert f" --rules {word}\n" in unit
