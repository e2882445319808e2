"""queue/submit.py: the three ways into the queue (in-process, QMAILQUEUE, service)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_queue
from pyqmail.queue import codes, submit
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.service import QueueService
from pyqmail.queue.submit import (
    ProgramSubmitter,
    QueueSubmitter,
    ServiceSubmitter,
    submitter,
)

QQ = str(Path(sys.executable).with_name("qmail-queue"))


def _todo(home: Home) -> list[str]:
    return sorted(os.listdir(home.queue / "todo"))


def _mess_files(home: Home) -> int:
    return sum(len(os.listdir(d)) for d in QueuePaths(home.queue).split_dirs("mess"))


def test_choice(home: Home) -> None:
    sub = submitter(home, env={})
    assert isinstance(sub, QueueSubmitter) and sub.kind == "in-process"
    assert isinstance(submitter(home, env={"QMAILQUEUE": "/bin/false"}), ProgramSubmitter)


def test_multi_user_choice_follows_euid(home: Home) -> None:
    """Not single-user and the queue is not ours: the service (root: a child that becomes
    the queue user, qmail-queue's setuid bit); ours: in-process."""
    multi = Home(home.root, single_user=False)
    st = os.stat(home.queue / "pid")
    sub = QueueSubmitter(multi)
    assert sub.kind == ("in-process" if st.st_uid == os.geteuid() else "service")
    if os.geteuid() == 0:
        os.chown(home.queue / "pid", 12345, -1)
        assert sub.kind == "root"
        os.chown(home.queue / "pid", st.st_uid, -1)
        assert sub.kind == "in-process"
        p = sub.begin()
        assert isinstance(p, submit._InProcess)
        p.abort()


def test_in_process(home: Home) -> None:
    p = submitter(home, env={}).begin(origin="network")
    p.write(b"hi\n")
    r = p.commit_blocking(b"s@x", [b"r@y"])
    n = r.msgnum
    assert n > 0 and r.qp == os.getpid()
    assert _todo(home) == [str(n)]
    assert b"invoked from network" in QueuePaths(home.queue).mess(n).read_bytes()


def _script(tmp_path: Path, body: str) -> str:
    p = tmp_path / "qq"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def test_program_runs_real_qmail_queue(home: Home, tmp_path: Path) -> None:
    prog = _script(tmp_path, f'[ "$(pwd)" = "{home.root}" ] || exit 61\nexec {QQ}\n')
    p = submitter(home, env={"QMAILQUEUE": prog}).begin(received=b"X-Extra: 1\n")
    p.write(b"Subject: via program\n\nbody\n")
    r = p.commit_blocking(b"s@x", [b"r1@y", b"r2@y"])
    assert r.code == 0 and r.msgnum == 0 and r.qp > 0
    (name,) = _todo(home)
    n = int(name)
    t = parse_todo(QueuePaths(home.queue).todo(n).read_bytes())
    assert (t.sender, t.recipients) == (b"s@x", (b"r1@y", b"r2@y"))
    mess = QueuePaths(home.queue).mess(n).read_bytes()
    assert mess.split(b"\n", 1)[1] == b"X-Extra: 1\nSubject: via program\n\nbody\n"


@pytest.mark.parametrize(
    ("script", "code"), [("exit 31", 31), ("exit 71", 71), ("kill -9 $$", codes.CRASHED)]
)
def test_program_exit_codes(home: Home, tmp_path: Path, script: str, code: int) -> None:
    prog = _script(tmp_path, "cat >/dev/null\n" + script + "\n")
    p = ProgramSubmitter(home, prog).begin()
    p.write(b"x\n")
    r = p.commit_blocking(b"s", [b"r"])
    assert r.code == code
    if code == codes.CRASHED:
        assert r.result() == ("Z", "qq crashed (#4.3.0)")


def test_program_missing(home: Home, tmp_path: Path) -> None:
    p = ProgramSubmitter(home, str(tmp_path / "nope")).begin()
    r = p.commit_blocking(b"s", [b"r"])
    assert r.code == 120


def test_program_sees_envelope_on_fd1(home: Home, tmp_path: Path) -> None:
    out = tmp_path / "env"
    prog = _script(tmp_path, f"cat >/dev/null; cat <&1 >{out}\n")
    p = ProgramSubmitter(home, prog).begin()
    p.commit_blocking(b"", [b"a@b"])
    assert out.read_bytes() == b"F\0Ta@b\0\0"


@pytest.mark.parametrize(
    ("fd6", "reply"),
    [
        ("printf %s 'Dcustom permanent text'", b"554 custom permanent text\r\n"),
        ("printf %s 'Zcustom temp text'", b"451 custom temp text\r\n"),
        # a newline the filter adds is not sent on
        ("echo 'Dno thanks'", b"554 no thanks\r\n"),
        # a CR LF cannot start a second reply line
        ("printf 'Dbad\\r\\n250 ok\\r\\n'", b"554 bad  250 ok\r\n"),
        # only 255 bytes are read
        ("head -c 5000 /dev/zero | tr '\\0' x | sed 's/^/D/' ", b"554 " + b"x" * 254 + b"\r\n"),
        # too short: qmail's generic text
        ("printf D", b"451 qq temporary problem (#4.3.0)\r\n"),
    ],
)
def test_program_custom_reply_on_fd6(home: Home, tmp_path: Path, fd6: str, reply: bytes) -> None:
    """notqmail: exit 82 with D/Z + text on fd 6 is the reply qmail-smtpd gives."""
    prog = _script(tmp_path, f"cat >/dev/null\n{fd6} >&6\nexit 82\n")
    p = ProgramSubmitter(home, prog).begin()
    p.write(b"x\n")
    r = p.commit_blocking(b"s", [b"r"])
    assert r.code == 82
    assert codes.smtp_reply(r.code, r.custom) == reply


def test_program_fd6_is_a_pipe_even_if_ours_is_taken(home: Home, tmp_path: Path) -> None:
    """The parent's own fd 6 (a file here) never reaches the program."""
    leak = tmp_path / "leak"
    try:
        saved: int | None = os.dup(6)  # pytest's capture may own fd 6: put it back after
    except OSError:
        saved = None
    fd = os.open(leak, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.dup2(fd, 6)
        prog = _script(tmp_path, "printf %s 'Zfrom the pipe' >&6\nexit 82\n")
        r = ProgramSubmitter(home, prog).begin().commit_blocking(b"s", [b"r"])
        assert r.result() == ("Z", "from the pipe")
        assert leak.read_bytes() == b""
    finally:
        os.close(fd)
        if saved is None:
            os.close(6)
        else:
            os.dup2(saved, 6)
            os.close(saved)


@pytest.mark.parametrize("name", ["bin/myqq", "myqq"])
def test_relative_program_is_under_the_home(home: Home, name: str) -> None:
    """qmail execs QMAILQUEUE after chdir to the home: bin/x is HOME/bin/x, no PATH search."""
    target = home.root / name
    target.parent.mkdir(exist_ok=True)
    target.write_text(f"#!/bin/sh\nexec {QQ}\n")
    target.chmod(0o755)
    p = submitter(home, env={"QMAILQUEUE": name}).begin()
    p.write(b"Subject: relative\n\n")
    assert p.commit_blocking(b"s@x", [b"r@y"]).code == 0
    assert len(_todo(home)) == 1


def test_long_address_refused_before_program_runs(home: Home, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    prog = _script(tmp_path, f"touch {marker}\n")
    p = ProgramSubmitter(home, prog).begin()
    r = p.commit_blocking(b"a" * 2000, [b"r"])
    assert r.code == 11 and not marker.exists()


@pytest.fixture
def service(home: Home, tmp_path: Path):  # type: ignore[no-untyped-def]
    svc = QueueService(home, path=tmp_path / "run" / "qq.sock")
    svc.bind()
    svc.start()
    yield svc
    svc.close()


def test_service_queues_with_peer_uid(home: Home, service: QueueService) -> None:
    sub = ServiceSubmitter(home, service.path)
    p = sub.begin()
    p.write(b"Subject: s\n\n" + b"x" * 3_000_000)
    r = p.commit_blocking(b"s@x", [b"r@y"])
    n = r.msgnum
    assert r.qp == os.getpid() and n > 0
    mess = QueuePaths(home.queue).mess(n).read_bytes()
    assert mess.startswith(
        f"Received: (qmail {os.getpid()} invoked by uid {os.getuid()}); ".encode()
    )
    assert mess.endswith(b"x" * 3_000_000)
    assert parse_todo(QueuePaths(home.queue).todo(n).read_bytes()).uid == os.getuid()


def test_service_refusals_leave_nothing(home: Home, service: QueueService) -> None:
    sub = ServiceSubmitter(home, service.path)
    p = sub.begin()
    p.write(b"x\n")
    r = p.commit_blocking(b"s", [b"r" * 1500])
    assert r.code == 11
    # raw protocol: envelope with bad format and a connection dropped mid-message
    r = sub.client.submit([b"x\n"], b"Tr\0\0")
    assert r.code == 91
    r = sub.client.submit([b"x\n"], b"Fs\0Tr\0")
    assert r.code == 54
    assert _todo(home) == [] and _mess_files(home) == 0


def test_service_unreachable(home: Home, tmp_path: Path) -> None:
    p = ServiceSubmitter(home, tmp_path / "none.sock").begin()
    r = p.commit_blocking(b"s", [b"r"])
    assert r.code == 62


def test_service_client_gone_mid_envelope(home: Home, service: QueueService) -> None:
    """The client's envelope fails after the message was sent: once submit returns,
    the service has already removed the message's files."""
    sub = ServiceSubmitter(home, service.path)

    def bad_envelope() -> bytes:
        raise OSError("fd 1 went away")

    with pytest.raises(OSError):
        sub.client.submit([b"x" * 100_000], bad_envelope)
    assert _mess_files(home) == 0 and _todo(home) == []


def _as_nobody(fn: Callable[[], bool]) -> bool:
    """Run ``fn`` in a child dropped to nobody (65534); return its answer."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child answers through the pipe
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, b"1" if fn() else b"0")
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    return answer == b"1"


@pytest.mark.root
def test_a_user_who_cannot_enter_the_queue_uses_the_service(tmp_path: Path) -> None:
    """queue/ is 0750 qmailq:qmail: a local user's stat of queue/pid fails with EACCES,
    and that must mean 'go through the queue service', not 'write it in-process'."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    os.chmod(tmp_path, 0o755)
    h = Home(tmp_path / "q", single_user=False)
    create_queue(h, None)
    os.chmod(h.root, 0o755)
    os.chmod(h.queue, 0o750)
    assert submit.can_write_queue(h)  # root owns it here
    assert not _as_nobody(lambda: submit.can_write_queue(h))
