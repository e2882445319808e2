"""remote/tcpto.py: qmail's 1024-byte table and its rules."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyqmail.remote.tcpto import SIZE, Entry, Tcpto, format_entries, parse


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def table(tmp_path: Path, t: float = 1_000_000, pid: int = 0) -> tuple[Tcpto, Clock]:
    p = tmp_path / "tcpto"
    p.write_bytes(bytes(SIZE))
    clock = Clock(t)
    return Tcpto(p, clock=clock, pid=pid), clock


def test_record_byte_format(tmp_path: Path) -> None:
    t, _ = table(tmp_path)
    t.record("192.0.2.9", True)
    data = t.path.read_bytes()
    assert len(data) == SIZE
    assert data[:16] == bytes([192, 0, 2, 9, 1, 0, 0, 0]) + struct.pack("<I", 1_000_000) + bytes(4)
    assert data[16:] == bytes(SIZE - 16)


def test_two_timeouts_120s_apart_mark_down_until_interval(tmp_path: Path) -> None:
    t, clock = table(tmp_path, pid=0)  # interval (60 + 0) * 64 = 3840 s
    t.record("192.0.2.9", True)
    assert not t.is_down("192.0.2.9")
    clock.t += 60
    t.record("192.0.2.9", True)  # within 120 s of the last: not counted
    assert parse(t.path.read_bytes()) == [Entry("192.0.2.9", 1, 1_000_000)]
    clock.t += 100
    t.record("192.0.2.9", True)
    assert parse(t.path.read_bytes())[0].count == 2
    assert t.is_down("192.0.2.9")
    clock.t += 3839
    assert t.is_down("192.0.2.9")
    clock.t += 1
    assert not t.is_down("192.0.2.9")


def test_pid_spreads_the_interval(tmp_path: Path) -> None:
    t, clock = table(tmp_path, pid=31)  # (60 + 31) * 64 = 5824 s
    t.record("192.0.2.9", True)
    clock.t += 200
    t.record("192.0.2.9", True)
    clock.t += 5823
    assert t.is_down("192.0.2.9")
    clock.t += 1
    assert not t.is_down("192.0.2.9")


def test_success_resets_count(tmp_path: Path) -> None:
    t, clock = table(tmp_path)
    t.record("192.0.2.9", True)
    clock.t += 200
    t.record("192.0.2.9", True)
    other = Tcpto(t.path, clock=clock)
    other.record("192.0.2.9", False)  # not seen by this process's check: untouched (qmail)
    assert parse(t.path.read_bytes())[0].count == 2
    assert other.is_down("192.0.2.9")
    other.record("192.0.2.9", False)
    assert parse(t.path.read_bytes()) == []
    assert not t.is_down("192.0.2.9")


def test_count_caps_at_ten(tmp_path: Path) -> None:
    t, clock = table(tmp_path)
    for _ in range(15):
        t.record("192.0.2.9", True)
        clock.t += 121
    assert parse(t.path.read_bytes())[0].count == 10


def test_full_table_evicts_smallest_when_plus_count(tmp_path: Path) -> None:
    t, clock = table(tmp_path)
    for i in range(64):
        t.record(f"10.0.0.{i}", True)
        clock.t += 1
    # 10.0.0.0 has the oldest time and count 1: it goes
    t.record("10.0.1.1", True)
    ips = [e.ip for e in parse(t.path.read_bytes())]
    assert "10.0.0.0" not in ips and "10.0.1.1" in ips and len(ips) == 64


def test_ipv6_and_missing_file_are_ignored(tmp_path: Path) -> None:
    t, _ = table(tmp_path)
    t.record("::1", True)
    assert t.path.read_bytes() == bytes(SIZE)
    gone = Tcpto(tmp_path / "missing")
    gone.record("192.0.2.1", True)
    assert not gone.is_down("192.0.2.1")


def test_clear_and_format(tmp_path: Path) -> None:
    t, clock = table(tmp_path)
    t.record("192.0.2.9", True)
    clock.t += 200
    t.record("192.0.2.9", True)
    assert format_entries(t.path.read_bytes(), int(clock.t) + 5) == (
        "192.0.2.9 timed out 5 seconds ago; # recent timeouts: 2\n"
    )
    t.clear()
    assert t.path.read_bytes() == bytes(SIZE)


def test_a_symlink_in_place_of_the_table_is_never_followed(tmp_path: Path) -> None:
    # lock/ is the queue owner's; qmail-tcpok and qmail-tcpto may run as root
    victim = tmp_path / "victim"
    victim.write_bytes(b"\x7f\0\0\x01\x05" + b"x" * (SIZE - 5))
    link = tmp_path / "tcpto"
    link.symlink_to(victim)
    t = Tcpto(link)
    with pytest.raises(OSError):
        t.clear()
    t.record("127.0.0.1", True)
    assert not t.is_down("127.0.0.1")
    with pytest.raises(OSError):
        t.entries()
    assert victim.read_bytes() == b"\x7f\0\0\x01\x05" + b"x" * (SIZE - 5)
