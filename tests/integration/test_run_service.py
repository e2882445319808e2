"""``pyqmail run`` as a service: systemd's notifications, the SIGTERM drain, SIGALRM.

A real AF_UNIX datagram socket stands in for systemd (NOTIFY_SOCKET); clients are raw
sockets on 127.0.0.1, so that a session can be held mid-DATA while the daemon stops.
(systemd itself cannot run these: PID 1 of the test machine is not systemd, so
``systemd-run`` has no manager to talk to.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.netstring import decode_one, encode
from tests.conftest import free_port, is_root, write_control
from tests.integration.test_remote_peers import Script
from tests.integration.test_run_daemon import BIN, Mta, ThreadPeer, files, listening, mta, wait_for
from tests.integration.test_run_root import root_home

__all__ = ["Client", "Systemd", "mta", "root_home"]


class Systemd:
    """The notify socket a Type=notify service is given, and what arrived on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[list[str]] = []

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def wait(self, key: str, timeout: float = 30.0) -> list[str]:
        """The next message with line ``key`` (e.g. READY=1); earlier ones are kept."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} from the daemon; got {self.messages}")
            self.sock.settimeout(left)
            try:
                lines = self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
            self.messages.append(lines)
            if key in lines:
                return lines

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    s = Systemd(tmp_path / "notify")
    yield s
    s.close()


class Client:
    """A raw SMTP client: one reply at a time, so a test can stop wherever it wants."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 30)
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        out = b""
        while True:
            line = self.file.readline()
            out += line
            if not line or line[3:4] != b"-":
                return out

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _start(mta: Mta, extra_env: dict[str, str], *args: str) -> None:
    """Start the daemon with ``extra_env`` added to its environment."""
    saved = dict(os.environ)
    os.environ.update(extra_env)
    try:
        mta.start(*args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _status(lines: list[str]) -> str:
    return next((x[7:] for x in lines if x.startswith("STATUS=")), "")


# -- systemd's notifications -----------------------------------------------------------------


def test_ready_status_watchdog_and_stopping(mta: Mta, systemd: Systemd) -> None:
    _start(mta, systemd.env(watchdog_usec=400_000))  # a ping at least every 0.2 s
    ready = systemd.wait("READY=1")
    assert _status(ready).startswith("queue 0, local 0/10, remote 0/20, smtp sessions ")
    pings = [systemd.wait("WATCHDOG=1", 5) for _ in range(3)]  # from the event loop
    assert all("STATUS=" in "\n".join(p) for p in pings)
    client = Client(mta.port)
    client.reply()
    wait_for(lambda: "smtp sessions 1" in _status(systemd.wait("WATCHDOG=1", 5)), 10,
             what="the open session in STATUS")  # fmt: skip
    mta.signal(signal.SIGTERM)
    stopping = systemd.wait("STOPPING=1")
    assert _status(stopping).startswith("stopping: ")
    assert client.reply() == b"421 shutting down, try again later (#4.3.2)\r\n"
    client.close()
    assert mta.proc is not None and mta.proc.wait(60) == 0


def test_no_notify_socket_nothing_changes(mta: Mta) -> None:
    mta.start()
    mta.send("joe@test.example", ["alice@test.example"], "plain")
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1, what="delivery")
    assert mta.stop() == 0


# -- SIGTERM: the drain ----------------------------------------------------------------------


def test_term_lets_data_finish_refuses_new_and_421s_idle(mta: Mta, systemd: Systemd) -> None:
    _start(mta, systemd.env())
    systemd.wait("READY=1")
    idle = Client(mta.port)
    assert idle.reply().startswith(b"220 ")
    assert idle.cmd(b"EHLO idle.example").startswith(b"250")
    busy = Client(mta.port)
    busy.reply()
    assert busy.cmd(b"HELO busy.example").startswith(b"250 ")
    assert busy.cmd(b"MAIL FROM:<joe@test.example>") == b"250 ok\r\n"
    assert busy.cmd(b"RCPT TO:<alice@test.example>") == b"250 ok\r\n"
    assert busy.cmd(b"DATA") == b"354 go ahead\r\n"
    busy.sock.sendall(b"Subject: mid-data\r\nX-Id: drained\r\n\r\nfirst half\r\n")
    mta.signal(signal.SIGTERM)
    systemd.wait("STOPPING=1")
    assert idle.reply() == b"421 shutting down, try again later (#4.3.2)\r\n"
    assert idle.file.readline() == b""  # and closed
    idle.close()
    with pytest.raises(ConnectionRefusedError):  # the listening socket is closed at once
        socket.create_connection(("127.0.0.1", mta.port), 5).close()
    busy.sock.sendall(b"second half\r\n.\r\n")
    assert busy.reply().startswith(b"250 ok ")  # acknowledged: it is in the queue
    assert busy.reply() == b"421 shutting down, try again later (#4.3.2)\r\n"
    busy.close()
    assert mta.proc is not None and mta.proc.wait(60) == 0
    log = mta.log()
    assert "cut off" not in log
    if not files(mta.maildir("alice")):  # not delivered before the exit: after the restart
        mta.start()
        wait_for(lambda: len(files(mta.maildir("alice"))) == 1, what="delivery after restart")
        assert mta.stop() == 0
    (msg,) = [f.read_bytes() for f in files(mta.maildir("alice"))]
    assert b"X-Id: drained\n\nfirst half\nsecond half\n" in msg


def test_term_cuts_off_a_stalled_data_session_after_timeoutdrain(mta: Mta) -> None:
    write_control(mta.home, "timeoutdrain", "1\n")
    mta.start()
    busy = Client(mta.port)
    busy.reply()
    busy.cmd(b"HELO busy.example")
    busy.cmd(b"MAIL FROM:<joe@test.example>")
    busy.cmd(b"RCPT TO:<alice@test.example>")
    assert busy.cmd(b"DATA") == b"354 go ahead\r\n"
    busy.sock.sendall(b"Subject: never ends\r\n\r\nand then nothing\r\n")
    began = time.monotonic()
    mta.signal(signal.SIGTERM)
    assert busy.file.readline() == b""  # dropped, not acknowledged
    assert 0.5 < time.monotonic() - began < 20
    busy.close()
    assert mta.proc is not None and mta.proc.wait(60) == 0
    assert "stopping: cut off the session with 127.0.0.1 after 1 s" in mta.log()
    assert mta.queue_files() == []  # the unacknowledged message was aborted, not queued
    assert files(mta.maildir("alice")) == []


# -- SIGALRM -----------------------------------------------------------------------------------


def test_alrm_retries_a_deferred_message_now(mta: Mta) -> None:
    """qmail-send's ALRM: a message deferred by a 4xx is tried again at once, not at its
    next retry time (400 s after its first try on qmail's remote schedule)."""
    answers = {"rcpt": b"451 4.3.0 try later\r\n"}
    peer = ThreadPeer(Script(rcpt=lambda addr: answers["rcpt"]))
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{peer.peer.port}\n")
        mta.start()
        mta.send("alice@test.example", ["far@remote.example"], "deferred")
        wait_for(lambda: ": deferral: " in mta.log(), what="the deferral")
        assert peer.peer.messages == []
        answers["rcpt"] = b"250 ok\r\n"
        began = time.monotonic()
        mta.signal(signal.SIGALRM)
        wait_for(lambda: len(peer.peer.messages) == 1, 30, what="delivery after ALRM")
        assert time.monotonic() - began < 30  # its retry time was 400 s away
        wait_for(lambda: mta.queue_files() == [], what="queue empty")
        assert mta.log().count(" to remote far@remote.example") == 2
        assert mta.stop() == 0
    finally:
        peer.close()
    assert peer.peer.messages[0][1] == [b"far@remote.example"]


# -- root mode: the supervisor speaks for the parts (daemon/split.py) -----------------------


def _root_run(home: Home, port: int, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    """``pyqmail run`` as root in multi-user mode with ``env`` added; its log file."""
    log = home.root.parent / "run.log"
    full = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"} | env
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(home.root), "--smtp", f"127.0.0.1:{port}"],
            stdout=out, stderr=out, env=full, start_new_session=True,
        )  # fmt: skip
    return proc, log


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root")
def test_root_mode_notifies_and_drains(root_home: tuple[Home, Path], systemd: Systemd) -> None:
    """As root the parts are processes under qmail's users; systemd hears only the
    supervisor, which relays each part's beats (NotifyAccess=main)."""
    home, user = root_home
    (home.control / "rcptchecks").write_text("0\n")
    port = free_port()
    proc, log = _root_run(home, port, systemd.env(watchdog_usec=1_000_000))
    try:
        ready = systemd.wait("READY=1")
        status = _status(ready)
        assert "queue 0, local 0/10, remote 0/20" in status and "smtp sessions 0" in status
        for _ in range(3):
            systemd.wait("WATCHDOG=1", 5)
        busy = Client(port)
        busy.reply()
        busy.cmd(b"HELO busy.example")
        busy.cmd(b"MAIL FROM:<joe@test.example>")
        assert busy.cmd(b"RCPT TO:<joe@test.example>") == b"250 ok\r\n"
        assert busy.cmd(b"DATA") == b"354 go ahead\r\n"
        busy.sock.sendall(b"Subject: root drain\r\n\r\nfirst\r\n")
        proc.send_signal(signal.SIGTERM)
        systemd.wait("STOPPING=1")
        wait_for(lambda: not listening(port), 10, what="the listener to close")
        busy.sock.sendall(b"second\r\n.\r\n")
        assert busy.reply().startswith(b"250 ok ")
        assert busy.reply() == b"421 shutting down, try again later (#4.3.2)\r\n"
        busy.close()
        assert proc.wait(60) == 0, log.read_text()
        new = user / "Maildir" / "new"
        if not files(new):
            proc, log = _root_run(home, port, {})
            wait_for(lambda: len(files(new)) == 1, what="delivery after restart")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        (msg,) = [f.read_bytes() for f in files(new)]
        assert b"Subject: root drain\n\nfirst\nsecond\n" in msg
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root")
def test_root_mode_alrm_reaches_the_scheduler(root_home: tuple[Home, Path]) -> None:
    """The supervisor relays ALRM to the send part: a deferred message goes out at once."""
    home, _ = root_home
    answers = {"rcpt": b"451 4.3.0 try later\r\n"}
    peer = ThreadPeer(Script(rcpt=lambda addr: answers["rcpt"]))
    (home.control / "smtproutes").write_text(f"remote.example:127.0.0.1:{peer.peer.port}\n")
    port = free_port()
    proc, log = _root_run(home, port, {})
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        client = Client(port)
        client.reply()
        client.cmd(b"HELO x")
        client.cmd(b"MAIL FROM:<joe@test.example>")
        assert client.cmd(b"RCPT TO:<far@remote.example>") == b"250 ok\r\n"
        client.cmd(b"DATA")
        assert client.cmd(b"Subject: alrm\r\n\r\nx\r\n.").startswith(b"250 ok")
        client.cmd(b"QUIT")
        client.close()
        wait_for(lambda: ": deferral: " in log.read_text(), what="the deferral")
        answers["rcpt"] = b"250 ok\r\n"
        proc.send_signal(signal.SIGALRM)
        wait_for(lambda: len(peer.peer.messages) == 1, 30, what="delivery after ALRM")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        peer.close()


# -- SIGTERM: the QMQP and QMTP listeners (smtp/netdoor.py's NetstringListener.drain) ---------


def _qmqp_request(message: bytes, sender: bytes, rcpts: list[bytes]) -> bytes:
    return encode(encode(message) + encode(sender) + b"".join(encode(r) for r in rcpts))


def _qmtp_message(message: bytes, sender: bytes, rcpts: list[bytes]) -> bytes:
    return encode(b"\n" + message) + encode(sender) + encode(b"".join(encode(r) for r in rcpts))


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += data


def _netdoors(mta: Mta) -> tuple[int, int]:
    qmqp, qmtp = free_port(), free_port()
    mta.start("--qmqp", f"127.0.0.1:{qmqp}", "--qmtp", f"127.0.0.1:{qmtp}")
    wait_for(lambda: listening(qmqp) and listening(qmtp), what="the QMQP and QMTP listeners")
    return qmqp, qmtp


def test_term_lets_qmqp_and_qmtp_requests_finish_and_closes_idle(mta: Mta) -> None:
    qmqp, qmtp = _netdoors(mta)
    req = _qmqp_request(b"Subject: qmqp drain\n\nover qmqp\n", b"joe@test.example",
                        [b"alice@test.example"])  # fmt: skip
    busy = socket.create_connection(("127.0.0.1", qmqp), 30)
    busy.sendall(req[: len(req) // 2])  # mid-request when TERM arrives
    msg = _qmtp_message(b"Subject: qmtp drain\n\nover qmtp\n", b"joe@test.example",
                        [b"bob@test.example"])  # fmt: skip
    busy_t = socket.create_connection(("127.0.0.1", qmtp), 30)
    busy_t.sendall(msg[:10])
    idle = socket.create_connection(("127.0.0.1", qmqp), 30)
    idle_t = socket.create_connection(("127.0.0.1", qmtp), 30)
    # the server has begun both messages (a request it has not read yet counts as idle)
    wait_for(lambda: len(mta.queue_files()) == 2, what="both messages begun")
    mta.signal(signal.SIGTERM)
    assert _read_all(idle) == b""  # closed at once, without a word
    assert _read_all(idle_t) == b""
    for port in (qmqp, qmtp):  # the listening sockets are closed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 5).close()
    busy.sendall(req[len(req) // 2 :])
    reply = _read_all(busy)
    text, _ = decode_one(reply) or (b"", 0)
    assert text.startswith(b"Kok "), reply  # acknowledged: it is in the queue
    # QMTP: the message being received gets its reply, then the connection closes
    busy_t.sendall(msg[10:] + msg)  # a second message after it is not taken
    reply = _read_all(busy_t)
    text, end = decode_one(reply) or (b"", 0)
    assert text.startswith(b"Kok ") and end == len(reply), reply
    for s in (busy, busy_t, idle, idle_t):
        s.close()
    assert mta.proc is not None and mta.proc.wait(60) == 0
    assert "cut off" not in mta.log()
    if len(files(mta.maildir("alice"))) + len(files(mta.maildir("bob"))) < 2:
        mta.start()  # not delivered before the exit: after the restart
        wait_for(lambda: files(mta.maildir("alice")) and files(mta.maildir("bob")),
                 what="delivery after restart")  # fmt: skip
        assert mta.stop() == 0
    (a,) = [f.read_bytes() for f in files(mta.maildir("alice"))]
    assert a.endswith(b"Subject: qmqp drain\n\nover qmqp\n")
    (b,) = [f.read_bytes() for f in files(mta.maildir("bob"))]  # once: the second was not
    assert b.endswith(b"Subject: qmtp drain\n\nover qmtp\n")


def test_term_cuts_off_a_stalled_qmqp_request_after_timeoutdrain(mta: Mta) -> None:
    write_control(mta.home, "timeoutdrain", "1\n")
    qmqp, _ = _netdoors(mta)
    req = _qmqp_request(b"Subject: never ends\n\nx\n", b"joe@test.example",
                        [b"alice@test.example"])  # fmt: skip
    busy = socket.create_connection(("127.0.0.1", qmqp), 30)
    busy.sendall(req[:-5])
    wait_for(lambda: len(mta.queue_files()) == 1, what="the message begun")
    began = time.monotonic()
    mta.signal(signal.SIGTERM)
    assert _read_all(busy) == b""  # dropped, not acknowledged
    assert 0.5 < time.monotonic() - began < 20
    busy.close()
    assert mta.proc is not None and mta.proc.wait(60) == 0
    assert "stopping: cut off the QMQP connection with 127.0.0.1 after 1 s" in mta.log()
    assert mta.queue_files() == []  # the unacknowledged message was aborted, not queued
    assert files(mta.maildir("alice")) == []
