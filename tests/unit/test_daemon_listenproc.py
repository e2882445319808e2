"""daemon/listenproc.py's pieces that need no running daemon (the daemon's own tests in
tests/integration/test_run_daemon.py kill the real child and watch the ports)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import pytest

from pyqmail.daemon.listenproc import NUM, ListenerProcess, _NumberLink
from pyqmail.daemon.parts import RunConfig, RunError
from pyqmail.home import Home
from pyqmail.logsink import LogSink


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_failed_fork_is_a_clear_start_error_and_leaks_nothing(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    before = _fds()
    proc = ListenerProcess(RunConfig(home, smtp=[("127.0.0.1", 0)]), LogSink(None))
    with pytest.raises(RunError, match="unable to start the listener process"):
        proc.start()
    assert _fds() == before
    assert proc.pid is None


def test_numbers_arrive_whole_and_in_order_past_a_full_socket() -> None:
    """The child's socket is non-blocking: when the parent lags, the tail waits for the
    socket to drain, and every number still arrives once, in order, never cut in two."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    n = 60_000  # 480 KB: far more than the socket holds
    got = bytearray()
    reading = threading.Event()

    def reader() -> None:
        reading.wait()
        while len(got) < n * NUM.size:
            data = theirs.recv(65536)
            if not data:
                break
            got.extend(data)

    t = threading.Thread(target=reader)
    t.start()

    async def main() -> None:
        link = _NumberLink(ours, "/nonexistent/trigger", asyncio.get_running_loop())
        for i in range(n):
            link.notify(i + 1)
        await asyncio.sleep(0.05)  # the first send fills the socket; the rest waits
        assert link.out and not link.broken
        reading.set()
        while link.out:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    t.join(10)
    ours.close()
    theirs.close()
    assert [v for (v,) in NUM.iter_unpack(bytes(got))] == list(range(1, n + 1))


def test_a_lost_parent_means_lock_trigger(tmp_path: Path) -> None:
    """If the socket to the scheduler breaks, each new message pokes lock/trigger, which
    qmail-send's scan answers, as qmail-queue does."""
    fifo = tmp_path / "trigger"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.close()

    async def main() -> bool:
        link = _NumberLink(ours, str(fifo), asyncio.get_running_loop())
        link.notify(7)
        await asyncio.sleep(0.02)
        return link.broken

    try:
        assert asyncio.run(main()) is True
        assert os.read(rfd, 16) == b"\0"
    finally:
        os.close(rfd)
        ours.close()
