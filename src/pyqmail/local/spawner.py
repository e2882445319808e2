"""The local delivery spawner process (qmail-lspawn's loop); spawn.py is its client.

It runs as its own lean, isolated interpreter (``python -I -S``, started by
:meth:`pyqmail.local.spawn.LocalSpawner.start`) importing only what local delivery needs,
so that forking it copies little. It keeps root (unless started as an ordinary user).

For each request the spawner (as root, single-threaded) checks the message, looks the
recipient up (users/cdb kept open, then qmail-getpw's rules) and refuses uid 0 in
multi-user mode. The delivery itself runs in a process forked from the spawner that has
dropped to the user's uid and gid (and no supplementary group but that gid, as
qmail-lspawn's setgroups(1, &gid)) *before* it is given anything
of the user's: the message arrives as a descriptor, the report goes to a pipe, every other
descriptor is closed (no user code can reach the spawner's socket), and it runs
qmail-local's algorithm in-process.

control/srs (docs/srs.md) is read here, as root, and handed to the delivery with its
request (:class:`SrsFile`), so the SRS secret need not be readable by the users.

Two ways to get that process (``reuse``):

* reuse (default): a worker per identity (uid, gid). A worker
  serves one delivery at a time and is given the next delivery for the same identity;
  all busy means a new one is forked. Idle workers are capped (``MAX_IDLE``, least
  recently used retired first) and every worker is retired after ``worker_deliveries``
  deliveries. A worker never serves another identity: it has no way back to root. A
  worker that dies mid-delivery reports ``qmail-local crashed.`` (Z).
* no reuse: qmail-lspawn's model, a fresh child per delivery.

In single-user mode nobody's ids change; the identity is always the spawner's own.

Each delivery process leads its own process group, and its programs stay in it. The
limit on a delivery (``program_timeout``, 24 hours by default) is kept here, not in the
delivery process, which runs as the user and could be stopped by its own program
(``kill -STOP $PPID``) and hold a concurrencylocal slot for ever: when it passes, the
spawner SIGKILLs the whole group and reports a temporary failure, as qmail does for a
timeout.

Maildir directories are made durable many deliveries at a time (with reuse): a worker
fsyncs each message file before its link into ``new/`` as always, but hands back the
``new/`` paths with its reply (local/maildir.py's ``deferred_dir_syncs``) and is free for
the next delivery. The spawner keeps those deliveries' answers and, one round at a time
per identity, asks one of that identity's workers to fsync every directory the round's
deliveries named, then answers them all: nothing is reported delivered before its
``new/`` entry is on disk, and on a journalled file system one commit serves the round
instead of one per delivery. A round waits ``SYNC_LEAST`` seconds, and for the workers of
the identity still delivering when it fell due, at most ``SYNC_GATHER`` seconds. The
paths are the worker's own (``/proc/self/fd`` of the directory it opened as the user);
the spawner never opens them, and they go to a worker of the same identity only: a
worker's answer about durability concerns its own user's mail alone. A directory that
cannot be fsynced makes a success a temporary failure (delivered again: at least once).

Either way the spawner keeps at most 3000 bytes of the report (qmail-lspawn), does not
wait for a program's background process that still holds the report pipe, maps the
exit code as qmail-lspawn does (send.md 7) and answers.

Frames on the control socket: ``!II`` (request id, payload length) + payload. Request:
``mess\\0sender\\0recipient\\0``; reply: ``K``/``Z``/``D`` + text. Replies come in
any order. To a worker: a delivery (its fields, the message and report descriptors), or
a NUL + paths (fsync them); from it: exit code, length and qmail-local's own lines, the
``new/`` paths to fsync; or a byte per path, 1 where its fsync failed.
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
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail import srs
from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.local import maildir, program, qlocal, users
from pyqmail.outcome import Outcome

HEAD = struct.Struct("!II")
_CODE = struct.Struct("!i")
_LEN = struct.Struct("!I")
SYNC_GATHER = 0.005  # seconds a sync round waits at most for the identity's busy workers
SYNC_LEAST = 0.003  # seconds every round waits (local/pool.py's DirSyncs says why)
_SYNC_MAX = 32768  # bytes of new/ paths one delivery hands back; more: it fsyncs them
_ROUND_MAX = 65536  # bytes of paths in one round's request to a worker
_ANSWER = _CODE.size + _LEN.size  # a worker's answer: exit code, length of its own lines
_REPLY_MAX = _ANSWER + qlocal.TRUNCREPORT + 1 + _SYNC_MAX
_SYNC_FAILED = b"Temporary error on maildir delivery. (#4.3.0)\n"
WORKER_DELIVERIES = 1000  # a worker is replaced after this many deliveries
MAX_IDLE = 32  # idle workers kept at most (all identities together)
_CRASHED = -1
_OWN_MAX = qlocal.TRUNCREPORT + 1  # enough of qmail-local's own lines to know they are long

Identity = tuple[int, int]  # uid, gid
CONTROL_TTL = 1.0  # seconds a defaultdelivery value is used before control/ is checked


def split_recipient(recipient: str) -> tuple[str, str] | None:
    """(local, domain) split at the last ``@``; None when there is no ``@``."""
    at = recipient.rfind("@")
    if at < 0:
        return None
    return recipient[:at], recipient[at + 1 :]


class DefaultDelivery:
    """control/defaultdelivery, asked of the cache at most every CONTROL_TTL seconds."""

    def __init__(self, ctl: ControlCache) -> None:
        self.ctl = ctl
        self._dd: tuple[float, str] | None = None

    def __call__(self) -> str:
        now = time.monotonic()
        if self._dd is None or now - self._dd[0] > CONTROL_TTL:
            self._dd = (now, self.ctl.get().defaultdelivery)
        return self._dd[1]


class SrsFile:
    """control/srs as the spawner reads it (as root: the secret need not be readable by
    the users, docs/srs.md), at most every CONTROL_TTL seconds, in the form a delivery's
    payload carries it: ``-`` (no file: SRS is off), ``!`` (unreadable), or the bytes in
    hex (a secret may hold any byte but NUL's neighbours in the payload)."""

    def __init__(self, home: Home) -> None:
        self.dir = home.control
        self._got: tuple[float, bytes] | None = None

    def __call__(self) -> bytes:
        now = time.monotonic()
        if self._got is None or now - self._got[0] > CONTROL_TTL:
            try:
                raw = srs.read(self.dir)
            except OSError:
                field = b"!"
            else:
                field = b"-" if raw is None else raw.hex().encode()
            self._got = (now, field)
        return self._got[1]


def srs_source(field: str) -> qlocal.SrsSource:
    """The worker's side of :class:`SrsFile`'s field."""

    def source() -> bytes | None:
        if field == "-":
            return None
        if field == "!":
            raise PermissionError(13, "access denied")
        return bytes.fromhex(field)

    return source


@dataclass(frozen=True)
class Admitted:
    """A delivery that passed qmail-lspawn's checks: the message is open as ``mfd``."""

    mfd: int  # the message, read-only and close-on-exec; the caller closes it
    local: str
    domain: str
    info: users.UserInfo
    defaultdelivery: str


def admit(
    mess: Path | bytes,
    recipient: str,
    *,
    defaultdelivery: Callable[[], str],
    resolve: Callable[[str], users.UserInfo],
    refuse_root: bool,
    owner: int | None = None,
) -> Admitted | Outcome:
    """qmail-spawn's and qmail-lspawn's checks before a local delivery (local.md 1).

    In order: an address without ``@`` (permanent), the trash address ``@host`` (success,
    nothing delivered), control/defaultdelivery, the user (users/cdb, then qmail-getpw's
    rules, through ``resolve``) with a home that is an absolute path and, if
    ``refuse_root``, not uid 0; then the message: opened, a regular file, owned by
    ``owner`` when given. The answer is the Outcome to report, or what the delivery needs.
    """
    split = split_recipient(recipient)
    if split is None:
        return Outcome.perm("Sorry, address must include host name. (#5.1.3)\n")
    local, domain = split
    if not local:
        return Outcome.ok("")  # qmail-lspawn's trash address: success, no delivery
    try:
        dd = defaultdelivery()
    except Exception:
        return Outcome.temp("Unable to read control files. (#4.3.0)\n")
    try:
        info = resolve(local)
    except users.UserError as e:
        return qlocal.outcome_of(e.code, b"")
    if not info.home.startswith("/"):
        return qlocal.outcome_of(users.QLX_USAGE, b"")
    if refuse_root and info.uid == 0:
        return qlocal.outcome_of(users.QLX_ROOT, b"")
    try:
        mfd = os.open(mess, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return Outcome.temp("qmail-spawn unable to open message. (#4.3.0)\n")
    try:
        st = os.fstat(mfd)
        if not stat.S_ISREG(st.st_mode):
            refusal = Outcome.temp("Sorry, message has wrong type. (#4.3.5)\n")
        elif owner is not None and st.st_uid != owner:
            refusal = Outcome.temp("Sorry, message has wrong owner. (#4.3.5)\n")
        else:
            return Admitted(mfd, local, domain, info, dd)
    except BaseException:
        os.close(mfd)
        raise
    os.close(mfd)
    return refusal


@dataclass(frozen=True)
class Config:
    """What the spawner process needs to know; passed on its command line."""

    home: Home
    program_timeout: float
    lock_timeout: float
    owner: int | None  # required owner of message files; None: not checked
    worker_deliveries: int = WORKER_DELIVERIES
    reuse: bool = True

    def argv(self, ctrl_fd: int) -> list[str]:
        return [
            str(ctrl_fd),
            str(self.home.root),
            "1" if self.home.single_user else "0",
            repr(self.program_timeout),
            repr(self.lock_timeout),
            "-" if self.owner is None else str(self.owner),
            str(self.worker_deliveries),
            "1" if self.reuse else "0",
        ]

    @classmethod
    def parse(cls, argv: list[str]) -> tuple[int, Config]:
        fd, root, single, pt, lt, owner, wd, reuse = argv
        home = Home(Path(root), single_user=single == "1")
        own = None if owner == "-" else int(owner)
        return int(fd), cls(home, float(pt), float(lt), own, int(wd), reuse == "1")


@dataclass
class _Job:
    """One delivery in flight: its report pipe and, once known, the exit code."""

    rid: int
    report_fd: int
    report: bytearray = field(default_factory=bytearray)
    eof: bool = False
    code: int | None = None  # qmail-local's exit code, _CRASHED if it died
    tail: bytes = b""  # qmail-local's own lines, which follow every program's output
    deadline: float = float("inf")  # time.monotonic() after which its group is killed
    timed_out: bool = False
    dirs: list[bytes] = field(default_factory=list)  # new/ paths its worker handed back
    syncing: bool = False  # answered by its worker; its new/ fsync not yet done
    sync_failed: bool = False  # a new/ of its could not be fsynced


@dataclass
class _Worker:
    ident: Identity | None  # None: the spawner's own ids
    pid: int
    sock: socket.socket
    pidfd: int
    one_shot: bool
    deliveries: int = 0
    job: _Job | None = None
    round: list[_Job] | None = None  # the deliveries whose new/ it is fsyncing now
    round_deadline: float = float("inf")


@dataclass
class _Round:
    """One identity's deliveries waiting for their new/ fsync, and the workers of that
    identity still delivering when the round fell due (it waits for their answers)."""

    jobs: list[_Job] = field(default_factory=list)
    ready: float = 0.0  # time.monotonic() before which it does not start
    due: float = 0.0  # time.monotonic() when it stops waiting for the busy workers
    awaited: set[int] = field(default_factory=set)  # their pids
    worker: _Worker | None = None  # the worker running this identity's fsyncs now


class Spawner:
    """The single-threaded spawner loop (module docstring)."""

    def __init__(self, cfg: Config, ctrl_fd: int) -> None:
        self.cfg = cfg
        self.home = cfg.home
        self.ctl = ControlCache(cfg.home)
        self.cdb = users.CdbCache(cfg.home.users / "cdb")
        self.drop = not cfg.home.single_user and os.geteuid() == 0
        self.ctrl = ctrl_fd
        self.inbuf = bytearray()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.poller = select.poll()
        self.jobs = 0
        self.idle: OrderedDict[int, _Worker] = OrderedDict()  # by pid, oldest first
        self.workers: dict[int, _Worker] = {}  # by pid
        self.rounds: dict[Identity | None, _Round] = {}
        self.closing = False
        self._defaultdelivery = DefaultDelivery(self.ctl)
        self._srs = SrsFile(cfg.home)

    # --- the loop ---------------------------------------------------------------------

    def serve(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish deliveries; stop on EOF
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.chdir(self.home.root)
        gc.freeze()  # forked workers share these objects; keep the collector off them
        self._watch(self.ctrl, self._on_ctrl)
        while not (self.closing and self.jobs == 0):
            for fd, _ev in self.poller.poll(self._next_timeout()):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler()
            self._kill_late()
            self._start_rounds()
        for w in list(self.workers.values()):
            w.sock.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)

    def _next_timeout(self) -> int | None:
        """Milliseconds until the next delivery's or round's limit, or until a gathering
        round is due (None: nothing running)."""
        deadlines = [w.job.deadline for w in self.workers.values() if w.job and not w.job.timed_out]
        deadlines += [w.round_deadline for w in self.workers.values() if w.round is not None]
        deadlines += [
            max(r.ready, r.due) if r.awaited else r.ready
            for r in self.rounds.values()
            if r.jobs and r.worker is None
        ]
        if not deadlines:
            return None
        left = min(deadlines) - time.monotonic()
        return max(0, min(int(left * 1000) + 1, 3_600_000))

    def _kill_late(self) -> None:
        """SIGKILL the process group of every delivery past its limit. Its pidfd then
        reports the death, and _finish answers with the timeout (a temporary failure)."""
        now = time.monotonic()
        for w in self.workers.values():
            job = w.job
            if job is not None and not job.timed_out and now >= job.deadline:
                job.timed_out = True
                program.kill_group(w.pid)
            if w.round is not None and now >= w.round_deadline:  # a hung fsync: its death
                w.round_deadline = float("inf")  # fails the round's deliveries
                program.kill_group(w.pid)

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
        got = admit(
            mess,
            recipient,
            defaultdelivery=self._defaultdelivery,
            resolve=lambda local: users.resolve_with(self.home, local, self.cdb.reader()),
            refuse_root=self.drop,
            owner=self.cfg.owner,
        )
        if isinstance(got, Outcome):
            return got
        info, mfd = got.info, got.mfd
        ident = (info.uid, info.gid) if self.drop else None
        try:
            try:
                rfd, wfd = os.pipe2(os.O_CLOEXEC)
            except OSError:
                return Outcome.temp("qmail-spawn unable to create pipe. (#4.3.0)\n")
            job = _Job(rid, rfd, deadline=time.monotonic() + self.cfg.program_timeout)
            fields = (info.user, info.home, got.local, info.dash, info.ext, got.domain, sender)
            payload = b"\0".join(users.enc(f) for f in (*fields, got.defaultdelivery))
            payload += b"\0" + self._srs()
            try:
                worker = self._worker_for(ident)
            except OSError:
                os.close(rfd)
                os.close(wfd)
                return Outcome.temp("qmail-spawn unable to fork. (#4.3.0)\n")
            worker.job = job
            worker.deliveries += 1
            try:
                socket.send_fds(worker.sock, [payload], [mfd, wfd])
            except OSError:
                pass  # the worker died: its pidfd handler reports the crash for this job
            finally:
                os.close(wfd)
        finally:
            os.close(mfd)
        os.set_blocking(rfd, False)
        self.jobs += 1
        self._watch(rfd, lambda: self._on_report(job))
        return None

    # --- workers ------------------------------------------------------------------------

    def _worker_for(self, ident: Identity | None) -> _Worker:
        if self.cfg.reuse:
            for pid, w in self.idle.items():
                if w.ident == ident:
                    del self.idle[pid]
                    return w
        return self._fork_worker(ident, one_shot=not self.cfg.reuse)

    def _fork_worker(self, ident: Identity | None, *, one_shot: bool) -> _Worker:
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
                code = self._worker_main(theirs.fileno(), ident, one_shot)
            finally:
                os._exit(code)
        theirs.close()
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # as the child does: whichever runs first
        worker = _Worker(ident, pid, ours, os.pidfd_open(pid), one_shot)
        self.workers[pid] = worker
        self._watch(ours.fileno(), lambda: self._on_worker_reply(worker))
        self._watch(worker.pidfd, lambda: self._on_worker_exit(worker))
        return worker

    def _worker_main(self, sock_fd: int, ident: Identity | None, one_shot: bool) -> int:
        """A worker: drop to the identity, then serve deliveries until EOF."""
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # its own group: the spawner's limit kills it and its programs
        if one_shot:
            gc.disable()  # short-lived: a collection would only copy shared pages
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # Everything but our socket goes: the control socket, other workers' sockets,
        # other deliveries' pipes. (The spawner's users/cdb mmap object stays referenced
        # and is never closed here: its descriptor number may be reused.)
        os.closerange(3, sock_fd)
        os.closerange(sock_fd + 1, _max_fd())
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process
        if ident is not None:
            uid, gid = ident
            try:
                os.setgroups([gid])  # qmail-lspawn: the primary gid only, no initgroups
                os.setgid(gid)
                os.setuid(uid)
            except OSError:
                return users.QLX_USAGE
            if os.getuid() == 0 or os.geteuid() == 0:
                return users.QLX_ROOT
        os.umask(0o077)
        sock = socket.socket(fileno=sock_fd)
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 2)
            if not msg and not fds:
                return 0
            code = users.QLX_SYS
            own = bytearray()
            try:
                if not fds and msg[:1] == b"\0":  # a round: fsync these, say how each went
                    dirs = msg[1:].split(b"\0")
                    sock.send(bytes(maildir.fsync_dirs([d]) is not None for d in dirs))
                    continue
                f = [users.dec(x) for x in msg.split(b"\0")]
                dirs = []
                if len(fds) == 2 and len(f) == 9:
                    with maildir.deferred_dir_syncs() as dirs:
                        code = self._run(f, fds[0], fds[1], own)
                    if dirs and (one_shot or sum(map(len, dirs)) + len(dirs) > _SYNC_MAX):
                        if maildir.fsync_dirs(dirs) is not None and code == 0:
                            code, own[:] = 111, _SYNC_FAILED  # as a round's failure
                        dirs = []
                # Answer before closing the report pipe: the spawner then reads what the
                # programs wrote and closes its end, and is not woken by the hang-up.
                tail = bytes(own[:_OWN_MAX])
                sock.send(_CODE.pack(code) + _LEN.pack(len(tail)) + tail + b"\0".join(dirs))
            finally:
                for fd in fds:
                    os.close(fd)
            if one_shot:
                return 0

    def _run(self, f: list[str], mfd: int, out: int, own: bytearray) -> int:
        user, home, local, dash, ext, domain, sender, defaultdelivery, srs_field = f
        req = qlocal.Request(
            user,
            home,
            local,
            dash,
            ext,
            domain,
            sender,
            defaultdelivery,
            program_timeout=None,  # the spawner keeps the limit (_kill_late)
            lock_timeout=self.cfg.lock_timeout,
        )
        try:
            return qlocal.run(
                req, mfd, self.home, sink=own, program_out=out, srs=srs_source(srs_field)
            )
        except Exception:
            own += b"Unexpected error in local delivery. (#4.3.0)\n"
            return 111

    def _on_worker_reply(self, worker: _Worker) -> None:
        try:
            data = worker.sock.recv(_REPLY_MAX)
        except OSError:
            data = b""
        if not data or (worker.round is None and len(data) < _CODE.size):
            return  # the pidfd handler deals with a dead worker
        synced = worker.round
        job = worker.job
        worker.job = worker.round = None
        late = job is not None and job.timed_out  # killed: never idle
        if late or worker.one_shot or worker.deliveries >= self.cfg.worker_deliveries:
            self._retire(worker)
        else:
            self.idle[worker.pid] = worker
            while len(self.idle) > MAX_IDLE:
                _pid, oldest = self.idle.popitem(last=False)
                self._retire(oldest)
        r = self.rounds.get(worker.ident)
        if r is not None:
            r.awaited.discard(worker.pid)
        if synced is not None:
            self._end_round(worker.ident, synced, data)
        elif job is not None:
            (job.code,) = _CODE.unpack_from(data)
            n = _LEN.unpack_from(data, _CODE.size)[0] if len(data) >= _ANSWER else 0
            job.tail = data[_ANSWER : _ANSWER + n]
            dirs = data[_ANSWER + n :]
            if dirs:
                job.dirs = dirs.split(b"\0")
                self._defer(worker.ident, job)
            else:
                self._finish(job)

    # --- new/ fsync rounds (module docstring) -------------------------------------------

    def _defer(self, ident: Identity | None, job: _Job) -> None:
        """Keep the answer until a round of the identity's worker has fsynced job.dirs."""
        job.syncing = True
        r = self.rounds.setdefault(ident, _Round())
        if not r.jobs:  # a round falls due: wait for the workers of ident still delivering
            now = time.monotonic()
            r.ready, r.due = now + SYNC_LEAST, now + SYNC_GATHER
            r.awaited = {
                w.pid for w in self.workers.values() if w.ident == ident and w.job is not None
            }
        r.jobs.append(job)

    def _start_rounds(self) -> None:
        if not self.rounds:
            return
        now = time.monotonic()
        for ident, r in list(self.rounds.items()):
            if not r.jobs:
                if r.worker is None:
                    del self.rounds[ident]
                continue
            if r.worker is not None or now < r.ready or (r.awaited and now < r.due):
                continue
            dirs: dict[bytes, None] = {}
            size = 0
            take = 0
            for job in r.jobs:
                new = [d for d in job.dirs if d not in dirs]
                grow = sum(len(d) + 1 for d in new)
                if take and size + grow > _ROUND_MAX:
                    break  # the rest make the next round
                dirs.update(dict.fromkeys(new))
                size += grow
                take += 1
            jobs, r.jobs = r.jobs[:take], r.jobs[take:]
            r.awaited = set()
            try:
                worker = self._worker_for(ident)
            except OSError:
                self._fail_round(jobs)
                continue
            worker.round = jobs
            worker.round_deadline = now + self.cfg.program_timeout
            r.worker = worker
            try:
                worker.sock.send(b"\0" + b"\0".join(dirs))
            except OSError:
                pass  # the worker died: its pidfd handler fails the round

    def _end_round(self, ident: Identity | None, jobs: list[_Job], data: bytes) -> None:
        """The worker's answer to a round: a byte per directory in the order sent, 1 for
        one it could not fsync."""
        r = self.rounds.get(ident)
        if r is not None:
            r.worker = None
        dirs = list(dict.fromkeys(d for job in jobs for d in job.dirs))
        if len(data) != len(dirs):
            self._fail_round(jobs)
            return
        failed = {d for d, bad in zip(dirs, data, strict=True) if bad}
        for job in jobs:
            job.syncing = False
            job.sync_failed = any(d in failed for d in job.dirs)
            self._finish(job)

    def _fail_round(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.syncing = False
            job.sync_failed = True
            self._finish(job)

    def _retire(self, worker: _Worker) -> None:
        """Close its socket: the worker sees EOF and exits; its pidfd reaps it."""
        self.idle.pop(worker.pid, None)
        if worker.sock.fileno() >= 0:
            self._unwatch(worker.sock.fileno())
            worker.sock.close()

    def _on_worker_exit(self, worker: _Worker) -> None:
        status = 0
        with contextlib.suppress(ChildProcessError):
            _pid, status = os.waitpid(worker.pid, 0)
        self._unwatch(worker.pidfd)
        os.close(worker.pidfd)
        self._retire(worker)
        self.workers.pop(worker.pid, None)
        r = self.rounds.get(worker.ident)
        if r is not None:
            r.awaited.discard(worker.pid)
            if r.worker is worker:
                r.worker = None
        if worker.round is not None:  # died (or was killed) fsyncing: not known durable
            jobs, worker.round = worker.round, None
            self._fail_round(jobs)
        job = worker.job
        worker.job = None
        if job is not None:
            # Killed: "qmail-local crashed."; exited before answering (it could not drop
            # to the user's ids): its exit code says why, as qmail-lspawn's child's does.
            code = os.waitstatus_to_exitcode(status)
            job.code = code if code > 0 else _CRASHED
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
                self._close_report(job)
                return
            if len(job.report) <= qlocal.TRUNCREPORT:
                job.report += data[: qlocal.TRUNCREPORT + 1 - len(job.report)]

    def _close_report(self, job: _Job) -> None:
        job.eof = True
        self._unwatch(job.report_fd)
        os.close(job.report_fd)

    def _finish(self, job: _Job) -> None:
        """The exit code is known: take what the pipe holds (a program's background
        process may keep it open: do not wait for it) and answer."""
        if job.code is None or job.rid < 0 or job.syncing:
            return
        self._drain(job)
        if not job.eof:
            self._close_report(job)
        code = None if job.code == _CRASHED else job.code
        report = bytes(job.report) + job.tail
        if job.timed_out:  # what the programs said, then why it stopped (within 3000 bytes)
            text = _timeout_text(self.cfg.program_timeout)
            code = 111
            report = report[: qlocal.TRUNCREPORT - len(text)] + text
        elif job.sync_failed and code == 0:  # delivered, but not known to be on disk
            code, report = 111, _SYNC_FAILED
        self._reply(job.rid, qlocal.outcome_of(code, report))
        job.rid = -1
        self.jobs -= 1


def _timeout_text(limit: float) -> bytes:
    return f"Timeout on local delivery after {limit:g} seconds. (#4.3.0)\n".encode()


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536


def main(argv: list[str] | None = None) -> int:
    """``CTRLFD HOME SINGLE PTIMEOUT LTIMEOUT OWNER WD REUSE`` (spawn.py starts it)."""
    fd, cfg = Config.parse(list(sys.argv[1:] if argv is None else argv))
    Spawner(cfg, fd).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
