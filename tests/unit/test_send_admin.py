"""send/admin.py's pure parts: filters, access control, the JSON form, reading the queue."""

from __future__ import annotations

import os

import pytest

from pyqmail.home import Home
from pyqmail.queue import records
from pyqmail.queue.layout import QueuePaths
from pyqmail.send import admin
from pyqmail.send.admin import Attempt, Filter, MessageState, RecipientState


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
