"""mbox delivery: quoting, locking against other processes, truncation on error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqmail.local import mbox
from pyqmail.local.failure import DeliveryFailure
from tests.conftest import is_root

UF = b"From s@x Thu Jan 01 00:00:00 1970\n"
HEAD = b"Return-Path: <s@x>\nDelivered-To: u@h\n"

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
getattr(fcntl, sys.argv[2])(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def _msg(data: bytes) -> int:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return os.dup(f.fileno())


@pytest.mark.parametrize(
    ("line", "quoted"),
    [
        (b"From x\n", True),
        (b">From x\n", True),
        (b">>>From x\n", True),
        (b"From\n", False),
        (b"from x\n", False),
        (b" From x\n", False),
        (b"X>From x\n", False),
    ],
)
def test_needs_quote(line: bytes, quoted: bool) -> None:
    assert mbox.needs_quote(line) is quoted


def test_streams_long_lines_and_quotes(tmp_path: Path) -> None:
    body = (
        b"From a\n" + b"F" * 200_000 + b"\n>From b\n" + b"x" * 70_000 + b"From not-at-start\nFrom"
    )
    fd = _msg(body)
    try:
        mbox.deliver(str(tmp_path / "mb"), fd, UF, HEAD)
    finally:
        os.close(fd)
    expect = (
        UF + HEAD + b">From a\n" + b"F" * 200_000 + b"\n>>From b\n" + b"x" * 70_000
        + b"From not-at-start\nFrom\n\n"  # "From" without a space is no From_ line
    )  # fmt: skip
    assert (tmp_path / "mb").read_bytes() == expect


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    path = tmp_path / "mb"
    path.write_bytes(b"existing\n")
    procs: list[subprocess.Popen[str]] = []

    def start(kind: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline() == "locked\n"
        procs.append(p)
        return p

    yield path, start  # type: ignore[misc]
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("kind", ["flock", "lockf"])
def test_lock_held_by_another_process_defers(holder, kind: str) -> None:  # type: ignore[no-untyped-def]
    path, start = holder
    start(kind)
    fd = _msg(b"hello\n")
    try:
        with pytest.raises(DeliveryFailure) as e:
            mbox.deliver(str(path), fd, UF, HEAD, lock_timeout=1.0)
    finally:
        os.close(fd)
    assert (e.value.code, e.value.text) == (
        111,
        "File has been locked for 1 seconds straight. (#4.3.0)",
    )
    assert path.read_bytes() == b"existing\n"
    assert not Path(str(path) + ".lock").exists()


@pytest.mark.parametrize("kind", ["flock", "lockf"])
def test_waits_for_the_lock_then_delivers(holder, kind: str) -> None:  # type: ignore[no-untyped-def]
    path, start = holder
    proc = start(kind)
    fd = _msg(b"hello\n")
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            mbox.deliver(str(path), fd, UF, HEAD, lock_timeout=60.0)
        except BaseException as e:
            errors.append(e)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    assert not done.wait(0.3)  # blocked by the other process's lock
    assert path.read_bytes() == b"existing\n"
    proc.stdin.close()  # type: ignore[union-attr]
    proc.wait()
    t.join(30)
    os.close(fd)
    assert not errors
    assert path.read_bytes() == b"existing\n" + UF + HEAD + b"hello\n\n"


def test_dot_lock_is_honoured_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "mb"
    lock = tmp_path / "mb.lock"
    lock.write_text("123\n")
    fd = _msg(b"x\n")
    try:
        with pytest.raises(DeliveryFailure, match="locked for 1 seconds"):
            mbox.deliver(str(path), fd, UF, HEAD, lock_timeout=1.0)
        assert lock.exists()  # someone else's lock is left alone
        lock.unlink()
        mbox.deliver(str(path), fd, UF, HEAD)
    finally:
        os.close(fd)
    assert not lock.exists()
    assert path.read_bytes() == UF + HEAD + b"x\n\n"


def test_stale_dot_lock_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "mb"
    lock = tmp_path / "mb.lock"
    lock.write_text("123\n")
    os.utime(lock, (1, 1))
    fd = _msg(b"x\n")
    try:
        mbox.deliver(str(path), fd, UF, HEAD, lock_timeout=5.0)
    finally:
        os.close(fd)
    assert path.read_bytes() == UF + HEAD + b"x\n\n"


def test_unwritable_directory_skips_dot_lock(tmp_path: Path) -> None:
    """A user may own /var/mail/USER without write access to /var/mail (no dot-lock)."""
    top = Path(tempfile.mkdtemp())  # tmp_path's parents are not searchable by others
    try:
        top.chmod(0o755)
        d = top / "spool"
        d.mkdir()
        path = d / "mb"
        path.write_bytes(b"")
        code = _in_child_as_other_user(d, path)
        assert code == 0
        assert path.read_bytes() == UF + HEAD + b"x\n\n"
        assert os.listdir(d) == ["mb"]
    finally:
        shutil.rmtree(top)


def _in_child_as_other_user(d: Path, path: Path) -> int:
    if is_root():
        os.chown(path, 4243, 4243)
        d.chmod(0o755)
    else:
        d.chmod(0o555)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if is_root():
                os.setgid(4243)
                os.setuid(4243)
            fd = _msg(b"x\n")
            mbox.deliver(str(path), fd, UF, HEAD, lock_timeout=2.0)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    d.chmod(0o755)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to mount a small tmpfs")
def test_full_disk_truncates_back(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        path = mnt / "mb"
        path.write_bytes(b"old mail\n" * 100)
        fd = _msg(b"y" * 100 + b"\n" + b"z" * (1 << 20))
        try:
            with pytest.raises(DeliveryFailure) as e:
                mbox.deliver(str(path), fd, UF, HEAD)
        finally:
            os.close(fd)
        assert e.value.code == 111
        assert e.value.text.startswith(f"Unable to write {path}: out of disk space")
        assert path.read_bytes() == b"old mail\n" * 100
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _reference(message: bytes) -> bytes:
    """Quoting as the definition says it: each whole line, then the ending newlines."""
    lines = message.splitlines(keepends=True)
    out = b"".join(b">" + ln if mbox.needs_quote(ln) else ln for ln in lines)
    if message and not message.endswith(b"\n"):
        out += b"\n"
    return out + b"\n"


_mboxish = st.lists(
    st.sampled_from([b">", b"From ", b"From", b"Fr", b"F", b"\n", b" ", b"x", b"rom "]),
    max_size=40,
).map(b"".join)


@given(_mboxish, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20))
def test_quoter_matches_the_reference_in_any_pieces(message: bytes, cuts: list[int]) -> None:
    q = mbox.FromQuoter()
    out, i, k = b"", 0, 0
    while i < len(message):
        step = cuts[k % len(cuts)]
        out += q.feed(message[i : i + step])
        i, k = i + step, k + 1
    out += q.end()
    if q.open_line:
        out += b"\n"
    assert out + b"\n" == _reference(message)


@given(_mboxish)
def test_deliver_matches_the_reference(message: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        fd = _msg(message)
        try:
            mbox.deliver(f"{d}/mb", fd, UF, HEAD)
        finally:
            os.close(fd)
        assert Path(f"{d}/mb").read_bytes() == UF + HEAD + _reference(message)


@pytest.mark.parametrize("tail", [b"From x\n", b"x\n", b""])
def test_8mib_of_gt_without_a_newline(
    tmp_path: Path, tail: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run of '>' is counted, never rescanned: each 64 KiB read is looked at once (the
    old code joined every read to the run and stripped it again: quadratic)."""
    body = b">" * (8 << 20) + tail
    fd = _msg(body)
    feeds: list[int] = []
    real = mbox.FromQuoter.feed

    def counting(self: mbox.FromQuoter, data: bytes) -> bytes:
        feeds.append(len(data))
        return real(self, data)

    monkeypatch.setattr(mbox.FromQuoter, "feed", counting)
    try:
        mbox.deliver(str(tmp_path / "mb"), fd, UF, HEAD)
    finally:
        os.close(fd)
    assert sum(feeds) == len(body) and max(feeds) <= 65536  # every byte fed once
    assert (tmp_path / "mb").read_bytes() == UF + HEAD + _reference(body)
