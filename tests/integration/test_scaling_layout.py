"""docs/scaling.md's first layout on loopback: two MX front ends relaying to a delivery hub.

Three pyqmail homes, each with its own ``pyqmail run``: front ends ``mx1`` and ``mx2`` take
SMTP for example.test and route it with smtproutes to the hub, which delivers it to a
Maildir. The hub starts down, so the front ends hold the mail in their queues; the client
fails over from mx1 to mx2 as a sending MTA does between MX hosts when mx1 is killed
(kill -9) in the middle of the stream. After mx1 restarts and the hub comes up, every
acknowledged message reaches the Maildir: nothing is lost.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.conftest import free_port, group_gone
from tests.integration.test_run_daemon import files, listening, wait_for

BIN = Path(sys.executable).parent


class Node:
    """One pyqmail home and its ``pyqmail run``."""

    def __init__(self, root: Path, me: str) -> None:
        self.home = Home(root, single_user=True)
        create_home(self.home, me, None)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = root.parent / f"{me}.log"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, PYQMAIL_HOME=str(self.home.root), PYQMAIL_SINGLE_USER="1")

    def control(self, name: str, text: str) -> None:
        (self.home.control / name).write_text(text)

    def start(self) -> None:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "pyqmail"), "run", "--home", str(self.home.root), "--single-user",
                 "--smtp", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=log, env=self.env, start_new_session=True,
            )  # fmt: skip
        proc = self.proc
        wait_for(lambda: listening(self.port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, self.logfile.read_text()

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        assert group_gone(self.proc.pid)  # its listener child too

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0

    def queued(self) -> int:
        return len(os.listdir(self.home.queue / "todo")) + sum(
            len(os.listdir(self.home.queue / "info" / str(s))) for s in range(23)
        )


def _send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("sender@client.test", ["alice@example.test"],
                   f"Subject: {subject}\r\nX-Id: {subject}\r\n\r\nbody\r\n")  # fmt: skip


def test_two_front_ends_and_a_hub_lose_nothing_when_one_is_killed(tmp_path: Path) -> None:
    hub = Node(tmp_path / "hub", "hub.example.test")
    alice = tmp_path / "alice"
    for sub in ("cur", "new", "tmp"):
        (alice / "Maildir" / sub).mkdir(parents=True)
    hub.control("locals", "example.test\n")
    hub.control("rcpthosts", "example.test\n")
    u, g = os.getuid(), os.getgid()
    (hub.home.users / "assign").write_text(f"=alice:alice:{u}:{g}:{alice}:::\n.\n")
    subprocess.run([str(BIN / "pyqmail"), "newu"], check=True, env=hub.env)
    fronts = [Node(tmp_path / name, f"{name}.example.test") for name in ("mx1", "mx2")]
    for f in fronts:
        f.control("rcpthosts", "example.test\n")
        f.control("smtproutes", f"example.test:127.0.0.1:{hub.port}\n")
    nodes = [hub, *fronts]
    try:
        for f in fronts:
            f.start()
        acked: list[str] = []
        mx1_alive = True
        for i in range(20):
            subject = f"m{i:02d}"
            if i == 9:
                fronts[0].kill9()  # mid-stream, with mail in its queue
                mx1_alive = False
            # the client's MX order: mx1 then mx2 for even messages, mx2 first for odd ones
            order = fronts if i % 2 == 0 else fronts[::-1]
            for f in order:
                if f is fronts[0] and not mx1_alive:
                    continue
                _send(f.port, subject)
                acked.append(subject)
                break
        assert len(acked) == 20
        assert fronts[0].queued() > 0, "mx1 should hold mail when it is killed"
        fronts[0].start()
        hub.start()
        for f in fronts:
            assert f.proc is not None
            f.proc.send_signal(signal.SIGALRM)  # qmail-send's ALRM: retry deferred mail now

        def ids() -> list[str]:
            out = []
            for p in files(alice / "Maildir" / "new"):
                for line in p.read_bytes().split(b"\n"):
                    if line.startswith(b"X-Id: "):
                        out.append(line[6:].decode())
            return out

        wait_for(lambda: set(ids()) == set(acked), timeout=120, what="every message at the hub")
        assert sorted(ids()) == sorted(acked)  # and none twice in this run
        wait_for(lambda: all(f.queued() == 0 for f in fronts), what="front ends drained")
        for node in nodes:
            node.stop()
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(30)
