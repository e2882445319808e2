"""The queue writer in a process of its own, fed by an event loop: group commit, no GIL.

The SMTP listener's event loop must never wait on the disk, and the queue's work is a
few dozen system calls per message (create, write, fsync, link, unlink). Done by
threads of the listener's own process, every one of those calls gives up the GIL and
must win it back from the event loop: on a busy listener each commit then waits for the
loop more than for the disk (measured in docs/benchmarks/smtp.md: the same batch takes
twice as long beside a busy loop, and 200 times as long beside a thread that never
sleeps). So the listener hands its messages to a child process that does nothing but
write the queue, exactly as qmail-smtpd hands them to qmail-queue.

The child is ``python -m pyqmail.queue.committer --fd N`` with one end of a socketpair;
in root mode (daemon/split.py) it is forked instead, while the listener is still root,
and drops to the queue's owner (qmail-queue's setuid qmailq), and since qmaild cannot
start another one, the queue service takes SMTP's messages once it is gone.
It reads frames, writes each message into the queue as it arrives
(:class:`~pyqmail.queue.writer.QueueWriter`, the same steps and crash states as any
writer), and commits every message whose end it has seen together with
:func:`~pyqmail.queue.writer.commit_many` as soon as no more input is waiting; messages
that arrive meanwhile make the next batch. The reply for a message is sent only after
its commit returned. The qp in the Received line and in ``250 ok ... qp N`` is the
child's pid, as qmail's is qmail-queue's.

Frames (both ways): a header ``!cII`` (kind, message id, payload length), then the
payload. Listener to child: ``B`` begin (payload: the listener's Received line), ``S`` the
same for a message to be DKIM-signed (an authenticated session's: pyqmail.dkim), ``D``
message bytes, ``C`` commit (payload: the envelope as qmail-queue reads it on fd 1),
``A`` abort. Child to listener: ``R`` result, ``CODE QP MSGNUM[ TEXT]`` as the queue
service sends it (CODE 0: queued). A child that dies fails every message in flight with
qmail's ``451 qq crashed`` (nothing was acknowledged, and the files it began are
removed by the queue's clean); the next message starts a new child.

When the child falls behind (the disk stalls) the frames wait in the listener's memory:
past ``HIGH_WATER`` bytes the listener stops reading from its clients until the child
has caught up to ``LOW_WATER``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import cast

from pyqmail.dkim import QueuePending, SigningPending, preload, signing
from pyqmail.home import Home, HomeError, resolve_home
from pyqmail.queue import codes
from pyqmail.queue.contract import Reply, Submission, Submitter
from pyqmail.queue.envelope import EnvelopeError, EnvelopeParser, format_input
from pyqmail.queue.service import decode_reply, encode_reply_body
from pyqmail.queue.writer import (
    CommitPipeline,
    Pending,
    QueueError,
    QueueWriter,
    poke_trigger,
)

log = logging.getLogger("pyqmail.committer")

HEADER = struct.Struct("!cII")
MAX_FRAME = 1 << 20  # message bytes per D frame
HIGH_WATER = 16 << 20  # listener-side backlog that pauses the clients
LOW_WATER = 4 << 20
DRAIN_LIMIT = 8 << 20  # input the child reads before committing what is complete

BEGIN, DATA, COMMIT, ABORT, RESULT = b"B", b"D", b"C", b"A", b"R"
SIGNED = b"S"  # BEGIN of a message to be DKIM-signed


def frame(kind: bytes, ident: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, ident, len(payload)) + payload


def parse_frames(buf: bytearray) -> tuple[list[tuple[bytes, int, bytes]], int]:
    """The complete frames at the start of ``buf`` and how many bytes they take."""
    out = []
    pos = 0
    n = len(buf)
    size = HEADER.size
    while n - pos >= size:
        kind, ident, length = HEADER.unpack_from(buf, pos)
        if n - pos - size < length:
            break
        start = pos + size
        out.append((kind, ident, bytes(buf[start : start + length])))
        pos = start + length
    return out, pos


# ----------------------------------------------------------------------------- child


def serve(
    sock: socket.socket, writer: QueueWriter, *, trigger: bool, uid: int | None = None
) -> None:
    """The child's loop: until the listener closes its end (then finish and return).

    ``uid``: the listener's uid, for the envelope and the Received line (the child may
    run as the queue's owner while the listener runs as qmaild).

    Commits go through a :class:`~pyqmail.queue.writer.CommitPipeline`: while messages
    linked into todo/ await their todo/ fsync, the child does not wait for input but
    takes whatever has arrived, so that fsync shares its journal commit with the file
    fsyncs of the next messages. (Where the writer needs one commit per batch, nothing is
    ever pending between rounds: each round answers all of its messages.)"""
    open_: dict[int, QueuePending | QueueError] = {}
    buf = bytearray()
    done: list[int] = []
    writer.notify = done.append
    pipe = CommitPipeline(writer)
    eof = False
    try:
        while not eof or pipe.pending:
            got = 0
            if not pipe.pending:
                data = sock.recv(1 << 20)
                if not data:
                    break
                buf += data
                got = len(data)
            while not eof and got < DRAIN_LIMIT:  # everything waiting now joins this batch
                try:
                    data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    eof = True
                    break
                buf += data
                got += len(data)
            frames, used = parse_frames(buf)
            del buf[:used]
            out = _take_frames(frames, open_, writer, done, uid, pipe)
            if done and trigger:
                poke_trigger(writer.paths.trigger)
            done.clear()
            if out:
                sock.sendall(b"".join(out))
    finally:
        pipe.abort()
        for p in open_.values():
            if not isinstance(p, QueueError):
                p.abort()


def _take_frames(
    frames: list[tuple[bytes, int, bytes]],
    open_: dict[int, QueuePending | QueueError],
    writer: QueueWriter,
    done: list[int],
    uid: int | None = None,
    pipe: CommitPipeline | None = None,
) -> list[bytes]:
    """Carry out one read's frames and one round of commits; the replies now final."""
    out: list[bytes] = []
    batch: list[tuple[object, Pending, bytes, Sequence[bytes]]] = []
    qp = os.getpid()
    if pipe is None:
        pipe = CommitPipeline(writer)
    for kind, ident, payload in frames:
        if kind == DATA:
            p = open_.get(ident)
            if p is not None and not isinstance(p, QueueError):
                p.write(payload)  # a write error surfaces at commit
        elif kind in (BEGIN, SIGNED):
            try:
                w = writer.begin(origin="network", received=payload, uid=uid)
                open_[ident] = signing(writer.home, w) if kind == SIGNED else w
            except QueueError as e:
                open_[ident] = e
        elif kind == COMMIT:
            p = open_.pop(ident, None)
            if p is None:
                out.append(_result(ident, Reply(codes.INTERNAL_BUG, qp, 0, "no such message")))
            elif isinstance(p, QueueError):
                out.append(_result(ident, Reply(p.code, qp, 0, str(p))))
            else:
                parser = EnvelopeParser()
                try:
                    parser.feed(payload)
                    parser.finish()
                    if isinstance(p, SigningPending):
                        p = p.finish()  # the signature and the held message written
                except EnvelopeError as e:
                    p.abort()
                    out.append(_result(ident, Reply(e.code, qp, 0, str(e))))
                    continue
                except QueueError as e:
                    p.abort()
                    out.append(_result(ident, Reply(e.code, qp, 0, str(e))))
                    continue
                assert isinstance(p, Pending)
                batch.append(((ident, p.qp), p, parser.sender or b"", parser.recipients))
        elif kind == ABORT:
            p = open_.pop(ident, None)
            if p is not None and not isinstance(p, QueueError):
                p.abort()
        else:
            log.warning("unknown frame %r from the listener", kind)
    if not batch and not pipe.pending:
        return out
    try:
        results = pipe.round(batch)
    except Exception:  # a bug must not take the child down with every open message
        log.exception("commit failed")
        results = pipe.drain()  # final before the bug: their replies still go out
        withdrawn = pipe.abort()  # linked, not synced: todo links removed
        for _, p, _, _ in batch:
            p.abort()
        bug = QueueError(codes.INTERNAL_BUG)
        answered = {key for key, _ in results}
        for key in [*withdrawn, *(key for key, _, _, _ in batch)]:
            if key not in answered:
                answered.add(key)
                results.append((key, bug))
    for key, res in results:
        ident, pqp = cast(tuple[int, int], key)
        if isinstance(res, QueueError):
            out.append(_result(ident, Reply(res.code, qp, 0, str(res))))
        else:
            out.append(_result(ident, Reply(0, pqp, res)))
    return out


def _result(ident: int, r: Reply) -> bytes:
    return frame(RESULT, ident, encode_reply_body(r))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyqmail-committer")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--home")
    ap.add_argument("--trigger", action="store_true", help="poke lock/trigger per batch")
    ap.add_argument("--uid", type=int, help="the listener's uid (default: our own)")
    ns = ap.parse_args(argv)
    # Only the listener ends this process, by closing its end: a ^C or a TERM sent to the
    # whole process group must not cut the messages in flight short.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="pyqmail committer: %(message)s")
    try:
        home = resolve_home(ns.home)
    except HomeError as e:
        print(f"pyqmail committer: fatal: {e}", file=sys.stderr)
        return 111
    sock = socket.socket(fileno=ns.fd)
    try:
        serve(sock, QueueWriter(home), trigger=ns.trigger, uid=ns.uid)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the listener went away: what it had not committed is aborted
    return 0


# ---------------------------------------------------------------------------- parent


class CommitProcess:
    """The listener's side: a Submitter (queue/contract.py) whose messages the child commits.

    ``begin`` starts the child if none is running. ``notify(msgnum)`` is called in the
    event loop for each queued message (the daemon's in-process wake-up of its
    scheduler); without it the child pokes lock/trigger once per batch.
    """

    kind = "in-process"

    def __init__(
        self,
        home: Home,
        *,
        notify: Callable[[int], None] | None = None,
        user: tuple[int, int] | None = None,
        envelope_uid: int | None = None,
        fallback: Submitter | None = None,
    ) -> None:
        self.home = home
        self.notify = notify
        # Root mode: the child runs as the queue's owner (uid, gid) while the listener,
        # once it has dropped to qmaild, could not start another one: after the first
        # child is gone, ``fallback`` (the queue service) takes the messages.
        self.user = user
        self.envelope_uid = envelope_uid  # the uid qmail-queue would see (qmaild)
        self.fallback = fallback
        self.pid = 0
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | _Forked | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = bytearray()
        self._in = bytearray()
        self._writing = False
        self._next = 0
        self.generation = 0  # which child: a message begun with another one is lost
        self._futures: dict[int, asyncio.Future[Reply]] = {}
        self.paused = False
        self.on_resume: Callable[[], None] | None = None  # the backlog fell to LOW_WATER

    # -- Submitter

    def begin(
        self, *, origin: str = "network", received: bytes = b"", sign: bool = False
    ) -> Submission:
        """``sign``: the child DKIM-signs the message (pyqmail.dkim) before its commit."""
        if self._sock is None:
            if self.user is not None and self.fallback is not None:
                # root mode: only the listener's start, as root, can make the child
                return self.fallback.begin(origin=origin, received=received, sign=sign)
            self._spawn()
        self._next = (self._next + 1) & 0xFFFFFFFF
        ident = self._next
        self._send(frame(SIGNED if sign else BEGIN, ident, received))
        return ProcPending(self, ident, self.pid, self.generation)

    def start(self) -> None:
        """Start the child now (from the event loop) rather than at the first message."""
        if self._sock is None:
            self._spawn()

    # -- the link

    def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.user is not None:
                self._proc = _fork_as(self.user, theirs, self.home, self.envelope_uid)
            else:
                self._proc = self._exec(theirs)
        except OSError as e:
            mine.close()
            raise QueueError(codes.EXEC_FAILED, f"unable to start the committer: {e}") from e
        finally:
            theirs.close()
        mine.setblocking(False)
        self._sock = mine
        self._loop = loop
        self.pid = self._proc.pid
        self.generation += 1
        loop.add_reader(mine.fileno(), self._readable)

    def _exec(self, theirs: socket.socket) -> subprocess.Popen[bytes]:
        """A fresh interpreter: it inherits none of the listener's connections."""
        argv = [sys.executable, "-m", "pyqmail.queue.committer", "--fd", str(theirs.fileno())]
        argv += ["--home", str(self.home.root)]
        if self.notify is None:
            argv.append("--trigger")
        if self.envelope_uid is not None:
            argv += ["--uid", str(self.envelope_uid)]
        return subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return  # the child is gone: the message's commit reports it
        if not self._out:
            try:
                n = sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._lost()
                return
            if n == len(data):
                return
            data = data[n:]
        self._out += data
        if not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(sock.fileno(), self._writable)
        if len(self._out) > HIGH_WATER:
            self.paused = True

    def _writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            n = sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            self._lost()
            return
        del self._out[:n]
        if not self._out and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(sock.fileno())
        if self.paused and len(self._out) <= LOW_WATER:
            self.paused = False
            if self.on_resume is not None:
                self.on_resume()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            # replies are a few dozen bytes: a buffer under malloc's mmap threshold (1 MiB
            # cost an mmap, mremap and munmap per read, and each munmap a TLB shootdown
            # across the listener's threads)
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._in += data
        frames, used = parse_frames(self._in)
        del self._in[:used]
        for kind, ident, payload in frames:
            fut = self._futures.pop(ident, None)
            if kind != RESULT or fut is None or fut.done():
                continue
            try:
                reply = decode_reply(payload)
            except Exception:
                reply = Reply(codes.INTERNAL_BUG, self.pid, 0, "bad reply from the committer")
            if reply.code == 0 and self.notify is not None:
                with contextlib.suppress(Exception):
                    self.notify(reply.msgnum)
            fut.set_result(reply)

    def _detach(self) -> None:
        """Stop watching the link and close our end (the child then sees EOF)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
                if self._writing:
                    self._loop.remove_writer(sock.fileno())
            sock.close()
        self._writing = False

    def _fail_all(self, why: str) -> None:
        """Every message still waiting for its result gets qq crashed (451)."""
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_result(Reply(codes.CRASHED, self.pid, 0, why))

    def _lost(self) -> None:
        """The child died or the link broke: every message in flight fails (451)."""
        self._detach()
        self._out.clear()
        self._in.clear()
        if self.paused:
            self.paused = False
            if self.on_resume is not None:
                self.on_resume()
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(1)
            n = len(self._futures)
            log.warning("the queue committer (pid %d) died: %d message(s) failed", proc.pid, n)
        self._fail_all("committer died")

    async def close(self, timeout: float = 30.0) -> None:
        """Wait (bounded) for the messages in flight, then let the child finish and exit."""
        loop = asyncio.get_running_loop()
        pending = [f for f in self._futures.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        deadline = loop.time() + timeout
        while self._out and self._sock is not None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._detach()  # EOF: the child aborts what never ended, and exits
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                await asyncio.wait_for(loop.run_in_executor(None, proc.wait), timeout)
            except TimeoutError:
                proc.kill()
        self._fail_all("listener closed")


class _Forked:
    """A child made by fork alone: what _lost and close need of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG if deadline is not None else 0)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("committer", timeout or 0)
            else:
                time.sleep(0.01)
        return self.returncode


def _fork_as(
    user: tuple[int, int], sock: socket.socket, home: Home, envelope_uid: int | None
) -> _Forked:
    """Root mode: fork (no exec: the interpreter need not be readable by the queue's
    owner) and drop to ``user``; called when the listener starts, before it has any
    client connection, and while it is still root."""
    keep = sock.fileno()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 111
    try:  # the child: never returns into the listener's code
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 16)
        preload(home)  # dkimpy, before the drop: qmailq may not read the interpreter's files
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])
        serve(sock, QueueWriter(home), trigger=True, uid=envelope_uid)
        code = 0
    except (BrokenPipeError, ConnectionResetError):
        code = 0
    except BaseException:
        with contextlib.suppress(Exception):
            log.exception("committer failed")
    finally:
        os._exit(code)


class ProcPending:
    """One message on its way to the child (the Submission of CommitProcess).

    It commits only from the event loop that owns the link: there is no blocking form."""

    __slots__ = ("_done", "_gen", "_ident", "_proc", "msgnum", "qp")

    def __init__(self, proc: CommitProcess, ident: int, qp: int, gen: int) -> None:
        self._proc = proc
        self._ident = ident
        self._gen = gen
        self.qp = qp
        self.msgnum = 0
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("write after commit or abort")
        if not self._live():
            return  # its child died: the commit says so
        send = self._proc._send
        for i in range(0, len(data), MAX_FRAME):
            send(frame(DATA, self._ident, data[i : i + MAX_FRAME]))

    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> asyncio.Future[Reply]:
        """Send the envelope; the future's Reply comes once the message is durable."""
        if self._done:
            raise RuntimeError("commit after commit or abort")
        self._done = True
        proc = self._proc
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if not self._live():
            fut.set_result(Reply(codes.CRASHED, self.qp, 0, "committer died"))
            return fut
        proc._futures[self._ident] = fut
        proc._send(frame(COMMIT, self._ident, format_input(sender, recipients)))
        return fut

    def abort(self) -> None:
        if not self._done:
            self._done = True
            if self._live():
                self._proc._send(frame(ABORT, self._ident))

    def _live(self) -> bool:
        return self._proc._sock is not None and self._proc.generation == self._gen


if __name__ == "__main__":
    sys.exit(main())
