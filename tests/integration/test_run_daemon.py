"""``pyqmail run`` as a real process: listeners, scheduler, local agent, signals, crashes.

Every test starts the real daemon on a port of its own, talks SMTP to it with smtplib and
looks at the Maildirs and the queue on disk. Waiting is for observable states (a port that
accepts, a file that appears), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.listener import parse_listen
from tests.conftest import free_port, group_gone, require_ipv6_loopback, write_control
from tests.integration.test_remote_peers import Peer, Script

BIN = Path(sys.executable).parent


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), 0.2).close()
        return True
    except OSError:
        return False


def files(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_file())
    except FileNotFoundError:
        return []


class Mta:
    """A home with local users, and the ``pyqmail run`` process serving it."""

    def __init__(self, home: Home, tmp: Path) -> None:
        self.home = home
        self.tmp = tmp
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = tmp / "run.log"
        write_control(home, "locals", "mx.test.example\ntest.example\n")
        write_control(home, "rcpthosts", "mx.test.example\ntest.example\nvirt.example\n")
        self.users: dict[str, Path] = {}
        for name in ("alice", "bob"):
            d = tmp / name
            for sub in ("cur", "new", "tmp"):
                (d / "Maildir" / sub).mkdir(parents=True)
            self.users[name] = d
        u, g = os.getuid(), os.getgid()
        lines = []
        for name, d in self.users.items():
            lines.append(f"={name}:{name}:{u}:{g}:{d}:::")
            lines.append(f"+{name}-:{name}:{u}:{g}:{d}:-::")
        (home.users / "assign").write_text("\n".join(lines) + "\n.\n")
        subprocess.run([str(BIN / "pyqmail"), "newu"], check=True, env=self.env)

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, PYQMAIL_HOME=str(self.home.root), PYQMAIL_SINGLE_USER="1")

    def maildir(self, user: str) -> Path:
        return self.users[user] / "Maildir" / "new"

    def start(self, *extra: str, wait: bool = True) -> subprocess.Popen[bytes]:
        log = open(self.logfile, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(self.home.root), "--single-user",
             "--smtp", f"127.0.0.1:{self.port}", *extra],
            stdout=log, stderr=log, env=self.env, start_new_session=True,
        )  # fmt: skip
        log.close()
        if wait:
            proc = self.proc
            wait_for(lambda: listening(self.port) or proc.poll() is not None, what="listener")
            assert proc.poll() is None, self.log()
        return self.proc

    def send(self, sender: str, rcpts: list[str], subject: str = "hi", body: str = "hello") -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
            s.sendmail(sender, rcpts, f"Subject: {subject}\r\nX-Id: {subject}\r\n\r\n{body}\r\n")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        assert group_gone(self.proc.pid)  # its listener child too: no old socket to reach

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def queue_files(self) -> list[str]:
        out = []
        for kind in ("mess", "info", "local", "remote", "todo", "intd", "bounce"):
            for root, _, names in os.walk(self.home.queue / kind):
                out += [f"{os.path.relpath(root, self.home.queue)}/{n}" for n in names]
        return out


@pytest.fixture
def mta(home: Home, tmp_path: Path) -> Iterator[Mta]:
    m = Mta(home, tmp_path)
    yield m
    if m.proc is not None and m.proc.poll() is None:
        with_kill = m.proc
        try:
            os.killpg(with_kill.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with_kill.wait(30)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("[::1]", ("::1", 25)),
        ("0.0.0.0", ("0.0.0.0", 25)),
        (":2525", ("0.0.0.0", 2525)),
    ],
)
def test_parse_listen(text: str, expect: tuple[str, int]) -> None:
    assert parse_listen(text, 25) == expect


@pytest.mark.parametrize("bad", ["1.2.3.4:x", "[::1", "[::1]x", "h:70000"])
def test_parse_listen_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(bad, 25)


def test_bad_address_is_usage_error(home: Home) -> None:
    r = subprocess.run([str(BIN / "pyqmail"), "run", "--home", str(home.root), "--smtp", "x:y"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 100
    assert "bad port" in r.stderr


def test_delivers_logs_and_stops_cleanly_on_term(mta: Mta) -> None:
    mta.start()
    mta.send("joe@test.example", ["alice@test.example", "bob@test.example"], "first")
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1 and len(files(mta.maildir("bob"))) == 1)
    msg = files(mta.maildir("alice"))[0].read_bytes()
    assert msg.startswith(b"Return-Path: <joe@test.example>\nDelivered-To: alice@test.example\n")
    assert b"invoked from network" in msg
    wait_for(lambda: "end msg " in mta.log(), what="end msg")
    assert mta.stop() == 0
    log = mta.log()
    assert "new msg " in log and "info msg " in log and "from <joe@test.example> qp " in log
    assert "starting delivery 1: msg " in log and " to local " in log
    assert log.count(": success: did_1+0+0/") == 2
    assert log.rstrip().endswith("status: exiting")
    assert mta.queue_files() == []


def test_ipv6_listener(mta: Mta) -> None:
    require_ipv6_loopback()
    port6 = free_port()
    mta.start("--smtp", f"[::1]:{port6}")
    wait_for(lambda: listening(port6, "::1"), what="IPv6 listener")
    with smtplib.SMTP("::1", port6, timeout=30) as s:
        s.sendmail("joe@test.example", ["alice@test.example"], "Subject: v6\r\n\r\nx\r\n")
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1)
    assert b"Subject: v6" in files(mta.maildir("alice"))[0].read_bytes()
    assert mta.stop() == 0


def test_kill9_then_restart_delivers_every_acknowledged_message(mta: Mta) -> None:
    write_control(mta.home, "concurrencylocal", "0\n")  # hold: everything stays queued
    mta.start()
    for i in range(20):
        mta.send("joe@test.example", ["alice@test.example"], f"m{i:02d}")
    wait_for(lambda: mta.log().count("info msg ") == 20, what="20 preprocessed")
    mta.kill9()
    assert files(mta.maildir("alice")) == []
    (mta.home.control / "concurrencylocal").unlink()
    mta.start()
    wait_for(lambda: len(files(mta.maildir("alice"))) == 20, what="20 delivered")
    ids = sorted(
        line.split(b": ", 1)[1]
        for f in files(mta.maildir("alice"))
        for line in f.read_bytes().split(b"\n")
        if line.startswith(b"X-Id: ")
    )
    assert ids == [f"m{i:02d}".encode() for i in range(20)]
    wait_for(lambda: mta.queue_files() == [], what="queue empty")
    assert mta.stop() == 0


def test_kill9_during_intake_loses_nothing_acknowledged(mta: Mta) -> None:
    mta.start()
    acked = []
    for i in range(30):
        mta.send("joe@test.example", ["alice@test.example"], f"k{i:02d}")
        acked.append(f"k{i:02d}".encode())
        if i == 14:
            mta.kill9()
            mta.start()
    wait_for(lambda: len({*_ids(mta.maildir("alice"))}) == 30, what="all 30 delivered")
    assert sorted(set(_ids(mta.maildir("alice")))) == acked
    assert mta.stop() == 0


def _ids(d: Path) -> list[bytes]:
    return [
        line.split(b": ", 1)[1]
        for f in files(d)
        for line in f.read_bytes().split(b"\n")
        if line.startswith(b"X-Id: ")
    ]


def test_hup_rereads_controls_without_dropping_work(mta: Mta) -> None:
    write_control(mta.home, "concurrencylocal", "0\n")
    mta.start()
    mta.send("joe@test.example", ["alice@test.example"], "held")
    wait_for(lambda: "info msg " in mta.log(), what="preprocessed")
    assert files(mta.maildir("alice")) == []
    write_control(mta.home, "concurrencylocal", "3\n")
    mta.signal(signal.SIGHUP)
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1, what="delivery after HUP")
    assert "status: local 1/3 remote 0/20" in mta.log()
    assert mta.stop() == 0


def test_only_one_daemon_per_queue(mta: Mta) -> None:
    mta.start()
    other = subprocess.run(
        [str(BIN / "pyqmail"), "run", "--home", str(mta.home.root), "--single-user",
         "--smtp", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, env=mta.env, timeout=60,
    )  # fmt: skip
    assert other.returncode == 111
    assert "alert: cannot start: qmail-send is already running" in other.stderr
    mta.send("joe@test.example", ["alice@test.example"], "still")
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1)
    assert mta.stop() == 0


def _started(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_listeners_run_in_their_own_process_and_losing_it_stops_the_daemon(mta: Mta) -> None:
    """The listeners live in a child forked first (daemon/listenproc.py); the scheduler
    learns of its messages through it. If that child dies, the daemon stops with 111,
    as qmail-send dies when it loses a part, instead of running on without listeners."""
    proc = mta.start()
    mta.send("joe@test.example", ["alice@test.example"], "through the child")
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1, what="delivery")
    kids = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    listener = min(kids, key=_started)  # forked before the delivery workers
    conns = Path(f"/proc/{listener}/net/tcp").read_text()  # the port is the child's
    assert f":{mta.port:04X} " in conns
    os.kill(listener, signal.SIGKILL)
    assert proc.wait(60) == 111
    assert "alert: lost the listener process" in mta.log()


def test_cannot_start_without_queue(home: Home, tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(home.queue)
    r = subprocess.run([str(BIN / "pyqmail"), "run", "--home", str(home.root), "--single-user"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 111
    assert "alert: cannot start: unable to switch to queue directory" in r.stderr


def _ns(b: bytes) -> bytes:
    return str(len(b)).encode() + b":" + b + b","


def test_qmqp_and_qmtp_listeners_queue_for_delivery(mta: Mta) -> None:
    qmqp, qmtp = free_port(), free_port()
    mta.start("--qmqp", f"127.0.0.1:{qmqp}", "--qmtp", f"127.0.0.1:{qmtp}")
    wait_for(lambda: listening(qmqp) and listening(qmtp), what="QMQP and QMTP listeners")
    with socket.create_connection(("127.0.0.1", qmqp), 10) as s:
        body = (
            _ns(b"Subject: by qmqp\n\nx\n") + _ns(b"joe@test.example") + _ns(b"alice@test.example")
        )
        s.sendall(_ns(body))
        assert s.recv(1024).split(b":", 1)[1].startswith(b"K")
    with socket.create_connection(("127.0.0.1", qmtp), 10) as s:
        s.sendall(_ns(b"\nSubject: by qmtp\n\nx\n") + _ns(b"joe@test.example")
                  + _ns(_ns(b"alice@test.example")))  # fmt: skip
        assert s.recv(1024).split(b":", 1)[1].startswith(b"K")
    wait_for(lambda: len(files(mta.maildir("alice"))) == 2, what="both delivered")
    subjects = sorted(
        next(ln for ln in f.read_bytes().split(b"\n") if ln.startswith(b"Subject:"))
        for f in files(mta.maildir("alice"))
    )
    assert subjects == [b"Subject: by qmqp", b"Subject: by qmtp"]
    assert mta.stop() == 0
    # no tcp.qmqp.cdb: the start-up log says QMQP serves loopback only
    (warning,) = [ln for ln in mta.log().splitlines() if "QMQP" in ln]
    assert (
        warning.startswith("warning: QMQP serves loopback clients only")
        and "tcp.qmqp.cdb" in warning
    )


def test_control_values_qmail_ignores_are_logged(mta: Mta) -> None:
    """concurrencyremote=abc: qmail silently uses 20; pyqmail does too, and says so."""
    write_control(mta.home, "concurrencyremote", "abc\n")
    mta.start()
    mta.send("alice@test.example", ["bob@test.example"])
    wait_for(lambda: len(files(mta.maildir("bob"))) == 1, what="delivery")
    assert mta.stop() == 0
    log = mta.log()
    assert "warning: control/concurrencyremote:1: 'abc' is not a number" in log
    assert "remote 0/20" in log


class ThreadPeer:
    """A scripted SMTP peer (tests/integration/test_remote_peers.py) on a loop of its own
    thread, for a daemon in another process to deliver to."""

    def __init__(self, script: Script) -> None:
        self.peer = Peer(script)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.peer.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_one_of_two_recipients_refused_bounces_with_giving_up(mta: Mta) -> None:
    """qmail runs qmail-remote once per recipient, so the refused one's bounce paragraph
    ends "Giving up on IP." even though the other recipient at that host was accepted."""

    def rcpt(addr: bytes) -> bytes:
        return b"550 5.1.1 no such user\r\n" if addr.startswith(b"no@") else b"250 ok\r\n"

    peer = ThreadPeer(Script(rcpt=rcpt))
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{peer.peer.port}\n")
        mta.start()
        mta.send("alice@test.example", ["ok@remote.example", "no@remote.example"], "two")
        wait_for(lambda: bool(files(mta.maildir("alice"))), what="bounce")
        assert mta.stop() == 0
    finally:
        peer.close()
    assert [m[1] for m in peer.peer.messages] == [[b"ok@remote.example"]]
    (bounce,) = (f.read_bytes() for f in files(mta.maildir("alice")))
    assert (
        b"\n\n<no@remote.example>:\n127.0.0.1 does not like recipient.\n"
        b"Remote host said: 550 5.1.1 no such user\nGiving up on 127.0.0.1.\n\n"
        b"--- Below this line is a copy of the message.\n"
    ) in bounce
    assert b"<ok@remote.example>" not in bounce
    assert (
        "failure: 127.0.0.1_does_not_like_recipient./Remote_host_said:_550_5.1.1_no_such_user/"
        "Giving_up_on_127.0.0.1./"
    ) in mta.log()


def test_rules_option_takes_the_sites_cdb_where_it_is(mta: Mta, tmp_path: Path) -> None:
    """``--rules PATH`` is ``tcpserver -x PATH``: the site's cdb decides, not control/'s."""
    from pyqmail.tcprules import compile_cdb

    etc = tmp_path / "etc"
    etc.mkdir()
    compile_cdb([b"127.0.0.1:deny\n", b":allow\n"], etc / "tcp.smtp.cdb", etc / "tcp.smtp.tmp")
    mta.start("--rules", str(etc / "tcp.smtp.cdb"))
    with socket.create_connection(("127.0.0.1", mta.port), 10) as s:
        s.settimeout(10)
        greeting = s.recv(512)
    assert not greeting.startswith(b"220"), greeting  # denied by the rules at that path
    assert mta.stop() == 0
    mta.start()  # without --rules, control/tcp.smtp.cdb (absent): loopback is welcome
    with socket.create_connection(("127.0.0.1", mta.port), 10) as s:
        s.settimeout(10)
        assert s.recv(512).startswith(b"220")


def test_refused_rcpt_logged_and_json_log_format(mta: Mta) -> None:
    import json

    # 127.0.0.1 relays; 127.0.0.2 is held to rcpthosts
    subprocess.run(
        [str(BIN / "tcprules"), str(mta.home.control / "tcp.smtp.cdb"), str(mta.tmp / "t.tmp")],
        input=b'127.0.0.1:allow,RELAYCLIENT=""\n:allow\n',
        check=True,
    )
    mta.start("--log-format", "json")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30, source_address=("127.0.0.2", 0)) as s:
        s.ehlo()
        s.mail("joe@else.example")
        code, _ = s.rcpt("victim@notours.example")
        assert code == 553
        s.rset()
    mta.send("joe@test.example", ["alice@test.example"], "logged")
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1)
    wait_for(lambda: "end msg" in mta.log() and "victim@notours.example" in mta.log())
    assert mta.stop() == 0
    wait_for(lambda: "status: exiting" in mta.log(), what="the formatter's last line")
    records = [json.loads(line) for line in mta.log().splitlines() if line.strip()]
    assert len(records) >= 5  # every line is one JSON object
    texts = [json.dumps(r) for r in records]
    (refused,) = [t for t in texts if "victim@notours.example" in t and "refused" in t]
    assert "127.0.0.2" in refused and "rcpthosts" in refused and "553" in refused
    assert any("end msg " in t for t in texts)


def _peer_sockets(pid: int, port: int) -> set[str]:
    """``socket:[inode]`` names of ``pid``'s TCP connections to ``port`` on 127.0.0.1."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[2].endswith(f":{port:04X}"):
            inodes.add(f"socket:[{f[9]}]")
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return inodes & held


def test_remote_agent_runs_in_its_own_process_and_losing_it_stops_the_daemon(
    mta: Mta,
) -> None:
    """Single-user mode's remote SMTP clients run in a child forked last (the agent of
    remote/agentproc.py, as root mode's qmailr): the connection to the remote host is that
    process's, not the scheduler's. If it dies, the daemon stops with 111."""
    gate = threading.Event()

    def rcpt(_addr: bytes) -> bytes:
        gate.wait(30)  # hold the transaction open while the test looks at the processes
        return b"250 ok\r\n"

    peer = ThreadPeer(Script(rcpt=rcpt))
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{peer.peer.port}\n")
        proc = mta.start()
        kids = [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        agent = max(kids, key=lambda k: (_started(k), k))  # forked after the workers
        mta.send("joe@test.example", ["bob@remote.example"], "through the agent")
        wait_for(lambda: bool(_peer_sockets(agent, peer.peer.port)), what="the agent's connection")
        assert not _peer_sockets(proc.pid, peer.peer.port)
        gate.set()
        wait_for(lambda: "delivery 1: success" in mta.log(), what="the success logged")
        os.kill(agent, signal.SIGKILL)
        assert proc.wait(60) == 111
    finally:
        gate.set()
        peer.close()
    assert "alert: lost connection to the remote agent" in mta.log()
    assert mta.queue_files() == []


def test_a_term_to_the_whole_group_stops_in_order_with_a_remote_delivery_in_flight(
    mta: Mta,
) -> None:
    """kill -TERM -- -PGID (or systemd's KillMode=control-group) reaches the remote agent
    too: it ignores TERM and ends at EOF, so the delivery in flight finishes, the daemon
    stops in order with 0 and nothing is left in the queue."""
    gate = threading.Event()
    seen = threading.Event()

    def rcpt(_addr: bytes) -> bytes:
        seen.set()
        gate.wait(30)
        return b"250 ok\r\n"

    peer = ThreadPeer(Script(rcpt=rcpt))
    try:
        write_control(mta.home, "smtproutes", f"remote.example:127.0.0.1:{peer.peer.port}\n")
        proc = mta.start()
        mta.send("joe@test.example", ["bob@remote.example"], "in flight at TERM")
        assert seen.wait(30), mta.log()
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.5)  # the TERM has reached every process of the group
        gate.set()
        assert proc.wait(60) == 0, mta.log()
    finally:
        gate.set()
        peer.close()
    assert [m[1] for m in peer.peer.messages] == [[b"bob@remote.example"]]
    assert "lost connection to the remote agent" not in mta.log()
    assert "delivery 1: success" in mta.log()
    assert mta.queue_files() == []
