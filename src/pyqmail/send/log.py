"""qmail-send's log lines (qmail-log(5), send.md 8), byte for byte.

Owns the line formats and the ``safe`` transformation of variable parts (``\\n`` becomes
``/``; a byte below 33, above 126, or ``%`` becomes ``_``), so qmailanalog-style tools read
pyqmail's log as qmail's. Lines go to a binary stream (stderr by default), one write each,
so concurrent writers never interleave inside a line.
"""

from __future__ import annotations

import re
from typing import BinaryIO

from pyqmail.logsink import LogSink
from pyqmail.logsink import safe as safe  # qmail-send's logsafe, shared with smtp/

_MSG = re.compile(rb"\bmsg (\d+)")
_DELIVERY = re.compile(rb"\bdelivery (\d+)")


def _fields(data: bytes) -> dict[str, object]:
    """The ids a JSON reader follows a message by: ``msg`` and ``delivery`` numbers."""
    out: dict[str, object] = {}
    if (m := _MSG.search(data)) is not None:
        out["msg"] = int(m.group(1))
    if (m := _DELIVERY.search(data)) is not None:
        out["delivery"] = int(m.group(1))
    return out


class SendLog:
    """Writes qmail-send's lines to ``stream`` (a binary file; stderr's buffer by default),
    or through ``sink`` (logsink.py: the daemon's chosen format and stamps) when given.

    Inside a running event loop, the lines of one loop iteration are gathered and written
    with one ``write`` at its end (whole lines only, in order); elsewhere each line is
    written at once.
    """

    def __init__(self, stream: BinaryIO | None = None, *, sink: LogSink | None = None) -> None:
        self.sink = sink if sink is not None else LogSink(stream)
        self.stream: BinaryIO = self.sink.stream

    def line(self, data: bytes) -> None:
        self.sink.emit("send", data, _fields(data) if self.sink.json else None)

    def flush(self) -> None:
        """Write what was gathered (also called by the loop at the end of an iteration)."""
        self.sink.flush()

    def status(self, used: tuple[int, int], limit: tuple[int, int], exiting: bool) -> None:
        self.line(
            b"status: local %d/%d remote %d/%d%s"
            % (used[0], limit[0], used[1], limit[1], b" exitasap" if exiting else b"")
        )

    def new_msg(self, num: int) -> None:
        self.line(b"new msg %d" % num)

    def info_msg(self, num: int, size: int, sender: str, qp: int | None, uid: int | None) -> None:
        self.line(
            b"info msg %d: bytes %d from <%s> qp %d uid %d"
            % (num, size, safe(sender), qp or 0, uid or 0)
        )

    def starting(self, delivery: int, num: int, channel: str, recipient: str) -> None:
        self.line(
            b"starting delivery %d: msg %d to %s %s"
            % (delivery, num, channel.encode(), safe(recipient))
        )

    def result(self, delivery: int, letter: str, text: str) -> None:
        word = {"K": b"success", "Z": b"deferral", "D": b"failure"}.get(letter)
        if word is None:
            self.line(b"delivery %d: report mangled, will defer" % delivery)
        else:
            self.line(b"delivery %d: %s: %s" % (delivery, word, safe(text)))

    def bounce_msg(self, num: int, qp: int) -> None:
        self.line(b"bounce msg %d qp %d" % (num, qp))

    def end_msg(self, num: int) -> None:
        self.line(b"end msg %d" % num)

    def triple_bounce(self, num: int) -> None:
        self.line(b"triple bounce: discarding bounce/%d" % num)

    def alert(self, text: str) -> None:
        self.line(b"alert: " + text.encode("utf-8", "surrogateescape"))

    def warning(self, text: str) -> None:
        self.line(b"warning: " + text.encode("utf-8", "surrogateescape"))

    def unlink_warning(self, e: OSError) -> None:
        """qmail-send's ``warning: unable to unlink FILE: REASON`` for a failed removal."""
        self.warning(f"unable to unlink {e.filename}: {e.strerror}")

    def exiting(self) -> None:
        self.line(b"status: exiting")
