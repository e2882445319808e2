"""``pyqmail run`` under systemd's ``Type=notify``: when READY=1, STATUS= and WATCHDOG=1 go out.

The datagrams themselves are sdnotify.py's. This module decides what they say and which
loop sends them, in both arrangements (daemon/run.py, daemon/split.py):

* READY=1 once every listener accepts and the scheduler has rebuilt its schedule;
* every :func:`beat_interval` seconds a STATUS= line (``queue N, local n/N, remote n/N,
  smtp sessions n``) and, under ``WatchdogSec=``, WATCHDOG=1 — sent from the event loop
  that does the work (:func:`beat`), so a loop that is stuck stops the pings and systemd
  restarts the service;
* STOPPING=1 when SIGTERM arrives.

Root mode has one event loop per part and systemd hears only the supervisor
(``NotifyAccess=main``: no delivery program in the service's cgroup can speak for it). So
the send and smtpd parts each write their status line on a pipe, once per beat, and the
supervisor's :class:`Relay` thread passes them on: READY=1 when each part has spoken once,
then WATCHDOG=1 only while every part keeps speaking.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable

from pyqmail.sdnotify import Notifier

STATUS_INTERVAL = 10.0  # seconds between STATUS= lines without a watchdog


def beat_interval(notifier: Notifier) -> float:
    """How often a loop speaks: every STATUS_INTERVAL, and twice per watchdog ping period
    (a quarter of WatchdogSec), so that a relayed ping is never late."""
    wd = notifier.watchdog_interval
    return STATUS_INTERVAL if wd is None else max(0.05, min(STATUS_INTERVAL, wd / 2))


async def beat(speak: Callable[[], None], interval: float) -> None:
    """Call ``speak`` every ``interval`` seconds from this loop, until cancelled."""
    while True:
        with contextlib.suppress(Exception):  # never the daemon's failure
            speak()
        await asyncio.sleep(interval)


def pipe_speaker(fd: int, status: Callable[[], str]) -> Callable[[], None]:
    """A root-mode part's ``speak``: its status line on the pipe to the supervisor."""

    def speak() -> None:
        line = status().replace("\n", " ").encode("utf-8", "replace")[:400] + b"\n"
        with contextlib.suppress(BlockingIOError):  # a slow supervisor: skip this beat
            os.write(fd, line)

    os.set_blocking(fd, False)
    return speak


class Relay:
    """The supervisor's side in root mode (see the module docstring): one daemon thread
    reading each part's pipe and speaking to systemd for all of them."""

    def __init__(self, notifier: Notifier, pipes: dict[str, int], interval: float) -> None:
        self.notifier = notifier
        self.pipes = dict(pipes)  # part name -> read end
        self.interval = interval
        self.latest: dict[str, str] = {}
        self.stopping = False
        self._ready = False
        self._heard: set[str] = set()  # parts heard since the last ping
        self._thread = threading.Thread(target=self._run, name="sd-notify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, status: str = "stopping") -> None:
        """SIGTERM: STOPPING=1 (safe from a signal handler: one datagram)."""
        self.stopping = True
        self.notifier.stopping(status)

    def _status(self) -> str:
        return "; ".join(self.latest[n] for n in sorted(self.latest) if self.latest[n])

    def _run(self) -> None:
        bufs = {name: b"" for name in self.pipes}
        last_ping = time.monotonic()
        while self.pipes:
            fds = {fd: name for name, fd in self.pipes.items()}
            try:
                readable, _, _ = select.select(list(fds), [], [], self.interval)
            except (OSError, ValueError):
                return
            for fd in readable:
                name = fds[fd]
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    data = b""
                if not data:  # the part is gone: the supervisor's waitpid deals with it
                    del self.pipes[name]
                    self.latest.pop(name, None)
                    continue
                bufs[name] += data
                *lines, bufs[name] = bufs[name].split(b"\n")
                if lines:
                    self.latest[name] = lines[-1].decode("utf-8", "replace")
                    self._heard.add(name)
            if self.stopping:
                continue
            if not self._ready:
                if self._heard >= set(self.pipes):
                    self._ready = True
                    self.notifier.ready(self._status())
                    self._heard.clear()
                    last_ping = time.monotonic()
                continue
            now = time.monotonic()
            if now - last_ping >= self.interval and self._heard >= set(self.pipes):
                self.notifier.watchdog(self._status())
                self._heard.clear()
                last_ping = now
