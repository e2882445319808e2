"""RemoteAgent against real loopback peers: every failure mode, one outcome per recipient."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.remote.tcpto import Tcpto
from tests.conftest import free_port, write_control
from tests.integration.test_remote_peers import Peer, Script

MSG = b"From: a@test.example\nSubject: hi\n\nline one\n.dot line\nX\r.\nline after\n"


@pytest.fixture
def mess(tmp_path: Path) -> Path:
    p = tmp_path / "mess"
    p.write_bytes(MSG)
    return p


def route(home: Home, port: int, extra: str = "") -> None:
    write_control(home, "smtproutes", f"remote.example:127.0.0.1:{port}\n{extra}")


def deliver(
    home: Home, script: Script, mess: Path, rcpts: list[str] | None = None
) -> tuple[list[Outcome], Peer]:
    async def run() -> tuple[list[Outcome], Peer]:
        async with Peer(script) as peer:
            route(home, peer.port)
            agent = RemoteAgent(home, ControlCache(home))
            outs = await agent.deliver(mess, "a@test.example", rcpts or ["ok@remote.example"])
            await agent.close()
        return outs, peer

    return asyncio.run(run())


def test_delivered_with_the_bytes_on_the_wire(home: Home, mess: Path) -> None:
    (o,), peer = deliver(home, Script(), mess)
    assert o.status is Status.OK
    assert o.text == "127.0.0.1 accepted message.\nRemote host said: 250 ok: queued\n"
    ((sender, rcpts, body),) = peer.messages
    assert sender == b"<a@test.example>" and rcpts == [b"ok@remote.example"]
    assert body == (
        b"From: a@test.example\r\nSubject: hi\r\n\r\nline one\r\n..dot line\r\nX\r\n..\r\n"
        b"line after\r\n"
    )
    assert peer.commands[0] == b"EHLO mx.test.example\r\n"  # helohost defaults to me
    assert peer.commands[-1] == b"QUIT\r\n"


def test_one_connection_for_all_recipients_with_results_each(home: Home, mess: Path) -> None:
    def rcpt(addr: bytes) -> bytes:
        if addr.startswith(b"bad"):
            return b"550 5.1.1 no such user\r\n"
        if addr.startswith(b"later"):
            return b"451 4.2.0 greylisted\r\n"
        return b"250 ok\r\n"

    rcpts = ["a@remote.example", "bad@remote.example", "later@remote.example", "b@remote.example"]
    outs, peer = deliver(home, Script(rcpt=rcpt), mess, rcpts)
    assert peer.connections == 1
    assert [o.status for o in outs] == [Status.OK, Status.PERM, Status.TEMP, Status.OK]
    # each refused recipient's text is its own qmail-remote run's: ending "Giving up"
    assert outs[1].text == (
        "127.0.0.1 does not like recipient.\nRemote host said: 550 5.1.1 no such user\n"
        "Giving up on 127.0.0.1.\n"
    )
    assert outs[2].text == (
        "127.0.0.1 does not like recipient.\nRemote host said: 451 4.2.0 greylisted\n"
        "Giving up on 127.0.0.1.\n"
    )
    assert outs[0].text == "127.0.0.1 accepted message.\nRemote host said: 250 ok: queued\n"
    assert peer.messages[0][1] == [b"a@remote.example", b"b@remote.example"]


def test_connection_refused(home: Home, mess: Path) -> None:
    route(home, free_port())
    agent = RemoteAgent(home, ControlCache(home))
    outs = asyncio.run(agent.deliver(mess, "a@x", ["1@remote.example", "2@remote.example"]))
    assert (
        outs
        == [Outcome.temp("Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n")] * 2
    )


def test_address_marked_down_in_tcpto_is_skipped(home: Home, mess: Path) -> None:
    t = Tcpto(home.queue / "lock" / "tcpto", clock=lambda: time.time() - 200)
    t.record("127.0.0.1", True)
    Tcpto(home.queue / "lock" / "tcpto").record("127.0.0.1", True)
    (o,), peer = deliver(home, Script(), mess)
    assert o.text == "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
    assert peer.connections == 0


def test_connect_timeout_is_recorded_in_tcpto(home: Home, mess: Path) -> None:
    # 192.0.2.1 (TEST-NET) is never contacted: an unroutable connect needs a real network.
    # A timeout is simulated by a listener whose backlog is full, on loopback.
    import socket

    write_control(home, "timeoutconnect", "1\n")
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    port = lst.getsockname()[1]
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        route(home, port)
        agent = RemoteAgent(home, ControlCache(home))
        (o,) = asyncio.run(agent.deliver(mess, "a@x", ["b@remote.example"]))
    finally:
        for c in fillers:
            c.close()
        lst.close()
    assert o.status is Status.TEMP
    entries = agent.tcpto.entries()
    assert [(e.ip, e.count) for e in entries] == [("127.0.0.1", 1)]


def test_accept_then_silence_times_out(home: Home, mess: Path) -> None:
    write_control(home, "timeoutremote", "1\n")
    (o,), _ = deliver(home, Script(silent=True), mess)
    assert o == Outcome.temp("Connected to 127.0.0.1 but connection died. (#4.4.2)\n")


def test_421_greeting(home: Home, mess: Path) -> None:
    (o,), peer = deliver(home, Script(greeting=b"421 4.3.2 too busy\r\n"), mess)
    assert o == Outcome.temp(
        "Connected to 127.0.0.1 but greeting failed.\nRemote host said: 421 4.3.2 too busy\n"
    )
    assert peer.messages == []


@pytest.mark.parametrize(
    ("reply", "status"), [(b"451 4.3.0 later\r\n", Status.TEMP), (b"553 5.7.1 no\r\n", Status.PERM)]
)
def test_mail_rejected(home: Home, mess: Path, reply: bytes, status: Status) -> None:
    outs, peer = deliver(home, Script(mail=reply), mess, ["a@remote.example", "b@remote.example"])
    assert [o.status for o in outs] == [status, status]
    assert outs[0].text.startswith("Connected to 127.0.0.1 but sender was rejected.\n")
    assert peer.messages == []


def test_all_recipients_rejected_gives_up(home: Home, mess: Path) -> None:
    outs, peer = deliver(home, Script(rcpt=lambda a: b"550 no\r\n"), mess, ["a@remote.example"])
    assert outs[0] == Outcome.perm(
        "127.0.0.1 does not like recipient.\nRemote host said: 550 no\n"
        "Giving up on 127.0.0.1.\n"  # as notqmail: the reply was reported with the recipient
    )
    assert peer.messages == []


@pytest.mark.parametrize(
    ("reply", "status"), [(b"451 4.3.0 later\r\n", Status.TEMP), (b"554 5.5.1 no\r\n", Status.PERM)]
)
def test_data_rejected(home: Home, mess: Path, reply: bytes, status: Status) -> None:
    (o,), peer = deliver(home, Script(data=reply), mess)
    assert o.status is status
    assert o.text.startswith("127.0.0.1 failed on DATA command.\n")
    assert peer.messages == []


@pytest.mark.parametrize(
    ("reply", "status"),
    [(b"452 4.3.1 full\r\n", Status.TEMP), (b"552 5.3.4 too big\r\n", Status.PERM)],
)
def test_rejected_after_data(home: Home, mess: Path, reply: bytes, status: Status) -> None:
    (o,), _ = deliver(home, Script(after=reply), mess)
    assert o.status is status
    assert o.text == "127.0.0.1 failed after I sent the message.\nRemote host said: " + (
        reply.decode().replace("\r", "")
    )


def test_dropped_mid_data_is_temporary_and_not_a_duplicate(home: Home, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"Subject: big\n\n" + b"x" * 999 + b"\n" + (b"y" * 1000 + b"\n") * 4000)
    (o,), _ = deliver(home, Script(drop_mid_data=True), big)
    assert o.status is Status.TEMP
    assert o.text.startswith("Connected to 127.0.0.1 but connection died.")
    assert "(#4.4.2)" in o.text


def test_dropped_after_the_dot_is_a_possible_duplicate(home: Home, mess: Path) -> None:
    (o,), peer = deliver(home, Script(after=None), mess)
    assert len(peer.messages) == 0
    assert o == Outcome.temp(
        "Connected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)\n"
    )


def test_ten_megabyte_reply_line(home: Home, mess: Path) -> None:
    huge = b"550 " + b"x" * 10_000_000 + b"\r\n"
    (o,), _ = deliver(home, Script(rcpt=lambda a: huge), mess)
    assert o.status is Status.PERM
    said = o.text.split("Remote host said: ")[1]
    assert said == "550 " + "x" * 4996 + "Giving up on 127.0.0.1.\n"  # capped at 5000


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        (Script(greeting=b"hello there\r\n"), "greeting failed"),
        (Script(after=b"ok thanks\r\n"), "failed after I sent the message"),
        (Script(after=b"\r\n"), "failed after I sent the message"),
        (Script(rcpt=lambda a: b"2\r\n"), "does not like recipient"),
    ],
)
def test_malformed_replies_are_temporary_never_delivered(
    home: Home, mess: Path, script: Script, expect: str
) -> None:
    (o,), _ = deliver(home, script, mess)
    assert o.status is Status.TEMP
    assert expect in o.text


def test_ehlo_rejected_uses_helo(home: Home, mess: Path) -> None:
    write_control(home, "helohost", "out.test.example\n")
    (o,), peer = deliver(home, Script(ehlo=b"500 what is EHLO\r\n"), mess)
    assert o.status is Status.OK
    assert peer.commands[:2] == [b"EHLO out.test.example\r\n", b"HELO out.test.example\r\n"]


def test_no_pipelining_when_not_offered(home: Home, mess: Path) -> None:
    (o,), peer = deliver(home, Script(ehlo=b"250 peer.test\r\n"), mess)
    assert o.status is Status.OK
    assert [c.split(b":")[0] for c in peer.commands[1:4]] == [b"MAIL FROM", b"RCPT TO", b"DATA\r\n"]


def test_unreadable_message_is_temporary(home: Home, tmp_path: Path) -> None:
    agent = RemoteAgent(home, ControlCache(home))
    (o,) = asyncio.run(agent.deliver(tmp_path / "nope", "a@x", ["b@remote.example"]))
    assert o == Outcome.temp("Unable to read message. (#4.3.0)\n")


def test_no_me_no_helohost_is_temporary(home: Home, mess: Path) -> None:
    os.unlink(home.control / "me")
    (o,), _ = deliver(home, Script(), mess)
    assert o == Outcome.temp("Unable to read control files. (#4.3.0)\n")


def test_outgoing_source_address(home: Home, mess: Path) -> None:
    write_control(home, "outgoingip", "127.0.0.2\n")
    (o,), peer = deliver(home, Script(), mess)
    assert o.status is Status.OK
    assert peer.clients == ["127.0.0.2"]


def test_unusable_source_address_is_no_connection(home: Home, mess: Path) -> None:
    write_control(home, "outgoingip", "192.0.2.200\n")  # not ours: bind fails, nothing sent
    (o,), peer = deliver(home, Script(), mess)
    assert o == Outcome.temp("Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n")
    assert peer.connections == 0


def test_control_changes_are_seen_after_the_ttl(home: Home, mess: Path) -> None:
    now = [100.0]

    async def go() -> tuple[Status, Status, Status]:
        async with Peer(Script()) as peer:
            route(home, peer.port)
            agent = RemoteAgent(home, ControlCache(home), control_ttl=1.0, clock=lambda: now[0])
            (a,) = await agent.deliver(mess, "a@x", ["b@remote.example"])
            route(home, free_port())  # now to a dead port
            now[0] += 0.9
            (b,) = await agent.deliver(mess, "a@x", ["b@remote.example"])  # within the ttl
            now[0] += 0.2
            (c,) = await agent.deliver(mess, "a@x", ["b@remote.example"])
            await agent.close()
        return a.status, b.status, c.status

    assert asyncio.run(go()) == (Status.OK, Status.OK, Status.TEMP)


def test_kept_connection_carries_the_next_messages(home: Home, mess: Path) -> None:
    async def go() -> tuple[list[Status], Peer, int]:
        async with Peer(Script()) as peer:
            route(home, peer.port)
            agent = RemoteAgent(home, ControlCache(home))
            got = []
            for i in range(5):
                (o,) = await agent.deliver(mess, "a@x", [f"u{i}@remote.example"])
                got.append(o.status)
            kept = len(agent.pool)
            await agent.close()
        return got, peer, kept

    got, peer, kept = asyncio.run(go())
    assert got == [Status.OK] * 5 and kept == 1
    assert peer.connections == 1 and len(peer.messages) == 5
    assert [c for c in peer.commands if c.startswith(b"EHLO")] == [b"EHLO mx.test.example\r\n"]
    assert peer.commands[-1] == b"QUIT\r\n"  # close() says goodbye


@pytest.mark.parametrize("how", ["close", "421"])
def test_dead_kept_connection_falls_back_to_a_new_one(home: Home, mess: Path, how: str) -> None:
    async def go() -> tuple[list[Status], Peer]:
        async with Peer(Script()) as peer:
            route(home, peer.port)
            agent = RemoteAgent(home, ControlCache(home))
            (a,) = await agent.deliver(mess, "a@x", ["u1@remote.example"])
            # the server ends the idle connection on its side
            for w in list(peer._writers):
                if how == "421":
                    w.write(b"421 4.4.2 idle timeout\r\n")
                    await w.drain()
                w.transport.close()
            await asyncio.sleep(0.05)
            (b,) = await agent.deliver(mess, "a@x", ["u2@remote.example"])
            await agent.close()
        return [a.status, b.status], peer

    got, peer = asyncio.run(go())
    assert got == [Status.OK, Status.OK]
    assert peer.connections == 2 and len(peer.messages) == 2


def test_idle_connections_are_closed_after_the_timeout(home: Home, mess: Path) -> None:
    async def go() -> tuple[int, int, Peer]:
        async with Peer(Script()) as peer:
            route(home, peer.port)
            agent = RemoteAgent(home, ControlCache(home), idle_timeout=0.1)
            await agent.deliver(mess, "a@x", ["u1@remote.example"])
            before = len(agent.pool)
            # the idle timer takes the connection out of the pool, then QUITs: the
            # peer's session ending is the event
            await asyncio.wait(set(peer._tasks), timeout=10)
            after = len(agent.pool)
        return before, after, peer

    before, after, peer = asyncio.run(go())
    assert (before, after) == (1, 0)
    assert peer.commands[-1] == b"QUIT\r\n"


def test_rejected_message_connection_is_not_kept(home: Home, mess: Path) -> None:
    async def go() -> int:
        async with Peer(Script(after=b"554 no\r\n")) as peer:
            route(home, peer.port)
            agent = RemoteAgent(home, ControlCache(home))
            await agent.deliver(mess, "a@x", ["u1@remote.example"])
            return len(agent.pool)

    assert asyncio.run(go()) == 0


def test_8bit_message_gets_body_8bitmime_and_is_not_converted(home: Home, tmp_path: Path) -> None:
    mess = tmp_path / "m8"
    mess.write_bytes(b"Subject: caf\xc3\xa9\n\n\xe9t\xe9\npartial last line")
    (o,), peer = deliver(home, Script(), mess)
    assert o.status is Status.OK
    assert b"MAIL FROM:<a@test.example> BODY=8BITMIME\r\n" in peer.commands
    assert peer.messages[0][2] == b"Subject: caf\xc3\xa9\r\n\r\n\xe9t\xe9\r\npartial last line\r\n"
    (o,), peer = deliver(home, Script(ehlo=b"250 peer.test\r\n"), mess)  # no 8BITMIME
    assert o.status is Status.OK
    assert b"MAIL FROM:<a@test.example>\r\n" in peer.commands
