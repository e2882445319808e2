"""``pyqmail run --log-format json``: every line the MTA writes to stderr, as one JSON object.

pyqmail run's processes log in qmail's plain style (qmail-send's lines, the listeners'
warnings, alerts) to fd 2, and so do the children they fork. Rather than teach every
writer a second format, :func:`start` puts a pipe on fd 2 before anything else starts and
forks one small formatter that turns each line into
``{"time": ISO-8601 UTC, "level": "alert"|"warning"|"info", "source": ..., "message": LINE}``
on the original stderr. So nothing can slip out unformatted, and a line is never split
(the pipe delivers whole lines of up to PIPE_BUF bytes atomically; longer ones are
still joined by the reader).

The formatter ignores INT, TERM and HUP and exits when the last writer has closed the pipe,
after the daemon. Started as root in multi-user mode it drops to qmaill (qmail's log
user) first, since it parses what the unprivileged parts wrote.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterable

from pyqmail.home import Home

_SOURCE = re.compile(r"^([A-Za-z][\w.-]*(?: [a-z-]+)?): ")


def record(line: str, now: float) -> dict[str, str]:
    """One log line as a JSON-ready object."""
    low = line.lower()
    level = "alert" if "alert:" in low else "warning" if "warning:" in low else "info"
    m = _SOURCE.match(line)
    source = m.group(1) if m and m.group(1) not in ("alert", "warning") else "pyqmail"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return {"time": stamp, "level": level, "source": source, "message": line}


def format_lines(lines: Iterable[bytes]) -> Iterable[bytes]:
    """JSON lines for raw log lines (bytes, with or without their newline)."""
    for raw in lines:
        text = raw.rstrip(b"\n").decode("utf-8", "backslashreplace")
        if text.strip():
            yield json.dumps(record(text, time.time()), ensure_ascii=False).encode() + b"\n"


def _formatter(rfd: int, out: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with os.fdopen(rfd, "rb") as src, os.fdopen(out, "wb", buffering=0) as dst:
        for data in format_lines(src):
            dst.write(data)


def _drop_to_log_user(home: Home) -> None:
    if os.geteuid() != 0 or home.single_user:
        return
    ids = home.ids()
    os.setgroups([])
    os.setgid(ids.gid("nofiles"))
    os.setuid(ids.uid("log"))


def start(home: Home) -> None:
    """Route this process's fd 2 (and its children's) through a JSON formatter process."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the formatter process (tested through pyqmail run)
        code = 0
        try:
            os.close(wfd)
            out = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # its own errors must not feed its own pipe
            os.close(devnull)
            _drop_to_log_user(home)
            _formatter(rfd, out)
        except BaseException:
            code = 111
        finally:
            os._exit(code)
    os.close(rfd)
    os.dup2(wfd, 2)
    os.close(wfd)
