"""SRS under root (multi-user, docs/srs.md): control/srs is root:qmail 0640, out of the
users' reach, and still a user's ``.qmail`` forward leaves with an SRS sender (the
spawner reads the file as root and hands it to the delivery), a bounce to it goes back
(the lookup process checks it at RCPT, the delivery forwards it), a forged one gets 550
at RCPT. Needs root and qmail's accounts (``make accounts``)."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from tests.conftest import free_port, is_root
from tests.integration.test_e2e_mail import Sink
from tests.integration.test_run_daemon import files, listening, wait_for
from tests.integration.test_run_root import BIN, root_home, start_root_run  # noqa: F401
from tests.integration.test_srs_e2e import dumps_with, envelope_of

pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]

SECRET = "root-srs-secret-0123456789abcdef"
SRSDOMAIN = "srs.test.example"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path)
    yield s
    s.close()


def test_srs_with_the_secret_out_of_the_users_reach(
    root_home: tuple[Home, Path],  # noqa: F811 - the imported fixture
    sink: Sink,
) -> None:
    home, user = root_home
    nobody = pwd.getpwnam("nobody")
    ctl = home.control
    (ctl / "srs").write_text(f"{SECRET}\n{SRSDOMAIN}\n")
    os.chown(ctl / "srs", 0, grp.getgrnam("qmail").gr_gid)
    os.chmod(ctl / "srs", 0o640)
    (ctl / "locals").write_text(f"mx.test.example\ntest.example\n{SRSDOMAIN}\n")
    (ctl / "rcpthosts").write_text(f"mx.test.example\ntest.example\n{SRSDOMAIN}\n")
    route = f"127.0.0.1:{sink.port}"
    (ctl / "smtproutes").write_text(f"elsewhere.example:{route}\nexample.org:{route}\n")
    # the SRS local parts belong to nobody here (the alias user's home may not exist)
    assign = (
        (home.users / "assign")
        .read_text()
        .replace(
            "\n.\n",
            f"\n+srs0=:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:-::"
            f"\n+srs1=:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:-::\n.\n",
        )
    )
    (home.users / "assign").write_text(assign)
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    subprocess.run([str(BIN / "pyqmail"), "newu", "--home", str(home.root)], check=True, env=env)
    fwd = user / ".qmail-fwd"
    fwd.write_text("&carol@elsewhere.example\n")
    os.chown(fwd, nobody.pw_uid, nobody.pw_gid)
    # the user cannot read the secret
    probe = subprocess.run(
        ["cat", str(ctl / "srs")], user=nobody.pw_uid, group=nobody.pw_gid, capture_output=True
    )
    assert probe.returncode != 0

    port = free_port()
    proc, log = start_root_run(home, port)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("foreign@example.org", ["joe-fwd@test.example"], "Subject: fwd\r\n\r\nx\r\n")
        wait_for(lambda: bool(dumps_with(sink, b"Subject: fwd")), what="the forward")
        mail_from, rcpt = envelope_of(dumps_with(sink, b"Subject: fwd")[0])
        assert rcpt == "<carol@elsewhere.example>"
        assert mail_from.startswith("<SRS0=") and mail_from.endswith(
            f"=example.org=foreign@{SRSDOMAIN}>"
        )
        srs_address = mail_from[1:-1]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("bouncer.example")
            s.mail("")
            code, text = s.rcpt(srs_address.replace("=foreign@", "=victim@"))
            assert code == 550 and b"5.7.1" in text
            assert s.rcpt(srs_address)[0] == 250
            assert s.data(b"Subject: back\r\n\r\nbounced\r\n")[0] == 250
        wait_for(lambda: bool(dumps_with(sink, b"Subject: back")), what="the reversed bounce")
        assert envelope_of(dumps_with(sink, b"Subject: back")[0]) == ("<>", "<foreign@example.org>")
        assert files(user / "Maildir" / "new") == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
