"""queue/writer.py: the in-process qmail-queue sequence, its files and its failures."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue import codes
from pyqmail.queue.envelope import MAX_ADDRESS, parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import CrashState
from pyqmail.queue.writer import (
    CommitPipeline,
    QueueError,
    QueueWriter,
    commit_many,
    received_line,
)

# A commit's steps, in the order each message passes them.
STEPS = [
    CrashState.MESS_WRITTEN,
    CrashState.INTD_CREATED,
    CrashState.INTD_WRITTEN,
    CrashState.MESS_SYNCED,
    CrashState.INTD_SYNCED,
    CrashState.TODO_LINKED,
    CrashState.TODO_SYNCED,
    CrashState.PID_UNLINKED,
]


def _files(home: Home) -> list[str]:
    """Every regular file in the queue except lock/ (relative paths)."""
    out = []
    for dirpath, _, names in os.walk(home.queue):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), home.queue)
            if not rel.startswith("lock"):
                out.append(rel)
    return sorted(out)


def test_commit_lays_down_qmail_format(home: Home) -> None:
    w = QueueWriter(home, clock=lambda: 812090814.0)
    p = w.begin(uid=1234, origin="uid")
    p.write(b"Subject: x\n\nbody\n")
    n = p.commit(b"a@b", [b"c@d", b"e@f"])
    paths = QueuePaths(home.queue)
    assert n == p.msgnum
    mess = paths.mess(n)
    assert os.stat(mess).st_ino == n
    assert mess.parent.name == str(n % 23)
    assert (
        mess.read_bytes()
        == (
            f"Received: (qmail {os.getpid()} invoked by uid 1234); 26 Sep 1995 04:46:54 -0000\n"
            "Subject: x\n\nbody\n"
        ).encode()
    )
    todo = paths.todo(n).read_bytes()
    assert todo == b"u1234\0p%d\0Fa@b\0Tc@d\0Te@f\0" % os.getpid()
    assert os.stat(paths.todo(n)).st_ino == os.stat(paths.intd(n)).st_ino
    assert stat.S_IMODE(os.stat(mess).st_mode) & 0o022 == 0
    assert _files(home) == sorted([f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"])


@pytest.mark.parametrize(
    ("origin", "text"),
    [
        ("network", "invoked from network"),
        ("bounce", "invoked for bounce"),
        ("alias", "invoked by alias"),
        ("uid", "invoked by uid 77"),
    ],
)
def test_received_line(origin: str, text: str) -> None:
    assert received_line(9, origin, 77, 0) == (
        f"Received: (qmail 9 {text}); 1 Jan 1970 00:00:00 -0000\n".encode()
    )


def test_received_extra_and_large_message(home: Home) -> None:
    w = QueueWriter(home)
    p = w.begin(origin="network", received=b"Received: from x\n")
    body = os.urandom(300_000)
    for i in range(0, len(body), 1000):
        p.write(body[i : i + 1000])
    n = p.commit(b"", [b"r@x"])
    data = QueuePaths(home.queue).mess(n).read_bytes()
    first, rest = data.split(b"\n", 1)
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked from network\); .* -0000", first)
    assert rest == b"Received: from x\n" + body


_DOOR = (
    b"Received: from unknown (HELO c.example) (127.0.0.1)\n"
    b"  by mx.example with %s (TLSv1.3 TLS_AES_256_GCM_SHA384); 7 Dec 2026 13:00:00 -0000\n"
)


def _queued(home: Home, origin: str, parts: list[bytes], received: bytes = b"") -> bytes:
    p = QueueWriter(home).begin(origin=origin, received=received)
    for part in parts:
        p.write(part)
    return QueuePaths(home.queue).mess(p.commit(b"a@b", [b"r@x"])).read_bytes()


@pytest.mark.parametrize("word", [b"ESMTPS", b"ESMTPA", b"ESMTPSA", b"UTF8SMTPS"])
def test_protected_door_line_goes_above_qmail_queue_line(home: Home, word: bytes) -> None:
    door = _DOOR % word
    data = _queued(home, "network", [b"Subject: s\n\nbody\n"], received=door)
    assert data.startswith(door)
    second, rest = data[len(door) :].split(b"\n", 1)
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked from network\); .* -0000", second)
    assert rest == b"Subject: s\n\nbody\n"


def test_door_line_split_across_writes_is_still_found(home: Home) -> None:
    door = _DOOR % b"ESMTPS"
    whole = door + b"Subject: s\n\nbody\n"
    data = _queued(home, "network", [whole[i : i + 7] for i in range(0, len(whole), 7)])
    assert data.startswith(door + b"Received: (qmail ")


@pytest.mark.parametrize(
    ("origin", "first"),
    [
        ("network", _DOOR % b"SMTP"),  # a plain session: qmail's order, byte for byte
        ("uid", _DOOR % b"ESMTPSA"),  # a local user cannot put a trace line above ours
        ("network", b"X-Note: with ESMTPS ;\n"),  # not a Received line
        ("network", b"Received: from x\n" + b" " * 9000 + b"with ESMTPS;\n"),  # too long
    ],
)
def test_qmail_order_otherwise(home: Home, origin: str, first: bytes) -> None:
    data = _queued(home, origin, [first, b"Subject: s\n\nbody\n"])
    assert data.startswith(b"Received: (qmail ")
    assert data.split(b"\n", 1)[1] == first + b"Subject: s\n\nbody\n"


def test_message_that_is_only_the_door_line(home: Home) -> None:
    door = _DOOR % b"ESMTPS"
    data = _queued(home, "network", [door])
    assert data.startswith(door) and data[len(door) :].startswith(b"Received: (qmail ")
    assert _queued(home, "network", []).startswith(b"Received: (qmail ")


def test_zero_byte_message_and_no_recipients(home: Home) -> None:
    w = QueueWriter(home)
    p = w.begin()
    n = p.commit(b"a@b", [])
    paths = QueuePaths(home.queue)
    assert paths.mess(n).read_bytes().startswith(b"Received: (qmail ")
    assert parse_todo(paths.todo(n).read_bytes()).recipients == ()


def test_ten_thousand_recipients(home: Home) -> None:
    rcpts = [b"user%d@example.com" % i for i in range(10_000)]
    p = QueueWriter(home).begin()
    n = p.commit(b"a@b", rcpts)
    assert parse_todo(QueuePaths(home.queue).todo(n).read_bytes()).recipients == tuple(rcpts)


@pytest.mark.parametrize(
    ("sender", "rcpts", "code"),
    [
        (b"a" * (MAX_ADDRESS + 1), [b"x@y"], 11),
        (b"a@b", [b"x@y", b"z" * (MAX_ADDRESS + 1)], 11),
        (b"a\0b", [b"x@y"], 91),
        (b"a@b", [b"x\0@y"], 91),
    ],
)
def test_bad_envelope_leaves_nothing(
    home: Home, sender: bytes, rcpts: list[bytes], code: int
) -> None:
    p = QueueWriter(home).begin()
    p.write(b"hello\n")
    with pytest.raises(QueueError) as ei:
        p.commit(sender, rcpts)
    assert ei.value.code == code
    assert _files(home) == []


def test_recipients_from_an_iterator_are_written_as_they_come(home: Home) -> None:
    """intd/N exists while the iterator runs (qmail-queue writes it while reading fd 1),
    and a bad address or an error of the iterator leaves nothing."""
    paths = QueuePaths(home.queue)
    seen: list[bool] = []

    def rcpts(bad: bytes | None = None, boom: bool = False) -> Iterator[bytes]:
        for i in range(20_000):
            if i == 10_000:
                seen.append(any(paths.dir("intd").iterdir()))
                if bad is not None:
                    yield bad
                if boom:
                    raise ConnectionResetError("client went away")
            yield b"user%d@example.com" % i

    p = QueueWriter(home).begin()
    n = p.commit(b"a@b", rcpts())
    got = parse_todo(paths.todo(n).read_bytes()).recipients
    assert got == tuple(b"user%d@example.com" % i for i in range(20_000)) and seen == [True]
    for bad, boom, code in ((b"x\0@y", False, 91), (b"z" * (MAX_ADDRESS + 1), False, 11)):
        before = _files(home)
        with pytest.raises(QueueError) as ei:
            QueueWriter(home).begin().commit(b"a@b", rcpts(bad, boom))
        assert ei.value.code == code and _files(home) == before
    before = _files(home)
    with pytest.raises(ConnectionResetError):
        QueueWriter(home).begin().commit(b"a@b", rcpts(None, True))
    assert _files(home) == before


def test_abort_removes_everything(home: Home) -> None:
    p = QueueWriter(home).begin()
    p.write(b"x" * 100_000)
    assert _files(home) != []
    p.abort()
    p.abort()
    assert _files(home) == []


def test_notify_replaces_trigger(home: Home) -> None:
    seen: list[int] = []
    p = QueueWriter(home, notify=seen.append).begin()
    n = p.commit(b"a", [b"b"])
    assert seen == [n]


def test_trigger_is_poked(home: Home) -> None:
    trig = QueuePaths(home.queue).trigger
    fd = os.open(trig, os.O_RDONLY | os.O_NONBLOCK)
    try:
        QueueWriter(home).begin().commit(b"a", [b"b"])
        assert os.read(fd, 10) == b"\0"
    finally:
        os.close(fd)


def test_concurrent_commits(home: Home) -> None:
    w = QueueWriter(home)
    got: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        p = w.begin()
        p.write(b"msg %d\n" % i)
        n = p.commit(b"s", [b"r%d" % i])
        with lock:
            got.append(n)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 40
    paths = QueuePaths(home.queue)
    for n in got:
        body = paths.mess(n).read_bytes().split(b"\n", 1)[1]
        i = int(body.split()[1])
        assert parse_todo(paths.todo(n).read_bytes()).recipients == (b"r%d" % i,)
    assert os.listdir(paths.pid) == []


def test_missing_queue_dirs(home: Home) -> None:
    paths = QueuePaths(home.queue)
    os.rmdir(paths.pid)
    with pytest.raises(QueueError) as ei:
        QueueWriter(home).begin()
    assert ei.value.code == 63
    os.mkdir(paths.pid)
    for i in range(23):
        os.rmdir(paths.root / "mess" / str(i))
    with pytest.raises(QueueError) as ei:
        QueueWriter(home).begin()
    assert ei.value.code == 64
    assert _files(home) == []


def test_missing_queue_and_home(tmp_path: Path) -> None:
    with pytest.raises(QueueError) as ei:
        QueueWriter(Home(tmp_path / "nohome", True)).begin()
    assert ei.value.code == 61
    (tmp_path / "h").mkdir()
    with pytest.raises(QueueError) as ei:
        QueueWriter(Home(tmp_path / "h", True)).begin()
    assert ei.value.code == 62


def test_missing_intd_and_todo(home: Home) -> None:
    paths = QueuePaths(home.queue)
    os.rmdir(paths.dir("intd"))
    p = QueueWriter(home).begin()
    with pytest.raises(QueueError) as ei:
        p.commit(b"a", [b"b"])
    assert ei.value.code == 65
    assert _files(home) == []
    os.mkdir(paths.dir("intd"))
    os.rmdir(paths.dir("todo"))
    p = QueueWriter(home).begin()
    with pytest.raises(QueueError) as ei:
        p.commit(b"a", [b"b"])
    assert ei.value.code == 66
    assert _files(home) == []


def test_stale_intd_with_our_inode_is_replaced(home: Home) -> None:
    p = QueueWriter(home).begin()
    paths = QueuePaths(home.queue)
    paths.intd(p.msgnum).write_bytes(b"u1\0p1\0Fold\0")
    n = p.commit(b"new", [b"r"])
    assert parse_todo(paths.todo(n).read_bytes()).sender == b"new"


def test_dropped_pending_is_cleaned(home: Home) -> None:
    p = QueueWriter(home).begin()
    p.write(b"never committed\n")
    assert _files(home) != []
    del p
    assert _files(home) == []


def test_modes_ignore_umask(home: Home) -> None:
    old = os.umask(0o077)
    try:
        n = QueueWriter(home).begin().commit(b"a", [b"b"])
    finally:
        os.umask(old)
    paths = QueuePaths(home.queue)
    assert stat.S_IMODE(os.stat(paths.mess(n)).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(paths.todo(n)).st_mode) == 0o644


def test_forked_child_does_not_clean_parents_pending(home: Home) -> None:
    p = QueueWriter(home).begin()
    p.write(b"parent's message\n")
    pid = os.fork()
    if pid == 0:
        try:
            del p  # the child's copy is finalized here
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    n = p.commit(b"a", [b"b"])
    assert QueuePaths(home.queue).mess(n).read_bytes().endswith(b"parent's message\n")


def test_commit_many_commits_each_and_fails_one_alone(home: Home) -> None:
    """A batch: the bad envelope is refused and leaves nothing; the others are queued."""
    w = QueueWriter(home)
    ps = [w.begin() for _ in range(3)]
    for i, p in enumerate(ps):
        p.write(b"Subject: %d\n\nbody\n" % i)
    results = commit_many(
        [
            (ps[0], b"a@b", [b"c@d"]),
            (ps[1], b"a@b", [b"x" * (MAX_ADDRESS + 1)]),
            (ps[2], b"", [b"e@f"]),
        ]
    )
    assert results[0] == ps[0].msgnum and results[2] == ps[2].msgnum
    assert isinstance(results[1], QueueError)
    paths = QueuePaths(home.queue)
    for i in (0, 2):
        n = ps[i].msgnum
        assert paths.mess(n).read_bytes().endswith(b"Subject: %d\n\nbody\n" % i)
        assert parse_todo(paths.todo(n).read_bytes()).recipients == (
            (b"c@d",) if i == 0 else (b"e@f",)
        )
    expected = []
    for i in (0, 2):
        n = ps[i].msgnum
        expected += [f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"]
    assert _files(home) == sorted(expected)  # nothing of the refused one, no pid names


def test_commit_many_keeps_each_messages_step_order(home: Home) -> None:
    """Every message passes every CrashState, in the order of a commit of its own; the
    batch goes step by step (all synced before any todo link)."""
    seen: list[CrashState] = []
    w = QueueWriter(home, hook=seen.append)
    ps = [w.begin() for _ in range(4)]
    del seen[:]
    assert all(isinstance(r, int) for r in commit_many([(p, b"a@b", [b"c@d"]) for p in ps]))
    assert sorted(seen, key=STEPS.index) == [s for s in STEPS for _ in ps]
    # no todo link before every message and its envelope are synced
    last_synced = max(i for i, s in enumerate(seen) if s is CrashState.INTD_SYNCED)
    first_linked = seen.index(CrashState.TODO_LINKED)
    assert last_synced < first_linked
    assert len(os.listdir(home.queue / "todo")) == 4


def test_commit_many_fsyncs_a_batch_at_once(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's files and mess/S directories are fsynced by several threads at once,
    every one of them before the first todo link."""
    real_fsync = os.fsync
    calls: list[tuple[str, bool]] = []  # (thread, todo/ linked yet)
    todo = home.queue / "todo"

    def fsync(fd: int) -> None:
        calls.append((threading.current_thread().name, bool(os.listdir(todo))))
        time.sleep(0.002)  # long enough for the other threads to take their share
        real_fsync(fd)

    w = QueueWriter(home, one_commit=False)
    ps = [w.begin() for _ in range(10)]
    dirs = {p.msgnum % 23 for p in ps}
    monkeypatch.setattr(os, "fsync", fsync)
    assert all(isinstance(r, int) for r in commit_many([(p, b"a@b", [b"c@d"]) for p in ps]))
    # 10 messages and 10 envelopes, each mess/S once, then todo/ once
    assert len(calls) == 20 + len(dirs) + 1
    assert not any(linked for _, linked in calls[:-1]) and calls[-1][1]
    assert len({t for t, _ in calls[:-1]}) > 1


@pytest.mark.parametrize("one_commit", [False, True], ids=["fsyncs", "one-commit"])
def test_commit_many_sync_failure_fails_that_message_alone(
    home: Home, monkeypatch: pytest.MonkeyPatch, one_commit: bool
) -> None:
    """A message whose file cannot be synced (fsync, or write-out with one commit) fails
    alone with qmail's write error; the others of the batch are queued whole."""
    import pyqmail.queue.writer as writer_mod

    where, name = (writer_mod, "write_out") if one_commit else (os, "fsync")
    real = getattr(where, name)
    w = QueueWriter(home, one_commit=one_commit)
    ps = [w.begin() for _ in range(4)]
    for p in ps:
        p.write(b"Subject: x\n\nbody\n")
    bad = [ps[2]._fd]  # once: the number is free for reuse after the abort

    def failing(fd: int) -> None:
        if fd in bad:
            bad.clear()
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(where, name, failing)
    results = commit_many([(p, b"a@b", [b"c@d"]) for p in ps])
    err = results[2]
    assert isinstance(err, QueueError) and err.code == codes.WRITE_ERROR
    assert "unable to fsync message" in str(err) and not bad
    good = [p.msgnum for i, p in enumerate(ps) if i != 2]
    assert results[:2] + results[3:] == good
    assert _files(home) == sorted(
        f for n in good for f in (f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}")
    )


def test_commit_many_refuses_mixed_writers(home: Home) -> None:
    a, b = QueueWriter(home), QueueWriter(home)
    pa, pb = a.begin(), b.begin()
    with pytest.raises(ValueError):
        commit_many([(pa, b"", [b"c@d"]), (pb, b"", [b"c@d"])])
    pa.abort()
    pb.abort()
    assert _files(home) == []


def test_commit_links_into_the_directory_it_syncs(home: Home) -> None:
    """The todo/ link goes through the descriptor that is fsynced: the writer keeps
    using the directory it opened (the queue's directories are never replaced)."""
    w = QueueWriter(home)
    p = w.begin()
    n1 = p.commit(b"", [b"c@d"])
    p2 = w.begin()
    n2 = p2.commit(b"", [b"c@d"])
    assert sorted(os.listdir(home.queue / "todo")) == sorted([str(n1), str(n2)])
    w.close()
    p3 = w.begin()  # reopened after close
    n3 = p3.commit(b"", [b"c@d"])
    assert (home.queue / "todo" / str(n3)).exists()


def test_pipeline_syncs_todo_with_the_next_batchs_files(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CommitPipeline: the todo/ fsync of the messages linked in one round runs in the
    same set of fsyncs as the next batch's files; no result before its todo/ fsync."""
    w = QueueWriter(home, one_commit=False)
    pipe = CommitPipeline(w)
    a = w.begin()
    a.write(b"Subject: a\n\n")
    assert pipe.round([("a", a, b"x@y", [b"c@d"])]) == []  # synced and linked, no answer
    assert pipe.pending == 1 and os.path.exists(QueuePaths(home.queue).todo(a.msgnum))
    import pyqmail.queue.writer as writer_mod

    rounds: list[int] = []
    real = writer_mod.fsync_all

    def spy(jobs, **kw):  # type: ignore[no-untyped-def]
        rounds.append(len(jobs))
        return real(jobs, **kw)

    monkeypatch.setattr(writer_mod, "fsync_all", spy)
    b = w.begin()
    b.write(b"Subject: b\n\n")
    got = pipe.round([("b", b, b"x@y", [b"c@d"])])
    assert got == [("a", a.msgnum)] and pipe.pending == 1
    assert rounds == [1 + 2 + 1]  # todo/, b's file and envelope, b's mess/S: one set
    assert pipe.round([]) == [("b", b.msgnum)] and pipe.pending == 0
    assert rounds == [4, 1]


def test_pipeline_bug_withdraws_the_linked_and_keeps_final_results(home: Home) -> None:
    """A hook (a bug) raising in a round: the messages already finished keep their
    results (drain), the linked ones are withdrawn (abort: todo link and files gone)."""
    armed = [False]

    def hook(state: CrashState) -> None:
        if armed[0] and state is CrashState.MESS_WRITTEN:
            raise RuntimeError("bug")

    w = QueueWriter(home, hook=hook, one_commit=False)
    pipe = CommitPipeline(w)
    first = w.begin()
    pipe.round([("1", first, b"x@y", [b"c@d"])])
    second = w.begin()
    assert pipe.round([("2", second, b"x@y", [b"c@d"])]) == [("1", first.msgnum)]
    third = w.begin()
    armed[0] = True
    with pytest.raises(RuntimeError):
        pipe.round([("3", third, b"x@y", [b"c@d"])])
    assert pipe.drain() == []
    assert pipe.abort() == ["2"]
    n = first.msgnum
    assert _files(home) == sorted([f"mess/{n % 23}/{n}", f"intd/{n}", f"todo/{n}"])


def test_one_commit_writes_out_and_fsyncs_todo_once(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the journal keeps order: every file is written out (no fsync), before the
    first todo link; the only fsync is todo/'s, after the last link; every message
    passes every step in order; a round returns all its results, nothing waits."""
    import pyqmail.queue.writer as writer_mod

    todo = home.queue / "todo"
    events: list[tuple[str, int]] = []  # (what, todo/ entries at that moment)
    real_out, real_fsync = writer_mod.write_out, os.fsync

    def write_out(fd: int) -> None:
        events.append(("out", len(os.listdir(todo))))
        real_out(fd)

    def fsync(fd: int) -> None:
        events.append(("fsync", len(os.listdir(todo))))
        real_fsync(fd)

    seen: list[CrashState] = []
    w = QueueWriter(home, hook=seen.append, one_commit=True)
    ps = [w.begin() for _ in range(5)]
    for p in ps:
        p.write(b"Subject: x\n\nbody\n")
    del seen[:]
    monkeypatch.setattr(writer_mod, "write_out", write_out)
    monkeypatch.setattr(os, "fsync", fsync)
    pipe = CommitPipeline(w)
    got = pipe.round([(i, p, b"a@b", [b"c@d"]) for i, p in enumerate(ps)])
    assert sorted(got) == [(i, p.msgnum) for i, p in enumerate(ps)] and pipe.pending == 0
    assert events == [("out", 0)] * 10 + [("fsync", 5)]
    assert sorted(seen, key=STEPS.index) == [s for s in STEPS for _ in ps]
    assert max(i for i, s in enumerate(seen) if s is CrashState.INTD_SYNCED) < seen.index(
        CrashState.TODO_LINKED
    )
    for p in ps:
        assert (QueuePaths(home.queue).mess(p.msgnum)).read_bytes().endswith(b"body\n")


def test_one_commit_is_off_where_the_journal_is_not_known(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decided from the queue's file system, once; PYQMAIL_ORDERED_JOURNAL=no turns it off."""
    import pyqmail.queue.writer as writer_mod

    monkeypatch.setattr(writer_mod, "ordered_journal", lambda path: True)
    assert QueueWriter(home).one_commit
    monkeypatch.setattr(writer_mod, "ordered_journal", lambda path: False)
    assert not QueueWriter(home).one_commit
    monkeypatch.setattr(writer_mod, "ordered_journal", lambda path: True)
    os.rename(home.queue / "todo", home.queue / "todo.gone")  # a directory it cannot stat
    assert not QueueWriter(home).one_commit


def test_begin_waits_out_the_cleaners_probe_of_its_pid_file(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clean_stale probes a pid file with a shared lock; a writer that meets that probe
    between creating its pid file and locking it waits for it, it does not fail."""
    import fcntl

    real_open = os.open
    probes: list[threading.Timer] = []

    def open_and_probe(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *args, **kw)
        if isinstance(path, str) and "/pid/" in path and flags & os.O_EXCL:
            probe = real_open(path, os.O_RDONLY)
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the cleaner's look
            t = threading.Timer(0.05, os.close, args=(probe,))
            t.start()
            probes.append(t)
        return fd

    monkeypatch.setattr(os, "open", open_and_probe)
    w = QueueWriter(home)
    p = w.begin()
    monkeypatch.undo()
    for t in probes:
        t.join()
    assert probes and p.msgnum > 0
    p.write(b"Subject: x\n\nbody\n")
    assert p.commit(b"a@b", [b"c@d"]) == p.msgnum


def test_recovery_asks_whether_todo_exists_as_path_exists_does(tmp_path: Path) -> None:
    """recover._exists is Path.exists() on a str: a file or directory is there; missing,
    under a file, or a symlink loop is not; any other error (a directory it may not
    search) is raised, not taken for "not queued"."""
    from pyqmail.queue.recover import _exists

    f = tmp_path / "f"
    f.write_bytes(b"")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for p in (f, tmp_path, tmp_path / "missing", f / "under", loop):
        assert _exists(str(p)) == p.exists(), p
    if os.geteuid() != 0:
        return  # root may search anything: the EACCES case needs an ordinary user
    shut = tmp_path / "shut"
    shut.mkdir(mode=0o000)
    pid = os.fork()
    if pid == 0:  # as nobody: stat under a directory it may not search
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                _exists(str(shut / "x"))
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
