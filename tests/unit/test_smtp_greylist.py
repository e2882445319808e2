"""smtp/greylist.py: the triplet database, with an injected clock (no waiting)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.smtp.greylist import PENDING_TTL, Greylist, greylist_path, network, prepare_dir


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def grey(tmp_path: Path, clock: Clock, **kw: float) -> Greylist:
    return Greylist(tmp_path / "g" / "greylist.sqlite", 300, clock=clock, **kw)  # type: ignore[arg-type]


def test_new_triplet_waits_the_delay_then_passes(tmp_path: Path) -> None:
    c = Clock()
    g = grey(tmp_path, c)
    assert not g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    assert not g.check("192.0.2.7", b"a@b.example", b"x@test.example")  # retried at once
    c.now += 299
    assert not g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    c.now += 1
    assert g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    c.now += 86400 * 3  # a passed triplet keeps passing
    assert g.check("192.0.2.7", b"A@B.example", b"X@test.example")  # case does not matter


def test_each_part_of_the_triplet_counts(tmp_path: Path) -> None:
    c = Clock()
    g = grey(tmp_path, c)
    g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    c.now += 300
    assert g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    assert g.check("192.0.2.200", b"a@b.example", b"x@test.example")  # same /24
    assert not g.check("192.0.3.7", b"a@b.example", b"x@test.example")
    assert not g.check("192.0.2.7", b"other@b.example", b"x@test.example")
    assert not g.check("192.0.2.7", b"a@b.example", b"postmaster@test.example")


def test_network_is_a_slash_24_or_a_slash_64() -> None:
    assert network("192.0.2.7") == "192.0.2.0/24"
    assert network("::ffff:192.0.2.7") == "192.0.2.0/24"
    assert network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network("unknown") == "unknown"


def test_a_pending_triplet_is_forgotten_after_a_day(tmp_path: Path) -> None:
    c = Clock()
    g = grey(tmp_path, c)
    g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    c.now += PENDING_TTL + 1
    assert not g.check("192.0.2.7", b"a@b.example", b"x@test.example")  # waits again
    c.now += 300
    assert g.check("192.0.2.7", b"a@b.example", b"x@test.example")


def test_a_passed_triplet_expires_when_unseen(tmp_path: Path) -> None:
    c = Clock()
    g = grey(tmp_path, c, expire=1000)
    g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    c.now += 300
    assert g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    c.now += 1001
    assert not g.check("192.0.2.7", b"a@b.example", b"x@test.example")


def test_the_database_stays_bounded_under_a_flood_of_new_triplets(tmp_path: Path) -> None:
    c = Clock()
    g = grey(tmp_path, c, max_rows=100, sweep_every=1e9)
    for i in range(500):
        c.now += 0.001
        g.check("192.0.2.7", b"spam%d@b.example" % i, b"x@test.example")
        assert g.rows() <= 110
    # the newest triplets are the ones kept
    c.now += 300
    assert g.check("192.0.2.7", b"spam499@b.example", b"x@test.example")


def test_expired_rows_are_swept(tmp_path: Path) -> None:
    c = Clock()
    g = grey(tmp_path, c, sweep_every=60)
    for i in range(20):
        g.check("192.0.2.7", b"s%d@b.example" % i, b"x@test.example")
    assert g.rows() == 20
    c.now += PENDING_TTL + 1
    g.check("192.0.2.7", b"new@b.example", b"x@test.example")
    assert g.rows() == 1


def test_the_file_is_the_owners_alone(tmp_path: Path) -> None:
    g = grey(tmp_path, Clock())
    g.check("192.0.2.7", b"a@b.example", b"x@test.example")
    assert stat.S_IMODE(g.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(g.path.parent.stat().st_mode) == 0o700


def test_a_database_error_lets_mail_through_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "g").write_text("a file where the directory should be\n")
    g = grey(tmp_path, Clock())
    with caplog.at_level(logging.WARNING, "pyqmail.smtpd"):
        assert g.check("192.0.2.7", b"a@b.example", b"x@test.example")
        assert g.check("192.0.2.7", b"a@b.example", b"y@test.example")
    assert len([r for r in caplog.records if "greylist" in r.getMessage()]) == 1


def test_a_corrupt_database_lets_mail_through(tmp_path: Path) -> None:
    path = tmp_path / "g" / "greylist.sqlite"
    path.parent.mkdir()
    path.write_bytes(b"this is not a database" * 100)
    g = Greylist(path, 300)
    assert g.check("192.0.2.7", b"a@b.example", b"x@test.example")


def test_the_database_lives_under_the_home(home: Home) -> None:
    assert greylist_path(home) == home.root / "greylist" / "greylist.sqlite"
    assert (home.root / "greylist").is_dir()  # pyqmail init made it


def test_prepare_dir_makes_the_smtp_accounts_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("prepare_dir is root's job: run this test as root")
    h = Home(tmp_path / "q", single_user=False)
    h.root.mkdir(mode=0o755)
    prepare_dir(h, 1234, 5678)
    st = (h.root / "greylist").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o700)
    prepare_dir(h, 1, 1)  # already there: left as it is
    assert (h.root / "greylist").stat().st_uid == 1234


def test_prepare_dir_refuses_a_home_others_may_write(tmp_path: Path) -> None:
    h = Home(tmp_path / "q", single_user=False)
    h.root.mkdir()
    h.root.chmod(0o777)
    with pytest.raises(OSError, match="not root's alone"):
        prepare_dir(h, 1234, 5678)
    assert not (h.root / "greylist").exists()
