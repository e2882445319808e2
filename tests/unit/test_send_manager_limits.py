"""send/manager.py with control/destinationlimits: held-back deliveries, parking, back-off.

The scheduler with the real queue writer and in-test agents (tests/unit/test_send_manager.py's
harness); the remote agent here blocks per domain on a gate, so what is in flight at a
destination is observable. The limiter's arithmetic is tested in test_send_limits.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from pyqmail.home import Home
from pyqmail.outcome import Outcome
from pyqmail.send.schedule import REMOTE
from tests.conftest import write_control
from tests.unit.test_send_manager import Agents, Harness, queue_files, run


class GatedAgents(Agents):
    """Remote deliveries to a domain in ``gates`` wait for its event; counts what is in
    flight per domain (one SMTP transaction = one)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}
        self.flying: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.transactions: list[list[str]] = []

    async def remote(self, mess: Path, sender: str, rcpts: list[str]) -> list[Outcome]:
        dom = rcpts[0].rpartition("@")[2]
        self.flying[dom] = self.flying.get(dom, 0) + 1
        self.peak[dom] = max(self.peak.get(dom, 0), self.flying[dom])
        self.transactions.append(list(rcpts))
        self._touch()
        try:
            gate = self.gates.get(dom)
            if gate is not None:
                await gate.wait()
            return await super().remote(mess, sender, rcpts)
        finally:
            self.flying[dom] -= 1
            self._touch()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll the scheduler's state (parking is not an agent event) until ``cond()`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def remote_calls(agents: Agents, dom: str) -> list[str]:
    return [r for c, _, r, _ in agents.calls if c == "remote" and r.endswith("@" + dom)]


def setup(home: Home, limits: str, conc: int = 10) -> None:
    write_control(home, "locals", "test.example\n")
    write_control(home, "concurrencyremote", f"{conc}\n")
    write_control(home, "destinationlimits", limits)


def test_slow_destination_holds_only_its_own_slots(home: Home) -> None:
    setup(home, "slow.example:2:\n", conc=4)
    agents = GatedAgents()

    async def body(h: Harness) -> None:
        agents.gates["slow.example"] = asyncio.Event()
        for i in range(6):
            await h.queue(b"joe@test.example", [f"u{i}@slow.example".encode()])
        await until(lambda: agents.flying.get("slow.example") == 2)
        await until(lambda: len(h.sched._parked) == 4)
        # the other destination flows through the free slots meanwhile
        for i in range(5):
            await h.queue(b"joe@test.example", [f"v{i}@fast.example".encode()])
        await until(lambda: len(remote_calls(agents, "fast.example")) == 5)
        assert agents.flying["slow.example"] == 2 and not remote_calls(agents, "slow.example")
        assert h.sched.metrics.held_back == 4
        assert b"deferral" not in h.logbuf.getvalue()
        agents.gates["slow.example"].set()
        await until(lambda: len(remote_calls(agents, "slow.example")) == 6)
        await h.settle()

    h = run(home, body, agents)
    assert agents.peak["slow.example"] == 2
    assert sorted(remote_calls(agents, "slow.example")) == [f"u{i}@slow.example" for i in range(6)]
    assert h.sched.metrics.held_back == 0 and h.sched.metrics.held_total >= 4
    assert b"deferral" not in h.logbuf.getvalue()  # held back is not a failure
    assert queue_files(home) == []


def test_held_messages_get_no_retry_penalty_and_no_queue_write(home: Home) -> None:
    setup(home, "slow.example:1:\n")
    agents = GatedAgents()

    async def body(h: Harness) -> None:
        agents.gates["slow.example"] = asyncio.Event()
        await h.queue(b"joe@test.example", [b"a@slow.example"])
        await until(lambda: agents.flying.get("slow.example") == 1)
        num = await h.queue(b"joe@test.example", [b"b@slow.example"])
        await until(lambda: num in h.sched._parked)
        path = h.sched.paths.name("remote", num)
        before = Path(path).stat().st_mtime_ns
        assert num not in h.sched._attempts  # no try counted
        assert all(e.num != num for e in h.sched._heaps[REMOTE])
        for i in range(3):  # the scheduler keeps working meanwhile
            await h.queue(b"joe@test.example", [f"v{i}@fast.example".encode()])
        await until(lambda: len(remote_calls(agents, "fast.example")) == 3)
        assert num in h.sched._parked
        assert Path(path).stat().st_mtime_ns == before  # nothing written while it waited
        agents.gates["slow.example"].set()
        await until(lambda: len(remote_calls(agents, "slow.example")) == 2)
        await h.settle()

    run(home, body, agents)
    assert queue_files(home) == []


def test_rate_per_minute_parks_then_a_timer_sends_the_rest(home: Home) -> None:
    setup(home, "big.example::2\n")
    clock = Clock()
    agents = GatedAgents()

    async def body(h: Harness) -> None:
        for i in range(5):
            await h.queue(b"joe@test.example", [f"u{i}@big.example".encode()])
        await until(lambda: len(h.sched._parked) == 3)
        await h.settle()
        assert len(remote_calls(agents, "big.example")) == 2
        assert "big.example" in h.sched._dest_timers  # due when the first start is 60 s old
        clock.now += 61  # the fake clock moves; the test fires the timer's work itself
        h.sched._wake_dest("big.example")
        await until(lambda: len(remote_calls(agents, "big.example")) == 4)
        await h.settle()
        assert len(h.sched._parked) == 1
        clock.now += 61
        h.sched._wake_dest("big.example")
        await until(lambda: len(remote_calls(agents, "big.example")) == 5)
        await h.settle()

    run(home, body, agents, clock=clock)
    assert queue_files(home) == []


def test_rate_limit_reply_backs_off_the_whole_destination(home: Home) -> None:
    setup(home, "")  # no limits: the back-off applies to every destination
    clock = Clock()
    agents = GatedAgents()
    said = (
        "Connected to 127.0.0.1 but greeting failed.\nRemote host said: 421 4.7.0 Try again later\n"
    )
    agents.script["a@busy.example"] = [Outcome.temp(said), Outcome.ok("ok\n")]

    async def body(h: Harness) -> None:
        first = await h.queue(b"joe@test.example", [b"a@busy.example"])
        await until(lambda: len(agents.calls) == 1)
        await h.settle()
        assert any(
            line == b"destination busy.example: rate-limit reply; holding its deliveries "
            b"for 60 seconds"
            for line in h.log
        )
        # the message itself keeps qmail's retry schedule
        (entry,) = [e for e in h.sched._heaps[REMOTE] if e.num == first]
        assert entry.when > clock.now + 300
        # others for that destination wait for the back-off, not counted as attempts
        for i in range(3):
            await h.queue(b"joe@test.example", [f"b{i}@busy.example".encode()])
        await until(lambda: len(h.sched._parked) == 3)
        await h.settle()
        assert len(agents.calls) == 1
        # another destination is not affected
        await h.queue(b"joe@test.example", [b"c@calm.example"])
        await until(lambda: len(agents.calls) == 2)
        clock.now += 61
        h.sched._wake_dest("busy.example")
        await until(lambda: len(remote_calls(agents, "busy.example")) == 4)
        await h.settle()
        assert h.sched.limiter.backing_off("busy.example", clock.now) is None
        assert h.sched.metrics.backoffs == {"busy.example": 1}

    run(home, body, agents, clock=clock)


def test_split_pass_continues_without_retrying_what_it_tried(home: Home) -> None:
    """One message for three domains: fast delivered, other deferred, slow held back. When
    slow has room, the same pass goes on with slow only; other waits for its retry."""
    setup(home, "slow.example:1:\n")
    agents = GatedAgents()
    agents.script["d@other.example"] = [Outcome.temp("Remote host said: 451 later\n")]

    async def body(h: Harness) -> None:
        agents.gates["slow.example"] = asyncio.Event()
        await h.queue(b"joe@test.example", [b"a@slow.example"])
        await until(lambda: agents.flying.get("slow.example") == 1)
        num = await h.queue(
            b"joe@test.example", [b"b@slow.example", b"c@fast.example", b"d@other.example"]
        )
        await until(lambda: num in h.sched._parked)
        assert sorted(r for _, _, r, _ in agents.calls) == ["c@fast.example", "d@other.example"]
        agents.gates["slow.example"].set()
        await until(lambda: len(remote_calls(agents, "slow.example")) == 2)
        await h.settle()
        assert len(remote_calls(agents, "other.example")) == 1  # not again before its retry
        assert len(remote_calls(agents, "fast.example")) == 1
        assert num not in h.sched._carry
        (entry,) = [e for e in h.sched._heaps[REMOTE] if e.num == num]
        assert entry.when > time.time() + 300  # deferred: qmail's retry time

    run(home, body, agents)


def test_hup_puts_parked_messages_back_under_new_limits(home: Home) -> None:
    setup(home, "slow.example:0:\n")  # on hold
    agents = GatedAgents()

    async def body(h: Harness) -> None:
        for i in range(3):
            await h.queue(b"joe@test.example", [f"u{i}@slow.example".encode()])
        await until(lambda: len(h.sched._parked) == 3)
        await h.settle()
        assert not agents.calls
        write_control(home, "destinationlimits", "slow.example:1:\n")
        assert h.sched.reload()
        await until(lambda: len(agents.calls) == 3)
        await h.settle()
        assert agents.peak["slow.example"] == 1

    run(home, body, agents)
    assert queue_files(home) == []


def test_bad_lines_are_logged(home: Home) -> None:
    setup(home, "slow.example:x:\n")

    async def body(h: Harness) -> None:
        await h.settle()

    h = run(home, body)
    assert any(
        line.startswith(b"warning: control/destinationlimits:1: ") and b"not a number" in line
        for line in h.log
    )


def test_stop_writes_parked_messages_due_time(home: Home) -> None:
    setup(home, "slow.example:0:\n")
    clock = Clock()
    clock.now -= 5000  # the scheduler's time: the parked message was due then
    nums: list[int] = []

    async def body(h: Harness) -> None:
        nums.append(await h.queue(b"joe@test.example", [b"u@slow.example"]))
        await until(lambda: nums[0] in h.sched._parked)

    h = run(home, body, clock=clock)
    st = Path(h.sched.paths.name("remote", nums[0])).stat()
    assert abs(st.st_mtime - clock.now) < 1  # read back as its next try at the next start


def test_queue_manager_hold_release_retry_of_a_parked_message(home: Home) -> None:
    setup(home, "slow.example:0:\n")

    async def body(h: Harness) -> None:
        num = await h.queue(b"joe@test.example", [b"u@slow.example"])
        await until(lambda: num in h.sched._parked)
        assert [m.id for m in h.sched.admin_states([num])] == [num]  # listed
        assert await h.sched.admin_action("hold", num, None) == "held"
        assert num not in h.sched._parked and h.sched.metrics.held_back == 0
        assert all(e.num != num for e in h.sched._heaps[REMOTE])
        assert await h.sched.admin_action("release", num, None) == "released"
        await until(lambda: num in h.sched._parked)  # the destination is still on hold
        got = await h.sched.admin_action("retry", num, None)
        assert got == "due now (its destination's limits still apply)"
        await until(lambda: num in h.sched._parked)
        assert await h.sched.admin_action("delete", num, None) == "deleted"
        assert num not in h.sched._parked and num not in h.sched._carry
        await h.settle()

    h = run(home, body)
    assert not h.agents.calls
    assert queue_files(home) == []
