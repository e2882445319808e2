"""qmail-send's todo processing: ``todo/N`` -> ``info/S/N``, ``local/S/N``, ``remote/S/N``.

Owns the file work of preprocessing (queue.md 4) on a batch of todo entries. Steps 1-3's
reading and deciding (:func:`examine_batch`: a small read from the page cache, a stat and
unlinks of files that normally do not exist, none of which waits for the journal) run on
the event loop; only a batch with files to write goes to a worker thread
(:func:`preprocess_batch`), so that the fsyncs of many messages share a journal commit. A
batch of direct deliveries costs no thread hand-off (each cost the loop futex calls and
the GIL's ping-pong for every system call of the thread):

1. read todo/N (gone: a scan raced a notify, silently dropped) and parse it (todo.py);
   stat mess/S/N for the size the log shows;
2. route every recipient (todo.py's Routing) and unlink leftovers of an earlier attempt;
3. either keep a message for direct delivery (direct.py decides which qualify, up to a
   budget: no files are written for it, todo/N stays), or create info and the channel
   files O_EXCL (queue/records.py), not yet synced;
4. group commit: fsync every info and channel file of the batch at once (several
   threads, durable.fsync_all: on a journalled file system they share one journal
   commit, where one file after the other cost a commit each), then every split
   directory touched, once per batch, and only then have intd/N and todo/N removed
   (queue/clean.py), unless a separate cleaner (root mode's qmail-clean) does that: the
   caller asks it after the batch. A message whose file cannot be synced keeps its todo
   and loses the files made for it (retried at the next scan).

Invariant: todo/N is removed only after info and every channel file of N are on disk;
any failure leaves todo/N for the next scan, and doing it again is harmless (step 2).
Results go back to the event loop as :class:`Preprocessed` values; nothing here logs
except a failed removal.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pyqmail.durable import fsync_all, fsync_dir
from pyqmail.queue import clean, records
from pyqmail.queue.layout import QueuePaths
from pyqmail.send import direct
from pyqmail.send.log import SendLog
from pyqmail.send.schedule import CHANNEL_NAMES, CHANNELS
from pyqmail.send.todo import Routing, TodoError, encode, parse_todo

GONE = "gone"  # the warning of an entry already handled: dropped from the results


@dataclass(slots=True)
class Preprocessed:
    """The outcome of preprocessing one todo entry (worker thread -> loop)."""

    num: int
    size: int = 0
    sender: str = ""
    qp: int | None = None
    uid: int | None = None
    channels: int = 0  # bit mask of channels with a file
    warning: str = ""  # set: nothing was done; log it, todo/N stays for the next scan
    direct: list[str] | None = None  # local recipients to deliver straight from todo
    fds: list[int] = field(default_factory=list)  # its new files, open until synced
    routed: list[tuple[int, str]] | None = None  # examined, its files not yet written


def preprocess_batch(
    paths: QueuePaths,
    nums: list[int],
    routing: Routing,
    *,
    direct_budget: int,
    clean_todo: bool,
    log: SendLog,
) -> list[Preprocessed]:
    """Preprocess ``nums``; fsync the directories; remove their todos if ``clean_todo``.

    Up to ``direct_budget`` messages that qualify get no files at all: they are kept for
    direct delivery (``Preprocessed.direct``). Entries found gone are left out.
    """
    return finish_batch(
        paths, examine_batch(paths, nums, routing, direct_budget=direct_budget),
        clean_todo=clean_todo, log=log,
    )  # fmt: skip


def examine_batch(
    paths: QueuePaths, nums: list[int], routing: Routing, *, direct_budget: int
) -> list[Preprocessed]:
    """Steps 1-3 without writing a file: read, route, remove leftovers, and keep up to
    ``direct_budget`` qualifying messages for direct delivery (cheap enough for the loop)."""
    results = []
    for n in nums:
        pre = examine(paths, n, routing, direct_ok=direct_budget > 0)
        if pre.direct is not None:
            direct_budget -= 1
        results.append(pre)
    return results


def needs_files(results: list[Preprocessed]) -> bool:
    """Whether :func:`finish_batch` has files to write for ``results`` (else: no thread)."""
    return any(p.routed is not None for p in results)


def finish_batch(
    paths: QueuePaths, results: list[Preprocessed], *, clean_todo: bool, log: SendLog
) -> list[Preprocessed]:
    """Write, sync and clean for :func:`examine_batch`'s ``results`` (a worker thread)."""
    for p in results:
        if p.routed is not None:
            write_files(paths, p)
    _sync_files(paths, results)
    ok = [p for p in results if not p.warning and p.direct is None]
    dirs: set[str] = set()
    for p in ok:
        dirs.add(os.path.dirname(paths.name("info", p.num)))
        if p.channels & 1:
            dirs.add(os.path.dirname(paths.name("local", p.num)))
        if p.channels & 2:
            dirs.add(os.path.dirname(paths.name("remote", p.num)))
    try:
        for d in dirs:
            fsync_dir(d)
    except OSError as e:
        for p in ok:
            p.warning = f"trouble fsyncing message {p.num}: {e.strerror}; will retry"
        return results
    if clean_todo:
        for p in ok:
            remove_todo(paths, p.num, log)
    return [p for p in results if p.warning != GONE]


def _sync_files(paths: QueuePaths, results: list[Preprocessed]) -> None:
    """fsync the new files of every message of the batch at once, then close them; a
    message with a file that fails gets a warning and its files removed."""
    jobs: list[Callable[[], None]] = []
    owner: list[Preprocessed] = []
    for p in results:
        for fd in p.fds:
            jobs.append(functools.partial(os.fsync, fd))
            owner.append(p)
    try:
        errs = fsync_all(jobs)
    finally:
        for p in results:
            for fd in p.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            p.fds = []
    for p, err in zip(owner, errs, strict=True):
        if err is not None and not p.warning:
            p.warning = f"trouble fsyncing message {p.num}: {err.strerror}; will retry"
            with contextlib.suppress(OSError):
                clean.remove_leftovers(paths, p.num)


def remove_todo(paths: QueuePaths, num: int, log: SendLog) -> None:
    """qmail-clean's "todo/N": intd first, then todo (the message is now in info/)."""
    try:
        clean.clean_todo(paths, num)
    except OSError as e:
        log.unlink_warning(e)


def preprocess(paths: QueuePaths, num: int, routing: Routing, *, direct_ok: bool) -> Preprocessed:
    """One todo entry: its info and channel files written, left open in ``fds`` and not
    yet synced (``preprocess_batch`` syncs and closes them)."""
    pre = examine(paths, num, routing, direct_ok=direct_ok)
    if pre.routed is not None:
        write_files(paths, pre)
    return pre


def examine(paths: QueuePaths, num: int, routing: Routing, *, direct_ok: bool) -> Preprocessed:
    """One todo entry read and routed, its leftovers removed; ``routed`` set when its
    files are still to be written (``write_files``), ``direct`` when it needs none."""
    pre = Preprocessed(num)
    try:
        data = records.read_path(paths.name("todo", num))
    except FileNotFoundError:
        pre.warning = GONE  # already handled (a scan raced a notify)
        return pre
    except OSError as e:
        pre.warning = f"unable to open todo/{num}: {e.strerror}"
        return pre
    try:
        env = parse_todo(data)
    except TodoError as e:
        pre.warning = f"{e} in todo/{num}"
        return pre
    try:
        pre.size = os.stat(paths.name("mess", num)).st_size
    except OSError as e:
        pre.warning = f"unable to stat mess/{paths.split(num)}/{num}: {e.strerror}"
        return pre
    pre.sender, pre.qp, pre.uid = env.sender, env.qp, env.uid
    routed = [routing.route(rcpt) for rcpt in env.recipients]
    try:
        clean.remove_leftovers(paths, num)
    except OSError as e:
        pre.warning = f"unable to unlink leftovers of {num}: {e.strerror}"
        return pre
    if direct_ok and direct.qualifies(routed):
        pre.direct = [a for _, a in routed]
        return pre
    pre.routed = routed
    return pre


def write_files(paths: QueuePaths, pre: Preprocessed) -> None:
    """Create ``pre``'s info and channel files O_EXCL, not yet synced (``fds``)."""
    routed, num = pre.routed, pre.num
    assert routed is not None
    pre.routed = None
    chans: list[list[bytes]] = [[], []]
    for c, addr in routed:
        chans[c].append(encode(addr))
    try:
        info = records.format_info(encode(pre.sender))
        pre.fds.append(records.create_unsynced(paths.name("info", num), info))
        for c in CHANNELS:
            if chans[c]:
                path = paths.name(CHANNEL_NAMES[c], num)
                pre.fds.append(records.create_unsynced(path, records.format_channel(chans[c])))
                pre.channels |= 1 << c
    except OSError as e:
        pre.warning = f"trouble writing info/local/remote for {num}: {e.strerror}"
        for fd in pre.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        pre.fds = []
        with contextlib.suppress(OSError):
            clean.remove_leftovers(paths, num)
