"""Helpers for the adversarial tests: a real `pyqmail smtpd --listen` process, raw sockets.

Every attack in tests/security goes through a real interface (a socket on 127.0.0.1, a
command's stdin/stdout, a file the code reads); these helpers only start the listener, send
exact bytes and read what comes back, and look at what reached the queue.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.envelope import parse_todo
from tests.conftest import qmail_ids
from tests.integration.test_run_daemon import listening
from tests.integration.test_run_daemon import wait_for as wait_until


class Raw:
    """Exact bytes to a server, replies back."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, source: str | None = None) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.s = socket.socket(fam, socket.SOCK_STREAM)
        self.s.settimeout(15)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            self.s.bind((source, 0))
        self.s.connect((host, port))
        self.buf = b""

    def reply(self) -> tuple[int | None, bytes]:
        """One whole reply (multi-line replies joined); (None, partial) at EOF."""
        lines = b""
        while True:
            while b"\n" not in self.buf:
                try:
                    d = self.s.recv(65536)
                except (ConnectionResetError, TimeoutError, BrokenPipeError):
                    d = b""
                if not d:
                    return None, lines
                self.buf += d
            line, self.buf = self.buf.split(b"\n", 1)
            lines += line + b"\n"
            if line[3:4] == b" " or len(line) < 4:
                return (int(line[:3]) if line[:3].isdigit() else None), lines

    def replies(self, n: int) -> list[int | None]:
        return [self.reply()[0] for _ in range(n)]

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def cmd(self, line: bytes) -> tuple[int | None, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def rest(self, wait: float = 10) -> bytes:
        """Everything the server still sends until it closes (or ``wait`` passes)."""
        self.s.settimeout(wait)
        out = self.buf
        self.buf = b""
        try:
            while True:
                d = self.s.recv(65536)
                if not d:
                    return out
                out += d
        except (TimeoutError, OSError):
            return out

    def closed(self, wait: float = 10) -> bool:
        """True if the server closes the connection within ``wait`` seconds."""
        self.s.settimeout(wait)
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.s.close()


def queued(home: Home) -> list[tuple[bytes, list[bytes]]]:
    """(sender, recipients) of every message in todo/ (the listener commits there)."""
    out = []
    for f in sorted((home.queue / "todo").rglob("*")):
        if f.is_file():
            t = parse_todo(f.read_bytes())
            out.append((t.sender, list(t.recipients)))
    return out


def messages(home: Home) -> list[bytes]:
    """The bytes of every queued message file."""
    return [f.read_bytes() for f in sorted((home.queue / "mess").rglob("*")) if f.is_file()]


def clear_queue(home: Home) -> None:
    for sub in ("todo", "mess", "intd", "info", "local", "remote"):
        for f in (home.queue / sub).rglob("*"):
            if f.is_file():
                f.unlink()


class Listener:
    """`pyqmail smtpd --listen 127.0.0.1:0` in its own process, for one test module."""

    def __init__(self, home: Home, *args: str) -> None:
        self.home = home
        env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyqmail.cli.main", "smtpd", "--home", str(home.root),
             "--listen", "127.0.0.1:0", "--control-ttl", "0", *args],
            stderr=subprocess.PIPE,
            env=env,
        )  # fmt: skip
        self.port = self._wait_listening()
        self._err: list[bytes] = list(self._early)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._err.append(chunk)

    def log(self) -> str:
        """What the listener wrote to stderr so far (its log)."""
        return b"".join(self._err).decode("utf-8", "replace")

    def _wait_listening(self, timeout: float = 60) -> int:
        """Read stderr up to the 'listening on ADDR:PORT' line (the readiness signal),
        never longer than ``timeout`` (a test must not hang anybody's run)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self.proc.kill()
                    raise AssertionError("listener did not start in time")
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(f"listener exited: {buf!r}")
                buf += chunk
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode(errors="replace")
            if "listening on" in line:
                self._early = [buf] if buf else []
                return int(line.rsplit(":", 1)[1])
            if "warning" not in line:
                raise AssertionError(f"listener did not start: {line!r}")

    def control(self, name: str, text: str | None) -> None:
        path = self.home.control / name
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)

    def connect(self, source: str | None = None) -> Raw:
        return Raw(self.port, source=source)

    def session(self, helo: bytes = b"HELO client.example") -> Raw:
        c = Raw(self.port)
        code, text = c.reply()
        assert code == 220, text
        assert c.cmd(helo)[0] == 250
        return c

    def alive(self) -> bool:
        """A normal session still works: greeting, one message accepted, QUIT.

        The probe is found by its sender: messages of earlier sessions may still be
        finishing their commits beside it, so counting the queue would race with them."""
        c = self.session()
        ok = (
            c.cmd(b"MAIL FROM:<alive@client.example>")[0] == 250
            and c.cmd(b"RCPT TO:<alive@test.example>")[0] == 250
            and c.cmd(b"DATA")[0] == 354
            and c.cmd(b"Subject: alive\r\n\r\nstill here\r\n.")[0] == 250
            and c.cmd(b"QUIT")[0] == 221
        )
        c.close()
        probes = [m for m in queued(self.home) if m[0] == b"alive@client.example"]
        # drop the probe message again so tests see only what the attack queued
        if ok and len(probes) == 1:
            _drop_message(self.home, b"alive@client.example")
            return True
        return False

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.log()


def _drop_message(home: Home, sender: bytes) -> None:
    for f in list((home.queue / "todo").rglob("*")):
        if f.is_file() and parse_todo(f.read_bytes()).sender == sender:
            n = f.name
            for sub in ("todo", "mess", "intd", "info", "local", "remote"):
                for g in (home.queue / sub).rglob(n):
                    if g.is_file():
                        g.unlink()


def wait_for(pred: object, timeout: float = 10.0) -> bool:
    """Poll a condition the system offers no event for (process counters seen from outside)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(pred())  # type: ignore[operator]


def root_home(prefix: str) -> Home:
    """A multi-user home ``q`` (mx.test.example) in a new 0755 temp dir, which the caller
    removes; a missing qmail account is an error under root (tests.conftest.qmail_ids)."""
    ids = qmail_ids()
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    home = Home(d / "q", single_user=False)
    create_home(home, "mx.test.example", ids)
    return home


@contextlib.contextmanager
def root_run(
    home: Home, port: int, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``pyqmail run`` in multi-user mode (as root) with SMTP on 127.0.0.1:PORT, in a
    session of its own, its output in ``run.log`` beside the home; yields (process, log)
    once it listens, and SIGTERMs its process group on the way out. ``env``: the
    environment to start it with (default: this one), less PYQMAIL_SINGLE_USER."""
    log = home.root.parent / "run.log"
    env = {k: v for k, v in (os.environ if env is None else env).items()}
    env.pop("PYQMAIL_SINGLE_USER", None)
    pyqmail = os.path.join(os.path.dirname(sys.executable), "pyqmail")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [pyqmail, "run", "--home", str(home.root), "--smtp", f"127.0.0.1:{port}"],
            stdout=out, stderr=out, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        yield proc, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
