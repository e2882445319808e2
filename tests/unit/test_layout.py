"""pyqmail init: a complete home as qmail's install plus config-fast, idempotent."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from pyqmail.home import SPLIT, Home, HomeError, resolve_home
from pyqmail.layout import create_home, defaultdomain_of, plusdomain_of
from pyqmail.smtp import tls
from tests.conftest import is_root, qmail_ids, require


def run_init(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, PYQMAIL_SINGLE_USER="1")
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pyqmail.cli.main", "init", *args],
        capture_output=True,
        text=True,
        env=e,
    )


@pytest.mark.parametrize(
    ("fqdn", "ddom", "pdom"),
    [
        ("mx.test.example", "test.example", "test.example"),
        ("a.b.c.example", "b.c.example", "c.example"),
        ("example.com", "example.com", "example.com"),
    ],
)
def test_config_fast_domains(fqdn: str, ddom: str, pdom: str) -> None:
    assert defaultdomain_of(fqdn) == ddom
    assert plusdomain_of(fqdn) == pdom


def test_init_makes_every_part(tmp_path: Path) -> None:
    r = run_init(str(tmp_path / "q"), "--me", "mx.test.example")
    assert r.returncode == 0, r.stderr
    root = tmp_path / "q"
    c = root / "control"
    assert (c / "me").read_text() == "mx.test.example\n"
    assert (c / "defaultdomain").read_text() == "test.example\n"
    assert (c / "plusdomain").read_text() == "test.example\n"
    assert (c / "locals").read_text() == "mx.test.example\n"
    assert (c / "rcpthosts").read_text() == "mx.test.example\n"
    assert (c / "defaultdelivery").read_text() == "./Maildir/\n"
    for name in ("postmaster", "mailer-daemon", "root"):
        assert (root / "alias" / f".qmail-{name}").read_text() == "./Maildir/\n"
    for sub in ("cur", "new", "tmp"):
        assert (root / "alias" / "Maildir" / sub).is_dir()
    q = root / "queue"
    for d in ("mess", "info", "local", "remote"):
        subs = sorted(int(p.name) for p in (q / d).iterdir())
        assert subs == list(range(SPLIT))
    for d in ("pid", "intd", "todo", "bounce", "lock"):
        assert (q / d).is_dir()
    assert (q / "lock" / "tcpto").read_bytes() == b"\0" * 1024
    assert stat.S_ISFIFO((q / "lock" / "trigger").stat().st_mode)
    assert stat.S_IMODE((q / "pid").stat().st_mode) == 0o700


def test_init_twice_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "q"
    assert run_init(str(root), "--me", "mx.test.example").returncode == 0
    (root / "control" / "locals").write_text("mine.example\n")
    r = run_init(str(root), "--me", "other.example.net")
    assert r.returncode == 0
    assert "nothing to do" in r.stdout
    assert (root / "control" / "locals").read_text() == "mine.example\n"
    assert (root / "control" / "me").read_text() == "mx.test.example\n"


def test_init_refuses_a_name_without_dot(tmp_path: Path) -> None:
    r = run_init(str(tmp_path / "q"), "--me", "localhost")
    assert r.returncode == 100
    assert "fully qualified" in r.stderr
    assert not (tmp_path / "q").exists()


def test_home_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYQMAIL_HOME", raising=False)
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    assert resolve_home().root == Path("/var/qmail")
    monkeypatch.setenv("PYQMAIL_HOME", str(tmp_path))
    assert resolve_home().root == tmp_path
    assert resolve_home(tmp_path / "x").root == tmp_path / "x"
    assert not resolve_home().single_user
    monkeypatch.setenv("PYQMAIL_SINGLE_USER", "1")
    assert resolve_home().single_user
    monkeypatch.setenv("PYQMAIL_SINGLE_USER", "0")
    assert not resolve_home().single_user
    assert resolve_home(single_user=True).single_user


def test_single_user_ids_are_the_caller(tmp_path: Path) -> None:
    ids = Home(tmp_path, single_user=True).ids()
    assert ids.uid("queue") == os.getuid()
    assert ids.uid("alias") == os.getuid()
    assert ids.gid("qmail") == os.getgid()


def test_missing_accounts_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pwd

    real = pwd.getpwnam

    def fake(name: str) -> pwd.struct_passwd:
        if name == "qmailq":
            raise KeyError(name)
        return real(name) if name == "root" else real("root")

    monkeypatch.setattr(pwd, "getpwnam", fake)
    with pytest.raises(HomeError, match="user qmailq"):
        Home(tmp_path).ids()


def test_create_home_single_user_owns_nothing_special(tmp_path: Path) -> None:
    h = Home(tmp_path / "q", single_user=True)
    report = create_home(h, "mx.test.example", None)
    assert str(h.root / "control" / "me") in report.created
    assert (h.root / "queue" / "mess" / "0").stat().st_uid == os.getuid()


def _root_home(tmp_path: Path) -> tuple[Home, int, Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ids = qmail_ids()  # under root a missing account is an error naming `make accounts`
    h = Home(tmp_path / "q", single_user=False)
    create_home(h, "mx.test.example", ids)
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    return h, ids.uid("queue"), outside


@pytest.mark.root
def test_init_again_writes_nothing_through_a_symlink_the_queue_owner_planted(
    tmp_path: Path,
) -> None:
    h, qmailq, outside = _root_home(tmp_path)
    victim = outside / "shadow"
    victim.write_bytes(b"root:secret\n")
    victim.chmod(0o600)
    lock = h.queue / "lock"
    (lock / "tcpto").unlink()  # what qmailq may do in its lock/
    (lock / "tcpto.init-tmp").symlink_to(victim)
    os.lchown(lock / "tcpto.init-tmp", qmailq, -1)
    (lock / "trigger").unlink()
    create_home(h, "mx.test.example", h.ids())
    st = victim.stat()
    assert (st.st_uid, st.st_mode & 0o7777, victim.read_bytes()) == (0, 0o600, b"root:secret\n")
    t = os.lstat(lock / "tcpto")
    assert stat.S_ISREG(t.st_mode) and t.st_uid == h.ids().uid("remote") and t.st_size == 1024
    assert stat.S_ISFIFO(os.lstat(lock / "trigger").st_mode)


@pytest.mark.root
def test_init_again_makes_no_directory_through_a_planted_symlink(tmp_path: Path) -> None:
    h, qmailq, outside = _root_home(tmp_path)
    mess = h.queue / "mess"
    mess.rename(h.queue / "mess.real")
    mess.symlink_to(outside)
    os.lchown(mess, qmailq, -1)
    with pytest.raises(OSError):
        create_home(h, "mx.test.example", h.ids())
    assert list(outside.iterdir()) == []


def test_init_makes_a_self_signed_servercert_for_starttls(tmp_path: Path) -> None:
    root = tmp_path / "q"
    r = run_init(str(root), "--me", "mx.test.example")
    assert r.returncode == 0, r.stderr
    pem = root / "control" / "servercert.pem"
    assert f"created {pem} (self-signed, for mx.test.example)" in r.stdout
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.stat().st_uid == os.getuid()
    tls.server_context(pem)  # key and certificate in one usable file
    cert = x509.load_pem_x509_certificates(pem.read_bytes())[0]
    assert cert.subject.rfc4514_string() == "CN=mx.test.example"
    before = pem.read_bytes()
    assert run_init(str(root), "--me", "other.example.net").returncode == 0
    assert pem.read_bytes() == before  # an existing certificate is never replaced


def test_init_as_root_gives_the_certificate_to_qmaild_alone(tmp_path: Path) -> None:
    require(is_root(), "needs root", "run the tests as root (CI does)")
    ids = qmail_ids()
    root = tmp_path / "q"
    r = run_init(str(root), "--me", "mx.test.example", env={"PYQMAIL_SINGLE_USER": ""})
    assert r.returncode == 0, r.stderr
    st = (root / "control" / "servercert.pem").stat()
    assert (st.st_uid, st.st_gid) == (ids.uid("daemon"), ids.gid("nofiles"))
    assert stat.S_IMODE(st.st_mode) == 0o600
