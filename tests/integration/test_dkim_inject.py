"""DKIM signing where mail is queued: qmail-inject and sendmail sign (single-user: in their
own process; root: in the child that became qmailq), the queue service signs what local
users submit and not what the network (qmaild) hands it; in root mode the key is qmailq's
alone and a local user who cannot read it still gets signed mail."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail import dkim
from pyqmail.home import Home, Ids
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.service import QueueService, ServiceClient, service_alive, socket_path
from tests.integration.test_run_daemon import wait_for
from tests.security._support import root_home
from tests.unit.test_dkim import records, verify

BIN = Path(sys.executable).parent
MSG = b"From: someone@example.test\nTo: dest@remote.example\nSubject: dkim\n\nbody marker\n"


def _queued(home: Home) -> list[bytes]:
    paths = QueuePaths(home.queue)
    return [paths.mess(int(n)).read_bytes() for n in sorted(os.listdir(home.queue / "todo"))]


def _without_received(mess: bytes) -> bytes:
    assert mess.startswith(b"Received: ")
    return mess.split(b"\n", 1)[1]  # qmail-queue's Received line is one line


def _env(home: Home, single_user: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYQMAIL_")}
    env["PYQMAIL_HOME"] = str(home.root)
    if single_user:
        env["PYQMAIL_SINGLE_USER"] = "1"
    return env


@pytest.mark.parametrize("command", [["qmail-inject"], ["sendmail", "-t"]])
def test_local_injection_is_signed_and_a_keyless_domain_is_not(
    home: Home, command: list[str]
) -> None:
    dkim.keygen(home, "example.test", "s1")
    argv = [str(BIN / command[0]), *command[1:]]
    for msg in (MSG, MSG.replace(b"example.test", b"nokey.test")):
        r = subprocess.run(argv, input=msg, capture_output=True, env=_env(home, True), timeout=60)
        assert r.returncode == 0 and r.stderr == b"", r.stderr
    signed, unsigned = _queued(home)  # inode order is not queue order: sort by content
    if b"nokey.test" in signed:
        signed, unsigned = unsigned, signed
    body = _without_received(signed)
    assert body.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert verify(body, records(home)) == [True]
    assert verify(body.replace(b"body marker", b"body markex"), records(home)) == [False]
    assert b"DKIM-Signature" not in unsigned


def _service_submit(path: Path, message: bytes) -> int:
    reply = ServiceClient(path).submit([message], b"Fsomeone@example.test\0Tdest@x.example\0\0")
    assert reply.code == 0, reply
    return reply.msgnum


def test_the_service_signs_local_users_mail_not_the_networks(home: Home, tmp_path: Path) -> None:
    dkim.keygen(home, "example.test", "s1")
    svc = QueueService(home, path=tmp_path / "local")
    me = os.getuid()  # to this service we are qmaild: our mail came from the network
    roles = {r: me + 1 for r in ("alias", "send", "queue", "remote", "log", "passwd")}
    net_ids = Ids(uids={**roles, "daemon": me}, gids={"qmail": 0, "nofiles": 0}, single_user=False)
    net = QueueService(home, path=tmp_path / "net", ids=net_ids)
    for s in (svc, net):
        s.bind()
        s.start()
    try:
        local = QueuePaths(home.queue).mess(_service_submit(svc.path, MSG)).read_bytes()
        relayed = QueuePaths(home.queue).mess(_service_submit(net.path, MSG)).read_bytes()
    finally:
        svc.close()
        net.close()
    assert b"invoked by uid" in local and b"invoked from network" in relayed
    assert verify(_without_received(local), records(home)) == [True]
    assert b"DKIM-Signature" not in relayed


# -- root mode: the key is the queue user's -------------------------------------------------


@pytest.fixture
def multi_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    home = root_home("pyqmail-dkim-root-")  # a multi-user home, as the security tests make it
    yield home
    shutil.rmtree(home.root.parent)


def _as_nobody(fn: object) -> int:
    """Fork, become nobody, run fn() -> exit code."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports by exit code
        rc = 100
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            rc = fn()  # type: ignore[operator]
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.root
def test_root_mode_key_is_qmailqs_and_both_paths_sign(multi_home: Home) -> None:
    home = multi_home
    env = _env(home, False)
    r = subprocess.run(
        [str(BIN / "pyqmail"), "dkim", "keygen", "example.test", "--selector", "s1"],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[0] == "s1._domainkey.example.test"
    key = home.control / "dkim/example.test/s1.key"
    st = key.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam("qmailq").pw_uid, 0o600)

    def read_key() -> int:
        try:
            key.read_bytes()
        except PermissionError:
            return 13
        return 0

    assert _as_nobody(read_key) == 13  # a local user cannot read it
    # root's qmail-inject: the child that became qmailq signs
    r = subprocess.run([str(BIN / "qmail-inject")], input=MSG, capture_output=True, env=env,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # a local user: through the standalone queue service (qmailq), which signs
    log = home.root.parent / "log"
    with open(log, "wb") as out:
        svc = subprocess.Popen(
            [str(home.root / "bin" / "qmail-queue"), "--serve"], stdout=out, stderr=out, env=env
        )
        try:
            wait_for(lambda: service_alive(socket_path(home)), what="the queue service")
            path = socket_path(home)
            assert _as_nobody(lambda: 0 if _service_submit(path, MSG) else 1) == 0, log.read_text()
        finally:
            svc.terminate()
            svc.wait(30)
    root_mess, user_mess = sorted(_queued(home), key=lambda m: b"invoked by uid 0)" not in m)
    assert b"invoked by uid 0)" in root_mess
    assert b"invoked by uid %d)" % pwd.getpwnam("nobody").pw_uid in user_mess
    recs = records(home)
    for m in (root_mess, user_mess):
        assert verify(_without_received(m), recs) == [True], m[:300]
