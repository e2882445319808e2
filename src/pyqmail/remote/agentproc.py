"""The remote agent in a process of its own, as qmailr: qmail-rspawn's place in root mode.

qmail runs qmail-rspawn and qmail-remote as qmailr (layout.md 4), apart from qmail-send
(qmails) and from the root spawner's driver: what talks to the network's SMTP servers
holds neither the scheduler's files nor the channel to the root spawner. ``pyqmail run``
as root does the same: the send part forks the agent while it is still root and has no
threads; the child closes every descriptor but its end of a socket pair (and stdio) and
drops to qmailr:qmail before it does anything else. The send part keeps
:class:`RemoteProcess`, which
has the :class:`~pyqmail.remote.deliver.RemoteAgent` methods the scheduler uses. The
child zeroes lock/tcpto at start (qmail-rspawn's job), which is qmailr's file.

Frames (both ways): a header ``!IcI`` (request id, kind, payload length), then the
payload. Scheduler to agent: ``D`` deliver (payload: the mess path, the sender and each
recipient, each followed by NUL), ``H`` re-read the control files now. Agent to
scheduler: ``R`` result for that id, one record per recipient in order: the status
letter (K/Z/D), the text's length as ``!I``, the text in UTF-8. A child that goes away
fails every delivery in flight and every later one temporarily, and ``on_lost`` is
called so the send part can stop (qmail-send's "lost connection to qmail-rspawn").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from pyqmail.control import ControlCache
from pyqmail.eventloop import new_loop
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status

_HEAD = struct.Struct("!IcI")
_LEN = struct.Struct("!I")
MAX_FRAME = 1 << 24
_MAXFD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536
_LOST = "Unable to talk to the remote agent. (#4.3.0)"


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def encode_request(mess: Path, sender: str, recipients: Sequence[str]) -> bytes:
    return b"".join(f + b"\0" for f in [os.fsencode(mess), _enc(sender), *map(_enc, recipients)])


def decode_request(payload: bytes) -> tuple[Path, str, list[str]]:
    fields = payload.split(b"\0")
    if len(fields) < 3 or fields[-1] != b"":
        raise ValueError("bad deliver frame")
    return Path(os.fsdecode(fields[0])), _dec(fields[1]), [_dec(f) for f in fields[2:-1]]


def encode_outcomes(outcomes: Sequence[Outcome]) -> bytes:
    out = bytearray()
    for o in outcomes:
        text = o.text.encode("utf-8", "replace")
        out += o.status.value.encode() + _LEN.pack(len(text)) + text
    return bytes(out)


def decode_outcomes(payload: bytes) -> list[Outcome]:
    out: list[Outcome] = []
    i = 0
    while i < len(payload):
        if i + 1 + _LEN.size > len(payload):
            raise ValueError("short outcome record")
        status = Status(payload[i : i + 1].decode("ascii"))
        (n,) = _LEN.unpack_from(payload, i + 1)
        start = i + 1 + _LEN.size
        if start + n > len(payload):
            raise ValueError("short outcome text")
        out.append(Outcome(status, payload[start : start + n].decode("utf-8", "replace")))
        i = start + n
    return out


def _frames(buf: bytearray) -> list[tuple[int, bytes, bytes]]:
    """Take every whole frame off the front of ``buf``."""
    got = []
    while len(buf) >= _HEAD.size:
        rid, kind, size = _HEAD.unpack_from(buf)
        if size > MAX_FRAME:
            raise ValueError("frame too large")
        if len(buf) < _HEAD.size + size:
            break
        got.append((rid, kind, bytes(buf[_HEAD.size : _HEAD.size + size])))
        del buf[: _HEAD.size + size]
    return got


async def _read_frames(sock: socket.socket) -> AsyncIterator[tuple[int, bytes, bytes]]:
    """Every frame from ``sock`` until EOF (a non-blocking socket)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while data := await loop.sock_recv(sock, 65536):
        buf += data
        for frame in _frames(buf):
            yield frame


class RemoteProcess:
    """The scheduler's side: ``deliver``, ``reset_tcpto``, ``reload`` and ``close``."""

    def __init__(self, home: Home, *, on_lost: Callable[[], None] | None = None) -> None:
        self.home = home
        self.on_lost = on_lost
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[list[Outcome]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._send_lock: asyncio.Lock | None = None
        self._dead = False

    def start(self, user: tuple[int, int] | None = None) -> None:
        """Fork the agent (before this process has threads), as ``user`` = (uid, gid)
        with no other groups if given. The child keeps no descriptor but stdin, stdout,
        stderr and its end of the socket pair (not the root spawner's, not the queue's)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            code = 111
            try:
                fd = theirs.fileno()
                os.closerange(3, fd)
                os.closerange(fd + 1, _MAXFD)
                if user is not None:
                    _prepare_mtasts(self.home, user)
                    os.setgroups([])
                    os.setgid(user[1])
                    os.setuid(user[0])
                    if os.getuid() == 0 or os.geteuid() == 0:
                        raise OSError("still root after dropping privileges")
                code = _child(self.home, theirs)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    print(f"alert: remote agent: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock = ours

    def reset_tcpto(self) -> None:
        """Nothing to do here: the agent zeroes lock/tcpto as it starts."""

    def watch(self) -> None:
        """Start reading the agent's replies in the running loop (at the latest, the
        first delivery does), so that an agent lost while idle is noticed at once."""
        if self._reader is None and self._sock is not None:
            self._sock.setblocking(False)
            self._send_lock = asyncio.Lock()
            self._reader = asyncio.get_running_loop().create_task(self._read_replies(self._sock))

    async def _send(self, rid: int, kind: bytes, payload: bytes) -> bool:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        self.watch()
        assert self._send_lock is not None
        try:
            async with self._send_lock:
                await loop.sock_sendall(self._sock, _HEAD.pack(rid, kind, len(payload)) + payload)
        except OSError:
            self._lose()
            return False
        return True

    def _lose(self) -> None:
        """The agent is gone: fail what is in flight, and say so once."""
        if self._dead:
            return
        self._dead = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result([])
        self._pending.clear()
        if self.on_lost is not None:
            self.on_lost()

    async def deliver(self, mess: Path, sender: str, recipients: list[str]) -> list[Outcome]:
        """One Outcome per recipient, as RemoteAgent.deliver."""
        if not recipients:
            return []
        lost = [Outcome.temp(_LOST)] * len(recipients)
        if self._sock is None or self._dead:
            return lost
        rid = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if not await self._send(rid, b"D", encode_request(mess, sender, recipients)):
            self._pending.pop(rid, None)
            return lost
        got = await fut
        return got if len(got) == len(recipients) else lost

    async def reload(self) -> None:
        """HUP: the agent re-reads its control files now."""
        if self._sock is not None and not self._dead:
            await self._send(0, b"H", b"")

    async def _read_replies(self, sock: socket.socket) -> None:
        try:
            async for rid, kind, payload in _read_frames(sock):
                fut = self._pending.pop(rid, None)
                if kind != b"R" or fut is None or fut.done():
                    continue
                try:
                    fut.set_result(decode_outcomes(payload))
                except ValueError:
                    fut.set_result([])
        except (OSError, ValueError):
            pass
        self._lose()

    async def close(self) -> None:
        """End the agent (it QUITs its kept connections) and wait for it."""
        self.on_lost = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
        if self.pid is not None:
            pid, self.pid = self.pid, None
            with contextlib.suppress(TimeoutError, ChildProcessError):
                # it finishes its deliveries (at most 60 s), QUITs and exits on EOF; a
                # lesser user cannot kill it, so past that it is left to end on its own
                await asyncio.wait_for(asyncio.to_thread(os.waitpid, pid, 0), 90)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- the child ------------------------------------------------------------------------------


def _prepare_mtasts(home: Home, user: tuple[int, int]) -> None:
    """HOME/mtasts for qmailr, made as root before the drop when a home made before it
    existed lacks it; without it MTA-STS policies are not kept on disk (a warning)."""
    from pyqmail.remote.mtastscache import prepare_dir

    try:
        prepare_dir(home, *user)
    except OSError as e:
        print(f"warning: remote agent: MTA-STS policies cannot be cached: {e}", file=sys.stderr)


async def _serve(home: Home, sock: socket.socket) -> int:
    from pyqmail.remote.deliver import RemoteAgent

    loop = asyncio.get_running_loop()
    ctl = ControlCache(home, max_age=1.0)
    agent = RemoteAgent(home, ctl)
    agent.reset_tcpto()  # qmail-rspawn zeroes lock/tcpto when qmail starts
    send_lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def one(rid: int, payload: bytes) -> None:
        try:
            mess, sender, recipients = decode_request(payload)
            outcomes = await agent.deliver(mess, sender, recipients)
        except Exception as e:  # a bug: temporary, never a bounce
            n = max(1, payload.count(b"\0") - 2)
            outcomes = [Outcome.temp(f"remote agent error: {type(e).__name__} (#4.3.0)")] * n
        body = encode_outcomes(outcomes)
        async with send_lock:
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, _HEAD.pack(rid, b"R", len(body)) + body)

    try:
        async for rid, kind, payload in _read_frames(sock):
            if kind == b"D":
                t = loop.create_task(one(rid, payload))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            elif kind == b"H":
                ctl.refresh()
    except (OSError, ValueError):
        pass
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    await agent.close()
    return 0


def _child(home: Home, sock: socket.socket) -> int:
    # The send part decides when to stop: EOF on the socket (its close(), or its death)
    # ends the agent once its deliveries are done. A TERM sent to the whole process group
    # (kill -- -PGID, systemd's KillMode=control-group) must not cut them short: the send
    # part has the same TERM and stops in order, and the pool's workers ignore it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (HUP arrives as a frame)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.umask(0o077)
    sock.setblocking(False)
    loop = new_loop()
    try:
        return loop.run_until_complete(_serve(home, sock))
    finally:
        loop.close()
