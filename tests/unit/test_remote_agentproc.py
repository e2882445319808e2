"""remote/agentproc.py: the remote agent in its own process, behind RemoteAgent's methods."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote.agentproc import (
    RemoteProcess,
    decode_outcomes,
    decode_request,
    encode_outcomes,
    encode_request,
)
from tests.conftest import write_control


def test_request_and_outcomes_round_trip() -> None:
    req = encode_request(Path("/q/mess/1/23"), "a@b", ["x@r.example", "\udcff@r.example"])
    assert decode_request(req) == (Path("/q/mess/1/23"), "a@b", ["x@r.example", "\udcff@r.example"])
    outs = [Outcome.ok("fine\0with nul"), Outcome.temp(""), Outcome.perm("550 no ünicode")]
    assert decode_outcomes(encode_outcomes(outs)) == outs


@pytest.mark.parametrize("data", [b"", b"one\0", b"a\0b\0c"])
def test_bad_request_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_request(data)


@pytest.mark.parametrize("data", [b"K", b"K\0\0\0\x09short", b"X\0\0\0\0"])
def test_bad_outcomes_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_outcomes(data)


def _message(home: Home) -> Path:
    mess = home.root / "mess"
    mess.write_bytes(b"Subject: x\n\nbody\n")
    return mess


async def _refusing_server() -> tuple[asyncio.AbstractServer, int]:
    async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"554 go away\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_each_recipient_gets_the_childs_outcome(home: Home) -> None:
    async def main() -> list[Outcome]:
        server, port = await _refusing_server()
        write_control(home, "smtproutes", f"r.example:127.0.0.1:{port}\n")
        agent = RemoteProcess(home)
        agent.start()
        try:
            return await agent.deliver(_message(home), "a@b", ["x@r.example", "y@r.example"])
        finally:
            await agent.close()
            server.close()

    outs = asyncio.run(main())
    # what the agent's RemoteAgent said (qmail-remote: a 5xx greeting is temporary)
    assert [o.status for o in outs] == [Status.TEMP, Status.TEMP], outs
    assert all("greeting failed" in o.text and "554 go away" in o.text for o in outs)


def test_a_dead_agent_fails_deliveries_temporarily_and_is_reported(home: Home) -> None:
    lost: list[bool] = []

    async def main() -> tuple[list[Outcome], list[Outcome]]:
        agent = RemoteProcess(home, on_lost=lambda: lost.append(True))
        agent.start()
        assert agent.pid is not None
        os.kill(agent.pid, signal.SIGKILL)
        os.waitpid(agent.pid, 0)
        first = await agent.deliver(_message(home), "a@b", ["x@r.example"])
        later = await agent.deliver(_message(home), "a@b", ["y@r.example", "z@r.example"])
        await agent.close()
        return first, later

    first, later = asyncio.run(main())
    assert [o.status for o in first + later] == [Status.TEMP] * 3
    assert lost == [True]


def test_an_agent_lost_while_idle_is_noticed_without_a_delivery(home: Home) -> None:
    async def main() -> None:
        lost = asyncio.Event()
        agent = RemoteProcess(home, on_lost=lost.set)
        agent.start()
        agent.watch()
        assert agent.pid is not None
        os.kill(agent.pid, signal.SIGKILL)
        await asyncio.wait_for(lost.wait(), 30)
        await agent.close()

    asyncio.run(main())
