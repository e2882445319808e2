"""queue/contract.py: the Reply value and the blocking submissions' commit, written once."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import pytest

from pyqmail.home import Home
from pyqmail.queue import codes
from pyqmail.queue.contract import BlockingSubmission, QueueError, Reply
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.submit import InProcessSubmitter


@pytest.mark.parametrize(
    ("reply", "result"),
    [
        (Reply(0, 12, 34), ("K", "ok")),
        (
            Reply(codes.ADDRESS_TOO_LONG, text="diagnostic"),
            ("D", "envelope address too long for qq (#5.1.3)"),
        ),
        (Reply(codes.CUSTOM_ERROR, text="Dno thanks"), ("D", "no thanks")),
        (Reply(codes.CUSTOM_ERROR, text="Zlater"), ("Z", "later")),
        (Reply(codes.CUSTOM_ERROR, text="D"), ("Z", "qq temporary problem (#4.3.0)")),
        (Reply(codes.CRASHED, text="killed by signal 9"), ("Z", "qq crashed (#4.3.0)")),
    ],
)
def test_reply_result_is_qmail_c_translation(reply: Reply, result: tuple[str, str]) -> None:
    """Only exit 82 lets the text decide; any other text is a diagnostic for the log."""
    assert reply.result() == result
    assert reply.ok == (result[0] == "K")
    if not reply.ok:
        assert reply.error().result() == result


def test_reply_of_an_error_keeps_its_custom_text() -> None:
    r = Reply.of(QueueError(codes.CUSTOM_ERROR, custom="Dgo away"), qp=9)
    assert (r.code, r.qp, r.custom, r.result()) == (82, 9, "Dgo away", ("D", "go away"))
    assert Reply.of(QueueError(codes.WRITE_ERROR, "disk full"), 3) == Reply(53, 3, 0, "disk full")


class _Fake(BlockingSubmission):
    def __init__(self, outcome: Exception | Reply) -> None:
        self.qp = 42
        self.outcome = outcome
        self.aborted = False

    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_commit_blocking_turns_failures_into_replies() -> None:
    assert _Fake(Reply(0, 42, 7)).commit_blocking(b"s", [b"r"]) == Reply(0, 42, 7)
    p = _Fake(QueueError(codes.TEMP_REFUSED))
    assert p.commit_blocking(b"s", [b"r"]).code == codes.TEMP_REFUSED and not p.aborted
    p = _Fake(ValueError("a bug"))  # never a traceback to a peer: qq internal bug (451)
    r = p.commit_blocking(b"s", [b"r"])
    assert (r.code, r.qp, p.aborted) == (codes.INTERNAL_BUG, 42, True)
    assert "a bug" not in r.text


def test_awaited_commit_runs_the_blocking_one() -> None:
    async def go() -> Reply:
        return await _Fake(QueueError(codes.PERM_REFUSED)).commit(b"s", [b"r"])

    assert asyncio.run(go()).code == codes.PERM_REFUSED


def test_in_process_commit_awaited_joins_the_commit_thread(home: Home) -> None:
    """From an event loop the writer's messages commit in one thread's batches."""
    sub = InProcessSubmitter(home)

    async def go() -> list[Reply]:
        ps = [sub.begin(origin="network") for _ in range(5)]
        for i, p in enumerate(ps):
            p.write(b"Subject: %d\n\n" % i)
        return list(await asyncio.gather(*(p.commit(b"s@x", [b"r@y"]) for p in ps)))

    replies = asyncio.run(go())
    assert all(r.ok and r.qp == os.getpid() for r in replies)
    nums = {r.msgnum for r in replies}
    assert len(nums) == 5
    assert {int(n) for n in os.listdir(home.queue / "todo")} == nums
    paths = QueuePaths(home.queue)
    assert all(b"invoked from network" in paths.mess(n).read_bytes() for n in nums)
