"""The queue manager: list, show, hold, release, delete and retry queued messages.

One library for ``pyqmail queue`` in both situations:

- ``pyqmail run`` is running: it holds ``lock/sendmutex``, so nothing else may touch
  info/local/remote. The scheduler serves a Unix socket (``HOME/run/control.sock``,
  :class:`ControlServer`), applies each change itself so that its in-memory jobs agree, and
  answers with what it did. Only root, the scheduler's own uid and members of the qmail
  group may use it (SO_PEERCRED; the socket file is 0660 root/qmail too); every change is
  logged in the scheduler's log with the caller's uid and pid.
- it is stopped: :class:`DirectQueue` takes ``lock/sendmutex`` exactly as qmail-send does (an
  exclusive flock), so a scheduler cannot start meanwhile, and changes the files itself;
  each change is written to stderr with the invoking uid. Run by root on a multi-user home it
  changes them as their owners would, in children that become qmails or qmailq.

A message's ID is qmail's message number (qmail-qread's ``#N``).

Holding (``queue/hold/N``). A held message stays a valid qmail message: its info, local and
remote files are untouched, and pyqmail alone knows it is held, from a marker file in a
directory qmail never reads. Real qmail-send, given the queue back, simply delivers it.
(The alternative, a far-future mtime on the channel files, is what real qmail-send reads as
the next try at start-up, so it would keep the message for years, and a SIGALRM would send
it at once: neither is "held" nor "delivered".) The marker holds the message's birth (the
mtime of info/S/N, in nanoseconds), so a marker left behind when real qmail delivered the
message never holds a later message that happens to get the same inode number.
While held, a channel file's mtime is still its next try (what pyqmail's start-up scan
reads); ``release`` puts it back in the schedule at that time, ``retry`` makes it now.

Tries and the last error are not on disk in qmail (only in the log); the running
scheduler keeps them in memory (``Attempt``) from its start; a stopped queue says unknown.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyqmail.home import Home, HomeError, Ids
from pyqmail.queue import clean, records
from pyqmail.queue.contract import BlockingSubmitter
from pyqmail.queue.layout import QueuePaths, msgnum
from pyqmail.queue.service import peer_credentials
from pyqmail.send.log import SendLog
from pyqmail.send.schedule import CHANNEL_NAMES, CHANNELS
from pyqmail.send.todo import decode

SOCKET_NAME = "control.sock"
HOLD_DIR = "hold"
_HEADER_LIMIT = 65536
_REQUEST_TIMEOUT = 30.0  # seconds for a request line (at most 64 KiB: the reader's limit)
ACTIONS = ("hold", "release", "delete", "retry")
STATES = ("queued", "deferred", "held", "done")


class AdminError(Exception):
    """A queue operation cannot be done; the text says why."""


def control_path(home: Home) -> Path:
    return home.root / "run" / SOCKET_NAME


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the running scheduler remembers of one recipient's deliveries."""

    tries: int
    last_error: str
    last_try: float


@dataclass
class RecipientState:
    address: str
    channel: str  # "local" | "remote"
    state: str  # one of STATES
    tries: int | None = None  # None: unknown (pyqmail run is not running)
    last_error: str | None = None
    next_retry: float | None = None


@dataclass
class MessageState:
    id: int
    birth: float
    size: int
    sender: str
    held: bool
    bouncing: bool
    recipients: list[RecipientState] = field(default_factory=list)
    headers: str | None = None  # only for ``show``

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.headers is None:
            del d["headers"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MessageState:
        recips = [RecipientState(**r) for r in d.get("recipients", [])]
        return cls(
            int(d["id"]),
            float(d["birth"]),
            int(d["size"]),
            str(d["sender"]),
            bool(d["held"]),
            bool(d["bouncing"]),
            recips,
            d.get("headers"),
        )


@dataclass(frozen=True)
class Filter:
    """Which messages a ``list`` or a bulk action means; every given field must match."""

    sender: str | None = None
    rcpt: str | None = None
    domain: str | None = None
    older_than: float | None = None  # seconds
    state: str | None = None

    def matches(self, m: MessageState, now: float) -> bool:
        if self.sender is not None and m.sender.lower() != self.sender.lower():
            return False
        pending = [r for r in m.recipients if r.state != "done"] or m.recipients
        if self.rcpt is not None and not any(
            r.address.lower() == self.rcpt.lower() for r in m.recipients
        ):
            return False
        if self.domain is not None:
            dom = self.domain.lower().lstrip("@")
            if not any(r.address.rpartition("@")[2].lower() == dom for r in pending):
                return False
        if self.older_than is not None and now - m.birth < self.older_than:
            return False
        return self.state is None or any(r.state == self.state for r in m.recipients)

    def empty(self) -> bool:
        return all(v is None for v in asdict(self).values())


# ---------------------------------------------------------------- the hold marker


def _hold_path(paths: QueuePaths, num: int) -> Path:
    return paths.root / HOLD_DIR / str(num)


def _birth_ns(paths: QueuePaths, num: int) -> int:
    return os.stat(paths.name("info", num)).st_mtime_ns


def is_held(paths: QueuePaths, num: int) -> bool:
    """True if message ``num`` has a hold marker that was made for this message."""
    try:
        mark = _hold_path(paths, num).read_bytes()
        return mark.strip() == str(_birth_ns(paths, num)).encode()
    except (OSError, ValueError):
        return False


def write_hold(paths: QueuePaths, num: int) -> None:
    """Create ``queue/hold/N`` (durably), owned like queue/info: as that owner (qmails in
    multi-user mode, never root: DirectQueue and the scheduler both act as it there)."""
    d = paths.root / HOLD_DIR
    owner = os.stat(paths.dir("info"))  # qmails in root mode: the scheduler reads it
    if not d.is_dir():  # a single-user home made before init made queue/hold
        try:
            d.mkdir(mode=0o700, exist_ok=True)
        except PermissionError as e:
            raise AdminError(f"{d} is missing: re-run pyqmail init") from e
    from pyqmail.durable import replace_file

    mark = _hold_path(paths, num)
    replace_file(mark, [b"%d\n" % _birth_ns(paths, num)], mode=0o600)
    with contextlib.suppress(PermissionError):
        os.chown(mark, owner.st_uid, owner.st_gid)


def remove_hold(paths: QueuePaths, num: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_hold_path(paths, num))


def held_numbers(paths: QueuePaths) -> set[int]:
    """The messages with a valid hold marker; stale markers are removed."""
    out: set[int] = set()
    try:
        names = os.listdir(paths.root / HOLD_DIR)
    except FileNotFoundError:
        return out
    for name in names:
        n = msgnum(name)
        if n is None:
            continue
        if is_held(paths, n):
            out.add(n)
        else:
            remove_hold(paths, n)  # its message is gone: never hold a later one
    return out


# ---------------------------------------------------------------- reading the queue


def channel_paths(paths: QueuePaths, num: int) -> Iterator[tuple[int, str]]:
    for c in CHANNELS:
        yield c, paths.name(CHANNEL_NAMES[c], num)


def read_message(
    paths: QueuePaths,
    num: int,
    *,
    held: bool,
    history: dict[str, Attempt] | None,
    next_try: dict[int, float] | None = None,
) -> MessageState:
    """One preprocessed message's state; OSError if its info or mess file is gone.

    ``history`` None means the tries are unknown (no scheduler); ``next_try`` maps a
    channel to the scheduler's next try, else the channel file's mtime is used.
    """
    info = paths.name("info", num)
    birth = os.stat(info).st_mtime
    sender = decode(records.read_info(info))
    size = os.stat(paths.name("mess", num)).st_size
    m = MessageState(num, birth, size, sender, held, os.path.exists(paths.name("bounce", num)))
    for c, path in channel_paths(paths, num):
        try:
            recs = records.read_channel(path)
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            continue
        when = next_try.get(c, mtime) if next_try is not None else mtime
        for r in recs:
            addr = decode(r.address)
            att = history.get(addr) if history is not None else None
            if r.done:
                state = "done"
            elif held:
                state = "held"
            elif att is not None:
                state = "deferred"
            else:
                state = "queued"
            m.recipients.append(
                RecipientState(
                    addr,
                    CHANNEL_NAMES[c],
                    state,
                    None if history is None else (att.tries if att else 0),
                    att.last_error if att else None,
                    None if r.done else when,
                )
            )
    return m


def read_headers(paths: QueuePaths, num: int, limit: int = _HEADER_LIMIT) -> str:
    """The message's header (up to the first empty line, at most ``limit`` bytes)."""
    with open(paths.name("mess", num), "rb") as f:
        data = f.read(limit)
    end = data.find(b"\n\n")
    return decode(data if end < 0 else data[: end + 1])


def queued_numbers(paths: QueuePaths) -> list[int]:
    """Every preprocessed message (one with info/S/N), in number order."""
    nums: list[int] = []
    for d in paths.split_dirs("info"):
        with contextlib.suppress(FileNotFoundError):
            nums.extend(n for n in map(msgnum, os.listdir(d)) if n is not None)
    return sorted(nums)


# ---------------------------------------------------------------- access control


def caller_allowed(uid: int, gid: int, qmail_gid: int | None) -> bool:
    """root, this process's own uid, and members of the qmail group (``qmail_gid``)."""
    if uid in (0, os.geteuid()):
        return True
    if qmail_gid is None:
        return False
    if gid == qmail_gid:
        return True
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return False
    return qmail_gid in os.getgrouplist(pw.pw_name, pw.pw_gid)


def qmail_group(home: Home) -> int | None:
    """The qmail group's gid in multi-user mode; None in single-user mode."""
    if home.single_user:
        return None
    try:
        return grp.getgrnam("qmail").gr_gid
    except KeyError:
        return None


# ---------------------------------------------------------------- the running scheduler


class SchedulerLike(Protocol):
    """What the control socket needs of send/manager.py's Scheduler."""

    paths: QueuePaths

    def admin_states(self, nums: Sequence[int] | None) -> list[MessageState]: ...
    async def admin_action(self, op: str, num: int, reason: str | None) -> str: ...
    def admin_log(self, text: str) -> None: ...


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _open_dir_beneath(base: Path, parts: Sequence[str]) -> int:
    """A descriptor of ``base``/``parts``, each part reached from the one before without
    following a symlink: the way root goes into a directory a qmail account owns."""
    fd = os.open(base, _DIR)
    try:
        for part in parts:
            sub = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def bind_control(path: Path, gid: int | None) -> socket.socket:
    """Bind the control socket: mode 0600, or 0660 with group ``gid``. Before any privilege
    drop, so the scheduler's process can serve it whoever it runs as.

    As root, ``path``'s directory (HOME/run) is qmailq's, so nothing there is done by name:
    the directory is opened once without following a symlink, the old socket is unlinked
    through that descriptor, and the socket is bound through ``/proc/self/fd/N`` with its
    final mode (the umask) and group (the effective gid while it is bound) already set, so
    there is no chown or chmod afterwards that a swapped-in symlink could redirect; bind
    itself never follows a symlink (an existing name is EADDRINUSE)."""
    parent = _open_dir_beneath(path.parent.parent, ())
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path.parent.name, 0o755, dir_fd=parent)
        fd = os.open(path.parent.name, _DIR | os.O_NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=fd)
        old_mask = os.umask(0o177 if gid is None else 0o117)
        old_gid = os.getegid()
        try:
            if gid is not None and os.geteuid() == 0:
                os.setegid(gid)
            try:
                s.bind(f"/proc/self/fd/{fd}/{path.name}")
            finally:
                if os.getegid() != old_gid:
                    os.setegid(old_gid)
        finally:
            os.umask(old_mask)
        if gid is not None and os.geteuid() != 0 and os.getegid() != gid:
            # not root: the directory is this user's own; the name, never followed
            os.chown(path.name, -1, gid, dir_fd=fd, follow_symlinks=False)
        s.listen(16)
    except BaseException:
        s.close()
        raise
    finally:
        os.close(fd)
    return s


def prepare_as_root(home: Home, ids: Ids) -> socket.socket | None:
    """Root mode, before the scheduler's process drops to qmails: make sure ``queue/hold``
    (the scheduler's, 0700) exists and bind the control socket (0660, group qmail). None
    (and the queue manager then works only while pyqmail run is stopped) if the socket
    cannot be bound.

    queue/ is qmailq's, so queue/hold is made by init's maker (layout.py: reached through
    descriptors without following a symlink, owner and mode set through a descriptor of
    what it made), never chowned by name; a home made before hold/ was part of init gets
    it here, and anything else already at that name is left alone with a warning."""
    from pyqmail.layout import create_queue

    try:
        create_queue(home, ids)
        fd = _open_dir_beneath(home.root, ("queue", HOLD_DIR))
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if st.st_uid != ids.uid("send"):
            raise OSError(f"owned by uid {st.st_uid}, not the scheduler's")
    except OSError as e:
        print(
            f"pyqmail run: warning: {home.queue / HOLD_DIR} is not the scheduler's directory "
            f"({e}): holding will fail; remove it and re-run pyqmail init",
            file=sys.stderr,
        )
    try:
        return bind_control(control_path(home), ids.gid("qmail"))
    except OSError as e:
        print(f"pyqmail run: warning: no control socket: {e}", file=sys.stderr)
        return None


class ControlServer:
    """Serves the control socket inside the scheduler's event loop.

    The protocol is one JSON object per line each way: a request ``{"op": "list"|"show"|
    "hold"|"release"|"delete"|"retry", "ids": [N, ...], "reason": TEXT|null}`` and a reply
    ``{"ok": true, "messages": [...]}`` (list, show) or ``{"ok": true, "results": [{"id": N,
    "text": WHAT}]}`` (actions), or ``{"ok": false, "error": TEXT}``.
    """

    def __init__(self, sched: SchedulerLike, sock: socket.socket, qmail_gid: int | None) -> None:
        self.sched = sched
        self.sock = sock
        self.qmail_gid = qmail_gid
        self._server: Any = None

    async def start(self) -> None:
        import asyncio

        self.sock.setblocking(False)
        self._server = await asyncio.start_unix_server(self._handle, sock=self.sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: Any, writer: Any) -> None:
        import asyncio

        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            # the request is read first even from a caller who is refused, so that the
            # refusal reaches it rather than a reset
            line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT)
            if not caller_allowed(uid, gid, self.qmail_gid):
                self.sched.admin_log(f"refused the control socket to uid {uid} pid {pid}")
                reply: dict[str, Any] = {"ok": False, "error": "permission denied"}
            else:
                reply = await self._answer(json.loads(line), uid, pid)
        except TimeoutError:
            writer.close()
            return
        except (AdminError, ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": str(e) or type(e).__name__}
        except OSError:
            return
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _answer(self, req: dict[str, Any], uid: int, pid: int) -> dict[str, Any]:
        op = req["op"]
        ids = req.get("ids")
        nums = None if ids is None else [int(i) for i in ids]
        if op in ("list", "show"):
            states = self.sched.admin_states(nums)
            if op == "show":
                for m in states:
                    with contextlib.suppress(OSError):
                        m.headers = read_headers(self.sched.paths, m.id)
            return {"ok": True, "messages": [m.to_json() for m in states]}
        if op not in ACTIONS or nums is None:
            raise AdminError(f"unknown request {op!r}")
        reason = req.get("reason")
        results = []
        for n in nums:
            try:
                text = await self.sched.admin_action(op, n, reason)
                self.sched.admin_log(f"uid {uid} pid {pid}: {op} {n}: {text}")
                results.append({"id": n, "ok": True, "text": text})
            except AdminError as e:
                results.append({"id": n, "ok": False, "text": str(e)})
        return {"ok": True, "results": results}


# ---------------------------------------------------------------- the two ways in


@dataclass(frozen=True)
class Result:
    id: int
    ok: bool
    text: str


class Backend(Protocol):
    how: str

    def states(self, nums: Sequence[int] | None) -> list[MessageState]: ...
    def show(self, num: int) -> MessageState: ...
    def act(self, op: str, nums: Sequence[int], reason: str | None) -> list[Result]: ...
    def close(self) -> None: ...


class SocketQueue:
    """The running scheduler, over its control socket."""

    how = "pyqmail run"

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(str(self.path))
            s.sendall(json.dumps(req).encode() + b"\n")
            f = s.makefile("rb")
            line = f.readline()
        if not line:
            raise AdminError("pyqmail run closed the control socket without answering")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise AdminError(str(reply.get("error", "refused")))
        return reply

    def states(self, nums: Sequence[int] | None) -> list[MessageState]:
        req: dict[str, Any] = {"op": "list", "ids": None if nums is None else list(nums)}
        return [MessageState.from_json(d) for d in self._call(req)["messages"]]

    def show(self, num: int) -> MessageState:
        msgs = self._call({"op": "show", "ids": [num]})["messages"]
        if not msgs:
            raise AdminError(f"no message {num} in the queue")
        return MessageState.from_json(msgs[0])

    def act(self, op: str, nums: Sequence[int], reason: str | None) -> list[Result]:
        reply = self._call({"op": op, "ids": list(nums), "reason": reason})
        return [Result(int(r["id"]), bool(r["ok"]), str(r["text"])) for r in reply["results"]]

    def close(self) -> None:
        pass


def _as_account(
    ids: Ids,
    role: str,
    job: Callable[[], Any],
    relay: tuple[socket.socket, socket.socket, Home] | None = None,
) -> Any:
    """Run ``job`` in a child that has become ``role`` (qmails or qmailq, group qmail, no
    other groups) first, as qmail-send and qmail-clean act on their own files; its result
    (JSON) comes back over a pipe. An AdminError or OSError in the child is raised here
    as an AdminError with its text. ``relay``: (this end, the child's end) of a socket pair
    and the home, served meanwhile for the child's bounce (send/relay.py); ``job`` closes
    the child's end when it is done."""
    from pyqmail.queue.submit import drop_to_queue_user
    from pyqmail.send import relay as relaying

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its work is tested through the parent
        code = 0
        try:
            os.close(rfd)
            if relay is not None:
                relay[0].close()
            drop_to_queue_user(ids, role)
            if os.getuid() == 0 or os.geteuid() == 0:
                raise OSError("still root after dropping privileges")
            os.umask(0o077)
            try:
                out: dict[str, Any] = {"ok": job()}
            except (AdminError, OSError) as e:
                out = {"error": str(e) or type(e).__name__}
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(wfd, data) :]
        except BaseException:
            code = 111
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()  # its warnings (stdout: the parent's, never flushed here)
            os._exit(code)
    os.close(wfd)
    if relay is not None:
        relay[1].close()
        relaying.serve(relay[0], relay[2])
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise AdminError(f"could not act as the {role} user (uid {ids.uid(role)})")
    got: dict[str, Any] = json.loads(data)
    if "error" in got:
        raise AdminError(str(got["error"]))
    return got["ok"]


class DirectQueue:
    """The queue itself while no scheduler runs, under qmail-send's lock (lock/sendmutex).

    Run by root on a multi-user home, it never acts on a name inside the queue (whose
    directories qmailq and qmails own): lock/sendmutex is reached through descriptors
    without following a symlink (and not created: init makes it, qmails's), and every
    other file is read and changed in a child that has become the file's owner, qmails
    for info/local/remote/bounce/hold and qmailq for intd/mess, in qmail-clean's order
    (queue/clean.py). A symlink planted by either account then leads only to what that
    account may do itself. Anyone else (single-user mode, an ordinary user) acts itself.
    """

    how = "direct"

    def __init__(self, home: Home, *, who: int | None = None) -> None:
        self.home = home
        self.paths = QueuePaths(home.queue)
        self.who = os.getuid() if who is None else who
        self._fd: int | None = None
        self._ids: Ids | None = None
        if os.geteuid() == 0 and not home.single_user:
            try:
                self._ids = home.ids()
            except HomeError as e:
                raise AdminError(str(e)) from e

    def _as(self, role: str, job: Callable[[], Any]) -> Any:
        return job() if self._ids is None else _as_account(self._ids, role, job)

    def lock(self) -> bool:
        """Take lock/sendmutex as qmail-send does; False if a scheduler holds it."""
        if self._ids is None:
            fd = os.open(self.paths.sendmutex, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            fd = self._open_sendmutex()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _open_sendmutex(self) -> int:
        """Root: lock/sendmutex through descriptors, no symlink followed, nothing created,
        and only a regular file (a flock needs no more than a read-only descriptor)."""
        where = self.paths.sendmutex
        try:
            lock = _open_dir_beneath(self.home.root, ("queue", "lock"))
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open("sendmutex", flags, dir_fd=lock)
            finally:
                os.close(lock)
        except FileNotFoundError as e:
            raise AdminError(f"{where} is missing: re-run pyqmail init") from e
        except OSError as e:
            raise AdminError(
                f"cannot open {where} safely ({e.strerror}): re-run pyqmail init"
            ) from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise AdminError(f"{where} is not a regular file: re-run pyqmail init")
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _state(self, num: int) -> MessageState:
        return read_message(self.paths, num, held=is_held(self.paths, num), history=None)

    def _states(self, nums: Sequence[int] | None) -> list[dict[str, Any]]:
        out = []
        for n in queued_numbers(self.paths) if nums is None else nums:
            with contextlib.suppress(OSError):
                out.append(self._state(n).to_json())
        return out

    def states(self, nums: Sequence[int] | None) -> list[MessageState]:
        got = self._as("send", lambda: self._states(nums))
        return [MessageState.from_json(d) for d in got]

    def _show(self, num: int) -> dict[str, Any]:
        try:
            m = self._state(num)
            m.headers = read_headers(self.paths, num)
        except OSError as e:
            raise AdminError(f"no message {num} in the queue") from e
        return m.to_json()

    def show(self, num: int) -> MessageState:
        return MessageState.from_json(self._as("send", lambda: self._show(num)))

    def act(self, op: str, nums: Sequence[int], reason: str | None) -> list[Result]:
        out = []
        for n in nums:
            try:
                text = self._act(op, n, reason)
                print(f"pyqmail queue: uid {self.who}: {op} {n}: {text}", file=sys.stderr)
                out.append(Result(n, True, text))
            except (AdminError, OSError) as e:
                out.append(Result(n, False, str(e)))
        return out

    def _act(self, op: str, num: int, reason: str | None) -> str:
        if op == "delete":
            # qmail-send's part (the bounce, channel files, info) as qmails, then
            # qmail-clean's (intd, mess) as qmailq, in finish_message's order
            text = self._delete_send_part(num, reason)
            self._as("queue", lambda: clean.clean_mess(self.paths, num))
            return text
        result: str = self._as("send", lambda: self._change(op, num))
        return result

    def _delete_send_part(self, num: int, reason: str | None) -> str:
        if self._ids is None:
            return remove_send_files(self.paths, num, reason, self.home)
        from pyqmail.send.relay import RelaySubmitter

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def job() -> str:
            relay = RelaySubmitter(theirs)  # the bounce is queued as root queues it
            try:
                return remove_send_files(self.paths, num, reason, self.home, relay)
            finally:
                relay.close()  # the parent's relay ends here, before the result is written

        try:
            text: str = _as_account(self._ids, "send", job, (ours, theirs, self.home))
        finally:
            theirs.close()
            ours.close()
        return text

    def _change(self, op: str, num: int) -> str:
        p = self.paths
        if not os.path.exists(p.name("info", num)):
            raise AdminError(f"no message {num} in the queue")
        if op == "hold":
            write_hold(p, num)
            return "held"
        if op == "release":
            remove_hold(p, num)
            return "released"
        if op == "retry":
            if is_held(p, num):
                raise AdminError("held; release it first")
            now = time.time()
            for _, path in channel_paths(p, num):
                with contextlib.suppress(FileNotFoundError):
                    records.set_next_try(path, now)
            return "due now (when pyqmail run starts)"
        raise AdminError(f"unknown action {op!r}")


def remove_send_files(
    paths: QueuePaths,
    num: int,
    reason: str | None,
    home: Home,
    submit: BlockingSubmitter | None = None,
) -> str:
    """qmail-send's part of deleting message ``num`` (no scheduler running), after queueing
    a bounce to its sender (through ``submit``, else this process's submitter) for the
    recipients not yet done when ``reason`` is given: the channel files, bounce/N, the hold
    marker and info/S/N go; intd and mess remain, for qmail-clean's part (clean_mess)."""
    from pyqmail.control import load
    from pyqmail.queue.submit import submitter
    from pyqmail.send import bounce
    from pyqmail.send.todo import Routing

    if not os.path.exists(paths.name("info", num)):
        raise AdminError(f"no message {num} in the queue")
    log = SendLog()
    if reason is not None:
        ctl = load(home)
        routing = Routing.from_control(ctl)
        if record_failures(paths, num, reason, routing.strip_virtual, log):
            ok, _ = bounce.queue_bounce(
                paths,
                num,
                submitter(home) if submit is None else submit,
                log,
                bouncefrom=ctl.bouncefrom,
                bouncehost=ctl.bouncehost,
                doublebounce=ctl.doublebounceto + "@" + ctl.doublebouncehost,
            )
            if not ok:
                raise AdminError("unable to queue the bounce; message kept")
    for _, path in channel_paths(paths, num):
        clean.remove_channel(path)
    clean.remove_bounce(paths, num)
    remove_hold(paths, num)
    clean.remove_info(paths, num)
    return "deleted" + (" and bounced" if reason is not None else "")


def record_failures(
    paths: QueuePaths, num: int, reason: str, shown: Callable[[str], str], log: SendLog
) -> int:
    """Append a failure paragraph to bounce/N for each recipient not yet done."""
    from pyqmail.send import bounce

    count = 0
    text = f"This message was deleted from the queue by the postmaster: {reason}\n"
    for _, path in channel_paths(paths, num):
        try:
            recs = records.read_channel(path)
        except FileNotFoundError:
            continue
        for r in recs:
            if not r.done:
                if not bounce.record_failure(paths, num, shown(decode(r.address)), text, log):
                    raise AdminError("unable to record the failure for the bounce")
                count += 1
    return count


def connect(home: Home) -> Backend:
    """The running scheduler's socket if it answers, else the queue under sendmutex."""
    path = control_path(home)
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return SocketQueue(path)
            except OSError:
                pass
    direct = DirectQueue(home)
    if direct.lock():
        return direct
    raise AdminError(
        "the queue is locked by a running qmail-send or pyqmail run (lock/sendmutex) "
        f"and {path} does not answer"
    )
