"""The front door over real sockets: block lists against a real DNS server (Debian's
dnsmasq on loopback), RBLSMTPD from tcprules, a silent DNS server, the connection limits
from control files, and greylisting; in the listener and in qmail-smtpd on stdio."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pyqmail import tcprules
from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.queue import submit as qsubmit
from pyqmail.resolver import make_resolver
from pyqmail.smtp import replies
from pyqmail.smtp.server import SmtpServer
from tests.conftest import dnsmasq_server, require_tools, write_control
from tests.integration.test_smtpd_listener import Raw
from tests.integration.test_smtpd_stdio import run as run_stdio

RECORDS = [
    "--host-record=2.0.0.127.bl.test,127.0.0.2",
    "--host-record=4.0.0.127.bl.test,127.0.0.2",
    "--host-record=6.0.0.127.bl.test,127.0.0.2",
    "--host-record=9.2.0.192.bl.test,127.0.0.2",
    "--host-record=3.0.0.127.err.test,127.255.255.254",  # "you may not query": not a listing
    "--txt-record=2.0.0.127.txt.test,listed by txt.test",
]


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_tools("dnsmasq")
    with dnsmasq_server(tmp_path_factory.mktemp("dnsmasq"), RECORDS, "2.0.0.127.bl.test") as spec:
        yield spec


class Listener:
    """An SmtpServer in an event loop of its own thread; the test talks over sockets."""

    def __init__(self, home: Home, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[SmtpServer, asyncio.AbstractServer]:
            srv = SmtpServer(home, ControlCache(home), qsubmit.submitter(home),
                             commit_process=False, control_ttl=0, **kw)  # fmt: skip
            return srv, await srv.start("127.0.0.1", 0)

        self.srv, self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(20)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def client(self, source: str = "127.0.0.3") -> Raw:
        return Raw(self.port, source=source)

    def wait_conns(self, n: int) -> None:
        """Until the server counts ``n`` connections (it sees a close a moment after it)."""

        async def until() -> None:
            while self.srv.conns != n:
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(asyncio.wait_for(until(), 10), self.loop).result(20)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.srv.aclose()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(20)
        self.loop.close()


@pytest.fixture
def listen(home: Home, dnsmasq: str) -> Iterator[Any]:
    made: list[Listener] = []
    write_control(home, "rcpthosts", "test.example\n")

    def start(**kw: Any) -> Listener:
        kw.setdefault("resolver", make_resolver(dnsmasq, lifetime=5))
        kw.setdefault("limits_from_control", True)  # as pyqmail run's listener
        made.append(Listener(home, **kw))
        return made[-1]

    yield start
    for lst in made:
        lst.close()


def rules(home: Home, text: str) -> None:
    lines = text.encode().splitlines(keepends=True)
    tcprules.compile_cdb(lines, home.control / "tcp.smtp.cdb", home.control / "tcp.tmp")


def conversation(c: Raw) -> list[bytes]:
    """Greeting, EHLO, MAIL, RCPT, QUIT: the last line of each reply."""
    out = [c.reply()[1]]
    for line in (b"EHLO client.example", b"MAIL FROM:<a@b.example>",
                 b"RCPT TO:<x@test.example>", b"QUIT"):  # fmt: skip
        out.append(c.cmd(line)[1])
    c.close()
    return [r.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1] for r in out]


def test_a_listed_client_gets_rblsmtpds_refusal(home: Home, listen: Any) -> None:
    write_control(home, "rbllist", "bl.test:Blocked %IP% by bl.test\n")
    lst = listen()
    assert conversation(lst.client("127.0.0.2")) == [
        b"220 rblsmtpd.local", b"250 rblsmtpd.local", b"250 rblsmtpd.local",
        b"451 Blocked 127.0.0.2 by bl.test", b"221 rblsmtpd.local",
    ]  # fmt: skip
    assert conversation(lst.client("127.0.0.3"))[3] == b"250 ok"  # not listed


def test_a_txt_list_gives_its_text_and_error_codes_list_nobody(home: Home, listen: Any) -> None:
    write_control(home, "rbllist", "err.test:Blocked\ntxt.test\n")
    lst = listen()
    assert conversation(lst.client("127.0.0.2"))[3] == b"451 listed by txt.test"
    assert conversation(lst.client("127.0.0.3"))[3] == b"250 ok"  # 127.255.255.254


def test_rblsmtpd_from_tcprules_and_relay_clients(home: Home, listen: Any) -> None:
    write_control(home, "rbllist", "bl.test:Blocked\n")
    rules(home, '127.0.0.2:allow,RBLSMTPD=""\n127.0.0.4:allow,RBLSMTPD="-Go away"\n'
                '127.0.0.5:allow,RBLSMTPD="Slow down"\n127.0.0.6:allow,RELAYCLIENT=""\n'
                ":allow\n")  # fmt: skip
    lst = listen()
    assert conversation(lst.client("127.0.0.2"))[3] == b"250 ok"  # listed, RBLSMTPD=""
    assert conversation(lst.client("127.0.0.4"))[3] == b"553 Go away"
    assert conversation(lst.client("127.0.0.5"))[3] == b"451 Slow down"  # not even listed
    assert conversation(lst.client("127.0.0.6"))[3] == b"250 ok"  # listed, but relays


def test_a_silent_dns_server_delays_only_its_client(home: Home, listen: Any) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reads nothing, answers nothing
    silent.bind(("127.0.0.1", 0))
    try:
        spec = f"127.0.0.1:{silent.getsockname()[1]}"
        write_control(home, "rbllist", "bl.test:Blocked\n")
        rules(home, '127.0.0.6:allow,RELAYCLIENT=""\n:allow\n')
        lst = listen(resolver=make_resolver(spec, lifetime=30), rbl_timeout=2.0)
        started = time.monotonic()
        waiting = lst.client("127.0.0.2")
        other = lst.client("127.0.0.6")
        assert other.reply()[0] == 220  # served while the other one's lookup hangs
        assert other.cmd(b"QUIT")[0] == 221
        assert waiting.reply() == (220, b"220 mx.test.example ESMTP\r\n")  # fails open
        assert time.monotonic() - started >= 1.9
        waiting.close()
    finally:
        silent.close()


def test_concurrencyincoming_refuses_the_third_and_a_freed_slot_serves(
    home: Home, listen: Any
) -> None:
    write_control(home, "concurrencyincoming", "2\n")
    lst = listen()
    c1, c2 = lst.client(), lst.client()
    assert c1.reply()[0] == 220 and c2.reply()[0] == 220
    c3 = lst.client()
    assert c3.reply() == (421, replies.TOO_MANY_CONNS)
    assert c3.closed()
    assert c1.cmd(b"QUIT")[0] == 221 and c1.closed()
    c1.close()
    lst.wait_conns(1)  # the server has seen c1 go
    c4 = lst.client()
    assert c4.reply()[0] == 220
    # the file is read again: a third slot
    write_control(home, "concurrencyincoming", "3\n")
    c5 = lst.client()
    assert c5.reply()[0] == 220
    for c in (c2, c3, c4, c5):
        c.close()


def test_concurrencyperip_counts_each_client(home: Home, listen: Any) -> None:
    write_control(home, "concurrencyperip", "1\n")
    lst = listen(limit_loopback=True)
    a = lst.client("127.0.0.3")
    assert a.reply()[0] == 220
    assert lst.client("127.0.0.3").reply()[0] == 421
    b = lst.client("127.0.0.4")
    assert b.reply()[0] == 220
    a.close()
    b.close()


def test_greylisting_in_the_listener(home: Home, listen: Any) -> None:
    write_control(home, "greylist", "1\n")
    rules(home, '127.0.0.6:allow,RELAYCLIENT=""\n:allow\n')
    lst = listen()
    first = time.monotonic()
    assert conversation(lst.client())[3].startswith(b"451 4.7.1 ")
    assert conversation(lst.client())[3].startswith(b"451 4.7.1 ")  # retried at once
    assert conversation(lst.client("127.0.0.6"))[3] == b"250 ok"  # a relay client
    time.sleep(max(0.0, first + 1.05 - time.monotonic()))  # the delay itself is under test
    assert conversation(lst.client())[3] == b"250 ok"
    assert (home.root / "greylist" / "greylist.sqlite").is_file()


def test_qmail_smtpd_takes_rblsmtpd_from_tcpserver(home: Home) -> None:
    out, _ = run_stdio(home, b"HELO x\r\nRCPT TO:<x@test.example>\r\nQUIT\r\n",
                       {"RBLSMTPD": "-Go away"})  # fmt: skip
    assert (
        out == b"220 rblsmtpd.local\r\n250 rblsmtpd.local\r\n553 Go away\r\n221 rblsmtpd.local\r\n"
    )


def test_qmail_smtpd_looks_up_rbllist(home: Home, dnsmasq: str) -> None:
    write_control(home, "rbllist", "bl.test:Blocked %IP%\n")
    script = b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nQUIT\r\n"
    out, _ = run_stdio(home, script, {"PYQMAIL_RESOLVER": dnsmasq})  # as 192.0.2.9
    assert b"451 Blocked 192.0.2.9\r\n" in out and out.startswith(b"220 rblsmtpd.local")
    write_control(home, "rbllist", "err.test:Blocked %IP%\n")  # 192.0.2.9 is not in it
    out, _ = run_stdio(home, script, {"PYQMAIL_RESOLVER": dnsmasq})
    assert out.startswith(b"220 mx.test.example ESMTP")


def test_qmail_smtpd_greylists(home: Home) -> None:
    write_control(home, "rcpthosts", "test.example\n")
    write_control(home, "greylist", "600\n")
    script = b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nQUIT\r\n"
    out, _ = run_stdio(home, script)
    assert replies.GREYLISTED in out
    out, _ = run_stdio(home, script, {"RELAYCLIENT": ""})
    assert replies.GREYLISTED not in out and b"250 ok\r\n250 ok\r\n" in out


def test_smtpd_listen_keeps_its_own_limits(home: Home, listen: Any) -> None:
    write_control(home, "concurrencyincoming", "1\n")  # for pyqmail run, not this one
    lst = listen(limits_from_control=False, max_conns=2)
    c1, c2 = lst.client(), lst.client()
    assert c1.reply()[0] == 220 and c2.reply()[0] == 220
    assert lst.client().reply()[0] == 421
    c1.close()
    c2.close()
