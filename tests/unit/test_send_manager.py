"""send/manager.py: the scheduler's logic with in-test agents and the real queue writer.

The agents here are plain async functions returning Outcomes (the scheduling logic is under
test); integration tests drive the real local and remote agents.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pyqmail.control import ControlCache, load
from pyqmail.home import Home
from pyqmail.outcome import Outcome
from pyqmail.queue.clean import Cleaner
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.submit import InProcessSubmitter
from pyqmail.queue.writer import QueueWriter
from pyqmail.send.log import SendLog
from pyqmail.send.manager import Scheduler, StartError
from pyqmail.send.schedule import LOCAL, REMOTE, nextretry
from tests.conftest import write_control


class Agents:
    """Records every delivery; answers from ``script`` (recipient -> outcomes in turn)."""

    def __init__(self) -> None:
        self.script: dict[str, list[Outcome]] = {}
        self.calls: list[tuple[str, str, str, bytes]] = []  # channel, sender, rcpt, message
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None  # set whenever calls or in_flight change

    def _touch(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def until(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``cond()`` holds, woken by each change of calls or in_flight."""

        async def wait() -> None:
            while not cond():
                self._changed = asyncio.Event()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def _answer(self, rcpt: str) -> Outcome:
        outs = self.script.get(rcpt)
        if outs:
            return outs.pop(0) if len(outs) > 1 else outs[0]
        return Outcome.ok("did 1+0+0\n")

    async def local(self, mess: Path, sender: str, rcpt: str) -> Outcome:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._touch()
        try:
            data = mess.read_bytes()
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            self.calls.append(("local", sender, rcpt, data))
            return self._answer(rcpt)
        finally:
            self.in_flight -= 1
            self._touch()

    async def remote(self, mess: Path, sender: str, rcpts: list[str]) -> list[Outcome]:
        data = mess.read_bytes()
        out = []
        for r in rcpts:
            self.calls.append(("remote", sender, r, data))
            out.append(self._answer(r))
        self._touch()
        return out


class Harness:
    def __init__(
        self,
        home: Home,
        agents: Agents,
        clock: Callable[[], float] = time.time,
        direct: bool = True,
        cleaner: Cleaner | None = None,
    ) -> None:
        self.home = home
        self.agents = agents
        self.logbuf = io.BytesIO()
        self.sched = Scheduler(
            home,
            ControlCache(home).get,
            local=agents.local,
            remote=agents.remote,
            log=SendLog(self.logbuf),
            clock=clock,
            term_timeout=5,
            direct=direct,
            cleaner=cleaner,
        )
        submitter = InProcessSubmitter(home, notify=self.sched.notify)
        self.writer = submitter.writer
        self.sched.submitter = submitter

    async def queue(
        self, sender: bytes, rcpts: list[bytes], body: bytes = b"Subject: t\n\nhi\n"
    ) -> int:
        def put() -> int:
            p = self.writer.begin()
            p.write(body)
            return p.commit(sender, rcpts)

        return await asyncio.get_running_loop().run_in_executor(None, put)

    async def settle(self) -> None:
        for _ in range(3):  # idle must hold across a few loop turns
            await asyncio.wait_for(self.sched.idle.wait(), 10)
            for _ in range(5):
                await asyncio.sleep(0)

    @property
    def log(self) -> list[bytes]:
        return self.logbuf.getvalue().split(b"\n")[:-1]


def run(home: Home, body: Callable[[Harness], Awaitable[None]], agents: Agents | None = None,
        clock: Callable[[], float] = time.time, direct: bool = True,
        cleaner: Cleaner | None = None) -> Harness:  # fmt: skip
    holder: list[Harness] = []

    async def main() -> None:
        h = Harness(home, agents or Agents(), clock, direct, cleaner)
        holder.append(h)
        await h.sched.start()
        try:
            await body(h)
        finally:
            await h.sched.stop()

    asyncio.run(main())
    return holder[0]


def queue_files(home: Home) -> list[str]:
    out = []
    for kind in ("mess", "info", "local", "remote", "todo", "intd", "bounce"):
        for root, _, files in os.walk(home.queue / kind):
            out += [os.path.join(os.path.relpath(root, home.queue), f) for f in files]
    return sorted(out)


@pytest.fixture
def home2(home: Home) -> Home:
    write_control(home, "locals", "mx.test.example\ntest.example\n")
    write_control(home, "virtualdomains", "virt.example:alice\n")
    return home


@pytest.mark.parametrize("direct", [True, False])
def test_local_and_remote_delivered_then_queue_empty(home2: Home, direct: bool) -> None:
    async def body(h: Harness) -> None:
        await h.queue(
            b"joe@test.example", [b"alice@test.example", b"bob@remote.example", b"x@virt.example"]
        )
        await h.queue(b"joe@test.example", [b"alice@test.example"])
        await h.settle()

    h = run(home2, body, direct=direct)
    got = sorted((c, r) for c, _, r, _ in h.agents.calls)
    assert got == [("local", "alice-x@virt.example"), ("local", "alice@test.example"),
                   ("local", "alice@test.example"), ("remote", "bob@remote.example")]  # fmt: skip
    assert queue_files(home2) == []
    log = h.log
    assert any(line.startswith(b"new msg ") for line in log)
    assert any(
        line.startswith(b"info msg ") and b"from <joe@test.example> qp " in line for line in log
    )
    assert sum(line.startswith(b"starting delivery ") for line in log) == 4
    assert sum(b": success: did_1+0+0/" in line for line in log) == 4
    assert sum(line.startswith(b"end msg ") for line in log) == 2
    assert any(line.startswith(b"end msg ") for line in log)
    assert log[-1] == b"status: exiting"


def test_permanent_failure_bounces_once_in_qsbmf(home2: Home) -> None:
    agents = Agents()
    agents.script["nobody@test.example"] = [
        Outcome.perm("Sorry, no mailbox here by that name. (#5.1.1)\n")
    ]
    agents.script["gone@remote.example"] = [
        Outcome.perm("1.2.3.4 does not like recipient.\nRemote host said: 550 no\n")
    ]

    async def body(h: Harness) -> None:
        await h.queue(b"alice@test.example", [b"nobody@test.example", b"gone@remote.example"])
        await h.settle()

    h = run(home2, body, agents)
    bounces = [c for c in h.agents.calls if c[2] == "alice@test.example"]
    assert len(bounces) == 1
    _, sender, _, data = bounces[0]
    assert sender == ""
    assert (
        b"\nFrom: MAILER-DAEMON@mx.test.example\nTo: alice@test.example\nSubject: failure notice\n"
        in data
    )
    assert b"Hi. This is the qmail-send program at mx.test.example.\n" in data
    assert b"<nobody@test.example>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n" in data
    assert (
        b"<gone@remote.example>:\n1.2.3.4 does not like recipient.\nRemote host said: 550 no\n\n"
        in data
    )
    assert (
        b"--- Below this line is a copy of the message.\n\nReturn-Path: <alice@test.example>\n"
        in data
    )
    assert b"invoked for bounce" in data.split(b"\n", 1)[0]
    assert any(line.startswith(b"bounce msg ") for line in h.log)
    assert queue_files(home2) == []


def test_double_and_triple_bounce(home2: Home) -> None:
    write_control(home2, "doublebouncehost", "test.example\n")
    write_control(home2, "doublebounceto", "pm\n")
    agents = Agents()
    agents.script["nobody@test.example"] = [Outcome.perm("no such user\n")]
    agents.script["pm@test.example"] = [Outcome.perm("postmaster gone\n")]

    async def body(h: Harness) -> None:
        await h.queue(b"", [b"nobody@test.example"])
        await h.settle()

    h = run(home2, body, agents)
    to_pm = [c for c in h.agents.calls if c[2] == "pm@test.example"]
    assert len(to_pm) == 1
    assert to_pm[0][1] == "#@[]"
    assert (
        b"I tried to deliver a bounce message to this address, but the bounce bounced!\n"
        in to_pm[0][3]
    )
    assert b"--- Below this line is the original bounce.\n\nReturn-Path: <>\n" in to_pm[0][3]
    assert any(line.startswith(b"triple bounce: discarding bounce/") for line in h.log)
    assert queue_files(home2) == []


def test_virtual_recipient_shown_without_prepend_in_bounce(home2: Home) -> None:
    agents = Agents()
    agents.script["alice-bob@virt.example"] = [Outcome.perm("no bob\n")]

    async def body(h: Harness) -> None:
        await h.queue(b"joe@test.example", [b"bob@virt.example"])
        await h.settle()

    h = run(home2, body, agents)
    data = next(c for c in h.agents.calls if c[2] == "joe@test.example")[3]
    assert b"<bob@virt.example>:\nno bob\n\n" in data


def test_deferral_keeps_record_retries_on_schedule_and_on_alarm(home2: Home) -> None:
    agents = Agents()
    agents.script["later@remote.example"] = [Outcome.temp("try later\n"), Outcome.ok("ok\n")]
    paths = QueuePaths(home2.queue)

    async def body(h: Harness) -> None:
        n = await h.queue(b"joe@test.example", [b"later@remote.example"])
        await h.settle()
        assert paths.remote(n).read_bytes() == b"Tlater@remote.example\0"
        birth = int(paths.info(n).stat().st_mtime)
        (entry,) = list(h.sched._heaps[REMOTE])
        assert entry.num == n
        # the pass ran within a second or two of birth: next try at birth + (isqrt(d) + 20)^2
        assert entry.when in {nextretry(birth, birth + d, REMOTE) for d in range(3)}
        assert entry.when >= birth + 400
        h.sched.alarm()
        await h.settle()
        assert not paths.remote(n).exists()

    h = run(home2, body, agents)
    assert [c[2] for c in h.agents.calls] == ["later@remote.example"] * 2
    assert any(b": deferral: try_later/" in line for line in h.log)
    assert queue_files(home2) == []


def test_queuelifetime_turns_deferral_into_failure(home2: Home) -> None:
    write_control(home2, "queuelifetime", "10\n")
    agents = Agents()
    agents.script["stuck@remote.example"] = [Outcome.temp("Sorry, no answer.\n")]
    offset = [0.0]

    async def body(h: Harness) -> None:
        await h.queue(b"joe@test.example", [b"stuck@remote.example"])
        await h.settle()
        offset[0] = 1000.0  # the next pass starts after queuelifetime
        h.sched.alarm()
        await h.settle()

    h = run(home2, body, agents, clock=lambda: time.time() + offset[0])
    bounce = [c for c in h.agents.calls if c[2] == "joe@test.example"]
    assert len(bounce) == 1
    too_long = b"I'm not going to try again; this message has been in the queue too long.\n"
    assert b"<stuck@remote.example>:\nSorry, no answer.\n" + too_long + b"\n" in bounce[0][3]
    assert queue_files(home2) == []


def test_concurrency_zero_holds_and_hup_releases(home2: Home) -> None:
    write_control(home2, "concurrencylocal", "0\n")

    async def body(h: Harness) -> None:
        for i in range(5):
            await h.queue(b"joe@test.example", [b"alice@test.example"], b"n: %d\n" % i)
        await h.settle()
        assert h.agents.calls == []
        assert h.sched.queued() == 5
        write_control(home2, "concurrencylocal", "2\n")
        assert h.sched.reload()
        await h.settle()

    h = run(home2, body)
    assert len(h.agents.calls) == 5
    assert h.agents.max_in_flight <= 2
    assert queue_files(home2) == []


def test_concurrency_limit_is_reached_not_exceeded(home2: Home) -> None:
    write_control(home2, "concurrencylocal", "3\n")
    agents = Agents()

    async def body(h: Harness) -> None:
        agents.gate = asyncio.Event()
        for i in range(10):
            await h.queue(b"joe@test.example", [b"alice@test.example"], b"n: %d\n" % i)
        await agents.until(lambda: agents.in_flight == 3)
        assert b"status: local 3/3 remote 0/20" in h.log
        agents.gate.set()
        await h.settle()

    h = run(home2, body, agents)
    assert agents.max_in_flight == 3
    assert len(h.agents.calls) == 10


def test_verp_sender_expanded_per_recipient(home2: Home) -> None:
    async def body(h: Harness) -> None:
        await h.queue(b"owner-@list.example-@[]", [b"a@remote.example", b"b@remote.example"])
        await h.settle()

    h = run(home2, body)
    assert sorted((s, r) for _, s, r, _ in h.agents.calls) == [
        ("owner-a=remote.example@list.example", "a@remote.example"),
        ("owner-b=remote.example@list.example", "b@remote.example"),
    ]


def test_restart_rebuilds_schedule_from_mtimes(home2: Home) -> None:
    agents = Agents()
    agents.script["later@remote.example"] = [Outcome.temp("later\n")]
    paths = QueuePaths(home2.queue)
    num: list[int] = []

    async def first(h: Harness) -> None:
        num.append(
            await h.queue(b"joe@test.example", [b"later@remote.example", b"alice@test.example"])
        )
        await h.settle()

    run(home2, first, agents)
    n = num[0]
    assert paths.remote(n).exists() and not paths.local(n).exists()
    birth = int(paths.info(n).stat().st_mtime)
    assert paths.remote(n).stat().st_mtime >= birth + 400  # next try persisted at TERM

    agents2 = Agents()

    async def second(h: Harness) -> None:
        (entry,) = list(h.sched._heaps[REMOTE])
        assert entry.num == n and entry.when == paths.remote(n).stat().st_mtime
        assert len(h.sched._heaps[LOCAL]) == 0
        os.utime(paths.remote(n), (0, 0))
        h.sched.alarm()
        await h.settle()

    run(home2, second, agents2)
    assert [c[2] for c in agents2.calls] == ["later@remote.example"]
    assert queue_files(home2) == []


def test_only_one_scheduler(home2: Home) -> None:
    async def body(h: Harness) -> None:
        other = Scheduler(home2, lambda: load(home2), local=h.agents.local, remote=h.agents.remote,
                          log=SendLog(io.BytesIO()))  # fmt: skip
        with pytest.raises(StartError, match="already running"):
            await other.start()

    run(home2, body)


def test_trigger_fifo_wakes_the_scheduler(home2: Home) -> None:
    async def body(h: Harness) -> None:
        writer = QueueWriter(home2)  # no notify: pokes lock/trigger like qmail-queue

        def put() -> int:
            p = writer.begin()
            p.write(b"x\n")
            return p.commit(b"joe@test.example", [b"alice@test.example"])

        await asyncio.get_running_loop().run_in_executor(None, put)
        await h.agents.until(lambda: bool(h.agents.calls))
        await h.settle()

    h = run(home2, body)
    assert [c[2] for c in h.agents.calls] == ["alice@test.example"]


def test_todo_left_by_crash_is_picked_up_at_start(home2: Home) -> None:
    writer = QueueWriter(home2, notify=lambda n: None)
    p = writer.begin()
    p.write(b"y\n")
    n = p.commit(b"joe@test.example", [b"alice@test.example"])
    paths = QueuePaths(home2.queue)
    # a crash during an earlier preprocessing left a partial info and local file
    paths.info(n).write_bytes(b"Fpartial")
    paths.local(n).write_bytes(b"Tjunk@x")

    async def body(h: Harness) -> None:
        await h.settle()

    h = run(home2, body)
    assert [c[2] for c in h.agents.calls] == ["alice@test.example"]
    assert queue_files(home2) == []


def test_no_recipients_is_done_at_once(home2: Home) -> None:
    async def body(h: Harness) -> None:
        await h.queue(b"joe@test.example", [])
        await h.settle()

    h = run(home2, body)
    assert h.agents.calls == []
    assert any(line.startswith(b"end msg ") for line in h.log)
    assert queue_files(home2) == []


def test_agent_exception_is_a_deferral(home2: Home) -> None:
    agents = Agents()

    async def broken(mess: Path, sender: str, rcpts: list[str]) -> list[Outcome]:
        raise RuntimeError("boom")

    agents.remote = broken  # type: ignore[method-assign]
    paths = QueuePaths(home2.queue)

    async def body(h: Harness) -> None:
        n = await h.queue(b"joe@test.example", [b"x@remote.example"])
        await h.settle()
        assert paths.remote(n).read_bytes() == b"Tx@remote.example\0"

    h = run(home2, body, agents)
    assert any(b": deferral: Sorry,_an_internal_error" in line for line in h.log)


def test_direct_delivery_writes_no_info_and_keeps_todo_until_done(home2: Home) -> None:
    paths = QueuePaths(home2.queue)
    seen: list[tuple[bool, bool]] = []
    agents = Agents()
    plain = agents.local

    async def watching(mess: Path, sender: str, rcpt: str) -> Outcome:
        n = int(mess.name)
        seen.append((paths.todo(n).exists(), paths.info(n).exists()))
        return await plain(mess, sender, rcpt)

    agents.local = watching  # type: ignore[method-assign]

    async def body(h: Harness) -> None:
        await h.queue(b"joe@test.example", [b"alice@test.example", b"bob@test.example"])
        await h.settle()

    h = run(home2, body, agents)
    assert seen == [(True, False), (True, False)]
    assert queue_files(home2) == []
    assert sum(line.startswith(b"end msg ") for line in h.log) == 1


def test_direct_delivery_deferral_falls_back_to_info_and_local(home2: Home) -> None:
    agents = Agents()
    agents.script["later@test.example"] = [Outcome.temp("mailbox busy\n")]
    paths = QueuePaths(home2.queue)

    async def body(h: Harness) -> None:
        n = await h.queue(b"joe@test.example", [b"alice@test.example", b"later@test.example"])
        await h.settle()
        assert not paths.todo(n).exists() and not paths.intd(n).exists()
        assert paths.info(n).read_bytes() == b"Fjoe@test.example\0"
        assert paths.local(n).read_bytes() == b"Dalice@test.example\0Tlater@test.example\0"
        (entry,) = list(h.sched._heaps[LOCAL])
        birth = int(paths.info(n).stat().st_mtime)
        assert entry.num == n and birth + 90 <= entry.when <= birth + 110
        agents.script["later@test.example"] = [Outcome.ok("ok\n")]
        h.sched.alarm()
        await h.settle()

    h = run(home2, body, agents)
    assert [c[2] for c in h.agents.calls] == [
        "alice@test.example",
        "later@test.example",
        "later@test.example",
    ]
    assert queue_files(home2) == []


@pytest.mark.parametrize("direct", [True, False])
def test_cleaner_does_every_todo_intd_mess_unlink(home2: Home, direct: bool) -> None:
    from pyqmail.queue.clean import handle_request

    paths = QueuePaths(home2.queue)
    asked: list[bytes] = []

    async def cleaner(kind: str, num: int) -> bool:
        req = f"{kind}/{num}".encode()
        asked.append(req)
        return handle_request(paths, req) == b"+"

    agents = Agents()
    agents.script["nobody@test.example"] = [Outcome.perm("no\n")]

    async def body(h: Harness) -> None:
        n1 = await h.queue(b"joe@test.example", [b"alice@test.example"])
        n2 = await h.queue(b"joe@test.example", [b"nobody@test.example"])
        await h.settle()
        assert f"todo/{n1}".encode() in asked and f"foop/{n1}".encode() in asked
        assert f"todo/{n2}".encode() in asked and f"foop/{n2}".encode() in asked

    h = run(home2, body, agents, direct=direct, cleaner=cleaner)
    assert len([c for c in h.agents.calls if c[2] == "joe@test.example"]) == 1  # the bounce
    assert queue_files(home2) == []


def test_reused_message_number_is_not_missed(home2: Home) -> None:
    """A finished message's mess inode can be reused at once by a new message; its notify
    arrives while the old number is still reserved and must not be lost."""
    paths = QueuePaths(home2.queue)
    reused: list[int] = []

    async def body(h: Harness) -> None:
        real = h.sched._direct._remove_finished

        def remove_then_reuse(nums: list[int]) -> None:
            real(nums)
            num = nums[0]
            if not reused:  # a new message gets the same number, as with a reused inode
                reused.append(num)
                paths.mess(num).write_bytes(b"Subject: reused\n\nx\n")
                paths.intd(num).write_bytes(b"u0\0p1\0Fjoe@test.example\0Tbob@test.example\0")
                os.link(paths.intd(num), paths.todo(num))
                h.sched.notify(num)

        h.sched._direct._remove_finished = remove_then_reuse  # type: ignore[method-assign]
        await h.queue(b"joe@test.example", [b"alice@test.example"])
        await h.settle()

    h = run(home2, body)
    assert [c[2] for c in h.agents.calls] == ["alice@test.example", "bob@test.example"]
    assert b"Subject: reused" in h.agents.calls[1][3]
    assert queue_files(home2) == []


@pytest.mark.parametrize(
    ("step", "direct"),
    [("_examine_batch", True), ("_examine_batch", False), ("_preprocess_batch", False)],
)
def test_an_internal_error_in_preprocessing_does_not_stop_the_scheduler(
    home2: Home, step: str, direct: bool
) -> None:
    # _examine_batch runs on the loop, _preprocess_batch (files to write) in a thread
    async def body(h: Harness) -> None:
        real = getattr(h.sched, step)
        calls = [0]

        def flaky(*args: object) -> object:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("a bug")
            return real(*args)

        setattr(h.sched, step, flaky)
        await h.queue(b"joe@test.example", [b"alice@test.example"])
        await h.agents.until(lambda: bool(h.agents.calls))
        await h.settle()
        assert calls[0] >= 2

    h = run(home2, body, direct=direct)
    assert [c[2] for c in h.agents.calls] == ["alice@test.example"]
    assert any(b"internal error in todo, restarting it" in line for line in h.log)


@pytest.mark.parametrize("direct", [True, False])
def test_notify_during_preprocessing_of_the_same_number_delivers_once(
    home2: Home, direct: bool
) -> None:
    async def body(h: Harness) -> None:
        real = h.sched._preprocess_batch
        loop = asyncio.get_running_loop()

        def renotifying(nums: list[int], *rest: object) -> object:
            for n in nums:  # a second wake-up for the same todo while it is being handled
                loop.call_soon_threadsafe(h.sched.notify, n)
            handled = threading.Event()  # the loop runs callbacks in order: notify first
            loop.call_soon_threadsafe(handled.set)
            assert handled.wait(10)
            return real(nums, *rest)  # type: ignore[arg-type]

        h.sched._preprocess_batch = renotifying  # type: ignore[method-assign,assignment]
        await h.queue(b"joe@test.example", [b"alice@test.example"])
        await h.settle()

    h = run(home2, body, direct=direct)
    assert [c[2] for c in h.agents.calls] == ["alice@test.example"]
    assert sum(line.startswith(b"new msg ") for line in h.log) == 1
    assert queue_files(home2) == []


def test_delivery_slots_go_to_one_waiter_at_a_time_in_order(home2: Home) -> None:
    """A freed slot is handed to the first waiter only; a waiter cancelled after it was
    handed one passes it on; a higher concurrency after HUP lets waiters through."""
    write_control(home2, "concurrencylocal", "2\n")

    async def main() -> None:
        h = Harness(home2, Agents())
        s = h.sched
        got: list[int] = []

        async def take(i: int) -> None:
            await s._acquire(LOCAL)
            got.append(i)

        await take(0)
        await take(1)
        tasks = [asyncio.create_task(take(i)) for i in range(2, 8)]
        for _ in range(3):
            await asyncio.sleep(0)
        assert got == [0, 1] and s._used[LOCAL] == 2
        assert len(s._slot_waiters[LOCAL]) == 6
        s._release(LOCAL)
        for _ in range(3):
            await asyncio.sleep(0)
        assert got == [0, 1, 2] and s._used[LOCAL] == 2  # one freed slot, one waiter through
        # 3 is handed the next slot but cancelled before it runs: 4 gets the slot
        s._release(LOCAL)
        tasks[1].cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        assert got == [0, 1, 2, 4] and s._used[LOCAL] == 2
        # a waiter cancelled while still in line leaves it without taking a slot
        tasks[3].cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        assert s._used[LOCAL] == 2 and len(s._slot_waiters[LOCAL]) == 2
        write_control(home2, "concurrencylocal", "10\n")
        assert s.reload()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert got == [0, 1, 2, 4, 6, 7] and s._used[LOCAL] == 4
        assert not s._slot_waiters[LOCAL]

    asyncio.run(main())
