"""The container's entrypoint and health check, run here as the image would run them.

No container runtime is needed: the entrypoint is a POSIX sh script over the installed
``pyqmail``; the Dockerfile and compose file are checked for the parts the entrypoint and
the health check rely on.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port
from tests.integration.test_run_daemon import listening, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "container"
BIN = Path(sys.executable).parent


def _env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYQMAIL_")}
    env.update(
        PATH=f"{BIN}:{os.environ['PATH']}",
        PYQMAIL_HOME=str(home),
        PYQMAIL_SMTP=f"127.0.0.1:{port}",
        PYQMAIL_SINGLE_USER="1",
        **extra,
    )
    return env


def _health(env: dict[str, str]) -> int:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True, timeout=30
    ).returncode


def test_first_start_makes_the_home_then_runs_and_stops_on_term(tmp_path: Path) -> None:
    home, port = tmp_path / "volume", free_port()
    env = _env(home, port, PYQMAIL_ME="mx.container.test")
    assert _health(env) == 1  # nothing listening yet
    log = open(tmp_path / "log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(DEPLOY / "entrypoint.sh")], env=env, stdout=log, stderr=log)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, (tmp_path / "log").read_text()
        assert (home / "control" / "me").read_text() == "mx.container.test\n"
        assert _health(env) == 0
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert (
                s.sendmail(
                    "a@client.test", ["postmaster@mx.container.test"], "Subject: x\r\n\r\nhi\r\n"
                )
                == {}
            )
        proc.send_signal(signal.SIGTERM)  # exec'd: the signal reaches pyqmail run itself
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
    assert "made the home" in (tmp_path / "log").read_text()
    # a second start keeps the volume's home as it is
    env2 = _env(home, port, PYQMAIL_ME="other.name.test")
    proc = subprocess.Popen(
        [str(DEPLOY / "entrypoint.sh"), "run"],
        env=env2,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert (home / "control" / "me").read_text() == "mx.container.test\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.stderr is not None and b"made the home" not in proc.stderr.read()


def test_other_commands_pass_through_to_pyqmail(tmp_path: Path) -> None:
    home = tmp_path / "volume"
    env = _env(home, free_port())
    r = subprocess.run(
        [str(DEPLOY / "entrypoint.sh"), "init", str(home), "--me", "x.test", "--single-user", "-q"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0 and (home / "control" / "me").read_text() == "x.test\n"
    r = subprocess.run(
        [str(DEPLOY / "entrypoint.sh"), "showctl"], env=env, capture_output=True, timeout=60
    )
    assert r.returncode == 0 and b"x.test" in r.stdout


def test_image_files_agree_with_the_entrypoint() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.12-slim" in docker
    assert 'ENTRYPOINT ["/usr/local/bin/pyqmail-entrypoint"]' in docker
    assert "COPY deploy/container/entrypoint.sh /usr/local/bin/pyqmail-entrypoint" in docker
    assert 'VOLUME ["/var/qmail"]' in docker and "ENV PYQMAIL_HOME=/var/qmail" in docker
    assert "HEALTHCHECK" in docker and "pyqmail-healthcheck.py" in docker
    for path in ("pyproject.toml", "README.md", "src"):
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}"
    compose = (DEPLOY / "compose.yaml").read_text()
    assert "  mta:\n" in compose and "  client:\n" in compose
    assert "condition: service_healthy" in compose
    assert "dockerfile: deploy/container/Dockerfile" in compose
    assert os.access(DEPLOY / "entrypoint.sh", os.X_OK)
