"""The local commands as qmail programs: arguments, stdin/stdout, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home

BIN = Path(sys.executable).parent
MSG = b"Subject: hi\n\nFrom here\nbody\n"

FAKEQQ = """#!{python}
import os, sys
out = {out!r}
with open(os.path.join(out, "msg"), "wb") as f:
    f.write(sys.stdin.buffer.read())
with open(os.path.join(out, "env"), "wb") as f:
    f.write(os.fdopen(1, "rb").read())
sys.exit({code})
"""


def run(
    cmd: list[str],
    stdin: bytes | Path = b"",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    argv = [str(BIN / cmd[0]), *cmd[1:]]
    if isinstance(stdin, Path):
        with open(stdin, "rb") as f:
            return subprocess.run(
                argv, stdin=f, capture_output=True, env=full_env, cwd=cwd, timeout=60
            )
    return subprocess.run(argv, input=stdin, capture_output=True, env=full_env, cwd=cwd, timeout=60)


@pytest.fixture
def fakeqq(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "queued"
    out.mkdir()
    script = tmp_path / "fakeqq"
    script.write_text(FAKEQQ.format(python=sys.executable, out=str(out), code=0))
    script.chmod(0o755)
    return script, out


@pytest.fixture
def joe(tmp_path: Path) -> Path:
    h = tmp_path / "joe"
    h.mkdir(mode=0o755)
    r = run(["maildirmake", str(h / "Maildir")])
    assert r.returncode == 0
    return h


def test_qmail_local_command(joe: Path, tmp_path: Path) -> None:
    (joe / ".qmail-ext").write_text("|echo out; echo err >&2\n./Maildir/\n")
    m = tmp_path / "m"
    m.write_bytes(MSG)
    args = [
        "qmail-local",
        "--",
        "joe",
        str(joe),
        "joe-ext",
        "-",
        "ext",
        "ex.com",
        "s@x.com",
        "./Maildir/",
    ]
    r = run(args, m)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"out\ndid 1+0+1\n", b"err\n")
    (f,) = os.listdir(joe / "Maildir" / "new")
    assert (joe / "Maildir" / "new" / f).read_bytes() == (
        b"Return-Path: <s@x.com>\nDelivered-To: joe-ext@ex.com\n" + MSG
    )
    r = run(args, MSG)  # a pipe on fd 0 is spooled first
    assert r.returncode == 0 and len(os.listdir(joe / "Maildir" / "new")) == 2
    r = run(
        ["qmail-local", "--", "joe", str(joe), "joe-x", "-", "x", "ex.com", "s@x.com", "./M/"], m
    )
    assert (r.returncode, r.stderr) == (100, b"Sorry, no mailbox here by that name. (#5.1.1)\n")
    r = run(
        ["qmail-local", "-n", "--", "joe", str(joe), "joe-ext", "-", "ext", "e", "s", "./M/"], m
    )
    assert (r.returncode, r.stdout) == (
        0,
        b"program echo out; echo err >&2\nmaildir ./Maildir/\ndid 1+0+1\n",
    )
    usage = b"qmail-local: usage: qmail-local [ -nN ] user homedir local dash ext domain sender"
    for bad in (["joe", "relative", "l", "", "", "d", "s", "x"], ["joe"], ["-x", *args[2:]]):
        r = run(["qmail-local", *bad])
        assert r.returncode == 100  # qmail's usage() exits 100
        assert r.stderr.startswith(b"qmail-local: illegal option -- x\n" * (bad[0] == "-x") + usage)


def test_qmail_local_program_environment(joe: Path) -> None:
    """The command passes on exactly what it was started with (DEFAULT too, when no
    default file matched) plus its own variables; Python's LC_CTYPE coercion (PEP 538,
    no locale set) never reaches the program."""
    (joe / ".qmail-ext").write_text("|cat /proc/$$/environ > env.out\n")
    (joe / ".qmail-d-default").write_text("|cat /proc/$$/environ > default.out\n")
    given = {"PATH": "/usr/bin:/bin", "DEFAULT": "given", "FOO": "bar=baz"}
    for local, ext in (("joe-ext", "ext"), ("joe-d-Y", "d-Y")):
        r = subprocess.run(
            [str(BIN / "qmail-local"), "--", "joe", str(joe), local, "-", ext, "h", "", "./M/"],
            input=MSG, capture_output=True, env=given, timeout=60,
        )  # fmt: skip
        assert (r.returncode, r.stdout, r.stderr) == (0, b"did 0+0+1\n", b"")
    own = {
        "USER": "joe", "HOME": str(joe), "HOST": "h", "HOST2": "h", "HOST3": "h", "HOST4": "h",
        "SENDER": "", "NEWSENDER": "", "RPLINE": "Return-Path: <>\n",
    }  # fmt: skip
    for name, local, ext, default in (
        ("env.out", "joe-ext", "ext", "given"),
        ("default.out", "joe-d-Y", "d-Y", "Y"),
    ):
        env = dict(x.split("=", 1) for x in (joe / name).read_text().split("\0") if x)
        assert env.pop("UFLINE").startswith("From MAILER-DAEMON ")
        assert env == {
            **given, **own, "LOCAL": local, "RECIPIENT": f"{local}@h", "EXT": ext,
            "EXT2": ext.partition("-")[2], "EXT3": "", "EXT4": "", "DEFAULT": default,
            "DTLINE": f"Delivered-To: {local}@h\n",
        }  # fmt: skip


def test_qmail_local_refuses_a_function_definition(joe: Path) -> None:
    (joe / ".qmail-ext").write_text("|touch ran\n")
    r = run(["qmail-local", "--", "joe", str(joe), "joe-ext", "-", "ext", "h", "() { :;}", "x"])
    assert (r.returncode, r.stdout) == (100, b"")
    assert r.stderr == (
        b"Sorry, $SENDER would look like a shell function definition to a program;"
        b" I won't run one with it. (#5.7.1)\n"
    )
    assert not (joe / "ran").exists()


def test_qmail_local_program_timeout_env(joe: Path) -> None:
    (joe / ".qmail-ext").write_text("|sleep 300\n")
    args = [
        "qmail-local",
        "--",
        "joe",
        str(joe),
        "joe-ext",
        "-",
        "ext",
        "ex.com",
        "s@x.com",
        "./M/",
    ]
    r = run(args, MSG, env={"PYQMAIL_PROGRAM_TIMEOUT": "0.5"})
    assert (r.returncode, r.stderr) == (
        111,
        b"Timeout on program delivery after 0.5 seconds. (#4.3.0)\n",
    )


def test_qmail_newu_and_getpw(home: Home, tmp_path: Path) -> None:
    (home.users / "assign").write_text("=joe:joe:507:100:/home/joe:::\n.\n")
    r = run(["qmail-newu"])
    assert r.returncode == 0 and (home.users / "cdb").exists()
    before = (home.users / "cdb").read_bytes()
    (home.users / "assign").write_text("=joe:joe:507:100:/home/joe::\n.\n")
    r = run(["qmail-newu"])
    assert (r.returncode, r.stderr) == (111, b"qmail-newu: fatal: bad format in users/assign\n")
    assert (home.users / "cdb").read_bytes() == before
    r = run(["qmail-getpw", "Some-Body"])
    assert r.returncode == 0
    assert r.stdout == b"alias\0%d\0%d\0%s\0-\0Some-Body\0" % (
        os.getuid(),
        os.getgid(),
        str(home.alias).encode(),
    )
    assert run(["qmail-getpw"]).returncode == 112


def test_qmail_pw2u(home: Home, tmp_path: Path) -> None:
    h1 = tmp_path / "h1"
    h1.mkdir()
    al = tmp_path / "al"
    al.mkdir()
    uid = os.getuid() or 4242
    if os.getuid() == 0:
        os.chown(h1, uid, 0)
        os.chown(al, uid + 1, 0)
    passwd = (
        f"root:x:0:0::/root:/bin/sh\n"
        f"joe:x:{uid}:100:Joe:{h1}:/bin/sh\n"
        f"Ann:x:{uid}:100::{h1}:/bin/sh\n"
        f"bob:x:{uid}:100::/nonexistent:/bin/sh\n"
        f"alias:x:{uid + 1}:7::{al}:/bin/false\n"
    )
    (home.users / "mailnames").write_text("joe:joe:Joe.Smith\n")
    (home.users / "append").write_text("=extra:x:1:1:/x:::\n")
    r = run(["qmail-pw2u"], passwd.encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == (
        f"=joe:joe:{uid}:100:{h1}:::\n"
        f"+joe-:joe:{uid}:100:{h1}:-::\n"
        f"=Joe.Smith:joe:{uid}:100:{h1}:::\n"
        f"+Joe.Smith-:joe:{uid}:100:{h1}:-::\n"
        f"+:alias:{uid + 1}:7:{al}:-::\n"
        f"=alias:alias:{uid + 1}:7:{al}:::\n"
        f"+alias-:alias:{uid + 1}:7:{al}:-::\n"
        f"=extra:x:1:1:/x:::\n"
        ".\n"
    )
    r = run(["qmail-pw2u", "-h"], passwd.encode())
    assert (r.returncode, r.stderr) == (111, b"qmail-pw2u: fatal: unable to stat /nonexistent\n")
    r = run(["qmail-pw2u"], b"joe:x:5:5::/:/bin/sh\n")
    assert (r.returncode, r.stderr) == (111, b"qmail-pw2u: fatal: unable to find alias user\n")


def test_maildirmake(tmp_path: Path) -> None:
    r = run(["maildirmake", str(tmp_path / "M")])
    assert r.returncode == 0
    assert sorted(os.listdir(tmp_path / "M")) == ["cur", "new", "tmp"]
    assert (os.stat(tmp_path / "M" / "new").st_mode & 0o777) == 0o700
    r = run(["maildirmake", str(tmp_path / "M")])
    assert r.returncode == 111 and r.stderr.startswith(b"maildirmake: fatal: unable to mkdir ")
    assert run(["maildirmake"]).returncode == 100


QENV = {
    "UFLINE": "From s@x Thu Jan 01 00:00:00 1970\n",
    "RPLINE": "Return-Path: <s@x>\n",
    "DTLINE": "Delivered-To: u@h\n",
}


@pytest.mark.parametrize(
    ("opts", "head"),
    [
        ([], QENV["UFLINE"] + QENV["RPLINE"] + QENV["DTLINE"]),
        (["-f"], QENV["RPLINE"] + QENV["DTLINE"]),
        (["-frd"], ""),
        (["-d", "-D", "-r"], QENV["UFLINE"] + QENV["DTLINE"]),
    ],
)
def test_preline(opts: list[str], head: str) -> None:
    r = run(["preline", *opts, "cat"], MSG, env=QENV)
    assert (r.returncode, r.stdout) == (0, head.encode() + MSG)


def test_preline_errors() -> None:
    assert run(["preline", "cat"], MSG).returncode == 100  # env missing
    assert run(["preline", "sh", "-c", "cat >/dev/null; exit 7"], MSG, env=QENV).returncode == 7
    r = run(["preline", "true"], MSG * 100_000, env=QENV)
    assert r.returncode == 111 and b"unable to copy input" in r.stderr
    assert run(["preline", "/nonexistent/prog"], MSG, env=QENV).returncode == 100


@pytest.mark.parametrize(
    ("child", "code"),
    [
        (["true"], 100),
        (["false"], 0),
        (["sh", "-c", "exit 111"], 111),
        (["sh", "-c", "kill -9 $$"], 111),
    ],
)
def test_except(child: list[str], code: int) -> None:
    assert run(["except", *child]).returncode == code


def test_bouncesaying() -> None:
    r = run(["bouncesaying", "Go away."])
    assert (r.returncode, r.stderr) == (100, b"Go away.\n")
    assert run(["bouncesaying", "No.", "true"]).returncode == 100
    assert run(["bouncesaying", "No.", "false"]).returncode == 0
    r = run(["bouncesaying", "No.", "sh", "-c", "exit 111"])
    assert (r.returncode, r.stderr) == (111, b"bouncesaying: fatal: temporary child error\n")
    assert run(["bouncesaying"]).returncode == 100


def test_forward(home: Home, fakeqq: tuple[Path, Path]) -> None:
    script, out = fakeqq
    env = {"QMAILQUEUE": str(script), "NEWSENDER": "owner@x", "DTLINE": "Delivered-To: u@h\n"}
    r = run(["forward", "a@b", "c@d"], MSG, env=env)
    assert r.returncode == 0 and r.stderr.startswith(b"forward: qp ")
    assert (out / "env").read_bytes() == b"Fowner@x\0Ta@b\0Tc@d\0\0"
    assert (out / "msg").read_bytes() == b"Delivered-To: u@h\n" + MSG
    r = run(["forward", "a@b"], MSG, env={"QMAILQUEUE": str(script)})
    assert (r.returncode, r.stderr) == (100, b"forward: fatal: NEWSENDER not set\n")


def test_forward_queue_refusal(home: Home, tmp_path: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    script = tmp_path / "refuse"
    script.write_text(FAKEQQ.format(python=sys.executable, out=str(out), code=31))
    script.chmod(0o755)
    env = {"QMAILQUEUE": str(script), "NEWSENDER": "o@x", "DTLINE": "Delivered-To: u@h\n"}
    r = run(["forward", "a@b"], MSG, env=env)
    assert (r.returncode, r.stderr) == (
        100,
        b"forward: fatal: mail server permanently rejected message (#5.3.0)\n",
    )


def test_condredirect(home: Home, fakeqq: tuple[Path, Path], tmp_path: Path) -> None:
    script, out = fakeqq
    env = {
        "QMAILQUEUE": str(script),
        "SENDER": "orig@x",
        "NEWSENDER": "not-this@x",
        "DTLINE": "Delivered-To: u@h\n",
    }
    m = tmp_path / "m"
    m.write_bytes(MSG)
    r = run(["condredirect", "new@addr", "grep", "-q", "From here"], m, env=env)
    assert r.returncode == 99 and r.stderr.startswith(b"condredirect: qp ")
    assert (out / "env").read_bytes() == b"Forig@x\0Tnew@addr\0\0"
    assert (out / "msg").read_bytes() == b"Delivered-To: u@h\n" + MSG  # rewound after grep
    (out / "env").unlink()
    assert run(["condredirect", "new@addr", "false"], m, env=env).returncode == 0
    assert run(["condredirect", "new@addr", "/nonexistent"], m, env=env).returncode == 0
    assert not (out / "env").exists()
    assert run(["condredirect", "new@addr", "sh", "-c", "exit 111"], m, env=env).returncode == 111
    assert run(["condredirect", "x"], m, env=env).returncode == 100
    r = run(["condredirect", "piped@addr", "cat"], MSG, env=env)  # stdin is a pipe
    assert r.returncode == 99
    assert (out / "msg").read_bytes() == b"Delivered-To: u@h\n" + MSG


def test_maildir2mbox(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    assert run(["maildirmake", str(md)]).returncode == 0
    (md / "new" / "1").write_bytes(b"Return-Path: <a b@x>\nSubject: one\n\nFrom me\n")
    (md / "cur" / "2").write_bytes(b"Return-Path: <>\nSubject: two\n\nno newline")
    (md / "new" / "3").write_bytes(b"Subject: three\n\nx\n")
    for name, t in (("new/1", 100), ("cur/2", 200), ("new/3", 300)):
        os.utime(md / name, (t, t))
    mail = tmp_path / "mbox"
    mail.write_bytes(b"old\n")
    env = {"MAILDIR": str(md), "MAIL": str(mail), "MAILTMP": str(tmp_path / "mbox.tmp")}
    r = run(["maildir2mbox"], env=env)
    assert r.returncode == 0, r.stderr
    assert mail.read_bytes() == (
        b"old\n"
        b"From a-b@x Thu Jan 01 00:01:40 1970\nReturn-Path: <a b@x>\nSubject: one\n\n>From me\n\n"
        b"From MAILER-DAEMON Thu Jan 01 00:03:20 1970\nReturn-Path: <>\n"
        b"Subject: two\n\nno newline\n\n"
        b"From XXX Thu Jan 01 00:05:00 1970\nSubject: three\n\nx\n\n"
    )
    assert os.listdir(md / "new") == [] and os.listdir(md / "cur") == []
    r = run(["maildir2mbox"], env={"MAILDIR": str(md), "MAIL": str(mail)})
    assert (r.returncode, r.stderr) == (111, b"maildir2mbox: fatal: MAILTMP not set\n")


@pytest.mark.parametrize(
    ("opts", "joe_lines"),
    [
        (["-C"], "=joe:joe:{u}:100:{h}:::\n"),
        (["-c+"], "=joe:joe:{u}:100:{h}:::\n+joe+:joe:{u}:100:{h}:-::\n"),
        (["-/"], "=joe:joe:{u}:100:{h}:::\n+joe-:joe:{u}:100:{h}:-/::\n"),
    ],
)
def test_qmail_pw2u_options(home: Home, tmp_path: Path, opts: list[str], joe_lines: str) -> None:
    h = tmp_path / "h"
    h.mkdir()
    if os.getuid() == 0:
        os.chown(h, 4242, 0)
    u = 4242 if os.getuid() == 0 else os.getuid()
    passwd = f"joe:x:{u}:100::{h}:/bin/sh\nalias:x:{u}:100::{h}:/bin/sh\n"
    r = run(["qmail-pw2u", *opts], passwd.encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith(joe_lines.format(u=u, h=h))


def test_qmail_pw2u_uppercase_and_home_policies(home: Home, tmp_path: Path) -> None:
    h = tmp_path / "h"
    h.mkdir()
    if os.getuid() == 0:
        os.chown(h, 4242, 0)
    u = 4242 if os.getuid() == 0 else os.getuid()
    passwd = (
        f"Ann:x:{u}:100::{h}:/bin/sh\nbob:x:{u}:100::/nonexistent:/bin/sh\n"
        f"alias:x:{u}:100::{h}:/bin/sh\n"
    )
    default = run(["qmail-pw2u"], passwd.encode()).stdout.decode()
    assert "Ann" not in default and "bob" not in default
    assert (
        f"=Ann:Ann:{u}:100:{h}:::\n" in run(["qmail-pw2u", "-u"], passwd.encode()).stdout.decode()
    )
    no_checks = run(["qmail-pw2u", "-H"], passwd.encode()).stdout.decode()
    assert f"=bob:bob:{u}:100:/nonexistent:::\n" in no_checks


def test_forward_and_condredirect_use_srssender_for_foreign_recipients(
    home: Home, fakeqq: tuple[Path, Path], tmp_path: Path
) -> None:
    """qmail-local's $SRSSENDER (docs/srs.md) replaces the original sender for a foreign
    recipient; a local recipient, or a sender changed by an -owner file, keeps it."""
    script, out = fakeqq
    base = {"QMAILQUEUE": str(script), "DTLINE": "Delivered-To: u@h\n",
            "SENDER": "bob@example.org", "NEWSENDER": "bob@example.org",
            "SRSSENDER": "SRS0=abcd=XY=example.org=bob@mx.test.example"}  # fmt: skip
    assert run(["forward", "a@elsewhere.example"], MSG, env=base).returncode == 0
    assert (out / "env").read_bytes() == (
        b"FSRS0=abcd=XY=example.org=bob@mx.test.example\0Ta@elsewhere.example\0\0"
    )
    assert run(["forward", "joe@mx.test.example"], MSG, env=base).returncode == 0
    assert (out / "env").read_bytes() == b"Fbob@example.org\0Tjoe@mx.test.example\0\0"
    owner = dict(base, NEWSENDER="joe-owner@mx.test.example")
    assert run(["forward", "a@elsewhere.example"], MSG, env=owner).returncode == 0
    assert (out / "env").read_bytes() == b"Fjoe-owner@mx.test.example\0Ta@elsewhere.example\0\0"
    m = tmp_path / "m"
    m.write_bytes(MSG)
    r = run(["condredirect", "a@elsewhere.example", "true"], m, env=base)
    assert r.returncode == 99
    assert (out / "env").read_bytes().startswith(b"FSRS0=abcd=")
