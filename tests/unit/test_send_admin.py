"""send/admin.py: filters, access control, the JSON form, reading the queue, the direct
queue, and the scheduler's side of each action (send/manager.py's queue-manager section)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest

from pyqmail.home import Home
from pyqmail.outcome import Outcome
from pyqmail.queue import records
from pyqmail.queue.layout import QueuePaths
from pyqmail.send import admin
from pyqmail.send.admin import AdminError, Attempt, Filter, MessageState, RecipientState
from pyqmail.send.manager import Scheduler


def _msg(birth: float = 1000.0, held: bool = False) -> MessageState:
    return MessageState(
        7,
        birth,
        120,
        "Joe@Test.Example",
        held,
        False,
        [
            RecipientState("a@one.example", "remote", "done"),
            RecipientState("b@two.example", "remote", "deferred", 2, "451 later", 2000.0),
        ],
    )


@pytest.mark.parametrize(
    ("flt", "hit"),
    [
        (Filter(), True),
        (Filter(sender="joe@test.example"), True),
        (Filter(sender="other@test.example"), False),
        (Filter(rcpt="A@ONE.example"), True),
        (Filter(rcpt="c@one.example"), False),
        (Filter(domain="two.example"), True),
        (Filter(domain="@TWO.example"), True),
        (Filter(domain="one.example"), False),  # its recipient there is done already
        (Filter(older_than=500), True),
        (Filter(older_than=5000), False),
        (Filter(state="deferred"), True),
        (Filter(state="held"), False),
        (Filter(sender="joe@test.example", domain="one.example"), False),
    ],
)
def test_filter(flt: Filter, hit: bool) -> None:
    assert flt.matches(_msg(), now=2000.0) is hit


def test_filter_empty() -> None:
    assert Filter().empty() and not Filter(state="held").empty()


def test_json_round_trip() -> None:
    m = _msg(held=True)
    d = m.to_json()
    assert d["id"] == 7 and "headers" not in d
    assert d["recipients"][1] == {
        "address": "b@two.example",
        "channel": "remote",
        "state": "deferred",
        "tries": 2,
        "last_error": "451 later",
        "next_retry": 2000.0,
    }
    assert MessageState.from_json(d) == m


def test_caller_allowed() -> None:
    me = os.geteuid()
    assert admin.caller_allowed(0, 0, None)
    assert admin.caller_allowed(me, 12345, None)
    assert not admin.caller_allowed(654321, 654321, None) or me == 654321
    assert admin.caller_allowed(654321, 4242, 4242)  # primary group qmail
    assert not admin.caller_allowed(654321, 1, 4242)  # no such user: no other groups


def _queue(paths: QueuePaths, n: int, sender: bytes, remote: list[bytes]) -> None:
    paths.mess(n).write_bytes(b"Subject: s\nX: y\n\nbody\n\nmore\n")
    records.write_info(paths.info(n), sender)
    records.write_channel(paths.remote(n), remote, done=[True] + [False] * (len(remote) - 1))


def test_read_message_without_a_scheduler_says_unknown(home: Home) -> None:
    paths = QueuePaths(home.queue)
    _queue(paths, 99, b"s@x.example", [b"d@y.example", b"t@y.example"])
    os.utime(paths.remote(99), (5000, 5000))
    m = admin.read_message(paths, 99, held=False, history=None)
    assert m.sender == "s@x.example" and m.size == len(paths.mess(99).read_bytes())
    assert [(r.address, r.state, r.tries, r.next_retry) for r in m.recipients] == [
        ("d@y.example", "done", None, None),
        ("t@y.example", "queued", None, 5000.0),
    ]
    hist = {"t@y.example": Attempt(3, "451 no", 1.0)}
    m = admin.read_message(paths, 99, held=True, history=hist, next_try={1: 7.0})
    assert (m.recipients[1].state, m.recipients[1].tries) == ("held", 3)
    assert (m.recipients[1].last_error, m.recipients[1].next_retry) == ("451 no", 7.0)
    assert admin.read_headers(paths, 99) == "Subject: s\nX: y\n"
    assert admin.queued_numbers(paths) == [99]


def test_direct_queue_hold_retry_delete(home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    paths = QueuePaths(home.queue)
    _queue(paths, 41, b"s@x.example", [b"d@y.example", b"t@y.example"])
    q = admin.DirectQueue(home)
    assert q.lock()
    assert not admin.DirectQueue(home).lock()  # the send lock is exclusive, as qmail-send's
    assert q.act("hold", [41], None)[0].text == "held"
    assert q.states(None)[0].held
    assert not q.act("retry", [41], None)[0].ok
    assert q.act("release", [41], None)[0].ok and not q.states(None)[0].held
    os.utime(paths.remote(41), (1e10, 1e10))
    assert q.act("retry", [41], None)[0].ok
    assert os.stat(paths.remote(41)).st_mtime < 1e10
    assert [r.ok for r in q.act("delete", [41, 42], None)] == [True, False]
    assert not any(p.exists() for p in (paths.mess(41), paths.info(41), paths.remote(41)))
    assert "uid" in capsys.readouterr().err
    q.close()
    assert admin.DirectQueue(home).lock()


def test_connect_falls_back_to_the_queue_when_nothing_runs(home: Home) -> None:
    b = admin.connect(home)
    try:
        assert b.how == "direct" and b.states(None) == []
    finally:
        b.close()


# ---------------------------------------------------------------- the scheduler's side


class GatedRemote:
    """A remote agent that defers every recipient, waiting on ``gate`` when it is set."""

    def __init__(self) -> None:
        import asyncio

        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, mess: object, sender: str, rcpts: list[str]) -> list[Outcome]:
        self.calls += rcpts
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return [Outcome.temp("451 not now\n") for _ in rcpts]


def _sched_run(home: Home, body: Callable[[Scheduler, GatedRemote], Awaitable[None]]) -> bytes:
    import asyncio
    import io

    from pyqmail.control import ControlCache
    from pyqmail.queue.writer import QueueWriter
    from pyqmail.send.log import SendLog

    buf = io.BytesIO()

    async def main() -> None:
        remote = GatedRemote()

        async def local(mess: object, sender: str, rcpt: str) -> Outcome:
            return Outcome.ok("did 1+0+0\n")

        sched = Scheduler(home, ControlCache(home).get, local=local, remote=remote,
                          log=SendLog(buf), term_timeout=5, control_socket=True)  # fmt: skip
        sched.submitter = QueueWriter(home, notify=sched.notify)
        await sched.start()
        try:
            await body(sched, remote)
        finally:
            await sched.stop()

    asyncio.run(main())
    return buf.getvalue()


async def _queue_one(sched: Scheduler, rcpt: bytes) -> int:
    import asyncio

    def put() -> int:
        assert sched.submitter is not None
        p = sched.submitter.begin()
        p.write(b"Subject: t\n\nhi\n")
        return p.commit(b"s@x.example", [rcpt])

    num = await asyncio.get_running_loop().run_in_executor(None, put)
    for _ in range(500):
        if num in sched._pending_chan:
            return num
        await asyncio.sleep(0.01)
    raise AssertionError("not scheduled")


async def _until(cond: Callable[[], bool]) -> None:
    import asyncio

    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_scheduler_actions_during_a_delivery(home: Home) -> None:
    """hold, retry and delete that arrive while the message is being delivered take effect
    when that delivery ends; tries and the last error are remembered."""
    import asyncio

    paths = QueuePaths(home.queue)

    async def body(sched: Scheduler, remote: GatedRemote) -> None:
        remote.gate = asyncio.Event()
        held = await _queue_one(sched, b"h@far.example")
        await remote.entered.wait()
        assert "after the delivery" in await sched.admin_action("hold", held, None)
        remote.gate.set()
        await _until(lambda: held not in sched._running)
        assert all(e.num != held for e in sched._heaps[1])  # not rescheduled: held
        (m,) = sched.admin_states([held])
        assert m.held and m.recipients[0].tries == 1
        assert m.recipients[0].last_error == "451 not now"
        with pytest.raises(AdminError):
            await sched.admin_action("retry", held, None)
        assert await sched.admin_action("release", held, None) == "released"
        assert any(e.num == held for e in sched._heaps[1])
        # retry now: the next attempt starts at once
        n = len(remote.calls)
        assert await sched.admin_action("retry", held, None) == "due now"
        await _until(lambda: len(remote.calls) > n)
        # delete while in flight: done when the delivery ends
        remote.gate = asyncio.Event()
        remote.entered.clear()
        gone = await _queue_one(sched, b"d@far.example")
        await remote.entered.wait()
        assert "after the delivery" in await sched.admin_action("delete", gone, None)
        remote.gate.set()
        await _until(lambda: not paths.mess(gone).exists())
        assert not paths.info(gone).exists() and not paths.remote(gone).exists()
        with pytest.raises(AdminError, match="no message"):
            await sched.admin_action("hold", gone, None)

    log = _sched_run(home, body)
    assert b"end msg" in log


def test_scheduler_start_leaves_held_messages_out(home: Home) -> None:
    import asyncio

    nums: list[int] = []

    async def first(sched: Scheduler, remote: GatedRemote) -> None:
        nums.append(await _queue_one(sched, b"h@far.example"))
        await _until(lambda: bool(remote.calls))
        await _until(lambda: nums[0] not in sched._running)
        await sched.admin_action("hold", nums[0], None)

    _sched_run(home, first)

    async def second(sched: Scheduler, remote: GatedRemote) -> None:
        sched.alarm()  # everything due now: still not the held one
        await asyncio.sleep(0.2)
        assert remote.calls == [] and nums[0] in sched._held
        assert sched.admin_states(None)[0].held

    _sched_run(home, second)


def test_direct_delete_with_bounce_queues_one(home: Home) -> None:
    paths = QueuePaths(home.queue)
    _queue(paths, 43, b"s@x.example", [b"d@y.example", b"t@y.example", b"u@y.example"])
    q = admin.DirectQueue(home)
    assert q.lock()
    try:
        (r,) = q.act("delete", [43], "mail loop")
    finally:
        q.close()
    assert r.ok and r.text == "deleted and bounced"
    assert not any(p.exists() for p in (paths.mess(43), paths.info(43), paths.bounce(43)))
    (todo,) = list(paths.dir("todo").iterdir())  # the bounce, queued for the sender
    n = int(todo.name)
    text = paths.mess(n).read_text()
    assert (
        "<t@y.example>:\nThis message was deleted from the queue by the postmaster: mail loop"
        in text
    )
    assert "<u@y.example>:" in text and "<d@y.example>:" not in text  # d was done already
    assert b"Ts@x.example\0" in todo.read_bytes() or b"Ts@x.example\0" in paths.intd(n).read_bytes()


def test_retry_during_a_delivery_makes_one_more_attempt_only(home: Home) -> None:
    import asyncio

    async def body(sched: Scheduler, remote: GatedRemote) -> None:
        remote.gate = asyncio.Event()
        num = await _queue_one(sched, b"r@far.example")
        await remote.entered.wait()
        assert "again at once" in await sched.admin_action("retry", num, None)
        remote.gate.set()
        await _until(lambda: len(remote.calls) == 2)
        await asyncio.sleep(0.3)
        assert len(remote.calls) == 2  # then the usual schedule, not a loop
        (m,) = sched.admin_states([num])
        assert m.recipients[0].tries == 2 and m.recipients[0].state == "deferred"

    _sched_run(home, body)


def test_show_keeps_terminal_control_bytes_out() -> None:
    from pyqmail.cli.queuectl import _show, _table

    rec = RecipientState("r@x", "remote", "deferred", 1, "451 \x1b[31mred\r\nmore", None)
    m = MessageState(1, 0, 1, "a\x1b@b", False, False, [rec], "Subject: \x1b]0;evil\x07x\n")
    text = _show(m) + _table([m])
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "last error: 451 ?[31mred\n      more\n" in text
    assert "Subject: ?]0;evil?x" in text
