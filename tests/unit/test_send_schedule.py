"""send/schedule.py: qmail's retry formula (send.md 3.3) and the priority queue."""

from __future__ import annotations

import random

import pytest

from pyqmail.send.schedule import LOCAL, REMOTE, Entry, PrioQueue, dying, nextretry


@pytest.mark.parametrize(
    ("k", "local", "remote"),
    [(0, 0, 0), (1, 100, 400), (2, 400, 1600), (3, 900, 3600), (4, 1600, 6400),
     (5, 2500, 10000), (10, 10000, 40000), (20, 40000, 160000), (38, 144400, 577600)],
)  # fmt: skip
def test_on_time_passes_follow_the_table(k: int, local: int, remote: int) -> None:
    birth = 1_000_000
    # a pass exactly at attempt k schedules attempt k+1
    assert nextretry(birth, birth + local, LOCAL) - birth == ((k + 1) * 10) ** 2
    assert nextretry(birth, birth + remote, REMOTE) - birth == ((k + 1) * 20) ** 2


def test_late_pass_recomputes_from_its_own_start() -> None:
    birth = 0
    # pass at 150 s (late for the 100 s slot): isqrt(150)=12, (12+10)^2 = 484
    assert nextretry(birth, 150, LOCAL) == 484
    assert nextretry(birth, 401, REMOTE) == (20 + 20) ** 2


def test_clock_skew_birth_in_future() -> None:
    assert nextretry(1000, 500, LOCAL) == 1100
    assert nextretry(1000, 500, REMOTE) == 1400


def test_remote_attempts_in_seven_days_about_39() -> None:
    t, birth, n = 0, 0, 0
    while t <= 604800:
        n += 1
        t = nextretry(birth, t, REMOTE)
    assert n == 39


def test_dying_only_after_lifetime() -> None:
    assert not dying(100, 100 + 604800, 604800)
    assert dying(100, 100 + 604801, 604800)


def test_prioq_pops_in_time_order() -> None:
    q = PrioQueue()
    rnd = random.Random(7)
    items = [(rnd.randrange(1000), n) for n in range(500)]
    for when, n in items:
        q.push(when, n)
    out = []
    while q.peek() is not None:
        e = q.pop()
        out.append((e.when, e.num))
    assert out == sorted(items)


def test_prioq_reschedule_all_makes_everything_due() -> None:
    q = PrioQueue.from_entries([])
    for n in range(10):
        q.push(1000 + n, n)
    q.reschedule_all(5)
    assert len(q) == 10
    assert all(e.when == 5 for e in q)
    assert q.peek() is not None and q.peek().when == 5  # type: ignore[union-attr]


def test_remove_takes_out_one_message_and_keeps_the_heap_order() -> None:
    q = PrioQueue()
    for when, num in [(5.0, 1), (3.0, 2), (9.0, 1), (1.0, 3), (4.0, 4)]:
        q.push(when, num)
    assert sorted(q.remove(1)) == [Entry(5.0, 1), Entry(9.0, 1)]
    assert q.remove(1) == []
    assert [q.pop().num for _ in range(len(q))] == [3, 2, 4]
