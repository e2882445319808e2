"""``pyqmail run`` with control/destinationlimits and a rate-limiting peer (send/limits.py).

Real daemon, real SMTP sinks on 127.0.0.1 reached through smtproutes: a slow sink that
holds each message's final reply until the test lets it go, and counts the connections
and transactions open at once; a sink that greets with ``421 4.7.0``. Waiting is for
observable states (a count, a log line), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import free_port, write_control
from tests.integration.test_run_daemon import Mta, listening, wait_for
from tests.integration.test_run_daemon import mta as mta  # the fixture
from tests.integration.test_run_http import get, samples


class Sink:
    """An SMTP sink on its own thread: counts connections and transactions open at once
    (and the peaks), greets with ``greeting``, and, while ``hold`` is clear, keeps every
    message's final reply back."""

    def __init__(self, greeting: bytes = b"220 sink.test ESMTP\r\n") -> None:
        self.greeting = greeting
        self.lock = threading.Lock()
        self.conns = self.peak_conns = self.total_conns = 0
        self.open_tx = self.peak_tx = 0
        self.delivered: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.hold = asyncio.Event()
        self.hold.set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    def set_hold(self, on: bool) -> None:
        """``on``: final replies wait; off: they go (and every waiting one too)."""
        self.loop.call_soon_threadsafe(self.hold.clear if on else self.hold.set)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with self.lock:
            self.conns += 1
            self.total_conns += 1
            self.peak_conns = max(self.peak_conns, self.conns)
        in_tx = False
        try:
            w.write(self.greeting)
            if not self.greeting.startswith(b"220"):
                await w.drain()
                return
            rcpts: list[bytes] = []
            while line := await r.readline():
                u = line.strip().upper()
                if u.startswith((b"EHLO", b"HELO")):
                    w.write(b"250-sink.test\r\n250 PIPELINING\r\n")
                elif u.startswith(b"MAIL"):
                    in_tx = True
                    with self.lock:
                        self.open_tx += 1
                        self.peak_tx = max(self.peak_tx, self.open_tx)
                    rcpts = []
                    w.write(b"250 ok\r\n")
                elif u.startswith(b"RCPT"):
                    rcpts.append(line.strip()[8:].strip(b"<>"))
                    w.write(b"250 ok\r\n")
                elif u == b"DATA":
                    w.write(b"354 go\r\n")
                    while await r.readline() not in (b".\r\n", b""):
                        pass
                    await self.hold.wait()
                    with self.lock:
                        self.delivered += rcpts
                        self.open_tx -= 1
                    in_tx = False
                    w.write(b"250 ok\r\n")
                elif u == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    return
                elif u == b"RSET":
                    w.write(b"250 ok\r\n")
                else:
                    w.write(b"502 no\r\n")
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with self.lock:
                self.conns -= 1
                if in_tx:
                    self.open_tx -= 1
            w.transport.abort()

    def close(self) -> None:
        async def stop() -> None:
            self.hold.set()
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def sinks() -> Iterator[list[Sink]]:
    made: list[Sink] = []
    yield made
    for s in made:
        s.close()


def test_limited_destination_never_gets_more_than_its_concurrency(
    mta: Mta, sinks: list[Sink]
) -> None:
    slow, fast = Sink(), Sink()
    sinks += [slow, fast]
    routes = f"slow.example:127.0.0.1:{slow.port}\nfast.example:127.0.0.1:{fast.port}\n"
    write_control(mta.home, "smtproutes", routes)
    write_control(mta.home, "concurrencyremote", "5\n")
    write_control(mta.home, "destinationlimits", "slow.example:2:\n")
    hp = free_port()
    mta.start("--http", f"127.0.0.1:{hp}")
    wait_for(lambda: listening(hp), what="http listener")
    slow.set_hold(True)
    n_slow, n_fast = 8, 6
    for i in range(n_slow):
        mta.send("joe@test.example", [f"s{i}@slow.example"], subject=f"s{i}")
    wait_for(lambda: slow.open_tx == 2, what="two transactions at the slow sink")
    # the other destination flows through the free remote slots while slow holds two
    for i in range(n_fast):
        mta.send("joe@test.example", [f"f{i}@fast.example"], subject=f"f{i}")
    wait_for(lambda: len(fast.delivered) == n_fast, what="the fast destination's mail")
    assert slow.delivered == [] and slow.open_tx == 2 and slow.conns == 2
    s = samples(get(f"http://127.0.0.1:{hp}/metrics")[2].decode())
    assert s[("pyqmail_remote_held_back", ())] == n_slow - 2
    assert f'<span id="held-back">{n_slow - 2}</span>'.encode() in get(f"http://127.0.0.1:{hp}/")[2]
    slow.set_hold(False)
    wait_for(lambda: len(slow.delivered) == n_slow, what="the slow destination's mail")
    wait_for(lambda: mta.log().count("end msg ") == n_slow + n_fast, what="end msg")
    assert mta.stop() == 0
    assert (slow.peak_conns, slow.peak_tx) == (2, 2)
    assert "deferral" not in mta.log()  # held back is not a failed attempt
    assert mta.queue_files() == []


def test_421_reply_backs_off_the_destination(mta: Mta, sinks: list[Sink]) -> None:
    busy = Sink(greeting=b"421 4.7.0 Try again later, closing connection.\r\n")
    calm = Sink()
    sinks += [busy, calm]
    routes = f"busy.example:127.0.0.1:{busy.port}\ncalm.example:127.0.0.1:{calm.port}\n"
    write_control(mta.home, "smtproutes", routes)
    mta.start()
    mta.send("joe@test.example", ["a@busy.example"], subject="first")
    line = "destination busy.example: rate-limit reply; holding its deliveries for 60 seconds"
    wait_for(lambda: line in mta.log(), what="the back-off line")
    assert "deferral: Connected_to_127.0.0.1_but_greeting_failed./Remote_host_said:_421_4.7.0" in (
        mta.log()
    )
    for i in range(4):
        mta.send("joe@test.example", [f"b{i}@busy.example"], subject=f"b{i}")
    mta.send("joe@test.example", ["c@calm.example"], subject="calm")
    # mail queued after the busy ones is delivered; the busy ones were held, not tried
    wait_for(lambda: calm.delivered == [b"c@calm.example"], what="the calm destination's mail")
    wait_for(lambda: mta.log().count("new msg ") == 6, what="every message preprocessed")
    assert busy.total_conns == 1
    assert mta.log().count(" to remote b") == 0  # no "starting delivery" for b0..b3
    assert mta.stop() == 0
    assert busy.total_conns == 1


def test_hup_rereads_the_limits(mta: Mta, sinks: list[Sink]) -> None:
    """A destination on hold (0) gets nothing; after the file changes and HUP, its mail
    goes, one transaction at a time."""
    import signal

    sink = Sink()
    sinks.append(sink)
    write_control(mta.home, "smtproutes", f"held.example:127.0.0.1:{sink.port}\n")
    write_control(mta.home, "destinationlimits", "held.example:0:\n")
    mta.start()
    for i in range(3):
        mta.send("joe@test.example", [f"h{i}@held.example"], subject=f"h{i}")
    wait_for(lambda: mta.log().count("new msg ") == 3, what="every message preprocessed")
    mta.send("joe@test.example", ["alice@test.example"], subject="local")
    wait_for(lambda: mta.log().count("end msg ") == 1, what="the local message")
    assert sink.total_conns == 0 and " to remote " not in mta.log()
    write_control(mta.home, "destinationlimits", "held.example:1:\n")
    mta.signal(signal.SIGHUP)
    wait_for(lambda: len(sink.delivered) == 3, what="the held destination's mail")
    assert mta.stop() == 0
    assert sink.peak_tx == 1
