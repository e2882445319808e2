"""QMQP and QMTP with hostile netstrings (inject.md 3-4; gaps.md 1: lengths must be
numeric), through ``qmail-qmqpd``/``qmail-qmtpd`` on stdin/stdout (as under tcpserver)
and the ``pyqmail qmqpd/qmtpd --listen`` listeners.

Every refused request must queue nothing; a NUL can never split an address into two;
memory stays bounded while a 100 MB body streams through.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.netstring import encode as ns
from tests.conftest import free_port
from tests.security._support import queued

BIN = Path(sys.executable).parent
SHELLSHOCK = b"() { :; }; /bin/touch /tmp/x"  # the published exploit's sender


def _qmqp(*items: bytes) -> bytes:
    return ns(b"".join(ns(i) for i in items))


def _run(home: Home, prog: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, TCPREMOTEIP="127.0.0.1", TCPLOCALIP="127.0.0.1")
    return subprocess.run(
        [str(BIN / prog), "--home", str(home.root)],
        input=data, capture_output=True, timeout=120, env=env,
    )  # fmt: skip


def _leftovers(home: Home) -> list[Path]:
    """Files a refused request may not leave behind (pid/, mess/, intd/, todo/)."""
    out = []
    for sub in ("pid", "mess", "intd", "todo"):
        out += [f for f in (home.queue / sub).rglob("*") if f.is_file()]
    return out


# ----------------------------------------------------------------- QMQP

GOOD = _qmqp(b"Subject: q\n\nbody\n", b"a@client.example", b"x@test.example")

QMQP_BAD = {
    "non-digit length": b"1a:" + GOOD[3:],
    "leading space": b" " + GOOD,
    "plus sign": b"+" + GOOD,
    "minus sign": b"-5:" + GOOD,
    "hex length": b"0x10:" + GOOD,
    "empty length": b":" + GOOD,
    "no comma": GOOD[:-1] + b";",
    "outer too short": b"10:" + GOOD[GOOD.index(b":") + 1 :],
    "inner runs past outer": ns(ns(b"msg") + b"99:" + b"a@b,"),
    "inner non-digit": ns(b"3:msg," + b"x:a@b," + ns(b"x@test.example")),
    "only a message": ns(ns(b"msg")),
    "empty request": ns(b""),
    "truncated": GOOD[:-5],
    "inner missing comma": ns(b"3:msg;" + ns(b"a@b") + ns(b"x@test.example")),
}


@pytest.mark.parametrize("name", list(QMQP_BAD))
def test_qmqp_malformed_request_queues_nothing(home: Home, name: str) -> None:
    r = _run(home, "qmail-qmqpd", QMQP_BAD[name])
    assert b"Traceback" not in r.stdout + r.stderr
    assert not r.stdout.startswith(b"K") and b":K" not in r.stdout, r.stdout
    assert queued(home) == []
    assert _leftovers(home) == []


@pytest.mark.parametrize(
    "length", [b"99999999999999999999", b"200000001", b"9" * 200, b"4294967296"]
)
def test_qmqp_huge_length_is_refused_before_reading(home: Home, length: bytes) -> None:
    r = _run(home, "qmail-qmqpd", length + b":" + b"x" * 1000)
    assert r.stdout == b"" or b":D" in r.stdout, r.stdout
    assert queued(home) == []
    assert _leftovers(home) == []


@pytest.mark.parametrize(
    ("sender", "rcpts"),
    [
        (b"a@client.example", []),
        (b"a@client.example", [b"x@test.example\x00Tvictim@elsewhere.example"]),
        (b"a@client.example", [b"x@test.example", b"\x00"]),
        (b"a\x00Tvictim@elsewhere.example", [b"x@test.example"]),
        (b"a@client.example", [b"x" * 1000 + b"@test.example"]),
        (b"a" * 1000, [b"x@test.example"]),
        (SHELLSHOCK, [b"x@test.example"]),
        (b"a;b@client.example", [b"x@test.example"]),
        (b"a@client.example", [b'"' + SHELLSHOCK + b'"@test.example']),
        (b"a@client.example", [b"john doe@test.example"]),
    ],
    ids=[
        "zero-rcpts",
        "nul-rcpt",
        "nul-only",
        "nul-sender",
        "long-rcpt",
        "long-sender",
        "shellshock-sender",
        "special-sender",
        "quoted-function-rcpt",
        "space-rcpt",
    ],
)
def test_qmqp_bad_envelope_is_refused(home: Home, sender: bytes, rcpts: list[bytes]) -> None:
    r = _run(home, "qmail-qmqpd", _qmqp(b"Subject: q\n\nbody\n", sender, *rcpts))
    assert b":D" in r.stdout, r.stdout
    assert queued(home) == []
    assert _leftovers(home) == []


def test_qmqp_good_request_and_trailing_garbage(home: Home) -> None:
    """One request per connection: a second one behind it is never read."""
    second = _qmqp(b"Subject: 2\n\nb\n", b"evil@attacker.example", b"victim@test.example")
    r = _run(home, "qmail-qmqpd", GOOD + second)
    assert b":Kok " in r.stdout, r.stdout
    assert queued(home) == [(b"a@client.example", [b"x@test.example"])]


def _watchdog(proc: subprocess.Popen[bytes]) -> threading.Timer:
    """Kill ``proc`` after 120 s whatever happens: a test must never hang a run."""
    t = threading.Timer(120, proc.kill)
    t.daemon = True
    t.start()
    return t


def _peak_rss_kb(proc: subprocess.Popen[bytes]) -> int:
    """The server's own peak RSS so far (VmHWM: per address space, so the parent's size
    at fork time, which ru_maxrss would include, does not count)."""
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_qmqp_100mb_body_streams_in_bounded_memory(home: Home) -> None:
    size = 100 * 1024 * 1024
    sender, rcpt = ns(b"a@client.example"), ns(b"x@test.example")
    head = b"%d:" % size
    inner_len = len(head) + size + 1 + len(sender) + len(rcpt)
    env = dict(os.environ, TCPREMOTEIP="127.0.0.1")
    proc = subprocess.Popen(
        [str(BIN / "qmail-qmqpd"), "--home", str(home.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    _watchdog(proc)
    proc.stdin.write(b"%d:" % inner_len + head)
    line = b"x" * 1023 + b"\n"
    block = line * 1024  # 1 MiB
    for _ in range(100):
        proc.stdin.write(block)
    rss = _peak_rss_kb(proc)  # all but the last pipe-full of the body went through
    proc.stdin.write(b"," + sender + rcpt + b",")
    proc.stdin.close()
    reply = proc.stdout.read()
    proc.wait(60)
    assert b":Kok" in reply or b":D" in reply, reply
    assert rss < 80 * 1024, f"peak RSS {rss} KiB for a 100 MiB body"


# ----------------------------------------------------------------- QMTP


def _qmtp(msg: bytes, sender: bytes, rcpts: list[bytes]) -> bytes:
    return ns(b"\n" + msg) + ns(sender) + ns(b"".join(ns(r) for r in rcpts))


def _qmtp_replies(out: bytes) -> list[bytes]:
    from pyqmail.netstring import decode_all

    return decode_all(out)


def test_qmtp_relay_and_nul_recipients(home: Home) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    rcpts = [
        b"ok@test.example",
        b"victim@elsewhere.example",
        b"x@test.example\x00Tvictim@elsewhere.example",
        b"victim@elsewhere.example\x00@test.example",
        b"victim@test.example.",
        b"x" * 1000 + b"@test.example",
        b"victim@TEST.example",
    ]
    r = _run(home, "qmail-qmtpd", _qmtp(b"Subject: t\n\nbody\n", b"a@client.example", rcpts))
    replies = _qmtp_replies(r.stdout)
    assert len(replies) == len(rcpts), replies
    assert replies[0].startswith(b"K") and replies[-1].startswith(b"K")
    assert all(x.startswith(b"D") for x in replies[1:-1]), replies
    assert queued(home) == [(b"a@client.example", [b"ok@test.example", b"victim@TEST.example"])]


@pytest.mark.parametrize(
    "data",
    [
        b"1a:\nx,",
        b"-1:\n,",
        b"0:,",
        b"5:Xabcd,",  # neither LF nor CR first
        b"3:\nab;",
        b"99999999999999999999:\n",
        ns(b"\nm\n") + b"x:a@b,",
        ns(b"\nm\n") + ns(b"a@b") + b"5:" + ns(b"x@test.example"),
        ns(b"\nm\n") + ns(b"a@b") + ns(b"99:x@test.example,"),
    ],
)
def test_qmtp_malformed_queues_nothing(home: Home, data: bytes) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    r = _run(home, "qmail-qmtpd", data)
    assert b"Traceback" not in r.stdout + r.stderr
    assert b"K" not in b"".join(x[:1] for x in _safe_replies(r.stdout))
    assert queued(home) == []
    assert _leftovers(home) == []


def _safe_replies(out: bytes) -> list[bytes]:
    try:
        return _qmtp_replies(out)
    except ValueError:
        return [out[:1]]


def test_qmtp_zero_recipients_queues_nothing_and_session_goes_on(home: Home) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    data = _qmtp(b"Subject: none\n\nx\n", b"a@client.example", []) + _qmtp(
        b"Subject: next\n\ny\n", b"b@client.example", [b"z@test.example"]
    )
    r = _run(home, "qmail-qmtpd", data)
    replies = _qmtp_replies(r.stdout)
    assert len(replies) == 1 and replies[0].startswith(b"K"), replies
    assert queued(home) == [(b"b@client.example", [b"z@test.example"])]


# ----------------------------------------------------------------- the listeners


def _start(home: Home, sub: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyqmail.cli.main", sub, "--home", str(home.root),
         "--listen", f"127.0.0.1:{port}"],
        env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:  # the command prints no readiness line: poll its port
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{sub} did not start") from None
            time.sleep(0.05)


@pytest.fixture
def qmqp_listener(home: Home) -> Iterator[int]:
    proc, port = _start(home, "qmqpd")
    yield port
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert b"Traceback" not in err, err


def _exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    """All the peer sends until it closes (or resets)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def test_qmqp_listener_survives_every_malformed_request(home: Home, qmqp_listener: int) -> None:
    for data in QMQP_BAD.values():
        out = _exchange(qmqp_listener, data)
        assert b":K" not in out
    # a client that goes away mid-body, and one that resets
    _exchange(qmqp_listener, b"1000:5000:" + b"x" * 100)
    s = socket.create_connection(("127.0.0.1", qmqp_listener))
    s.sendall(b"50:20:abc")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    assert queued(home) == []
    assert b":Kok" in _exchange(qmqp_listener, GOOD)
    assert queued(home) == [(b"a@client.example", [b"x@test.example"])]


def test_qmtp_100mb_body_streams_in_bounded_memory(home: Home) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    size = 100 * 1024 * 1024
    env = dict(os.environ, TCPREMOTEIP="127.0.0.1")
    proc = subprocess.Popen(
        [str(BIN / "qmail-qmtpd"), "--home", str(home.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    _watchdog(proc)
    proc.stdin.write(b"%d:\r" % (size + 1))  # CRLF mode: converted while streaming
    block = (b"x" * 1022 + b"\r\n") * 1024
    for _ in range(100):
        proc.stdin.write(block)
    rss = _peak_rss_kb(proc)  # all but the last pipe-full of the body went through
    proc.stdin.write(b"," + ns(b"a@client.example") + ns(ns(b"x@test.example")))
    proc.stdin.close()
    reply = proc.stdout.read()
    proc.wait(60)
    assert b":K" in reply, reply
    assert rss < 80 * 1024, f"peak RSS {rss} KiB for a 100 MiB body"


@pytest.fixture
def qmtp_listener(home: Home) -> Iterator[int]:
    (home.control / "rcpthosts").write_text("test.example\n")
    proc, port = _start(home, "qmtpd")
    yield port
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert b"Traceback" not in err, err


def test_qmtp_listener_per_ip_limit_frees_its_slots(home: Home, qmtp_listener: int) -> None:
    idle = []
    for _ in range(20):  # the per-IP limit
        s = socket.socket()
        s.bind(("127.0.3.1", 0))
        s.connect(("127.0.0.1", qmtp_listener))
        idle.append(s)
    extra = socket.socket()
    extra.bind(("127.0.3.1", 0))
    extra.connect(("127.0.0.1", qmtp_listener))
    extra.settimeout(10)
    assert extra.recv(10) == b""  # closed at once, nothing said
    extra.close()
    for s in idle:
        s.close()
    good = _qmtp(b"Subject: q\n\nbody\n", b"a@client.example", [b"x@test.example"])
    deadline = time.monotonic() + 15
    while True:  # the slots come back as the server sees the closes
        with socket.socket() as s:
            s.bind(("127.0.3.1", 0))
            s.connect(("127.0.0.1", qmtp_listener))
            s.settimeout(10)
            s.sendall(good)
            out = b""
            try:
                while not out.endswith(b","):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    out += chunk
            except OSError:
                pass
        if b":K" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.1)
    assert queued(home) == [(b"a@client.example", [b"x@test.example"])]


def test_qmqp_resets_right_after_the_request(home: Home, qmqp_listener: int) -> None:
    """Clients that reset the moment the request is out: no traceback (the fixtures read
    the listener's stderr), whole messages or none."""
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", qmqp_listener))
        s.sendall(GOOD)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    deadline = time.monotonic() + 15
    while b":Kok" not in _exchange(qmqp_listener, GOOD):  # per-IP slots come back
        assert time.monotonic() < deadline, "the listener stopped serving"
        time.sleep(0.1)
    todo = {f.name for f in (home.queue / "todo").iterdir()}
    mess = {f.name for f in (home.queue / "mess").rglob("*") if f.is_file()}
    assert todo == mess and todo


def test_listeners_refuse_the_shellshock_sender_and_take_quoted_ones(
    home: Home, qmqp_listener: int, qmtp_listener: int
) -> None:
    (home.control / "rcpthosts").write_text("test.example\n")
    msg = b"Subject: s\n\nbody\n"
    out = _exchange(qmqp_listener, _qmqp(msg, SHELLSHOCK, b"x@test.example"))
    assert b":D" in out, out
    replies = _qmtp_replies(_exchange(qmtp_listener, _qmtp(msg, SHELLSHOCK, [b"x@test.example"])))
    assert [r[:1] for r in replies] == [b"D"], replies
    assert queued(home) == []
    assert b":K" in _exchange(qmqp_listener, _qmqp(msg, b'"john doe"@c.example', b"x@test.example"))
    replies = _qmtp_replies(_exchange(qmtp_listener, _qmtp(msg, b"", [b'"a;b"@test.example'])))
    assert [r[:1] for r in replies] == [b"K"], replies
    assert sorted(queued(home)) == [(b"", [b"a;b@test.example"]),
                                    (b"john doe@c.example", [b"x@test.example"])]  # fmt: skip


# -------------------------------------------------- hostile envelopes (bounded memory)

HOSTILE_RECIPIENTS = 2_000_000


def _hostile(port: int, head: bytes, item: bytes) -> tuple[int, bytes]:
    """``head`` then HOSTILE_RECIPIENTS ``item``s: (how many the server took before it
    stopped reading, what it answered)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(head)
            block = item * 10_000
            while sent < HOSTILE_RECIPIENTS:
                s.sendall(block)
                sent += 10_000
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return sent, _read_all(s)


@pytest.mark.parametrize("sub", ["qmqpd", "qmtpd"])
def test_millions_of_recipients_are_refused_in_bounded_memory(home: Home, sub: str) -> None:
    """A request declared (nearly) as long as the protocol allows, then recipients for
    ever: the listener answers D at MAX_RECIPIENTS, stops reading, holds a few MB at most,
    leaves nothing in the queue and serves the next client."""
    (home.control / "rcpthosts").write_text("test.example\n")
    proc, port = _start(home, sub)
    try:
        _watchdog(proc)
        before = _peak_rss_kb(proc)
        msg = b"Subject: hostile\n\nhi\n"
        if sub == "qmqpd":
            head = b"199999999:" + ns(msg) + ns(b"a@b.example")
        else:
            head = ns(b"\n" + msg) + ns(b"a@b.example") + b"1999999999:"
        sent, out = _hostile(port, head, ns(b"abcd"))
        growth = _peak_rss_kb(proc) - before
        assert out == ns(b"Dsorry, too many recipients: at most 10000 per message (#5.5.3)")
        assert sent < HOSTILE_RECIPIENTS  # it stopped reading
        assert growth < 16 * 1024, f"peak RSS grew by {growth} KiB"
        assert _leftovers(home) == []
        if sub == "qmqpd":
            assert b":Kok" in _exchange(port, GOOD)
        else:
            replies = _qmtp_replies(
                _exchange(port, _qmtp(msg, b"a@b.example", [b"x@test.example"]))
            )
            assert replies[0].startswith(b"K"), replies
        assert len(queued(home)) == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"Traceback" not in err, err


def test_qmtp_recipient_list_declared_too_long_is_refused_at_once(home: Home) -> None:
    out = _run(home, "qmail-qmtpd", ns(b"\nA\n") + ns(b"a@b.example") + b"1999999999:").stdout
    assert out == ns(b"Dsorry, too many recipients: at most 10000 per message (#5.5.3)")
    assert _leftovers(home) == []
