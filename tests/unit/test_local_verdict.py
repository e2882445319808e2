"""local/verdict.py and send/rcptverdict.py: the RCPT check's answer is local delivery's.

The table runs every address through both: the check (RecipientVerdicts) and a real
local delivery (routing, users.resolve and qlocal.deliver into real files), and the two
must say the same: delivered, bounced or deferred.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.local import qlocal, users
from pyqmail.local.verdict import CachedVerdicts, LocalVerdicts, mailbox_status, would_deliver
from pyqmail.outcome import Outcome, Status
from pyqmail.send.rcptverdict import RecipientVerdicts, guarded
from pyqmail.send.schedule import LOCAL
from pyqmail.send.todo import Routing
from tests.conftest import is_root, require, write_control

OK, PERM, TEMP = Status.OK, Status.PERM, Status.TEMP


def _maildir(d: Path) -> None:
    for sub in ("", "/tmp", "/new", "/cur"):
        os.makedirs(f"{d}/Maildir{sub}", 0o700, exist_ok=True)


@pytest.fixture
def site(home: Home, tmp_path: Path) -> Home:
    """The acceptance check's site, plus a writable .qmail and a sticky home."""
    write_control(home, "locals", "test.example\n")
    write_control(home, "virtualdomains", "virt.example:alice\nghost.example:ghost\n")
    write_control(home, "defaultdelivery", "./Maildir/\n")
    alice, bob, carol = tmp_path / "alice", tmp_path / "bob", tmp_path / "carol"
    for d in (alice, bob, carol):
        d.mkdir(mode=0o755)
        _maildir(d)
    (alice / ".qmail-lists").write_text("./Maildir/\n")
    (alice / ".qmail-shop-default").write_text("./Maildir/\n")
    (alice / ".qmail-open").write_text("./Maildir/\n")
    (alice / ".qmail-open").chmod(0o666)  # world-writable: qmail-local defers
    (alice / ".qmail-dir").mkdir()  # not a regular file: "does not exist"
    (bob / ".qmail-default").write_text("./Maildir/\n")
    carol.chmod(0o1755)  # sticky: the user is editing: deferred
    _maildir(home.alias)
    (home.alias / ".qmail-sales").write_text("./Maildir/\n")
    u, g = os.getuid(), os.getgid()
    lines = [
        f"{k}{n}{s}:{n}:{u}:{g}:{d}:{dash}::"
        for n, d in (("alice", alice), ("bob", bob), ("carol", carol))
        for k, s, dash in (("=", "", ""), ("+", "-", "-"))
    ]
    (home.users / "assign").write_text("\n".join(lines) + "\n.\n")
    users.newu(home)
    return home


TABLE = [
    ("alice@test.example", OK, "user in users/assign, no .qmail: defaultdelivery"),
    ("nosuchuser42@test.example", PERM, "no such user, no alias .qmail"),
    ("alice-lists@test.example", OK, ".qmail-lists"),
    ("Alice-Lists@Test.Example", OK, "other case"),
    ("alice-nolist@test.example", PERM, "no .qmail-nolist, no .qmail-default"),
    ("alice-shop-blue@test.example", OK, ".qmail-shop-default"),
    ("alice-shop-blue-x@test.example", OK, ".qmail-shop-default catches below it"),
    ("alice-shop@test.example", PERM, ".qmail-shop-default does not catch .qmail-shop"),
    ("alice-dir@test.example", PERM, "a directory is no .qmail file"),
    ("alice-open@test.example", TEMP, "world-writable .qmail: deferred, never bounced"),
    ("bob@test.example", OK, "user without .qmail"),
    ("bob-anything-else@test.example", OK, ".qmail-default"),
    ("carol@test.example", TEMP, "sticky home: deferred"),
    ("sales@test.example", OK, "alias/.qmail-sales"),
    ("SALES@test.example", OK, "alias, other case"),
    ("postmaster@test.example", OK, "alias/.qmail-postmaster"),
    ("nosales@test.example", PERM, "no alias/.qmail-nosales"),
    ("lists@virt.example", OK, "virtualdomain prefix alice-, .qmail-lists"),
    ("shop-x@virt.example", OK, "virtualdomain prefix, .qmail-shop-default"),
    ("nope@virt.example", PERM, "virtualdomain prefix, nothing"),
    ("any@ghost.example", PERM, "virtualdomain prefix to no user"),
]


def _deliver(home: Home, address: str) -> Status:
    """A real local delivery of ``address``, as the worker pool does it."""
    ctl = load(home)
    channel, stored = Routing.from_control(ctl).route(address)
    assert channel == LOCAL
    at = stored.rfind("@")
    local, domain = stored[:at], stored[at + 1 :]
    try:
        info = users.resolve(home, local)
    except users.UserError:
        return TEMP
    req = qlocal.Request(
        info.user, info.home, local, info.dash, info.ext, domain, "s@x.example", ctl.defaultdelivery
    )
    with tempfile.TemporaryFile() as msg:
        msg.write(b"Subject: t\n\nbody\n")
        msg.flush()
        return qlocal.deliver(req, msg.fileno(), home).status


@pytest.mark.parametrize(("address", "want", "why"), TABLE)
def test_check_and_delivery_agree(site: Home, address: str, want: Status, why: str) -> None:
    check = RecipientVerdicts(LocalVerdicts(site)).verdict(load(site), address)
    assert check is not None, why
    assert check.status is want, why
    assert _deliver(site, address) is want, why


def test_remote_addresses_are_not_answered(site: Home) -> None:
    rv = RecipientVerdicts(LocalVerdicts(site))
    assert rv.verdict(load(site), "someone@elsewhere.example") is None
    assert rv.local_part(load(site), "x@virt.example") == "alice-x"


def test_same_outcome_for_missing_user_and_missing_dotqmail(site: Home) -> None:
    a = would_deliver(site, "nosuchuser42")
    b = would_deliver(site, "alice-nolist")
    assert a == b == Outcome.perm("Sorry, no mailbox here by that name. (#5.1.1)")


def test_empty_local_part_is_the_trash_address(site: Home) -> None:
    assert would_deliver(site, "").status is OK


def test_unreadable_users_cdb_defers(site: Home) -> None:
    (site.users / "cdb").write_bytes(b"not a cdb")
    assert would_deliver(site, "alice").status is TEMP


NOBODY = 65534


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is root's, mode 0700)."""
    top = Path(tempfile.mkdtemp(prefix="pyqmail-verdict-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top)


def _as_nobody(answers: Callable[[], list[Status]]) -> str:
    """Run ``answers`` in a child that has become nobody; its statuses' letters."""
    require(is_root(), "root, to become another uid", "run the tests as root (CI does)")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(w, "".join(st.value for st in answers()).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    os.close(r)
    return got


def test_dotqmail_unreadable_by_the_user_defers_not_bounces(public: Path) -> None:
    """Run as the user (root mode's lookup child does): a .qmail it may not open is a
    temporary failure (qmail-local's EACCES rule), never a 550; one it may is found."""
    d = public / "dave"
    d.mkdir(mode=0o755)
    (d / ".qmail-x").write_text("./Maildir/\n")
    (d / ".qmail-x").chmod(0o000)
    (d / ".qmail-y").write_text("./Maildir/\n")
    os.chown(d, NOBODY, NOBODY)
    x = users.UserInfo("dave", NOBODY, NOBODY, str(d), "-", "x")
    y = users.UserInfo("dave", NOBODY, NOBODY, str(d), "-", "y")
    z = users.UserInfo("dave", NOBODY, NOBODY, str(d), "-", "z")
    got = _as_nobody(lambda: [mailbox_status(i).status for i in (x, y, z)])
    assert got == TEMP.value + OK.value + PERM.value
    assert mailbox_status(x).status is OK  # root reads it: it exists


def test_guarded_accepts_what_it_may_not_look_at(public: Path) -> None:
    """qmail-smtpd as qmaild (neither root nor the user): a private home is no refusal;
    a missing mailbox in a home it can see still is."""
    (public / "erin").mkdir(mode=0o700)
    os.chown(public / "erin", 65533, 65533)
    (public / "frank").mkdir(mode=0o755)
    private = users.UserInfo("erin", 65533, 65533, str(public / "erin"), "-", "x")
    seen = users.UserInfo("frank", 0, 0, str(public / "frank"), "-", "x")
    got = _as_nobody(
        lambda: [guarded(private).status, mailbox_status(private).status, guarded(seen).status]
    )
    assert got == OK.value + TEMP.value + PERM.value


def test_cache_answers_per_lowercased_local_part_for_its_ttl(site: Home, tmp_path: Path) -> None:
    lv = LocalVerdicts(site)
    asked: list[str] = []

    class Counting:
        def verdict(self, local: str) -> Outcome:
            asked.append(local)
            return lv.verdict(local)

    cache = CachedVerdicts(Counting(), ttl=0.2)
    assert cache.verdict("alice-new").status is PERM
    (tmp_path / "alice" / ".qmail-new").write_text("./Maildir/\n")
    assert cache.verdict("Alice-NEW").status is PERM  # cached: same key, within the ttl
    assert asked == ["alice-new"]
    time.sleep(0.25)
    assert cache.verdict("alice-new").status is OK  # the new .qmail counts after the ttl
    assert len(asked) == 2


def test_answers_now_unless_another_process_must_be_asked(site: Home) -> None:
    class Elsewhere:
        def answers_now(self, local: str) -> bool:
            return False

        def verdict(self, local: str) -> Outcome:
            return Outcome.ok("")

    assert LocalVerdicts(site).answers_now("alice")
    cache = CachedVerdicts(Elsewhere())
    assert not cache.answers_now("alice")
    cache.verdict("alice")
    assert cache.answers_now("ALICE")  # kept: answered without the other process
    rv = RecipientVerdicts(cache)
    assert rv.answers_now(load(site), "alice@test.example")
    assert not rv.answers_now(load(site), "bob@test.example")
    assert rv.answers_now(load(site), "x@elsewhere.example")  # not local: nothing to ask


# --- SRS addresses (docs/srs.md): the check and delivery agree there too ----------------


def test_srs_addresses_check_and_delivery_agree(site: Home) -> None:
    from pyqmail import srs

    secret = "verdict-secret-0123456789"
    write_control(site, "srs", f"{secret}\ntest.example\n")
    config = srs.Srs((secret.encode(),), "test.example")
    good = config.forward("bob@example.org")
    forged = good.replace("=bob@", "=mallory@")
    old = config.forward("bob@example.org", time.time() - 40 * 86400)
    ctl = load(site)
    verdicts = RecipientVerdicts(LocalVerdicts(site))
    (site.alias / ".qmail-default").write_text("./Maildir/\n")  # would take anything
    for address, want in ((good, OK), (good.lower(), OK), (forged, PERM), (old, PERM)):
        got = verdicts.verdict(ctl, address)
        assert got is not None and got.status is want, address
    # a forged one is refused by delivery too (a good one is forwarded: the SRS tests)
    assert _deliver(site, forged) is PERM


def test_srs_unreadable_leaves_it_to_delivery(site: Home) -> None:
    def denied() -> bytes:
        raise PermissionError(13, "denied")

    v = LocalVerdicts(site, srs_source=denied)
    assert v.verdict("SRS0=abcd=XY=example.org=bob").status is OK
    (site.alias / ".qmail-default").unlink(missing_ok=True)
    assert v.verdict("nosuchuser42").status is PERM  # no SRS: the ordinary lookup
