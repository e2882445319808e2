"""``pyqmail run`` started as root in multi-user mode: one process per qmail identity.

qmail-start's separation (layout.md 4 and 6), with the daemon's parts:

- **queue** (qmailq:qmail): the queue service (queue/service.py) on its Unix socket writes
  every new message (SMTP, bounces, local users' forwards), and a qmail-clean speaking
  qmail-clean's bytes (``todo/N``/``foop/N`` + NUL, one-byte reply) on a socket pair to
  the scheduler, since only the queue user may remove todo, intd and mess files;
- **send** (qmails:qmail): the scheduler and the remote agent; before dropping it starts
  the local spawner, which keeps root and drops to each recipient per delivery;
- **smtpd** (qmaild:nofiles): the SMTP, QMQP and QMTP listeners, bound as root, then dropped;
  control/servercert.pem is loaded before the drop and reloaded as qmaild (smtp/tls.py).
  SMTP's messages go to a committer process (queue/committer.py) started before the drop
  to run as qmailq:qmail, as qmail-queue runs setuid qmailq; QMQP and QMTP, and SMTP if
  that child dies, queue through the service. Either way the Received line says "invoked
  from network" and the envelope names qmaild's uid.

The supervisor stays root only to wait and to relay signals: TERM/INT stop the listeners,
then the scheduler (in-flight deliveries finish, bounded), then the queue; HUP goes to the
scheduler and the listeners; ALRM to the scheduler. If any part dies, the others are
stopped and the supervisor exits 111 (qmail-send's "lost connection ... dying").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from pyqmail.control import load
from pyqmail.home import HomeError, Ids
from pyqmail.local.spawn import LocalSpawner
from pyqmail.queue.clean import handle_request
from pyqmail.queue.committer import CommitProcess
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import clean_stale
from pyqmail.queue.service import QueueService, service_alive
from pyqmail.queue.submit import ServiceSubmitter
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.send.log import SendLog
from pyqmail.send.manager import Scheduler, StartError

READY_TIMEOUT = 30.0
CLEAN_INTERVAL = 76431.0  # qmail-send's period for removing what crashed writers left


class _Stop(Exception):
    """Raised by the supervisor's TERM/INT handler to leave its wait."""


def _drop(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("still root after dropping privileges")


def _child(target: Callable[[], int]) -> int:
    """Fork; the child runs ``target`` and never returns into the caller's code."""
    pid = os.fork()
    if pid == 0:
        code = 111
        try:
            code = target()
        except BaseException as e:  # never return into the supervisor's code
            with contextlib.suppress(Exception):
                print(f"alert: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)
    return pid


# -- queue: the service and qmail-clean ---------------------------------------------------


def _serve_clean(sock: socket.socket, paths: QueuePaths) -> None:
    """qmail-clean on a socket: NUL-terminated requests, one-byte replies, until EOF."""
    buf = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return
        buf += data
        while b"\0" in buf:
            req, buf = buf.split(b"\0", 1)
            sock.sendall(handle_request(paths, req))


def _queue_main(cfg_home: object, ids: Ids, clean_sock: socket.socket, ready: int) -> int:
    from pyqmail.home import Home

    assert isinstance(cfg_home, Home)
    home = cfg_home
    svc = QueueService(home, ids=ids)
    # a standalone queue service (qmail-queue --serve under systemd: users can queue while
    # pyqmail run is stopped) already answers: leave its socket to it
    serving = not service_alive(svc.path)
    if serving:
        svc.bind((ids.uid("queue"), ids.gid("qmail")))
    _drop(ids.uid("queue"), ids.gid("qmail"))
    os.umask(0o033)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()
        svc.close()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    paths = QueuePaths(home.queue)
    threading.Thread(target=_serve_clean, args=(clean_sock, paths), daemon=True).start()

    def sweep() -> None:  # what crashed writers left, as qmail-clean and qmail-send do
        while not stop.wait(CLEAN_INTERVAL):
            with contextlib.suppress(OSError):
                clean_stale(paths)

    threading.Thread(target=sweep, daemon=True).start()
    os.write(ready, b"q")
    os.close(ready)
    if not serving:
        stop.wait()
        return 0
    with contextlib.suppress(OSError):
        svc.serve_forever()
    return 0


class SocketCleaner:
    """The scheduler's side of qmail-clean: one request at a time over the socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock: asyncio.Lock | None = None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self, kind: str, num: int) -> bool:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._streams is None:
                self.sock.setblocking(False)
                self._streams = await asyncio.open_connection(sock=self.sock)
            reader, writer = self._streams
            writer.write(f"{kind}/{num}".encode() + b"\0")
            await writer.drain()
            try:
                reply = await reader.readexactly(1)
            except asyncio.IncompleteReadError as e:
                raise ConnectionError("lost qmail-clean connection") from e
            return reply == b"+"


# -- send: scheduler, remote agent, local spawner -----------------------------------------


def _send_main(home: object, ids: Ids, clean_sock: socket.socket, stop_timeout: float) -> int:
    from pyqmail.daemon.run import SteadyControl, _new_loop
    from pyqmail.home import Home

    assert isinstance(home, Home)
    log = SendLog()
    ctl = SteadyControl(home, log=log)
    spawner = LocalSpawner(home, ctl, message_owner=ids.uid("queue"))
    spawner.start()  # forks the root spawner before this process has threads
    # The remote agent runs in this process (qmails), not as qmailr: lock/tcpto is made
    # writable by group qmail so it can still remember unreachable hosts.
    tcpto = QueuePaths(home.queue).tcpto
    with contextlib.suppress(OSError):
        os.chown(tcpto, ids.uid("remote"), ids.gid("qmail"))
        os.chmod(tcpto, 0o664)
    _drop(ids.uid("send"), ids.gid("qmail"))
    os.umask(0o077)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        agent = RemoteAgent(home, ctl)
        agent.reset_tcpto()  # qmail-rspawn zeroes lock/tcpto when qmail starts
        sched = Scheduler(
            home,
            lambda: load(home),
            local=spawner.deliver,
            remote=agent.deliver,
            submitter=ServiceSubmitter(home),
            log=log,
            term_timeout=stop_timeout,
            cleaner=SocketCleaner(clean_sock),
        )
        stop = asyncio.Event()

        def hup() -> None:
            ctl.refresh()
            sched.reload()

        for sig, fn in ((signal.SIGTERM, stop.set), (signal.SIGHUP, hup),
                        (signal.SIGALRM, sched.alarm)):  # fmt: skip
            loop.add_signal_handler(sig, fn)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor relays a Ctrl-C as TERM
        try:
            await sched.start()
        except StartError as e:
            log.alert(f"cannot start: {e}")
            return 111
        await stop.wait()
        await sched.stop()
        await agent.close()
        await spawner.close()
        return 0

    loop = _new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# -- smtpd: the listeners -----------------------------------------------------------------


def _smtpd_main(home: object, ids: Ids, cfg: object, ready: int) -> int:
    from pyqmail.daemon.run import (
        RunConfig,
        SteadyControl,
        _DaemonSmtpServer,
        _new_loop,
        smtp_doors,
    )
    from pyqmail.home import Home

    assert isinstance(home, Home) and isinstance(cfg, RunConfig)
    ctl = SteadyControl(home)
    submitter = ServiceSubmitter(home)
    # SMTP's messages go to a committer process started now, as root, to run as the
    # queue's owner (what qmail-queue's setuid bit does); QMQP and QMTP, and SMTP once
    # that child is gone (qmaild cannot start another), use the queue service.
    committer = CommitProcess(
        home,
        user=(ids.uid("queue"), ids.gid("qmail")),
        envelope_uid=ids.uid("daemon"),
        fallback=submitter,
    )

    async def main() -> int:
        loop = asyncio.get_running_loop()
        servers: list[asyncio.AbstractServer] = []
        smtp = _DaemonSmtpServer(home, ctl, committer)
        for host, port in cfg.smtp:
            servers.append(await smtp.start(host, port))
        for door, addrs in smtp_doors(cfg):
            for host, port in addrs:
                servers.append(await smtp.start(host, port, door))
        if cfg.qmqp:
            from pyqmail.inject.qmqp import QmqpServer, loopback_only_note

            qmqp = QmqpServer(home, ctl, submitter)
            for host, port in cfg.qmqp:
                servers.append(await qmqp.start(host, port))
            if (note := loopback_only_note(home, qmqp.rules)) is not None:
                print(f"warning: {note}", file=sys.stderr, flush=True)
        if cfg.qmtp:
            from pyqmail.inject.qmtp import QmtpServer

            qmtp = QmtpServer(home, ctl, submitter)
            for host, port in cfg.qmtp:
                servers.append(await qmtp.start(host, port))
        # bound as root; nothing has been read from the network yet
        _drop(ids.uid("daemon"), ids.gid("nofiles"))
        os.write(ready, b"d")
        os.close(ready)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, ctl.refresh)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        await stop.wait()
        for s in servers:
            s.close()
        for s in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 5)
        await smtp.aclose()  # the messages being committed get their replies
        return 0

    loop = _new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# -- the supervisor ------------------------------------------------------------------------


def _wait_ready(fd: int, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        try:
            if os.read(fd, 1):
                os.close(fd)
                return
            break  # EOF: the child died before it was ready
        except BlockingIOError:
            time.sleep(0.01)
    os.close(fd)
    raise OSError(f"the {what} part did not come up")


def run_split(cfg: object) -> int:
    """Run the parts as separate processes under their qmail users; the exit code."""
    from pyqmail.daemon.run import RunConfig

    assert isinstance(cfg, RunConfig)
    home = cfg.home
    try:
        ids = home.ids()
    except HomeError as e:
        print(f"alert: cannot start: {e}", file=sys.stderr)
        return 111
    try:
        load(home)
    except Exception as e:
        print(f"alert: cannot start: unable to read controls: {e}", file=sys.stderr)
        return 111
    if not home.queue.is_dir():
        print(f"alert: cannot start: unable to switch to queue directory {home.queue}",
              file=sys.stderr)  # fmt: skip
        return 111
    clean_stale(QueuePaths(home.queue))
    clean_send, clean_queue = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pids: dict[str, int] = {}

    def term_all() -> None:
        for name in ("smtpd", "send", "queue"):
            pid = pids.get(name)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                pids.pop(name, None)

    r, w = os.pipe()
    pids["queue"] = _child(lambda: _queue_main(home, ids, clean_queue, w))
    os.close(w)
    clean_queue.close()
    try:
        _wait_ready(r, "queue")
    except OSError as e:
        print(f"alert: cannot start: {e}", file=sys.stderr)
        term_all()
        return 111
    pids["send"] = _child(lambda: _send_main(home, ids, clean_send, cfg.stop_timeout))
    clean_send.close()
    if cfg.smtp or cfg.smtps or cfg.submission or cfg.qmqp or cfg.qmtp:
        r, w = os.pipe()
        pids["smtpd"] = _child(lambda: _smtpd_main(home, ids, cfg, w))
        os.close(w)
        try:
            _wait_ready(r, "smtpd")
        except OSError as e:
            print(f"alert: cannot start: {e}", file=sys.stderr)
            term_all()
            return 111

    stopping = False

    def on_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        raise _Stop  # out of waitpid, which Python would otherwise resume

    def relay(signum: int, frame: FrameType | None) -> None:
        targets = ("send", "smtpd") if signum == signal.SIGHUP else ("send",)
        for name in targets:
            if name in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[name], signum)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, relay)
    signal.signal(signal.SIGALRM, relay)
    code = 0
    while not stopping:
        try:
            pid, status = os.waitpid(-1, 0)
        except _Stop:
            break
        except ChildProcessError:
            break
        name = next((n for n, p in pids.items() if p == pid), None)
        if name is None:
            continue
        pids.pop(name)
        if not stopping:
            print(f"alert: oh no! lost the {name} part (status {status})! dying...",
                  file=sys.stderr, flush=True)  # fmt: skip
            code = 111
            break
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one orderly stop, whatever comes now
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    term_all()
    return code
