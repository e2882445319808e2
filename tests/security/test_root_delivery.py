"""Hostile local parts through ``pyqmail run`` as root in multi-user mode: SMTP as qmaild,
the root spawner, the delivery forked and dropped to the recipient (nobody). The values
reach the program only as environment, the program runs as nobody, and nothing is run by
a shell from the address (local.md 3.8-3.9; gaps.md 3.1)."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.conftest import free_port, is_root
from tests.integration.test_run_daemon import wait_for
from tests.security._support import root_home, root_run

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]

LOCALS = ["joe-a;touch${IFS}/tmp/PWNED_R1", "joe-$(touch /tmp/PWNED_R2)", "joe-`touch PWNED_R3`",
          "joe-../../PWNED_R4", "joe-|touch PWNED_R5"]  # fmt: skip


@pytest.fixture
def multi(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Home, Path, int]]:
    monkeypatch.delenv("PYQMAIL_SINGLE_USER", raising=False)
    home = root_home("pyqmail-sec-root-")
    d = home.root.parent
    (home.control / "locals").write_text("test.example\n")
    (home.control / "rcpthosts").write_text("test.example\n")
    # boss (uid 0) and joe-secret (a .qmail only root may read) would be deferred at RCPT
    # (451, as their deliveries defer); these tests are about the deliveries themselves
    (home.control / "rcptchecks").write_text("0\n")
    nobody = pwd.getpwnam("nobody")
    user = d / "nobody"
    (user / "dumps").mkdir(parents=True)
    (user / ".qmail-default").write_text('|env -0 > "dumps/$$"\n')
    (user / ".qmail-envdump").write_text("|cat /proc/$$/environ > env.tmp; mv env.tmp env.out\n")
    for p in (user, user / "dumps", user / ".qmail-default", user / ".qmail-envdump"):
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    # the user's own symlink to a file only root may read: opened as the user, it fails
    secret = d / "secret"
    secret.write_text("&stolen@elsewhere.example\n")
    secret.chmod(0o600)
    (user / ".qmail-secret").symlink_to(secret)
    os.lchown(user / ".qmail-secret", nobody.pw_uid, nobody.pw_gid)
    boss = d / "boss"  # an assign line that names uid 0: must never be delivered
    boss.mkdir()
    (boss / ".qmail").write_text(f"|touch {boss}/PWNED_AS_ROOT\n")
    (home.users / "assign").write_text(
        f"+joe-:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:-::\n=boss:root:0:0:{boss}:::\n.\n"
    )
    env = dict(os.environ, PYQMAIL_HOME=str(home.root))
    subprocess.run([str(BIN / "pyqmail"), "newu"], check=True, env=env)
    yield home, user, nobody.pw_uid
    shutil.rmtree(d, ignore_errors=True)


def test_hostile_local_parts_via_the_root_spawner(multi: tuple[Home, Path, int]) -> None:
    home, user, uid = multi
    port = free_port()
    # none of the starter's environment (OLDPWD, DEFAULT, its locale) reaches a program
    env = {k: v for k, v in os.environ.items() if k not in ("LANG", "LC_ALL", "LC_CTYPE")}
    env.update(OLDPWD="/root", DEFAULT="from-the-starter")
    env.pop("QMAILQUEUE", None)
    with root_run(home, port, env=env) as (_, log):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for local in [*LOCALS, "boss", "joe-secret", "joe-envdump"]:
                assert s.docmd("MAIL FROM:<carol@elsewhere.example>")[0] == 250
                # quoted, as RFC 5321 needs for these; queued and delivered unquoted
                assert s.docmd(f'RCPT TO:<"{local}"@test.example>')[0] == 250
                assert s.data(b"Subject: hostile\r\n\r\nbody\r\n")[0] == 250
        dumps = user / "dumps"
        wait_for(lambda: len(list(dumps.iterdir())) == len(LOCALS), 60, "dumps")
        seen = set()
        for f in dumps.iterdir():
            wait_for(lambda f=f: f.stat().st_size > 0, 30, "dump written")
            assert f.stat().st_uid == uid  # written by the program, running as nobody
            vals = dict(x.split(b"=", 1) for x in f.read_bytes().split(b"\0") if b"=" in x)
            seen.add(vals[b"LOCAL"].decode())
            assert vals[b"USER"] == b"nobody"
        assert seen == set(LOCALS)
        for root in (Path("/tmp"), user, home.root):
            assert list(root.glob("PWNED_R*")) == []
        wait_for((user / "env.out").exists, 60, "env.out")
        got = dict(x.split(b"=", 1) for x in (user / "env.out").read_bytes().split(b"\0") if x)
        assert got.pop(b"UFLINE").startswith(b"From carol@elsewhere.example ")
        qroot = str(home.root).encode()
        assert got == {
            b"PATH": qroot + b"/bin:/usr/local/bin:/usr/bin:/bin", b"PYQMAIL_HOME": qroot,
            b"USER": b"nobody", b"HOME": str(user).encode(), b"LOCAL": b"joe-envdump",
            b"HOST": b"test.example", b"HOST2": b"test", b"HOST3": b"test", b"HOST4": b"test",
            b"RECIPIENT": b"joe-envdump@test.example", b"SENDER": b"carol@elsewhere.example",
            b"NEWSENDER": b"carol@elsewhere.example", b"EXT": b"envdump", b"EXT2": b"",
            b"EXT3": b"", b"EXT4": b"", b"DTLINE": b"Delivered-To: joe-envdump@test.example\n",
            b"RPLINE": b"Return-Path: <carol@elsewhere.example>\n",
        }  # fmt: skip
        wait_for(lambda: "deliveries_as_root" in log.read_text(errors="replace"), 60, "deferral")
        assert not (user.parent / "boss" / "PWNED_AS_ROOT").exists()
        wait_for(lambda: "Unable_to_open_.qmail-secret" in log.read_text(errors="replace"), 60,
                 "the .qmail-secret deferral")  # fmt: skip
        assert "stolen@elsewhere.example" not in log.read_text(errors="replace")
    assert "Traceback" not in log.read_text(errors="replace")
