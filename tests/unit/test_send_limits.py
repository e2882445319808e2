"""send/limits.py: the per-destination bookkeeping, driven by a fake clock."""

from __future__ import annotations

import math

import pytest

from pyqmail.destlimits import Limit
from pyqmail.outcome import Outcome
from pyqmail.send.limits import DestinationLimiter, Verdict, rate_limit_reply, verdict


def test_concurrency_holds_until_one_ends() -> None:
    lim = Limit("slow.example", concurrency=2)
    dl = DestinationLimiter()
    assert dl.blocked(lim, 0) is None and dl.room(lim, 0) == 2
    dl.start(lim, 0)
    dl.start(lim, 1)
    assert dl.blocked(lim, 2) == math.inf and dl.room(lim, 2) == 0
    assert dl.finish("slow.example", 0, 3, Verdict.OTHER) is None
    assert dl.blocked(lim, 3) is None and dl.room(lim, 3) == 1


def test_rate_is_a_sliding_window_of_sixty_seconds() -> None:
    lim = Limit("big.example", rate=3)
    dl = DestinationLimiter()
    for t in (0.0, 10.0, 20.0):
        assert dl.blocked(lim, t) is None
        dl.start(lim, t)
        dl.finish(lim.key, t, t + 1, Verdict.OK)
    # three started within the last minute: the next may start when the first is 60 s old
    assert dl.blocked(lim, 30) == 60.0
    assert dl.room(lim, 30) == 0
    assert dl.blocked(lim, 59.9) == 60.0
    assert dl.blocked(lim, 60.0) is None and dl.room(lim, 60.0) == 1
    dl.start(lim, 60.0)
    assert dl.blocked(lim, 65) == 70.0
    # never more than `rate` starts in any 60 s
    starts = [0.0, 10.0, 20.0, 60.0]
    assert all(sum(1 for s in starts if t <= s < t + 60) <= 3 for t in starts)


def test_rate_and_concurrency_together() -> None:
    lim = Limit("d", concurrency=1, rate=2)
    dl = DestinationLimiter()
    dl.start(lim, 0)
    assert dl.blocked(lim, 1) == math.inf  # one at once
    dl.finish("d", 0, 1, Verdict.OK)
    dl.start(lim, 1)
    dl.finish("d", 1, 2, Verdict.OK)
    assert dl.blocked(lim, 2) == 60.0  # two per minute


def test_no_limits_never_block_and_a_hold_always_does() -> None:
    dl = DestinationLimiter()
    free = Limit("x")
    for t in range(100):
        assert dl.blocked(free, t) is None
        dl.start(free, t)
    assert dl.room(free, 100) is None
    assert dl.blocked(Limit("h", concurrency=0), 0) == math.inf
    assert dl.blocked(Limit("h", rate=0), 0) == math.inf
    assert dl.room(Limit("h", concurrency=0), 0) == 0


def test_backoff_starts_at_a_minute_doubles_and_is_capped() -> None:
    lim = Limit("g")
    dl = DestinationLimiter()
    now = 0.0
    seen = []
    for _ in range(8):
        dl.start(lim, now)
        got = dl.finish("g", now, now + 1, Verdict.RATE_LIMITED)
        assert got is not None
        seen.append(got)
        until = dl.blocked(lim, now + 1)
        assert until == now + 1 + got  # the whole destination waits
        assert dl.blocked(lim, until) is None
        now = until
    assert seen == [60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_success_resets_the_backoff() -> None:
    lim = Limit("g")
    dl = DestinationLimiter()
    dl.start(lim, 0)
    assert dl.finish("g", 0, 0, Verdict.RATE_LIMITED) == 60
    dl.start(lim, 60)
    assert dl.finish("g", 60, 61, Verdict.RATE_LIMITED) == 120
    dl.start(lim, 181)
    assert dl.finish("g", 181, 182, Verdict.OK) is None
    assert dl.blocked(lim, 182) is None
    dl.start(lim, 200)
    assert dl.finish("g", 200, 201, Verdict.RATE_LIMITED) == 60  # from the start again


def test_deliveries_in_flight_at_the_decision_do_not_double_it() -> None:
    lim = Limit("g", concurrency=5)
    dl = DestinationLimiter()
    for t in range(5):
        dl.start(lim, t)
    assert dl.finish("g", 0, 10, Verdict.RATE_LIMITED) == 60
    # the four others started before the back-off was decided: no further doubling, and a
    # success among them does not lift it either
    assert dl.finish("g", 1, 11, Verdict.RATE_LIMITED) is None
    assert dl.finish("g", 2, 12, Verdict.OK) is None
    assert dl.blocked(lim, 12) == 70
    dl.finish("g", 3, 13, Verdict.OTHER)
    dl.finish("g", 4, 14, Verdict.RATE_LIMITED)
    assert dl.blocked(lim, 69) == 70
    assert dl.room(lim, 70) == 5  # none in flight any more


def test_an_old_backoff_is_forgotten() -> None:
    lim = Limit("g")
    dl = DestinationLimiter()
    dl.start(lim, 0)
    dl.finish("g", 0, 0, Verdict.RATE_LIMITED)  # 60 s, until 60
    later = 60 + 3600 + 1
    dl.start(lim, later)
    assert dl.finish("g", later, later, Verdict.RATE_LIMITED) == 60


def test_cancel_gives_back_the_slot_and_the_start() -> None:
    lim = Limit("d", concurrency=1, rate=1)
    dl = DestinationLimiter()
    dl.start(lim, 5)
    assert dl.blocked(lim, 5) is not None
    dl.cancel("d", 5)
    assert dl.blocked(lim, 5) is None


def test_sweep_forgets_quiet_destinations() -> None:
    dl = DestinationLimiter()
    for i in range(50):
        lim = Limit(f"d{i}", rate=10)
        dl.start(lim, 0)
        dl.finish(lim.key, 0, 1, Verdict.OK)
    busy = Limit("busy", concurrency=3)
    dl.start(busy, 0)
    backing = Limit("b")
    dl.start(backing, 0)
    dl.finish("b", 0, 0, Verdict.RATE_LIMITED)
    assert len(dl) == 52
    dl.sweep(30)  # within the window: the stamps still count
    assert len(dl) == 52
    dl.sweep(61)
    assert set(dl.states(61)) == {"busy"}  # b's back-off (until 60) is over
    assert len(dl) == 2  # busy (in flight) and b (its interval remembered for an hour)
    dl.sweep(60 + 3601)
    assert len(dl) == 1


@pytest.mark.parametrize(
    ("text", "limited"),
    [
        ("Connected to 1.2.3.4 but greeting failed.\nRemote host said: 421 4.7.0 Try again "
         "later, closing connection.\n", True),
        ("Connected to 1.2.3.4 but sender was rejected.\nRemote host said: 421 too busy\n", True),
        ("1.2.3.4 does not like recipient.\nRemote host said: 450 4.7.1 rate limited\n", True),
        ("1.2.3.4 does not like recipient.\nRemote host said: 451-4.7.28 slow down\n", True),
        ("1.2.3.4 does not like recipient.\nRemote host said: 450 4.2.1 mailbox busy\n", False),
        ("1.2.3.4 does not like recipient.\nRemote host said: 451 4.3.0 try later\n", False),
        ("Connected to 1.2.3.4 but the TLS handshake failed. (#4.7.5)\n", False),
        ("Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n", False),
        ("1.2.3.4 does not like recipient.\nRemote host said: 4210 odd\n", False),
        ("1.2.3.4 does not like recipient.\nRemote host said: 451 4.7.1 greylisted, please try "
         "again later (#4.7.1)\n", False),
        ("x.\nRemote host said: 450 4.7.1 <a@b>: Recipient address rejected: Graylisted\n", False),
        ("x.\nRemote host said: 451 4.7.1 Grey-listing in action\n", False),
        ("x.\nRemote host said: 421 4.7.0 slow down\nRemote host said: 250 fine\n", True),
    ],
)  # fmt: skip
def test_rate_limit_replies(text: str, limited: bool) -> None:
    assert rate_limit_reply(text) is limited


def test_verdict_of_a_transaction() -> None:
    rl = Outcome.temp("x.\nRemote host said: 421 4.7.0 later\n")
    other = Outcome.temp("x.\nRemote host said: 451 busy\n")
    ok = Outcome.ok("1.2.3.4 accepted message.\nRemote host said: 250 ok\n")
    assert verdict([rl, rl]) is Verdict.RATE_LIMITED
    assert verdict([other, rl]) is Verdict.RATE_LIMITED
    assert verdict([rl, ok]) is Verdict.OK
    assert verdict([other]) is Verdict.OTHER
    assert verdict([Outcome.perm("Remote host said: 550 4.7.1 no")]) is Verdict.OTHER
