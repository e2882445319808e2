"""The local agent of single-user mode: pre-forked workers that run qmail-local's code.

When nothing needs a different uid (single-user mode, or the daemon started by an ordinary
user), a fork per delivery buys no separation and costs most of a delivery's CPU (page
table copies and copy-on-write faults of a large interpreter). Each worker runs the same
code the spawner's child runs: qmail-lspawn's checks (:func:`pyqmail.local.spawner.admit`),
then local/qlocal.py. The daemon keeps the time limit (:class:`WorkerPoolLocal`).

Maildir directories are made durable here, many deliveries at a time: a worker fsyncs
each message file before its link into ``new/`` as always, but hands the fsync of
``new/`` itself back with its reply (local/maildir.py's ``deferred_dir_syncs``) and is
free for the next delivery. :class:`DirSyncs` fsyncs every directory named by the
deliveries that finished meanwhile in one round in a thread (a round first waits a few
milliseconds, for the deliveries still in their workers and for other fsyncs that may
commit its links), and only then does each
delivery's result reach the scheduler: nothing is reported delivered, and so nothing
leaves the queue, before its ``new/`` entry is on disk. On a journalled file system the
journal commits are what a delivery waits for; one round serves many deliveries
instead of one commit each (docs/benchmarks/e2e.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.local import maildir, program, qlocal, users
from pyqmail.local.spawner import DefaultDelivery, admit
from pyqmail.outcome import Outcome
from pyqmail.sockio import recv_exact


def _deliver(
    home: Home,
    defaultdelivery: Callable[[], str],
    mess: Path,
    sender: str,
    recipient: str,
    cdb_cache: users.CdbCache,
    maildir_timeout: float | None = maildir.MAILDIR_TIMEOUT,
) -> Outcome:
    """One delivery in this process, blocking: qmail-lspawn's checks, then qmail-local.
    ``cdb_cache``: users/cdb kept open between deliveries (re-stat per lookup, reopened
    after qmail-newu replaced it), as the root spawner keeps it. ``maildir_timeout``:
    None where the pool's own limit is as short (no SIGALRM set and reset per delivery)."""
    got = admit(
        mess,
        recipient,
        defaultdelivery=defaultdelivery,
        resolve=lambda local: users.resolve_with(home, local, cdb_cache.reader()),
        refuse_root=False,
    )
    if isinstance(got, Outcome):
        return got
    try:
        info = got.info
        req = qlocal.Request(
            info.user,
            info.home,
            got.local,
            info.dash,
            info.ext,
            got.domain,
            sender,
            got.defaultdelivery,
            program_timeout=None,  # the pool keeps the limit
            maildir_timeout=maildir_timeout,
        )
        try:
            return qlocal.deliver(req, got.mfd, home)
        except Exception:
            return Outcome.temp("Unexpected error in local delivery. (#4.3.0)\n")
    finally:
        os.close(got.mfd)


_LEN = struct.Struct("!I")


GATHER = 0.005  # seconds a round waits at most for the deliveries already under way
GATHER_LEAST = 0.003  # seconds every round waits: another fsync may commit its links


class DirSyncs:
    """fsync directories for many waiters at once: one round at a time in a thread; a
    round takes every directory asked for before it started (module docstring).

    Before it starts, a round waits ``least`` seconds (3 ms): on a journalled file system
    a directory fsync forces a journal commit unless the links it must make durable were
    committed already, and meanwhile the queue's own fsyncs and the other deliveries'
    often have. It also waits for the deliveries that are under way (in a worker) when it
    falls due, at most ``gather`` seconds: each of them would otherwise need a round, that
    is a journal commit, of its own right after. A delivery is under way from
    :meth:`begin` to :meth:`end`."""

    def __init__(self, gather: float = GATHER, least: float = GATHER_LEAST) -> None:
        self.gather = gather
        self.least = least
        self._waiting: dict[bytes, list[asyncio.Future[OSError | None]]] = {}
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._tickets = 0
        self._under_way: set[int] = set()
        self._awaited: set[int] | None = None  # what the gathering round still waits for
        self._all_ended: asyncio.Event | None = None

    def begin(self) -> int:
        """A delivery goes to a worker: a ticket for :meth:`end`."""
        self._tickets += 1
        self._under_way.add(self._tickets)
        return self._tickets

    def end(self, ticket: int) -> None:
        """The delivery's worker has answered (or it was given up)."""
        self._under_way.discard(ticket)
        awaited = self._awaited
        if awaited is not None:
            awaited.discard(ticket)
            if not awaited and self._all_ended is not None:
                self._all_ended.set()

    async def sync(self, dirs: list[bytes]) -> OSError | None:
        """Return once every directory in ``dirs`` was fsynced; the first error or None."""
        loop = asyncio.get_running_loop()
        futs = []
        for d in dict.fromkeys(dirs):
            fut: asyncio.Future[OSError | None] = loop.create_future()
            self._waiting.setdefault(d, []).append(fut)
            futs.append(fut)
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._rounds())
        if len(futs) == 1:  # one Maildir, as almost always: no gather around one future
            return await futs[0]
        errs = await asyncio.gather(*futs)
        return next((e for e in errs if e is not None), None)

    async def _gather(self) -> None:
        """Wait ``least`` seconds, and for the deliveries under way now to end, at most
        ``gather`` seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._await_under_way()
        rest = self.least - (loop.time() - start)
        if rest > 0:
            await asyncio.sleep(rest)

    async def _await_under_way(self) -> None:
        if not self._under_way or self.gather <= 0:
            return
        self._awaited = set(self._under_way)
        self._all_ended = asyncio.Event()
        try:
            async with asyncio.timeout(self.gather):
                await self._all_ended.wait()
        except TimeoutError:
            pass
        finally:
            self._awaited = self._all_ended = None

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                await self._gather()
                batch, self._waiting = self._waiting, {}
                try:
                    errs = await loop.run_in_executor(None, _sync_each, list(batch))
                except Exception as e:
                    errs = [OSError(str(e))] * len(batch)
                for futs, err in zip(batch.values(), errs, strict=True):
                    for fut in futs:
                        if not fut.done():
                            fut.set_result(err)
        finally:
            self._running = False


def _sync_each(dirs: list[bytes]) -> list[OSError | None]:
    return [maildir.fsync_dirs([d]) for d in dirs]


class WorkerPoolLocal:
    """Local deliveries in ``workers`` pre-forked single-threaded processes (single-user mode).

    The deliveries' many small system calls do not compete with the daemon's event loop for
    the interpreter lock, and no process is forked per delivery. ``start()`` must run before
    the daemon has threads. Requests and replies are length-prefixed frames on one socket
    pair per worker (``mess\\0sender\\0recipient`` / letter + text); a worker serves one
    delivery at a time and exits when its socket closes.

    The time limit on a delivery (``program_timeout``) is kept here, not in the worker,
    which a program could stop (``kill -STOP $PPID``): each worker leads its own process
    group with its programs in it; past the limit the group is SIGKILLed, the delivery
    deferred, and the worker replaced by a fresh interpreter (``python -I``; the daemon
    has threads by then, so it is not forked).
    """

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        *,
        workers: int = 10,
        program_timeout: float = program.DEFAULT_TIMEOUT,
    ) -> None:
        self.home = home
        self.ctl = ctl
        self.workers = max(1, workers)
        self.program_timeout = program_timeout
        self._socks: list[socket.socket] = []
        self._pids: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pid_of: dict[int, int] = {}  # worker index -> pid (its process group)
        self._idle: asyncio.Queue[int] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._dirs = DirSyncs()

    def start(self) -> None:
        for _ in range(self.workers):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    ours.close()
                    for other in self._socks:
                        other.close()
                    self._serve(theirs)
                except BaseException:  # never return into the daemon's code
                    code = 111
                finally:
                    os._exit(code)
            theirs.close()
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)  # as the child does: whichever runs first
            self._pid_of[len(self._socks)] = pid
            self._socks.append(ours)
            self._pids.append(pid)

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # its own group, with its programs: the daemon's limit kills both
        defaultdelivery = DefaultDelivery(self.ctl)
        cdb_cache = users.CdbCache(self.home.users / "cdb")
        # qmail-local's 24-hour alarm around a Maildir write: the daemon's limit on the
        # whole delivery (the worker's group killed past it) is that bound when no longer.
        maildir_timeout = (
            None if self.program_timeout <= maildir.MAILDIR_TIMEOUT else maildir.MAILDIR_TIMEOUT
        )
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_IGN)  # the daemon decides; EOF ends the worker
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        while True:
            head = recv_exact(sock, _LEN.size)
            if head is None:
                return
            body = recv_exact(sock, _LEN.unpack(head)[0])
            if body is None:
                return
            parts = body.split(b"\0")
            dirs: list[bytes] = []
            if len(parts) != 3:
                out = Outcome.temp("Internal error: bad request to the local worker. (#4.3.0)\n")
            else:
                with maildir.deferred_dir_syncs() as dirs:
                    out = _deliver(
                        self.home,
                        defaultdelivery,
                        Path(os.fsdecode(parts[0])),
                        users.dec(parts[1]),
                        users.dec(parts[2]),
                        cdb_cache,
                        maildir_timeout,
                    )
            # letter, the text's length and the text, then the new/ dirs to fsync
            text = out.text.encode("utf-8", "surrogateescape")
            reply = out.status.value.encode() + _LEN.pack(len(text)) + text + b"\0".join(dirs)
            sock.sendall(_LEN.pack(len(reply)) + reply)

    async def _setup(self) -> None:
        idle: asyncio.Queue[int] = asyncio.LifoQueue()
        for i, sock in enumerate(self._socks):
            sock.setblocking(False)
            self._streams[i] = await asyncio.open_connection(sock=sock)
            idle.put_nowait(i)
        self._idle = idle

    async def deliver(self, mess: Path, sender: str, recipient: str) -> Outcome:
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._setup())
        await self._ready
        assert self._idle is not None
        if not self._streams:
            return Outcome.temp("Unable to talk to the local delivery workers. (#4.3.0)\n")
        i = await self._idle.get()
        reader, writer = self._streams[i]
        payload = b"\0".join((os.fsencode(mess), users.enc(sender), users.enc(recipient)))
        ticket = self._dirs.begin()
        try:
            writer.write(_LEN.pack(len(payload)) + payload)
            await writer.drain()
            async with asyncio.timeout(self.program_timeout):  # a timer, not a task per delivery
                body = await _read_frame(reader)
        except TimeoutError:  # (an OSError: first)
            await self._replace(i)
            return Outcome.temp(
                f"Timeout on local delivery after {self.program_timeout:g} seconds. (#4.3.0)\n"
            )
        except (OSError, asyncio.IncompleteReadError):
            self._streams.pop(i, None)  # the worker is gone; the others carry on
            return Outcome.temp("qmail-local crashed.\n")
        finally:
            self._dirs.end(ticket)
        self._idle.put_nowait(i)
        letter = body[:1]
        n = _LEN.unpack_from(body, 1)[0] if len(body) >= 1 + _LEN.size else 0
        text = body[1 + _LEN.size : 1 + _LEN.size + n].decode("utf-8", "surrogateescape")
        rest = body[1 + _LEN.size + n :]
        if rest and await self._dirs.sync(rest.split(b"\0")) is not None and letter == b"K":
            # delivered, but new/ is not known to be on disk: deliver again (at least once)
            return Outcome.temp("Temporary error on maildir delivery. (#4.3.0)\n")
        if letter == b"K":
            return Outcome.ok(text)
        if letter == b"D":
            return Outcome.perm(text)
        return Outcome.temp(text)

    async def _replace(self, i: int) -> None:
        """Kill worker ``i``'s process group (it and its programs) and start another."""
        assert self._idle is not None
        _reader, writer = self._streams.pop(i)
        writer.close()
        pid = self._pid_of.pop(i, None)
        if pid is not None:
            program.kill_group(pid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _WORKER_BOOT, str(theirs.fileno()),
                 str(self.home.root), "1" if self.home.single_user else "0",
                 repr(self.program_timeout)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
                process_group=0,
            )  # fmt: skip
        except OSError:
            ours.close()
            return  # one worker fewer; the others carry on
        finally:
            theirs.close()
        self._procs.append(proc)
        self._pid_of[i] = proc.pid
        self._socks.append(ours)
        ours.setblocking(False)
        self._streams[i] = await asyncio.open_connection(sock=ours)
        self._idle.put_nowait(i)

    async def close(self) -> None:
        for _, writer in self._streams.values():
            writer.close()
        self._streams.clear()
        for sock in self._socks:
            sock.close()
        loop = asyncio.get_running_loop()
        for pid in self._pids:
            await loop.run_in_executor(None, _reap, pid)
        self._pids.clear()
        for proc in self._procs:
            await loop.run_in_executor(None, proc.wait)
        self._procs.clear()


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(_LEN.size)
    return await reader.readexactly(_LEN.unpack(head)[0])


_WORKER_BOOT = "import sys; from pyqmail.local.pool import worker_main; worker_main(sys.argv[1:])"


def worker_main(argv: list[str]) -> None:
    """A replacement worker in its own interpreter: ``FD HOME SINGLE TIMEOUT`` (see
    _replace; the pool's limit decides whether the worker sets qmail-local's alarm)."""
    fd, root, single, limit = argv
    home = Home(Path(root), single_user=single == "1")
    pool = WorkerPoolLocal(home, ControlCache(home), workers=1, program_timeout=float(limit))
    pool._serve(socket.socket(fileno=int(fd)))


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
