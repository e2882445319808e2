"""``pyqmail run`` as root in multi-user mode: each part under its qmail user (daemon/split.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.conftest import free_port, is_root, qmail_ids
from tests.integration.test_run_daemon import files, listening, wait_for

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]


@pytest.fixture
def root_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Home, Path]]:
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    ids = qmail_ids()
    d = Path(tempfile.mkdtemp(prefix="pyqmail-root-run-"))
    d.chmod(0o755)  # the qmail users must reach the home under it
    home = Home(d / "q", single_user=False)
    create_home(home, "mx.test.example", ids)
    (home.control / "locals").write_text("mx.test.example\ntest.example\n")
    (home.control / "rcpthosts").write_text("mx.test.example\ntest.example\n")
    nobody = pwd.getpwnam("nobody")
    user = d / "nobody"
    for sub in ("cur", "new", "tmp"):
        (user / "Maildir" / sub).mkdir(parents=True)
    for root, _dirs, _ in os.walk(user):
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    # joe-EXT has no .qmail-EXT: qmail-local bounces it within this home. (An unknown user
    # would go to the alias user, whose home is the installed /var/qmail/alias, which
    # `make accounts` names but does not create: not there on a machine without qmail.)
    (home.users / "assign").write_text(
        f"=joe:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:::\n"
        f"+joe-:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:-::\n.\n"
    )
    env = dict(os.environ, PYQMAIL_HOME=str(home.root))
    env.pop("PYQMAIL_SINGLE_USER", None)
    subprocess.run([str(BIN / "pyqmail"), "newu"], check=True, env=env)
    yield home, user
    shutil.rmtree(d, ignore_errors=True)


def start_root_run(home: Home, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """``pyqmail run`` as root, multi-user, SMTP on 127.0.0.1:port; its log file."""
    log = home.root.parent / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(home.root), "--smtp", f"127.0.0.1:{port}"],
            stdout=out, stderr=out, env=env, start_new_session=True,
        )  # fmt: skip
    return proc, log


def ids_of(pid: int) -> tuple[int, int]:
    uid = gid = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("Gid:"):
            gid = int(line.split()[1])
    return uid, gid


def test_parts_run_as_qmail_users_and_mail_flows(root_home: tuple[Home, Path]) -> None:
    home, user = root_home
    (home.control / "rcptchecks").write_text("0\n")  # joe-nobox must reach local delivery
    ids = home.ids()
    port = free_port()
    proc, log = start_root_run(home, port)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()

        def parts() -> set[tuple[int, int]]:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            return {ids_of(int(p)) for p in kids}

        want = {(ids.uid(r), ids.gid(g)) for r, g in
                (("queue", "qmail"), ("send", "qmail"), ("daemon", "nofiles"))}  # fmt: skip
        wait_for(lambda: parts() == want, what="every part dropped to its user")
        got = parts()
        assert (ids.uid("queue"), ids.gid("qmail")) in got
        assert (ids.uid("send"), ids.gid("qmail")) in got
        assert (ids.uid("daemon"), ids.gid("nofiles")) in got
        assert ids_of(proc.pid)[0] == 0  # the supervisor only waits and relays signals
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("joe@test.example", ["joe@test.example"], "Subject: one\r\n\r\nx\r\n")
            s.sendmail("joe@test.example", ["joe-nobox@test.example"], "Subject: two\r\n\r\nx\r\n")
        new = user / "Maildir" / "new"
        wait_for(lambda: len(files(new)) == 2, what="delivery and bounce")
        msgs = [f.read_bytes() for f in files(new)]
        assert all(os.stat(f).st_uid == pwd.getpwnam("nobody").pw_uid for f in files(new))
        first = next(m for m in msgs if b"Subject: one" in m.split(b"\n\n", 1)[0])
        assert b"invoked from network" in first
        bounce = next(m for m in msgs if b"failure notice" in m)
        assert b"invoked for bounce" in bounce
        assert (
            b"<joe-nobox@test.example>:\nSorry, no mailbox here by that name. (#5.1.1)\n" in bounce
        )
        # SMTP's messages were written by the listener's committer process, which runs as
        # the queue's owner (qmail-queue's setuid qmailq); its pid is the qp
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (smtpd,) = [
            int(k) for k in kids if ids_of(int(k)) == (ids.uid("daemon"), ids.gid("nofiles"))
        ]
        grandkids = Path(f"/proc/{smtpd}/task/{smtpd}/children").read_text().split()
        # ... beside the recipient lookup process (daemon/rcptlookup.py), which stays root
        # to become each user per lookup, as qmail-lspawn does, and the password process
        # of SMTP AUTH (daemon/authproc.py), as qmailp
        by_ids = {ids_of(int(k)): k for k in grandkids}
        assert sorted(by_ids) == sorted(
            [(ids.uid("queue"), ids.gid("qmail")), (0, 0), (ids.uid("passwd"), ids.gid("nofiles"))]
        )
        committer = by_ids[(ids.uid("queue"), ids.gid("qmail"))]
        assert b"Received: (qmail %s invoked from network)" % committer.encode() in first
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0
    text = log.read_text()
    assert "status: exiting" in text and "alert" not in text
    for kind in ("todo", "intd", "info", "local", "remote", "bounce"):
        assert not any(files(d) for d in [home.queue / kind, *(home.queue / kind).glob("*")])


def test_rcpt_check_looks_into_a_private_home_as_its_user(
    root_home: tuple[Home, Path],
) -> None:
    """qmaild may not look into joe's 0700 home; the lookup process's child, as joe's
    uid, may: joe-box (.qmail-box) is accepted, joe-nobox refused, and the answers are
    the same as local delivery's (test_local_verdict.py has the table)."""
    home, user = root_home
    (user / ".qmail-box").write_text("./Maildir/\n")
    os.chown(user / ".qmail-box", pwd.getpwnam("nobody").pw_uid, -1)
    user.chmod(0o700)
    port = free_port()
    proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.mail("a@example.org")
            assert s.rcpt("joe-box@test.example")[0] == 250
            assert s.rcpt("JOE-Box@test.example")[0] == 250
            code, text = s.rcpt("joe-nobox@test.example")
            assert code == 550 and b"5.1.1" in text
            assert s.rcpt("joe@test.example")[0] == 250  # base address: defaultdelivery
    finally:
        assert _stop(proc) == 0
    assert "Traceback" not in log.read_text()


# -- root never follows a path that a lesser account controls -------------------------------


def _start(home: Home, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = home.root.parent / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(home.root), *args],
            stdout=out, stderr=out, env=env, start_new_session=True,
        )  # fmt: skip
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except FileNotFoundError:
            continue
        out += kids
        todo += kids
    return out


def _outside(home: Home, name: str) -> Path:
    """A root-owned directory beside the home, which no qmail user may write."""
    d = home.root.parent / name
    d.mkdir(mode=0o755)
    return d


def _plant_dir(queue_dir: Path, target: Path, owner: int) -> None:
    """What the queue's owner can do: swap its directory for a symlink."""
    queue_dir.rename(queue_dir.with_name(queue_dir.name + ".real"))
    queue_dir.symlink_to(target)
    os.lchown(queue_dir, owner, -1)


def test_start_up_clean_follows_no_symlink_out_of_the_queue(
    root_home: tuple[Home, Path],
) -> None:
    home, _ = root_home
    qmailq = home.ids().uid("queue")
    victims = []
    for sub, name in (("pid", "1.1.1"), ("intd", "99999"), ("mess/0", "23")):
        out = _outside(home, sub.replace("/", "-"))
        victim = out / name
        victim.write_text("precious\n")
        os.utime(victim, (1, 1))  # old enough for every rule of the clean
        victims.append(victim)
        _plant_dir(home.queue / sub, out, qmailq)
    port = free_port()
    proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
    try:
        # the smtpd part starts only once the queue part (which cleans) is ready
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
    finally:
        _stop(proc)
    for victim in victims:
        assert victim.read_text() == "precious\n", victim


def test_tcpto_symlink_does_not_change_a_root_file(root_home: tuple[Home, Path]) -> None:
    home, _ = root_home
    ids = home.ids()
    secret = _outside(home, "etc") / "shadow"
    secret.write_bytes(b"root:secret\n")
    secret.chmod(0o600)
    tcpto = home.queue / "lock" / "tcpto"
    tcpto.unlink()
    tcpto.symlink_to(secret)
    os.lchown(tcpto, ids.uid("queue"), -1)
    port = free_port()
    proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        agents = lambda: [  # noqa: E731
            p for p in _descendants(proc.pid) if ids_of(p)[0] == ids.uid("remote")
        ]
        wait_for(lambda: bool(agents()) or proc.poll() is not None, what="the remote agent")
        assert proc.poll() is None, log.read_text()
    finally:
        _stop(proc)
    st = secret.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o600)
    assert secret.read_bytes() == b"root:secret\n"


def test_tcpto_is_qmailrs_from_init(root_home: tuple[Home, Path]) -> None:
    home, _ = root_home
    ids = home.ids()
    st = (home.queue / "lock" / "tcpto").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (
        ids.uid("remote"),
        ids.gid("qmail"),
        0o644,
    )


def test_queue_socket_is_made_by_qmailq_not_through_symlinks(
    root_home: tuple[Home, Path],
) -> None:
    home, _ = root_home
    ids = home.ids()
    run = home.root / "run"
    run.mkdir(mode=0o755)
    os.chown(run, ids.uid("queue"), ids.gid("qmail"))
    target = _outside(home, "elsewhere") / "file"
    target.write_bytes(b"x")
    target.chmod(0o600)
    (run / "qmail-queue.sock").symlink_to(target)
    port = free_port()
    proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        sock = run / "qmail-queue.sock"
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid) == (ids.uid("queue"), ids.gid("qmail"))
    finally:
        _stop(proc)
    st = target.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o600)


def test_run_directory_symlink_is_refused(root_home: tuple[Home, Path]) -> None:
    home, _ = root_home
    elsewhere = _outside(home, "elsewhere")
    (home.root / "run").symlink_to(elsewhere)
    port = free_port()
    proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
    try:
        rc = proc.wait(60)
    finally:
        _stop(proc)
    assert rc == 111, log.read_text()
    st = elsewhere.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755)
    assert list(elsewhere.iterdir()) == []


def _listen_inode(port: int) -> str | None:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}" and f[3] == "0A":
            return f[9]
    return None


def test_no_listener_accepts_before_its_process_dropped(root_home: tuple[Home, Path]) -> None:
    home, _ = root_home
    ports = [free_port() for _ in range(24)]
    args = ["--smtp", f"127.0.0.1:{ports[0]}"]
    for p in ports[1:]:
        args += ["--qmtp", f"127.0.0.1:{p}"]
    proc, log = _start(home, *args)
    try:
        # connect to the first listener as early as it lets us, then see who holds it
        with socket.socket() as c:
            while c.connect_ex(("127.0.0.1", ports[0])) != 0:
                assert proc.poll() is None, log.read_text()
            inode = _listen_inode(ports[0])
            holders = [
                p
                for p in [proc.pid, *_descendants(proc.pid)]
                if any(
                    os.readlink(f) == f"socket:[{inode}]"
                    for f in Path(f"/proc/{p}/fd").iterdir()
                    if f.is_symlink()
                )
            ]
            uids = [ids_of(p)[0] for p in holders]
        assert holders and 0 not in uids, uids
        assert all(listening(p) for p in ports)
    finally:
        _stop(proc)


def test_remote_agent_runs_as_qmailr_and_delivers(root_home: tuple[Home, Path]) -> None:
    from tests.integration.test_e2e_mail import Sink

    home, _ = root_home
    ids = home.ids()
    sink = Sink(home.root.parent)
    try:
        (home.control / "smtproutes").write_text(f"remote.example:127.0.0.1:{sink.port}\n")
        port = free_port()
        proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
        try:
            wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
            assert proc.poll() is None, log.read_text()
            agents = [p for p in _descendants(proc.pid) if ids_of(p)[0] == ids.uid("remote")]
            assert len(agents) == 1
            assert ids_of(agents[0]) == (ids.uid("remote"), ids.gid("qmail"))
            status = Path(f"/proc/{agents[0]}/status").read_text().splitlines()
            (groups,) = [ln.split()[1:] for ln in status if ln.startswith("Groups:")]
            assert groups == []  # none of root's or qmails's supplementary groups
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.sendmail("joe@test.example", ["x@remote.example"], "Subject: out\r\n\r\nx\r\n")
            # the log's end msg comes after the sink's 250, which it sends once it has
            # written the message
            wait_for(lambda: "end msg" in log.read_text(), what="end msg")
            assert b"Subject: out" in b"".join(f.read_bytes() for f in files(sink.dump))
        finally:
            rc = _stop(proc)
        assert rc == 0, log.read_text()
        assert ": success: " in log.read_text()
    finally:
        sink.close()


def test_losing_the_remote_agent_stops_the_mta(root_home: tuple[Home, Path]) -> None:
    home, _ = root_home
    ids = home.ids()
    port = free_port()
    proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        agents = [p for p in _descendants(proc.pid) if ids_of(p)[0] == ids.uid("remote")]
        assert len(agents) == 1, log.read_text()
        os.kill(agents[0], signal.SIGKILL)
        rc = proc.wait(60)
    finally:
        _stop(proc)
    assert rc == 111
    assert "lost connection to the remote agent" in log.read_text()


def _processes_of(home: Home) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(home.root).encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def test_a_term_during_start_up_leaves_no_part_running(root_home: tuple[Home, Path]) -> None:
    home, _ = root_home
    port = free_port()
    proc, log = _start(home, "--smtp", f"127.0.0.1:{port}")
    try:
        wait_for(lambda: bool(_descendants(proc.pid)) or proc.poll() is not None, what="a part")
        proc.send_signal(signal.SIGTERM)  # the supervisor is still starting the parts
        rc = proc.wait(60)
        wait_for(lambda: not _processes_of(home), what="every part to stop", timeout=60)
        assert rc == 0, log.read_text()
    finally:
        _stop(proc)
        for pid in _processes_of(home):  # what the old supervisor orphaned
            os.kill(pid, signal.SIGKILL)
