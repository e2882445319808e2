"""QSBMF structure of one bounce paragraph for ANY failure text (send.md 6): a remote
server's reply, a program's output or a dying deferral may hold blank lines anywhere; the
paragraph must still be ``<rcpt>:`` + lines without an empty one + exactly one blank line.
(The daemon-level version is in test_daemon_delivery.py.)"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.remote.transmit import encode as wire_encode
from pyqmail.send.bounce import dying_text, paragraph


def _check(par: bytes, rcpt: bytes) -> None:
    assert par.startswith(b"<" + rcpt + b">:\n"), par
    assert par.endswith(b"\n\n"), par
    assert b"\n\n" not in par[:-1], par  # the only empty line is the final separator
    wire = wire_encode(par)  # and so it stays when the bounce goes out by SMTP
    assert wire.find(b"\r\n\r\n") == len(wire) - len(b"\r\n\r\n.\r\n"), wire


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab\n\r:<>/ ", max_size=40))
def test_any_text_keeps_the_paragraph_whole(text: str) -> None:
    _check(paragraph("r@x.example", text), b"r@x.example")
    _check(paragraph("r@x.example", dying_text(text)), b"r@x.example")


def test_known_hostile_texts() -> None:
    for text in ["x\n\n", "\n", "\n\n\n", "Remote host said: 550-first\n\n",
                 "a\n\n<forged@x.example>:\nfake\n\n", "", "x\n\r\n<forged@x.example>:\n",
                 "\r\n"]:  # fmt: skip
        _check(paragraph("r@x.example", text), b"r@x.example")


def test_newline_in_recipient_is_not_a_new_line() -> None:
    par = paragraph("r\n\n<forged@x.example>:@x.example", "no\n")
    _check(par, b"r__<forged@x.example>:@x.example")
