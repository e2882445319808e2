"""Small qmail tools against notqmail's: qmail-newu (users/cdb bytes and its errors),
bouncesaying and except (output and exit codes), maildirmake (what it creates, errors),
qmail-getpw and qmail-pw2u, qmail-tcpto.

Known and left alone: a tcpto record whose time is in the future prints as a huge
unsigned number of seconds in qmail and as a negative one in ours.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.compat.conftest import REF_HOME, Reference, ours

# -- qmail-newu ---------------------------------------------------------------------------

_WORD = st.text(alphabet="abcXY-._0", min_size=0, max_size=6)
_NUM = st.sampled_from(["0", "7", "1000", "", "x", "12a"])


@st.composite
def assign_line(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["=", "+", "=", "+", "#", "", "x"]))
    fields = [draw(_WORD), draw(_WORD), draw(_NUM), draw(_NUM), "/" + draw(_WORD),
              draw(st.sampled_from(["", "-"])), draw(_WORD)]  # fmt: skip
    cut = draw(st.integers(min_value=4, max_value=8))
    return kind + ":".join(fields[:cut]) + (":" if cut >= 7 else "")


def newu_both(
    reference: Reference, tmp: Path, assign: bytes
) -> tuple[tuple[int, bytes, bytes | None], tuple[int, bytes, bytes | None]]:
    results = []
    for who in ("ref", "ours"):
        home = tmp / who
        users = home / "users"
        users.mkdir(parents=True, exist_ok=True)
        for p in users.iterdir():
            p.unlink()
        (users / "assign").write_bytes(assign)
        if who == "ref":
            p = reference.run("qmail-newu", None, mounts={"users": users})
        else:
            p = subprocess.run([str(ours("qmail-newu")), "--home", str(home)], capture_output=True,
                               env={**os.environ, "PYQMAIL_SINGLE_USER": "1"})  # fmt: skip
        out = (users / "cdb").read_bytes() if (users / "cdb").exists() else None
        results.append((p.returncode, p.stderr, out))
        assert not (users / "cdb.tmp").exists() or who == "ref"
    return results[0], results[1]


NEWU_CASES = [
    "=joe:joe:1000:1000:/home/joe:::\n+list-:list:1001:1001:/var/list:-:ext:\n"
    "=Big:big:5:6:/h/big:::\n+:alias:7:8:/var/qmail/alias:-::\n.\n",
    ".\n",
    "",  # no final "."
    "=joe:joe:1000:1000:/home/joe:::\n",
    "=joe:joe:1000:1000:/home/joe::\n.\n",  # too few fields
    "=joe:joe:x:1000:/home/joe:::\n.\n",
    "# comment\n\n=joe:joe:1:1:/h:::\n.\nafter the dot\n",
    "=a:a:1:1:/a:::\n=a:b:2:2:/b:::\n+a:c:3:3:/c:-:x:\n+a-:d:4:4:/d:-:y:\n.\n",
]


@pytest.mark.parametrize("assign", NEWU_CASES, ids=range(len(NEWU_CASES)))
def test_newu_same(reference: Reference, tmp_path: Path, assign: str) -> None:
    ref, mine = newu_both(reference, tmp_path, assign.encode())
    assert mine == ref


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(assign_line(), max_size=6), st.booleans())
def test_newu_differential(
    reference: Reference, tmp_path: Path, lines: list[str], dot: bool
) -> None:
    text = "".join(line + "\n" for line in lines) + (".\n" if dot else "")
    ref, mine = newu_both(reference, tmp_path, text.encode())
    assert mine == ref


# -- bouncesaying, except -------------------------------------------------------------------

TOOL_CASES = [
    ["bouncesaying"],
    ["bouncesaying", "go away"],
    ["bouncesaying", "go away", "true"],
    ["bouncesaying", "go away", "false"],
    ["bouncesaying", "go away", "sh", "-c", "exit 111"],
    ["bouncesaying", "go away", "/nonexistent"],
    ["except"],
    ["except", "true"],
    ["except", "false"],
    ["except", "sh", "-c", "exit 111"],
    ["except", "sh", "-c", "exit 100"],
    ["except", "/nonexistent"],
    ["except", "sh", "-c", "kill -9 $$"],
]


@pytest.mark.parametrize("argv", TOOL_CASES, ids=[" ".join(a) for a in TOOL_CASES])
def test_tool_same(reference: Reference, argv: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    theirs = subprocess.run([str(REF_HOME / "bin" / argv[0]), *argv[1:]], capture_output=True,
                            env=env, input=b"message\n")  # fmt: skip
    mine = subprocess.run([str(ours(argv[0])), *argv[1:]], capture_output=True, env=env,
                          input=b"message\n")  # fmt: skip
    assert (mine.returncode, mine.stdout, mine.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    )


# -- maildirmake ------------------------------------------------------------------------------


def tree(path: Path) -> list[tuple[str, str]]:
    out = []
    for p in [*sorted(path.rglob("*")), path]:
        out.append((str(p.relative_to(path)), stat.filemode(p.stat().st_mode)))
    return out


def maildirmake_both(tmp_path: Path, umask: int) -> list[tuple[object, ...]]:
    results = []
    for who, prog in (("ref", str(REF_HOME / "bin" / "maildirmake")),
                      ("ours", str(ours("maildirmake")))):  # fmt: skip
        target = tmp_path / who / "Maildir"
        target.parent.mkdir()
        old = os.umask(umask)
        try:
            first = subprocess.run([prog, str(target)], capture_output=True)
            again = subprocess.run([prog, str(target)], capture_output=True)
        finally:
            os.umask(old)
        results.append((first.returncode, first.stderr, tree(target), again.returncode,
                        again.stderr.replace(str(target).encode(), b"DIR")))  # fmt: skip
    return results


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_maildirmake_same(reference: Reference, tmp_path: Path, umask: int) -> None:
    ref, mine = maildirmake_both(tmp_path, umask)
    assert mine[:4] == ref[:4]  # output, modes and exit codes
    assert mine[4].split(b": ")[:3] == ref[4].split(b": ")[:3]  # the error up to its reason


def test_maildirmake_error_reason_same(reference: Reference, tmp_path: Path) -> None:
    ref, mine = maildirmake_both(tmp_path, 0o022)
    assert mine[4] == ref[4]


# -- qmail-getpw, qmail-pw2u (multi-user mode, the reference home, read only) ---------------


def ours_multi_user(
    program: str, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    env["PYQMAIL_HOME"] = str(REF_HOME)
    return subprocess.run([str(ours(program)), *args], capture_output=True, env=env, input=stdin)


def system_users() -> list[str]:
    import pwd

    return sorted({p.pw_name for p in pwd.getpwall()})


def test_getpw_same_for_every_system_user(reference: Reference) -> None:
    locals_ = ["", "Root", "nosuchuser", "a-b-c", "-", "x" * 40]
    for name in system_users():
        locals_ += [name, f"{name}-ext", f"{name}-a-b", name.upper()]
    for local in locals_:
        theirs = subprocess.run([str(REF_HOME / "bin" / "qmail-getpw"), local], capture_output=True)
        mine = ours_multi_user("qmail-getpw", local)
        assert (mine.returncode, mine.stdout, mine.stderr) == (
            theirs.returncode,
            theirs.stdout,
            theirs.stderr,
        ), local


def test_pw2u_same_on_system_passwd(reference: Reference) -> None:
    passwd = subprocess.run(["getent", "passwd"], capture_output=True, check=True).stdout
    for args in ([], ["-o"], ["-h"], ["-H"], ["-u"], ["-U"], ["-c+"], ["-C"], ["-/"]):
        theirs = subprocess.run([str(REF_HOME / "bin" / "qmail-pw2u"), *args],
                                capture_output=True, input=passwd, cwd=REF_HOME)  # fmt: skip
        mine = ours_multi_user("qmail-pw2u", *args, stdin=passwd)
        # On a fatal error (no alias user with a home, say) qmail-pw2u has already written
        # the lines before it, a partial users/assign; ours writes nothing then.
        out = theirs.stdout if theirs.returncode == 0 else b""
        assert (mine.returncode, mine.stdout, mine.stderr) == (
            theirs.returncode,
            out,
            theirs.stderr,
        ), args


@pytest.mark.xfail(
    strict=True,
    reason="ours exits 100 without getopt's message ('qmail-pw2u: illegal option -- O')",
)
def test_pw2u_usage_errors_same(reference: Reference) -> None:
    for args in (["-O"], ["-c"], ["-x"]):
        theirs = subprocess.run([str(REF_HOME / "bin" / "qmail-pw2u"), *args],
                                capture_output=True, cwd=REF_HOME)  # fmt: skip
        mine = ours_multi_user("qmail-pw2u", *args)
        assert mine.returncode == theirs.returncode
        assert mine.stderr == theirs.stderr, args


_PWNAME = st.sampled_from(["alias", "joe", "Joe", "j-o", "a.b", "x", "", "root", "very-long-name"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(_PWNAME, st.sampled_from(["0", "5", "1000", "x", ""]),
                  st.sampled_from(["/home/u", "/", "", "/a:b"]),
                  st.sampled_from(["", ":extra"])),
        max_size=6,
    ),
    st.sampled_from([[], ["-o"], ["-h"], ["-H"], ["-u"], ["-c="], ["-/"]]),
)  # fmt: skip
def test_pw2u_differential(
    reference: Reference, rows: list[tuple[str, str, str, str]], args: list[str]
) -> None:
    passwd = "".join(f"{n}:x:{u}:{u}:gecos:{h}:/bin/sh{e}\n" for n, u, h, e in rows).encode()
    theirs = subprocess.run([str(REF_HOME / "bin" / "qmail-pw2u"), *args],
                            capture_output=True, input=passwd, cwd=REF_HOME)  # fmt: skip
    mine = ours_multi_user("qmail-pw2u", *args, stdin=passwd)
    assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr)
    if theirs.returncode == 0:
        assert mine.stdout == theirs.stdout
    # On a fatal error qmail-pw2u has already written the records before it (e.g. with
    # -H and no alias user); ours writes nothing. Both exit 111: the output is unusable.


# -- qmail-tcpto ------------------------------------------------------------------------------

_AGO = re.compile(rb"timed out (\d+) seconds ago")


def _tcpto_lines(out: bytes) -> tuple[bytes, list[int]]:
    return _AGO.sub(b"timed out N seconds ago", out), [int(n) for n in _AGO.findall(out)]


@st.composite
def tcpto_file(draw: st.DrawFn) -> bytes:
    """qmail's 1024-byte table of 64 16-byte records (IPv4, count, when), or a short one."""
    now = int(time.time())
    buf = bytearray(draw(st.sampled_from([1024, 1024, 1024, 0, 100, 1040])))
    for i in range(min(64, len(buf) // 16)):
        if draw(st.booleans()):
            when = now - draw(st.integers(0, 10**6))  # future times: see the module notes
            rec = (draw(st.binary(min_size=4, max_size=4))
                   + bytes([draw(st.integers(0, 127)), 0, 0, 0])
                   + struct.pack("<Q", when % 2**64))  # fmt: skip
            buf[16 * i : 16 * i + 16] = rec
    return bytes(buf)


def tcpto_both(reference: Reference, tmp_path: Path, table: bytes) -> None:
    lock = tmp_path / "lock"
    lock.mkdir(exist_ok=True)
    (lock / "tcpto").write_bytes(table)
    home = tmp_path / "home"
    (home / "queue" / "lock").mkdir(parents=True, exist_ok=True)
    (home / "queue" / "lock" / "tcpto").write_bytes(table)
    theirs = reference.run("qmail-tcpto", None, mounts={"queue/lock": lock})
    env = {**os.environ, "PYQMAIL_SINGLE_USER": "1"}
    mine = subprocess.run([str(ours("qmail-tcpto")), "--home", str(home)], capture_output=True,
                          env=env)  # fmt: skip
    assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr)
    ref_text, ref_ago = _tcpto_lines(theirs.stdout)
    our_text, our_ago = _tcpto_lines(mine.stdout)
    assert our_text == ref_text
    assert all(abs(a - b) <= 2 for a, b in zip(ref_ago, our_ago, strict=True))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tcpto_file())
def test_tcpto_same(reference: Reference, tmp_path: Path, table: bytes) -> None:
    tcpto_both(reference, tmp_path, table)


@pytest.mark.xfail(
    strict=True,
    reason="qmail reads the count byte as a signed char: 128..255 "
    "are negative (not listed, never skipped); ours lists them",
)
def test_tcpto_count_is_a_signed_char(reference: Reference, tmp_path: Path) -> None:
    rec = bytes([10, 0, 0, 1, 200, 0, 0, 0]) + struct.pack("<Q", int(time.time()) - 50)
    tcpto_both(reference, tmp_path, rec.ljust(1024, b"\0"))


# -- qmail-qstat ------------------------------------------------------------------------------


def test_qstat_same(reference: Reference, tmp_path: Path) -> None:
    home = tmp_path / "h"
    env = {**os.environ, "PYQMAIL_SINGLE_USER": "1", "PYQMAIL_HOME": str(home)}
    subprocess.run([str(ours("pyqmail")), "init", str(home), "--me", "mx.test.example", "-q"],
                   check=True, env=env)  # fmt: skip
    for n in range(4):
        if n:
            subprocess.run([str(ours("qmail-inject")), "-f", "a@b.example", f"u{n}@x.example"],
                           input=b"Subject: s\n\nbody\n", check=True, env=env)  # fmt: skip
        theirs = reference.run("qmail-qstat", None, mounts={"queue": home / "queue"})
        mine = subprocess.run([str(ours("qmail-qstat"))], capture_output=True, env=env)
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
