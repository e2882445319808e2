"""The queue service: qmail-queue for callers that cannot write the queue themselves.

Python programs cannot be setuid, so in multi-user mode one process running as the
queue user (qmailq) owns the writing of queue/. Everyone else (the SMTP server as
qmaild, bounces as qmails, any local user's ``qmail-queue``/``sendmail``) connects to
its Unix socket. The service reads the caller's uid and pid from the socket
(SO_PEERCRED) and writes qmail-queue's Received line from them, exactly as qmail-queue
uses the real uid: ``invoked from network`` for qmaild, ``invoked for bounce`` for
qmails, ``invoked by alias`` for alias, else ``invoked by uid N``. The qp is the
caller's pid, as qmail's qp is the pid of the qmail-queue process.

Socket: ``HOME/run/qmail-queue.sock`` (``PYQMAIL_QUEUE_SOCKET`` overrides), mode 0666 in
a 0755 directory owned by the queue user: every local user can reach it (queue/ itself
is 0750), and who they are is known from the kernel, not from what they send.

Wire format (qmail-queue's bytes, framed with netstrings ``LEN:BYTES,``):

    client: optionally, first, the byte ``+`` and ONE netstring of options (words
            separated by spaces, at most 256 bytes: "Options" below); then message
            chunks as netstrings (each at most 1 MiB), then the empty netstring ``0:,``,
            then ONE netstring holding the envelope exactly as qmail-queue reads it on
            fd 1 (``F..\\0T..\\0...\\0``), except that each address is written as an
            RFC 5321 mailbox (``"john doe"@x``, see pyqmail.mailbox); the service
            refuses any other (exit 11) and queues the unquoted form qmail-smtpd would
            have queued. At most envelope.MAX_ENVELOPE bytes (about 10 MB) with at most
            MAX_RECIPIENTS (10,000) recipients; beyond either the answer is 31 at once,
            nothing is queued, and the service closes without reading the rest.
    service: ONE netstring ``CODE QP MSGNUM[ TEXT]`` in ASCII, CODE being qmail-queue's
            exit code (0 = queued), MSGNUM the message's inode number (0 on failure).

A connection closed before the envelope is complete queues nothing (54).

Options: ``sign`` asks for the message to be DKIM-signed (pyqmail.dkim), and is honoured
from qmaild alone: an authenticated SMTP session's message, when qmail-smtpd runs as
qmaild (under tcpserver, or ``pyqmail run``'s listener once its committer child is gone).
Who may have mail signed is still decided by the kernel's uid, never by the request:

- a local user (and root): signed whether asked or not, as before (local injection);
- qmaild: signed only when asked. qmaild is the SMTP server, the one that decides whether
  a session authenticated; the same process already asks ``pyqmail run``'s committer to
  sign (its ``S`` frame, queue/committer.py), so the service trusts it no further than
  that. What a remote client sends never sets the option: qmail-smtpd sets it from its
  own AUTH state. The key stays unreadable to qmaild: the service (qmailq) signs;
- qmails (bounces) and alias: never signed; the option is ignored.

An unknown option is refused (91, temporary): a client asking for something this service
does not do is told so rather than served without it.

Compatibility: a request without ``+`` is exactly the old protocol, so older clients
(and every request that asks nothing) work unchanged. An older service reads ``+`` as a
broken length and answers 54 (temporary, nothing queued): so that a new local user's
qmail-inject keeps working with a daemon not yet restarted after an upgrade, clients send
``sign`` only when their uid is not signed anyway (queue/submit.py's QueueSubmitter).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from pyqmail.dkim import QueuePending, preload, signing
from pyqmail.home import Home, HomeError, Ids, resolve_home
from pyqmail.queue import codes
from pyqmail.queue.contract import Reply as Reply  # the service answers with the contract's Reply
from pyqmail.queue.envelope import (
    MAX_ENVELOPE,
    EnvelopeError,
    EnvelopeParser,
    service_mailbox,
)
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import clean_stale
from pyqmail.queue.writer import QueueError, QueueWriter

MAX_CHUNK = 1 << 20
_PIECE = 65536  # the envelope is read and parsed this much at a time
SOCKET_NAME = "qmail-queue.sock"
_TIMEOUT = 3600.0
OPTIONS = b"+"  # the options netstring's mark, before the first chunk
MAX_OPTIONS = 256
SIGN = "sign"
KNOWN_OPTIONS = frozenset({SIGN})


def socket_path(home: Home) -> Path:
    env = os.environ.get("PYQMAIL_QUEUE_SOCKET")
    return Path(env) if env else home.root / "run" / SOCKET_NAME


class FrameError(Exception):
    """The peer broke the framing or went away."""


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def read_length(f: IO[bytes], limit: int, first: bytes = b"") -> int:
    """Read a netstring's ``digits:`` (at most 10 digits) from a buffered binary stream;
    FrameError on anything else or a length over ``limit``. ``first``: its first byte,
    already read by the caller."""
    digits = b""
    while True:
        c, first = first or f.read(1), b""
        if not c:
            raise FrameError("connection closed")
        if c == b":":
            break
        if not c.isdigit() or len(digits) >= 10:
            raise FrameError("bad netstring length")
        digits += c
    if not digits:
        raise FrameError("bad netstring length")
    n = int(digits)
    if n > limit:
        raise FrameError("netstring too long")
    return n


def read_netstring(f: IO[bytes], limit: int, first: bytes = b"") -> bytes:
    """Read one netstring from a buffered binary stream; FrameError on anything else."""
    n = read_length(f, limit, first)
    data = f.read(n)
    if len(data) != n or f.read(1) != b",":
        raise FrameError("truncated netstring")
    return data


def encode_reply_body(r: Reply) -> bytes:
    """``CODE QP MSGNUM[ TEXT]`` (the queue service's and the committer's result)."""
    s = f"{r.code} {r.qp} {r.msgnum}"
    if r.text:
        s += " " + r.text.replace("\n", " ")
    return s.encode("utf-8", "replace")


def _encode_reply(r: Reply) -> bytes:
    return netstring(encode_reply_body(r))


def decode_reply(data: bytes) -> Reply:
    parts = data.decode("utf-8", "replace").split(" ", 3)
    if len(parts) < 3:
        raise FrameError("bad reply")
    try:
        return Reply(
            int(parts[0]), int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else ""
        )
    except ValueError as e:
        raise FrameError("bad reply") from e


def service_alive(path: Path) -> bool:
    """True if a queue service accepts connections on ``path`` now (a standalone
    ``qmail-queue --serve``, or ``pyqmail run``'s queue process)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class ServiceClient:
    """Submits messages to a queue service (blocking)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def submit(
        self,
        chunks: Iterable[bytes],
        envelope: bytes | Callable[[], bytes],
        *,
        sign: bool = False,
    ) -> Reply:
        """Send message chunks and the fd-1 envelope; the service's Reply.

        ``sign``: send the ``sign`` option (the module docstring says who it serves).

        ``envelope`` may be a callable, called once the chunks are sent (qmail-queue
        reads fd 0 to its end before fd 1); what it raises propagates once the service,
        seeing the input end early, has removed the message's files. Cannot connect: 62 (the
        queue is unreachable). Connection lost: 54.
        """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(_TIMEOUT)
            try:
                s.connect(str(self.path))
            except OSError as e:
                return Reply(
                    codes.QUEUE_TROUBLE, 0, 0, f"cannot reach queue service {self.path}: {e}"
                )
            caller_error: BaseException | None = None
            try:
                if sign:
                    s.sendall(OPTIONS + netstring(SIGN.encode("ascii")))
                it = iter(chunks)
                env = b""
                while True:
                    try:
                        chunk = next(it, None)
                        if chunk is None:
                            env = envelope() if callable(envelope) else envelope
                    except BaseException as e:  # the caller's input failed
                        caller_error = e
                        break
                    if chunk is None:
                        break
                    for i in range(0, len(chunk), MAX_CHUNK):
                        s.sendall(netstring(chunk[i : i + MAX_CHUNK]))
                if caller_error is not None:
                    # Let the service see the input end early and abort before we go:
                    # when the caller gives up, nothing of this message is left.
                    s.shutdown(socket.SHUT_WR)
                    with s.makefile("rb") as f:
                        read_netstring(f, 65536)
                else:
                    s.sendall(b"0:," + netstring(env))
                    with s.makefile("rb") as f:
                        return decode_reply(read_netstring(f, 65536))
            except TimeoutError:
                return Reply(codes.TIMEOUT, 0, 0, "queue service timed out")
            except (OSError, FrameError) as e:
                if caller_error is None:
                    # The service may have answered and closed before reading all we
                    # sent (a refusal): its answer, if there is one, says why.
                    try:
                        with s.makefile("rb") as f:
                            return decode_reply(read_netstring(f, 65536))
                    except (OSError, FrameError):
                        pass
                    return Reply(codes.READ_ERROR, 0, 0, f"queue service connection failed: {e}")
            raise caller_error
        finally:
            s.close()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def origin_of(uid: int, ids: Ids | None) -> str:
    """qmail-queue's choice of Received wording from the caller's real uid."""
    if ids is None or ids.single_user:
        return "uid"
    if uid == ids.uid("alias"):
        return "alias"
    if uid == ids.uid("daemon"):
        return "network"
    if uid == ids.uid("send"):
        return "bounce"
    return "uid"


def signs(origin: str, asked: bool) -> bool:
    """Whether the service DKIM-signs a message from a caller of ``origin`` (origin_of,
    the kernel's uid) that ``asked`` for it or not: a local user's mail is local injection,
    always signed; qmaild's (network) only when asked, for an authenticated session; a
    bounce's or alias's never (module docstring)."""
    return origin == "uid" or (origin == "network" and asked)


class QueueService:
    """Accepts connections on the socket and writes each message with a QueueWriter.

    One thread per connection, so commits overlap their fsyncs. The socket is open to
    every local user, so no one user may tie it up: an ordinary uid gets at most
    ``per_uid`` connections at once, and ``max_clients`` bounds them all; a connection
    over either limit is answered at once with 71 (temporarily refused) instead of
    waiting. root, the service's own uid and qmail's accounts are not limited per uid.
    No queue file is made before the client's first bytes arrive.
    """

    def __init__(
        self,
        home: Home,
        *,
        path: Path | None = None,
        writer: QueueWriter | None = None,
        notify: Callable[[int], None] | None = None,
        ids: Ids | None = None,
        max_clients: int = 512,
        per_uid: int = 16,
    ) -> None:
        self.home = home
        self.path = path or socket_path(home)
        self.writer = writer or QueueWriter(home, notify=notify)
        self.ids = ids
        preload(home)  # DKIM: import dkimpy before main() drops to qmailq
        self.max_clients = max_clients
        self.per_uid = per_uid
        self._trusted = {0, os.geteuid()}
        if ids is not None and not ids.single_user:
            self._trusted |= set(ids.uids.values())
        self._active: dict[int, int] = {}
        self._total = 0
        self._count_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._ino: int | None = None  # the socket file we bound, if any
        self._thread: threading.Thread | None = None
        self._closing = False

    def prepare_dir(self, owner: tuple[int, int]) -> None:
        """As root: make the socket's directory (0755, owned by ``owner``) if need be.

        Root never acts on a name a lesser account controls: the directory is made and
        opened relative to a descriptor of its parent, which must be root's and writable
        by no one else, without following a symlink, and changed through that descriptor.
        The socket itself is made by :meth:`bind` after the drop to ``owner``.
        """
        d = self.path.parent
        parent = os.open(d.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.fstat(parent)
            if st.st_uid != 0 or st.st_mode & 0o022:
                raise OSError(f"{d.parent} is not root's alone: not making {d.name} in it")
            try:
                os.mkdir(d.name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            fd = os.open(d.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            os.fchown(fd, *owner)
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)

    def bind(self) -> None:
        """Create the socket (mode 0666), as the user that will serve it (never root in
        multi-user mode: the directory belongs to the queue user)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))
        self._ino = os.stat(self.path).st_ino
        os.chmod(self.path, 0o666)
        s.listen(128)
        self._sock = s

    def start(self) -> None:
        """Serve in a background thread (bind first)."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="queue-service", daemon=True
        )
        self._thread.start()

    def serve_forever(self) -> None:
        assert self._sock is not None, "bind() first"
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing:
                    return
                raise
            try:
                pid, uid, _ = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if not self._admit(uid):
                refusal = Reply(codes.TEMP_REFUSED, pid, 0, f"too many connections from uid {uid}")
                try:
                    conn.sendall(_encode_reply(refusal))
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn, pid, uid), daemon=True).start()

    def _admit(self, uid: int) -> bool:
        with self._count_lock:
            n = self._active.get(uid, 0)
            if self._total >= self.max_clients or (uid not in self._trusted and n >= self.per_uid):
                return False
            self._active[uid] = n + 1
            self._total += 1
            return True

    def _release(self, uid: int) -> None:
        with self._count_lock:
            self._total -= 1
            n = self._active[uid] - 1
            if n:
                self._active[uid] = n
            else:
                del self._active[uid]

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        # only our own socket: another service may have taken the name over since (a
        # standalone qmail-queue --serve beside pyqmail run), and it stays reachable
        try:
            if self._ino is not None and os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    def _handle(self, conn: socket.socket, pid: int, uid: int) -> None:
        try:
            with conn:
                conn.settimeout(_TIMEOUT)
                with conn.makefile("rb") as f:
                    reply = self._serve_one(f, pid, uid)
                try:
                    conn.sendall(_encode_reply(reply))
                except OSError:
                    pass
        finally:
            self._release(uid)

    def _serve_one(self, f: IO[bytes], pid: int, uid: int) -> Reply:
        options: frozenset[str] = frozenset()
        try:
            first = f.read(1)  # nothing is created for a silent client
            if first == OPTIONS:
                words = read_netstring(f, MAX_OPTIONS).decode("ascii", "replace")
                options = frozenset(words.split())
                first = b""
            elif not first:
                raise FrameError("connection closed")
            chunk = read_netstring(f, MAX_CHUNK, first)
        except TimeoutError:
            return Reply(codes.TIMEOUT, pid, 0, "timeout")
        except (FrameError, OSError) as e:
            return Reply(codes.READ_ERROR, pid, 0, f"read error: {e}")
        if unknown := options - KNOWN_OPTIONS:
            return Reply(codes.FORMAT_ERROR, pid, 0, f"unknown option {sorted(unknown)[0]}")
        origin = origin_of(uid, self.ids)
        try:
            p: QueuePending = self.writer.begin(uid=uid, origin=origin, qp=pid)
        except QueueError as e:
            return Reply(e.code, pid, 0, str(e))
        if signs(origin, SIGN in options):
            p = signing(self.home, p)
        try:
            while chunk:
                p.write(chunk)
                chunk = read_netstring(f, MAX_CHUNK)
            env = _EnvelopeReader(f)
            n = p.commit(env.sender(), env.recipients())
            return Reply(0, pid, n)
        except EnvelopeError as e:
            p.abort()
            return Reply(e.code, pid, 0, str(e))
        except QueueError as e:
            return Reply(e.code, pid, 0, str(e))
        except TimeoutError:
            p.abort()
            return Reply(codes.TIMEOUT, pid, 0, "timeout")
        except (FrameError, OSError) as e:
            p.abort()
            return Reply(codes.READ_ERROR, pid, 0, f"read error: {e}")
        except MemoryError:
            p.abort()
            return Reply(codes.NO_MEMORY, pid, 0, "out of memory")
        except Exception as e:  # a bug: temporary for the caller, never a lost message
            p.abort()
            return Reply(codes.INTERNAL_BUG, pid, 0, f"internal error: {type(e).__name__}")
        except BaseException:
            p.abort()
            raise


class _EnvelopeReader:
    """The envelope netstring, parsed as it is read and handed on as it is parsed.

    A length over MAX_ENVELOPE (about 10 MB, queue/envelope.py) is refused (31) before any
    of it is read, and so are more than MAX_RECIPIENTS recipients as the next one comes.
    ``recipients()`` is what the writer streams into intd/N (as qmail-queue writes intd
    while reading fd 1): only one piece of the envelope is in memory at a time. Bytes
    after the final NUL are read to the comma and dropped, as qmail-queue never reads
    them."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._left = read_length(f, 9_999_999_999)
        if self._left > MAX_ENVELOPE:
            raise EnvelopeError(codes.PERM_REFUSED, f"envelope over {MAX_ENVELOPE} bytes")
        self._parser = EnvelopeParser()

    def _more(self) -> bool:
        """Read and parse one more piece; False at the end of the netstring."""
        if not self._left:
            return False
        piece = self._f.read(min(self._left, _PIECE))
        if not piece:
            raise FrameError("truncated netstring")
        self._left -= len(piece)
        if not self._parser.done:
            self._parser.feed(piece)
        if not self._left and self._f.read(1) != b",":
            raise FrameError("truncated netstring")
        return True

    def sender(self) -> bytes:
        """The sender in queue form; EnvelopeError (11) if it is not a mailbox."""
        while self._parser.sender is None:
            if not self._more():
                return self._parser.finish()[0]  # raises 54
        return service_mailbox(self._parser.sender, sender=True)

    def recipients(self) -> Iterator[bytes]:
        """Each recipient in queue form as it is read; EnvelopeError (11) at a bad one."""
        while True:
            for r in self._parser.take():
                yield service_mailbox(r, sender=False)
            if not self._more():
                self._parser.finish()  # 54 if the final NUL never came
                return


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyqmail.queue.service [--home H] [--single-user] [--socket P]``.

    As root in multi-user mode: makes the socket's directory, drops to qmailq:qmail, binds
    the socket, cleans stale leftovers, then serves until killed.
    """
    ap = argparse.ArgumentParser(prog="pyqmail-queue-service")
    ap.add_argument("--home")
    ap.add_argument("--single-user", action="store_true")
    ap.add_argument("--socket")
    a = ap.parse_args(argv)
    home = resolve_home(a.home, a.single_user)
    try:
        ids = home.ids()
    except HomeError as e:
        print(f"pyqmail-queue-service: fatal: {e}", file=sys.stderr)
        return 111
    svc = QueueService(home, path=Path(a.socket) if a.socket else None, ids=ids)
    drop = os.geteuid() == 0 and not ids.single_user
    if drop:
        svc.prepare_dir((ids.uid("queue"), ids.gid("qmail")))
        os.setgroups([])
        os.setgid(ids.gid("qmail"))
        os.setuid(ids.uid("queue"))
    svc.bind()
    os.umask(0o033)
    clean_stale(QueuePaths(home.queue))
    print(f"pyqmail-queue-service: listening on {svc.path}", file=sys.stderr, flush=True)

    def _stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        svc.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
