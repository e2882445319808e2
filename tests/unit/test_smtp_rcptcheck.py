"""smtp/rcptcheck.py (validrcptto, $RCPTCHECK, the replies) and the core's CheckRcpt."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyqmail.control import Control, load
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.smtp import rcptcheck, replies
from pyqmail.smtp.protocol import (
    CheckRcpt,
    Close,
    MessageEnd,
    MessageStart,
    Send,
    SmtpServerConnection,
    State,
)
from pyqmail.smtp.rcptcheck import RcptChecks, reply_for
from pyqmail.smtp.session import Session
from tests.conftest import write_control

OK, PERM, TEMP = Status.OK, Status.PERM, Status.TEMP


class FakeLocal:
    """A LocalRecipients answering from a table (the real one: test_local_verdict.py)."""

    def __init__(self, table: dict[str, Status]) -> None:
        self.table = table
        self.asked: list[str] = []

    def local_part(self, ctl: Control, address: str) -> str | None:
        at = address.rfind("@")
        return address[:at] if address[at + 1 :].lower() in ctl.locals else None

    def answers_now(self, ctl: Control, address: str) -> bool:
        return not address.startswith("slow")

    def verdict(self, ctl: Control, address: str) -> Outcome | None:
        if self.local_part(ctl, address) is None:
            return None
        self.asked.append(address)
        return Outcome(self.table.get(address.split("@")[0].lower(), PERM), "")


@pytest.fixture
def ctl(home: Home) -> Control:
    write_control(home, "locals", "test.example\n")
    return load(home)


def checks(home: Home, **table: Status) -> RcptChecks:
    return RcptChecks(home, FakeLocal(table), floor=0.0)


# ------------------------------------------------------------------ the checks


def test_local_verdicts_and_rcptchecks_zero(home: Home, ctl: Control) -> None:
    c = checks(home, alice=OK, busy=TEMP)
    assert c.check(ctl, {}, "s@x", "alice@test.example", False) is OK
    assert c.check(ctl, {}, "s@x", "nobody@test.example", False) is PERM
    assert c.check(ctl, {}, "s@x", "busy@test.example", False) is TEMP
    assert c.check(ctl, {}, "s@x", "nobody@test.example", True) is PERM  # relay clients too
    write_control(home, "rcptchecks", "0\n")
    assert c.check(load(home), {}, "s@x", "nobody@test.example", False) is OK


def test_blocking_only_for_a_lookup_elsewhere_or_a_program(home: Home, ctl: Control) -> None:
    c = checks(home)
    assert c.blocking({}, ctl, "slow@test.example")  # e.g. root mode's lookup, not cached
    assert not c.blocking({}, ctl, "fast@test.example")
    write_control(home, "rcptchecks", "0\n")
    assert not c.blocking({}, load(home), "slow@test.example")  # not asked at all


def test_validrcptto_text_and_cdb(home: Home, ctl: Control) -> None:
    c = checks(home)
    assert c.check(ctl, {}, "s@x", "any@vpop.example", False) is OK  # no list: not checked
    write_control(home, "validrcptto", "Info@Vpop.Example\n@catchall.example\n# c\n")
    assert c.check(ctl, {}, "s@x", "info@vpop.example", False) is OK
    assert c.check(ctl, {}, "s@x", "INFO@vpop.example", False) is OK
    assert c.check(ctl, {}, "s@x", "other@vpop.example", False) is PERM
    assert c.check(ctl, {}, "s@x", "who@catchall.example", False) is OK
    assert c.check(ctl, {}, "s@x", "who@sub.catchall.example", False) is PERM
    assert c.check(ctl, {}, "s@x", "other@vpop.example", True) is OK  # relayed elsewhere
    assert c.check(ctl, {}, "s@x", "nobody@test.example", False) is PERM  # local: lookup
    # compiled: the text file gone, the cdb alone answers
    code = "import sys; from pyqmail.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYQMAIL_HOME=str(home.root))
    p = subprocess.run([sys.executable, "-c", code, "newvalidrcptto"], env=env, check=False)
    assert p.returncode == 0
    (home.control / "validrcptto").unlink()
    assert c.check(ctl, {}, "s@x", "info@vpop.example", False) is OK
    assert c.check(ctl, {}, "s@x", "who@catchall.example", False) is OK
    assert c.check(ctl, {}, "s@x", "other@vpop.example", False) is PERM
    (home.control / "validrcptto.cdb").unlink()
    assert c.check(ctl, {}, "s@x", "other@vpop.example", False) is OK


def test_newvalidrcptto_without_a_list_fails_and_writes_nothing(home: Home) -> None:
    code = "import sys; from pyqmail.cli.newvalidrcptto import main; sys.exit(main())"
    env = dict(os.environ, PYQMAIL_HOME=str(home.root))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 111
    assert "pyqmail newvalidrcptto: fatal: unable to read control/validrcptto" in p.stderr
    assert not (home.control / "validrcptto.cdb").exists()


def _program(tmp_path: Path, body: str) -> str:
    p = tmp_path / "rcpt check"  # a space: it is never given to a shell
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(stat.S_IRWXU)
    return str(p)


@pytest.mark.parametrize(("code", "want"), [(0, OK), (100, PERM), (111, TEMP), (3, TEMP)])
def test_rcptcheck_program_exit_codes(
    home: Home, ctl: Control, tmp_path: Path, code: int, want: Status
) -> None:
    prog = _program(tmp_path, f"exit {code}\n")
    c = checks(home)
    assert c.blocking({"RCPTCHECK": prog}, ctl, "a@vpop.example")
    assert not c.blocking({}, ctl, "a@vpop.example")
    assert c.check(ctl, {"RCPTCHECK": prog}, "s@x", "a@vpop.example", False) is want


def test_rcptcheck_program_environment_is_minimal(
    home: Home, ctl: Control, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "leak")
    out = tmp_path / "env.txt"
    prog = _program(tmp_path, f"env | sort > '{out}'\n")
    env = {"RCPTCHECK": prog, "TCPREMOTEIP": "192.0.2.7", "RELAYCLIENT": "x"}
    assert checks(home, alice=OK).check(ctl, env, "s@x.example", "alice@test.example", False) is OK
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert seen["RECIPIENT"] == "alice@test.example"
    assert seen["SENDER"] == "s@x.example"
    assert seen["TCPREMOTEIP"] == "192.0.2.7"
    assert "SECRET_TOKEN" not in seen and "RELAYCLIENT" not in seen


def test_rcptcheck_program_time_limit_and_missing_program(
    home: Home, ctl: Control, tmp_path: Path
) -> None:
    c = RcptChecks(home, FakeLocal({}), floor=0.0, program_timeout=0.3)
    prog = _program(tmp_path, "sleep 30 & sleep 30\n")
    t0 = time.monotonic()
    assert c.check(ctl, {"RCPTCHECK": prog}, "s@x", "a@vpop.example", False) is TEMP
    assert time.monotonic() - t0 < 5
    missing = str(tmp_path / "nothere")
    assert c.check(ctl, {"RCPTCHECK": missing}, "s@x", "a@vpop.example", False) is TEMP


def test_not_run_for_a_recipient_already_refused_or_relayed(
    home: Home, ctl: Control, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    prog = _program(tmp_path, f"echo \"$RECIPIENT\" >> '{ran}'\n")
    c = checks(home, alice=OK)
    env = {"RCPTCHECK": prog}
    assert c.check(ctl, env, "s@x", "nobody@test.example", False) is PERM
    assert c.check(ctl, env, "s@x", "x@elsewhere.example", True) is OK
    assert c.check(ctl, env, "s@x", "alice@test.example", True) is OK
    assert ran.read_text() == "alice@test.example\n"


def test_one_refusal_and_one_deferral_line() -> None:
    assert reply_for(OK) is None
    assert reply_for(PERM) == rcptcheck.NO_SUCH_USER
    assert reply_for(PERM).startswith(b"550 ") and b"5.1.1" in reply_for(PERM)  # type: ignore[union-attr]
    assert reply_for(TEMP) == rcptcheck.CHECK_LATER
    assert reply_for(TEMP).startswith(b"451 ")  # type: ignore[union-attr]


# ------------------------------------------------------------------ the protocol core


def converse(
    home: Home, script: bytes, piece: int, answers: dict[bytes, bytes | None]
) -> tuple[bytes, list[MessageStart], list[CheckRcpt]]:
    """Feed ``script`` ``piece`` bytes at a time (0: at once) to a core with recipient
    checks; answer each CheckRcpt from ``answers`` (missing: accept)."""
    write_control(home, "rcpthosts", "test.example\n")
    conn = SmtpServerConnection(Session(load(home), {}, check_rcpt=True))
    out = b""
    starts: list[MessageStart] = []
    asked: list[CheckRcpt] = []

    def handle(events: list[object]) -> None:
        nonlocal out
        while events:
            nxt: list[object] = []
            for i, ev in enumerate(events):
                if isinstance(ev, Send):
                    out += ev.data
                elif isinstance(ev, CheckRcpt):
                    assert i == len(events) - 1, "CheckRcpt must end its event list"
                    assert conn.state is State.WAIT_RCPT
                    asked.append(ev)
                    nxt = list(conn.rcpt_result(answers.get(ev.address)))
                elif isinstance(ev, MessageStart):
                    starts.append(ev)
                    nxt = list(conn.start_result(True))
                elif isinstance(ev, MessageEnd):
                    nxt = list(conn.message_result(b"250 ok 1 qp 2\r\n"))
                elif isinstance(ev, Close):
                    pass
            events = nxt

    handle(list(conn.greet()))
    step = piece or len(script)
    for i in range(0, len(script), step):
        handle(list(conn.receive_data(script[i : i + step])))
    return out, starts, asked


@pytest.mark.parametrize("piece", [1, 0])
def test_pipelined_rcpts_are_answered_in_order(home: Home, piece: int) -> None:
    script = (
        b"EHLO x\r\nMAIL FROM:<s@x.example>\r\nRCPT TO:<a@test.example>\r\n"
        b"RCPT TO:<nobody@test.example>\r\nRCPT TO:<later@test.example>\r\n"
        b"RCPT TO:<b@test.example>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"
    )
    answers = {
        b"nobody@test.example": rcptcheck.NO_SUCH_USER,
        b"later@test.example": rcptcheck.CHECK_LATER,
    }
    out, starts, asked = converse(home, script, piece, answers)
    lines = out.split(b"\r\n")
    codes = [ln[:4] for ln in lines if ln[:3].isdigit() and ln[3:4] == b" "]
    assert codes == [
        b"220 ",
        b"250 ",
        b"250 ",
        b"250 ",
        b"550 ",
        b"451 ",
        b"250 ",
        b"354 ",
        b"250 ",
        b"221 ",
    ]
    assert [a.address for a in asked] == [
        b"a@test.example",
        b"nobody@test.example",
        b"later@test.example",
        b"b@test.example",
    ]
    assert starts[0].recipients == (b"a@test.example", b"b@test.example")
    assert asked[0].sender == b"s@x.example" and not asked[0].relayed


def test_refused_by_rcpthosts_is_never_checked(home: Home) -> None:
    out, _, asked = converse(
        home, b"MAIL FROM:<s@x>\r\nRCPT TO:<a@elsewhere.example>\r\nQUIT\r\n", 0, {}
    )
    assert replies.NOT_RCPTHOSTS in out and asked == []


def test_refused_srs_address_says_5_7_1() -> None:
    assert reply_for(PERM, "SRS0=abcd=XY=example.org=bob@srs.example") == rcptcheck.SRS_REFUSED
    assert rcptcheck.SRS_REFUSED.startswith(b"550 ") and b"5.7.1" in rcptcheck.SRS_REFUSED
    assert reply_for(PERM, "srs1-x=y@srs.example") == rcptcheck.SRS_REFUSED
    assert reply_for(PERM, "bob@srs.example") == rcptcheck.NO_SUCH_USER
    assert reply_for(TEMP, "SRS0=abcd=XY=example.org=bob@srs.example") == rcptcheck.CHECK_LATER
    assert reply_for(OK, "SRS0=abcd=XY=example.org=bob@srs.example") is None
