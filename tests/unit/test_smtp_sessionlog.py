"""smtp/sessionlog.py and the protocol's Note events: what each SMTP event logs and counts."""

from __future__ import annotations

import io
import json

import pytest

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.logsink import LogSink
from pyqmail.smtp import replies
from pyqmail.smtp.protocol import Note, Send, SmtpServerConnection
from pyqmail.smtp.session import Session
from pyqmail.smtp.sessionlog import RCPT_LINES, WINDOW, SessionLog, SmtpStats, reason_of
from tests.conftest import write_control


def _conn(home: Home) -> SmtpServerConnection:
    write_control(home, "rcpthosts", "test.example\n")
    c = SmtpServerConnection(Session(load(home), {"TCPREMOTEIP": "127.0.0.2"}))
    c.notes = True
    c.greet()
    return c


def test_notes_precede_their_replies_fed_byte_by_byte(home: Home) -> None:
    c = _conn(home)
    events = []
    for b in b"EHLO x\r\nMAIL FROM:<s@else.example>\r\nRCPT TO:<v@notours.example>\r\n":
        events += c.receive_data(bytes([b]))
    notes = [e for e in events if isinstance(e, Note)]
    assert [(n.verb, n.reply) for n in notes][1:] == [
        (b"mail", replies.OK),
        (b"rcpt", replies.NOT_RCPTHOSTS),
    ]
    i = events.index(notes[-1])
    assert events[i + 1] == Send(replies.NOT_RCPTHOSTS)


def test_no_notes_unless_asked(home: Home) -> None:
    c = _conn(home)
    c.notes = False
    events = c.receive_data(b"MAIL FROM:<s@x>\r\nRCPT TO:<v@notours.example>\r\n")
    assert not [e for e in events if isinstance(e, Note)]


def test_note_survives_the_error_limit_close(home: Home) -> None:
    c = _conn(home)
    c.receive_data(b"MAIL FROM:<s@else.example>\r\n")
    events = c.receive_data(b"RCPT TO:<v@notours.example>\r\n" * 20)
    assert len([e for e in events if isinstance(e, Note)]) == 20


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (replies.NOT_RCPTHOSTS, "rcpthosts"),
        (replies.BMF, "badmailfrom"),
        (replies.TOO_MANY_RCPTS, "too_many_rcpts"),
        (b"553 sorry, bad address (#5.1.3)\r\n", "syntax"),
        (b"550 sorry, no mailbox here by that name (#5.1.1)\r\n", "code_550"),
    ],
)
def test_reasons(reply: bytes, why: str) -> None:
    assert reason_of(reply) == why


def _log(fmt: str = "qmail", now: list[float] | None = None) -> tuple[SessionLog, io.BytesIO]:
    buf = io.BytesIO()
    clock = (lambda: now[0]) if now is not None else (lambda: 0.0)
    return SessionLog(LogSink(buf, fmt=fmt), SmtpStats(), "127.0.0.2", clock=clock), buf


def test_session_lines_and_counts() -> None:
    sl, buf = _log()
    sl.connect(True, {"RELAYCLIENT": ""})
    sl.note(b"rcpt", b"TO:<a@b.example>", replies.OK)
    sl.note(b"rcpt", b"TO:<v@x.example> SIZE=1", replies.NOT_RCPTHOSTS)
    sl.queued(True, 4242, 99, 120, "")
    sl.disconnect()
    lines = buf.getvalue().decode().splitlines()
    sid = sl.sid
    assert lines == [
        f"smtp {sid}: connect 127.0.0.2 rules allow relay yes",
        f"smtp {sid}: rcpt <a@b.example> accepted",
        f"smtp {sid}: rcpt <v@x.example> refused rcpthosts: "
        "553_sorry,_that_domain_isn't_in_my_list_of_allowed_rcpthosts_(#5.7.1)",
        f"smtp {sid}: queued msg 4242 qp 99 bytes 120",
        f"smtp {sid}: disconnect msgs 1 rcpts 1 refused 1 tls - auth -",
    ]
    snap = sl.stats.snapshot()
    assert snap["rcpts"] == {"accepted": 1, "rcpthosts": 1}
    assert snap["messages"] == {"accepted": 1} and snap["bytes_accepted"] == 120


def test_counts_without_lines() -> None:
    stats = SmtpStats()
    sl = SessionLog(None, stats, "10.0.0.1")
    sl.note(b"rcpt", b"TO:<v@x>", replies.NOT_RCPTHOSTS)
    sl.queued(False, 0, 0, 0, "qq temporary problem")
    assert stats.rcpts["rcpthosts"] == 1 and stats.messages["refused"] == 1


def test_refused_lines_are_rate_limited_per_session() -> None:
    now = [100.0]
    sl, buf = _log("json", now)
    for i in range(RCPT_LINES + 5):
        sl.note(b"rcpt", b"TO:<v%d@x>" % i, replies.NOT_RCPTHOSTS)
    now[0] += WINDOW
    sl.note(b"rcpt", b"TO:<late@x>", replies.NOT_RCPTHOSTS)
    sl.disconnect()
    objs = [json.loads(x) for x in buf.getvalue().splitlines()]
    events = [o["event"] for o in objs]
    assert events.count("rcpt") == RCPT_LINES + 1
    sup = [o for o in objs if o["event"] == "suppressed"]
    assert [o["suppressed"] for o in sup] == [5]
    assert events.index("suppressed") < [o.get("rcpt") for o in objs].index("late@x")
    assert sl.stats.rcpts["rcpthosts"] == RCPT_LINES + 6  # every refusal is still counted


def test_auth_attempts_are_logged_with_user_and_address_and_counted() -> None:
    log, buf = _log()
    log.auth_attempt("PLAIN", b"mallory", "failed")
    log.auth_attempt("LOGIN", b"bad\nuser two", "failed")
    log.auth_attempt("PLAIN", b"", "blocked")
    log.auth_attempt("PLAIN", b"alice", "ok")
    log.disconnect()
    lines = buf.getvalue().decode().splitlines()
    assert lines[0].endswith(": auth PLAIN mallory from 127.0.0.2 failed")
    assert "\n" not in lines[1] and lines[1].endswith(" from 127.0.0.2 failed")
    assert lines[2].endswith(": auth PLAIN - from 127.0.0.2 blocked")
    assert lines[4].endswith(" auth alice")
    assert log.stats.snapshot()["auth"] == {"failure": 2, "blocked": 1, "success": 1}


def test_auth_attempts_in_json() -> None:
    log, buf = _log(fmt="json")
    log.auth_attempt("LOGIN", b"alice", "temp")
    (obj,) = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert (obj["event"], obj["user"], obj["result"], obj["ip"]) == ("auth", "alice", "temp",
                                                                     "127.0.0.2")  # fmt: skip
