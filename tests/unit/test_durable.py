"""durable.py: write_out and ordered_journal where no file system is mounted for them
(the real ext4 cases, power loss included, are tests/integration/test_ordered_journal.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyqmail import durable


def test_write_out_writes_and_reports_a_bad_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"data\n")
        durable.write_out(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"data\n"
    with pytest.raises(OSError) as e:
        durable.write_out(fd)  # closed
    assert e.value.errno == errno.EBADF


def test_write_out_falls_back_to_fsync_without_sync_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(durable, "_sfr", None)
    monkeypatch.setattr(durable, "_sfr_missing", True)
    monkeypatch.setattr(os, "fsync", synced.append)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        durable.write_out(fd)
    finally:
        os.close(fd)
    assert synced == [fd]


def test_ordered_journal_says_no_where_it_cannot_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not durable.ordered_journal("/proc")  # not ext4
    assert not durable.ordered_journal(tmp_path / "missing")
    assert not durable.ordered_journal(-1)  # a bad descriptor
    monkeypatch.setenv("PYQMAIL_ORDERED_JOURNAL", "no")
    monkeypatch.setattr(durable, "_ordered_dev", lambda dev, fsid: True)
    assert not durable.ordered_journal(tmp_path)
    monkeypatch.delenv("PYQMAIL_ORDERED_JOURNAL")
    assert durable.ordered_journal(tmp_path)


def test_start_write_out_starts_and_never_waits_for_a_missing_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kick writes nothing itself and is silent where sync_file_range is missing."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"data\n")
        durable.start_write_out(fd)
        synced: list[int] = []
        monkeypatch.setattr(durable, "_sfr", None)
        monkeypatch.setattr(durable, "_sfr_missing", True)
        monkeypatch.setattr(os, "fsync", synced.append)
        durable.start_write_out(fd)
        assert synced == []  # no fsync in its place: a kick only
    finally:
        os.close(fd)
    assert path.read_bytes() == b"data\n"
