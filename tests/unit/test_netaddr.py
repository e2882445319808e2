"""netaddr: loopback, and the key the per-client connection limits count under."""

from __future__ import annotations

import pytest

from pyqmail.netaddr import is_loopback, limit_key


@pytest.mark.parametrize(
    ("ip", "loop"),
    [("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("::ffff:127.0.0.5", True),
     ("128.0.0.1", False), ("192.0.2.7", False), ("::2", False), ("fd00::1", False),
     ("::ffff:192.0.2.1", False), ("unknown", False), ("", False)],
)  # fmt: skip
def test_is_loopback(ip: str, loop: bool) -> None:
    assert is_loopback(ip) is loop


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped counts as the IPv4 client
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:0db8:0001:0002:0:0:0:9", "2001:db8:1:2::/64"),  # spelled out, same key
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%lo", "fe80::/64"),
        ("unknown", "unknown"),
    ],
)
def test_limit_key(ip: str, key: str) -> None:
    assert limit_key(ip) == key


def test_one_64_is_one_key_and_the_next_is_another() -> None:
    keys = {limit_key(f"2001:db8:0:7::{i:x}") for i in range(1, 1000)}
    assert keys == {"2001:db8:0:7::/64"}
    assert limit_key("2001:db8:0:8::1") not in keys
    assert len({limit_key(f"192.0.2.{i}") for i in range(1, 100)}) == 99
