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
