"""daemon/parts.py: the start-up checks, the listeners' bind-then-serve, the clean sweep."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path

import pytest

from pyqmail.daemon.parts import (
    CleanSweep,
    RunConfig,
    RunError,
    SteadyControl,
    check_home,
    start_listeners,
)
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.submit import submitter


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path / "qmail", single_user=True)
    create_home(h, "mx.example", None)
    return h


def test_check_home_reads_the_controls(home: Home) -> None:
    assert check_home(home).me == "mx.example"


@pytest.mark.parametrize(
    ("remove", "says"),
    [("control", "unable to switch to home directory"), ("queue", "unable to switch to queue")],
)
def test_check_home_says_what_is_missing(home: Home, remove: str, says: str) -> None:
    shutil.rmtree(home.root / remove)
    with pytest.raises(RunError, match=says):
        check_home(home)


def test_listeners_bound_without_serving_accept_nothing_until_told(home: Home) -> None:
    cfg = RunConfig(home, smtp=[("127.0.0.1", 0)], qmqp=[("127.0.0.1", 0)])
    warnings: list[str] = []

    async def main() -> None:
        ctl = SteadyControl(home)
        listeners = await start_listeners(
            cfg, ctl, submitter(home), warn=warnings.append, serving=False
        )
        try:
            kinds = [kind for kind, _host, _port in listeners.bound]
            assert kinds == ["smtp", "qmqp"]
            port = listeners.bound[0][2]
            # bound but not listening: a client is refused, never accepted
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), 5).close()
            await listeners.start_serving()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            greeting = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert greeting.startswith(b"220 mx.example ESMTP")
        finally:
            await listeners.close()
        assert listeners.servers == []

    asyncio.run(main())
    assert any("loopback" in w for w in warnings)  # QMQP without tcp.qmqp.cdb


def test_pyqmail_runs_smtp_listener_takes_its_limits_from_control(home: Home) -> None:
    (home.control / "concurrencyincoming").write_text("1\n")
    cfg = RunConfig(home, smtp=[("127.0.0.1", 0)])

    async def main() -> list[bytes]:
        listeners = await start_listeners(cfg, SteadyControl(home), submitter(home), warn=print)
        try:
            port = listeners.bound[0][2]
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            first = await asyncio.wait_for(r1.readline(), 10)
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            second = await asyncio.wait_for(r2.readline(), 10)
            w1.close()
            w2.close()
            return [first, second]
        finally:
            await listeners.close()

    first, second = asyncio.run(main())
    assert first.startswith(b"220 ") and second.startswith(b"421 ")


def test_clean_sweep_removes_what_a_crashed_writer_left_until_stopped(home: Home) -> None:
    paths = QueuePaths(home.queue)
    garbage = paths.intd(123456)  # intd/N with neither todo/N nor mess/S/N
    garbage.write_bytes(b"F\0")
    sweep = CleanSweep(paths, interval=0.01)
    sweep.start()
    try:
        deadline = time.monotonic() + 10
        while garbage.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not garbage.exists()
    finally:
        sweep.stop()
