"""smtp/passwords.py: control/authusers (argon2id) read and written, checkpassword programs
with qmail's fd-3 protocol (real programs, each exit code), the order of the sources."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.smtp.passwords import (
    AuthUsers,
    PasswordCheck,
    PasswordError,
    Verdict,
    parse_authusers,
    run_checkpassword,
    set_password,
)
from tests.conftest import write_control


def test_set_password_writes_argon2id_mode_0600_and_verifies(home: Home) -> None:
    assert set_password(home, b"alice", b"pw one")
    path = home.control / "authusers"
    raw = path.read_bytes()
    assert raw.startswith(b"alice:$argon2id$") and b"pw one" not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = AuthUsers(path)
    assert users.verify(b"alice", b"pw one") is Verdict.OK
    assert users.verify(b"alice", b"pw two") is Verdict.BAD
    assert users.verify(b"bob", b"pw one") is None  # not in the file: the next source
    set_password(home, b"alice", b"pw two")  # replaced in place, re-read on change
    assert users.verify(b"alice", b"pw two") is Verdict.OK
    assert users.verify(b"alice", b"pw one") is Verdict.BAD


def test_set_password_keeps_other_lines_and_deletes(home: Home) -> None:
    (home.control / "authusers").write_bytes(b"# users\nbob:$argon2id$x\ncarol:$argon2id$y")
    set_password(home, b"alice", b"a")
    set_password(home, b"bob", b"b")
    lines = (home.control / "authusers").read_bytes().splitlines()
    assert lines[0] == b"# users" and lines[2] == b"carol:$argon2id$y"
    assert [ln.split(b":")[0] for ln in lines[1:]] == [b"bob", b"carol", b"alice"]
    assert set_password(home, b"carol", None)
    assert not set_password(home, b"nobody", None)
    assert b"carol" not in (home.control / "authusers").read_bytes()


@pytest.mark.parametrize("user", [b"", b"a:b", b"a b", b"a\nb", b"\x00", b"x" * 256])
def test_bad_user_names_are_refused(home: Home, user: bytes) -> None:
    with pytest.raises(PasswordError):
        set_password(home, user, b"pw")


@pytest.mark.parametrize("password", [b"", b"a\0b", b"x" * 1025])
def test_bad_passwords_are_refused(home: Home, password: bytes) -> None:
    with pytest.raises(PasswordError):
        set_password(home, b"alice", password)


def test_parse_skips_what_is_not_a_user_and_an_argon2_hash() -> None:
    got = parse_authusers(
        b"a:$argon2id$1\n# c\n\nb:plain\nnocolon\n bad user:$argon2id$2\nc:$argon2i$3"
    )
    assert got == {b"a": "$argon2id$1", b"c": "$argon2i$3"}


def _program(tmp: Path, body: str) -> str:
    p = tmp / "checkpw"
    p.write_text("#!/usr/bin/env python3\nimport os, sys\n" + body)
    p.chmod(0o755)
    return str(p)


ECHO_FD3 = (
    "data = os.read(3, 4096)\n"
    "open(os.environ['OUT'], 'wb').write(data)\n"
    "sys.exit(int(os.environ.get('RC', '0')))\n"
)


@pytest.mark.parametrize(
    ("rc", "verdict"),
    [(0, Verdict.OK), (1, Verdict.BAD), (3, Verdict.BAD), (2, Verdict.TEMP), (111, Verdict.TEMP)],
)
def test_checkpassword_fd3_protocol_and_exit_codes(
    tmp_path: Path, rc: int, verdict: Verdict
) -> None:
    out = tmp_path / "out"
    prog = _program(tmp_path, ECHO_FD3)
    env = dict(os.environ, OUT=str(out), RC=str(rc))
    assert run_checkpassword([prog], b"alice", b"p w", env) is verdict
    assert out.read_bytes() == b"alice\0p w\0\0"


def test_checkpassword_runs_the_subprogram_and_never_writes_to_stdout(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    prog = _program(
        tmp_path, "print('noise'); os.read(3, 10); os.execvp(sys.argv[1], sys.argv[1:])\n"
    )
    assert run_checkpassword([prog, "/bin/true"], b"u", b"p") is Verdict.OK
    assert run_checkpassword([prog, "/bin/false"], b"u", b"p") is Verdict.BAD
    assert "noise" not in capfd.readouterr().out


def test_checkpassword_stdin_is_empty_and_a_missing_program_is_temporary(tmp_path: Path) -> None:
    prog = _program(tmp_path, "sys.exit(0 if sys.stdin.read() == '' else 1)\n")
    assert run_checkpassword([prog], b"u", b"p") is Verdict.OK
    assert run_checkpassword([str(tmp_path / "missing")], b"u", b"p") is Verdict.TEMP
    assert run_checkpassword([], b"u", b"p") is Verdict.TEMP


def test_checkpassword_timeout_kills_it(tmp_path: Path) -> None:
    prog = _program(tmp_path, "import time; time.sleep(60)\n")
    assert run_checkpassword([prog], b"u", b"p", timeout=0.5) is Verdict.TEMP


def test_sources_in_order_authusers_then_the_program(home: Home, tmp_path: Path) -> None:
    check = PasswordCheck(home)
    assert not check.available()
    set_password(home, b"alice", b"file pw")
    assert check.available()
    prog = _program(tmp_path, "u, p = os.read(3, 999).split(b'\\0')[:2]\n"
                              "sys.exit(0 if p == b'prog pw' else 1)\n")  # fmt: skip
    write_control(home, "checkpassword", f"{prog}\n")
    assert check.check(b"alice", b"file pw") is Verdict.OK
    assert check.check(b"alice", b"prog pw") is Verdict.BAD  # alice's line is final
    assert check.check(b"bob", b"prog pw") is Verdict.OK  # not in the file: the program
    assert check.check(b"bob", b"x") is Verdict.BAD
    assert check.check(b"bad user", b"prog pw") is Verdict.BAD
    # qmail-smtpd's own arguments win over control/checkpassword
    other = PasswordCheck(home, program=["/bin/false"])
    assert other.check(b"bob", b"prog pw") is Verdict.BAD


def test_unreadable_authusers_is_temporary(home: Home) -> None:
    (home.control / "authusers").mkdir()  # there, but no file to read (even for root)
    check = PasswordCheck(home)
    assert check.available()
    assert check.check(b"alice", b"pw") is Verdict.TEMP
