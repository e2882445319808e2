"""qmail-queue with hostile input (queue.md 1-2): envelope records that try to add a
recipient, over-long addresses, a torn envelope, a hostile fd 1, symlinks planted in the
queue's directories. A refused message leaves nothing behind; a planted symlink is never
written through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue.envelope import format_input, parse_todo
from pyqmail.queue.layout import QueuePaths
from tests.security._support import queued

BIN = Path(sys.executable).parent
MSG = b"Subject: q\n\nbody\n"


def _leftovers(home: Home) -> list[Path]:
    out = []
    for sub in ("pid", "mess", "intd", "todo", "info", "local", "remote"):
        out += [f for f in (home.queue / sub).rglob("*") if f.is_file() or f.is_symlink()]
    return out


def _queue(home: Home, envelope: bytes | None, *, fd1: int | None = None) -> int:
    """Run qmail-queue with MSG on fd 0 and ``envelope`` (or the given fd) on fd 1."""
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    r_msg, w_msg = os.pipe()
    os.write(w_msg, MSG)
    os.close(w_msg)
    if fd1 is None:
        r_env, w_env = os.pipe()
        assert envelope is not None
        pid = os.fork()
        if pid == 0:  # a writer that may block on a big envelope
            os.close(r_env)
            try:
                os.write(w_env, envelope)
            finally:
                os._exit(0)
        os.close(w_env)
        fd1 = r_env
    else:
        pid = 0
    try:
        p = subprocess.run(
            [str(BIN / "qmail-queue")], stdin=r_msg, stdout=fd1, stderr=subprocess.PIPE,
            env=env, timeout=60,
        )  # fmt: skip
    finally:
        os.close(r_msg)
        if pid:
            os.close(fd1)
            os.waitpid(pid, 0)
    assert b"Traceback" not in p.stderr, p.stderr
    return p.returncode


@pytest.mark.parametrize(
    ("envelope", "code"),
    [
        (b"Fa@b\0Tx@test.example\0victim@elsewhere.example\0\0", 91),
        (b"Fa@b\0Tx@test.example\0Fevil@x\0\0", 91),
        (b"Fa@b\0Tx@test.example\0", 54),
        (b"Fa@b\0Tx@test.example", 54),
        (b"", 54),
        (b"Ta@b\0\0", 91),
        (b"Fa@b\0T" + b"x" * 1003 + b"\0\0", 11),
        (b"F" + b"a" * 1003 + b"\0Tx@test.example\0\0", 11),
        (b"\0\0", 91),
    ],
    ids=["bare-record", "second-F", "no-final-nul", "torn", "empty", "no-F", "long-rcpt",
         "long-sender", "nul-first"],
)  # fmt: skip
def test_bad_envelope_is_refused_and_leaves_nothing(home: Home, envelope: bytes, code: int) -> None:
    assert _queue(home, envelope) == code
    assert queued(home) == []
    assert _leftovers(home) == []


def test_bytes_after_the_final_nul_are_not_recipients(home: Home) -> None:
    assert _queue(home, b"Fa@b\0Tx@test.example\0\0Tvictim@elsewhere.example\0\0") == 0
    assert queued(home) == [(b"a@b", [b"x@test.example"])]


@pytest.mark.parametrize(
    "opener",
    [
        lambda tmp: os.open(os.devnull, os.O_WRONLY),
        lambda tmp: os.open("/dev/zero", os.O_RDONLY),
        lambda tmp: -1,
    ],
    ids=["write-only", "dev-zero", "closed"],
)
def test_hostile_fd1(home: Home, tmp_path: Path, opener) -> None:  # type: ignore[no-untyped-def]
    fd = opener(tmp_path)
    try:
        if fd == -1:
            env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
            p = subprocess.run(
                [str(BIN / "qmail-queue")], input=MSG, env=env, timeout=60,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=lambda: os.close(1),
            )  # fmt: skip
            code = p.returncode
            assert b"Traceback" not in p.stderr
        else:
            code = _queue(home, None, fd1=fd)
    finally:
        if fd >= 0:
            os.close(fd)
    assert code in (54, 91), code
    assert queued(home) == []
    assert _leftovers(home) == []


def test_endless_recipient_stream_is_refused(home: Home) -> None:
    """fd 1 that never sends the final NUL but one endless address: exit 11 early."""
    assert _queue(home, b"Fa@b\0T" + b"y" * 5_000_000) == 11
    assert _leftovers(home) == []


def test_planted_symlinks_are_never_written_through(home: Home, tmp_path: Path) -> None:
    """Symlinks at every queue name the next messages could take (inode numbers near the
    last one the file system handed out) point at a victim file: queueing must either
    pick other names or fail cleanly, and the victim stays untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    paths = QueuePaths(home.queue)
    # Names the file system is about to hand out again: inodes of files just removed.
    probes = [home.queue / "pid" / f"probe{i}" for i in range(40)]
    for p in probes:
        p.write_bytes(b"")
    inodes = [p.stat().st_ino for p in probes]
    planted = []
    for n in inodes:
        for p in (paths.mess(n), paths.intd(n), paths.todo(n), paths.info(n)):
            p.symlink_to(victim)
            planted.append(p)
    for p in probes:
        p.unlink()
    for _ in range(5):
        code = _queue(home, format_input(b"a@b", [b"x@test.example"]))
        assert code == 0 or code // 10 in (5, 6, 7, 8), code
    assert victim.read_bytes() == b"precious\n"
    assert [f for f in (home.queue / "pid").iterdir()] == []  # refused ones cleaned up
    for p in planted:
        if p.is_symlink():
            assert p.resolve() == victim
    for f in (home.queue / "todo").iterdir():
        if not f.is_symlink():
            t = parse_todo(f.read_bytes())
            assert (t.sender, t.recipients) == (b"a@b", (b"x@test.example",))
