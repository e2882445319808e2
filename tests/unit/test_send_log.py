"""send/log.py: qmail-send's log lines, byte for byte (send.md 8)."""

from __future__ import annotations

import io

from pyqmail.send.log import SendLog, safe


def lines(fn: object) -> list[bytes]:
    buf = io.BytesIO()
    log = SendLog(buf)
    fn(log)  # type: ignore[operator]
    return buf.getvalue().split(b"\n")[:-1]


def test_safe_substitutions() -> None:
    assert safe("did 1+0+0\n") == b"did_1+0+0/"
    assert safe("a%b\tc\x7f\xff") == b"a_b_c___"  # \xff is two utf-8 bytes
    assert safe(b"Sorry, I wasn't able (#4.4.1)\n") == b"Sorry,_I_wasn't_able_(#4.4.1)/"


def test_line_formats() -> None:
    out = lines(
        lambda log: (
            log.status((0, 1), (10, 20), False),
            log.status((0, 0), (10, 20), True),
            log.new_msg(131147),
            log.info_msg(131147, 2344, "joe@example.com", 12345, 1000),
            log.starting(1, 131147, "local", "joe@example.com"),
            log.result(1, "K", "did 1+0+0\n"),
            log.result(2, "Z", "Sorry, try later.\n"),
            log.result(3, "D", "Sorry, no mailbox here by that name. (#5.1.1)\n"),
            log.result(4, "?", "x"),
            log.bounce_msg(131147, 12350),
            log.end_msg(131147),
            log.triple_bounce(7),
            log.exiting(),
        )
    )
    assert out == [
        b"status: local 0/10 remote 1/20",
        b"status: local 0/10 remote 0/20 exitasap",
        b"new msg 131147",
        b"info msg 131147: bytes 2344 from <joe@example.com> qp 12345 uid 1000",
        b"starting delivery 1: msg 131147 to local joe@example.com",
        b"delivery 1: success: did_1+0+0/",
        b"delivery 2: deferral: Sorry,_try_later./",
        b"delivery 3: failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/",
        b"delivery 4: report mangled, will defer",
        b"bounce msg 131147 qp 12350",
        b"end msg 131147",
        b"triple bounce: discarding bounce/7",
        b"status: exiting",
    ]


def test_sender_with_space_is_made_safe() -> None:
    out = lines(lambda log: log.info_msg(1, 2, "a b@c", 3, 4))
    assert out == [b"info msg 1: bytes 2 from <a_b@c> qp 3 uid 4"]
