"""local/pool.py's WorkerPoolLocal (single-user mode): the time limit is the daemon's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.local.pool import WorkerPoolLocal
from pyqmail.outcome import Outcome
from tests.conftest import process_gone

MSG = b"Subject: hi\n\nbody\n"


def _kill_parent_of(pidfile: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        stat = Path(f"/proc/{int(pidfile.read_text())}/stat").read_text()
        os.kill(int(stat.rsplit(")", 1)[1].split()[1]), signal.SIGKILL)


@pytest.mark.parametrize("stop", ["kill -STOP $PPID", "kill -STOP $$ $PPID"])
def test_a_program_that_stops_its_worker_is_killed_and_replaced(
    home: Home, tmp_path: Path, stop: str
) -> None:
    """A program that stops its worker (same uid as the daemon here) is killed with its
    whole group once the limit passes, the delivery is deferred, and a new worker takes
    the slot: the pool's only worker serves the next delivery."""
    mess = tmp_path / "mess"
    mess.write_bytes(MSG)
    (home.alias / ".qmail-stop").write_text(
        f"|sleep 300 & echo $! > bg.pid; echo $$ > fg.pid; {stop}; sleep 300\n"
    )
    pool = WorkerPoolLocal(home, ControlCache(home), workers=1, program_timeout=1.0)
    pool.start()
    start = time.monotonic()

    async def go() -> list[Outcome]:
        try:
            first = await asyncio.wait_for(pool.deliver(mess, "s@x", "stop@h"), 30)
            return [first, await asyncio.wait_for(pool.deliver(mess, "s@x", "root@h"), 30)]
        except TimeoutError:
            _kill_parent_of(home.alias / "fg.pid")  # the stopped worker, so close() returns
            raise
        finally:
            await pool.close()

    got = asyncio.run(go())
    assert time.monotonic() - start < 30
    assert got == [
        Outcome.temp("Timeout on local delivery after 1 seconds. (#4.3.0)\n"),
        Outcome.ok("did 1+0+0\n"),
    ]
    for name in ("bg.pid", "fg.pid"):
        assert process_gone(int((home.alias / name).read_text()))
    assert len(list((home.alias / "Maildir" / "new").iterdir())) == 1


def _home_maildir(home: Home) -> Path:
    return home.alias / "Maildir" / "new"


def test_dir_syncs_share_rounds_and_report_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many deliveries' new/ fsyncs wait for one round; a directory that cannot be synced
    is an error for exactly the deliveries that named it."""
    from pyqmail.local import maildir
    from pyqmail.local.pool import DirSyncs

    good = tmp_path / "new"
    good.mkdir()
    calls: list[list[bytes]] = []
    real = maildir.fsync_dirs

    def counting(paths: list[bytes]) -> OSError | None:
        calls.append(list(paths))
        time.sleep(0.05)  # a slow disk: the next requests gather meanwhile
        return real(paths)

    monkeypatch.setattr(maildir, "fsync_dirs", counting)
    syncs = DirSyncs()

    async def go() -> list[OSError | None]:
        return list(
            await asyncio.gather(
                *(syncs.sync([os.fsencode(good)]) for _ in range(20)),
                syncs.sync([os.fsencode(good), os.fsencode(tmp_path / "missing")]),
            )
        )

    got = asyncio.run(go())
    assert got[:20] == [None] * 20
    assert isinstance(got[20], FileNotFoundError)
    assert len(calls) <= 4  # 21 waiters, one or two rounds, a call per distinct directory


def test_a_round_waits_for_the_deliveries_under_way_then_serves_them_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round due while other deliveries are in their workers waits for them (they would
    each need a journal commit of their own right after), so one fsync serves all; with
    none under way it waits ``least`` only; and never longer than ``gather`` for them."""
    from pyqmail.local import maildir
    from pyqmail.local.pool import DirSyncs

    new = tmp_path / "new"
    new.mkdir()
    d = os.fsencode(new)
    calls: list[list[bytes]] = []
    real = maildir.fsync_dirs

    def counting(paths: list[bytes]) -> OSError | None:
        calls.append(list(paths))
        return real(paths)

    monkeypatch.setattr(maildir, "fsync_dirs", counting)

    async def under_way_first() -> list[OSError | None]:
        syncs = DirSyncs(gather=30.0)
        first, second = syncs.begin(), syncs.begin()
        syncs.end(first)
        a = asyncio.ensure_future(syncs.sync([d]))
        await asyncio.sleep(0.2)
        assert calls == [] and not a.done()  # the second delivery is still in its worker

        async def second_done() -> OSError | None:  # as the pool does: end, then sync
            syncs.end(second)
            return await syncs.sync([d])

        return list(await asyncio.wait_for(asyncio.gather(a, second_done()), 10))

    assert asyncio.run(under_way_first()) == [None, None]
    assert calls == [[d]]  # one round, one fsync, for both deliveries

    async def alone() -> float:
        syncs = DirSyncs(gather=30.0, least=0.3)
        syncs.end(syncs.begin())
        t = time.monotonic()
        assert await syncs.sync([d]) is None
        return time.monotonic() - t

    assert 0.3 <= asyncio.run(alone()) < 5  # nothing under way: the least wait only

    async def bounded() -> float:
        syncs = DirSyncs(gather=0.3, least=0.0)
        syncs.begin()  # a delivery that does not end (a slow program, say)
        t = time.monotonic()
        assert await syncs.sync([d]) is None
        return time.monotonic() - t

    assert 0.3 <= asyncio.run(bounded()) < 10


def test_delivery_is_not_reported_before_new_is_synced(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker links the message into new/ and hands back the directory; if the daemon
    cannot fsync it, the delivery is a temporary failure (delivered again), never a success."""
    from pyqmail.local import maildir

    mess = tmp_path / "mess"
    mess.write_bytes(MSG)
    pool = WorkerPoolLocal(home, ControlCache(home), workers=2)
    pool.start()
    fail = [False]
    real = maildir.fsync_dirs

    def maybe_fail(paths: list[bytes]) -> OSError | None:
        if fail[0]:
            return OSError(5, "Input/output error")
        return real(paths)

    monkeypatch.setattr(maildir, "fsync_dirs", maybe_fail)

    async def go() -> list[Outcome]:
        try:
            ok = await pool.deliver(mess, "s@x", "root@h")
            fail[0] = True
            bad = await pool.deliver(mess, "s@x", "root@h")
            return [ok, bad]
        finally:
            await pool.close()

    got = asyncio.run(go())
    assert got == [
        Outcome.ok("did 1+0+0\n"),
        Outcome.temp("Temporary error on maildir delivery. (#4.3.0)\n"),
    ]
    assert len(list(_home_maildir(home).iterdir())) == 2  # linked both times: at least once


def test_workers_see_a_new_users_cdb(home: Home, tmp_path: Path) -> None:
    """The workers keep users/cdb open between deliveries; qmail-newu's replacement is
    seen by the very next delivery (the file is re-stat'ed per lookup)."""
    from pyqmail.local import users

    mess = tmp_path / "mess"
    mess.write_bytes(MSG)
    uid, gid = os.getuid(), os.getgid()
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        for sub in ("cur", "new", "tmp"):
            (d / "Maildir" / sub).mkdir(parents=True)

    def assign(d: Path) -> None:
        (home.users / "assign").write_text(f"=bob:bob:{uid}:{gid}:{d}:::\n.\n")
        users.newu(home)

    assign(first)
    pool = WorkerPoolLocal(home, ControlCache(home), workers=1)
    pool.start()

    async def go() -> list[Outcome]:
        try:
            out = [await pool.deliver(mess, "s@x", "bob@h")]
            assign(second)
            out.append(await pool.deliver(mess, "s@x", "bob@h"))
            return out
        finally:
            await pool.close()

    assert asyncio.run(go()) == [Outcome.ok("did 1+0+0\n")] * 2
    assert len(list((first / "Maildir" / "new").iterdir())) == 1
    assert len(list((second / "Maildir" / "new").iterdir())) == 1


def test_pool_deliveries_leave_the_maildir_alarm_to_the_pool(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose pool limit is no longer than qmail-local's 24 hours sets no alarm
    around the Maildir write (two signal() and two setitimer() calls per delivery saved);
    with a longer pool limit the alarm is there as in qmail-local."""
    from pyqmail.local import maildir, pool, users

    mess = tmp_path / "mess"
    mess.write_bytes(MSG)
    timers: list[float] = []
    real = signal.setitimer

    def spy(which: int, seconds: float, interval: float = 0.0) -> tuple[float, float]:
        timers.append(seconds)
        return real(which, seconds, interval)

    monkeypatch.setattr(signal, "setitimer", spy)
    cache = users.CdbCache(home.users / "cdb")
    dd = pool.DefaultDelivery(ControlCache(home))
    out = pool._deliver(home, dd, mess, "s@x", "root@h", cache, None)
    assert out == Outcome.ok("did 1+0+0\n") and timers == []
    out = pool._deliver(home, dd, mess, "s@x", "root@h", cache, maildir.MAILDIR_TIMEOUT)
    assert out == Outcome.ok("did 1+0+0\n") and timers == [maildir.MAILDIR_TIMEOUT, 0]
    assert len(list(_home_maildir(home).iterdir())) == 2
