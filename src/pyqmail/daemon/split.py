"""``pyqmail run`` started as root in multi-user mode: one process per qmail identity.

The root arrangement of the parts in daemon/parts.py: it decides which process each part
runs in, as which user, and when each drops. qmail-start's separation (layout.md 4 and 6):

- **queue** (qmailq:qmail): the queue service (queue/service.py) on its Unix socket writes
  every new message (SMTP, bounces, local users' forwards), and a qmail-clean speaking
  qmail-clean's bytes (``todo/N``/``foop/N`` + NUL, one-byte reply) on a socket pair to
  the scheduler, since only the queue user may remove todo, intd and mess files;
- **send** (qmails:qmail): the scheduler; before dropping it starts the local spawner,
  which keeps root and drops to each recipient per delivery, and the remote agent
  (remote/agentproc.py), which runs as qmailr:qmail as qmail-rspawn does;
- **smtpd** (qmaild:nofiles): the SMTP, QMQP and QMTP listeners, bound as root but not
  listening (start_serving=False) until the process has dropped, so no client is ever
  accepted, nor a byte of it read, as root.
  control/servercert.pem is loaded before the drop and reloaded as qmaild (smtp/tls.py).
  SMTP AUTH's passwords are checked by a child that drops to qmailp (daemon/authproc.py):
  qmaild never reads control/authusers.
  SMTP's messages go to a committer process (queue/committer.py) started before the drop
  to run as qmailq:qmail, as qmail-queue runs setuid qmailq; QMQP and QMTP, and SMTP if
  that child dies, queue through the service. Either way the Received line says "invoked
  from network" and the envelope names qmaild's uid.

Root never names a path inside a directory that a qmail user owns (queue/, run/, lock/):
before the parts start, a child acting as qmailq (and qmails, just to look in info/)
removes what a crash left (queue/recover.py); root makes run/ through descriptors and
the queue part binds its socket there after its drop; lock/tcpto is qmailr's from init.

The supervisor stays root only to wait and to relay signals: TERM/INT stop the listeners,
then the scheduler (in-flight deliveries finish, bounded), then the queue; HUP goes to the
scheduler and the listeners; ALRM to the scheduler. If any part dies, the others are
stopped and the supervisor exits 111 (qmail-send's "lost connection ... dying").
Under systemd the supervisor is the service's main process and alone speaks to systemd;
the send and smtpd parts report to it on pipes (daemon/notify.py's Relay).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import BinaryIO, cast

from pyqmail.daemon import http, notify
from pyqmail.daemon.authproc import AuthProcess
from pyqmail.daemon.http import HttpAuth
from pyqmail.daemon.parts import (
    CleanSweep,
    RunConfig,
    RunError,
    SteadyControl,
    check_home,
    check_http,
    make_scheduler,
    start_http,
    start_listeners,
    start_sending,
    stop_sending,
)
from pyqmail.daemon.rcptlookup import LookupProcess
from pyqmail.eventloop import new_loop
from pyqmail.home import Home, HomeError, Ids
from pyqmail.local.spawn import LocalSpawner
from pyqmail.logsink import LogSink
from pyqmail.queue.clean import MAX_REQUEST, handle_request
from pyqmail.queue.committer import CommitProcess
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import clean_stale
from pyqmail.queue.service import QueueService, service_alive
from pyqmail.queue.submit import ServiceSubmitter
from pyqmail.remote.agentproc import RemoteProcess
from pyqmail.sdnotify import Notifier
from pyqmail.send import admin
from pyqmail.send.log import SendLog
from pyqmail.send.rcptverdict import rcpt_checks
from pyqmail.smtp.greylist import prepare_dir

READY_TIMEOUT = 30.0


class _Web:
    """What the send part needs for --http: the credentials checked at start-up, the log
    sink, and its end of the socket pair the smtpd part's counters arrive on."""

    def __init__(self, auth: HttpAuth | None, sink: LogSink) -> None:
        self.auth = auth
        self.sink = sink
        self.stats_sock: socket.socket | None = None


def _sink(cfg: RunConfig) -> LogSink:
    """The part's log output in the chosen form (sys.stderr may be run()'s LineWriter)."""
    stream = cfg.log
    if stream is None and sys.__stderr__ is not None:
        stream = cast(BinaryIO, sys.__stderr__.buffer)
    return LogSink(stream, fmt=cfg.log_format, stamps=cfg.log_stamps)


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
            for sig in (signal.SIGTERM, signal.SIGINT):  # not the supervisor's handlers
                signal.signal(sig, signal.SIG_DFL)
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


def _clean_at_start(home: Home, ids: Ids) -> None:
    """What a crash left in the queue, removed before any part starts, never as root.

    The queue's directories are qmailq's and info/ is qmails's, and the clean must look at
    both, so a child keeps root only as its real and saved uid (which neither user can
    signal or trace) and acts as qmailq, becoming qmails just to ask whether info/S/N
    exists. A symlink planted by either user then leads only to what that user may do.
    """
    queue, send, qmail = ids.uid("queue"), ids.uid("send"), ids.gid("qmail")

    def as_user(uid: int) -> None:
        os.seteuid(0)
        os.seteuid(uid)

    def info_exists(path: Path) -> bool:
        as_user(send)
        try:
            os.lstat(path)
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return True  # when in doubt, the message is queued
        finally:
            as_user(queue)

    def target() -> int:
        os.setgroups([])
        os.setgid(qmail)
        os.setresuid(0, queue, 0)
        os.umask(0o077)
        clean_stale(QueuePaths(home.queue), info_exists=info_exists)
        return 0

    pid = _child(target)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        print("warning: the start-up clean of the queue failed", file=sys.stderr, flush=True)


def _serve_clean(sock: socket.socket, paths: QueuePaths) -> None:
    """qmail-clean on a socket: NUL-terminated requests, one-byte replies in their order,
    until EOF. The requests of one read are answered with one write. An unfinished
    request is kept only up to the length that is refused anyway: the scheduler's
    account cannot make the queue's owner hold an unbounded line."""
    buf = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return
        *reqs, buf = (buf + data).split(b"\0")
        buf = buf[:MAX_REQUEST]  # still too long for handle_request once its NUL comes
        if reqs:
            sock.sendall(b"".join(handle_request(paths, req) for req in reqs))


def _queue_main(home: Home, ids: Ids, clean_sock: socket.socket, ready: int) -> int:
    svc = QueueService(home, ids=ids)
    svc.prepare_dir((ids.uid("queue"), ids.gid("qmail")))
    # Everything under queue/ and run/ is qmailq's: root touches no name in them.
    _drop(ids.uid("queue"), ids.gid("qmail"))
    os.umask(0o033)
    paths = QueuePaths(home.queue)
    # a standalone queue service (qmail-queue --serve under systemd: users can queue while
    # pyqmail run is stopped) already answers: leave its socket to it
    serving = not service_alive(svc.path)
    if serving:
        svc.bind()
    stop = threading.Event()
    sweep = CleanSweep(paths)  # what crashed writers left, as qmail-clean and qmail-send do

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()
        sweep.stop()
        svc.close()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    threading.Thread(target=_serve_clean, args=(clean_sock, paths), daemon=True).start()

    sweep.start()
    os.write(ready, b"q")
    os.close(ready)
    if not serving:
        stop.wait()
        return 0
    with contextlib.suppress(OSError):
        svc.serve_forever()
    return 0


class SocketCleaner:
    """The scheduler's side of qmail-clean, pipelined: a request goes out without waiting
    for the ones before it (those made in one loop iteration in one write), and the
    replies, which come back in order, settle the requests in order. Many deliveries that
    end together cost qmail-clean and the scheduler one wake-up, not two per message."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._out = bytearray()  # requests not yet sent
        self._flush_due = False
        self._writing = False
        self._lost = False

    async def __call__(self, kind: str, num: int) -> bool:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self.sock.setblocking(False)
            self._loop = loop
            loop.add_reader(self.sock.fileno(), self._readable)
        if self._lost:
            raise ConnectionError("lost qmail-clean connection")
        fut: asyncio.Future[bytes] = loop.create_future()
        self._waiting.append(fut)
        self._out += f"{kind}/{num}".encode() + b"\0"
        if not self._flush_due and not self._writing:
            self._flush_due = True
            loop.call_soon(self._flush)
        return await fut == b"+"

    def _flush(self) -> None:
        self._flush_due = False
        if self._lost or not self._out:
            return
        try:
            n = self.sock.send(self._out)
        except BlockingIOError:
            n = 0
        except OSError:
            self._fail()
            return
        del self._out[:n]
        if self._out and not self._writing and self._loop is not None:
            self._writing = True  # the socket is full: the rest when it drains
            self._loop.add_writer(self.sock.fileno(), self._drained)

    def _drained(self) -> None:
        if self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())
        self._writing = False
        self._flush()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._fail()
            return
        for i in range(len(data)):
            if not self._waiting:
                break  # a reply nobody asked for: ignored
            fut = self._waiting.popleft()
            if not fut.done():  # a cancelled caller's reply still takes its place
                fut.set_result(data[i : i + 1])

    def _fail(self) -> None:
        """qmail-clean is gone: every waiting request and every later one fails."""
        self._lost = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
                self._writing = False
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("lost qmail-clean connection"))


# -- send: scheduler, remote agent, local spawner -----------------------------------------


class _Beat:
    """A part's end of its status pipe to the supervisor (daemon/notify.py), if any."""

    def __init__(self, fd: int | None = None, interval: float = notify.STATUS_INTERVAL) -> None:
        self.fd = fd
        self.interval = interval

    def start(self, status: Callable[[], str]) -> asyncio.Task[None] | None:
        """From the part's event loop, once it is serving: report ``status`` every beat."""
        if self.fd is None:
            return None
        speak = notify.pipe_speaker(self.fd, status)
        return asyncio.get_running_loop().create_task(notify.beat(speak, self.interval))


def _send_main(
    home: Home,
    ids: Ids,
    clean_sock: socket.socket,
    cfg: RunConfig,
    web: _Web | None,
    beat: _Beat,
) -> int:
    stop_timeout = cfg.stop_timeout
    log = SendLog(sink=web.sink if web is not None else _sink(cfg))
    ctl = SteadyControl(home, log=log)
    spawner = LocalSpawner(home, ctl, message_owner=ids.uid("queue"))
    spawner.start()  # forks the root spawner before this process has threads
    # The remote agent runs as qmailr in a process of its own (qmail-rspawn's place),
    # holding lock/tcpto, which is qmailr's from init: root touches nothing in lock/.
    agent = RemoteProcess(home)
    agent.start((ids.uid("remote"), ids.gid("qmail")))
    control = admin.prepare_as_root(home, ids)  # pyqmail queue
    # --http: bound as root (a port below 1024 is allowed), served as qmails (see http.py)
    http_sock = http.bind(*cfg.http) if web is not None and cfg.http is not None else None
    _drop(ids.uid("send"), ids.gid("qmail"))
    os.umask(0o077)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        lost = False

        def on_lost() -> None:
            nonlocal lost
            lost = True
            log.alert("lost connection to the remote agent")
            stop.set()

        agent.on_lost = on_lost
        agent.watch()
        sched = make_scheduler(
            home,
            spawner,
            agent,
            log,
            stop_timeout=stop_timeout,
            submitter=ServiceSubmitter(home),
            cleaner=SocketCleaner(clean_sock),
            control_socket=control or False,
        )

        reloads: set[asyncio.Task[None]] = set()

        def hup() -> None:
            ctl.refresh()
            sched.reload()
            t = loop.create_task(agent.reload())
            reloads.add(t)
            t.add_done_callback(reloads.discard)

        for sig, fn in ((signal.SIGTERM, stop.set), (signal.SIGHUP, hup),
                        (signal.SIGALRM, sched.alarm)):  # fmt: skip
            loop.add_signal_handler(sig, fn)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor relays a Ctrl-C as TERM
        try:
            await start_sending(sched, log)
        except RunError:
            return 111
        status = None
        if web is not None:  # metrics and the status page (daemon/http.py)
            feed = http.StatsFeed(web.stats_sock) if web.stats_sock is not None else None
            if feed is not None:
                reading = loop.create_task(feed.read_forever())
            status = await start_http(cfg, web.auth, lambda: feed.latest if feed else {},
                                      sched.metrics, sock=http_sock)  # fmt: skip
        beating = beat.start(sched.summary)
        await stop.wait()
        if beating is not None:
            beating.cancel()
        if status is not None:
            await status.close()
            if feed is not None:
                reading.cancel()
        await stop_sending(sched, spawner, agent)
        return 111 if lost else 0

    loop = new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# -- smtpd: the listeners -----------------------------------------------------------------


def _prepare_greylist(home: Home, ids: Ids) -> None:
    """HOME/greylist for qmaild, made as root before the drop (smtp/greylist.py); without
    it greylisting fails open, so a failure here is a warning."""
    try:
        prepare_dir(home, ids.uid("daemon"), ids.gid("nofiles"))
    except OSError as e:
        _warn(f"warning: greylisting cannot keep its database: {e}")


def _smtpd_main(
    home: Home,
    ids: Ids,
    cfg: RunConfig,
    ready: int,
    stats_sock: socket.socket | None,
    beat: _Beat,
) -> int:
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
    # The RCPT check's lookups in users' homes: a child that stays root to become each
    # user per lookup (daemon/rcptlookup.py), forked now, before the loop and the drop.
    lookup = LookupProcess(home).start()
    # SMTP AUTH's password checks: a child that drops to qmailp, the one account (besides
    # root) that may read control/authusers (daemon/authproc.py), forked now as well.
    passwords = AuthProcess(home, ids).start()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        # Bound as root but not yet listening: no connection is accepted, and no byte
        # read, before every listener's process has dropped to qmaild.
        listeners = await start_listeners(
            cfg, ctl, submitter, smtp_submitter=committer, warn=_warn, serving=False,
            sink=_sink(cfg), rcpt_checks=rcpt_checks(home, local=lookup), passwords=passwords,
        )  # fmt: skip
        _prepare_greylist(home, ids)
        _drop(ids.uid("daemon"), ids.gid("nofiles"))
        await listeners.start_serving()
        os.write(ready, b"d")
        os.close(ready)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, ctl.refresh)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if stats_sock is not None:  # the counters, to the send part's HTTP server
            feed = http.StatsFeed(stats_sock)
            sending = loop.create_task(feed.send_forever(listeners.smtp.stats.snapshot))
        beating = beat.start(lambda: f"smtp sessions {len(listeners.smtp.sessions)}")
        await stop.wait()
        if stats_sock is not None:
            sending.cancel()
        await listeners.close()  # SMTP/QMQP/QMTP messages in progress finish (timeoutdrain)
        if beating is not None:
            beating.cancel()
        return 0

    loop = new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


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


def _beat_pipe(notifier: Notifier, pipes: dict[str, int], name: str) -> _Beat:
    """The part ``name``'s status pipe when systemd listens (its read end into ``pipes``)."""
    if not notifier.enabled:
        return _Beat()
    r, w = os.pipe()
    pipes[name] = r
    return _Beat(w, notify.beat_interval(notifier))


def _close_beat(beat: _Beat) -> None:
    """The supervisor's copy of a part's write end, closed once the part is forked."""
    if beat.fd is not None:
        os.close(beat.fd)


def run_split(cfg: RunConfig, notifier: Notifier | None = None) -> int:
    """Run the parts as separate processes under their qmail users; the exit code."""
    notifier = notifier if notifier is not None else Notifier(None)
    home = cfg.home
    try:
        ids = home.ids()
        check_home(home)
        auth = check_http(cfg)
    except (HomeError, RunError) as e:
        print(f"alert: cannot start: {e}", file=sys.stderr)
        return 111
    stopping = False

    def stop_early(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True  # a TERM while the parts start: stop them once they are up

    signal.signal(signal.SIGTERM, stop_early)
    signal.signal(signal.SIGINT, stop_early)
    _clean_at_start(home, ids)
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
    # --http: the send part serves it; the smtpd part's counters reach it on a socket pair
    web = _Web(auth, _sink(cfg)) if cfg.http is not None else None
    stats_smtpd: socket.socket | None = None
    if web is not None and cfg.listens():
        web.stats_sock, stats_smtpd = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    beat_pipes: dict[str, int] = {}
    send_beat = _beat_pipe(notifier, beat_pipes, "send")
    pids["send"] = _child(lambda: _send_main(home, ids, clean_send, cfg, web, send_beat))
    _close_beat(send_beat)
    clean_send.close()
    if web is not None and web.stats_sock is not None:
        web.stats_sock.close()
    if cfg.listens():
        r, w = os.pipe()
        smtpd_beat = _beat_pipe(notifier, beat_pipes, "smtpd")
        pids["smtpd"] = _child(lambda: _smtpd_main(home, ids, cfg, w, stats_smtpd, smtpd_beat))
        os.close(w)
        _close_beat(smtpd_beat)
        if stats_smtpd is not None:
            stats_smtpd.close()
        try:
            _wait_ready(r, "smtpd")
        except OSError as e:
            print(f"alert: cannot start: {e}", file=sys.stderr)
            term_all()
            return 111

    relay: notify.Relay | None = None
    if beat_pipes:  # READY=1 once each part has spoken (daemon/notify.py)
        relay = notify.Relay(notifier, beat_pipes, notify.beat_interval(notifier))
        relay.start()
    waiting = False

    def on_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if relay is not None and not relay.stopping:
            relay.stop("stopping: SMTP sessions in DATA finish, then deliveries in flight")
        stopping = True
        if waiting:  # only there: raised anywhere else, it would skip term_all
            raise _Stop  # out of waitpid, which Python would otherwise resume

    def relay_signal(signum: int, frame: FrameType | None) -> None:
        targets = ("send", "smtpd") if signum == signal.SIGHUP else ("send",)
        for name in targets:
            if name in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[name], signum)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, relay_signal)
    signal.signal(signal.SIGALRM, relay_signal)
    code = 0
    while not stopping:
        try:
            waiting = True
            if stopping:
                break
            pid, status = os.waitpid(-1, 0)
        except _Stop:
            break
        except ChildProcessError:
            break
        finally:
            waiting = False
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
