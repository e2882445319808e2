"""smtp/authlimit.py: failures per network in a window, the delay they give, the stores
(in memory for the listener, sqlite for qmail-smtpd processes) and failing open."""

from __future__ import annotations

from pathlib import Path

from pyqmail.smtp.authlimit import AuthPolicy, FileFailures, MemoryFailures


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


POLICY = AuthPolicy(max_failures=3, window=60, step=1.5, max_delay=4)


def test_memory_store_counts_per_ipv4_address_and_ipv6_64() -> None:
    clock = Clock()
    f = MemoryFailures(POLICY, clock=clock)
    assert [f.failed("192.0.2.1") for _ in range(4)] == [1.5, 3.0, 4, 4]
    assert f.blocked("192.0.2.1") and not f.blocked("192.0.2.2")
    f.failed("2001:db8:0:1::5")
    f.failed("2001:db8:0:1:ffff::9")
    f.failed("2001:db8:0:1::7")
    assert f.blocked("2001:db8:0:1::1") and not f.blocked("2001:db8:0:2::1")
    clock.now += 61
    assert f.count("192.0.2.1") == 0 and not f.blocked("2001:db8:0:1::1")


def test_memory_store_is_bounded() -> None:
    f = MemoryFailures(POLICY, max_keys=10)
    for i in range(100):
        f.failed(f"198.51.100.{i}")
    assert len(f._seen) == 10
    assert f.count("198.51.100.99") == 1 and f.count("198.51.100.0") == 0


def test_file_store_is_shared_between_processes_view(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "authfail.sqlite"
    a = FileFailures(path, POLICY, clock=clock)
    b = FileFailures(path, POLICY, clock=clock)  # another qmail-smtpd
    assert a.failed("192.0.2.1") == 1.5
    assert b.failed("192.0.2.1") == 3.0
    assert not a.blocked("192.0.2.1")
    b.failed("192.0.2.1")
    assert a.blocked("192.0.2.1") and not a.blocked("192.0.2.9")
    clock.now += 61
    assert not b.blocked("192.0.2.1")
    a.failed("192.0.2.5")  # the old rows are swept
    assert b.count("192.0.2.1") == 0
    a.close()
    b.close()


def test_file_store_fails_open_to_the_connection_alone(tmp_path: Path) -> None:
    f = FileFailures(tmp_path / "missing-dir" / "authfail.sqlite", POLICY)
    assert f.failed("192.0.2.1") == 1.5  # no database: this connection's own count
    assert f.failed("192.0.2.1") == 3.0
    assert not FileFailures(tmp_path / "missing-dir" / "x", POLICY).blocked("192.0.2.1")
