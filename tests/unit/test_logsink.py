"""logsink.py: qmail's lines, tai64n stamps, one JSON object a line, and stray prints."""

from __future__ import annotations

import io
import json

import pytest

from pyqmail.logsink import LineWriter, LogSink, safe, tai64n


def test_tai64n_label() -> None:
    # daemontools: 1970-01-01 00:00:00 UTC is TAI label 2^62 + 10
    assert tai64n(0.0) == "@400000000000000a00000000"
    assert tai64n(1.5) == "@400000000000000b1dcd6500"


def test_qmail_lines_as_given() -> None:
    buf = io.BytesIO()
    LogSink(buf).emit("send", b"new msg 7", {"msg": 7})
    assert buf.getvalue() == b"new msg 7\n"


def test_tai64n_stamps_each_line() -> None:
    buf = io.BytesIO()
    sink = LogSink(buf, stamps="tai64n")
    sink.emit("send", b"new msg 7")
    stamp, text = buf.getvalue().decode().split(" ", 1)
    assert stamp.startswith("@4000") and len(stamp) == 25 and text == "new msg 7\n"


def test_json_one_object_a_line() -> None:
    buf = io.BytesIO()
    sink = LogSink(buf, fmt="json")
    sink.emit("smtp", b"smtp 1: rcpt <a\nb@c> refused", {"rcpt": "a\nb@c"})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["src"] == "smtp" and obj["rcpt"] == "a\nb@c" and obj["ts"].endswith("Z")


def test_line_writer_makes_prints_json() -> None:
    buf = io.BytesIO()
    w = LineWriter(LogSink(buf, fmt="json"), "pyqmail")
    w.write("warning: one\nwarn")
    w.write("ing: two\n")
    assert [json.loads(x)["line"] for x in buf.getvalue().splitlines()] == [
        "warning: one",
        "warning: two",
    ]


def test_safe_is_qmail_logsafe() -> None:
    assert safe("a b%c\nd\x7f") == b"a_b_c/d_"


@pytest.mark.parametrize(("fmt", "stamps"), [("xml", "none"), ("qmail", "tai64")])
def test_unknown_choices_refused(fmt: str, stamps: str) -> None:
    with pytest.raises(ValueError):
        LogSink(io.BytesIO(), fmt=fmt, stamps=stamps)
