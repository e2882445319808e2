"""Where the daemon's log lines go, and in which form: qmail's text or one JSON object a line.

Owns the choice ``pyqmail run`` makes once with ``--log-format qmail|json`` and
``--log-stamps none|tai64n``, so every writer (qmail-send's lines in send/log.py, the SMTP
session lines in smtp/sessionlog.py, Python's logging and stray prints) comes out alike:

* ``qmail``: the line as qmail's programs write it (send.md 8), optionally preceded by a
  tai64n stamp (``@4000000065f0a1b2c3d4e5f6``) as multilog's ``t`` would add it;
* ``json``: ``{"ts": ..., "src": "send"|"smtp"|..., "line": <the qmail text>, ...fields}``,
  one object per line (a JSON string holds no raw newline), so a log shipper needs no parser;
  ``ts`` is an RFC 3339 UTC time, or the tai64n label when stamps are asked for.

Invariant: one call writes whole lines only; inside a running event loop the lines of one
loop iteration are gathered and written with one ``write`` (never interleaved inside a line).
Formatting happens only here, when a line is written: callers that may be switched off ask
``enabled`` first.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections.abc import Mapping
from typing import BinaryIO

FORMATS = ("qmail", "json")
STAMPS = ("none", "tai64n")
_SAFE = bytes(
    (0x2F if b == 0x0A else 0x5F if b < 33 or b > 126 or b == 0x25 else b) for b in range(256)
)


def safe(text: str | bytes) -> bytes:
    """A variable part as qmail-send writes it (``logsafe``)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    return raw.translate(_SAFE)


_TAI_BASE = (1 << 62) + 10  # tai64 label of 1970-01-01 00:00:10 TAI = 00:00:00 UTC


def tai64n(now: float) -> str:
    """The tai64n label of the UTC time ``now`` (daemontools' ``@`` + 24 hex digits)."""
    secs = int(now)
    nanos = int((now - secs) * 1e9)
    return f"@{_TAI_BASE + secs:016x}{nanos:08x}"


def rfc3339(now: float) -> str:
    """``2026-12-07T11:36:13.123456Z``."""
    micros = int((now % 1) * 1e6)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{micros:06d}Z"


class LogSink:
    """The daemon's log output (see the module docstring)."""

    def __init__(
        self,
        stream: BinaryIO | None = None,
        *,
        fmt: str = "qmail",
        stamps: str = "none",
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown log format {fmt!r} (qmail or json)")
        if stamps not in STAMPS:
            raise ValueError(f"unknown log stamps {stamps!r} (none or tai64n)")
        self.stream: BinaryIO = stream if stream is not None else sys.stderr.buffer
        self.json = fmt == "json"
        self.tai = stamps == "tai64n"
        self.enabled = True  # session lines may be switched off as a whole
        self._pending: list[bytes] = []

    def emit(self, src: str, text: bytes, fields: Mapping[str, object] | None = None) -> None:
        """Write one line: ``text`` is qmail's form, ``fields`` the extra JSON members."""
        if self.json:
            now = time.time()
            obj: dict[str, object] = {
                "ts": tai64n(now) if self.tai else rfc3339(now),
                "src": src,
                "line": text.decode("utf-8", "replace"),
            }
            if fields:
                obj.update(fields)
            data = json.dumps(obj, ensure_ascii=False, default=str).encode() + b"\n"
        elif self.tai:
            data = tai64n(time.time()).encode() + b" " + text + b"\n"
        else:
            data = text + b"\n"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here (a worker thread, a plain program): write now
            self._write(data)
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Write what was gathered (also called by the loop at the end of an iteration)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a log that cannot be written never stops mail


class LineWriter(io.TextIOBase):
    """A text stream whose every line becomes one ``sink.emit(src, line)``: what the
    daemon puts in place of ``sys.stderr``/``sys.stdout`` with ``--log-format json``, so
    Python's logging and any stray print are JSON lines too."""

    def __init__(self, sink: LogSink, src: str) -> None:
        super().__init__()
        self.sink = sink
        self.src = src
        self._part = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        text = self._part + s
        *lines, self._part = text.split("\n")
        for line in lines:
            self.sink.emit(self.src, line.encode("utf-8", "surrogateescape"))
        return len(s)

    def flush(self) -> None:
        self.sink.flush()
