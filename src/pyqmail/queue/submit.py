"""How every part of pyqmail puts a message in the queue (what qmail.c does for qmail).

``submitter(home)`` picks one of four ways, the same choice for every caller (smtpd,
qmail-inject and sendmail, QMQP/QMTP servers, local forwards, bounces; qmail-queue itself
asks ``qmqp_servers`` the same question):

1. ``QMAILQUEUE`` is set: run that program from the home directory (a relative name is
   a path under the home, as qmail's execv after chdir) with the message on fd 0, the
   envelope on fd 1 and a pipe on fd 6, and map its exit code (a filter in front of the
   queue); exit 82 with text on fd 6 is notqmail's custom reply (``D``/``Z`` + text);
2. ``control/qmqpservers`` lists a server: mini-qmail, a null client with no queue of its
   own; every message goes to the first QMQP server that takes it (queue/qmqpc.py's
   QmqpSubmitter, qmail-queue's exit codes 71-74 on failure). If the file exists but
   cannot be read, every ``begin`` fails with 55 rather than queue locally;
3. this process may write the queue itself (single-user mode, or it runs as the queue's
   owner): the in-process QueueWriter;
4. root in multi-user mode (qmail-inject, sendmail, cron's mail as root): qmail-queue's
   setuid bit, done by hand: at commit a child forks, drops to qmailq:qmail
   (``drop_to_queue_user``, which qmail-queue's own command uses too) and writes the
   spooled message with the in-process writer; its exit code is qmail-queue's. The
   Received line names the real uid, as qmail-queue's does. No service is needed;
5. otherwise: the queue service over its Unix socket (service.py), which learns our uid
   from the socket.

1 and 2 are decided when the submitter is made (a daemon decides at start); 3, 4 or 5
at each ``begin`` by QueueSubmitter, so a process that drops to the queue user after making
its submitter switches to writing in-process.

Each is a :class:`~pyqmail.queue.contract.BlockingSubmitter` (queue/contract.py): its
submissions are written cheaply (buffered, or spooled to an unlinked temporary file),
and their commit returns a :class:`~pyqmail.queue.contract.Reply` (awaited from an event
loop, or ``commit_blocking``). For the program and the service, ``qp`` and ``msgnum``
are known only after the commit (qp = the program's pid, or the service's; msgnum = 0
when a program queued it). The in-process writer's commits from an event loop are
batched by one thread (queue/committhread.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from pyqmail.control import ControlError, parse_list, read_file
from pyqmail.dkim import QueuePending, preload, signing
from pyqmail.home import Home, HomeError, Ids
from pyqmail.queue import codes
from pyqmail.queue.committhread import COMMIT_THREAD
from pyqmail.queue.contract import BlockingSubmission, BlockingSubmitter, Reply
from pyqmail.queue.contract import Submitter as Submitter  # for the callers of submitter()
from pyqmail.queue.envelope import EnvelopeError, check_address, format_input, format_service
from pyqmail.queue.service import ServiceClient, origin_of, socket_path
from pyqmail.queue.writer import Pending, QueueError, QueueWriter


class InProcessSubmitter:
    """Writes the queue directly with a shared QueueWriter."""

    kind = "in-process"

    def __init__(self, home: Home, *, notify: Callable[[int], None] | None = None) -> None:
        self.writer = QueueWriter(home, notify=notify)

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        p = self.writer.begin(origin=origin, received=received)
        return _InProcess(signing(self.writer.home, p) if sign else p)  # DKIM: pyqmail.dkim


class _InProcess(BlockingSubmission):
    """The writer's Pending (or a DKIM SigningPending around it); from an event loop a
    plain Pending commits in the committer thread's next batch."""

    __slots__ = ("_p", "qp")

    def __init__(self, p: Pending | QueuePending) -> None:
        self._p = p
        self.qp = p.qp

    def write(self, data: bytes) -> None:
        self._p.write(data)

    def abort(self) -> None:
        self._p.abort()

    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        return Reply(codes.OK, self.qp, self._p.commit(sender, recipients))

    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> Awaitable[Reply]:
        if not isinstance(self._p, Pending):  # signing: a blocking commit in the pool
            return super().commit(sender, recipients)
        return COMMIT_THREAD.submit(asyncio.get_running_loop(), self._p, sender, recipients)


class _Spooled(BlockingSubmission):
    """Message bytes spooled to an unlinked temporary file until commit."""

    def __init__(self, received: bytes) -> None:
        self.qp = 0
        self._tmp: IO[bytes] | None = tempfile.TemporaryFile(buffering=65536)  # noqa: SIM115
        if received:
            self._tmp.write(received)

    def write(self, data: bytes) -> None:
        if self._tmp is None:
            raise RuntimeError("write after commit or abort")
        self._tmp.write(data)

    def abort(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None

    def _take(self, sender: bytes, recipients: Sequence[bytes]) -> IO[bytes]:
        if self._tmp is None:
            raise RuntimeError("commit after commit or abort")
        tmp = self._tmp
        self._tmp = None
        try:
            check_address(sender)
            for r in recipients:
                check_address(r)
            tmp.flush()
            tmp.seek(0)
        except EnvelopeError as e:
            tmp.close()
            raise QueueError(e.code, str(e)) from e
        except OSError as e:
            tmp.close()
            raise QueueError(codes.WRITE_ERROR, f"unable to spool message: {e}") from e
        return tmp


_CUSTOM_MAX = 255  # qmail.c reads at most 255 bytes of the fd-6 text


def custom_text(raw: bytes) -> str:
    """A replacement qmail-queue's fd-6 text as one safe reply line.

    qmail copies the bytes into the reply as they are; here every byte outside printable
    ASCII becomes a space (8-bit bytes a ``?``) so that a CR or LF cannot start a second
    reply line, and the end is trimmed. The length is kept until the trim so that the
    "more than 2 characters" rule (queue.md 2.1) counts what the program wrote.
    """
    raw = raw[:_CUSTOM_MAX]
    text = "".join(chr(b) if 32 <= b < 127 else ("?" if b >= 128 else " ") for b in raw)
    return text[:1] + text[1:].rstrip() if len(text) > 2 else text


def program_path(home: Home, program: str) -> str:
    """QMAILQUEUE as qmail runs it: execv'd from the home, so a relative name (bin/qmail-queue,
    bin/myqq, even a bare name: no PATH search) is a path under the home."""
    return program if os.path.isabs(program) else str(home.root / program)


def _read_custom(fd: int) -> bytes:
    """Up to 255 bytes from the read end of the fd-6 pipe, to EOF (qmail_errstr)."""
    got = b""
    while len(got) < _CUSTOM_MAX:
        chunk = os.read(fd, _CUSTOM_MAX - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _move_to_fd6(w: int) -> Callable[[], None]:
    def child() -> None:  # runs in the child between fork and exec
        os.dup2(w, 6)

    return child


class _ProgramPending(_Spooled):
    def __init__(self, program: str, cwd: Path, received: bytes) -> None:
        super().__init__(received)
        self._program = program
        self._cwd = cwd

    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        msg = self._take(sender, recipients)
        try:
            with tempfile.TemporaryFile() as env:
                env.write(format_input(sender, recipients))
                env.flush()
                env.seek(0)
                rc, raw = self._run(msg, env)
        finally:
            msg.close()
        if rc < 0:
            return Reply(codes.CRASHED, self.qp, 0, f"{self._program} killed by signal {-rc}")
        # exit 82: the fd-6 text is the reply (notqmail); the exit code alone otherwise
        return Reply(rc, self.qp, 0, custom_text(raw) if rc == codes.CUSTOM_ERROR else "")

    def _run(self, msg: IO[bytes], env: IO[bytes]) -> tuple[int, bytes]:
        """Run the program: message on fd 0, envelope on fd 1, a pipe on fd 6 (notqmail's
        custom error text); its exit code (negative: a signal) and what it wrote on fd 6."""
        r, w = os.pipe()
        try:
            try:
                # fd 6 is kept (pass_fds) because preexec puts the pipe there just before
                # close_fds runs; the parent's own fd 6, if any, is replaced in the child.
                proc = subprocess.Popen(
                    [self._program],
                    stdin=msg,
                    stdout=env,
                    cwd=self._cwd,
                    close_fds=True,
                    pass_fds=(6,),
                    preexec_fn=_move_to_fd6(w),
                )
            except OSError as e:
                raise QueueError(codes.EXEC_FAILED, f"unable to run {self._program}: {e}") from e
            os.close(w)
            w = -1
            self.qp = proc.pid
            try:
                raw = _read_custom(r)
            except OSError:
                raw = b""
            os.close(r)
            r = -1
            return proc.wait(), raw
        finally:
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)


class ProgramSubmitter:
    """QMAILQUEUE: run a qmail-queue-compatible program per message (qmail.c)."""

    kind = "program"

    def __init__(self, home: Home, program: str) -> None:
        self.home = home
        self.program = program

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        return _ProgramPending(program_path(self.home, self.program), self.home.root, received)


class _ServicePending(_Spooled):
    def __init__(self, client: ServiceClient, received: bytes, sign: bool = False) -> None:
        super().__init__(received)
        self._client = client
        self._sign = sign

    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        msg = self._take(sender, recipients)
        try:
            reply = self._client.submit(
                iter(lambda: msg.read(65536), b""),
                format_service(sender, recipients),
                sign=self._sign,
            )
        finally:
            msg.close()
        self.qp = reply.qp
        return reply


class ServiceSubmitter:
    """The queue service's socket: the service writes the queue as its owner."""

    kind = "service"

    def __init__(self, home: Home, path: Path | None = None) -> None:
        self.client = ServiceClient(path or socket_path(home))

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        """``sign``: ask the service to DKIM-sign (its ``sign`` option). The origin, and
        whether the request is honoured, are decided by the service from our uid
        (SO_PEERCRED), as qmail-queue decides from the real uid: a caller cannot claim to
        be the network, and only qmaild (an authenticated SMTP session's message) is signed
        because it asked; a local user's mail is signed anyway (queue/service.py)."""
        return _ServicePending(self.client, received, sign)


def drop_to_queue_user(ids: Ids, role: str = "queue") -> None:
    """What qmail-queue's setuid bit gives it: become qmailq:qmail with no other groups
    (the real uid goes too: this process never needs root again). OSError if refused.

    ``role`` "send" is qmail-send's identity instead (qmails:qmail), for a root command that
    must change the scheduler's files (send/admin.py)."""
    os.setgroups([])
    os.setgid(ids.gid("qmail"))
    os.setuid(ids.uid(role))


class _RootPending(_Spooled):
    """Root's message, written at commit by a child that has become the queue user."""

    def __init__(self, home: Home, ids: Ids, received: bytes, sign: bool = False) -> None:
        super().__init__(received)
        self._home = home
        self._ids = ids
        self._sign = sign  # DKIM-sign in the child, as qmailq: root's key reader

    def _commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        msg = self._take(sender, recipients)
        ruid = os.getuid()
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports by its exit code only
                os._exit(
                    _write_as_queue_user(
                        self._home, self._ids, ruid, msg, sender, recipients, sign=self._sign
                    )
                )
        finally:
            msg.close()
        self.qp = pid
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            why = f"queue writer killed by signal {os.WTERMSIG(status)}"
            return Reply(codes.CRASHED, pid, 0, why)
        return Reply(os.waitstatus_to_exitcode(status), pid)


def _write_as_queue_user(
    home: Home,
    ids: Ids,
    ruid: int,
    msg: IO[bytes],
    sender: bytes,
    recipients: Sequence[bytes],
    *,
    sign: bool = False,
) -> int:
    """The forked child's whole life: drop, write, commit; qmail-queue's exit code."""
    try:
        if sign:
            preload(home)  # before the drop: qmailq may not read the interpreter's files
        try:
            drop_to_queue_user(ids)
        except OSError:
            return codes.HOME_TROUBLE
        os.umask(0o033)
        w = QueueWriter(home).begin(uid=ruid, origin=origin_of(ruid, ids))
        p = signing(home, w) if sign else w
        try:
            while chunk := msg.read(65536):
                p.write(chunk)
        except OSError:
            p.abort()
            return codes.READ_ERROR
        p.commit(sender, recipients)
        return 0
    except QueueError as e:
        return e.code
    except MemoryError:
        return codes.NO_MEMORY
    except BaseException:
        return codes.INTERNAL_BUG


class RootSubmitter:
    """root in multi-user mode: each commit forks a child that writes as qmailq."""

    kind = "root"

    def __init__(self, home: Home, ids: Ids) -> None:
        self.home = home
        self.ids = ids

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        # origin comes from the real uid in the child, as qmail-queue decides it
        return _RootPending(self.home, self.ids, received, sign)


def can_write_queue(home: Home) -> bool:
    """True if this process may write the queue in-process (see the module docstring)."""
    if home.single_user:
        return True
    try:
        st = os.stat(home.queue / "pid")
    except PermissionError:
        return False  # queue/ is 0750 qmailq:qmail: a local user goes through the service
    except OSError:
        return os.geteuid() != 0
    return st.st_uid == os.geteuid()


def qmqp_servers(home: Home) -> tuple[str, ...]:
    """The lines of control/qmqpservers (empty: not a mini-qmail host); ControlError if
    the file exists but cannot be read."""
    raw = read_file(home, "qmqpservers")
    return () if raw is None else tuple(line for line, _ in parse_list(raw))


class _Unconfigured:
    """A null client whose control/qmqpservers cannot be read: refuse (55), never queue
    locally."""

    kind = "qmqp"

    def __init__(self, error: ControlError) -> None:
        self.error = error

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        raise QueueError(codes.CONFIG_ERROR, str(self.error))


def submitter(
    home: Home,
    *,
    notify: Callable[[int], None] | None = None,
    env: Mapping[str, str] | None = None,
    qmqpservers: Sequence[str] | None = None,
) -> BlockingSubmitter:
    """The Submitter this process should use (module docstring); ``env`` for tests.

    ``qmqpservers``: control/qmqpservers as the caller already loaded it (qmail-inject
    has its Control); None reads the file.
    """
    program = (os.environ if env is None else env).get("QMAILQUEUE", "")
    if program:
        return ProgramSubmitter(home, program)
    if qmqpservers is None:
        try:
            qmqpservers = qmqp_servers(home)
        except ControlError as e:
            return _Unconfigured(e)
    if qmqpservers:
        from pyqmail.queue.qmqpc import QmqpSubmitter  # mini-qmail only: imported when used

        return QmqpSubmitter(qmqpservers)
    return QueueSubmitter(home, notify=notify)


class QueueSubmitter:
    """In-process when this process may write the queue, else the queue service.

    Decided at each ``begin`` until the in-process writer is chosen (then for good), so
    a daemon that makes its submitter as root and then drops to qmailq writes the
    queue itself from then on.
    """

    def __init__(self, home: Home, *, notify: Callable[[int], None] | None = None) -> None:
        self.home = home
        self.notify = notify
        self._direct: InProcessSubmitter | None = None
        self._service: ServiceSubmitter | None = None

    @property
    def kind(self) -> str:
        if self._direct or can_write_queue(self.home):
            return "in-process"
        return "root" if self._as_root() else "service"

    def _as_root(self) -> bool:
        return os.geteuid() == 0 and not self.home.single_user

    def begin(
        self, *, origin: str = "uid", received: bytes = b"", sign: bool = False
    ) -> BlockingSubmission:
        """``sign``: DKIM-sign the message (pyqmail.dkim) in the process that writes the
        queue: this one, root's qmailq child, or the queue service (which signs what local
        users inject whatever is asked here: it knows who they are; qmaild's only when
        asked, so qmail-smtpd as qmaild asks for an authenticated session's message)."""
        if self._direct is None and can_write_queue(self.home):
            self._direct = InProcessSubmitter(self.home, notify=self.notify)
        if self._direct is not None:
            return self._direct.begin(origin=origin, received=received, sign=sign)
        if self._as_root():
            try:
                ids = self.home.ids()
            except HomeError as e:
                raise QueueError(codes.HOME_TROUBLE, str(e)) from e
            return RootSubmitter(self.home, ids).begin(origin=origin, received=received, sign=sign)
        if self._service is None:
            self._service = ServiceSubmitter(self.home)
        return self._service.begin(
            origin=origin, received=received, sign=sign and self._service_needs_sign()
        )

    def _service_needs_sign(self) -> bool:
        """Whether the service must be asked to sign: not for a local user, whose mail it
        signs anyway. Not asking keeps a local user's qmail-inject working with a service
        older than the option (an upgraded install whose daemon still runs the old code)."""
        try:
            ids = self.home.ids()
        except HomeError:
            return True  # let the service decide
        return origin_of(os.geteuid(), ids) != "uid"  # SO_PEERCRED gives the euid
