"""qmail-local's algorithm (local.md 3), run in-process against real files."""

from __future__ import annotations

import os
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pyqmail import srs
from pyqmail.home import Home
from pyqmail.local import qlocal
from pyqmail.local.qlocal import Request
from pyqmail.outcome import Status
from pyqmail.qdate import mbox_date
from tests.conftest import process_gone, write_control

MSG = b"Subject: test\nFrom: a@example.org\n\nbody line\nFrom the start\n>From quoted\n"
NOW = 1_000_000_000.0

CAPTURE = """#!{python}
import os, sys
out = {out!r}
n = len(os.listdir(out)) // 2
with open(os.path.join(out, f"{{n}}.msg"), "wb") as f:
    f.write(sys.stdin.buffer.read())
with open(os.path.join(out, f"{{n}}.env"), "wb") as f:
    f.write(os.fdopen(1, "rb").read())
sys.exit({code})
"""


class User:
    """A user's home directory with a Maildir, and helpers to deliver to it."""

    def __init__(self, root: Path, qhome: Home) -> None:
        self.dir = root
        self.qhome = qhome
        root.mkdir(mode=0o755)
        for sub in ("", "/tmp", "/new", "/cur"):
            os.mkdir(f"{root}/Maildir{sub}", 0o700)

    def qmail(self, name: str, text: str, mode: int = 0o644) -> None:
        p = self.dir / name
        p.write_text(text)
        p.chmod(mode)

    def deliver(
        self,
        local: str = "joe-ext",
        ext: str = "ext",
        *,
        dash: str = "-",
        sender: str = "s@example.org",
        host: str = "example.com",
        dd: str = "./Maildir/\n",
        msg: bytes = MSG,
        dry_run: bool = False,
        timeout: float = 60.0,
        lock_timeout: float = 30.0,
        environ: dict[bytes, bytes] | None = None,
    ) -> tuple[int, str]:
        req = Request(
            "joe", str(self.dir), local, dash, ext, host, sender, dd, dry_run, timeout, lock_timeout
        )
        with tempfile.TemporaryFile() as m, tempfile.TemporaryFile() as rep:
            m.write(msg)
            m.flush()
            code = qlocal.run(
                req,
                m.fileno(),
                self.qhome,
                out=rep.fileno(),
                err=rep.fileno(),
                now=NOW,
                environ=environ,
            )
            rep.seek(0)
            return code, rep.read().decode()

    def maildir(self, name: str = "Maildir") -> list[bytes]:
        new = self.dir / name / "new"
        return [(new / n).read_bytes() for n in sorted(os.listdir(new))]


@pytest.fixture
def user(tmp_path: Path, home: Home) -> User:
    return User(tmp_path / "joe", home)


@pytest.fixture
def captured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """QMAILQUEUE = a script that stores each queued message and envelope."""
    out = tmp_path / "queued"
    out.mkdir()
    script = tmp_path / "fakeqq"
    script.write_text(CAPTURE.format(python=sys.executable, out=str(out), code=0))
    script.chmod(0o755)
    monkeypatch.setenv("QMAILQUEUE", str(script))
    return out


def _queued(out: Path) -> list[tuple[bytes, bytes]]:
    n = len(os.listdir(out)) // 2
    return [((out / f"{i}.msg").read_bytes(), (out / f"{i}.env").read_bytes()) for i in range(n)]


HEAD = b"Return-Path: <s@example.org>\nDelivered-To: joe-ext@example.com\n"


def test_maildir_delivery_bytes(user: User) -> None:
    user.qmail(".qmail-ext", "./Maildir/\n")
    assert user.deliver() == (0, "did 1+0+0\n")
    assert user.maildir() == [HEAD + MSG]
    assert not os.listdir(user.dir / "Maildir" / "tmp")
    (f,) = os.listdir(user.dir / "Maildir" / "new")
    assert stat.S_IMODE(os.stat(user.dir / "Maildir" / "new" / f).st_mode) == 0o600


def test_mbox_delivery_bytes(user: User) -> None:
    user.qmail(".qmail-ext", "./mbox\n")
    (user.dir / "mbox").write_bytes(b"old\n")
    assert user.deliver(msg=MSG + b"no newline") == (0, "did 1+0+0\n")
    assert (user.dir / "mbox").read_bytes() == (
        b"old\n"
        + f"From s@example.org {mbox_date(NOW)}\n".encode()
        + HEAD
        + b"Subject: test\nFrom: a@example.org\n\nbody line\n>From the start\n>>From quoted\n"
        + b"no newline\n\n"
    )


def test_mbox_from_line_for_bounce_and_spaces(user: User) -> None:
    user.qmail(".qmail-ext", "./mbox\n")
    user.deliver(sender="")
    user.deliver(sender="a b\tc@x")
    text = (user.dir / "mbox").read_bytes()
    assert text.startswith(f"From MAILER-DAEMON {mbox_date(NOW)}\nReturn-Path: <>\n".encode())
    assert f'From a-b-c@x {mbox_date(NOW)}\nReturn-Path: <"a b\tc"@x>\n'.encode() in text


@pytest.mark.parametrize(
    ("sender", "line"),
    [
        ("joe@x.org", b"Return-Path: <joe@x.org>\n"),
        ("", b"Return-Path: <>\n"),
        ("#@[]", b"Return-Path: <#@[]>\n"),
        ("a..b@x", b'Return-Path: <"a..b"@x>\n'),
        ('we"ird@x', b'Return-Path: <"we\\"ird"@x>\n'),
        ("new\nline@x", b'Return-Path: <"new\\_line"@x>\n'),
        ("noat", b"Return-Path: <noat>\n"),
    ],
)
def test_return_path_quoting(sender: str, line: bytes) -> None:
    assert qlocal.rpline(sender) == line


def test_delivered_to_newline() -> None:
    assert qlocal.dtline("a\nb", "h") == b"Delivered-To: a_b@h\n"


def test_carriage_returns_never_reach_the_header_lines() -> None:
    """qmail maps only LF; a lone CR would become a line break on the next hop."""
    assert qlocal.dtline("a\rX-Evil: 1", "h\r") == b"Delivered-To: a_X-Evil: 1@h_\n"
    assert qlocal.rpline("s\rX: y@h") == b'Return-Path: <"s\\_X: y"@h>\n'


def test_no_mailbox_by_that_name(user: User) -> None:
    assert user.deliver() == (100, "Sorry, no mailbox here by that name. (#5.1.1)\n")


def test_base_address_without_qmail_uses_defaultdelivery(user: User) -> None:
    code, text = user.deliver("joe", "", dash="", dd="./Mailbox\n")
    assert (code, text) == (0, "did 1+0+0\n")
    assert (user.dir / "Mailbox").read_bytes().startswith(b"From s@example.org ")


def test_empty_qmail_file_uses_defaultdelivery(user: User) -> None:
    user.qmail(".qmail-ext", "", 0o744)  # the x bit does not apply to defaultdelivery
    assert user.deliver(dd="./Maildir/\n") == (0, "did 1+0+0\n")
    assert len(user.maildir()) == 1


def test_empty_defaultdelivery_is_a_blank_first_line(user: User) -> None:
    assert user.deliver("joe", "", dash="", dd="") == (
        111,
        "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n",
    )


def test_qmail_default_catch_all(user: User) -> None:
    user.qmail(".qmail-default", '|echo "default=$DEFAULT ext=$EXT"\n')
    code, text = user.deliver("joe-Any-Thing", "Any-Thing")
    assert (code, text) == (0, "default=Any-Thing ext=Any-Thing\ndid 0+0+1\n")


def test_loop_detected(user: User) -> None:
    user.qmail(".qmail-ext", "./Maildir/\n")
    looped = b"Received: x\nDelivered-To: joe-ext@example.com\nSubject: x\n\nbody\n"
    assert user.deliver(msg=looped) == (
        100,
        "This message is looping: it already has my Delivered-To line. (#5.4.6)\n",
    )
    assert user.maildir() == []
    # Only the header counts, and only a byte-identical line.
    for ok in (
        b"Subject: x\n\nDelivered-To: joe-ext@example.com\n",
        b"Delivered-To: JOE-EXT@example.com\n\nx\n",
        b"Delivered-To: joe-ext@example.com \n\nx\n",
    ):
        assert user.deliver(msg=ok)[0] == 0


def test_forward_loop_is_caught_on_the_second_pass(user: User, captured: Path) -> None:
    """A .qmail that forwards to its own address: the requeued copy bounces as a loop."""
    user.qmail(".qmail-ext", "&joe-ext@example.com\n")
    assert user.deliver()[0] == 0
    ((requeued, env),) = _queued(captured)
    assert env == b"Fs@example.org\0Tjoe-ext@example.com\0\0"
    assert user.deliver(msg=requeued) == (
        100,
        "This message is looping: it already has my Delivered-To line. (#5.4.6)\n",
    )
    assert len(_queued(captured)) == 1


def test_home_writable_by_others(user: User) -> None:
    user.qmail(".qmail-ext", "./Maildir/\n")
    user.dir.chmod(0o757)
    assert user.deliver() == (111, "Uh-oh: home directory is writable. (#4.7.0)\n")
    user.dir.chmod(0o775)  # group-writable homes are allowed
    assert user.deliver()[0] == 0


def test_home_sticky(user: User) -> None:
    user.qmail(".qmail-ext", "./Maildir/\n")
    user.dir.chmod(0o1755)
    assert user.deliver() == (
        111,
        "Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n",
    )
    assert user.deliver(dry_run=True) == (
        0,
        "Warning: home directory is sticky.\nmaildir ./Maildir/\ndid 1+0+0\n",
    )
    assert user.maildir() == []


def test_missing_home(tmp_path: Path, home: Home) -> None:
    u = User(tmp_path / "x", home)
    u.dir = tmp_path / "nonexistent"
    code, text = u.deliver()
    assert code == 111
    assert text.startswith(f"Unable to switch to {tmp_path}/nonexistent: ")


def test_missing_maildir(user: User) -> None:
    user.qmail(".qmail-ext", "./NoSuchMaildir/\n")
    assert user.deliver() == (111, "Unable to chdir to maildir. (#4.2.1)\n")


def test_mbox_unopenable(user: User) -> None:
    user.qmail(".qmail-ext", "./nodir/mbox\n")
    code, text = user.deliver()
    assert code == 111
    assert text == "Unable to open ./nodir/mbox: file does not exist. (#4.2.1)\n"


def test_x_bit_forward_only(user: User, captured: Path) -> None:
    user.qmail(".qmail-ext", "&a@x\n./Maildir/\n", 0o744)
    assert user.deliver() == (
        111,
        "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n",
    )
    user.qmail(".qmail-ext", "&a@x\n|true\n", 0o744)
    assert user.deliver() == (
        111,
        "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n",
    )
    assert _queued(captured) == []  # the failure stops the forwards too
    user.qmail(".qmail-ext", "&a@x\n", 0o744)
    assert user.deliver()[0] == 0


def test_plus_list_makes_the_rest_forward_only(user: User) -> None:
    user.qmail(".qmail-ext", "./Maildir/\n+list\n./Maildir/\n")
    assert user.deliver() == (
        111,
        "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n",
    )
    assert len(user.maildir()) == 1  # the line before +list was delivered


def test_first_line_blank(user: User) -> None:
    user.qmail(".qmail-ext", "\n./Maildir/\n")
    assert user.deliver() == (111, "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n")


def test_program_environment(user: User) -> None:
    user.qmail(
        ".qmail-a-default",
        "|env > env.out; cat > stdin.out\n",
    )
    code, text = user.deliver("joe-a-b-c-d", "a-b-c-d", sender="x@y.org", host="mx.sub.example.com")
    assert (code, text) == (0, "did 0+0+1\n")
    env = dict(
        line.split("=", 1)
        for line in (user.dir / "env.out").read_text().split("\n")
        if "=" in line and line[:1].isupper()
    )
    assert env["USER"] == "joe"
    assert env["HOME"] == str(user.dir)
    assert env["LOCAL"] == "joe-a-b-c-d"
    assert env["HOST"] == "mx.sub.example.com"
    assert env["HOST2"] == "mx.sub.example"
    assert env["HOST3"] == "mx.sub"
    assert env["HOST4"] == "mx"
    assert env["RECIPIENT"] == "joe-a-b-c-d@mx.sub.example.com"
    assert env["SENDER"] == "x@y.org"
    assert env["NEWSENDER"] == "x@y.org"
    assert (env["EXT"], env["EXT2"], env["EXT3"], env["EXT4"]) == ("a-b-c-d", "b-c-d", "c-d", "d")
    assert env["DEFAULT"] == "b-c-d"
    assert env["DTLINE"] == "Delivered-To: joe-a-b-c-d@mx.sub.example.com"  # then a newline
    assert env["RPLINE"] == "Return-Path: <x@y.org>"
    assert env["UFLINE"] == f"From x@y.org {mbox_date(NOW)}"
    assert (user.dir / "stdin.out").read_bytes() == MSG  # no Return-Path, no Delivered-To


def _proc_environ(path: Path) -> dict[str, str]:
    items = path.read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in items if x)


def test_program_environment_is_exactly_qmails(user: User, monkeypatch: pytest.MonkeyPatch) -> None:
    """No environ given (the daemon): PATH, PYQMAIL_HOME and qmail-local's variables;
    nothing of this process's own environment, DEFAULT included."""
    monkeypatch.setenv("OLDPWD", "/root")
    monkeypatch.setenv("DEFAULT", "from-the-caller")
    monkeypatch.setenv("LC_CTYPE", "C.UTF-8")
    monkeypatch.delenv("QMAILQUEUE", raising=False)
    monkeypatch.delenv("PYQMAIL_QUEUE_SOCKET", raising=False)
    user.qmail(".qmail-ext", "|cat /proc/$$/environ > env.out\n")  # what sh was given
    assert user.deliver("joe-ext", "ext", host="a.b", sender="") == (0, "did 0+0+1\n")
    root = str(user.qhome.root)
    assert _proc_environ(user.dir / "env.out") == {
        "PATH": f"{root}/bin:/usr/local/bin:/usr/bin:/bin",
        "PYQMAIL_HOME": root,
        **({"PYQMAIL_SINGLE_USER": "1"} if user.qhome.single_user else {}),
        "USER": "joe",
        "HOME": str(user.dir),
        "LOCAL": "joe-ext",
        "HOST": "a.b",
        "HOST2": "a",
        "HOST3": "a",
        "HOST4": "a",
        "RECIPIENT": "joe-ext@a.b",
        "SENDER": "",
        "NEWSENDER": "",
        "EXT": "ext",
        "EXT2": "",
        "EXT3": "",
        "EXT4": "",
        "DTLINE": "Delivered-To: joe-ext@a.b\n",
        "RPLINE": "Return-Path: <>\n",
        "UFLINE": f"From MAILER-DAEMON {mbox_date(NOW)}\n",
    }
    monkeypatch.setenv("QMAILQUEUE", "/x/qq")  # the queue the daemon's forwards use too
    assert user.deliver("joe-ext", "ext") == (0, "did 0+0+1\n")
    assert _proc_environ(user.dir / "env.out")["QMAILQUEUE"] == "/x/qq"


def test_default_given_to_qmail_local_is_passed_on(user: User) -> None:
    """qmail-local sets DEFAULT only when a default file matched; otherwise the one it
    was started with reaches the program (as in qmail)."""
    user.qmail(".qmail-ext", '|printf "%s" "$DEFAULT" > ext.out\n')
    user.qmail(".qmail-x-default", '|printf "%s" "$DEFAULT" > default.out\n')
    base = {b"PATH": b"/usr/bin:/bin", b"DEFAULT": b"given"}
    assert user.deliver("joe-ext", "ext", environ=base) == (0, "did 0+0+1\n")
    assert user.deliver("joe-x-y", "x-y", environ=base) == (0, "did 0+0+1\n")
    assert (user.dir / "ext.out").read_text() == "given"
    assert (user.dir / "default.out").read_text() == "y"


@pytest.mark.parametrize(
    ("local", "dash", "ext", "host", "sender", "given", "var"),
    [
        ("joe-x", "-", "x", "example.com", "() { :;}; touch pwned", None, "SENDER"),
        ("joe-x", "-", "x", "example.com", " ()  {  :;}", None, "SENDER"),
        ("() { :;}; touch pwned", "", "", "example.com", "s@x", None, "LOCAL"),
        ("joe-() { :;}", "-", "() { :;}", "example.com", "s@x", None, "EXT"),
        ("joe-x-() { :;}", "-", "x-() { :;}", "example.com", "s@x", None, "EXT2"),
        ("joe-x", "-", "x", "() { :;}.example", "s@x", None, "HOST"),
        ("joe-x", "-", "x", "example.com", "s@x", b"() { :;}; touch pwned", "DEFAULT"),
    ],
)
def test_function_definitions_never_reach_a_program(
    user: User,
    local: str,
    dash: str,
    ext: str,
    host: str,
    sender: str,
    given: bytes | None,
    var: str,
) -> None:
    """Shellshock (CVE-2014-6271) in depth: bash imports ``() {`` values as functions.
    The delivery is refused before anything is delivered, even the Maildir line."""
    text = "./Maildir/\n|touch ran\n"
    for name in (".qmail", ".qmail-x", ".qmail-default", ".qmail-x-default"):
        user.qmail(name, text)
    environ = {b"PATH": b"/usr/bin:/bin"} if given is None else {b"DEFAULT": given}
    code, report = user.deliver(local, ext, dash=dash, host=host, sender=sender, environ=environ)
    assert (code, report) == (
        100,
        f"Sorry, ${var} would look like a shell function definition to a program;"
        " I won't run one with it. (#5.7.1)\n",
    )
    assert user.maildir() == [] and not (user.dir / "ran").exists()


def test_host_parts_without_dots(user: User) -> None:
    user.qmail(".qmail-ext", '|echo "$HOST2 $HOST3 $HOST4 [$EXT2]"\n')
    assert user.deliver(host="localhost")[1] == "localhost localhost localhost []\ndid 0+0+1\n"


@pytest.mark.parametrize(
    ("exit_code", "result"),
    [(0, 0), (100, 100), (64, 100), (65, 100), (70, 100), (76, 100), (77, 100), (78, 100),
     (112, 100), (111, 111), (1, 111), (2, 111), (75, 111)],
)  # fmt: skip
def test_program_exit_codes(user: User, exit_code: int, result: int) -> None:
    user.qmail(".qmail-ext", f"|echo said; exit {exit_code}\n./Maildir/\n")
    code, text = user.deliver()
    assert code == result
    assert text == ("said\ndid 1+0+1\n" if result == 0 else "said\n")
    assert len(user.maildir()) == (1 if result == 0 else 0)


def test_program_crash(user: User) -> None:
    user.qmail(".qmail-ext", "|kill -9 $$\n")
    assert user.deliver() == (111, "Aack, child crashed. (#4.3.0)\n")


def test_exit_99_stops_but_sends_earlier_forwards(user: User, captured: Path) -> None:
    user.qmail(".qmail-ext", "&first@x\n|exit 99\n&second@x\n./Maildir/\n")
    code, text = user.deliver()
    assert code == 0
    assert text.startswith("did 0+1+1\nqp ")
    ((msg, env),) = _queued(captured)
    assert env == b"Fs@example.org\0Tfirst@x\0\0"
    assert msg == b"Delivered-To: joe-ext@example.com\n" + MSG
    assert user.maildir() == []


def test_forwards_in_one_submission(user: User, captured: Path) -> None:
    user.qmail(".qmail-ext", "&a@x.org\nb@y.org\n# c@z\n./Maildir/\n")
    code, text = user.deliver()
    assert code == 0
    lines = text.split("\n")
    assert lines[0] == "did 1+2+0"
    assert lines[1].startswith("qp ") and int(lines[1][3:]) > 0
    ((msg, env),) = _queued(captured)
    assert env == b"Fs@example.org\0Ta@x.org\0Tb@y.org\0\0"
    assert msg == b"Delivered-To: joe-ext@example.com\n" + MSG


def test_owner_newsender(user: User, captured: Path) -> None:
    user.qmail(".qmail-ext", "&a@x.org\n|echo $NEWSENDER\n")
    user.qmail(".qmail-ext-owner", "&owner@x.org\n")
    assert user.deliver()[1].startswith("joe-ext-owner@example.com\n")
    (user.dir / ".qmail-ext-owner-default").mkdir()  # qmail only stats: any type counts
    assert user.deliver()[1].startswith("joe-ext-owner-@example.com-@[]\n")
    assert user.deliver(sender="")[1].startswith("\n")  # bounces keep the empty sender
    assert user.deliver(sender="#@[]")[1].startswith("#@[]\n")
    envs = [env for _msg, env in _queued(captured)]
    assert envs == [
        b"Fjoe-ext-owner@example.com\0Ta@x.org\0\0",
        b"Fjoe-ext-owner-@example.com-@[]\0Ta@x.org\0\0",
        b"F\0Ta@x.org\0\0",
        b"F#@[]\0Ta@x.org\0\0",
    ]


@pytest.mark.parametrize(
    ("qq_exit", "code", "text"),
    [
        (
            31,
            100,
            "Unable to forward message: mail server permanently rejected message (#5.3.0).\n",
        ),
        (
            71,
            111,
            "Unable to forward message: mail server temporarily rejected message (#4.3.0).\n",
        ),
    ],
)
def test_forward_queue_failure(
    user: User, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qq_exit: int, code: int, text: str
) -> None:
    out = tmp_path / "q2"
    out.mkdir()
    script = tmp_path / "failqq"
    script.write_text(CAPTURE.format(python=sys.executable, out=str(out), code=qq_exit))
    script.chmod(0o755)
    monkeypatch.setenv("QMAILQUEUE", str(script))
    user.qmail(".qmail-ext", "&a@x.org\n")
    assert user.deliver() == (code, text)


@pytest.mark.parametrize(
    ("fd6", "code", "text"),
    [
        ("Dno forwarding here", 100, "Unable to forward message: no forwarding here.\n"),
        ("Ztry later", 111, "Unable to forward message: try later.\n"),
    ],
)
def test_forward_custom_queue_reply(
    user: User, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fd6: str, code: int, text: str
) -> None:
    """A QMAILQUEUE filter's exit 82 + fd-6 text is qmail-local's D/Z text (qmail.c)."""
    script = tmp_path / "qq82"
    script.write_text(f"#!/bin/sh\ncat >/dev/null\nprintf %s '{fd6}' >&6\nexit 82\n")
    script.chmod(0o755)
    monkeypatch.setenv("QMAILQUEUE", str(script))
    user.qmail(".qmail-ext", "&a@x.org\n")
    assert user.deliver() == (code, text)


def test_failed_file_line_stops_forwards(user: User, captured: Path) -> None:
    user.qmail(".qmail-ext", "&a@x.org\n./NoMaildir/\n")
    assert user.deliver()[0] == 111
    assert _queued(captured) == []


def test_dry_run(user: User) -> None:
    user.qmail(".qmail-ext", "|cat\n&a@b\nc@d\n./mb\n./Maildir/\n")
    assert user.deliver(dry_run=True) == (
        0,
        "program cat\nforward a@b\nforward c@d\nmbox ./mb\nmaildir ./Maildir/\ndid 2+2+1\n",
    )
    assert not (user.dir / "mb").exists() and user.maildir() == []


def test_shell_metacharacters_in_local_part(user: User, tmp_path: Path) -> None:
    """A hostile local part reaches the program only through the environment."""
    evil_ext = "x;touch${IFS}PWNED`touch PWNED2`$(touch PWNED3)|touch PWNED4&&'\"\\"
    user.qmail(
        ".qmail-default", '|printf "%s\\n" "$LOCAL" > local.out; printf "%s" "$EXT" > ext.out\n'
    )
    code, _ = user.deliver("joe-" + evil_ext, evil_ext)
    assert code == 0
    assert (user.dir / "ext.out").read_text() == evil_ext
    assert (user.dir / "local.out").read_text() == "joe-" + evil_ext + "\n"
    assert not [p for p in os.listdir(user.dir) if p.startswith("PWNED")]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("PWNED")]


def test_program_timeout_kills_the_group(user: User) -> None:
    user.qmail(".qmail-ext", "|sleep 300 & echo $! > bg.pid; echo $$ > fg.pid; sleep 300\n")
    start = time.monotonic()
    code, text = user.deliver(timeout=1.0)
    assert time.monotonic() - start < 30
    assert (code, text) == (111, "Timeout on program delivery after 1 seconds. (#4.3.0)\n")
    for name in ("bg.pid", "fg.pid"):
        assert process_gone(int((user.dir / name).read_text()))


def test_program_reads_the_message_from_the_start(user: User) -> None:
    user.qmail(".qmail-ext", "|head -c 5 >/dev/null\n|cat > whole.out\n")
    assert user.deliver()[0] == 0
    assert (user.dir / "whole.out").read_bytes() == MSG


def test_deliver_maps_like_lspawn(user: User) -> None:
    user.qmail(".qmail-ext", "|echo hello; exit 100\n")
    req = Request("joe", str(user.dir), "joe-ext", "-", "ext", "example.com", "s@x", "./Maildir/\n")
    with tempfile.TemporaryFile() as m:
        m.write(MSG)
        m.flush()
        out = qlocal.deliver(req, m.fileno(), user.qhome)
    assert (out.status, out.text) == (Status.PERM, "hello\n")


@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        (0, Status.OK, "did 0+0+1\n"),
        (111, Status.TEMP, "did 0+0+1\n"),
        (71, Status.TEMP, "did 0+0+1\n"),
        (74, Status.TEMP, "did 0+0+1\n"),
        (75, Status.TEMP, "did 0+0+1\n"),
        (100, Status.PERM, "did 0+0+1\n"),
        (3, Status.PERM, "did 0+0+1\n"),
        (113, Status.TEMP, "Not allowed to perform deliveries as root.\n"),
        (116, Status.TEMP, "Unable to find alias user!\n"),
        (117, Status.TEMP, "Trouble reading users/cdb in qmail-lspawn.\n"),
        (126, Status.PERM, "Unable to run qmail-local.\n"),
        (None, Status.TEMP, "qmail-local crashed.\n"),
    ],
)
def test_outcome_of(code: int | None, status: Status, text: str) -> None:
    out = qlocal.outcome_of(code, b"did 0+0+1\n\0hidden")
    assert (out.status, out.text) == (status, text)


def test_truncate_report() -> None:
    assert qlocal.truncate_report(b"x" * 3000) == b"x" * 3000
    cut = qlocal.truncate_report(b"x" * 3001)
    assert cut == b"x" * 2966 + b"\nError report too long, sorry.\n"


def test_parse_args() -> None:
    r = qlocal.parse_args(["-n", "--", "u", "/h", "l", "-", "e", "d", "s", "./M/"])
    assert r is not None and r.dry_run and r.home == "/h" and r.dash == "-"
    assert not qlocal.parse_args(["-nN", "u", "/h", "l", "-", "e", "d", "s", "x"]).dry_run
    for bad, why in (
        (["u", "rel", "l", "-", "e", "d", "s", "x"], ""),
        (["u", "/h"], ""),
        (["-x", "u", "/h", "l", "-", "e", "d", "s", "x"], "illegal option -- x"),
    ):
        with pytest.raises(qlocal.UsageError) as e:
            qlocal.parse_args(bad)
        assert str(e.value) == why


def test_sigpipe_default_for_programs(user: User) -> None:
    user.qmail(".qmail-ext", "|yes | head -1 > /dev/null; echo ok\n")
    assert user.deliver() == (0, "ok\ndid 0+0+1\n")
    assert signal.getsignal(signal.SIGPIPE) is not None


# --- SRS (docs/srs.md): a forward of a foreign sender to a foreign address is queued with
# an SRS sender; mail for an SRS address of ours is forwarded to the address it stands
# for, and a forged or expired one fails permanently.

SECRET = "local-test-secret-0123456789"
SRSDOMAIN = "srs.test.example"
CONFIG = srs.Srs((SECRET.encode(),), SRSDOMAIN)


@pytest.fixture
def srs_on(home: Home) -> Home:
    write_control(home, "srs", f"{SECRET}\n{SRSDOMAIN}\n")
    write_control(home, "locals", f"example.com\nmx.test.example\n{SRSDOMAIN}\n")
    write_control(home, "virtualdomains", "virt.example:joe\n")
    return home


def envelope(sender: str, *rcpts: str) -> bytes:
    tos = b"".join(b"T" + r.encode() + b"\0" for r in rcpts)
    return b"F" + sender.encode() + b"\0" + tos + b"\0"


@pytest.mark.parametrize(
    ("sender", "rcpt", "rewritten"),
    [
        ("bob@example.org", "carol@elsewhere.net", True),
        ("bob@example.org", "carol@example.com", False),  # stays here: no SPF involved
        ("bob@virt.example", "carol@elsewhere.net", False),  # our own domain
        ("", "carol@elsewhere.net", False),  # a bounce
        ("#@[]", "carol@elsewhere.net", False),
    ],
)
def test_forward_sender(
    srs_on: Home, user: User, captured: Path, sender: str, rcpt: str, rewritten: bool
) -> None:
    user.qmail(".qmail-ext", f"&{rcpt}\n")
    code, text = user.deliver(sender=sender)
    assert code == 0, text
    ((_msg, env),) = _queued(captured)
    want = CONFIG.forward(sender, NOW) if rewritten else sender
    assert env == envelope(want, rcpt)
    if rewritten:
        assert want.startswith("SRS0=") and want.endswith("@" + SRSDOMAIN)
        assert CONFIG.reverse(want.split("@")[0], NOW) == sender


def test_no_control_srs_no_rewrite(home: Home, user: User, captured: Path) -> None:
    user.qmail(".qmail-ext", "&carol@elsewhere.net\n")
    assert user.deliver(sender="bob@example.org")[0] == 0
    ((_msg, env),) = _queued(captured)
    assert env == envelope("bob@example.org", "carol@elsewhere.net")


def test_sender_already_srs0_becomes_srs1(srs_on: Home, user: User, captured: Path) -> None:
    user.qmail(".qmail-ext", "&carol@elsewhere.net\n")
    first = "SRS0=abcd=XY=example.org=bob@first.example"
    assert user.deliver(sender=first)[0] == 0
    ((_msg, env),) = _queued(captured)
    assert env.startswith(b"FSRS1=") and b"=first.example==abcd=XY=example.org=bob@" in env


def test_unreadable_control_srs_defers(srs_on: Home, user: User, captured: Path) -> None:
    (srs_on.control / "srs").unlink()
    (srs_on.control / "srs").mkdir()  # reading it fails with EISDIR, whoever we are
    user.qmail(".qmail-ext", "&carol@elsewhere.net\n")
    code, text = user.deliver(sender="bob@example.org")
    assert code == 111
    assert "Unable to read control/srs" in text
    assert _queued(captured) == []
    # a delivery without a forward does not need it
    user.qmail(".qmail-ext", "./Maildir/\n")
    assert user.deliver(sender="bob@example.org")[0] == 0


def test_incomplete_control_srs_defers(srs_on: Home, user: User, captured: Path) -> None:
    write_control(srs_on, "srs", f"{SECRET}\n")
    user.qmail(".qmail-ext", "&carol@elsewhere.net\n")
    code, text = user.deliver(sender="bob@example.org")
    assert code == 111 and "control/srs" in text


# --- the way back ------------------------------------------------------------------------


def deliver_srs(user: User, local: str, sender: str = "") -> tuple[int, str]:
    user.qmail(".qmail-default", "./Maildir/\n")  # would catch it if SRS did not
    ext = local
    return user.deliver(local=local, ext=ext, dash="-", sender=sender, host=SRSDOMAIN)


def test_bounce_to_srs_address_goes_back(srs_on: Home, user: User, captured: Path) -> None:
    addr = CONFIG.forward("bob@example.org", NOW)
    local = addr.split("@")[0]
    code, text = deliver_srs(user, local)
    assert code == 0, text
    assert text.startswith("did 0+1+0\nqp ")
    ((msg, env),) = _queued(captured)
    assert env == envelope("", "bob@example.org")
    assert msg.startswith(b"Delivered-To: " + local.encode() + b"@" + SRSDOMAIN.encode() + b"\n")
    assert user.maildir() == []


def test_lower_cased_srs_address_goes_back(srs_on: Home, user: User, captured: Path) -> None:
    local = CONFIG.forward("Bob@Example.org", NOW).split("@")[0].lower()
    assert deliver_srs(user, local)[0] == 0
    ((_msg, env),) = _queued(captured)
    assert env == envelope("", "bob@example.org")


def test_srs1_goes_back_to_first_hop(srs_on: Home, user: User, captured: Path) -> None:
    first = "SRS0=abcd=XY=example.org=bob@first.example"
    local = CONFIG.forward(first, NOW).split("@")[0]
    assert deliver_srs(user, local)[0] == 0
    ((_msg, env),) = _queued(captured)
    assert env == envelope("", first)


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda a: a.replace("=bob", "=mallory"), "forged"),
        (lambda a: "SRS0=abcd=" + a.split("=", 2)[2], "forged"),
        (lambda a: "SRS0=nothing", "malformed"),
    ],
)
def test_forged_srs_address_bounces(
    srs_on: Home, user: User, captured: Path, make: object, text: str
) -> None:
    local = make(CONFIG.forward("bob@example.org", NOW).split("@")[0])  # type: ignore[operator]
    code, report = deliver_srs(user, local)
    assert code == 100
    assert f"Sorry, this SRS address is {text}. (#5.7.1)" in report
    assert _queued(captured) == [] and user.maildir() == []


def test_expired_srs_address_bounces(srs_on: Home, user: User, captured: Path) -> None:
    local = CONFIG.forward("bob@example.org", NOW - 30 * 86400).split("@")[0]
    code, report = deliver_srs(user, local)
    assert code == 100 and "has expired. (#5.7.1)" in report
    assert _queued(captured) == []


def test_srs_local_part_without_srs_is_ordinary(home: Home, user: User, captured: Path) -> None:
    local = CONFIG.forward("bob@example.org", NOW).split("@")[0]
    assert deliver_srs(user, local)[0] == 0
    assert _queued(captured) == [] and len(user.maildir()) == 1


def test_srs_source_from_the_spawner(home: Home, user: User, captured: Path) -> None:
    """The spawner hands control/srs's bytes in (read as root): the file itself is not read."""
    local = CONFIG.forward("bob@example.org", NOW).split("@")[0]
    user.qmail(".qmail-default", "./Maildir/\n")
    req = qlocal.Request("joe", str(user.dir), local, "-", local, SRSDOMAIN, "", "./Maildir/\n")
    with tempfile.TemporaryFile() as m, tempfile.TemporaryFile() as rep:
        m.write(b"Subject: x\n\nbody\n")
        m.flush()
        code = qlocal.run(
            req, m.fileno(), home, out=rep.fileno(), err=rep.fileno(), now=NOW,
            srs=lambda: f"{SECRET}\n{SRSDOMAIN}\n".encode(),
        )  # fmt: skip
    assert code == 0
    ((_msg, env),) = _queued(captured)
    assert env == envelope("", "bob@example.org")


def test_dry_run_says_where(srs_on: Home, user: User) -> None:
    local = CONFIG.forward("bob@example.org", NOW).split("@")[0]
    user.qmail(".qmail-default", "./Maildir/\n")
    code, text = user.deliver(local=local, ext=local, host=SRSDOMAIN, sender="", dry_run=True)
    assert (code, text) == (0, "forward bob@example.org\ndid 0+1+0\n")


@pytest.mark.parametrize(
    ("sender", "want"),
    [("bob@example.org", True), ("bob@example.com", False), ("", False), ("#@[]", False)],
)
def test_programs_get_srssender_for_a_foreign_sender(
    srs_on: Home, user: User, sender: str, want: bool
) -> None:
    user.qmail(".qmail-ext", '|echo "[$SRSSENDER]" > srs.out\n')
    assert user.deliver(sender=sender)[0] == 0
    got = (user.dir / "srs.out").read_text().strip()
    assert got == (f"[{CONFIG.forward(sender, NOW)}]" if want else "[]")


def test_no_srssender_without_control_srs(home: Home, user: User) -> None:
    user.qmail(".qmail-ext", '|echo "[$SRSSENDER]" > srs.out\n')
    env = {b"SRSSENDER": b"forged@elsewhere", b"PATH": b"/usr/bin:/bin"}
    assert user.deliver(sender="bob@example.org", environ=env)[0] == 0
    assert (user.dir / "srs.out").read_text().strip() == "[]"


def test_unreadable_control_srs_does_not_stop_programs(srs_on: Home, user: User) -> None:
    (srs_on.control / "srs").unlink()
    (srs_on.control / "srs").mkdir()
    user.qmail(".qmail-ext", '|echo "[$SRSSENDER]" > srs.out\n')
    assert user.deliver(sender="bob@example.org")[0] == 0
    assert (user.dir / "srs.out").read_text().strip() == "[]"


def test_unreadable_control_srs_defers_before_any_delivery(
    srs_on: Home, user: User, captured: Path
) -> None:
    """A forward that cannot get its sender fails before the Maildir line is delivered,
    so the retry does not deliver it twice."""
    (srs_on.control / "srs").unlink()
    (srs_on.control / "srs").mkdir()
    user.qmail(".qmail-ext", "./Maildir/\n&carol@elsewhere.net\n")
    assert user.deliver(sender="bob@example.org")[0] == 111
    assert user.maildir() == [] and _queued(captured) == []
