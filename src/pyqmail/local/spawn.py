"""The daemon's handle on the local delivery spawner (qmail-lspawn), interface per
docs/architecture.md: ``LocalSpawner(home, ctl).start()`` then ``await deliver(mess,
sender, recipient) -> Outcome`` with many deliveries in flight, ``await close()``.

:meth:`LocalSpawner.start` starts :mod:`pyqmail.local.spawner` as a separate lean
process (fork + exec of ``python -I -S -c BOOT`` in ``/``, the socket pair's end inherited;
BOOT checks the import path, then runs the spawner's ``main``) which runs each delivery
in a process forked from it and dropped to the recipient's ids (reused for the same ids
with ``reuse=True``, the default; a fresh one per delivery, qmail-lspawn's way, with
``reuse=False``). Call it while still root. How many deliveries run at once is the
scheduler's business (concurrencylocal); the spawner forks whatever it is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import site
import socket
import subprocess
import sys
from pathlib import Path

from pyqmail.control import ControlCache
from pyqmail.home import Home, HomeError, warn_if_root_single_user
from pyqmail.local import program, users
from pyqmail.local.spawner import HEAD as _HEAD
from pyqmail.local.spawner import WORKER_DELIVERIES, Config
from pyqmail.outcome import Outcome, Status

__all__ = ["LocalSpawner"]

_DIED = Outcome.temp("Unable to talk to the local delivery spawner. (#4.3.0)\n")

# The spawner keeps root, so it starts isolated (``-I``: no PYTHONPATH, no user site, no
# script or current directory on sys.path; ``-S``: site-packages not yet added, their
# list comes from this process) in ``/``.
# BOOT refuses to run if another account could write a directory it imports from (or
# one above it: a directory writable by others and not sticky lets them rename the path
# away; a sticky one such as /tmp only protects what root owns in it), then checks each
# site-packages directory and its .pth files (which run code) before adding it, and the
# path again before it imports pyqmail. Source text, not a function: it must run before
# pyqmail itself is imported.
CHECK_SOURCE = """
import os, stat, sys
def unsafe(entry):
    me = os.geteuid()
    p, first = os.path.abspath(entry), True
    while True:
        try:
            st = os.stat(p)
        except OSError:
            st = None  # not there: whoever may create it is judged one level up
        if st is not None:
            if st.st_uid not in (0, me):
                return p
            if st.st_mode & 0o022 and (first or not st.st_mode & stat.S_ISVTX):
                return p
            first = False
        up = os.path.dirname(p)
        if up == p:
            return None
        p = up
"""
BOOT = (
    CHECK_SOURCE
    + """
def check(paths):
    for path in paths if os.geteuid() == 0 else ():
        bad = unsafe(path)
        if bad is not None:
            sys.stderr.write("qmail-lspawn: fatal: %s is writable by another account\\n" % bad)
            sys.exit(111)
check(sys.path)
import site
for sitedir in sys.argv[1].split(os.pathsep) if sys.argv[1] else ():
    if os.path.isdir(sitedir):
        check([sitedir])
        check([os.path.join(sitedir, n) for n in os.listdir(sitedir) if n.endswith(".pth")])
        site.addsitedir(sitedir)
check(sys.path)
from pyqmail.local.spawner import main
sys.exit(main(sys.argv[2:]))
"""
)


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
        worker_deliveries: int = WORKER_DELIVERIES,
        reuse: bool = True,
    ) -> None:
        self.home = home
        self.ctl = ctl
        self.program_timeout = program_timeout
        self.lock_timeout = lock_timeout
        self.message_owner = message_owner
        self.worker_deliveries = worker_deliveries
        self.reuse = reuse
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Outcome]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._send_lock: asyncio.Lock | None = None
        self._dead = False
        self._rbuf = bytearray()

    def start(self) -> None:
        """Start the spawner process (it inherits this process's environment)."""
        owner = self.message_owner
        if owner is None:
            try:
                owner = self.home.ids().uid("queue")
            except HomeError:
                owner = None
        warn_if_root_single_user(self.home, "qmail-lspawn")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = Config(
            self.home,
            self.program_timeout,
            self.lock_timeout,
            owner,
            self.worker_deliveries,
            self.reuse,
        )
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", BOOT, _site_dirs(), *cfg.argv(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                cwd="/",
            )
        finally:
            theirs.close()
        self.pid = self._proc.pid
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
        """Route reply frames to their futures until the spawner goes away.

        If the event loop itself ends (the task is cancelled) the spawner is still fine:
        the next deliver() on a new loop starts a new reader, and the partial frame
        buffer survives on the instance so the stream stays in step.
        """
        loop = asyncio.get_running_loop()
        buf = self._rbuf
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
        except asyncio.CancelledError:
            self._reader = None
            self._send_lock = None
            self._pending.clear()
            raise
        except OSError:
            pass
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
            else:
                await asyncio.get_running_loop().run_in_executor(None, _drain, sock)
            sock.close()
        if self._proc is not None:
            proc, self._proc = self._proc, None
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)


def _site_dirs() -> str:
    """This interpreter's site-packages (a venv's, with -S the child cannot know them),
    for BOOT to check and add; never the user site directory."""
    return os.pathsep.join(site.getsitepackages())


def _drain(sock: socket.socket) -> None:
    """Wait (in a thread) until the spawner closes its end; replies are dropped."""
    sock.setblocking(True)
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _decode_reply(body: bytes) -> Outcome:
    letter = body[:1].decode("ascii", "replace")
    text = body[1:].decode("utf-8", "replace")
    try:
        return Outcome(Status(letter), text)
    except ValueError:
        return Outcome.temp("Internal error in the local delivery spawner. (#4.3.0)\n")
