"""Many deliveries at once in one event loop, and nothing leaks after 1,000 failures."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Status
from pyqmail.remote.deliver import RemoteAgent
from tests.conftest import write_control
from tests.integration.test_remote_peers import Peer, Script


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousand_failed_deliveries_leave_no_fd_or_task(home: Home, tmp_path: Path) -> None:
    mess = tmp_path / "mess"
    mess.write_bytes(b"Subject: x\n\nbody\n")
    # A port bound but never listened on refuses connections, and nobody else can take it
    # meanwhile (a free_port() number could be reused by another test's listener).
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    dead = hold.getsockname()[1]
    write_control(home, "timeoutremote", "30\n")  # a bound on the worst case, not a pacing

    async def go() -> None:
        async with (
            Peer(Script(greeting=b"421 busy\r\n")) as busy,
            Peer(Script(rcpt=lambda a: b"451 later\r\n")) as later,
            Peer(Script(after=None)) as dropper,
        ):
            write_control(
                home,
                "smtproutes",
                f"dead.example:127.0.0.1:{dead}\nbusy.example:127.0.0.1:{busy.port}\n"
                f"later.example:127.0.0.1:{later.port}\ndrop.example:127.0.0.1:{dropper.port}\n",
            )
            agent = RemoteAgent(home, ControlCache(home))
            await agent.deliver(mess, "a@x", ["warm@busy.example"])  # lazy parts built once
            fds, tasks = open_fds(), len(asyncio.all_tasks())
            domains = ["dead", "busy", "later", "drop"]
            jobs = [
                agent.deliver(mess, "a@x", [f"u{i}@{domains[i % 4]}.example"]) for i in range(1000)
            ]
            results = await asyncio.gather(*jobs)
            assert len(agent.pool) == 0  # failures are never kept
            assert all(o.status is Status.TEMP for (o,) in results)
            assert sum("Possible duplicate" in o.text for (o,) in results) == 250
            # our side closed everything before deliver() returned
            await asyncio.sleep(0)
            assert len(asyncio.all_tasks()) <= tasks + len(busy._tasks) + len(later._tasks) + len(
                dropper._tasks
            )
        assert open_fds() <= fds - 3  # the three listeners are gone too
        assert len(asyncio.all_tasks()) == 1

    try:
        asyncio.run(go())
    finally:
        hold.close()


def test_cancelled_deliveries_close_their_sockets(home: Home, tmp_path: Path) -> None:
    mess = tmp_path / "mess"
    mess.write_bytes(b"Subject: x\n\nbody\n")

    async def go() -> None:
        async with Peer(Script(silent=True)) as peer:
            write_control(home, "smtproutes", f"slow.example:127.0.0.1:{peer.port}\n")
            agent = RemoteAgent(home, ControlCache(home))
            fds = open_fds()
            tasks = [
                asyncio.create_task(agent.deliver(mess, "a@x", [f"u{i}@slow.example"]))
                for i in range(50)
            ]
            while peer.connections < 50:  # every delivery is waiting for a greeting
                await asyncio.sleep(0.01)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert all(t.cancelled() for t in tasks)
            await asyncio.sleep(0)
            for w in list(peer._writers):  # the peer's ends
                w.transport.abort()
            await asyncio.sleep(0)
            assert open_fds() <= fds

    asyncio.run(go())
