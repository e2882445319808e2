"""``pyqmail adopt`` on a fake qmail site built in a temp dir, and ``--rollback``.

The site is what a qmail installation looks like: control files (qmail's and the common
patches'), users/assign and its cdb, .qmail files, an rc passing ./Maildir/ to qmail-start,
daemontools run scripts (qmail-smtpd under envdir, softlimit, tcpserver -x RULES and
rblsmtpd with a checkpassword program) and a message in the queue in qmail's format.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyqmail.adopt import plan as adopt_plan
from pyqmail.home import Home
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import QueueWriter
from tests.conftest import write_control

BIN = Path(sys.executable).parent

SMTPD_RUN = """#!/bin/sh
QMAILDUID=`id -u qmaild`
exec envdir ./env softlimit -m 20000000 \\
  tcpserver -v -R -l old.example -c 30 -x {rules} -u "$QMAILDUID" -g 995 0 smtp \\
  rblsmtpd -r bl.test {home}/bin/qmail-smtpd old.example /bin/checkpassword /bin/true 2>&1
"""


class Site:
    def __init__(self, home: Home, tmp: Path) -> None:
        self.home = home
        self.root = home.root
        self.rules = tmp / "etc" / "tcp.smtp.cdb"
        self.rules.parent.mkdir()
        self.rules.write_bytes(b"")  # its content does not matter to adopt
        self.alice = tmp / "alice"
        for sub in ("cur", "new", "tmp"):
            (self.alice / "Maildir" / sub).mkdir(parents=True)
        (home.control / "defaultdelivery").unlink(missing_ok=True)  # pyqmail init's, not qmail's
        write_control(home, "locals", "old.example\n")
        write_control(home, "rcpthosts", "old.example\n")
        write_control(home, "smtproutes", "remote.test:127.0.0.1:2525\n")
        write_control(home, "concurrencyremote", "500\n")
        for name in ("servercert.pem", "validrcptto.cdb", "authsenders", "frobnicate"):
            write_control(home, name, "x\n")
        (home.control / "domainkeys").mkdir()
        u, g = os.getuid(), os.getgid()
        (home.users / "assign").write_text(f"=alice:alice:{u}:{g}:{self.alice}:::\n.\n")
        subprocess.run([str(BIN / "pyqmail"), "newu"], check=True, env=self.env)
        (home.alias / ".qmail-postmaster").write_text("&alice@old.example\n")
        (home.alias / ".qmail-root").write_text(f"|{self.root}/bin/preline procmail\n")
        (self.root / "rc").write_text(
            f'#!/bin/sh\nexec env - PATH="{self.root}/bin:$PATH" \\\n'
            "qmail-start ./Maildir/ splogger qmail\n"
        )
        sup = self.root / "supervise"
        for svc in ("qmail-send", "qmail-smtpd"):
            (sup / svc / "log").mkdir(parents=True)
            (sup / svc / "log" / "run").write_text("#!/bin/sh\nexec multilog t ./main\n")
        (sup / "qmail-send" / "run").write_text(f"#!/bin/sh\nexec {self.root}/rc\n")
        (sup / "qmail-smtpd" / "run").write_text(SMTPD_RUN.format(rules=self.rules, home=self.root))
        (sup / "qmail-smtpd" / "env").mkdir()
        (sup / "qmail-smtpd" / "env" / "QMAILQUEUE").write_text("/usr/local/bin/scanq\n")
        self.queued = self.queue("old queue")

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, PYQMAIL_HOME=str(self.root), PYQMAIL_SINGLE_USER="1")

    def queue(self, subject: str) -> int:
        p = QueueWriter(self.home).begin()
        p.write(f"Subject: {subject}\n\nbody\n".encode())
        return p.commit(b"bob@old.example", [b"alice@old.example"])

    def adopt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "pyqmail"), "adopt", str(self.root), "--single-user", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )

    def snapshot(self) -> dict[str, tuple[int, int, str]]:
        out = {}
        for d, dirs, names in os.walk(self.root.parent):
            for n in dirs + names:
                p = os.path.join(d, n)
                st = os.lstat(p)
                digest = ""
                if os.path.isfile(p) and not os.path.islink(p):
                    digest = hashlib.sha1(Path(p).read_bytes()).hexdigest()
                out[p] = (st.st_mode, st.st_mtime_ns, digest)
        return out


@pytest.fixture
def site(home: Home, tmp_path: Path) -> Site:
    return Site(home, tmp_path)


def test_dry_run_prints_the_plan_and_changes_nothing(site: Site) -> None:
    before = site.snapshot()
    r = site.adopt("--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert site.snapshot() == before
    out = r.stdout
    for expect in (
        "same: control/locals: read as qmail reads it",
        "differs: control/concurrencyremote: no compile-time cap",
        "unsupported: control/servercert.pem: read by the qmail-tls patch",
        "unsupported: control/validrcptto.cdb: read by the validrcptto patch",
        "unsupported: control/authsenders: read by the qmail-remote-auth patch",
        "unsupported: control/domainkeys/: read by the qmail-dkim",
        "unsupported: control/frobnicate: no qmail program or known patch",
        "same: users/cdb: qmail-newu's cdb",
        "1 forward",
        "runs qmail's own program",
        "1 message(s), 1 todo entr(ies)",
        "rblsmtpd -r bl.test: pyqmail run checks the lists in control/rbllist",
        "write there: bl.test",
        "checkpassword program /bin/checkpassword",
        "QMAILQUEUE: /usr/local/bin/scanq: kept in pyqmail run's environment",
        "softlimit: -m 20000000: not carried over",
        "-c 30: pyqmail run's SMTP listener",
        f"-x {site.rules}: pyqmail run --rules {site.rules}",
        "logger splogger qmail",
        f"will write {site.root}/control/defaultdelivery: './Maildir/'",
    ):
        assert expect in out, f"{expect!r} not in:\n{out}"
    (cmd,) = [line for line in out.splitlines() if line.startswith("pyqmail run command: ")]
    assert cmd.endswith(
        f" run --home {site.root} --single-user --smtp 0.0.0.0:25 --rules {site.rules}"
    )


def test_adopt_keeps_everything_then_pyqmail_delivers_and_rollback_restores(site: Site) -> None:
    sup = site.root / "supervise"
    originals = {
        p: p.read_bytes() for p in (sup / "qmail-send" / "run", sup / "qmail-smtpd" / "run")
    }
    before = set(site.snapshot())
    r = site.adopt()
    assert r.returncode == 0, r.stdout + r.stderr
    assert before <= set(site.snapshot()), "adopt deleted something"
    state = site.root / "pyqmail-adopt"
    for path, data in originals.items():
        backup = state / "backup" / str(path).lstrip("/")
        assert backup.read_bytes() == data
        assert f"kept {path} as {backup}" in r.stdout
    send_run = (sup / "qmail-send" / "run").read_text()
    assert f"pyqmail run --home {site.root} --single-user --smtp 0.0.0.0:25" in send_run
    assert "QMAILQUEUE=/usr/local/bin/scanq" in send_run
    assert os.access(sup / "qmail-send" / "run", os.X_OK)
    assert (sup / "qmail-smtpd" / "down").exists()
    assert (site.home.control / "defaultdelivery").read_text() == "./Maildir/\n"

    # pyqmail takes qmail's queue: the message reaches ./Maildir/, the rc's default delivery
    log = open(site.root.parent / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "pyqmail"), "run", "--home", str(site.root), "--single-user"],
        stdout=log,
        stderr=log,
        env=site.env,
    )
    try:
        deadline = time.monotonic() + 60
        while not list((site.alice / "Maildir" / "new").iterdir()):
            assert time.monotonic() < deadline, (site.root.parent / "run.log").read_text()
            assert proc.poll() is None, (site.root.parent / "run.log").read_text()
            time.sleep(0.05)
        assert r.returncode == 0
        again = site.adopt("--dry-run")
        assert again.returncode == 1 and "blocker: queue/lock/sendmutex: held" in again.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log.close()
    (msg,) = (site.alice / "Maildir" / "new").iterdir()
    assert b"Subject: old queue" in msg.read_bytes()

    # and back: a message pyqmail queued stays, in qmail's format, for qmail-send
    n = site.queue("for qmail again")
    paths = QueuePaths(site.home.queue)
    todo = parse_todo(paths.todo(n).read_bytes())
    assert (todo.sender, todo.recipients) == (b"bob@old.example", (b"alice@old.example",))
    r = site.adopt("--rollback")
    assert r.returncode == 0, r.stdout
    for path, data in originals.items():
        assert path.read_bytes() == data
    assert not (sup / "qmail-smtpd" / "down").exists()
    assert not (site.home.control / "defaultdelivery").exists()
    kept = list((state / "after").rglob("defaultdelivery"))
    assert len(kept) == 1 and kept[0].read_text() == "./Maildir/\n"
    assert "1 message(s), 1 todo entr(ies)" in r.stdout and "blocker" not in r.stdout
    assert site.adopt("--rollback").returncode == 1  # nothing left to roll back
    assert site.adopt().returncode == 0  # and it can be adopted again


def test_refuses_while_qmail_send_holds_the_queue(site: Site) -> None:
    fd = os.open(site.home.queue / "lock" / "sendmutex", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        before = site.snapshot()
        r = site.adopt()
        assert r.returncode == 1
        assert "blocker: queue/lock/sendmutex: held" in r.stdout
        assert "not adopting" in r.stdout
        assert site.snapshot() == before
    finally:
        os.close(fd)


def test_second_adopt_is_refused_until_rollback(site: Site) -> None:
    assert site.adopt().returncode == 0
    r = site.adopt()
    assert r.returncode == 1 and "adopt already ran here" in r.stdout


def test_not_a_qmail_home(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN / "pyqmail"), "adopt", str(tmp_path), "--dry-run"], capture_output=True, text=True
    )
    assert r.returncode == 100 and "not a qmail home" in r.stdout


def test_services_found_by_home_and_deduplicated(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = tmp_path / "service"
    (service / "other").mkdir(parents=True)
    (service / "other" / "run").write_text("#!/bin/sh\nexec /usr/sbin/dovecot -F\n")
    (service / "qmail-smtpd").symlink_to(site.root / "supervise" / "qmail-smtpd")
    monkeypatch.setattr(adopt_plan, "SERVICE_DIRS", (service,))
    found = adopt_plan.find_services(site.root, None)
    assert sorted(p.name for p in found) == ["qmail-send", "qmail-smtpd"]
    explicit = adopt_plan.find_services(site.root, [service / "other"])
    assert [p.name for p in explicit] == ["other"]
