"""The LocalSpawner: a forked spawner process, one child per delivery, uid drops."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.local import users
from pyqmail.local.spawn import BOOT, CHECK_SOURCE, LocalSpawner
from pyqmail.outcome import Outcome, Status
from tests.conftest import is_root, process_gone, require_tools

MSG = b"Subject: hi\n\nbody\n"


def _run(sp: LocalSpawner, coro_fn):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        try:
            return await coro_fn()
        finally:
            await sp.close()

    return asyncio.run(main())


@pytest.fixture
def mess(tmp_path: Path) -> Path:
    p = tmp_path / "mess"
    p.write_bytes(MSG)
    return p


@pytest.fixture
def pub() -> Iterator[Path]:
    """A directory every uid can traverse (tmp_path's parents are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="pyqmail-local-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _user_home(base: Path, name: str, uid: int | None = None) -> Path:
    h = base / name
    for sub in ("", "Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        (h / sub).mkdir(mode=0o700 if sub else 0o755)
    if uid is not None:
        for root, _dirs, files in os.walk(h):
            os.chown(root, uid, uid)
            for f in files:
                os.chown(os.path.join(root, f), uid, uid)
    return h


def _assign(home: Home, lines: list[str]) -> None:
    (home.users / "assign").write_text("".join(line + "\n" for line in lines) + ".\n")
    users.newu(home)


def test_single_user_deliveries(home: Home, mess: Path, pub: Path) -> None:
    joe = _user_home(pub, "joe")
    (joe / ".qmail-ext").write_text("./Maildir/\n")
    _assign(home, [f"+joe-:joe:{os.getuid()}:{os.getgid()}:{joe}:-::"])
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()

    async def go() -> list[Outcome]:
        return [
            await sp.deliver(mess, "s@x", "postmaster@mx.test.example"),
            await sp.deliver(mess, "s@x", "joe-ext@mx.test.example"),
            await sp.deliver(mess, "s@x", "joe-nothing@mx.test.example"),
            await sp.deliver(mess, "s@x", "nosuchuser@mx.test.example"),
            await sp.deliver(mess, "s@x", "@mx.test.example"),
            await sp.deliver(mess, "s@x", "no-at-sign"),
        ]

    got = _run(sp, go)
    assert got == [
        Outcome.ok("did 1+0+0\n"),
        Outcome.ok("did 1+0+0\n"),
        Outcome.perm("Sorry, no mailbox here by that name. (#5.1.1)\n"),
        Outcome.perm("Sorry, no mailbox here by that name. (#5.1.1)\n"),
        Outcome.ok(""),  # the trash address
        Outcome.perm("Sorry, address must include host name. (#5.1.3)\n"),
    ]
    (f,) = os.listdir(home.alias / "Maildir" / "new")
    assert (home.alias / "Maildir" / "new" / f).read_bytes() == (
        b"Return-Path: <s@x>\nDelivered-To: postmaster@mx.test.example\n" + MSG
    )
    (f,) = os.listdir(joe / "Maildir" / "new")
    assert (
        (joe / "Maildir" / "new" / f)
        .read_bytes()
        .startswith(b"Return-Path: <s@x>\nDelivered-To: joe-ext@mx.test.example\n")
    )


def test_defaultdelivery_from_control(home: Home, mess: Path, pub: Path) -> None:
    joe = _user_home(pub, "joe")
    _assign(home, [f"=joe:joe:{os.getuid()}:{os.getgid()}:{joe}:::"])
    (home.control / "defaultdelivery").write_text("./Mailbox\n")
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()
    assert _run(sp, lambda: sp.deliver(mess, "", "joe@h")) == Outcome.ok("did 1+0+0\n")
    assert (joe / "Mailbox").read_bytes().startswith(b"From MAILER-DAEMON ")


def test_message_checks(home: Home, mess: Path, tmp_path: Path) -> None:
    sp = LocalSpawner(home, ControlCache(home), message_owner=os.getuid() + 1)
    sp.start()

    async def go() -> list[Outcome]:
        return [
            await sp.deliver(mess, "s@x", "postmaster@h"),
            await sp.deliver(tmp_path / "missing", "s@x", "postmaster@h"),
        ]

    assert _run(sp, go) == [
        Outcome.temp("Sorry, message has wrong owner. (#4.3.5)\n"),
        Outcome.temp("qmail-spawn unable to open message. (#4.3.0)\n"),
    ]
    sp2 = LocalSpawner(home, ControlCache(home))
    sp2.start()
    assert _run(sp2, lambda: sp2.deliver(tmp_path, "s@x", "postmaster@h")) == Outcome.temp(
        "Sorry, message has wrong type. (#4.3.5)\n"
    )


def test_many_in_flight(home: Home, mess: Path) -> None:
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()

    async def go() -> list[Outcome]:
        return await asyncio.gather(*[sp.deliver(mess, "s@x", "root@h") for _ in range(60)])

    got = _run(sp, go)
    assert got == [Outcome.ok("did 1+0+0\n")] * 60
    assert len(os.listdir(home.alias / "Maildir" / "new")) == 60


@pytest.mark.parametrize("reuse", [True, False])
def test_a_new_dir_that_cannot_be_synced_makes_the_delivery_temporary(
    home: Home, mess: Path, reuse: bool
) -> None:
    """The new/ fsync comes after qmail-local's run (in a round of the identity's worker,
    or in the one-shot child itself), and nothing is reported delivered before it: here the
    user's own program moves the Maildir away in between, the fsync of the path the
    delivery used fails, and the delivery is a temporary failure, delivered again later
    (at least once), never a success whose entry may not be on disk."""
    (home.alias / ".qmail-moved").write_text("./Maildir/\n|mv Maildir Maildir.moved\n")
    sp = LocalSpawner(home, ControlCache(home), reuse=reuse)
    sp.start()

    async def go() -> list[Outcome]:
        moved = await sp.deliver(mess, "s@x", "moved@h")
        os.rename(home.alias / "Maildir.moved", home.alias / "Maildir")
        return [moved, await sp.deliver(mess, "s@x", "root@h")]

    assert _run(sp, go) == [
        Outcome.temp("Temporary error on maildir delivery. (#4.3.0)\n"),
        Outcome.ok("did 1+0+0\n"),
    ]
    assert len(os.listdir(home.alias / "Maildir" / "new")) == 2  # linked the first time too


def test_hanging_program_is_killed(home: Home, mess: Path) -> None:
    (home.alias / ".qmail-hang").write_text(
        "|sleep 300 & echo $! > bg.pid; echo $$ > fg.pid; sleep 300\n"
    )
    sp = LocalSpawner(home, ControlCache(home), program_timeout=1.0)
    sp.start()
    start = time.monotonic()
    got = _run(sp, lambda: sp.deliver(mess, "s@x", "hang@h"))
    assert time.monotonic() - start < 30
    assert got == Outcome.temp("Timeout on local delivery after 1 seconds. (#4.3.0)\n")
    for name in ("bg.pid", "fg.pid"):
        assert process_gone(int((home.alias / name).read_text()))


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("stop", ["kill -STOP $PPID", "kill -STOP $$ $PPID"])
def test_a_program_that_stops_its_worker_is_killed_and_the_slot_freed(
    home: Home, mess: Path, reuse: bool, stop: str
) -> None:
    """The limit is the spawner's: a program that stops the delivery process (which
    runs as the user) and itself still ends with the whole group killed, a deferral,
    and the spawner free for the next delivery."""
    (home.alias / ".qmail-stop").write_text(
        f"|echo before; sleep 300 & echo $! > bg.pid; echo $$ > fg.pid; {stop}; sleep 300\n"
    )
    sp = LocalSpawner(home, ControlCache(home), program_timeout=1.0, reuse=reuse)
    sp.start()
    start = time.monotonic()

    async def go() -> list[Outcome]:
        first = await sp.deliver(mess, "s@x", "stop@h")
        return [first, await sp.deliver(mess, "s@x", "root@h")]

    async def bounded() -> list[Outcome]:
        try:
            return await asyncio.wait_for(go(), 30)
        except TimeoutError:
            assert sp.pid is not None
            os.kill(sp.pid, signal.SIGKILL)  # lets close() return; the test fails anyway
            raise
        finally:
            await sp.close()

    got = asyncio.run(bounded())
    assert time.monotonic() - start < 30
    assert got == [
        Outcome.temp("before\nTimeout on local delivery after 1 seconds. (#4.3.0)\n"),
        Outcome.ok("did 1+0+0\n"),
    ]
    for name in ("bg.pid", "fg.pid"):
        assert process_gone(int((home.alias / name).read_text()))


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_100mb_of_program_output(home: Home, mess: Path) -> None:
    (home.alias / ".qmail-chatty").write_text("|head -c 100000000 /dev/zero | tr '\\0' x\n")
    (home.alias / ".qmail-quiet").write_text("|true\n")
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()

    async def go() -> tuple[Outcome, int, int]:
        # the baseline once the spawner has started up and delivered once (right after
        # start() it may still be loading Python: a few KB)
        assert (await sp.deliver(mess, "s@x", "quiet@h")).status is Status.OK
        assert sp.pid is not None
        before = _vm_hwm_kb(sp.pid)
        out = await sp.deliver(mess, "s@x", "chatty@h")
        return out, before, _vm_hwm_kb(sp.pid)

    out, before, after = _run(sp, go)
    assert out.status is Status.OK
    assert out.text == "x" * 2966 + "\nError report too long, sorry.\n"
    assert after - before < 20_000  # the spawner did not hold 100 MB


def test_background_process_holding_the_report_pipe(home: Home, mess: Path) -> None:
    (home.alias / ".qmail-bg").write_text("|sleep 60 & echo $! > bg.pid; echo started\n")
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()
    start = time.monotonic()
    try:
        got = _run(sp, lambda: sp.deliver(mess, "s@x", "bg@h"))
        assert time.monotonic() - start < 30
        assert got == Outcome.ok("started\ndid 0+0+1\n")
    finally:
        os.kill(int((home.alias / "bg.pid").read_text()), 9)


def test_deliver_after_close(home: Home, mess: Path) -> None:
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()

    async def go() -> Outcome:
        await sp.close()
        return await sp.deliver(mess, "s@x", "root@h")

    assert asyncio.run(go()).status is Status.TEMP


# --- as root, in multi-user mode: real uid drops -----------------------------------------

A_UID, B_UID = 40001, 40002


@pytest.fixture
def multi(home: Home) -> Home:
    return Home(home.root, single_user=False)


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
@pytest.mark.parametrize("reuse", [True, False])
def test_delivery_runs_as_the_recipient(multi: Home, mess: Path, pub: Path, reuse: bool) -> None:
    a = _user_home(pub, "a", A_UID)
    (a / ".qmail-ext").write_text(
        "./Maildir/\n|id -u > uid.out; id -g >> uid.out; id -G >> uid.out\n"
    )
    os.chown(a / ".qmail-ext", A_UID, A_UID)
    _assign(multi, [f"+a-:a:{A_UID}:{A_UID}:{a}:-::"])
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid(), reuse=reuse)
    sp.start()
    assert _run(sp, lambda: sp.deliver(mess, "s@x", "a-ext@h")) == Outcome.ok("did 1+0+1\n")
    (f,) = os.listdir(a / "Maildir" / "new")
    st = os.stat(a / "Maildir" / "new" / f)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (A_UID, A_UID, 0o600)
    assert (a / "uid.out").read_text().split() == [str(A_UID), str(A_UID), str(A_UID)]


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
@pytest.mark.parametrize("reuse", [True, False])
def test_user_a_cannot_write_where_only_b_may(
    multi: Home, mess: Path, pub: Path, reuse: bool
) -> None:
    a = _user_home(pub, "a", A_UID)
    b = _user_home(pub, "b", B_UID)
    (b / "Maildir").chmod(0o700)
    (a / ".qmail-maildir").write_text(f"{b}/Maildir/\n")
    (a / ".qmail-mbox").write_text(f"{b}/mbox\n")
    (a / ".qmail-prog").write_text(f"|touch {b}/owned\n")
    _assign(
        multi,
        [f"+a-:a:{A_UID}:{A_UID}:{a}:-::", f"+b-:b:{B_UID}:{B_UID}:{b}:-::"],
    )
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid(), reuse=reuse)
    sp.start()

    async def go() -> list[Outcome]:
        return [
            await sp.deliver(mess, "s@x", "a-maildir@h"),
            await sp.deliver(mess, "s@x", "a-mbox@h"),
            await sp.deliver(mess, "s@x", "a-prog@h"),
        ]

    got = _run(sp, go)
    assert got[0] == Outcome.temp("Unable to chdir to maildir. (#4.2.1)\n")
    assert got[1] == Outcome.temp(f"Unable to open {b}/mbox: access denied. (#4.2.1)\n")
    assert got[2].status is Status.TEMP and "Permission denied" in got[2].text  # from touch
    assert os.listdir(b / "Maildir" / "new") == []
    assert not (b / "mbox").exists() and not (b / "owned").exists()


@pytest.mark.parametrize("where", ["home/pyqmail.py", "home/select.py", "PYTHONPATH/select.py"])
def test_spawner_imports_nothing_from_home_or_pythonpath(
    home: Home, mess: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The spawner keeps root: a module planted in the qmail home (its cwd) or in a
    directory named by PYTHONPATH must not shadow pyqmail or the standard library."""
    marker = tmp_path / "imported"
    plant = home.root if where.startswith("home/") else tmp_path / "pp"
    plant.mkdir(exist_ok=True)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pp"))
    (plant / where.split("/")[1]).write_text(f"open({str(marker)!r}, 'w').close()\n")
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()
    assert _run(sp, lambda: sp.deliver(mess, "s@x", "root@h")) == Outcome.ok("did 1+0+0\n")
    assert not marker.exists()


def test_import_path_check(tmp_path: Path) -> None:
    ns: dict[str, Any] = {}
    exec(CHECK_SOURCE, ns)
    unsafe = ns["unsafe"]
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    d.chmod(0o755)
    assert unsafe(str(d / "sub")) is None
    assert unsafe(str(d / "missing")) is None  # nobody else may create it
    d.chmod(0o777)  # others may rename sub away and put their own in its place
    assert unsafe(str(d / "sub")) == str(d)
    assert unsafe(str(d / "missing")) == str(d)
    d.chmod(0o1777)  # sticky: what root owns inside stays root's
    assert unsafe(str(d / "sub")) is None
    assert unsafe(str(d)) == str(d)  # but modules may be added to d itself
    assert unsafe(str(d / "missing")) == str(d)
    d.chmod(0o755)
    (d / "sub").chmod(0o775)
    assert unsafe(str(d / "sub")) == str(d / "sub")
    (d / "sub").chmod(0o755)
    if os.geteuid() == 0:
        os.chown(d / "sub", 65534, 65534)
        assert unsafe(str(d / "sub")) == str(d / "sub")


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="the check guards a root process")
@pytest.mark.parametrize("what", ["writable dir", "writable .pth", "foreign .pth"])
def test_boot_refuses_a_site_directory_others_can_write(tmp_path: Path, what: str) -> None:
    """A site-packages directory (or .pth file, which runs code) that another account
    could write is refused before anything in it runs."""
    site = tmp_path / "site"
    site.mkdir(mode=0o755)
    marker = tmp_path / "ran"
    pth = site / "evil.pth"
    pth.write_text(f"import os; open({str(marker)!r}, 'w').close()\n")
    pth.chmod(0o644)
    bad = pth
    if what == "writable dir":
        site.chmod(0o777)
        bad = site
    elif what == "writable .pth":
        pth.chmod(0o666)
    else:
        os.chown(pth, 65534, 65534)
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", BOOT, str(site), "3", "/nonexistent", "1"],
        capture_output=True, cwd="/", timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (
        111,
        f"qmail-lspawn: fatal: {bad} is writable by another account\n".encode(),
    )
    assert not marker.exists()


def _member_of_a_group() -> tuple[str, int]:
    """An account some group lists as a member (getgrouplist would add that group)."""
    for g in grp.getgrall():
        for name in g.gr_mem:
            with contextlib.suppress(KeyError):
                if pwd.getpwnam(name).pw_gid != g.gr_gid:
                    return name, g.gr_gid
    raise AssertionError("no account with a supplementary group on this machine")


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
@pytest.mark.parametrize("reuse", [True, False])
def test_delivery_gets_the_primary_gid_only(
    multi: Home, mess: Path, pub: Path, reuse: bool
) -> None:
    """qmail-lspawn sets the groups to the gid alone; the account's other groups (here
    the one /etc/group lists it in) never reach its deliveries."""
    name, extra = _member_of_a_group()
    a = _user_home(pub, "a", A_UID)
    (a / ".qmail-ext").write_text("|grep ^Groups: /proc/self/status > groups.out\n")
    _assign(multi, [f"+a-:{name}:{A_UID}:{A_UID}:{a}:-::"])
    assert extra in os.getgrouplist(name, A_UID)
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid(), reuse=reuse)
    sp.start()
    assert _run(sp, lambda: sp.deliver(mess, "s@x", "a-ext@h")) == Outcome.ok("did 0+0+1\n")
    assert (a / "groups.out").read_text().split() == ["Groups:", str(A_UID)]


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
def test_never_delivers_as_root(multi: Home, mess: Path, pub: Path) -> None:
    r = _user_home(pub, "r")
    _assign(multi, [f"=r:root:0:0:{r}:::"])
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid())
    sp.start()
    assert _run(sp, lambda: sp.deliver(mess, "s@x", "r@h")) == Outcome.temp(
        "Not allowed to perform deliveries as root.\n"
    )
    assert os.listdir(r / "Maildir" / "new") == []


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
def test_spawner_socket_is_not_reachable_from_user_code(multi: Home, mess: Path, pub: Path) -> None:
    a = _user_home(pub, "a", A_UID)
    (a / ".qmail-fds").write_text("|ls /proc/self/fd > fds.out\n")
    _assign(multi, [f"+a-:a:{A_UID}:{A_UID}:{a}:-::"])
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid())
    sp.start()
    assert _run(sp, lambda: sp.deliver(mess, "s@x", "a-fds@h")).status is Status.OK
    fds = sorted(int(x) for x in (a / "fds.out").read_text().split())
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4  # 0 1 2 and ls's own directory fd


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
def test_new_dirs_are_synced_in_rounds_by_the_users_own_workers(
    multi: Home, mess: Path, pub: Path, tmp_path: Path
) -> None:
    """Concurrent deliveries to one user share new/ fsyncs: fewer fsyncs of new/ than
    deliveries, every one of them by a worker (the user's), none by the root spawner,
    which never opens a path of the user's. Traced with strace (Debian package strace)."""
    require_tools("strace")
    a = _user_home(pub, "a", A_UID)
    _assign(multi, [f"=a:a:{A_UID}:{A_UID}:{a}:::"])
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid())
    sp.start()
    assert sp.pid is not None
    out = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-e", "trace=fsync,openat,open", "-o", str(out),
         "-p", str(sp.pid)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not (out.exists() and _traced(sp.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)

        async def go() -> list[Outcome]:
            return await asyncio.gather(*[sp.deliver(mess, "s@x", "a@h") for _ in range(40)])

        got = _run(sp, go)
    finally:
        tracer.terminate()
        tracer.wait(30)
    assert got == [Outcome.ok("did 1+0+0\n")] * 40
    assert len(os.listdir(a / "Maildir" / "new")) == 40
    lines = out.read_text(errors="replace").splitlines()
    new_syncs = [ln for ln in lines if "fsync(" in ln and f"{a}/Maildir/new>" in ln]
    assert 1 <= len(new_syncs) < 30, new_syncs
    assert all(not ln.startswith(f"{sp.pid} ") for ln in new_syncs)
    spawner_opens = [ln for ln in lines if ln.startswith(f"{sp.pid} ") and "open" in ln]
    assert not [ln for ln in spawner_opens if str(pub) in ln], spawner_opens


def _traced(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return any(ln.split()[1:] != ["0"] for ln in status.splitlines() if ln.startswith("TracerPid:"))


def test_single_user_worker_crash_is_temporary(home: Home, mess: Path) -> None:
    """A delivery whose process dies reports "qmail-local crashed." and the next works."""
    (home.alias / ".qmail-crash").write_text("|kill -9 $PPID; sleep 5\n")
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()

    async def go() -> list[Outcome]:
        return [
            await sp.deliver(mess, "s@x", "crash@h"),
            await sp.deliver(mess, "s@x", "root@h"),
        ]

    assert _run(sp, go) == [Outcome.temp("qmail-local crashed.\n"), Outcome.ok("did 1+0+0\n")]


def test_single_user_workers_are_retired(home: Home, mess: Path) -> None:
    (home.alias / ".qmail-who").write_text("|echo $PPID\n")
    sp = LocalSpawner(home, ControlCache(home), worker_deliveries=2)
    sp.start()

    async def go() -> list[Outcome]:
        return [await sp.deliver(mess, "s@x", "who@h") for _ in range(6)]

    got = _run(sp, go)
    assert all(o.status is Status.OK for o in got)
    pids = [o.text.split("\n")[0] for o in got]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
    assert len(set(pids)) == 3


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
@pytest.mark.parametrize("reuse", [True, False])
def test_multi_user_processes_never_change_identity(
    multi: Home, mess: Path, pub: Path, reuse: bool
) -> None:
    a = _user_home(pub, "a", A_UID)
    b = _user_home(pub, "b", B_UID)
    for h in (a, b):
        (h / ".qmail-who").write_text("|echo $PPID $(id -u)\n")
    _assign(multi, [f"+a-:a:{A_UID}:{A_UID}:{a}:-::", f"+b-:b:{B_UID}:{B_UID}:{b}:-::"])
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid(), reuse=reuse)
    sp.start()

    async def go() -> list[Outcome]:
        return [await sp.deliver(mess, "s@x", f"{u}-who@h") for u in "aabab"]

    got = [o.text.split("\n")[0].split() for o in _run(sp, go)]
    assert [uid for _pid, uid in got] == [
        str(A_UID),
        str(A_UID),
        str(B_UID),
        str(A_UID),
        str(B_UID),
    ]
    pids = [pid for pid, _uid in got]
    if reuse:  # one worker per identity, reused
        assert pids[0] == pids[1] == pids[3] and pids[2] == pids[4] and pids[0] != pids[2]
    else:  # qmail-lspawn's way: a fresh child each time
        assert len(set(pids)) == 5


def test_forward_goes_into_the_queue(home: Home, mess: Path) -> None:
    """A forward from a delivery is queued with the in-process queue writer."""
    (home.alias / ".qmail-fwd").write_text("&one@example.org\ntwo@example.net\n")
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()
    got = _run(sp, lambda: sp.deliver(mess, "s@x", "fwd@mx.test.example"))
    assert got.status is Status.OK
    did, qp, _ = got.text.split("\n")
    assert did == "did 0+2+0" and qp.startswith("qp ")
    (todo,) = os.listdir(home.queue / "todo")
    envelope = (home.queue / "todo" / todo).read_bytes()
    assert envelope.endswith(b"\0Fs@x\0Tone@example.org\0Ttwo@example.net\0")
    n = int(todo)
    body = (home.queue / "mess" / str(n % 23) / todo).read_bytes()
    assert body.endswith(b"Delivered-To: fwd@mx.test.example\n" + MSG)


@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to change uids")
@pytest.mark.parametrize("reuse", [True, False])
def test_multi_user_forward_runs_as_the_user(
    mess: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, reuse: bool
) -> None:
    """The forward is queued by the user's process (qmail-queue's real uid is the user's);
    nothing it needs is imported after the drop, when the library may be unreadable."""
    multi = Home(pub / "qmail", single_user=False)  # the queue program runs in the home:
    create_home(multi, "mx.test.example", None)  # it must be reachable by the user
    a = _user_home(pub, "a", A_UID)
    (a / ".qmail-fwd").write_text("&one@example.org\n")
    out = pub / "queued"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    qq = pub / "qq"
    qq.write_text(f"#!/bin/sh\nid -u > {out}/uid\ncat > {out}/msg\ncat <&1 > {out}/env\n")
    qq.chmod(0o755)
    monkeypatch.setenv("QMAILQUEUE", str(qq))  # the spawner's environment reaches deliveries
    _assign(multi, [f"+a-:a:{A_UID}:{A_UID}:{a}:-::"])
    sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid(), reuse=reuse)
    sp.start()
    got = _run(sp, lambda: sp.deliver(mess, "s@x", "a-fwd@h"))
    assert got.status is Status.OK and got.text.startswith("did 0+1+0\nqp "), got
    assert (out / "uid").read_text().strip() == str(A_UID)
    assert (out / "env").read_bytes() == b"Fs@x\0Tone@example.org\0\0"
    assert (out / "msg").read_bytes() == b"Delivered-To: a-fwd@h\n" + MSG


def test_close_lets_deliveries_in_flight_finish(home: Home, mess: Path) -> None:
    (home.alias / ".qmail-slow").write_text("|read line; echo slow done\n")
    sp = LocalSpawner(home, ControlCache(home))
    sp.start()

    async def go() -> Outcome:
        task = asyncio.ensure_future(sp.deliver(mess, "s@x", "slow@h"))
        await asyncio.sleep(0)  # the request is on its way
        await sp.close()  # waits for the spawner, which finishes the delivery first
        return await task

    assert asyncio.run(go()) == Outcome.ok("slow done\ndid 0+0+1\n")
    assert sp.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(sp.pid, 0)  # the spawner exited and was reaped
