"""``pyqmail queue`` against a real ``pyqmail run`` and real queued mail, then stopped.

The next hop (smtproutes) answers 451 to every RCPT and records each attempt, so the
messages stay queued; every check runs the real command and looks at the attempts, the
queue files, qmail-qread and the daemon's log.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import signal
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue.layout import QueuePaths
from pyqmail.send import admin
from tests.conftest import free_port, write_control
from tests.integration.test_run_daemon import BIN, Mta, files, listening, mta, wait_for
from tests.integration.test_run_root import root_home

__all__ = ["mta", "root_home"]


class DeferSink:
    """An SMTP next hop in a thread: 451 to every RCPT, each one recorded."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", 0)
        srv = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.port = srv.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 sink\r\n")
        while line := await r.readline():
            u = line.upper()
            if u.startswith(b"RCPT TO:"):
                self.attempts.append(line[8:].strip().decode())
                w.write(b"451 4.7.1 sink: greylisted\r\n")
            elif u.startswith(b"DATA"):
                w.write(b"503 no valid recipients\r\n")
            elif u.startswith(b"QUIT"):
                w.write(b"221 bye\r\n")
                break
            else:
                w.write(b"250 ok\r\n")
            await w.drain()
        w.close()

    def tries(self, rcpt: str) -> int:
        return self.attempts.count(f"<{rcpt}>")


@pytest.fixture
def sink() -> Iterator[DeferSink]:
    s = DeferSink()
    yield s
    s.loop.call_soon_threadsafe(s.loop.stop)


def pq(mta: Mta, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pyqmail"), "queue", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=mta.env,
        timeout=60,
    )


def ids_by_rcpt(mta: Mta) -> dict[str, int]:
    r = pq(mta, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {m["recipients"][0]["address"]: m["id"] for m in json.loads(r.stdout)}


@pytest.fixture
def queued(mta: Mta, sink: DeferSink) -> Mta:
    """Four messages deferred once each: r1..r3 from joe@test.example, r4 from ann@x.example."""
    write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{sink.port}\n")
    mta.start()
    for i in range(1, 5):
        sender = "joe@test.example" if i < 4 else "ann@x.example"
        mta.send(sender, [f"r{i}@remote.example"], f"message r{i}")
    wait_for(lambda: len(sink.attempts) >= 4, what="first attempts")
    wait_for(lambda: mta.log().count("deferral:") >= 4, what="deferrals logged")
    return mta


def test_list_filters_and_show_the_last_error(queued: Mta, sink: DeferSink) -> None:
    r = pq(queued, "list")
    assert r.returncode == 0 and all(f"r{i}@remote.example" in r.stdout for i in range(1, 5))
    ids = ids_by_rcpt(queued)
    qread = subprocess.run([str(BIN / "pyqmail"), "qread"], capture_output=True, text=True,
                           env=queued.env, check=True).stdout  # fmt: skip
    for n in ids.values():
        assert f"#{n} " in qread  # the ID is qmail's message number
    r = pq(queued, "list", "--json", "--sender", "ann@x.example")
    assert [m["id"] for m in json.loads(r.stdout)] == [ids["r4@remote.example"]]
    r = pq(queued, "list", "--json", "--rcpt", "R2@remote.example")
    assert [m["id"] for m in json.loads(r.stdout)] == [ids["r2@remote.example"]]
    assert json.loads(pq(queued, "list", "--json", "--domain", "other.example").stdout) == []
    assert json.loads(pq(queued, "list", "--json", "--older-than", "1h").stdout) == []
    assert len(json.loads(pq(queued, "list", "--json", "--state", "deferred").stdout)) == 4
    r = pq(queued, "show", str(ids["r1@remote.example"]))
    assert r.returncode == 0, r.stderr
    assert "<joe@test.example>" in r.stdout and "Subject: message r1" in r.stdout
    assert "sink: greylisted" in r.stdout and "tries: 1" in r.stdout
    assert "next retry: " in r.stdout and "next retry: unknown" not in r.stdout
    r = pq(queued, "show", "999999999")
    assert r.returncode == 1 and "no message" in r.stderr


def test_hold_retry_release_delete_while_running(queued: Mta, sink: DeferSink) -> None:
    ids = ids_by_rcpt(queued)
    held = ids["r2@remote.example"]
    r = pq(queued, "hold", str(held))
    assert r.returncode == 0 and f"{held}: held" in r.stdout
    paths = QueuePaths(queued.home.queue)
    assert admin.is_held(paths, held) and paths.info(held).exists()  # still qmail's format
    before = {i: sink.tries(f"r{i}@remote.example") for i in range(1, 5)}
    # more than one message: 'n' on stdin does nothing, 'y' goes ahead
    r = pq(queued, "retry", "--domain", "remote.example", stdin="n\n")
    assert r.returncode == 1 and "not confirmed" in r.stderr
    r = pq(queued, "retry", "--domain", "remote.example", stdin="y\n")
    assert r.returncode == 0 and f"{held}: skipped: held" in r.stdout
    wait_for(lambda: all(sink.tries(f"r{i}@remote.example") > before[i] for i in (1, 3, 4)))
    assert sink.tries("r2@remote.example") == before[2]
    r = pq(queued, "retry", str(held))
    assert r.returncode == 1 and "held" in r.stdout
    assert pq(queued, "release", str(held)).returncode == 0
    assert not admin.is_held(paths, held)
    n = sink.tries("r2@remote.example")
    assert pq(queued, "retry", str(held)).returncode == 0
    wait_for(lambda: sink.tries("r2@remote.example") > n, what="the retry of the released one")
    gone = ids["r3@remote.example"]
    r = pq(queued, "delete", str(gone))
    assert r.returncode == 0 and f"{gone}: deleted" in r.stdout
    wait_for(lambda: not paths.mess(gone).exists() and not paths.info(gone).exists())
    assert not paths.remote(gone).exists()
    assert set(ids_by_rcpt(queued).values()) == set(ids.values()) - {gone}
    # every change is in the daemon's log with who made it
    log = queued.log()
    assert f"queue manager: uid {os.getuid()} pid " in log
    assert f": hold {held}: held" in log and f": delete {gone}: deleted" in log


def test_delete_with_bounce_tells_the_sender(queued: Mta, sink: DeferSink) -> None:
    queued.send("alice@test.example", ["r9@remote.example"], "to be bounced")
    wait_for(lambda: sink.tries("r9@remote.example") == 1, what="the attempt")
    num = ids_by_rcpt(queued)["r9@remote.example"]
    r = pq(queued, "delete", "--bounce", "spam run", str(num))
    assert r.returncode == 0 and "bounced" in r.stdout
    wait_for(lambda: len(files(queued.maildir("alice"))) == 1, what="the bounce")
    text = files(queued.maildir("alice"))[0].read_text()
    assert "<r9@remote.example>:" in text and "spam run" in text
    assert "Subject: to be bounced" in text
    wait_for(lambda: not QueuePaths(queued.home.queue).mess(num).exists())


def test_socket_refuses_other_users(queued: Mta) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")  # pragma: no cover
    path = admin.control_path(queued.home)
    assert (os.stat(path).st_mode & 0o777) == 0o600

    os.chmod(path, 0o666)  # so that only SO_PEERCRED stands in the way
    os.chmod(path.parent, 0o755)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            # the test's tmp directories are root's (0700): reach the socket's directory
            # through a descriptor opened before the uid changes
            dfd = os.open(path.parent, os.O_PATH)
            os.setgid(65534)
            os.setuid(65534)
            try:
                admin.SocketQueue(Path(f"/proc/self/fd/{dfd}/{path.name}")).states(None)
                os.write(wfd, b"answered")
            except Exception as e:
                os.write(wfd, str(e).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    assert said == "permission denied"
    wait_for(lambda: "refused the control socket to uid 65534" in queued.log())


def test_list_hold_and_delete_with_run_stopped(queued: Mta, sink: DeferSink) -> None:
    ids = ids_by_rcpt(queued)
    assert queued.stop() == 0
    paths = QueuePaths(queued.home.queue)
    r = pq(queued, "show", str(ids["r1@remote.example"]))
    assert r.returncode == 0 and "tries: unknown" in r.stdout
    held = ids["r2@remote.example"]
    r = pq(queued, "hold", str(held))
    assert r.returncode == 0 and "held" in r.stdout and "uid" in r.stderr
    assert admin.is_held(paths, held)
    r = pq(queued, "delete", "--yes", "--sender", "ann@x.example")
    assert r.returncode == 0
    num = ids["r4@remote.example"]
    assert not paths.mess(num).exists() and not paths.info(num).exists()
    assert not paths.remote(num).exists()
    assert set(ids_by_rcpt(queued).values()) == set(ids.values()) - {num}
    # a restarted scheduler keeps the held one out of a SIGALRM flush, and the rest not
    before = sink.tries("r2@remote.example")
    n1 = sink.tries("r1@remote.example")
    queued.start()
    r = pq(queued, "retry", str(ids["r1@remote.example"]))
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: sink.tries("r1@remote.example") > n1)
    assert sink.tries("r2@remote.example") == before
    assert "held" in pq(queued, "show", str(held)).stdout


def test_stale_hold_marker_does_not_hold_a_later_message(home: Home) -> None:
    paths = QueuePaths(home.queue)
    n = 1234
    paths.info(n).write_bytes(b"Fa@b\0")
    admin.write_hold(paths, n)
    assert admin.is_held(paths, n) and admin.held_numbers(paths) == {n}
    # real qmail delivered it; a new message got the same number (and a new birth)
    os.utime(paths.info(n), (1, 1))
    assert not admin.is_held(paths, n)
    assert admin.held_numbers(paths) == set()
    assert not (paths.root / admin.HOLD_DIR / str(n)).exists()


@pytest.mark.root
def test_root_mode_socket_is_the_qmail_groups(
    root_home: tuple[Home, Path], sink: DeferSink
) -> None:
    """As root, the scheduler runs as qmails: the socket is bound and queue/hold made
    before the drop, and hold/list/delete work through it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")  # pragma: no cover
    home, _ = root_home
    (home.control / "smtproutes").write_text(f"remote.example:127.0.0.1:{sink.port}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    env["PYQMAIL_HOME"] = str(home.root)
    log = home.root.parent / "run.log"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "pyqmail"), "queue", *args], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(home.root), "--smtp", f"127.0.0.1:{port}"],
            stdout=out, stderr=out, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        sock = admin.control_path(home)
        # the send part binds it in parallel with the listeners' start: wait for it
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="the control socket")
        st = os.stat(sock)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, grp.getgrnam("qmail").gr_gid)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("joe@test.example", ["r1@remote.example"], "Subject: r\r\n\r\nx\r\n")
        wait_for(lambda: sink.tries("r1@remote.example") == 1, what="the attempt")

        wait_for(lambda: "r1@remote.example" in run("list").stdout, what="the listing")
        (m,) = json.loads(run("list", "--json").stdout)
        r = run("hold", str(m["id"]))
        assert r.returncode == 0 and "held" in r.stdout, r.stderr
        assert json.loads(run("list", "--json", "--state", "held").stdout)[0]["id"] == m["id"]
        assert run("release", str(m["id"])).returncode == 0
        assert "queue manager: uid 0 pid " in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    # stopped: root holds it directly; the marker is the scheduler's (qmails) to read
    r = run("hold", str(m["id"]))
    assert r.returncode == 0 and "held" in r.stdout, r.stderr
    mark = home.queue / admin.HOLD_DIR / str(m["id"])
    assert os.stat(mark).st_uid == home.ids().uid("send")
    r = run("delete", str(m["id"]))
    assert r.returncode == 0 and "deleted" in r.stdout, r.stderr
    assert json.loads(run("list", "--json").stdout) == [] and not mark.exists()
