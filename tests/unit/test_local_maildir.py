"""Maildir delivery: never a partial file in new/, unique names, failures are temporary."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pyqmail.local import maildir
from pyqmail.local.failure import DeliveryFailure
from tests.conftest import is_root

HEAD = b"Return-Path: <s@x>\nDelivered-To: u@h\n"


def _msg(data: bytes) -> int:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return os.dup(f.fileno())


def _md(path: Path) -> Path:
    maildir.make(str(path))
    return path


def test_make(tmp_path: Path) -> None:
    maildir.make(str(tmp_path / "M"))
    assert sorted(os.listdir(tmp_path / "M")) == ["cur", "new", "tmp"]
    with pytest.raises(FileExistsError):
        maildir.make(str(tmp_path / "M"))


def test_delivers_verbatim(tmp_path: Path) -> None:
    md = _md(tmp_path / "M")
    fd = _msg(b"From x\nbody\nno newline")
    os.lseek(fd, 3, os.SEEK_SET)  # the shared descriptor's position must not matter
    try:
        maildir.deliver(str(md) + "/", fd, HEAD)
    finally:
        os.close(fd)
    (name,) = os.listdir(md / "new")
    assert (md / "new" / name).read_bytes() == HEAD + b"From x\nbody\nno newline"
    assert os.listdir(md / "tmp") == []
    assert os.listdir(md / "cur") == []


def test_names_are_unique_and_well_formed() -> None:
    names = {maildir.unique_name(1234.5) for _ in range(1000)}
    assert len(names) == 1000
    n = next(iter(names))
    assert n.startswith("1234.M500000P") and "/" not in n and ":" not in n


def test_name_collision_retries_then_fails(tmp_path: Path) -> None:
    md = _md(tmp_path / "M")
    (md / "tmp" / "same").write_bytes(b"someone else's")
    sleeps: list[float] = []
    fd = _msg(b"x\n")
    try:
        with pytest.raises(DeliveryFailure) as e:
            maildir.deliver(str(md), fd, HEAD, name=lambda: "same", sleep=sleeps.append)
        names = iter(["same", "other"])
        maildir.deliver(str(md), fd, HEAD, name=lambda: next(names), sleep=sleeps.append)
    finally:
        os.close(fd)
    assert (e.value.code, e.value.text) == (111, "Temporary error on maildir delivery. (#4.3.0)")
    assert sleeps == [2, 2, 2]
    assert (md / "tmp" / "same").read_bytes() == b"someone else's"
    assert os.listdir(md / "new") == ["other"]


def test_hung_write_times_out(tmp_path: Path) -> None:
    """qmail-local's alarm: a write that never finishes (a hung file system) is deferred
    and leaves nothing in new/ or tmp/. The hang is an injected copy that blocks."""
    md = _md(tmp_path / "M")
    fd = _msg(b"x\n")

    def hang(_src: int, _dst: int) -> int:
        time.sleep(30)
        return 0

    start = time.monotonic()
    try:
        with pytest.raises(DeliveryFailure) as e:
            maildir.deliver(str(md), fd, HEAD, timeout=0.2, copy=hang)
    finally:
        os.close(fd)
    assert time.monotonic() - start < 10
    assert (e.value.code, e.value.text) == (111, "Timeout on maildir delivery. (#4.3.0)")
    assert os.listdir(md / "new") == [] and os.listdir(md / "tmp") == []
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # handler restored


def test_missing_maildir(tmp_path: Path) -> None:
    fd = _msg(b"x\n")
    try:
        with pytest.raises(DeliveryFailure, match=r"Unable to chdir to maildir. \(#4.2.1\)"):
            maildir.deliver(str(tmp_path / "nope") + "/", fd, HEAD)
    finally:
        os.close(fd)


def test_missing_new_leaves_nothing(tmp_path: Path) -> None:
    md = _md(tmp_path / "M")
    os.rmdir(md / "new")
    fd = _msg(b"x\n")
    try:
        with pytest.raises(DeliveryFailure, match="Temporary error on maildir delivery"):
            maildir.deliver(str(md), fd, HEAD)
    finally:
        os.close(fd)
    assert os.listdir(md / "tmp") == []


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to mount a small tmpfs")
def test_full_disk_no_partial_file_in_new(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        md = _md(mnt / "Maildir")
        fd = _msg(b"x" * (1 << 20))
        try:
            with pytest.raises(DeliveryFailure) as e:
                maildir.deliver(str(md) + "/", fd, HEAD)
            assert e.value.text == "Temporary error on maildir delivery. (#4.3.0)"
            assert os.listdir(md / "new") == []
            assert os.listdir(md / "tmp") == []  # the partial tmp file was removed
            small = _msg(b"small\n")
            maildir.deliver(str(md) + "/", small, HEAD)  # space is back: it works
            os.close(small)
        finally:
            os.close(fd)
        (name,) = os.listdir(md / "new")
        assert (md / "new" / name).read_bytes() == HEAD + b"small\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_deferred_dir_sync_names_new_and_leaves_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside deferred_dir_syncs the message is fsynced and linked as always, but new/ is
    not fsynced: its absolute path is handed back for the caller to sync."""
    monkeypatch.setenv("PYQMAIL_ORDERED_JOURNAL", "no")  # the file's fsync, anywhere
    md = _md(tmp_path / "M")
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    fd = _msg(b"body\n")
    try:
        with maildir.deferred_dir_syncs() as dirs:
            maildir.deliver("M", fd, HEAD, dir_fd=os.open(tmp_path, os.O_RDONLY))
    finally:
        os.close(fd)
    assert dirs == [os.fsencode(md / "new")]
    (name,) = os.listdir(md / "new")
    assert synced == [os.stat(md / "new" / name).st_ino]  # the file, not the directory
    assert maildir.fsync_dirs(dirs) is None
    # outside the context, new/ is fsynced by the delivery itself again
    synced.clear()
    fd = _msg(b"body\n")
    try:
        maildir.deliver(str(md), fd, HEAD)
    finally:
        os.close(fd)
    assert os.stat(md / "new").st_ino in synced


def test_fsync_dirs_reports_a_missing_directory(tmp_path: Path) -> None:
    md = _md(tmp_path / "M")
    err = maildir.fsync_dirs([os.fsencode(md / "new"), os.fsencode(tmp_path / "gone" / "new")])
    assert isinstance(err, FileNotFoundError)


def test_ordered_journal_writes_the_file_out_and_fsyncs_new_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the journal keeps order the file is written out, not fsynced, before the
    link, and new/'s fsync after the link is the delivery's one commit; deferred, the
    delivery fsyncs nothing. A failed write-out is a temporary failure leaving nothing."""
    md = _md(tmp_path / "M")
    events: list[tuple[str, int, int]] = []  # (what, inode, entries in new/)
    real_out, real_fsync = maildir.write_out, os.fsync

    def write_out(fd: int) -> None:
        events.append(("out", os.fstat(fd).st_ino, len(os.listdir(md / "new"))))
        real_out(fd)

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino, len(os.listdir(md / "new"))))
        real_fsync(fd)

    monkeypatch.setattr(maildir, "ordered_journal", lambda fd: True)
    monkeypatch.setattr(maildir, "write_out", write_out)
    monkeypatch.setattr(os, "fsync", fsync)
    fd = _msg(b"body\n")
    try:
        maildir.deliver(str(md), fd, HEAD)
        (name,) = os.listdir(md / "new")
        assert events == [
            ("out", os.stat(md / "new" / name).st_ino, 0),
            ("fsync", os.stat(md / "new").st_ino, 1),
        ]
        events.clear()
        with maildir.deferred_dir_syncs() as dirs:
            maildir.deliver(str(md), fd, HEAD)
        assert [e[0] for e in events] == ["out"] and dirs == [os.fsencode(md / "new")]

        def broken(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(maildir, "write_out", broken)
        with pytest.raises(DeliveryFailure, match="Temporary error on maildir delivery"):
            maildir.deliver(str(md), fd, HEAD)
    finally:
        os.close(fd)
    assert len(os.listdir(md / "new")) == 2 and os.listdir(md / "tmp") == []
