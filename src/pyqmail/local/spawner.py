"""The local delivery spawner process (qmail-lspawn's loop); spawn.py is its client.

It runs as its own lean interpreter (``python -m pyqmail.local.spawner``, started by
:meth:`pyqmail.local.spawn.LocalSpawner.start`) importing only what local delivery needs,
so that forking it copies little. It keeps root (unless started as an ordinary user).

Multi-user mode (qmail's): one child per delivery. The child looks the recipient up
(users/cdb, then qmail-getpw's rules), moves the message to fd 0 and a report pipe to
fd 1 and 2, closes every other descriptor (no user code can reach the spawner's socket),
drops to the user's gid, supplementary groups and uid (never uid 0), runs qmail-local's
algorithm in-process and exits with its code; the spawner reaps it through a pidfd.

Single-user mode: nobody's ids change, so the fork buys nothing but cost. Deliveries run
in worker processes forked from the spawner and reused: one delivery at a time each, a
new worker forked whenever all are busy, each retired after ``WORKER_DELIVERIES``
deliveries; a worker that dies mid-delivery reports ``qmail-local crashed.`` (Z). The
message and the report pipe travel to the worker as descriptors (SCM_RIGHTS).

Either way the spawner keeps at most 3000 bytes of the report (qmail-lspawn), does not
wait for a program's background process that still holds the report pipe, maps the
exit code as qmail-lspawn does (send.md 7) and answers.

Frames on the control socket: ``!II`` (request id, payload length) + payload. Request:
``mess\\0sender\\0recipient\\0``; reply: ``K``/``Z``/``D`` + text. Replies come in any
order.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail import cdb
from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.local import qlocal, users
from pyqmail.outcome import Outcome

HEAD = struct.Struct("!II")
_CODE = struct.Struct("!i")
WORKER_DELIVERIES = 1000  # a single-user worker is replaced after this many deliveries
_CRASHED = -1


def split_recipient(recipient: str) -> tuple[str, str] | None:
    """(local, domain) split at the last ``@``; None when there is no ``@``."""
    at = recipient.rfind("@")
    if at < 0:
        return None
    return recipient[:at], recipient[at + 1 :]


@dataclass(frozen=True)
class Config:
    """What the spawner process needs to know; passed on its command line."""

    home: Home
    program_timeout: float
    lock_timeout: float
    owner: int | None  # required owner of message files; None: not checked
    worker_deliveries: int = WORKER_DELIVERIES

    def argv(self, ctrl_fd: int) -> list[str]:
        return [
            str(ctrl_fd),
            str(self.home.root),
            "1" if self.home.single_user else "0",
            repr(self.program_timeout),
            repr(self.lock_timeout),
            "-" if self.owner is None else str(self.owner),
            str(self.worker_deliveries),
        ]

    @classmethod
    def parse(cls, argv: list[str]) -> tuple[int, Config]:
        fd, root, single, pt, lt, owner, wd = argv
        home = Home(Path(root), single_user=single == "1")
        own = None if owner == "-" else int(owner)
        return int(fd), cls(home, float(pt), float(lt), own, int(wd))


@dataclass
class _Job:
    """One delivery in flight: its report pipe and, once known, the exit code."""

    rid: int
    report_fd: int
    report: bytearray = field(default_factory=bytearray)
    eof: bool = False
    code: int | None = None  # qmail-local's exit code, _CRASHED if it died
    pid: int = 0  # fork mode: the child
    pidfd: int = -1
    worker: _Worker | None = None  # worker mode


@dataclass
class _Worker:
    pid: int
    sock: socket.socket
    pidfd: int
    deliveries: int = 0
    job: _Job | None = None


class Spawner:
    """The single-threaded spawner loop (module docstring)."""

    def __init__(self, cfg: Config, ctrl_fd: int) -> None:
        self.cfg = cfg
        self.home = cfg.home
        self.ctl = ControlCache(cfg.home)
        self.cdb = users.CdbCache(cfg.home.users / "cdb")
        self.ctrl = ctrl_fd
        self.inbuf = bytearray()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.poller = select.poll()
        self.jobs = 0
        self.idle: list[_Worker] = []
        self.workers: dict[int, _Worker] = {}  # by pid
        self.closing = False

    # --- the loop ---------------------------------------------------------------------

    def serve(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish deliveries; stop on EOF
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.chdir(self.home.root)
        gc.freeze()  # forked children share these objects; keep the collector off them
        self._watch(self.ctrl, self._on_ctrl)
        while not (self.closing and self.jobs == 0):
            for fd, _ev in self.poller.poll():
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler()
        for w in list(self.workers.values()):
            w.sock.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)

    def _watch(self, fd: int, handler: Callable[[], None]) -> None:
        self.handlers[fd] = handler
        self.poller.register(fd, select.POLLIN)

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    # --- requests ---------------------------------------------------------------------

    def _on_ctrl(self) -> None:
        try:
            data = os.read(self.ctrl, 65536)
        except InterruptedError:
            return
        except OSError:
            data = b""
        if not data:
            self._unwatch(self.ctrl)
            self.closing = True
            return
        self.inbuf += data
        while len(self.inbuf) >= HEAD.size:
            rid, size = HEAD.unpack_from(self.inbuf)
            if len(self.inbuf) < HEAD.size + size:
                break
            body = bytes(self.inbuf[HEAD.size : HEAD.size + size])
            del self.inbuf[: HEAD.size + size]
            parts = body.split(b"\0")
            if len(parts) < 3:
                self._reply(rid, Outcome.temp("Internal error: bad request. (#4.3.5)\n"))
                continue
            outcome = self._start(rid, parts[0], users.dec(parts[1]), users.dec(parts[2]))
            if outcome is not None:
                self._reply(rid, outcome)

    def _reply(self, rid: int, outcome: Outcome) -> None:
        body = outcome.status.value.encode() + outcome.text.encode("utf-8", "replace")
        view = memoryview(HEAD.pack(rid, len(body)) + body)
        with contextlib.suppress(OSError):
            while view:
                view = view[os.write(self.ctrl, view) :]

    def _start(self, rid: int, mess: bytes, sender: str, recipient: str) -> Outcome | None:
        split = split_recipient(recipient)
        if split is None:
            return Outcome.perm("Sorry, address must include host name. (#5.1.3)\n")
        local, domain = split
        if not local:
            return Outcome.ok("")  # qmail-lspawn's trash address: success, no delivery
        try:
            defaultdelivery = self.ctl.get().defaultdelivery
        except Exception:
            return Outcome.temp("Unable to read control files. (#4.3.0)\n")
        try:
            reader = self.cdb.reader()
        except users.UserError as e:
            return qlocal.outcome_of(e.code, b"")
        try:
            mfd = os.open(mess, os.O_RDONLY)
        except OSError:
            return Outcome.temp("qmail-spawn unable to open message. (#4.3.0)\n")
        try:
            st = os.fstat(mfd)
            if not stat.S_ISREG(st.st_mode):
                return Outcome.temp("Sorry, message has wrong type. (#4.3.5)\n")
            if self.cfg.owner is not None and st.st_uid != self.cfg.owner:
                return Outcome.temp("Sorry, message has wrong owner. (#4.3.5)\n")
            try:
                rfd, wfd = os.pipe()
            except OSError:
                return Outcome.temp("qmail-spawn unable to create pipe. (#4.3.0)\n")
            job = _Job(rid, rfd)
            args = (local, domain, sender, defaultdelivery)
            try:
                if self.home.single_user:
                    self._give_to_worker(job, mfd, wfd, args)
                else:
                    self._fork_child(job, mfd, wfd, args, reader)
            except OSError:
                os.close(rfd)
                return Outcome.temp("qmail-spawn unable to fork. (#4.3.0)\n")
            finally:
                os.close(wfd)
        finally:
            os.close(mfd)
        os.set_blocking(rfd, False)
        self.jobs += 1
        self._watch(rfd, lambda: self._on_report(job))
        return None

    # --- multi-user: a child per delivery ----------------------------------------------

    def _fork_child(
        self,
        job: _Job,
        mfd: int,
        wfd: int,
        args: tuple[str, str, str, str],
        reader: cdb.Reader | None,
    ) -> None:
        pid = os.fork()
        if pid == 0:
            code = users.QLX_SYS
            try:
                code = self._child(mfd, wfd, args, reader)
            finally:
                os._exit(code)
        job.pid = pid
        job.pidfd = os.pidfd_open(pid)
        self._watch(job.pidfd, lambda: self._on_child_exit(job))

    def _child(
        self, mfd: int, wfd: int, args: tuple[str, str, str, str], reader: cdb.Reader | None
    ) -> int:
        """The per-delivery child: returns qmail-local's (or qmail-lspawn's) exit code."""
        gc.disable()  # short-lived: a collection would only copy shared pages
        _child_signals()
        os.dup2(mfd, 0)
        os.dup2(wfd, 1)
        os.dup2(wfd, 2)
        os.closerange(3, _max_fd())
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - kept for the exit
        try:
            info = users.resolve_with(self.home, args[0], reader)
        except users.UserError as e:
            return e.code
        if os.geteuid() == 0:
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
        return self._run(info, args, 0, 1)

    def _run(
        self, info: users.UserInfo, args: tuple[str, str, str, str], mfd: int, out: int
    ) -> int:
        local, domain, sender, defaultdelivery = args
        if not info.home.startswith("/"):
            return users.QLX_USAGE
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
        try:
            return qlocal.run(req, mfd, self.home, out=out, err=out)
        except Exception:
            with contextlib.suppress(OSError):
                os.write(out, b"Unexpected error in local delivery. (#4.3.0)\n")
            return 111

    def _on_child_exit(self, job: _Job) -> None:
        try:
            pid, status = os.waitpid(job.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = job.pid, 0xFF00
        if pid == 0:
            return
        self._unwatch(job.pidfd)
        os.close(job.pidfd)
        code = os.waitstatus_to_exitcode(status)
        job.code = _CRASHED if code < 0 else code
        self._finish(job)

    # --- single-user: reusable workers -------------------------------------------------

    def _give_to_worker(
        self, job: _Job, mfd: int, wfd: int, args: tuple[str, str, str, str]
    ) -> None:
        worker = self.idle.pop() if self.idle else self._fork_worker()
        job.worker = worker
        worker.job = job
        worker.deliveries += 1
        payload = b"\0".join(users.enc(a) for a in args)
        try:
            socket.send_fds(worker.sock, [payload], [mfd, wfd])
        except OSError:
            # The worker is gone; its pidfd handler reports the crash for this job.
            pass

    def _fork_worker(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            code = users.QLX_SYS
            try:
                code = self._worker_main(theirs.fileno())
            finally:
                os._exit(code)
        theirs.close()
        worker = _Worker(pid, ours, os.pidfd_open(pid))
        self.workers[pid] = worker
        self._watch(ours.fileno(), lambda: self._on_worker_reply(worker))
        self._watch(worker.pidfd, lambda: self._on_worker_exit(worker))
        return worker

    def _worker_main(self, sock_fd: int) -> int:
        _child_signals()
        os.closerange(3, sock_fd)
        os.closerange(sock_fd + 1, _max_fd())
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process
        os.umask(0o077)
        sock = socket.socket(fileno=sock_fd)
        # The inherited self.cdb must never be closed here (its mmap's descriptor was
        # closed above and the number may be reused): use a cache of our own.
        cache = users.CdbCache(self.home.users / "cdb")
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 2)
            if not msg and not fds:
                return 0
            code = users.QLX_SYS
            try:
                args_l = [users.dec(a) for a in msg.split(b"\0")]
                if len(fds) == 2 and len(args_l) == 4:
                    args = (args_l[0], args_l[1], args_l[2], args_l[3])
                    try:
                        info = users.resolve_with(self.home, args[0], cache.reader())
                        code = self._run(info, args, fds[0], fds[1])
                    except users.UserError as e:
                        code = e.code
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(_CODE.pack(code))

    def _on_worker_reply(self, worker: _Worker) -> None:
        try:
            data = worker.sock.recv(64)
        except OSError:
            data = b""
        if len(data) != _CODE.size:
            return  # the pidfd handler deals with a dead worker
        job = worker.job
        worker.job = None
        if worker.deliveries >= self.cfg.worker_deliveries:
            self._retire(worker)
        else:
            self.idle.append(worker)
        if job is not None:
            (job.code,) = _CODE.unpack(data)
            self._finish(job)

    def _retire(self, worker: _Worker) -> None:
        self._unwatch(worker.sock.fileno())
        worker.sock.close()  # the worker sees EOF and exits; its pidfd reaps it

    def _on_worker_exit(self, worker: _Worker) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(worker.pid, 0)
        self._unwatch(worker.pidfd)
        os.close(worker.pidfd)
        if worker.sock.fileno() >= 0:
            self._unwatch(worker.sock.fileno())
            worker.sock.close()
        self.workers.pop(worker.pid, None)
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        job = worker.job
        worker.job = None
        if job is not None:
            job.code = _CRASHED
            self._finish(job)

    # --- reports and results ---------------------------------------------------------

    def _on_report(self, job: _Job) -> None:
        self._drain(job)
        if job.eof and job.code is not None:
            self._finish(job)

    def _drain(self, job: _Job) -> None:
        """Read what the pipe holds now; EOF closes it."""
        while not job.eof:
            try:
                data = os.read(job.report_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                job.eof = True
                self._unwatch(job.report_fd)
                os.close(job.report_fd)
                return
            if len(job.report) <= qlocal.TRUNCREPORT:
                job.report += data[: qlocal.TRUNCREPORT + 1 - len(job.report)]

    def _finish(self, job: _Job) -> None:
        """The exit code is known: take what the pipe holds (a program's background
        process may keep it open: do not wait for it) and answer."""
        if job.code is None:
            return
        self._drain(job)
        if not job.eof:
            job.eof = True
            self._unwatch(job.report_fd)
            os.close(job.report_fd)
        if job.rid < 0:
            return  # already answered
        code = None if job.code == _CRASHED else job.code
        self._reply(job.rid, qlocal.outcome_of(code, bytes(job.report)))
        job.rid = -1
        self.jobs -= 1


def _child_signals() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536


def main(argv: list[str] | None = None) -> int:
    """``python -m pyqmail.local.spawner CTRLFD HOME SINGLE PTIMEOUT LTIMEOUT OWNER WD``."""
    fd, cfg = Config.parse(list(sys.argv[1:] if argv is None else argv))
    Spawner(cfg, fd).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
