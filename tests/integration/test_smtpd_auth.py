"""SMTP AUTH on ``pyqmail run``'s listeners with real clients: ``pyqmail passwd`` writes
control/authusers, Python's smtplib authenticates (PLAIN and LOGIN) after STARTTLS on the
submission port and on 465, the message is relayed and DKIM-signed with ``ESMTPSA`` in its
Received line; a control/checkpassword program; the session log's AUTH lines (user and
address, never the password); the failures record's 421."""

from __future__ import annotations

import base64
import os
import smtplib
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.smtp import replies
from tests.conftest import write_control
from tests.integration.test_run_daemon import BIN, wait_for
from tests.integration.test_smtpd_tls import Raw, TlsMta, received_line

PASSWORD = "Corr3ct horse"


class AuthMta(TlsMta):
    def delivered_to(self, user: str, subject: str) -> bytes:
        found: list[bytes] = []

        def look() -> bool:
            d = self.maildir(user)
            for f in sorted(os.listdir(d)):
                data = (d / f).read_bytes()
                if f"Subject: {subject}\n".encode() in data:
                    found.append(data)
                    return True
            return False

        wait_for(look, what=f"delivery of {subject!r} to {user}")
        return found[0]


def passwd(mta: AuthMta, user: str, password: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "pyqmail"), "passwd", user],
        input=password.encode() + b"\n",
        env=mta.env,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def mta(tmp_path: Path, ca: trustme.CA) -> Iterator[AuthMta]:
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    m = AuthMta(home, tmp_path, ca)
    assert passwd(m, "alice", PASSWORD).returncode == 0
    m.start_tls()
    yield m
    m.stop()
    assert "Traceback" not in m.log()


def test_passwd_writes_a_private_argon2id_line_and_replaces_it(mta: AuthMta) -> None:
    path = mta.home.control / "authusers"
    first = path.read_bytes()
    assert first.startswith(b"alice:$argon2id$") and PASSWORD.encode() not in first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert passwd(mta, "bob", "other pw").returncode == 0
    assert passwd(mta, "alice", "new pw").returncode == 0
    lines = path.read_bytes().splitlines()
    assert [ln.split(b":")[0] for ln in lines] == [b"alice", b"bob"]
    assert lines[0] != first.strip()
    bad = passwd(mta, "bad:name", "x")
    assert bad.returncode == 100 and b"user name" in bad.stderr
    gone = subprocess.run([str(BIN / "pyqmail"), "passwd", "--delete", "bob"], env=mta.env,
                          capture_output=True, timeout=60)  # fmt: skip
    assert gone.returncode == 0 and b"bob:" not in path.read_bytes()


def _smtp(mta: AuthMta, port: int) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.example")
    assert not s.has_extn("auth")  # not outside TLS
    s.starttls(context=mta.client_ctx())
    s.ehlo("client.example")
    return s


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_smtplib_authenticates_on_submission_and_relays_signed_with_esmtpsa(
    mta: AuthMta, mech: str
) -> None:
    keygen = subprocess.run([str(BIN / "pyqmail"), "dkim", "keygen", "test.example"],
                            env=mta.env, capture_output=True, timeout=60)  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    with _smtp(mta, mta.submission) as s:
        assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        with pytest.raises(smtplib.SMTPSenderRefused):  # MAIL needs AUTH on 587
            s.sendmail("alice@test.example", ["bob@test.example"], b"x")
        s.rset()
        s.user, s.password = "alice", PASSWORD
        code, _ = s.auth(mech, s.auth_plain if mech == "PLAIN" else s.auth_login)
        assert code == 235
        # a relay client now: a foreign domain is accepted
        s.mail("alice@test.example")
        assert s.rcpt("someone@elsewhere.example")[0] == 250
        s.rset()
        msg = f"From: alice@test.example\r\nSubject: auth {mech}\r\n\r\nsigned\r\n"
        s.sendmail("alice@test.example", ["bob@test.example"], msg)
    got = mta.delivered_to("bob", f"auth {mech}")
    assert b" with ESMTPSA (TLSv1.3 " in received_line(got)
    assert b"\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=test.example;" in got
    log = mta.log()
    assert f"auth {mech} alice from 127.0.0.1 ok" in log
    assert PASSWORD not in log


def test_unauthenticated_mail_is_not_signed_and_port_25_does_not_relay(mta: AuthMta) -> None:
    subprocess.run([str(BIN / "pyqmail"), "dkim", "keygen", "test.example"], env=mta.env,
                   capture_output=True, timeout=60, check=True)  # fmt: skip
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        s.ehlo("client.example")
        msg = "From: alice@test.example\r\nSubject: plain 25\r\n\r\nnot signed\r\n"
        s.sendmail("alice@test.example", ["bob@test.example"], msg)
    got = mta.delivered_to("bob", "plain 25")
    assert b"DKIM-Signature" not in got


def test_wrong_password_is_535_and_logged_without_the_password(mta: AuthMta) -> None:
    with _smtp(mta, mta.submission) as s:
        s.user, s.password = "alice", "Wrong-Guess-1"
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.auth("PLAIN", s.auth_plain)
        assert e.value.smtp_code == 535 and b"5.7.8" in e.value.smtp_error
        assert s.noop()[0] == 250
    log = mta.log()
    assert "auth PLAIN alice from 127.0.0.1 failed" in log
    assert "Wrong-Guess-1" not in log
    assert base64.b64encode(b"\0alice\0Wrong-Guess-1").decode() not in log


def test_implicit_tls_port_465(mta: AuthMta) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", mta.smtps, timeout=30, context=mta.client_ctx()) as s:
        s.ehlo("client.example")
        s.login("alice", PASSWORD)
        s.sendmail("alice@test.example", ["bob@test.example"], "Subject: via 465\r\n\r\nx\r\n")
    assert b" with ESMTPSA " in received_line(mta.delivered_to("bob", "via 465"))


def test_checkpassword_program_from_control(mta: AuthMta, tmp_path: Path) -> None:
    prog = tmp_path / "checkpw"
    asked = tmp_path / "asked"
    # a small Python checkpassword: fd 3 is user NUL password NUL timestamp NUL
    prog.write_text(
        "#!/usr/bin/env python3\n"
        "import os, sys\n"
        "user, pw, ts = os.read(3, 4096).split(b'\\0')[:3]\n"
        f"open({str(asked)!r}, 'ab').write(user + b' ts=' + ts + b'\\n')\n"
        "if user == b'carol' and pw == b'chk pw':\n"
        "    os.execvp(sys.argv[1], sys.argv[1:])\n"
        "sys.exit(1)\n"
    )
    prog.chmod(0o755)
    (mta.home.control / "authusers").unlink()
    write_control(mta.home, "checkpassword", f"{prog} /bin/true\n")
    wait_for(lambda: b"AUTH" in _ehlo_tls(mta), what="AUTH offered after the control change")
    with _smtp(mta, mta.submission) as s:
        s.login("carol", "chk pw")
    with _smtp(mta, mta.submission) as s, pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("carol", "nope")
    # smtplib's login tries the next mechanism after a 535: two or more checks, each with
    # the user and an empty timestamp
    lines = asked.read_bytes().splitlines()
    assert len(lines) >= 2 and set(lines) == {b"carol ts="}


def _ehlo_tls(mta: AuthMta) -> bytes:
    c = Raw(mta.submission)
    c.reply()
    c.cmd(b"EHLO c")
    c.cmd(b"STARTTLS")
    c.starttls(mta.client_ctx())
    got = c.cmd(b"EHLO c")
    c.close()
    return got


def test_no_password_source_no_auth(mta: AuthMta) -> None:
    (mta.home.control / "authusers").unlink()
    wait_for(lambda: b"AUTH" not in _ehlo_tls(mta), what="AUTH withdrawn")
    c = Raw(mta.submission)
    c.reply()
    c.cmd(b"EHLO c")
    c.cmd(b"STARTTLS")
    c.starttls(mta.client_ctx())
    c.cmd(b"EHLO c")
    assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0x")) == replies.NO_AUTH
    c.close()


@pytest.mark.slow  # the delays of eight failures: 30 s
def test_repeated_failures_from_one_address_end_in_421(mta: AuthMta) -> None:
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0mallory\0guess")
    codes = []
    for _ in range(12):
        c = Raw(mta.submission)
        c.reply()
        c.cmd(b"EHLO c")
        c.cmd(b"STARTTLS")
        c.starttls(mta.client_ctx())
        c.cmd(b"EHLO c")
        got = c.cmd(bad)
        codes.append(int(got[:3]))
        c.close()
        if codes[-1] == 421:
            break
    assert codes == [535] * 8 + [421]
    # the session log is appended after the reply went out: wait for the last line
    wait_for(lambda: "auth PLAIN - from 127.0.0.1 blocked" in mta.log(), what="the log line")
    assert "auth PLAIN mallory from 127.0.0.1 failed" in mta.log()
