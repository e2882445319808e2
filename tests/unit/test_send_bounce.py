"""send/bounce.py: QSBMF bounces (send.md 4 and 6), byte for byte."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from pyqmail.home import Home
from pyqmail.queue.contract import Reply
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.records import write_info
from pyqmail.send.bounce import (
    BounceEnvelope,
    bounce_chunks,
    bounce_envelope,
    dying_text,
    paragraph,
    queue_bounce,
    quote,
    quote2,
    record_failure,
)
from pyqmail.send.log import SendLog


def test_paragraph_no_empty_line_inside() -> None:
    p = paragraph("joe@x.example", "1.2.3.4 does not like recipient.\n\nRemote host said: 550\n")
    assert p == b"<joe@x.example>:\n1.2.3.4 does not like recipient.\n/Remote host said: 550\n\n"
    assert paragraph("a\nb@x", "text") == b"<a_b@x>:\ntext\n\n"
    assert paragraph("a@x", "") == b"<a@x>:\n\n"


def test_dying_text() -> None:
    assert dying_text("Sorry.\n").endswith(
        "Sorry.\nI'm not going to try again; this message has been in the queue too long.\n"
    )
    assert dying_text("no newline") == (
        "no newline\nI'm not going to try again; this message has been in the queue too long.\n"
    )


def test_quote_as_qmail() -> None:
    assert quote(b"MAILER-DAEMON") == b"MAILER-DAEMON"
    assert quote(b"a b") == b'"a b"'
    assert quote(b".a") == b'".a"'
    assert quote(b"a..b") == b'"a..b"'
    assert quote(b'a"b') == b'"a\\"b"'
    assert quote(b"") == b'""'
    assert quote2(b"a b@x.example") == b'"a b"@x.example'
    assert quote2(b"") == b""
    assert quote2(b"joe@x") == b"joe@x"


def test_envelopes() -> None:
    assert bounce_envelope("joe@x", "postmaster@dbh") == BounceEnvelope("", "joe@x", False)
    assert bounce_envelope("o-@l-@[]", "pm@h") == BounceEnvelope("", "o-@l", False)
    assert bounce_envelope("", "postmaster@dbh") == BounceEnvelope("#@[]", "postmaster@dbh", True)
    assert bounce_envelope("#@[]", "postmaster@dbh") is None


def test_whole_bounce_bytes(tmp_path: Path) -> None:
    b = tmp_path / "bounce"
    m = tmp_path / "mess"
    b.write_bytes(
        paragraph("nobody@test.example", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    )
    m.write_bytes(b"Received: (qmail 1 invoked by uid 0); x\nSubject: hi\n\nbody\n")
    env = bounce_envelope("alice@test.example", "postmaster@mx")
    assert env is not None
    out = b"".join(
        bounce_chunks(env, "alice@test.example", b, m, bouncefrom="MAILER-DAEMON",
                      bouncehost="mx.test.example", date="26 Sep 1995 04:46:54 -0000")
    )  # fmt: skip
    assert out == (
        b"Date: 26 Sep 1995 04:46:54 -0000\n"
        b"From: MAILER-DAEMON@mx.test.example\n"
        b"To: alice@test.example\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at mx.test.example.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n"
        b"\n"
        b"<nobody@test.example>:\n"
        b"Sorry, no mailbox here by that name. (#5.1.1)\n"
        b"\n"
        b"--- Below this line is a copy of the message.\n"
        b"\n"
        b"Return-Path: <alice@test.example>\n"
        b"Received: (qmail 1 invoked by uid 0); x\nSubject: hi\n\nbody\n"
    )


def test_double_bounce_bytes(tmp_path: Path) -> None:
    b = tmp_path / "bounce"
    m = tmp_path / "mess"
    b.write_bytes(paragraph("joe@gone.example", "no.\n"))
    m.write_bytes(b"X: y\n\nz\n")
    env = bounce_envelope("", "postmaster@mx.test.example")
    assert env is not None
    out = b"".join(bounce_chunks(env, "", b, m, bouncefrom="MAILER-DAEMON",
                                 bouncehost="mx.test.example", date="D"))  # fmt: skip
    assert out == (
        b"Date: D\nFrom: MAILER-DAEMON@mx.test.example\nTo: postmaster@mx.test.example\n"
        b"Subject: failure notice\n\nHi. This is the qmail-send program at mx.test.example.\n"
        b"I tried to deliver a bounce message to this address, but the bounce bounced!\n\n"
        b"<joe@gone.example>:\nno.\n\n"
        b"--- Below this line is the original bounce.\n\nReturn-Path: <>\nX: y\n\nz\n"
    )


def test_cr_only_line_is_not_blank_on_the_wire() -> None:
    assert paragraph("r@x", "\r") == b"<r@x>:\n/\n\n"
    assert paragraph("r@x", "a\n\r\nb\n") == b"<r@x>:\na\n/\nb\n\n"
    assert paragraph("r@x", "a\r\nb\r\n") == b"<r@x>:\na\r\nb\r\n\n"  # CR LF lines untouched


def test_newline_in_sender_cannot_start_a_header(tmp_path: Path) -> None:
    b = tmp_path / "bounce"
    m = tmp_path / "mess"
    b.write_bytes(paragraph("x@y", "no\n"))
    m.write_bytes(b"Subject: s\n\nx\n")
    sender = "bob-x\nX-Evil: injected@test.example"
    env = bounce_envelope(sender, "pm@h")
    assert env is not None and env.recipient == sender  # the envelope keeps the address
    out = b"".join(bounce_chunks(env, sender, b, m, bouncefrom="MAILER-DAEMON",
                                 bouncehost="h", date="D"))  # fmt: skip
    assert b"\nX-Evil:" not in out
    assert b'\nTo: "bob-x_X-Evil: injected"@test.example\n' in out
    assert b'\nReturn-Path: <"bob-x_X-Evil: injected"@test.example>\n' in out


class _Pending:
    def __init__(self, sink: list[object]) -> None:
        self.qp = 77
        self.sink = sink
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def commit_blocking(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        self.sink.append((sender, list(recipients), self.data))
        return Reply(0, self.qp, 1)

    def abort(self) -> None:
        self.sink.append("aborted")


class _Submitter:
    def __init__(self) -> None:
        self.sink: list[object] = []

    def begin(self, *, origin: str = "uid", received: bytes = b"") -> _Pending:
        assert origin == "bounce"
        return _Pending(self.sink)


def _message(home: Home, num: int, sender: bytes) -> QueuePaths:
    paths = QueuePaths(home.queue)
    paths.mess(num).write_bytes(b"Subject: hi\n\nbody\n")
    write_info(paths.name("info", num), sender)
    return paths


def test_failures_recorded_then_bounce_queued_and_removed(home: Home) -> None:
    paths = _message(home, 400, b"joe@test.example")
    log = SendLog(io.BytesIO())
    assert record_failure(paths, 400, "a@x.example", "no such user\n", log)
    assert record_failure(paths, 400, "b@x.example", "mailbox full\n", log)
    sub = _Submitter()
    kw = {"bouncefrom": "MAILER-DAEMON", "bouncehost": "mx.test.example", "doublebounce": "@"}
    assert queue_bounce(paths, 400, sub, log, **kw) == (True, 77)
    ((sender, rcpts, data),) = sub.sink  # type: ignore[misc]
    assert (sender, rcpts) == (b"", [b"joe@test.example"])
    assert b"<a@x.example>:\nno such user\n\n<b@x.example>:\nmailbox full\n\n" in data
    assert data.endswith(b"Return-Path: <joe@test.example>\nSubject: hi\n\nbody\n")
    assert not paths.bounce(400).exists()


def test_triple_bounce_dropped_and_no_submitter_kept(home: Home) -> None:
    log = SendLog(io.BytesIO())
    kw = {"bouncefrom": "MAILER-DAEMON", "bouncehost": "h", "doublebounce": "postmaster@h"}
    paths = _message(home, 401, b"#@[]")
    record_failure(paths, 401, "a@x", "no\n", log)
    assert queue_bounce(paths, 401, None, log, **kw) == (True, None)
    assert not paths.bounce(401).exists()
    paths = _message(home, 402, b"joe@test.example")
    record_failure(paths, 402, "a@x", "no\n", log)
    assert queue_bounce(paths, 402, None, log, **kw) == (False, -1)  # tried again later
    assert paths.bounce(402).exists()
