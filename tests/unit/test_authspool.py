"""smtp/authspool.py's HeaderFilter: incoming Authentication-Results fields that claim our
authserv-id are dropped while the message streams, in any chunking; nothing else changes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.queue.contract import Reply
from pyqmail.smtp.authcheck import AuthChecker, ConnectionChecks, Mode, Policy, SpfResult
from pyqmail.smtp.authspool import (
    CheckedSubmission,
    CheckingSubmitter,
    FilteredSubmission,
    HeaderFilter,
    claims,
)

ME = "mx.local.test"


def run(message: bytes, piece: int = 0, ar_max: int = 65536) -> tuple[bytes, int]:
    f = HeaderFilter(ME, ar_max=ar_max)
    step = piece or max(len(message), 1)
    out = b"".join(f.feed(message[i : i + step]) for i in range(0, len(message), step))
    return out + f.finish(), f.removed


OURS = b"Authentication-Results: mx.local.test; none\n"
NEAR = (
    b"Authentication-Results: mx.local.test.evil; none\n"
    b"Authentication-Results: x.mx.local.test; x\n\n"
)

CASES = [
    # (message, expected output)
    (
        b"Authentication-Results: mx.local.test; spf=pass smtp.mailfrom=a@b.c\nFrom: a@b.c\n\nhi\n",
        b"From: a@b.c\n\nhi\n",
    ),
    (b"authentication-results:   MX.Local.Test. ; dkim=pass\nX: 1\n\nhi\n", b"X: 1\n\nhi\n"),
    (
        b"Authentication-Results: other.example; spf=pass\n\nhi\n",
        b"Authentication-Results: other.example; spf=pass\n\nhi\n",
    ),
    # folded, the id on the continuation line, a comment first
    (
        b"X: 1\nAuthentication-Results:\n (forged) mx.local.test;\n\tspf=pass\nY: 2\n\nb\n",
        b"X: 1\nY: 2\n\nb\n",
    ),
    # not valid RFC 8601, but it claims us: it goes
    (b"Authentication-Results: mx.local.test; (((garbage\n\nb\n", b"\nb\n"),
    # a field that only starts like one, and one in the body, stay
    (
        b"Authentication-Results-X: mx.local.test; none\n\n" + OURS,
        b"Authentication-Results-X: mx.local.test; none\n\n" + OURS,
    ),
    # a header with no body and no final newline
    (b"A: 1\nAuthentication-Results: mx.local.test; none", b"A: 1\n"),
    (b"", b""),
    (b"\n\n" + OURS, b"\n\n" + OURS),
    # another id that has ours as a prefix or suffix stays
    (NEAR, NEAR),
]


@pytest.mark.parametrize("piece", [0, 1, 7])
@pytest.mark.parametrize(("message", "want"), CASES)
def test_filter(message: bytes, want: bytes, piece: int) -> None:
    assert run(message, piece)[0] == want


def test_several_forged_fields_all_go_and_are_counted() -> None:
    msg = b"".join(b"Authentication-Results: mx.local.test; spf=pass\n" for _ in range(5))
    out, removed = run(msg + b"Subject: s\n\nbody\n")
    assert out == b"Subject: s\n\nbody\n" and removed == 5


@pytest.mark.parametrize("piece", [0, 1000])
def test_an_overlong_field_is_judged_by_its_start(piece: int) -> None:
    cont = b"".join(b"\t" + b"x" * 70 + b"\n" for _ in range(2000))  # about 144 KB
    ours = b"Authentication-Results: mx.local.test;\n" + cont
    theirs = b"Authentication-Results: other.example;\n" + cont
    out, removed = run(ours + theirs + b"S: 1\n\nbody\n", piece, ar_max=4096)
    assert out == theirs + b"S: 1\n\nbody\n" and removed == 1


def test_a_100k_header_passes_through() -> None:
    header = b"".join(b"X-F-%d: %s\n" % (i, b"y" * 90) for i in range(1100))
    msg = header + b"Authentication-Results: mx.local.test; none\n\n" + b"z\n" * 10
    out, removed = run(msg, 4096)
    assert out == header + b"\n" + b"z\n" * 10 and removed == 1


@pytest.mark.parametrize(
    ("field", "want"),
    [
        (b"Authentication-Results: mx.local.test; none\n", True),
        (b'Authentication-Results: (c (nested)) "mx.local.test"; x\n', True),
        (b"Authentication-Results: other; spf=pass\n", False),
        (b"Authentication-Results:\n", False),
        (b"Authentication-Results: \\(mx.local.test\n", False),
    ],
)
def test_claims(field: bytes, want: bool) -> None:
    assert claims(field, ME) is want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"Authentication-Results: mx.local.test; none\n", b"Authentication-Results: o.example; none\n",
    b"\tcontinued\n", b"X: y\n", b"\n", b"body line\n", b"A", b"\r\n"]), max_size=20),
    st.integers(min_value=1, max_value=9))  # fmt: skip
def test_chunking_never_changes_the_result(parts: list[bytes], piece: int) -> None:
    msg = b"".join(parts)
    assert run(msg, piece) == run(msg)


class _Inner:
    """A queue submission that records what it gets."""

    def __init__(self, received: bytes) -> None:
        self.data = received
        self.committed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        self.committed = True
        return Reply(0)

    def abort(self) -> None:
        self.aborted = True


class _Queue:
    def __init__(self) -> None:
        self.opened: list[_Inner] = []

    def begin(self, *, origin: str = "network", received: bytes = b"") -> _Inner:
        self.opened.append(_Inner(received))
        return self.opened[-1]


def _checks(tmp_path: Path, policy: Policy) -> ConnectionChecks:
    c = AuthChecker(tmp_path, resolver="127.0.0.1:9").connection(policy, ME, "192.0.2.1")
    c.spf_results = [SpfResult("pass", "mailfrom", "b.test", "a@b.test")]
    return c


def test_spf_only_streams_into_the_queue_at_once(tmp_path: Path) -> None:
    """With DKIM and DMARC off the header is known at DATA: nothing is spooled."""
    q = _Queue()
    sub = CheckingSubmitter(q, _checks(tmp_path, Policy(dkim=Mode.OFF, dmarc=Mode.OFF)))  # type: ignore[arg-type]
    s = sub.begin(received=b"Received: x\n")
    assert isinstance(s, FilteredSubmission) and len(q.opened) == 1
    s.write(b"Authentication-Results: mx.local.test; spf=pass\nSubject: s\n\nbo")
    assert q.opened[0].data.endswith(b"Subject: s\n\nbo")  # already in the queue entry
    s.write(b"dy\n")
    assert asyncio.run(s.commit(b"a@b.test", [b"x@y"])) == Reply(0)  # type: ignore[arg-type]
    assert q.opened[0].data == (
        b"Received: x\nAuthentication-Results: mx.local.test;\n\tspf=pass smtp.mailfrom=a@b.test"
        b"\nSubject: s\n\nbody\n"
    )


def test_dmarc_on_spools_until_the_verdict(tmp_path: Path) -> None:
    q = _Queue()
    sub = CheckingSubmitter(q, _checks(tmp_path, Policy(dkim=Mode.OFF)))  # type: ignore[arg-type]
    s = sub.begin(received=b"Received: x\n")
    assert isinstance(s, CheckedSubmission)
    s.write(b"Subject: no From\n\nbody\n")
    assert len(q.opened) == 1 and q.opened[0].data == b""  # begun at DATA, nothing written
    assert asyncio.run(s.verdict()) is None
    assert asyncio.run(s.commit(b"a@b.test", [b"x@y"])) == Reply(0)
    assert q.opened[0].committed
    assert b"dmarc=permerror" in q.opened[0].data  # no From: DMARC cannot be evaluated
    assert q.opened[0].data.startswith(b"Received: x\nAuthentication-Results: mx.local.test;")
    assert q.opened[0].data.endswith(b"\nSubject: no From\n\nbody\n")


def test_a_refused_message_aborts_its_queue_entry(tmp_path: Path) -> None:
    q = _Queue()
    s = CheckingSubmitter(q, _checks(tmp_path, Policy())).begin()  # type: ignore[arg-type]
    s.write(b"From: x\n\n")
    s.abort()
    assert q.opened[0].aborted and q.opened[0].data == b""
