"""send/direct.py: which messages qualify, the held numbers and the budget.

Direct deliveries end to end (success, fallback to info/local, cleaner) are in
test_send_manager.py, which runs them through the scheduler.
"""

from __future__ import annotations

import io

from pyqmail.home import Home
from pyqmail.queue.layout import QueuePaths
from pyqmail.send.direct import DIRECT_MAX_RCPTS, DIRECT_PER_SLOT, DirectDeliveries, qualifies
from pyqmail.send.log import SendLog
from pyqmail.send.schedule import LOCAL, REMOTE


def test_qualifies_only_all_local_and_not_too_many() -> None:
    assert qualifies([(LOCAL, "a@x")])
    assert qualifies([(LOCAL, "a@x")] * DIRECT_MAX_RCPTS)
    assert not qualifies([(LOCAL, "a@x")] * (DIRECT_MAX_RCPTS + 1))
    assert not qualifies([(LOCAL, "a@x"), (REMOTE, "b@y")])
    assert not qualifies([])  # no recipients: finished at once, nothing to deliver


def deliveries(home: Home, enabled: bool = True) -> tuple[DirectDeliveries, list[int]]:
    released: list[int] = []
    d = DirectDeliveries(
        QueuePaths(home.queue),
        SendLog(io.BytesIO()),
        enabled=enabled,
        cleaner=None,
        spawn=lambda coro: coro.close(),
        on_release=released.append,
    )
    return d, released


def test_held_numbers_and_budget(home: Home) -> None:
    d, released = deliveries(home)
    assert d.budget(2) == 2 * DIRECT_PER_SLOT
    d.hold(5)
    job = d.start(5, "joe@x", ["a@x", "b@x"], now=1000)
    assert 5 in d and d.budget(2) == 2 * DIRECT_PER_SLOT - 1
    assert (job.channel, job.fd, job.dying) == (LOCAL, -1, False)
    assert [(r.offset, r.recipient, r.done) for r in job.records] == [
        (-1, "a@x", False),
        (-1, "b@x", False),
    ]
    assert job.retry == 1000 + 100  # nextretry for a message born now, local channel
    d.release(5)
    assert 5 not in d and released == [5]
    d.hold(6)
    d.drop(6)  # cancelled: forgotten without a release
    assert 6 not in d and released == [5]


def test_disabled_has_no_budget(home: Home) -> None:
    d, _ = deliveries(home, enabled=False)
    assert d.budget(10) == 0
