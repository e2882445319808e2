"""The listeners of a one-user ``pyqmail run`` in a process of their own.

qmail runs qmail-smtpd apart from qmail-send; ``pyqmail run`` as root does too
(daemon/split.py). A single-user or ordinary user's ``pyqmail run`` used to keep the SMTP,
QMQP and QMTP listeners in the scheduler's event loop, where each SMTP reply waited
behind the scheduler's work and one interpreter did both jobs on one core. Here they
run in a child forked before any thread exists, with its own event loop and its own
committer process (queue/committer.py), while the parent schedules and delivers: the
two halves run on two cores (docs/benchmarks/e2e.md has the figures).

Between the two, all on descriptors the fork made (same user, nothing else holds them):

* **new messages**: for each message it queued the child writes its number (``=Q``) on a
  socket pair, gathered per loop iteration; the parent hands each to the scheduler's
  ``notify`` (what the in-process writer did before). If that socket fails the child
  pokes lock/trigger instead, and the scheduler finds the message by its todo/ scan;
* **counters**: the SMTP counters (and the sessions open) as JSON lines on a second
  socket pair, sent when they change (daemon/http.py's StatsFeed), for ``--http`` and
  systemd's STATUS=;
* **life**: a pipe whose write end only the child holds: ``d`` once every listener is
  bound, or ``e`` and the reason it could not bind, then EOF when the child is gone (an
  unexpected EOF stops the daemon, as a lost part stops root mode's). The listeners
  accept nothing until the parent writes ``g`` on the message socket, once its
  scheduler holds lock/sendmutex: a second ``pyqmail run`` on the same queue takes no
  mail before it finds the first one and gives up.

Signals: the parent sends TERM (the listeners drain as before: sessions in DATA get their
reply, within control/timeoutdrain) and waits for the child before it stops the
scheduler; HUP is passed on. The child ignores INT (a terminal's Ctrl-C reaches the
whole group; the parent decides) and gets TERM if the parent dies (PR_SET_PDEATHSIG), so
no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Mapping

from pyqmail.daemon import http
from pyqmail.daemon.parts import RunConfig, RunError, SteadyControl, start_listeners
from pyqmail.eventloop import new_loop
from pyqmail.logsink import LogSink
from pyqmail.queue import submit as qsubmit
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import poke_trigger
from pyqmail.send.log import SendLog

NUM = struct.Struct("=Q")
STATS_INTERVAL = 0.2  # how often the child looks whether its counters changed
_PR_SET_PDEATHSIG = 1


class ListenerProcess:
    """The parent's handle on the listener child (module docstring)."""

    def __init__(self, cfg: RunConfig, sink: LogSink) -> None:
        self.cfg = cfg
        self.sink = sink
        self.pid: int | None = None
        self._feed: http.StatsFeed | None = None
        self._life: int | None = None
        self._nums: socket.socket | None = None
        self._stats: socket.socket | None = None
        self._buf = bytearray()
        self._tasks: set[asyncio.Task[None]] = set()
        self._gone: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ parent

    def start(self) -> None:
        """Fork the child (before any thread exists) and wait until it serves; RunError
        with the child's reason if it cannot bind."""
        try:
            life_r, life_w = os.pipe()
            nums_p, nums_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            stats_p, stats_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise RunError(f"unable to start the listener process: {e}") from e
        parent_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            for fd in (life_r, life_w):
                os.close(fd)
            for sock in (nums_p, nums_c, stats_p, stats_c):
                sock.close()
            raise RunError(f"unable to start the listener process: {e}") from e
        if pid == 0:  # the child
            code = 111
            try:
                os.close(life_r)
                nums_p.close()
                stats_p.close()
                code = _child_main(self.cfg, self.sink, parent_pid, life_w, nums_c, stats_c)
            except BaseException as e:  # report it; never return into the parent's code
                why = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
                with contextlib.suppress(Exception):
                    os.write(life_w, b"e" + why.encode("utf-8", "replace")[:400])
            finally:
                with contextlib.suppress(Exception):
                    self.sink.flush()
                os._exit(code)
        os.close(life_w)
        nums_c.close()
        stats_c.close()
        self.pid = pid
        self._life, self._nums, self._stats = life_r, nums_p, stats_p
        first = b""
        with contextlib.suppress(OSError):
            first = os.read(life_r, 512)
        if first[:1] != b"d":
            reason = first[1:].decode("utf-8", "replace") or "the listener process died"
            self._reap(block=True)
            self._close()
            raise RunError(reason)

    def attach(self, notify: Callable[[int], None], on_lost: Callable[[], None]) -> None:
        """In the parent's loop: new messages to ``notify``; ``on_lost`` if the child dies
        before ``stop``."""
        loop = asyncio.get_running_loop()
        assert self._nums is not None and self._life is not None and self._stats is not None
        self._nums.setblocking(False)
        gone: asyncio.Future[None] = loop.create_future()
        self._gone = gone

        def readable() -> None:
            assert self._nums is not None
            try:
                data = self._nums.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self._nums.fileno())
                return
            buf = self._buf
            buf += data
            end = len(buf) - len(buf) % NUM.size
            for (num,) in NUM.iter_unpack(bytes(buf[:end])):
                notify(num)
            del buf[:end]

        def life() -> None:
            assert self._life is not None
            with contextlib.suppress(OSError):
                if os.read(self._life, 512):
                    return
            loop.remove_reader(self._life)
            if not gone.done():
                gone.set_result(None)
                if self.pid is not None:  # not stopping: the child died on its own
                    self._reap(block=False)
                    on_lost()

        loop.add_reader(self._nums.fileno(), readable)
        loop.add_reader(self._life, life)
        self._feed = feed = http.StatsFeed(self._stats)
        t = loop.create_task(feed.read_forever())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def snapshot(self) -> Mapping[str, object]:
        """The child's latest SMTP counters (daemon/http.py's SmtpSnapshot)."""
        return self._feed.latest if self._feed is not None else {}

    def sessions(self) -> int:
        """SMTP sessions open in the child, as last reported."""
        n = self.snapshot().get("sessions", 0)
        return n if isinstance(n, int) else 0

    def go(self) -> None:
        """The scheduler runs: the listeners may accept connections now."""
        if self._nums is not None:
            with contextlib.suppress(OSError):
                self._nums.send(b"g")

    def hup(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGHUP)

    async def stop(self) -> None:
        """TERM the child and wait until it has drained and exited."""
        pid, self.pid = self.pid, None
        loop = asyncio.get_running_loop()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if self._gone is not None:
                await self._gone
            with contextlib.suppress(ChildProcessError):
                await loop.run_in_executor(None, os.waitpid, pid, 0)
        for t in list(self._tasks):
            t.cancel()
        self._close(loop)

    def _reap(self, *, block: bool) -> None:
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0 if block else os.WNOHANG)

    def _close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._nums is not None:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self._nums.fileno())
            self._nums.close()
            self._nums = None
        if self._life is not None:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self._life)
            os.close(self._life)
            self._life = None
        if self._stats is not None:
            self._stats.close()
            self._stats = None


# ---------------------------------------------------------------------- child


class _NumberLink:
    """The child's side of the new-message socket; lock/trigger when it fails."""

    def __init__(self, sock: socket.socket, trigger: str, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.trigger = trigger
        self.loop = loop
        self.out = bytearray()
        self.broken = False
        self._flushing = False
        self._blocked = False  # a tail waits for the socket to be writable

    def notify(self, num: int) -> None:
        """A message is in todo/ (from the loop, or a QMQP/QMTP worker thread)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._add(num)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: the scan finds it
                self.loop.call_soon_threadsafe(self._add, num)

    def _add(self, num: int) -> None:
        self.out += NUM.pack(num)
        if not self._flushing and not self._blocked:
            self._flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what is gathered (the socket is non-blocking: a tail that does not fit
        waits until the socket is writable; whole numbers only ever reach the parent
        in order, since the bytes go out in order)."""
        self._flushing = False
        if self.broken:
            self.out.clear()
            poke_trigger(self.trigger)
            return
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the parent is gone: lock/trigger and its todo/ scan instead
            self.broken = True
            self.out.clear()
            poke_trigger(self.trigger)
            return
        del self.out[:sent]
        if self.out:
            self._blocked = True
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        self._blocked = False
        self._flush()


def _set_pdeathsig() -> None:
    """TERM when the parent dies (Linux); elsewhere the parent's TERM alone stops us."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _child_main(
    cfg: RunConfig,
    sink: LogSink,
    parent_pid: int,
    life: int,
    nums: socket.socket,
    stats: socket.socket,
) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # before it serves, TERM may just end it
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)  # HUP: handled once the loop runs
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _set_pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before the line above
        return 111
    home = cfg.home
    log = SendLog(sink=sink)
    ctl = SteadyControl(home, log=log)
    trigger = str(QueuePaths(home.queue).trigger)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, ctl.refresh)
        link = _NumberLink(nums, trigger, loop)
        submitter = qsubmit.submitter(home, notify=link.notify)
        listeners = await start_listeners(
            cfg, ctl, submitter, warn=log.warning, sink=sink, serving=False
        )
        os.write(life, b"d")
        nums.setblocking(False)
        go = loop.create_task(loop.sock_recv(nums, 1))
        stopping = loop.create_task(stop.wait())
        await asyncio.wait((go, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not go.done() or go.exception() is not None or go.result() != b"g":
            go.cancel()  # TERM, or the parent gave up or died: never serve
            await listeners.close()
            return 0
        stopping.cancel()
        await listeners.start_serving()

        def snapshot() -> dict[str, object]:
            snap = dict(listeners.smtp.stats.snapshot())
            snap["sessions"] = len(listeners.smtp.sessions)
            return snap

        sending = loop.create_task(_send_changes(stats, snapshot))
        await stop.wait()
        await listeners.close()
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        log.flush()
        return 0

    loop = new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def _send_changes(sock: socket.socket, snapshot: Callable[[], dict[str, object]]) -> None:
    """The counters as a JSON line whenever they changed (checked every STATS_INTERVAL)."""
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    last = b""
    with contextlib.suppress(OSError, ConnectionError):
        while True:
            line = json.dumps(snapshot()).encode() + b"\n"
            if line != last:
                writer.write(line)
                await writer.drain()
                last = line
            await asyncio.sleep(STATS_INTERVAL)
