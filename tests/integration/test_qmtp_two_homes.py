"""QMTP between two pyqmail homes: a message queued on A is delivered by deliver_qmtp to
B's QmtpServer; per-recipient results, pipelining, databytes, and qmail-qmtpd on stdio."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.netstring import decode_all, encode
from pyqmail.outcome import Status
from pyqmail.queue.submit import InProcessSubmitter
from pyqmail.remote.qmtp import deliver_qmtp
from pyqmail.smtp.qmtpd import QmtpServer
from tests.integration.test_qmqp_server import Listener, exchange, queued

BIN = Path(sys.executable).parent


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Home, Home, Listener]]:
    a = Home(tmp_path / "a", single_user=True)
    create_home(a, "a.test.example", None)
    b = Home(tmp_path / "b", single_user=True)
    create_home(b, "b.test.example", None)
    (b.control / "rcpthosts").write_text("b.test.example\n")
    lst = Listener(QmtpServer(b, ControlCache(b), InProcessSubmitter(b)))
    yield a, b, lst
    lst.close()


def queue_on_a(a: Home, body: bytes) -> Path:
    p = InProcessSubmitter(a).begin()
    p.write(body)
    n = p.commit_blocking(b"s@a.test.example", [b"x@b.test.example"]).msgnum
    from pyqmail.queue.layout import QueuePaths

    return QueuePaths(a.queue).mess(n)


def test_deliver_between_two_homes(hosts: tuple[Home, Home, Listener]) -> None:
    a, b, lst = hosts
    mess = queue_on_a(a, b"Subject: qmtp\n\nline one\nline two\n")
    rcpts = ["u1@b.test.example", "u2@elsewhere.example", "u3@b.test.example", "x" * 1000]
    out = asyncio.run(deliver_qmtp("127.0.0.1", lst.port, mess, "s@a.test.example", rcpts))
    assert [o.status for o in out] == [Status.OK, Status.PERM, Status.OK, Status.PERM]
    assert out[0].text.startswith("127.0.0.1 accepted message./Remote host said: ok ")
    assert "isn't in my list of allowed rcpthosts (#5.7.1)" in out[1].text
    assert "can't handle that recipient (#5.1.3)" in out[3].text
    [(sender, got, stored)] = queued(b)
    assert sender == b"s@a.test.example"
    assert got == (b"u1@b.test.example", b"u3@b.test.example")
    assert b"\n  by b.test.example with QMTP; " in stored
    assert stored.endswith(mess.read_bytes())  # A's Received line and the message, unchanged


def test_client_connection_refused_is_temporary(tmp_path: Path, home: Home) -> None:
    mess = tmp_path / "m"
    mess.write_bytes(b"x\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out = asyncio.run(deliver_qmtp("127.0.0.1", dead, mess, "s", ["a", "b"], (5, 5)))
    assert [o.status for o in out] == [Status.TEMP, Status.TEMP]
    assert "wasn't able to establish a QMTP connection" in out[0].text


def msg(body: bytes, sender: bytes, rcpts: list[bytes], mode: bytes = b"\n") -> bytes:
    return encode(mode + body) + encode(sender) + encode(b"".join(encode(r) for r in rcpts))


def test_pipelined_messages_one_connection(hosts: tuple[Home, Home, Listener]) -> None:
    _, b, lst = hosts
    data = msg(b"A\n", b"s", [b"a@b.test.example"]) + msg(
        b"B\r\nlone\rcr\r\n", b"", [b"b@b.test.example", b"c@b.test.example"], b"\r"
    )
    replies = decode_all(exchange(lst.port, data))
    assert len(replies) == 3 and all(r.startswith(b"Kok ") for r in replies)
    stored = queued(b)
    assert len(stored) == 2
    bodies = sorted(m.split(b"QMTP; ")[1].split(b"\n", 1)[1] for _, _, m in stored)
    assert bodies == [b"A\n", b"B\nlone\rcr\n"]


def test_databytes_and_bad_sender(hosts: tuple[Home, Home, Listener]) -> None:
    _, b, lst = hosts
    (b.control / "databytes").write_text("10\n")
    too_big = exchange(lst.port, msg(b"x" * 11, b"s", [b"a@b.test.example"]))
    assert decode_all(too_big) == [b"Dsorry, that message size exceeds my databytes limit (#5.3.4)"]
    exact = decode_all(exchange(lst.port, msg(b"x" * 9 + b"\n", b"s", [b"a@b.test.example"])))
    assert exact[0].startswith(b"Kok ")
    bad = decode_all(exchange(lst.port, msg(b"x\n", b"s" * 1000, [b"a@b.test.example"])))
    assert bad == [b"Dunacceptable sender (#5.1.7)"]
    assert len(queued(b)) == 1
    assert list((b.queue / "pid").iterdir()) == []


@pytest.mark.parametrize("data", [encode(b"") + encode(b"s") + encode(encode(b"a")),
                                  encode(b"Xbody") + encode(b"s") + encode(encode(b"a")),
                                  b"1x:", b"99:\nshort"])  # fmt: skip
def test_bad_input_closes_quietly(hosts: tuple[Home, Home, Listener], data: bytes) -> None:
    _, b, lst = hosts
    assert exchange(lst.port, data) == b""
    assert queued(b) == []
    assert list((b.queue / "pid").iterdir()) == []


def test_qmail_qmtpd_on_stdio(hosts: tuple[Home, Home, Listener]) -> None:
    _, b, _ = hosts
    env = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(b.root), "PYQMAIL_SINGLE_USER": "1",
           "TCPREMOTEIP": "10.1.2.3", "TCPREMOTEHOST": "peer.example", "TCPLOCALIP": "10.0.0.1",
           "RELAYCLIENT": ""}  # fmt: skip
    data = msg(b"Subject: s\r\n\r\nbody\r\n", b"s@x", [b"any@where.example"], b"\r")
    r = subprocess.run([str(BIN / "qmail-qmtpd")], input=data, env=env, capture_output=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    [reply] = decode_all(r.stdout)
    assert reply.startswith(b"Kok ")
    [(_, rcpts, stored)] = queued(b)
    assert rcpts == (b"any@where.example",)
    assert b"Received: from peer.example (10.1.2.3)\n  by 10.0.0.1 with QMTP; " in stored
    assert stored.endswith(b"\nSubject: s\n\nbody\n")
    bad = subprocess.run([str(BIN / "qmail-qmtpd")], input=b"1x:", env=env, timeout=60)
    assert bad.returncode == 100


def test_qmtproutes_syntax(home: Home) -> None:
    from pyqmail.control import load
    from pyqmail.remote.qmtp import qmtp_route

    (home.control / "qmtproutes").write_text(
        "b.example:10.0.0.2\n.sub.example:relay.example:2209\nno.sub.example:\n"
        "v6.example:[::1]\n:10.9.9.9\n"
    )
    ctl = load(home)
    got = {h: qmtp_route(ctl, h) for h in ("b.example", "x.sub.example", "no.sub.example",
                                           "v6.example", "other.example")}  # fmt: skip
    assert (got["b.example"].relay, got["b.example"].port) == ("10.0.0.2", 209)
    assert (got["x.sub.example"].relay, got["x.sub.example"].port) == ("relay.example", 2209)
    assert got["no.sub.example"] is None  # "domain:" = no QMTP route: SMTP as usual
    assert (got["v6.example"].relay, got["v6.example"].port) == ("::1", 209)
    assert got["other.example"].relay == "10.9.9.9"  # the default route
    (home.control / "qmtproutes").unlink()
    assert qmtp_route(load(home), "b.example") is None


def test_deliver_route_tries_each_address(hosts: tuple[Home, Home, Listener]) -> None:
    from pyqmail.remote.qmtp import deliver_route
    from pyqmail.remote.routes import Route

    a, b, lst = hosts
    mess = queue_on_a(a, b"Subject: routed\n\nx\n")
    dead_ip = "127.0.0.2"  # the listener is bound to 127.0.0.1 only: refused here
    route = Route("b.test.example", lst.port)
    out = asyncio.run(deliver_route(route, [dead_ip, "127.0.0.1"], mess, "s@a.test.example",
                                    ["u@b.test.example"], (5, 5)))  # fmt: skip
    assert [o.status for o in out] == [Status.OK]
    assert len(queued(b)) == 1


def test_qmtp_serve_stdio_in_process(home: Home) -> None:
    import io

    from pyqmail.control import load
    from pyqmail.smtp.qmtpd import QmtpPolicy, serve_stdio

    (home.control / "rcpthosts").write_text("mx.test.example\n")
    policy = QmtpPolicy(load(home), {}, None)
    data = msg(b"A\n", b"s", [b"a@mx.test.example", b"b@far.example"]) + msg(b"B\n", b"", [b"c"])
    out = io.BytesIO()
    env = {"TCPREMOTEIP": "10.0.0.9"}
    assert serve_stdio(io.BytesIO(data), out, InProcessSubmitter(home), policy, env) == 0
    replies = decode_all(out.getvalue())
    assert [r[:1] for r in replies] == [b"K", b"D", b"K"]
    assert len(queued(home)) == 2
    assert (
        serve_stdio(io.BytesIO(b"1x:"), io.BytesIO(), InProcessSubmitter(home), policy, env) == 100
    )
