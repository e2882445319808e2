"""daemon/logjson.py: each log line becomes one JSON object."""

from __future__ import annotations

import json

import pytest

from pyqmail.daemon import logjson


@pytest.mark.parametrize(
    ("line", "level", "source"),
    [
        ("new msg 123", "info", "pyqmail"),
        ("alert: cannot start: qmail-send is already running", "alert", "pyqmail"),
        ("pyqmail run: warning: single-user mode as root", "warning", "pyqmail run"),
        ("pyqmail.smtpd.rcpt: refused RCPT TO:<v@x> from 127.0.0.2: 553 ...", "info",
         "pyqmail.smtpd.rcpt"),
        ("warning: trouble opening remote/7", "warning", "pyqmail"),
    ],
)  # fmt: skip
def test_record(line: str, level: str, source: str) -> None:
    r = logjson.record(line, 1e9 + 0.25)
    assert r == {"time": "2001-09-09T01:46:40.250Z", "level": level, "source": source,
                 "message": line}  # fmt: skip


def test_format_lines_is_one_json_object_per_line() -> None:
    raw = [b"status: local 0/10 remote 0/20\n", b"\n", b'bad \xff byte "quoted"\n', b"last"]
    out = list(logjson.format_lines(raw))
    assert len(out) == 3 and all(o.endswith(b"\n") and o.count(b"\n") == 1 for o in out)
    msgs = [json.loads(o)["message"] for o in out]
    assert msgs == ["status: local 0/10 remote 0/20", 'bad \\xff byte "quoted"', "last"]
