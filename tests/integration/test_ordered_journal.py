"""Power loss on a real journalled ext4, for the one-commit writes (durable.py).

Where ``durable.ordered_journal`` holds, the queue's commit and a Maildir delivery write
their files out without an fsync and let the directory's fsync after the link commit
everything at once. The claim is that a crash then never leaves a name without all of
its file. These tests check it the way file-system crash tests do: a loop-mounted ext4
image is shut down mid-stream with EXT4_IOC_SHUTDOWN and NOLOGFLUSH (the device keeps
what was written to it, nothing more: the journal is not committed, dirty pages are
dropped), mounted again (the journal replays), and then every message that was
acknowledged must be there whole, and every name that survived must name a whole file.

Needs root (mount, the ioctl) and e2fsprogs' mkfs.ext4.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyqmail import durable
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.local import maildir
from pyqmail.outcome import Status
from pyqmail.queue.contract import QueueError
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import QueueWriter, commit_many

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount an ext4 image"),
]

EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
NOLOGFLUSH = 2  # EXT4_GOING_FLAGS_NOLOGFLUSH: as if the power went


@contextlib.contextmanager
def ext4(tmp_path: Path, *mkfs: str, options: str = "") -> Iterator[Path]:
    """A fresh 64 MiB ext4 image mounted on tmp_path/mnt (``mkfs``: extra mkfs options)."""
    img = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs, str(img)], check=True)
    opts = "loop" + (f",{options}" if options else "")
    subprocess.run(["mount", "-o", opts, str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # never left behind
        with contextlib.suppress(OSError):
            img.unlink()


def remount(tmp_path: Path) -> None:
    """Unmount the shut-down file system and mount its image again (journal replay)."""
    mnt = tmp_path / "mnt"
    subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["mount", "-o", "loop", str(tmp_path / "fs.img"), str(mnt)], check=True)


def power_off(mnt: Path) -> None:
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", NOLOGFLUSH))
    finally:
        os.close(fd)


def power_off_during(
    work: Callable[[], None], stop: threading.Event, mnt: Path, rng: random.Random
) -> None:
    """Run ``work`` in a thread, cut the power under it after 0.3-0.6 s, let it end."""
    t = threading.Thread(target=work)
    t.start()
    time.sleep(rng.uniform(0.3, 0.6))
    power_off(mnt)
    stop.set()
    t.join(30)
    assert not t.is_alive()


def body(k: int, rng: random.Random) -> bytes:
    """Message k: a marker line and a random number of lines (1-30 KiB)."""
    lines = rng.randrange(30, 1200)
    return b"Subject: m%d\n\n" % k + b"".join(
        b"message %d line %05d\n" % (k, i) for i in range(lines)
    )


def test_ordered_journal_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 with its journal in data=ordered: yes; without a journal, or in another data
    mode, or switched off by the environment: no."""
    with ext4(tmp_path) as mnt:
        assert durable.ordered_journal(mnt)
        fd = os.open(mnt, os.O_RDONLY)
        try:
            assert durable.ordered_journal(fd)
        finally:
            os.close(fd)
        with monkeypatch.context() as m:
            m.setenv("PYQMAIL_ORDERED_JOURNAL", "no")
            assert not durable.ordered_journal(mnt)
    with ext4(tmp_path, "-O", "^has_journal") as mnt:
        assert not durable.ordered_journal(mnt)
    with ext4(tmp_path, options="data=writeback") as mnt:
        assert not durable.ordered_journal(mnt)
    assert not durable.ordered_journal("/proc")
    assert not durable.ordered_journal(tmp_path / "no such directory")


# (one commit or fsyncs, mkfs options): the default file system, and one made with
# fast_commit (Debian 12's kernel makes full commits for these directory fsyncs there too,
# /proc/fs/ext4/DEV/fc_info counts no fast commit, but a newer one may not)
MODES = [(True, ()), (False, ()), (True, ("-O", "fast_commit"))]
MODE_IDS = ["one-commit", "fsyncs", "one-commit-fast_commit"]


@pytest.mark.parametrize(("one_commit", "mkfs"), MODES, ids=MODE_IDS)
def test_power_loss_keeps_every_committed_message(
    tmp_path: Path, one_commit: bool, mkfs: tuple[str, ...]
) -> None:
    """The queue writer commits batches (in one journal commit each, or with the fsyncs
    of elsewhere) until the power goes; after the replay each acknowledged message is in
    todo/ whole, and no todo/ entry names a message that is not whole (the ordering the
    one commit relies on)."""
    rng = random.Random(20)
    with ext4(tmp_path, *mkfs) as mnt:
        home = Home(mnt / "qmail", single_user=True)
        create_home(home, "mx.test.example", None)
        w = QueueWriter(home, notify=lambda n: None, one_commit=None if one_commit else False)
        assert w.one_commit is one_commit
        acked: dict[int, bytes] = {}
        sent: dict[int, bytes] = {}  # every message begun, by its number
        stop = threading.Event()

        def write() -> None:
            k = 0
            while not stop.is_set():
                batch = []
                try:
                    for _ in range(rng.randrange(1, 8)):
                        k += 1
                        p = w.begin(origin="network")
                        b = body(k, rng)
                        p.write(b)
                        sent[p.msgnum] = b
                        batch.append((p, b"s@example.com", [b"r%d@example.org" % k]))
                except (QueueError, OSError):
                    return
                for (p, _, _), res in zip(batch, commit_many(batch), strict=True):
                    if isinstance(res, QueueError):
                        return  # the file system is gone
                    acked[res] = sent[p.msgnum]

        power_off_during(write, stop, mnt, rng)
        assert len(acked) > 5, "the writer should have committed some messages first"
        w.close()  # the directories it keeps open
        gc.collect()  # and the messages it gave up on
        remount(tmp_path)
        paths = QueuePaths(home.queue)
        todo = {int(n) for n in os.listdir(paths.dir("todo"))}
        assert set(acked) <= todo, f"acknowledged but lost: {sorted(set(acked) - todo)}"
        for n in todo:
            data = paths.mess(n).read_bytes()
            first, _, rest = data.partition(b"\n")
            whole = first.startswith(b"Received: (qmail ") and rest == sent[n]
            assert whole, f"todo/{n} names a partial message ({len(data)} bytes)"
            env = parse_todo(paths.todo(n).read_bytes())
            assert env.sender == b"s@example.com" and len(env.recipients) == 1


@pytest.mark.parametrize(("one_commit", "mkfs"), MODES, ids=MODE_IDS)
def test_power_loss_keeps_every_maildir_delivery(
    tmp_path: Path, one_commit: bool, mkfs: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maildir deliveries (file written out or fsynced, link, new/ fsync) until the
    power goes: after the replay every delivered message is in new/ whole, and nothing
    in new/ is partial."""
    if not one_commit:
        monkeypatch.setenv("PYQMAIL_ORDERED_JOURNAL", "no")
    rng = random.Random(21)
    with ext4(tmp_path, *mkfs) as mnt:
        md = mnt / "Maildir"
        for sub in ("", "tmp", "new", "cur"):
            (md / sub).mkdir(exist_ok=True)
        src = mnt / "source"
        delivered: list[bytes] = []
        texts: dict[bytes, bytes] = {}
        stop = threading.Event()

        def deliver() -> None:
            k = 0
            while not stop.is_set():
                k += 1
                b = body(k, rng)
                try:
                    src.write_bytes(b)
                    fd = os.open(src, os.O_RDONLY)
                except OSError:
                    return  # the file system is gone (EIO once the power is off)
                header = b"Delivered-To: x@example.org\n"
                texts[b"Subject: m%d\n" % k] = header + b
                try:
                    maildir.deliver(str(md), fd, header, timeout=None)
                except Exception:
                    return  # the file system is gone
                finally:
                    os.close(fd)
                delivered.append(b"Subject: m%d\n" % k)

        power_off_during(deliver, stop, mnt, rng)
        assert len(delivered) > 5
        remount(tmp_path)
        found = {}
        for name in os.listdir(md / "new"):
            data = (md / "new" / name).read_bytes()
            marker = data.split(b"\n", 2)[1:2] or [b""]
            key = marker[0] + b"\n"
            assert data == texts.get(key), f"new/{name} is partial ({len(data)} bytes)"
            found[key] = name
        lost = [m for m in delivered if m not in found]
        assert not lost, f"delivered but lost: {lost[:5]}"


@pytest.mark.parametrize("reuse", [True, False])
def test_root_mode_delivery_as_the_user_writes_out_on_ext4(
    home: Home, tmp_path: Path, reuse: bool
) -> None:
    """Root mode: the spawner's delivery process drops to the recipient's uid before it
    writes; on ext4 with an ordered journal it then takes the write-out path, which must
    not need anything the user cannot read (the interpreter's library may be root's)."""
    from pyqmail.control import ControlCache
    from pyqmail.local.spawn import LocalSpawner
    from tests.integration.test_local_spawn import A_UID, _assign, _run, _user_home

    pub = Path(tempfile.mkdtemp(prefix="pyqmail-ordered-"))  # a place every uid can reach
    pub.chmod(0o755)
    try:
        with ext4(pub) as mnt:
            mnt.chmod(0o755)
            a = _user_home(mnt, "a", A_UID)
            assert durable.ordered_journal(a / "Maildir")
            multi = Home(home.root, single_user=False)
            _assign(multi, [f"=a:a:{A_UID}:{A_UID}:{a}:::"])
            mess = tmp_path / "mess"
            mess.write_bytes(b"Subject: on ext4\n\nbody\n")
            sp = LocalSpawner(multi, ControlCache(multi), message_owner=os.getuid(), reuse=reuse)
            sp.start()
            got = _run(sp, lambda: sp.deliver(mess, "s@x", "a@h"))
            assert got.status is Status.OK, got.text
            (name,) = os.listdir(a / "Maildir" / "new")
            data = (a / "Maildir" / "new" / name).read_bytes()
            assert data.endswith(b"Subject: on ext4\n\nbody\n")
            assert os.stat(a / "Maildir" / "new" / name).st_uid == A_UID
    finally:
        shutil.rmtree(pub, ignore_errors=True)


def _numbered(k: int) -> bytes:
    """Message k of the delivery test: a marker and 20-219 lines naming it."""
    return b"Subject: m%d\n\n" % k + b"".join(
        b"message %d line %05d\n" % (k, i) for i in range(20 + k % 200)
    )


@pytest.mark.parametrize("agent", ["root spawner", "single-user pool"])
def test_power_loss_keeps_every_delivery_reported_done(
    home: Home, tmp_path: Path, agent: str
) -> None:
    """Deliveries eight at a time with their new/ fsyncs shared in rounds (the root
    spawner's, run by the recipient's own worker; the single-user pool's, in the daemon)
    until the power goes: after the replay every delivery that was reported done is in
    new/, whole, and nothing in new/ is partial."""
    from pyqmail.control import ControlCache
    from pyqmail.local.pool import WorkerPoolLocal
    from pyqmail.local.spawn import LocalSpawner
    from tests.integration.test_local_spawn import A_UID, _assign, _user_home

    rng = random.Random(7)
    root = agent == "root spawner"
    pub = Path(tempfile.mkdtemp(prefix="pyqmail-ordered-"))  # a place every uid can reach
    pub.chmod(0o755)
    try:
        with ext4(pub) as mnt:
            mnt.chmod(0o755)
            uid, gid = (A_UID, A_UID) if root else (os.getuid(), os.getgid())
            a = _user_home(mnt, "a", uid if root else None)
            os.sync()  # the Maildir itself is there before the power goes
            h = Home(home.root, single_user=not root)
            _assign(h, [f"=a:a:{uid}:{gid}:{a}:::"])
            deliverer: LocalSpawner | WorkerPoolLocal
            if root:
                deliverer = LocalSpawner(h, ControlCache(h), message_owner=os.getuid())
            else:
                deliverer = WorkerPoolLocal(h, ControlCache(h), workers=4)
            deliverer.start()
            done: list[int] = []
            stop = threading.Event()

            async def one(k: int) -> None:
                mess = tmp_path / f"m{k}"
                mess.write_bytes(_numbered(k))
                out = await deliverer.deliver(mess, "s@x", "a@h")
                if out.status is Status.OK:
                    done.append(k)

            async def stream() -> None:
                try:
                    k = 0
                    running: set[asyncio.Future[None]] = set()
                    while not stop.is_set() and k < 5000:
                        while len(running) < 8:
                            running.add(asyncio.ensure_future(one(k)))
                            k += 1
                        _, running = await asyncio.wait(
                            running, return_when=asyncio.FIRST_COMPLETED
                        )
                    await asyncio.gather(*running)
                finally:
                    await deliverer.close()

            power_off_during(lambda: asyncio.run(stream()), stop, mnt, rng)
            assert len(done) > 5
            remount(pub)
            found = set()
            for name in os.listdir(a / "Maildir" / "new"):
                data = (a / "Maildir" / "new" / name).read_bytes()
                k = int(data.split(b"Subject: m", 1)[1].split(b"\n", 1)[0])
                assert data.endswith(_numbered(k)), f"new/{name} is partial"
                found.add(k)
            lost = sorted(set(done) - found)
            assert not lost, f"reported delivered but lost: {lost[:5]} of {len(done)}"
    finally:
        shutil.rmtree(pub, ignore_errors=True)
