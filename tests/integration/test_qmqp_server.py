"""QMQP on loopback: the QmqpServer listener with a real queue, a mini-qmail null client
(a home whose only configuration is qmqpservers) injecting through it, qmail-qmqpc's exit
codes, tcprules access, and every malformed request."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail import tcprules
from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.netstring import decode_one, encode
from pyqmail.queue.envelope import format_input, parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.qmqpc import QmqpSubmitter
from pyqmail.queue.submit import InProcessSubmitter, ProgramSubmitter
from pyqmail.smtp.qmqpd import QmqpServer, serve_stdio
from tests.conftest import LoAddresses

BIN = Path(sys.executable).parent


class Listener:
    """An asyncio server in a thread of its own; ``port`` is known once it listens."""

    def __init__(self, make: object, host: str = "127.0.0.1") -> None:
        self._make = make
        self.host = host
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            srv = await self._make.start(self.host, 0)  # type: ignore[attr-defined]
            self.server = srv
            self.port = srv.sockets[0].getsockname()[1]
            self._ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop)
        self.thread.join(10)


def queued(home: Home) -> list[tuple[bytes, tuple[bytes, ...], bytes]]:
    paths = QueuePaths(home.queue)
    out = []
    for todo in sorted((home.queue / "todo").iterdir()):
        t = parse_todo(todo.read_bytes())
        out.append((t.sender, t.recipients, paths.mess(int(todo.name)).read_bytes()))
    return out


@pytest.fixture
def central(home: Home) -> Iterator[tuple[Home, Listener]]:
    srv = QmqpServer(home, ControlCache(home), InProcessSubmitter(home), limit=10_000_000)
    lst = Listener(srv)
    yield home, lst
    lst.close()


@pytest.fixture
def null_client(tmp_path: Path) -> Home:
    h = Home(tmp_path / "null", single_user=True)
    create_home(h, "null.test.example", None)
    return h


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, close our side, return all the server said (b"" if it hung up)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, BrokenPipeError, OSError):
            pass
    return out


def request(message: bytes, sender: bytes, rcpts: list[bytes]) -> bytes:
    return encode(encode(message) + encode(sender) + b"".join(encode(r) for r in rcpts))


def test_request_is_queued_with_received_line(central: tuple[Home, Listener]) -> None:
    home, lst = central
    reply = exchange(lst.port, request(b"Subject: q\n\nhi\n", b"s@x.example", [b"a@b.example"]))
    text, end = decode_one(reply) or (b"", 0)
    assert text.startswith(b"Kok ") and b" qp " in text and end == len(reply)
    [(sender, rcpts, mess)] = queued(home)
    assert (sender, rcpts) == (b"s@x.example", (b"a@b.example",))
    lines = mess.split(b"\n")
    assert lines[0].startswith(b"Received: (qmail ") and b"invoked from network" in lines[0]
    assert lines[1] == b"Received: from unknown (127.0.0.1)"
    assert lines[2].startswith(b"  by mx.test.example with QMQP; ")
    assert mess.endswith(b"\nSubject: q\n\nhi\n")


def test_null_client_injects_through_qmqp(
    central: tuple[Home, Listener], null_client: Home
) -> None:
    home, lst = central
    (null_client.control / "qmqpservers").write_text(f"127.0.0.1:{lst.port}\n")
    env = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(null_client.root),
           "PYQMAIL_SINGLE_USER": "1", "USER": "robot"}  # fmt: skip
    r = subprocess.run([str(BIN / "qmail-inject")], input=b"To: alice@test.example\n\nhi\n",
                       env=env, capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert list((null_client.queue / "todo").iterdir()) == []
    [(sender, rcpts, mess)] = queued(home)
    assert sender == b"robot@null.test.example"
    assert rcpts == (b"alice@test.example",)
    assert b"\nFrom: robot@null.test.example\n" in mess


def test_submitter_maps_replies_to_queue_codes(
    central: tuple[Home, Listener], null_client: Home
) -> None:
    _, lst = central
    sub = QmqpSubmitter([f"127.0.0.1:{lst.port}"])
    p = sub.begin()
    p.write(b"Subject: x\n\n")
    r = p.commit_blocking(b"s", [])  # pyqmail's QMQP server refuses a message without recipients
    assert r.code == 31
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    p = QmqpSubmitter([f"127.0.0.1:{dead}", f"127.0.0.1:{lst.port}"]).begin()
    p.write(b"x\n")
    assert p.commit_blocking(b"s", [b"r@x.example"]).code == 0  # the second server took it


def _qmqpc(home: Home, message: bytes, envelope: bytes) -> int:
    env = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(home.root), "PYQMAIL_SINGLE_USER": "1"}
    rfd, wfd = os.pipe()
    os.write(wfd, envelope)
    os.close(wfd)
    try:
        r = subprocess.run([str(BIN / "qmail-qmqpc")], input=message, stdout=rfd, env=env,
                           timeout=60)  # fmt: skip
    finally:
        os.close(rfd)
    return r.returncode


def test_qmqpc_exit_codes(central: tuple[Home, Listener], null_client: Home) -> None:
    home, lst = central
    servers = null_client.control / "qmqpservers"
    envelope = format_input(b"s@x.example", [b"a@b.example"])
    assert _qmqpc(null_client, b"x\n", envelope) == 55  # no qmqpservers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    servers.write_text(f"127.0.0.1:{dead}\n")
    assert _qmqpc(null_client, b"x\n", envelope) == 73  # refused
    servers.write_text(f"not-an-ip\n127.0.0.1:{lst.port}\n")
    assert _qmqpc(null_client, b"x\n", envelope) == 0
    assert _qmqpc(null_client, b"x\n", format_input(b"s", [])) == 31  # D: no recipients
    assert _qmqpc(null_client, b"x\n", b"Xbad\0\0") == 91
    assert len(queued(home)) == 1


@pytest.mark.parametrize(
    "data",
    [b"x:", b"10:" + encode(b"abcdefgh") + b",", b"8:100:abc,,", b"5:1:a,;",
     request(b"A\n", b"s", [b"a"])[:-1] + b";", request(b"A\n", b"s", [b"a"])[:-5]],
)  # fmt: skip
def test_malformed_requests_get_no_reply_and_leave_nothing(
    central: tuple[Home, Listener], data: bytes
) -> None:
    home, lst = central
    assert exchange(lst.port, data) == b""
    assert queued(home) == []
    assert list((home.queue / "pid").iterdir()) == []
    ok = exchange(lst.port, request(b"A\n", b"s", [b"a"]))
    assert b":Kok " in ok  # the server is still up


def test_oversized_body_refused_before_it_is_read(central: tuple[Home, Listener]) -> None:
    home, lst = central
    size = 100 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", lst.port), timeout=10) as s:
        s.sendall(b"%d:%d:" % (size + 100, size))
        s.sendall(b"x" * 65536)  # the start of a 100 MB body the server will not read
        reply = s.recv(1000)
    assert reply == encode(b"Dsorry, that message size exceeds my databytes limit (#5.3.4)")
    assert queued(home) == []
    assert list((home.queue / "pid").iterdir()) == []


def test_bad_addresses(central: tuple[Home, Listener]) -> None:
    home, lst = central
    reply = exchange(lst.port, request(b"A\n", b"s", [b"x" * 1000]))
    assert reply == encode(b"Dsorry, I can't accept addresses like that (#5.1.3)")
    reply = exchange(lst.port, request(b"A\n", b"s\0t", [b"a"]))
    assert reply == encode(b"Dsorry, I can't accept addresses like that (#5.1.3)")
    assert queued(home) == []


def test_tcprules_deny(central: tuple[Home, Listener]) -> None:
    home, lst = central
    rules = io.BytesIO(b"127.0.0.1:deny\n")
    tcprules.compile_cdb(rules, home.control / "tcp.qmqp.cdb", home.control / "tcp.qmqp.tmp")
    assert exchange(lst.port, request(b"A\n", b"s", [b"a"])) == b""
    assert queued(home) == []
    (home.control / "tcp.qmqp.cdb").unlink()
    assert b":Kok " in exchange(lst.port, request(b"A\n", b"s", [b"a"]))


def test_null_client_sendmail_t_and_bs_go_over_qmqp(
    central: tuple[Home, Listener], null_client: Home
) -> None:
    home, lst = central
    (null_client.control / "qmqpservers").write_text(f"127.0.0.1:{lst.port}\n")
    env = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(null_client.root),
           "PYQMAIL_SINGLE_USER": "1", "USER": "robot"}  # fmt: skip
    r = subprocess.run([str(BIN / "sendmail"), "-t", "-i"],
                       input=b"To: a@test.example\nBcc: b@test.example\n\nhi\n", env=env,
                       capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    smtp = (b"HELO me\r\nMAIL FROM:<s@null.test.example>\r\nRCPT TO:<c@test.example>\r\n"
            b"DATA\r\nSubject: bs\r\n\r\nhi\r\n.\r\nQUIT\r\n")  # fmt: skip
    r = subprocess.run([str(BIN / "sendmail"), "-bs"], input=smtp, env=env,
                       capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"\r\n250 ok " in r.stdout
    assert list((null_client.queue / "todo").iterdir()) == []
    got = sorted(rcpts for _, rcpts, _ in queued(home))
    assert got == [(b"a@test.example", b"b@test.example"), (b"c@test.example",)]


def test_per_ip_limit_closes_the_extra_connection(home: Home) -> None:
    srv = QmqpServer(home, ControlCache(home), InProcessSubmitter(home), max_per_ip=1)
    lst = Listener(srv)
    try:
        with socket.create_connection(("127.0.0.1", lst.port), timeout=10) as first:
            first.sendall(b"100:")  # holds its slot, mid-request
            second = exchange(lst.port, request(b"A\n", b"s", [b"a"]))
            assert second == b""  # closed at once: the address is at its limit
            with socket.create_connection(("127.0.0.1", lst.port), 10, ("127.0.0.2", 0)) as s:
                s.sendall(request(b"A\n", b"s", [b"a"]))  # another address is served
                assert b":Kok " in s.recv(1000)
    finally:
        lst.close()


def _from(src: str, port: int, data: bytes) -> bytes:
    """``data`` to the listener on ::1 from the local address ``src``; all it answered."""
    out = b""
    with socket.create_connection(("::1", port), 10, (src, 0)) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    return out


def test_without_rules_only_loopback_clients_are_served(
    home: Home, lo_addresses: LoAddresses
) -> None:
    assert not (home.control / "tcp.qmqp.cdb").exists()
    outsider = lo_addresses.v6(1, 1)
    lst = Listener(QmqpServer(home, ControlCache(home), InProcessSubmitter(home)), "::1")
    try:
        req = request(b"Subject: relay\n\nhi\n", b"s@x.example", [b"victim@y.example"])
        assert _from(outsider, lst.port, req) == b""  # closed without a word, as tcpserver
        assert queued(home) == []
        assert [f for f in (home.queue / "mess").rglob("*") if f.is_file()] == []
        assert b":Kok " in _from("::1", lst.port, req)
        assert len(queued(home)) == 1
    finally:
        lst.close()
    # the rules file, once there, decides: the same outsider is served
    rules = io.BytesIO(b":allow\n")
    tcprules.compile_cdb(rules, home.control / "tcp.qmqp.cdb", home.control / "tcp.qmqp.tmp")
    lst = Listener(QmqpServer(home, ControlCache(home), InProcessSubmitter(home)), "::1")
    try:
        req = request(b"Subject: ok\n\nhi\n", b"s@x.example", [b"a@y.example"])
        assert b":Kok " in _from(outsider, lst.port, req)
    finally:
        lst.close()


def test_per_ip_limit_counts_an_ipv6_64_as_one_client(
    home: Home, lo_addresses: LoAddresses
) -> None:
    rules = io.BytesIO(b":allow\n")
    tcprules.compile_cdb(rules, home.control / "tcp.qmqp.cdb", home.control / "tcp.qmqp.tmp")
    a1, a2, b1 = lo_addresses.v6(1, 1), lo_addresses.v6(1, 2), lo_addresses.v6(2, 1)
    srv = QmqpServer(home, ControlCache(home), InProcessSubmitter(home), max_per_ip=1)
    lst = Listener(srv, "::1")
    req = request(b"A\n", b"s", [b"a"])
    try:
        with socket.create_connection(("::1", lst.port), 10, (a1, 0)) as first:
            first.sendall(b"100:")  # holds the /64's one slot, mid-request
            assert _from(a2, lst.port, req) == b""  # same /64, other address: closed
            assert b":Kok " in _from(b1, lst.port, req)  # the next /64 is served
    finally:
        lst.close()


def test_100mb_body_is_streamed_by_qmail_qmqpd(home: Home) -> None:
    size = 100 * 1024 * 1024
    env = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(home.root), "PYQMAIL_SINGLE_USER": "1",
           "TCPREMOTEIP": "127.0.0.1"}  # fmt: skip
    proc = subprocess.Popen([str(BIN / "qmail-qmqpd")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    envelope = encode(b"s@x.example") + encode(b"r@y.example")
    proc.stdin.write(b"%d:%d:" % (len(b"%d:" % size) + size + 1 + len(envelope), size))
    chunk = (b"y" * 1023 + b"\n") * 64
    for _ in range(size // len(chunk)):
        proc.stdin.write(chunk)
    proc.stdin.write(b"," + envelope + b",")
    # The server's own peak (VmHWM: per address space; ru_maxrss would carry the size of
    # this forking pytest process), read once the whole body has been taken in.
    peak = _vm_hwm_kb(proc.pid)
    proc.stdin.close()
    reply = proc.stdout.read()
    assert proc.wait() == 0
    assert b":Kok " in reply
    [(_, _, mess)] = queued(home)
    assert len(mess) > size
    assert peak < 80 * 1024  # KB: the body never sat in memory whole


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_connect_timeout_is_72() -> None:
    """A server whose accept queue is full drops our SYN: qmail-qmqpc's 72."""
    import io

    from pyqmail.queue.qmqpc import send_request

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        held = []
        for _ in range(4):  # fill the accept queue; nobody accepts
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            held.append(c)
        try:
            code, text = send_request([("127.0.0.1", port)], io.BytesIO(b"x\n"), 2, b"s", [b"r"],
                                      connect_timeout=0.5, timeout=1)  # fmt: skip
        finally:
            for c in held:
                c.close()
    # Linux drops a SYN while the accept queue is full (syncookies or not), so the connect
    # times out rather than completing.
    assert (code, text) == (72, "connection to 127.0.0.1 timed out")


@pytest.mark.parametrize(
    ("data", "code", "reply_start"),
    [
        (request(b"A\n", b"s", [b"r"]), 0, b":Kok "),
        (request(b"A\n", b"s", []), 0, b":Dsorry, a message needs"),
        (b"x:", 100, None),
        (b"300000000:", 111, b":Dsorry, that message size exceeds"),
        (request(b"A\n", b"s", [b"r"])[:-3], 0, None),
    ],
)
def test_serve_stdio(home: Home, data: bytes, code: int, reply_start: bytes | None) -> None:
    import io

    from pyqmail.smtp.qmqpd import serve_stdio

    out = io.BytesIO()
    env = {"TCPREMOTEIP": "10.0.0.9", "TCPLOCALHOST": "mx.test.example"}
    assert serve_stdio(io.BytesIO(data), out, InProcessSubmitter(home), env) == code
    if reply_start is None:
        assert out.getvalue() == b""
    else:
        assert reply_start in out.getvalue()
    assert list((home.queue / "pid").iterdir()) == []
    assert len(queued(home)) == (1 if reply_start == b":Kok " else 0)


def test_stdio_passes_a_filters_custom_text(home: Home, tmp_path: Path) -> None:
    """qmail-qmqpd answers an exit-82 QMAILQUEUE's fd-6 text as its D/Z reply."""
    qq = tmp_path / "qq"
    qq.write_text("#!/bin/sh\ncat >/dev/null\nprintf %s 'Dspam, go away' >&6\nexit 82\n")
    qq.chmod(0o755)
    out = io.BytesIO()
    req = io.BytesIO(request(b"Subject: x\n\nbody\n", b"a@b.example", [b"c@d.example"]))
    serve_stdio(req, out, ProgramSubmitter(home, str(qq)), {"TCPREMOTEIP": "127.0.0.1"})
    assert decode_one(out.getvalue())[0] == b"Dspam, go away"
