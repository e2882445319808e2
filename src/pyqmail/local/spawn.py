"""The local delivery spawner (qmail-lspawn) and the daemon's handle on it.

:class:`LocalSpawner` forks, in :meth:`LocalSpawner.start` (before the daemon has
threads), a single-threaded spawner process that keeps root. For each request it forks a
child which looks the recipient up (users/cdb, then qmail-getpw's rules), moves the
message to fd 0 and a report pipe to fd 1 and 2, closes every other descriptor (so no
user code can reach the spawner's socket), drops to the user's gid, supplementary groups
and uid (never uid 0 unless in single-user mode, where nothing changes), then runs
qmail-local's algorithm in-process and exits with its code. The spawner collects the
report (at most 3000 bytes kept, as qmail-lspawn) and the exit status, maps them as
qmail-lspawn does (send.md 7) and answers the daemon.

Between the daemon and the spawner: a Unix stream socket pair carrying frames
``!II`` (request id, payload length) + payload. Request payload: ``mess\\0sender\\0
recipient\\0``; reply payload: ``K``/``Z``/``D`` + text. Replies come in any order; the
daemon's side is asyncio (:meth:`LocalSpawner.deliver`). How many deliveries run at once
is the scheduler's business (concurrencylocal); the spawner forks whatever it is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import signal
import socket
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.control import ControlCache
from pyqmail.home import Home, HomeError, warn_if_root_single_user
from pyqmail.local import program, qlocal, users
from pyqmail.outcome import Outcome, Status

_HEAD = struct.Struct("!II")
_DIED = Outcome.temp("Unable to talk to the local delivery spawner. (#4.3.0)\n")


def split_recipient(recipient: str) -> tuple[str, str] | None:
    """(local, domain) split at the last ``@``; None when there is no ``@``."""
    at = recipient.rfind("@")
    if at < 0:
        return None
    return recipient[:at], recipient[at + 1 :]


# --- the daemon's side ------------------------------------------------------------------


class LocalSpawner:
    """qmail-lspawn for the daemon: ``start()`` once, then ``await deliver(...)``."""

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        *,
        program_timeout: float = program.DEFAULT_TIMEOUT,
        lock_timeout: float = 30.0,
        message_owner: int | None = None,
    ) -> None:
        self.home = home
        self.ctl = ctl
        self.program_timeout = program_timeout
        self.lock_timeout = lock_timeout
        self.message_owner = message_owner
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Outcome]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._send_lock: asyncio.Lock | None = None
        self._dead = False

    def start(self) -> None:
        """Fork the spawner process. Call before the process has threads."""
        owner = self.message_owner
        if owner is None:
            try:
                owner = self.home.ids().uid("queue")
            except HomeError:
                owner = None
        warn_if_root_single_user(self.home, "qmail-lspawn")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the spawner process
            code = 111
            try:
                ours.close()
                _Spawner(self, theirs.detach(), owner).serve()
                code = 0
            except BaseException:
                pass
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock = ours

    async def deliver(self, mess: Path, sender: str, recipient: str) -> Outcome:
        """Deliver ``mess`` to ``recipient``; the Outcome qmail-lspawn would report."""
        if self._sock is None or self._dead:
            return _DIED
        loop = asyncio.get_running_loop()
        if self._reader is None:
            self._sock.setblocking(False)
            self._send_lock = asyncio.Lock()
            self._reader = loop.create_task(self._read_replies(self._sock))
        assert self._send_lock is not None
        rid = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._pending[rid] = fut
        payload = b"\0".join([os.fsencode(mess), users.enc(sender), users.enc(recipient), b""])
        try:
            async with self._send_lock:
                await loop.sock_sendall(self._sock, _HEAD.pack(rid, len(payload)) + payload)
        except OSError:
            self._pending.pop(rid, None)
            return _DIED
        return await fut

    async def _read_replies(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        try:
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    break
                buf += data
                while len(buf) >= _HEAD.size:
                    rid, size = _HEAD.unpack_from(buf)
                    if len(buf) < _HEAD.size + size:
                        break
                    body = bytes(buf[_HEAD.size : _HEAD.size + size])
                    del buf[: _HEAD.size + size]
                    fut = self._pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(_decode_reply(body))
        except OSError:
            pass
        finally:
            self._dead = True
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_result(_DIED)
            self._pending.clear()

    async def close(self) -> None:
        """Stop taking requests, let deliveries in flight finish, reap the spawner."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            if self._reader is not None:
                await self._reader
            sock.close()
        if self.pid is not None:
            pid, self.pid = self.pid, None
            await asyncio.get_running_loop().run_in_executor(None, _reap, pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _decode_reply(body: bytes) -> Outcome:
    letter = body[:1].decode("ascii", "replace")
    text = body[1:].decode("utf-8", "replace")
    try:
        return Outcome(Status(letter), text)
    except ValueError:
        return Outcome.temp("Internal error in the local delivery spawner. (#4.3.0)\n")


# --- the spawner process ------------------------------------------------------------------


@dataclass
class _Child:
    rid: int
    pid: int
    pidfd: int
    report_fd: int
    report: bytearray = field(default_factory=bytearray)
    eof: bool = False
    status: int | None = None  # waitpid status once reaped


class _Spawner:
    """The single-threaded spawner loop (runs in the forked spawner process)."""

    def __init__(self, cfg: LocalSpawner, ctrl_fd: int, owner: int | None) -> None:
        self.cfg = cfg
        self.home = cfg.home
        self.ctrl = ctrl_fd
        self.owner = owner
        self.inbuf = bytearray()
        self.children: dict[int, _Child] = {}  # by report fd and by pidfd
        self.closing = False

    def serve(self) -> None:
        signal.set_wakeup_fd(-1)  # the daemon's event loop owned it; not ours
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish deliveries; stop on EOF
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.chdir(self.home.root)
        poller = select.poll()
        poller.register(self.ctrl, select.POLLIN)
        while not (self.closing and not self.children):
            for fd, _ev in poller.poll():
                if fd == self.ctrl:
                    if not self._read_requests(poller):
                        poller.unregister(self.ctrl)
                        self.closing = True
                    continue
                child = self.children.get(fd)
                if child is None:
                    continue
                if fd == child.report_fd:
                    self._read_report(child, poller)
                else:
                    self._reap(child, poller)

    # requests

    def _read_requests(self, poller: select.poll) -> bool:
        try:
            data = os.read(self.ctrl, 65536)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.inbuf += data
        while len(self.inbuf) >= _HEAD.size:
            rid, size = _HEAD.unpack_from(self.inbuf)
            if len(self.inbuf) < _HEAD.size + size:
                break
            body = bytes(self.inbuf[_HEAD.size : _HEAD.size + size])
            del self.inbuf[: _HEAD.size + size]
            parts = body.split(b"\0")
            if len(parts) < 3:
                self._reply(rid, Outcome.temp("Internal error: bad request. (#4.3.5)\n"))
                continue
            outcome = self._start(rid, parts[0], users.dec(parts[1]), users.dec(parts[2]), poller)
            if outcome is not None:
                self._reply(rid, outcome)
        return True

    def _reply(self, rid: int, outcome: Outcome) -> None:
        body = outcome.status.value.encode() + outcome.text.encode("utf-8", "replace")
        frame = _HEAD.pack(rid, len(body)) + body
        with contextlib.suppress(OSError):
            view = memoryview(frame)
            while view:
                try:
                    n = os.write(self.ctrl, view)
                except BlockingIOError:
                    select.select([], [self.ctrl], [])
                    continue
                view = view[n:]

    def _start(
        self, rid: int, mess: bytes, sender: str, recipient: str, poller: select.poll
    ) -> Outcome | None:
        split = split_recipient(recipient)
        if split is None:
            return Outcome.perm("Sorry, address must include host name. (#5.1.3)\n")
        local, domain = split
        if not local:
            return Outcome.ok("")  # qmail-lspawn's trash address: success, no delivery
        try:
            defaultdelivery = self.cfg.ctl.get().defaultdelivery
        except Exception:
            return Outcome.temp("Unable to read control files. (#4.3.0)\n")
        try:
            mfd = os.open(mess, os.O_RDONLY)
        except OSError:
            return Outcome.temp("qmail-spawn unable to open message. (#4.3.0)\n")
        try:
            st = os.fstat(mfd)
            if not stat.S_ISREG(st.st_mode):
                return Outcome.temp("Sorry, message has wrong type. (#4.3.5)\n")
            if self.owner is not None and st.st_uid != self.owner:
                return Outcome.temp("Sorry, message has wrong owner. (#4.3.5)\n")
            try:
                rfd, wfd = os.pipe()
            except OSError:
                return Outcome.temp("qmail-spawn unable to create pipe. (#4.3.0)\n")
            try:
                pid = os.fork()
            except OSError:
                os.close(rfd)
                os.close(wfd)
                return Outcome.temp("qmail-spawn unable to fork. (#4.3.0)\n")
            if pid == 0:
                code = 118
                try:
                    code = self._child(mfd, wfd, local, domain, sender, defaultdelivery)
                finally:
                    os._exit(code)
            os.close(wfd)
        finally:
            os.close(mfd)
        pidfd = os.pidfd_open(pid)
        os.set_blocking(rfd, False)
        child = _Child(rid, pid, pidfd, rfd)
        self.children[rfd] = child
        self.children[pidfd] = child
        poller.register(rfd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        return None

    # children

    def _read_report(self, child: _Child, poller: select.poll) -> None:
        while True:
            try:
                data = os.read(child.report_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                child.eof = True
                poller.unregister(child.report_fd)
                break
            if len(child.report) <= qlocal.TRUNCREPORT:
                child.report += data[: qlocal.TRUNCREPORT + 1 - len(child.report)]
        self._finish_if_done(child, poller)

    def _reap(self, child: _Child, poller: select.poll) -> None:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, 0xFF00  # should not happen: treat as exit 255
        if pid == 0:
            return
        child.status = status
        poller.unregister(child.pidfd)
        if not child.eof:
            # The child is gone; whatever is in the pipe now is its report. A program's
            # background process may still hold the pipe open: do not wait for it.
            self._read_report_nonblocking(child)
            child.eof = True
            poller.unregister(child.report_fd)
        self._finish_if_done(child, poller)

    def _read_report_nonblocking(self, child: _Child) -> None:
        while len(child.report) <= qlocal.TRUNCREPORT:
            try:
                data = os.read(child.report_fd, 65536)
            except OSError:
                return
            if not data:
                return
            child.report += data[: qlocal.TRUNCREPORT + 1 - len(child.report)]

    def _finish_if_done(self, child: _Child, poller: select.poll) -> None:
        if not child.eof or child.status is None:
            return
        del self.children[child.report_fd]
        del self.children[child.pidfd]
        os.close(child.report_fd)
        os.close(child.pidfd)
        code = os.waitstatus_to_exitcode(child.status)
        self._reply(child.rid, qlocal.outcome_of(None if code < 0 else code, bytes(child.report)))

    def _child(
        self, mfd: int, wfd: int, local: str, domain: str, sender: str, defaultdelivery: str
    ) -> int:
        """The per-delivery child: returns qmail-local's (or qmail-lspawn's) exit code."""
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.dup2(mfd, 0)
        os.dup2(wfd, 1)
        os.dup2(wfd, 2)
        os.closerange(3, _max_fd())
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - never print into the report
        try:
            info = users.resolve(self.home, local)
        except users.UserError as e:
            return e.code
        if not self.home.single_user and os.geteuid() == 0:
            if info.uid == 0:
                return users.QLX_ROOT
            try:
                groups = os.getgrouplist(info.user, info.gid)
            except (KeyError, OSError):
                groups = [info.gid]
            try:
                os.setgroups(groups)
                os.setgid(info.gid)
                os.setuid(info.uid)
            except OSError:
                return users.QLX_USAGE
            if os.getuid() == 0:
                return users.QLX_ROOT
        os.umask(0o077)
        req = qlocal.Request(
            info.user,
            info.home,
            local,
            info.dash,
            info.ext,
            domain,
            sender,
            defaultdelivery,
            program_timeout=self.cfg.program_timeout,
            lock_timeout=self.cfg.lock_timeout,
        )
        if not req.home.startswith("/"):
            return users.QLX_USAGE
        try:
            return qlocal.run(req, 0, self.home, out=1, err=2)
        except Exception:
            os.write(2, b"Unexpected error in local delivery. (#4.3.0)\n")
            return 111


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536
