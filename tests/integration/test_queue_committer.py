"""The committer process (queue/committer.py): a real child writing a real queue.

Each test runs an event loop in the test's thread and talks to a child started exactly
as the SMTP listener starts it; the queue is then read from disk.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from pyqmail.home import Home
from pyqmail.queue import codes, committer
from pyqmail.queue.committer import CommitProcess
from pyqmail.queue.envelope import MAX_ADDRESS, parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import clean_stale
from pyqmail.queue.service import Reply

T = TypeVar("T")

BODY = b"Subject: hello\n\nbody line\n"


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


def queue_files(home: Home) -> set[str]:
    q = home.queue
    out = set()
    for sub in ("pid", "mess", "intd", "todo"):
        for dirpath, _, files in os.walk(q / sub):
            for f in files:
                out.add(os.path.relpath(os.path.join(dirpath, f), q))
    return out


async def send(proc: CommitProcess, body: bytes, sender: bytes, rcpts: list[bytes]) -> Reply:
    p = proc.begin(received=b"Received: from test\n")
    p.write(body)
    return await p.commit(sender, rcpts)


def _ignored(pid: int) -> set[int]:
    """The signals ``pid`` ignores (SigIgn in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def test_message_is_queued_by_the_child(home: Home) -> None:
    async def go() -> tuple[Reply, int]:
        proc = CommitProcess(home)
        try:
            return await send(proc, BODY, b"a@example.org", [b"b@example.com"]), proc.pid
        finally:
            await proc.close()

    reply, pid = run(go)
    assert reply.code == 0 and reply.qp == pid != os.getpid()
    paths = QueuePaths(home.queue)
    n = reply.msgnum
    mess = paths.mess(n).read_bytes()
    # qmail-queue's line names the child, as qmail's names qmail-queue
    assert mess.startswith(b"Received: (qmail %d invoked from network); " % pid)
    assert mess.endswith(b"\nReceived: from test\n" + BODY)
    t = parse_todo(paths.todo(n).read_bytes())
    assert (t.sender, t.recipients) == (b"a@example.org", (b"b@example.com",))
    assert queue_files(home) == {f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"}


def test_concurrent_messages_are_each_queued_once(home: Home) -> None:
    async def go() -> list[Reply]:
        proc = CommitProcess(home, notify=seen.append)
        try:
            return await asyncio.gather(
                *(send(proc, b"Subject: %d\n\n" % i, b"", [b"r%d@x.org" % i]) for i in range(200))
            )
        finally:
            await proc.close()

    seen: list[int] = []
    replies = run(go)
    assert all(r.code == 0 for r in replies)
    nums = [r.msgnum for r in replies]
    assert len(set(nums)) == 200 and sorted(seen) == sorted(nums)  # notify once each
    paths = QueuePaths(home.queue)
    for i, n in enumerate(nums):
        assert paths.mess(n).read_bytes().endswith(b"Subject: %d\n\n" % i)
        assert parse_todo(paths.todo(n).read_bytes()).recipients == (b"r%d@x.org" % i,)
    assert not os.listdir(home.queue / "pid")


def test_large_message_in_many_frames(home: Home) -> None:
    body = os.urandom(3 * committer.MAX_FRAME + 12345)

    async def go() -> Reply:
        proc = CommitProcess(home)
        try:
            p = proc.begin()
            for i in range(0, len(body), 100_000):
                p.write(body[i : i + 100_000])
            return await p.commit(b"", [b"r@x.org"])
        finally:
            await proc.close()

    r = run(go)
    assert r.code == 0
    assert QueuePaths(home.queue).mess(r.msgnum).read_bytes().endswith(body)


def test_abort_and_refused_envelope_leave_nothing(home: Home) -> None:
    async def go() -> tuple[Reply, Reply]:
        proc = CommitProcess(home)
        try:
            p = proc.begin()
            p.write(BODY)
            p.abort()
            bad = await send(proc, BODY, b"", [b"x" * (MAX_ADDRESS + 1)])
            good = await send(proc, BODY, b"", [b"r@x.org"])
            return bad, good
        finally:
            await proc.close()

    bad, good = run(go)
    assert bad.code != 0 and codes.smtp_reply(bad.code).startswith(b"554 ")
    n = good.msgnum
    assert good.code == 0
    assert queue_files(home) == {f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"}


def test_child_killed_mid_message_fails_it_and_a_new_child_takes_over(home: Home) -> None:
    async def go() -> tuple[Reply, Reply, Reply, int, int]:
        proc = CommitProcess(home)
        try:
            p = proc.begin()
            p.write(BODY)
            first = proc.pid
            # The child takes frames in order: once a later message is answered, it has
            # made this one's files.
            marker = await send(proc, BODY, b"", [b"r@x.org"])
            os.kill(first, signal.SIGKILL)
            lost = await p.commit(b"", [b"r@x.org"])
            after = await send(proc, BODY, b"", [b"r@x.org"])
            return marker, lost, after, first, proc.pid
        finally:
            await proc.close()

    marker, lost, after, first, second = run(go)
    assert marker.code == 0 and marker.qp == first
    assert lost.code == codes.CRASHED
    assert codes.smtp_reply(lost.code) == b"451 qq crashed (#4.3.0)\r\n"
    assert after.code == 0 and second != first
    paths = QueuePaths(home.queue)
    queued = {str(marker.msgnum), str(after.msgnum)}
    assert set(os.listdir(home.queue / "todo")) == queued
    kept = {f"{d}/{n}" for n in (marker.msgnum, after.msgnum) for d in ("intd", "todo")}
    kept |= {f"mess/{n % 23}/{n}" for n in (marker.msgnum, after.msgnum)}
    left = queue_files(home) - kept
    assert any(f.startswith("pid/") for f in left) and any(f.startswith("mess/") for f in left)
    clean_stale(paths)  # what the dead child began goes, the queued messages stay
    assert queue_files(home) == kept


def test_close_waits_for_messages_in_flight(home: Home) -> None:
    async def go() -> Reply:
        proc = CommitProcess(home)
        p = proc.begin()
        p.write(BODY)
        fut = p.commit(b"", [b"r@x.org"])
        await proc.close()
        assert fut.done()
        return fut.result()

    r = run(go)
    assert r.code == 0 and (home.queue / "todo" / str(r.msgnum)).exists()


def test_child_pokes_trigger_without_notify(home: Home) -> None:
    paths = QueuePaths(home.queue)
    fd = os.open(paths.trigger, os.O_RDONLY | os.O_NONBLOCK)
    try:

        async def go() -> Reply:
            proc = CommitProcess(home)
            try:
                return await send(proc, BODY, b"", [b"r@x.org"])
            finally:
                await proc.close()

        assert run(go).code == 0
        assert os.read(fd, 16) != b""
    finally:
        os.close(fd)


def test_backlog_pauses_and_resumes(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that stops reading (a stalled disk) makes the listener hold its clients
    back past HIGH_WATER, and lets them go on once it has caught up."""
    monkeypatch.setattr(committer, "HIGH_WATER", 4 << 20)
    monkeypatch.setattr(committer, "LOW_WATER", 1 << 20)
    resumed: list[float] = []

    async def go() -> tuple[bool, Reply]:
        proc = CommitProcess(home)
        proc.on_resume = lambda: resumed.append(time.monotonic())
        try:
            p = proc.begin()
            assert (await send(proc, BODY, b"", [b"r@x.org"])).code == 0  # the child is up
            os.kill(proc.pid, signal.SIGSTOP)
            chunk = b"x" * 65536 + b"\n"
            while not proc.paused:
                p.write(chunk)
            paused = proc.paused
            os.kill(proc.pid, signal.SIGCONT)
            r = await p.commit(b"", [b"r@x.org"])
            return paused, r
        finally:
            await proc.close()

    paused, r = run(go)
    assert paused and resumed and r.code == 0
    assert (home.queue / "todo" / str(r.msgnum)).exists()


def test_child_ignores_signals_meant_for_the_listener(home: Home) -> None:
    """^C or TERM to the process group: the child keeps committing until the listener
    closes its end."""

    async def go() -> tuple[int, Reply, Reply]:
        proc = CommitProcess(home)
        proc.start()
        try:
            first = await send(proc, BODY, b"", [b"r@x.org"])  # past its signal set-up
            sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            # An ignored signal is discarded when it is sent (nothing stays pending), so
            # once the kernel says they are ignored, the kills below have had their effect.
            assert _ignored(proc.pid) >= set(sigs)
            for sig in sigs:
                os.kill(proc.pid, sig)
            return proc.pid, first, await send(proc, BODY, b"", [b"r@x.org"])
        finally:
            await proc.close()

    pid, first, second = run(go)
    assert first.code == 0 and second.code == 0 and second.qp == first.qp == pid


def test_a_signed_begin_is_dkim_signed_by_the_child(home: Home) -> None:
    """An authenticated SMTP session's message (begin(sign=True), the S frame): the child
    signs it before its commit, in the same batch as an unsigned one."""
    from pyqmail import dkim
    from tests.unit.test_dkim import records, verify

    dkim.keygen(home, "example.test", "s1")
    msg = b"From: a@example.test\nSubject: signed\n\nbody\n"

    async def go() -> tuple[Reply, Reply]:
        proc = CommitProcess(home)
        signed = proc.begin(received=b"Received: from test\n", sign=True)
        plain = proc.begin(received=b"Received: from test\n")
        signed.write(msg)
        plain.write(msg)
        got = await asyncio.gather(
            signed.commit(b"a@example.test", [b"r@x.org"]), plain.commit(b"", [b"r@x.org"])
        )
        await proc.close()
        return got[0], got[1]

    a, b = run(go)
    assert a.code == codes.OK and b.code == codes.OK
    paths = QueuePaths(home.queue)
    signed_mess = paths.mess(a.msgnum).read_bytes()
    assert b"\nDKIM-Signature: " in signed_mess and signed_mess.endswith(msg)
    assert b"DKIM-Signature" not in paths.mess(b.msgnum).read_bytes()
    ours = signed_mess[signed_mess.index(b"DKIM-Signature: ") :]
    assert verify(ours, records(home)) == [True]
