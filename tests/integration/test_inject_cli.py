"""qmail-inject and sendmail as programs call them, into a real queue."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue.envelope import Todo, parse_todo
from pyqmail.queue.layout import QueuePaths

BIN = Path(sys.executable).parent


def queued(home: Home) -> list[tuple[Todo, bytes]]:
    paths = QueuePaths(home.queue)
    out = []
    for todo in sorted((home.queue / "todo").iterdir()):
        n = int(todo.name)
        out.append((parse_todo(todo.read_bytes()), paths.mess(n).read_bytes()))
    return out


def run(
    home: Home, prog: str, args: list[str], data: bytes, **env: str
) -> subprocess.CompletedProcess[bytes]:
    e = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(home.root), "PYQMAIL_SINGLE_USER": "1",
         "USER": "robot", **env}  # fmt: skip
    return subprocess.run([str(BIN / prog), *args], input=data, env=e, capture_output=True,
                          timeout=60)  # fmt: skip


@pytest.fixture
def site(home: Home) -> Home:
    (home.control / "defaulthost").write_text("test.example\n")
    (home.control / "idhost").write_text("ids.test.example\n")
    return home


def test_inject_queues_with_headers_completed(site: Home) -> None:
    r = run(site, "qmail-inject", [], b"To: alice\nBcc: bob\nSubject: hi\n\nbody\n",
            QMAILUSER="robot", QMAILNAME="The Robot")  # fmt: skip
    assert r.returncode == 0, r.stderr
    [(todo, mess)] = queued(site)
    assert todo.sender == b"robot@test.example"
    assert todo.recipients == (b"alice@test.example", b"bob@test.example")
    header = mess.split(b"\n\n")[0]
    assert header.startswith(b"Received: (qmail ")
    assert b'\nFrom: "The Robot" <robot@test.example>\n' in mess
    assert b"\nTo: alice@test.example\n" in mess
    assert b"Bcc" not in mess
    assert b"@ids.test.example>\n" in header
    assert mess.endswith(b"\n\nbody\n")


def test_inject_fatal_parse_error_is_100_and_queues_nothing(site: Home) -> None:
    r = run(site, "qmail-inject", [], b'From: "unterminated\nTo: a\n\nx\n')
    assert r.returncode == 100
    assert r.stderr == b'qmail-inject: fatal: unable to parse this line:\nFrom: "unterminated\n'
    assert queued(site) == []
    assert list((site.queue / "pid").iterdir()) == []


def test_inject_usage_error(site: Home) -> None:
    r = run(site, "qmail-inject", ["-x"], b"")
    assert r.returncode == 100
    assert r.stderr == b"qmail-inject: illegal option -- x\n"


@pytest.mark.parametrize(("code", "rc", "text"), [
    (31, 100, b"mail server permanently rejected message (#5.3.0)"),
    (71, 111, b"mail server temporarily rejected message (#4.3.0)"),
    (1, 111, b"qq temporary problem (#4.3.0)"),
])  # fmt: skip
def test_queue_failures_map_to_exit_codes(site: Home, tmp_path: Path, code: int, rc: int,
                                          text: bytes) -> None:  # fmt: skip
    q = tmp_path / "q.sh"
    q.write_text(f"#!/bin/sh\ncat >/dev/null\nexit {code}\n")
    q.chmod(0o755)
    r = run(site, "qmail-inject", ["a"], b"Subject: x\n\n", QMAILQUEUE=str(q))
    assert r.returncode == rc
    assert r.stderr == b"qmail-inject: fatal: " + text + b"\n"


def test_unreadable_control_is_temporary(site: Home) -> None:
    (site.control / "defaulthost").unlink()
    (site.control / "defaulthost").mkdir()
    r = run(site, "qmail-inject", ["a"], b"\n")
    assert r.returncode == 111
    assert b"qmail-inject: fatal: unable to read controls" in r.stderr


def test_sendmail_t_as_php_calls_it(site: Home) -> None:
    msg = (b"To: alice@test.example, Carol <carol>\nBcc: hidden@x.example\n"
           b"Subject: php\nX-PHP-Originating-Script: 0:index.php\n\nhello\n")  # fmt: skip
    r = run(site, "sendmail", ["-t", "-i"], msg)
    assert r.returncode == 0, r.stderr
    [(todo, mess)] = queued(site)
    # qmail-inject reports one field's addresses last-first, as notqmail does
    assert todo.recipients == (b"carol@test.example", b"alice@test.example",
                               b"hidden@x.example")  # fmt: skip
    assert b"Bcc" not in mess and b"hidden" not in mess
    assert b"\nTo: alice@test.example, Carol <carol@test.example>\n" in mess


def test_sendmail_as_cron_calls_it(site: Home) -> None:
    msg = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@box> run-parts\n"
           b"Content-Type: text/plain; charset=UTF-8\n\noutput\n")  # fmt: skip
    r = run(site, "sendmail", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], msg)
    assert r.returncode == 0, r.stderr
    [(todo, mess)] = queued(site)
    assert todo.recipients == (b"root@test.example",)
    assert b"\nFrom: root@test.example (Cron Daemon)\n" in mess


def test_sendmail_git_send_email_style(site: Home) -> None:
    msg = (b"From: Dev <dev@example.org>\nTo: list@lists.example\nCc: a@b.example\n"
           b"Subject: [PATCH] x\nMessage-Id: <1@example.org>\n\n---\n")  # fmt: skip
    r = run(site, "sendmail", ["-i", "-f", "dev@example.org", "list@lists.example",
                               "a@b.example"], msg)  # fmt: skip
    assert r.returncode == 0, r.stderr
    [(todo, mess)] = queued(site)
    assert todo.sender == b"dev@example.org"
    assert todo.recipients == (b"list@lists.example", b"a@b.example")
    assert b"\nMessage-Id: <1@example.org>\n" in mess
    assert mess.count(b"Message-I") == 1


def test_sendmail_lone_dot_does_not_end_input(site: Home) -> None:
    r = run(site, "sendmail", ["-oi", "x@y.example"], b"Subject: s\n\na\n.\nb\n")
    assert r.returncode == 0
    [(_, mess)] = queued(site)
    assert mess.endswith(b"\na\n.\nb\n")


def test_sendmail_usage(site: Home) -> None:
    r = run(site, "sendmail", ["-q"], b"")
    assert r.returncode == 100
    assert r.stderr.endswith(
        b"sendmail: usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]\n"
    )


def test_sendmail_bs_speaks_smtp_on_stdin(site: Home) -> None:
    smtp = (b"HELO me\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
            b"Subject: bs\r\n\r\nhi\r\n.\r\nQUIT\r\n")  # fmt: skip
    r = run(site, "sendmail", ["-bs"], smtp)
    assert r.returncode == 0, r.stderr
    assert b"\r\n250 ok " in r.stdout
    [(todo, mess)] = queued(site)
    assert todo.recipients == (b"c@d.example",)
    assert b"(sendmail-bs@127.0.0.1)" in mess
    # qmail-smtpd runs as the caller: qmail-queue's line names the uid, not the network
    first = mess.split(b"\n", 1)[0]
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked by uid %d\); .*" % os.getuid(), first)


def test_sendmail_bp_is_qmail_qread(site: Home) -> None:
    run(site, "sendmail", ["x@y.example"], b"Subject: s\n\n")
    r = run(site, "sendmail", ["-bp"], b"")
    assert r.returncode == 0, r.stderr
    assert r.stdout == run(site, "qmail-qread", [], b"").stdout


@pytest.mark.parametrize("prog", ["qmail-inject", "sendmail"])
def test_relative_qmailqueue_is_under_the_home(site: Home, prog: str) -> None:
    """QMAILQUEUE=bin/qmail-queue is the home's (pyqmail init's wrapper), as qmail runs it
    from the home whatever the caller's directory."""
    r = run(site, prog, ["x@y.example"], b"Subject: s\n\n", QMAILQUEUE="bin/qmail-queue")
    assert r.returncode == 0, r.stderr
    [(todo, _mess)] = queued(site)
    assert todo.recipients == (b"x@y.example",)


def test_qmailqueue_custom_refusal(site: Home, tmp_path: Path) -> None:
    qq = tmp_path / "qq"
    qq.write_text("#!/bin/sh\ncat >/dev/null\nprintf %s 'Dno mail from cron today' >&6\nexit 82\n")
    qq.chmod(0o755)
    r = run(site, "qmail-inject", ["x@y.example"], b"Subject: s\n\n", QMAILQUEUE=str(qq))
    assert r.returncode == 100
    assert r.stderr == b"qmail-inject: fatal: no mail from cron today\n"
