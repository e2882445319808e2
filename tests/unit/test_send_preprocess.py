"""send/preprocess.py: todo/N -> info/local/remote in a batch, with the real queue layout."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.queue.layout import QueuePaths
from pyqmail.send.log import SendLog
from pyqmail.send.preprocess import preprocess_batch
from pyqmail.send.todo import Routing
from tests.conftest import write_control


@pytest.fixture
def setup(home: Home) -> tuple[QueuePaths, Routing]:
    write_control(home, "locals", "mx.test.example\ntest.example\n")
    return QueuePaths(home.queue), Routing.from_control(load(home))


def todo(paths: QueuePaths, num: int, envelope: bytes, body: bytes = b"Subject: x\n\nx\n") -> None:
    """A queued message as qmail-queue leaves it: mess/S/N, intd/N and todo/N."""
    Path(paths.name("mess", num)).write_bytes(body)
    Path(paths.name("intd", num)).write_bytes(envelope)
    os.link(paths.name("intd", num), paths.name("todo", num))


def batch(paths: QueuePaths, routing: Routing, nums: list[int], **kw: object) -> list:  # type: ignore[type-arg]
    log = io.BytesIO()
    args = {"direct_budget": 0, "clean_todo": True, "log": SendLog(log)} | kw
    return preprocess_batch(paths, nums, routing, **args)  # type: ignore[arg-type]


def test_local_and_remote_files_written_then_todo_removed(
    setup: tuple[QueuePaths, Routing],
) -> None:
    paths, routing = setup
    todo(paths, 101, b"u7\0p42\0Fjoe@test.example\0Talice@test.example\0Tbob@far.example\0")
    (pre,) = batch(paths, routing, [101])
    assert (pre.num, pre.sender, pre.qp, pre.uid, pre.channels) == (
        101, "joe@test.example", 42, 7, 0b11,
    )  # fmt: skip
    assert pre.size == len(b"Subject: x\n\nx\n") and not pre.warning and pre.direct is None
    assert Path(paths.name("info", 101)).read_bytes() == b"Fjoe@test.example\0"
    assert Path(paths.name("local", 101)).read_bytes() == b"Talice@test.example\0"
    assert Path(paths.name("remote", 101)).read_bytes() == b"Tbob@far.example\0"
    assert not os.path.exists(paths.name("todo", 101))
    assert not os.path.exists(paths.name("intd", 101))


def test_todo_stays_when_a_cleaner_removes_it(setup: tuple[QueuePaths, Routing]) -> None:
    paths, routing = setup
    todo(paths, 102, b"u7\0p42\0Fjoe@test.example\0Tbob@far.example\0")
    (pre,) = batch(paths, routing, [102], clean_todo=False)
    assert pre.channels == 0b10 and os.path.exists(paths.name("todo", 102))


def test_leftovers_of_an_earlier_attempt_are_replaced(setup: tuple[QueuePaths, Routing]) -> None:
    paths, routing = setup
    todo(paths, 103, b"u7\0p42\0Fjoe@test.example\0Tbob@far.example\0")
    Path(paths.name("info", 103)).write_bytes(b"Fold\0")
    Path(paths.name("local", 103)).write_bytes(b"Told@test.example\0")
    (pre,) = batch(paths, routing, [103])
    assert not pre.warning and pre.channels == 0b10
    assert Path(paths.name("info", 103)).read_bytes() == b"Fjoe@test.example\0"
    assert not os.path.exists(paths.name("local", 103))


def test_direct_delivery_writes_nothing_and_keeps_todo(setup: tuple[QueuePaths, Routing]) -> None:
    paths, routing = setup
    todo(paths, 104, b"u7\0p42\0Fjoe@test.example\0Talice@test.example\0")
    todo(paths, 105, b"u7\0p43\0Fjoe@test.example\0Tann@test.example\0")
    first, second = batch(paths, routing, [104, 105], direct_budget=1)
    assert first.direct == ["alice@test.example"] and first.channels == 0
    assert not os.path.exists(paths.name("info", 104))
    assert os.path.exists(paths.name("todo", 104))
    assert second.direct is None and second.channels == 0b01  # the budget was used up


def test_a_missing_todo_is_dropped_and_a_bad_one_warned(setup: tuple[QueuePaths, Routing]) -> None:
    paths, routing = setup
    todo(paths, 106, b"u7\0p42\0Fjoe@test.example\0Xodd\0")
    (pre,) = batch(paths, routing, [106, 107])  # 107 has no todo: a scan raced a notify
    assert pre.num == 106 and "unknown record type" in pre.warning
    assert os.path.exists(paths.name("todo", 106))
    assert not os.path.exists(paths.name("info", 106))


def test_a_batch_is_fsynced_together_before_any_todo_goes(
    setup: tuple[QueuePaths, Routing], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: every info and channel file of the batch is written before the first
    fsync (so one journal commit covers them), and all are synced before any todo/N goes."""
    paths, routing = setup
    nums = [201, 202, 203]
    for n in nums:
        todo(paths, n, b"u7\0p42\0Fjoe@test.example\0Talice@test.example\0Tbob@far.example\0")
    real_fsync = os.fsync
    seen: list[tuple[int, int]] = []  # (files written so far, todos left) at each fsync

    def fsync(fd: int) -> None:
        written = sum(os.path.exists(paths.name(k, n)) for n in nums for k in ("info", "local"))
        seen.append((written, len(os.listdir(paths.dir("todo")))))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    pres = batch(paths, routing, nums)
    assert [p.channels for p in pres] == [0b11] * 3 and not any(p.warning for p in pres)
    assert len(seen) >= 9  # 3 files per message, then the directories
    assert all(written == 6 and left == 3 for written, left in seen[:9])
    assert os.listdir(paths.dir("todo")) == []


def test_a_file_that_cannot_be_synced_keeps_its_todo_alone(
    setup: tuple[QueuePaths, Routing], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, routing = setup
    for n in (211, 212):
        todo(paths, n, b"u7\0p42\0Fjoe@test.example\0Talice@test.example\0")
    real_fsync = os.fsync
    bad: list[int] = []
    real_open = os.open

    def open_(path: str, *a: object, **kw: object) -> int:
        fd = real_open(path, *a, **kw)  # type: ignore[arg-type]
        if str(path) == paths.name("local", 212):
            bad.append(fd)
        return fd

    def fsync(fd: int) -> None:
        if fd in bad:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    good, failed = batch(paths, routing, [211, 212])
    assert not good.warning and "trouble fsyncing message 212" in failed.warning
    assert sorted(os.listdir(paths.dir("todo"))) == ["212"]
    assert os.path.exists(paths.name("local", 211))
    assert not os.path.exists(paths.name("info", 212))
    assert not os.path.exists(paths.name("local", 212))
