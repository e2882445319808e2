"""DKIM signing of an authenticated session's mail in root mode when qmail-smtpd runs as
qmaild under Debian's tcpserver (``-u``/``-g``): qmaild cannot write the queue, so the
message goes through the queue service (qmailq), which signs it because qmaild asked
(the service's ``sign`` option) and only then. Checked: swaks --tls --auth gets its mail
signed, and opendkim-testmsg verifies the queued message against the keygen record served
by dnsmasq; the same door's unauthenticated mail is not signed; a local user's request is
served as before (signed, asked or not) and a bounce's (qmails) asking is ignored. Needs
root (accounts, tcpserver -u, dnsmasq on port 53)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from pyqmail.queue.service import ServiceClient, socket_path
from tests.conftest import free_port, is_root, require, require_tools
from tests.integration.test_smtpd_tls import install_cert
from tests.interop.test_dkim_verifiers import Dns
from tests.interop.test_smtpd_tcpserver_auth import CHECKPW, _wait_greeting
from tests.security._support import root_home

pytestmark = [pytest.mark.interop, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="needs root")]  # fmt: skip
BIN = Path(sys.executable).parent


@dataclass
class RootDoor:
    home: Home
    port: int
    dns: Dns
    err: Path
    service_err: Path

    def queued(self, marker: bytes) -> bytes:
        """The one queued message holding ``marker`` (read as root)."""
        found = []
        for d, _, names in os.walk(self.home.queue / "mess"):
            for n in names:
                data = Path(d, n).read_bytes()
                if marker in data:
                    found.append(data)
        assert len(found) == 1, found
        return found[0]


def _env(home: Home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    env["PYQMAIL_HOME"] = str(home.root)
    return env


def _closed_dir(path: Path) -> Path | None:
    """The first directory above ``path`` that other users cannot enter, if any."""
    for d in reversed(path.parents):
        if d != Path("/") and not d.stat().st_mode & 0o001:
            return d
    return None


def _interpreter_reachable(top: Path) -> list[str]:
    """A prefix for tcpserver's argv so that qmaild can run this test's interpreter.

    A venv made from /usr/bin/python3 needs nothing. One made from an interpreter under a
    directory closed to other users (a pyenv under /root, 0700) gets a private mount
    namespace (``unshare -m``) in which that directory is an empty 0755 tmpfs with only
    the interpreter's tree bound back in: the host is not changed, and tcpserver -u still
    makes qmail-smtpd a qmaild process that execs the same interpreter."""
    real = Path(os.path.realpath(sys.executable))
    base = Path(os.path.realpath(sys.base_prefix))
    closed = _closed_dir(real) or _closed_dir(base)
    if closed is None:
        return []
    require_tools("unshare", "mount")
    child = closed / real.relative_to(closed).parts[0]
    assert base.is_relative_to(child), (real, base)  # one tree to bind back in
    hold = top / "interpreter"
    hold.mkdir()
    script = (
        'set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=0755 tmpfs "$3"; '
        'mkdir "$1"; mount --bind "$2" "$1"; shift 3; exec "$@"'
    )
    return ["unshare", "-m", "sh", "-c", script, "sh", str(child), str(hold), str(closed)]


@pytest.fixture
def door() -> Iterator[RootDoor]:
    require_tools("tcpserver", "swaks", "dnsmasq", "opendkim-testmsg", "unshare")
    home = root_home("pyqmail-svcsign-")
    ids = home.ids()
    top = home.root.parent
    procs: list[subprocess.Popen[bytes]] = []
    dns = Dns(home, top)
    try:
        (home.control / "rcpthosts").write_text("test.example\n")
        env = _env(home)
        keygen = subprocess.run([str(BIN / "pyqmail"), "dkim", "keygen", "test.example"],
                                env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert keygen.returncode == 0, keygen.stderr
        name, value = keygen.stdout.splitlines()[:2]
        key = home.control / "dkim" / "test.example" / "rsa2048.key"
        assert key.stat().st_uid == ids.uid("queue")  # qmaild cannot read it: qmailq signs
        dns.start({name: value})
        install_cert(home, trustme.CA(), "mx.test.example")
        os.chown(home.control / "servercert.pem", ids.uid("daemon"), ids.gid("nofiles"))
        prog = top / "checkpw"
        prog.write_text(CHECKPW)
        prog.chmod(0o755)
        service_err = top / "service.stderr"
        with open(service_err, "wb") as f:  # as root: it drops to qmailq:qmail
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pyqmail.queue.service", "--home", str(home.root)],
                env=env, stdout=subprocess.DEVNULL, stderr=f,
            ))  # fmt: skip
        deadline = time.monotonic() + 60
        while b"listening" not in service_err.read_bytes():
            assert procs[0].poll() is None and time.monotonic() < deadline, service_err.read_text()
            time.sleep(0.05)
        port = free_port()
        err = top / "smtpd.stderr"
        with open(err, "wb") as f:
            procs.append(subprocess.Popen(
                [*_interpreter_reachable(top), "tcpserver", "-R", "-H", "-l", "mx.test.example",
                 "-u", str(ids.uid("daemon")), "-g", str(ids.gid("nofiles")),
                 "127.0.0.1", str(port),
                 str(BIN / "qmail-smtpd"), "mx.test.example", str(prog), "/bin/true"],
                env=env, stdout=subprocess.DEVNULL, stderr=f,
            ))  # fmt: skip
        _wait_greeting(port)
        yield RootDoor(home, port, dns, err, service_err)
        for name_, path in (("qmail-smtpd", err), ("queue service", service_err)):
            assert "Traceback" not in path.read_text(errors="replace"), name_
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(10)
        dns.stop()
        shutil.rmtree(top, ignore_errors=True)


def swaks(door: RootDoor, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{door.port}", "--tls", "--timeout", "60",
         "--from", "bob@test.example", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_authenticated_mail_through_the_service_is_signed_and_verifies(door: RootDoor) -> None:
    r = swaks(door, "--to", "x@elsewhere.example", "--auth", "PLAIN", "--auth-user", "bob",
              "--auth-password", "b0b pw", "--body", "marker-auth")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    mess = door.queued(b"marker-auth")
    assert b" with ESMTPSA " in mess
    assert b"(qmail " in mess and b" invoked from network)" in mess  # the service saw qmaild
    assert b"\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=test.example;" in mess
    v = door.dns.opendkim(mess)
    assert (v.returncode, v.stdout, v.stderr) == (0, b"", b"")
    tampered = door.dns.opendkim(mess.replace(b"marker-auth", b"marker-autH"))
    assert tampered.returncode != 0


def test_the_same_doors_unauthenticated_mail_is_not_signed(door: RootDoor) -> None:
    r = swaks(door, "--to", "x@test.example", "--body", "marker-anon")
    assert r.returncode == 0, r.stdout[-2000:]
    mess = door.queued(b"marker-anon")
    assert b" invoked from network)" in mess and b" with ESMTPS " in mess
    assert b"DKIM-Signature" not in mess


MSG = (
    b"From: Someone <someone@test.example>\nTo: dest@remote.example\nSubject: local\n"
    b"Date: Mon, 7 Dec 2026 11:00:00 +0000\nMessage-ID: <l1@test.example>\n\n"
)


def _submit_as(uid: int, gid: int, path: Path, body: bytes, sign: bool) -> int:
    """ServiceClient.submit in a child that became ``uid``; the service's exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports by its exit code
        code = 100
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = (
                ServiceClient(path)
                .submit([MSG + body], b"Fsomeone@test.example\0Tdest@remote.example\0\0", sign=sign)
                .code
            )
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_other_uids_asking_to_sign_are_treated_as_before(door: RootDoor) -> None:
    ids = door.home.ids()
    path = socket_path(door.home)
    nobody = pwd.getpwnam("nobody")
    require(nobody.pw_uid not in ids.uids.values(), "nobody is a qmail account", "fix passwd")
    # a local user: signed whether it asks or not (local injection, as before)
    for sign in (False, True):
        marker = b"marker-local-%d\n" % sign
        assert _submit_as(nobody.pw_uid, nobody.pw_gid, path, marker, sign) == 0
        mess = door.queued(marker)
        assert b" invoked by uid %d)" % nobody.pw_uid in mess
        v = door.dns.opendkim(mess)
        assert b"DKIM-Signature: v=1;" in mess and v.returncode == 0, v.stderr
    # qmails (bounces) asking: ignored, never signed
    assert _submit_as(ids.uid("send"), ids.gid("qmail"), path, b"marker-bounce\n", True) == 0
    mess = door.queued(b"marker-bounce")
    assert b" invoked for bounce)" in mess and b"DKIM-Signature" not in mess
