"""Root mode's qmail-clean link (daemon/split.py): the scheduler's pipelined client and the
queue side's loop, over a real socket pair and a real queue.

Requests go out without waiting for earlier replies; the replies come back in order and
each must reach the request it answers, also when a caller gave up meanwhile or when the
other side is gone."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import tracemalloc

import pytest

from pyqmail.daemon.split import SocketCleaner, _serve_clean
from pyqmail.home import Home
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import QueueWriter


def _commit(home: Home) -> int:
    p = QueueWriter(home).begin()
    p.write(b"x\n")
    return p.commit(b"a@b", [b"Tc@d"])


class _Counting(socket.socket):
    """The scheduler's end, counting the writes that carry requests."""

    sends = 0

    def send(self, data: bytes, flags: int = 0) -> int:  # type: ignore[override]
        type(self).sends += 1
        return super().send(data, flags)


def _pair(home: Home) -> tuple[socket.socket, threading.Thread]:
    ours, theirs = socket.socketpair()
    mine = _Counting(fileno=ours.detach())
    t = threading.Thread(target=_serve_clean, args=(theirs, QueuePaths(home.queue)), daemon=True)
    t.start()
    return mine, t


def test_requests_of_one_moment_go_in_one_write_and_replies_find_their_callers(
    home: Home,
) -> None:
    paths = QueuePaths(home.queue)
    nums = [_commit(home) for _ in range(20)]
    sock, _ = _pair(home)
    cleaner = SocketCleaner(sock)
    _Counting.sends = 0

    async def main() -> list[bool]:
        # todo/N of every message, with a bad number between them ('x': False)
        asks = [cleaner("todo", n) for n in nums[:10]] + [cleaner("todo", -1)]
        asks += [cleaner("todo", n) for n in nums[10:]]
        return list(await asyncio.gather(*asks))

    got = asyncio.run(main())
    assert got == [True] * 10 + [False] + [True] * 10
    assert _Counting.sends == 1  # 21 requests, one write
    assert not any(os.path.exists(paths.name("todo", n)) for n in nums)
    assert all(os.path.exists(paths.name("mess", n)) for n in nums)


def test_a_cancelled_caller_keeps_its_place_in_the_order(home: Home) -> None:
    nums = [_commit(home) for _ in range(3)]
    sock, _ = _pair(home)
    cleaner = SocketCleaner(sock)

    async def main() -> tuple[bool, bool]:
        first = asyncio.ensure_future(cleaner("todo", -1))  # answered 'x'
        second = asyncio.ensure_future(cleaner("foop", nums[0]))  # answered '+'
        await asyncio.sleep(0)  # both sent
        first.cancel()
        later = await cleaner("foop", nums[1])
        return await second, later

    assert asyncio.run(main()) == (True, True)
    paths = QueuePaths(home.queue)
    assert not os.path.exists(paths.name("mess", nums[0]))
    assert not os.path.exists(paths.name("mess", nums[1]))
    assert os.path.exists(paths.name("mess", nums[2]))


def test_a_lost_qmail_clean_fails_the_waiting_and_the_later_requests(home: Home) -> None:
    ours, theirs = socket.socketpair()
    cleaner = SocketCleaner(ours)

    async def main() -> None:
        waiting = asyncio.ensure_future(cleaner("todo", 7))
        await asyncio.sleep(0)
        theirs.close()  # qmail-clean died without answering
        with pytest.raises(ConnectionError):
            await waiting
        with pytest.raises(ConnectionError):
            await cleaner("foop", 7)

    asyncio.run(main())


def test_the_clean_loop_answers_one_read_in_one_write(home: Home) -> None:
    nums = [_commit(home) for _ in range(5)]
    ours, theirs = socket.socketpair()
    reqs = b"".join(b"todo/%d\0" % n for n in nums) + b"todo/"  # the last one incomplete
    ours.sendall(reqs)
    t = threading.Thread(target=_serve_clean, args=(theirs, QueuePaths(home.queue)))
    t.start()
    ours.settimeout(10)
    assert ours.recv(100) == b"+" * 5
    ours.sendall(b"%d\0" % nums[0])  # the rest of it: already cleaned, still '+'
    assert ours.recv(100) == b"+"
    ours.close()
    t.join(10)
    assert not t.is_alive()


def test_requests_that_fill_the_socket_go_out_as_it_drains(home: Home) -> None:
    """More requests than the socket holds: the rest waits for it to drain, and every
    reply still reaches its own caller (good and bad numbers alternate)."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mine = _Counting(fileno=ours.detach())
    cleaner = SocketCleaner(mine)
    _Counting.sends = 0
    n = 20_000
    t = threading.Thread(target=_serve_clean, args=(theirs, QueuePaths(home.queue)), daemon=True)

    async def main() -> list[bool]:
        asks = asyncio.gather(*(cleaner("todo", 10_000 + k if k % 2 else -1) for k in range(n)))
        await asyncio.sleep(0.2)  # all asked, the socket full: only now is anyone reading
        t.start()
        return list(await asyncio.wait_for(asks, 20))

    got = asyncio.run(main())
    assert got == [bool(k % 2) for k in range(n)]
    assert _Counting.sends > 1  # it did not all fit in the first write


def test_an_unfinished_request_is_not_held_beyond_the_refused_length(home: Home) -> None:
    """4 MiB without a NUL: qmail-clean keeps no more of it than it needs to refuse it,
    answers 'x' when the NUL comes, and serves the next request."""
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=_serve_clean, args=(theirs, QueuePaths(home.queue)), daemon=True)
    num = _commit(home)
    chunk = b"t" * 65536
    tracemalloc.start()
    try:
        t.start()
        for _ in range(64):
            ours.sendall(chunk)
        ours.sendall(b"\0todo/%d\0" % num)
        ours.settimeout(30)
        got = b""
        while len(got) < 2:
            got += ours.recv(10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        ours.close()  # the loop sees EOF and ends
    assert got == b"x+"
    assert peak < 1 << 20, peak  # not the 4 MiB line
    t.join(10)
    assert not t.is_alive()
