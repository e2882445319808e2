"""`pyqmail smtpd --listen` on loopback, driven by smtplib and raw sockets.

One listener process per test module (control files are re-read per connection, so each
test sets what it needs); every bad input is checked for its reply, for the server
staying up, and for nothing reaching the queue that should not.
"""

from __future__ import annotations

import io
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail import tcprules
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.mailbox import Refusal
from pyqmail.queue.envelope import parse_todo
from pyqmail.smtp import replies
from tests.conftest import LoAddresses, free_port, require_ipv6_loopback


class Server:
    def __init__(self, home: Home, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.home = home
        self.port = port
        self.proc = proc

    def control(self, name: str, text: str | None) -> None:
        path = self.home.control / name
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)

    def queued(self) -> list[tuple[bytes, list[bytes]]]:
        out = []
        for f in sorted((self.home.queue / "todo").rglob("*")):
            if f.is_file():
                t = parse_todo(f.read_bytes())
                out.append((t.sender, list(t.recipients)))
        return out

    def alive(self) -> bool:
        c = Raw(self.port)
        ok = c.reply()[0] == 220 and c.cmd(b"NOOP")[0] == 250
        c.close()
        return ok


class Raw:
    """Exact bytes to the server, replies back."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, source: str | None = None) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.s = socket.socket(fam, socket.SOCK_STREAM)
        self.s.settimeout(10)
        if source:
            self.s.bind((source, 0))
        self.s.connect((host, port))
        self.buf = b""

    def reply(self) -> tuple[int | None, bytes]:
        lines = b""
        while True:
            while b"\n" not in self.buf:
                try:
                    d = self.s.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    d = b""
                if not d:
                    return None, lines
                self.buf += d
            line, self.buf = self.buf.split(b"\n", 1)
            lines += line + b"\n"
            if line[3:4] == b" " or len(line) < 4:
                return (int(line[:3]) if line[:3].isdigit() else None), lines

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def cmd(self, line: bytes) -> tuple[int | None, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self, wait: float = 5) -> bool:
        self.s.settimeout(wait)
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.s.close()


def start_listener(
    home: Home, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYQMAIL_HOME=str(home.root), PYQMAIL_SINGLE_USER="1")
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "pyqmail.cli.main", "smtpd", "--home", str(home.root), *args],
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_listening(proc: subprocess.Popen[bytes]) -> list[int]:
    """Read the listener's 'listening on ADDR:PORT' lines (its readiness signal)."""
    assert proc.stderr is not None
    ports = []
    line = proc.stderr.readline().decode()
    while "listening on" in line or "warning" in line:
        if "listening on" in line:
            ports.append(int(line.rsplit(":", 1)[1]))
            return ports
        line = proc.stderr.readline().decode()
    raise AssertionError(f"listener did not start: {line!r}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = Home(tmp_path_factory.mktemp("smtpd") / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    rules = home.root / "tcp.smtp.cdb"
    refuse = home.root / "refuse-queue"
    refuse.write_text("#!/bin/sh\ncat >/dev/null\nexit 31\n")
    refuse.chmod(0o755)
    tcprules.compile_cdb(
        io.BytesIO(
            b'127.0.0.2:allow,RELAYCLIENT=""\n127.0.0.3:deny\n'
            + f'127.0.0.4:allow,QMAILQUEUE="{refuse}"\n:allow\n'.encode()
        ),
        rules,
        home.root / "tcp.smtp.tmp",
    )
    proc = start_listener(
        home,
        "--listen",
        "127.0.0.1:0",
        "--rules",
        str(rules),
        "--max-per-ip",
        "40",
        "--control-ttl",
        "0",
        "--limit-loopback",
    )
    port = wait_listening(proc)[0]
    yield Server(home, port, proc)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(autouse=True)
def _defaults(server: Server) -> Iterator[None]:
    server.control("rcpthosts", "test.example\n.sub.test.example\n")
    server.control("badmailfrom", "spammer@evil.example\n@worse.example\n")
    server.control("databytes", "20000\n")
    server.control("timeoutsmtpd", None)
    # The checks of incoming mail (SPF, DKIM, DMARC: tests/integration/test_authcheck_dns.py)
    # would ask the system's DNS here and spool each message: off, so these tests see the
    # listener's own path, streaming to the committer.
    server.control("authchecks", "spf=off\ndkim=off\ndmarc=off\n")
    for f in (server.home.queue / "todo").rglob("*"):
        if f.is_file():
            f.unlink()
    yield
    assert server.proc.poll() is None, "the listener died"


def session(server: Server, source: str | None = None) -> Raw:
    c = Raw(server.port, source=source)
    assert c.reply()[0] == 220
    assert c.cmd(b"HELO x")[0] == 250
    return c


# ----------------------------------------------------------------- smtplib


def test_smtplib_sends_and_the_queue_has_it(server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        code, ehlo = s.ehlo("client.example")
        assert code == 250
        assert ehlo.split(b"\n") == [
            b"mx.test.example",
            b"PIPELINING",
            b"8BITMIME",
            b"SMTPUTF8",
            b"SIZE 20000",
        ]
        s.sendmail(
            "a@b.example",
            ["x@test.example", "y@a.sub.test.example"],
            b"Subject: hi\r\n\r\n.leading dot\r\n",
        )
    assert server.queued() == [(b"a@b.example", [b"x@test.example", b"y@a.sub.test.example"])]
    mess = [f for f in (server.home.queue / "mess").rglob("*") if f.is_file()]
    text = max(mess, key=lambda f: f.stat().st_mtime).read_bytes()
    assert b"Received: from unknown (HELO client.example) (127.0.0.1)\n  by mx.test.example" in text
    assert text.endswith(b"Subject: hi\n\n.leading dot\n")


def test_the_250_carries_time_and_qp(server: Server) -> None:
    c = session(server)
    c.cmd(b"MAIL FROM:<a@b.example>")
    c.cmd(b"RCPT TO:<x@test.example>")
    assert c.cmd(b"DATA")[0] == 354
    c.send(b"x\r\n.\r\n")
    code, text = c.reply()
    words = text.split()
    assert code == 250 and words[1] == b"ok" and words[3] == b"qp"
    assert abs(int(words[2]) - time.time()) < 60 and int(words[4]) > 0
    # the qp is the committer process's pid, as qmail's is qmail-queue's: the one its
    # Received line names, and not the listener's
    qp = int(words[4])
    assert qp != server.proc.pid
    mess = [f for f in (server.home.queue / "mess").rglob("*") if f.is_file()]
    newest = max(mess, key=lambda f: f.stat().st_mtime).read_bytes()
    assert newest.startswith(b"Received: (qmail %d invoked from network); " % qp)


def _send_one(server: Server, body: bytes = b"x\r\n") -> tuple[int | None, bytes]:
    c = session(server)
    c.cmd(b"MAIL FROM:<a@b.example>")
    c.cmd(b"RCPT TO:<x@test.example>")
    assert c.cmd(b"DATA")[0] == 354
    c.send(body + b".\r\n")
    reply = c.reply()
    c.close()
    return reply


def test_committer_killed_mid_message(server: Server) -> None:
    """The committer process dies while a client is in DATA: that client gets qmail's
    451 qq crashed, nothing of its message is queued, and the next message is served by
    a new committer."""
    c = session(server)
    c.cmd(b"MAIL FROM:<a@b.example>")
    c.cmd(b"RCPT TO:<x@test.example>")
    assert c.cmd(b"DATA")[0] == 354  # the listener has begun the message with its child
    c.send(b"Subject: lost\r\n\r\npart of it\r\n")
    # The child takes the listener's frames in order: once a later message is queued,
    # it has made the first one's files. Its qp is the child's pid.
    code, text = _send_one(server)
    assert code == 250
    qp = int(text.split()[4])
    os.kill(qp, 9)  # the listener may see it die before or after the rest: 451 either way
    c.send(b"the rest\r\n.\r\n")
    assert c.reply() == (451, b"451 qq crashed (#4.3.0)\r\n")
    c.close()
    code, text = _send_one(server, b"Subject: after\r\n\r\nok\r\n")
    assert code == 250 and int(text.split()[4]) not in (qp, server.proc.pid)
    bodies = [f.read_bytes() for f in (server.home.queue / "mess").rglob("*") if f.is_file()]
    todo = {f.name for f in (server.home.queue / "todo").iterdir()}
    queued_bodies = [
        f.read_bytes() for f in (server.home.queue / "mess").rglob("*") if f.name in todo
    ]
    assert not any(b.endswith(b"the rest\n") for b in queued_bodies)
    assert any(b.endswith(b"Subject: after\n\nok\n") for b in bodies)


def test_commit_thread_instead_of_process(tmp_path: Path) -> None:
    """PYQMAIL_SMTP_COMMIT=thread keeps the commits in the listener's own threads: the
    message is queued the same way, with the listener's pid as qp."""
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").write_text("test.example\n")
    proc = start_listener(
        home, "--listen", "127.0.0.1:0", extra_env={"PYQMAIL_SMTP_COMMIT": "thread"}
    )
    try:
        port = wait_listening(proc)[0]
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@b.example", ["x@test.example"], b"Subject: t\r\n\r\nbody\r\n")
            code, _ = s.noop()
        assert code == 250
        (todo,) = os.listdir(home.queue / "todo")
        mess = next(f for f in (home.queue / "mess").rglob(todo)).read_bytes()
        assert mess.startswith(b"Received: (qmail %d invoked from network); " % proc.pid)
        assert mess.endswith(b"Subject: t\n\nbody\n")
    finally:
        proc.terminate()
        proc.wait(10)


def test_per_ip_limit_counts_an_ipv6_64_as_one_client(
    tmp_path: Path, lo_addresses: LoAddresses
) -> None:
    """--max-per-ip 1: a second address of the same /64 gets 421, another /64 is served."""
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    a1, a2, b1 = lo_addresses.v6(1, 1), lo_addresses.v6(1, 0xBEEF), lo_addresses.v6(2, 1)
    proc = start_listener(home, "--listen", "[::1]:0", "--max-per-ip", "1")
    try:
        port = wait_listening(proc)[0]
        first = Raw(port, "::1", source=a1)
        try:
            assert first.reply()[0] == 220  # holds the /64's only slot
            second = Raw(port, "::1", source=a2)
            assert second.reply()[0] == 421 and second.closed()
            second.close()
            other = Raw(port, "::1", source=b1)
            assert other.reply()[0] == 220
            other.close()
        finally:
            first.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_concurrent_sessions_each_250_only_once_queued(server: Server) -> None:
    """Thirty sessions at once: their commits go through the committer in batches, and
    each client's 250 comes only when its own message is already in todo/."""
    import threading

    n = 30
    seen_at_250: dict[int, bool] = {}
    errors: list[str] = []
    ready = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            c = session(server)
            c.cmd(b"MAIL FROM:<a@b.example>")
            c.cmd(b"RCPT TO:<r%d@test.example>" % i)
            assert c.cmd(b"DATA")[0] == 354
            ready.wait(10)
            c.send(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % i)
            code, text = c.reply()
            if code != 250:
                errors.append(f"{i}: {text!r}")
                return
            mine = [b"r%d@test.example" % i]
            seen_at_250[i] = any(rcpts == mine for _, rcpts in server.queued())
            c.close()
        except Exception as e:  # reported below, with the session number
            errors.append(f"{i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert seen_at_250 == {i: True for i in range(n)}
    assert sorted(r[0] for _, r in server.queued()) == sorted(
        b"r%d@test.example" % i for i in range(n)
    )


def test_relay_control_and_badmailfrom(server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("a@b.example", ["victim@elsewhere.example"], b"x\r\n")
        assert e.value.recipients["victim@elsewhere.example"][0] == 553
        for bad in ("spammer@evil.example", "anyone@worse.example"):
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                s.sendmail(bad, ["x@test.example"], b"x\r\n")
    assert server.queued() == []


def test_tcprules_relayclient_grant(server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0)) as s:
        s.sendmail("a@b.example", ["victim@elsewhere.example"], b"x\r\n")
    assert server.queued() == [(b"a@b.example", [b"victim@elsewhere.example"])]


def test_tcprules_deny_closes_without_a_word(server: Server) -> None:
    c = Raw(server.port, source="127.0.0.3")
    assert c.reply() == (None, b"")


def test_tcprules_qmailqueue_variable_runs_that_program(server: Server) -> None:
    c = session(server, source="127.0.0.4")
    c.cmd(b"MAIL FROM:<a@b.example>")
    c.cmd(b"RCPT TO:<x@test.example>")
    assert c.cmd(b"DATA")[0] == 354
    c.send(b"x\r\n.\r\n")
    code, text = c.reply()
    assert (code, text) == (554, b"554 mail server permanently rejected message (#5.3.0)\r\n")
    assert server.queued() == []


def test_databytes_552_and_size_at_mail(server: Server) -> None:
    c = session(server)
    assert c.cmd(b"MAIL FROM:<a@b.example> SIZE=20001")[1] == replies.SIZE_TOO_BIG
    c.cmd(b"MAIL FROM:<a@b.example>")
    c.cmd(b"RCPT TO:<x@test.example>")
    assert c.cmd(b"DATA")[0] == 354
    c.send((b"a" * 70 + b"\r\n") * 400 + b".\r\n")
    assert c.reply()[1] == replies.TOO_BIG
    assert c.cmd(b"NOOP")[0] == 250
    assert server.queued() == []


# ----------------------------------------------------------------- bad input


def test_bare_lf_451_close_nothing_queued(server: Server) -> None:
    c = session(server)
    for line in (b"MAIL FROM:<a@b.example>", b"RCPT TO:<lf@test.example>", b"DATA"):
        c.cmd(line)
    c.send(b"Subject: x\r\n\r\nline with bare\nlf\r\n.\r\n")
    assert c.reply()[1] == replies.BARE_LF
    assert c.closed()
    assert server.queued() == [] and server.alive()


@pytest.mark.parametrize(
    "seq", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n"]
)
def test_smuggling(server: Server, seq: bytes) -> None:
    c = session(server)
    for line in (b"MAIL FROM:<a@b.example>", b"RCPT TO:<s@test.example>", b"DATA"):
        c.cmd(line)
    c.send(
        b"Subject: outer\r\n\r\nhello" + seq + b"MAIL FROM:<evil@x.example>\r\n"
        b"RCPT TO:<smuggled@test.example>\r\nDATA\r\nSubject: smuggled\r\n\r\nbad\r\n.\r\n"
    )
    code, _ = c.reply()
    assert code == 451
    assert c.closed()
    assert server.queued() == []


def test_bare_cr_in_data(server: Server) -> None:
    c = session(server)
    for line in (b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@test.example>", b"DATA"):
        c.cmd(line)
    c.send(b"Subject: x\r\n\r\nX\r.\r\n.\r\n")
    assert c.reply()[1] == replies.BARE_CR
    assert c.closed() and server.queued() == []


def test_eof_inside_data_queues_nothing(server: Server) -> None:
    c = session(server)
    for line in (b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@test.example>", b"DATA"):
        c.cmd(line)
    c.send(b"Subject: x\r\n\r\nhalf")
    c.s.shutdown(socket.SHUT_WR)
    assert c.closed()
    assert server.queued() == [] and server.alive()


def test_long_command_and_endless_line(server: Server) -> None:
    c = session(server)
    assert c.cmd(b"MAIL FROM:<" + b"a" * 5000 + b"@b.example>")[1] == replies.LINE_TOO_LONG
    assert c.cmd(b"NOOP")[0] == 250
    c.send(b"x" * 200000)
    assert c.reply()[1] == replies.LINE_TOO_LONG
    assert c.reply()[1] == replies.LONG_LINE_CLOSE
    assert c.closed() and server.alive()


def test_long_text_line_rejects_the_message(server: Server) -> None:
    c = session(server)
    for line in (b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@test.example>", b"DATA"):
        c.cmd(line)
    c.send(b"Subject: x\r\n\r\n" + b"y" * 3000 + b"\r\n.\r\n")
    assert c.reply()[1] == replies.TEXT_TOO_LONG
    assert c.cmd(b"NOOP")[0] == 250 and server.queued() == []


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<nul\x00x@b.example>", replies.BAD_BYTES),
        (b"MAIL FROM:<j\xc3\xb6rg@b.example>", replies.EIGHTBIT_ADDRESS),
        (b"MAIL FROM:<a@b.example> FOO=BAR", replies.BAD_PARAM),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME", replies.BINARYMIME),
    ],
)
def test_bad_mail_arguments(server: Server, line: bytes, reply: bytes) -> None:
    c = session(server)
    assert c.cmd(line)[1] == reply
    assert c.cmd(b"RCPT TO:<x@test.example>")[1] == replies.MAIL_FIRST


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<>", replies.EMPTY_RCPT),
        (b"RCPT TO:<@>", replies.bad_mailbox(Refusal.ROUTE, sender=False)),
        (b"RCPT TO:<x@test.example\x00>", replies.BAD_BYTES),
    ],
)
def test_bad_rcpt_arguments(server: Server, line: bytes, reply: bytes) -> None:
    c = session(server)
    c.cmd(b"MAIL FROM:<a@b.example>")
    assert c.cmd(line)[1] == reply
    assert c.cmd(b"DATA")[1] == replies.RCPT_FIRST


@pytest.mark.parametrize(
    ("probe", "reply"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", replies.NOT_SMTP),
        (b"POST / HTTP/1.1\r\nContent-Length: 30\r\n\r\nMAIL FROM:<a@b>\r\n", replies.NOT_SMTP),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", replies.TLS_HELLO),
    ],
)
def test_http_and_tls_probes(server: Server, probe: bytes, reply: bytes) -> None:
    c = Raw(server.port)
    assert c.reply()[0] == 220
    c.send(probe)
    assert c.reply()[1] == reply
    assert c.closed() and server.alive()


def test_bdat_payload_never_runs(server: Server) -> None:
    c = session(server)
    c.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nBDAT 70 LAST\r\n"
        b"MAIL FROM:<e@x>\r\nRCPT TO:<smuggled@test.example>\r\nDATA\r\nx\r\n.\r\n"
    )
    assert c.reply()[0] == 250 and c.reply()[0] == 250
    assert c.reply()[1] == replies.NO_CHUNKING
    assert c.closed() and server.queued() == []


def test_nothing_after_quit_runs(server: Server) -> None:
    c = session(server)
    c.send(b"QUIT\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\nx\r\n.\r\n")
    assert c.reply()[0] == 221
    assert c.closed() and server.queued() == []


def test_stuffing_after_a_refused_data(server: Server) -> None:
    c = session(server)
    c.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<v@elsewhere.example>\r\nDATA\r\n"
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n.\r\n"
    )
    assert [c.reply()[0] for _ in range(3)] == [250, 553, 503]
    assert c.cmd(b"NOOP")[0] == 250
    assert server.queued() == []


def test_pipelined_batch_in_order(server: Server) -> None:
    c = session(server)
    c.send(
        b"".join(
            b"MAIL FROM:<a%d@b.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
            b"Subject: %d\r\n\r\nbody\r\n.\r\n" % (i, i)
            for i in range(5)
        )
        + b"QUIT\r\n"
    )
    codes = [c.reply()[0] for _ in range(21)]
    assert codes == [250, 250, 354, 250] * 5 + [221]
    assert sorted(s for s, _ in server.queued()) == [b"a%d@b.example" % i for i in range(5)]


def test_ten_thousand_recipients(server: Server) -> None:
    c = session(server)
    c.cmd(b"MAIL FROM:<a@b.example>")
    c.send(b"".join(b"RCPT TO:<r%d@test.example>\r\n" % i for i in range(10000)))
    codes = [c.reply()[0] for _ in range(10000)]
    assert codes.count(250) == 100 and codes.count(452) == 9900
    assert c.cmd(b"DATA")[0] == 354
    c.send(b"x\r\n.\r\n")
    assert c.reply()[0] == 250
    ((_, rcpts),) = server.queued()
    assert len(rcpts) == 100


def test_too_many_errors(server: Server) -> None:
    c = session(server)
    c.send(b"FOO\r\n" * 25)
    codes = [c.reply()[0] for _ in range(21)]
    assert codes == [502] * 20 + [421]
    assert c.closed() and server.alive()


def test_timeout_and_slowloris(server: Server) -> None:
    server.control("timeoutsmtpd", "1\n")
    c = session(server)
    t = time.monotonic()
    assert c.reply()[1] == replies.TIMEOUT
    assert c.closed() and time.monotonic() - t < 5
    c = session(server)
    t = time.monotonic()
    for ch in b"NOOP and more and more and more\r\n":
        try:
            c.send(bytes([ch]))
        except OSError:
            break
        time.sleep(0.2)
        if time.monotonic() - t > 3:
            break
    _code, text = c.reply()
    assert text == replies.TIMEOUT and time.monotonic() - t < 6


def test_per_ip_limit_frees_its_slot(server: Server) -> None:
    conns = [Raw(server.port) for _ in range(40)]
    for c in conns:
        assert c.reply()[0] == 220
    extra = Raw(server.port)
    assert extra.reply()[1] == replies.TOO_MANY_CONNS
    for c in conns:
        c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        c = Raw(server.port)
        code, _ = c.reply()
        c.close()
        if code == 220:
            break
    assert code == 220


def test_no_rcpthosts_relays_for_anyone(server: Server) -> None:
    server.control("rcpthosts", None)
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("a@b.example", ["x@anywhere.example"], b"x\r\n")
    assert server.queued() == [(b"a@b.example", [b"x@anywhere.example"])]


def test_ipv6_and_greet_delay_early_talker(tmp_path: Path) -> None:
    require_ipv6_loopback()
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcptchecks").write_text("0\n")  # u@ has no mailbox: not what is tested
    proc = start_listener(home, "--listen", "[::1]:0", "--greet-delay", "0.5")
    try:
        port = wait_listening(proc)[0]
        c = Raw(port, "::1")
        c.send(b"EHLO early\r\n")
        assert c.reply()[1] == replies.EARLY_TALKER
        c = Raw(port, "::1")
        assert c.reply()[0] == 220
        c.cmd(b"HELO x")
        c.cmd(b"MAIL FROM:<a@b>")
        assert c.cmd(b"RCPT TO:<u@mx.test.example>")[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(b"x\r\n.\r\n")
        assert c.reply()[0] == 250
        todo = [f for f in (home.queue / "todo").rglob("*") if f.is_file()]
        assert len(todo) == 1
        mess = [f for f in (home.queue / "mess").rglob("*") if f.is_file()]
        assert b"(::1)" in mess[0].read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)


def test_loopback_is_exempt_from_the_per_ip_limit_by_default(tmp_path: Path) -> None:
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    proc = start_listener(home, "--listen", "127.0.0.1:0", "--max-per-ip", "2")
    try:
        port = wait_listening(proc)[0]
        conns = [Raw(port) for _ in range(5)]
        assert [c.reply()[0] for c in conns] == [220] * 5
    finally:
        proc.terminate()
        proc.wait(10)


def test_several_acceptor_processes_share_the_port(tmp_path: Path) -> None:
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcptchecks").write_text("0\n")  # uN@ have no mailbox: not what is tested
    port = free_port()
    proc = start_listener(home, "--listen", f"127.0.0.1:{port}", "--workers", "2")
    try:
        wait_listening(proc)
        wait_listening(proc)  # one line per worker: both are bound
        for i in range(6):
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.sendmail("a@b.example", [f"u{i}@mx.test.example"], b"x\r\n")
        todo = [f for f in (home.queue / "todo").rglob("*") if f.is_file()]
        assert len(todo) == 6
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_client_that_never_reads_is_not_buffered_for(server: Server) -> None:
    server.control("timeoutsmtpd", "2\n")
    c = Raw(server.port)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.s.settimeout(3)
    sent = 0
    with pytest.raises(OSError):  # a timeout: the server stopped reading our commands
        while sent < 200_000_000:
            c.s.sendall(b"NOOP\r\n" * 10000)
            sent += 60000
    assert sent < 100_000_000
    assert c.closed(10)  # then dropped after timeoutsmtpd
    assert server.alive()


def test_an_open_relay_is_announced_at_start(tmp_path: Path) -> None:
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").unlink(missing_ok=True)
    proc = start_listener(home, "--listen", "127.0.0.1:0")
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline().decode()
        assert "rcpthosts" in first and "open relay" in first
    finally:
        proc.terminate()
        proc.wait(10)


def test_term_lets_data_finish_then_421_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM drains as ``pyqmail run`` does (SmtpServer.drain): the listening socket
    closes, an idle session gets 421 at once, one in DATA its 250 and then 421."""
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").write_text("test.example\n")
    (home.control / "authchecks").write_text("spf=off\ndkim=off\ndmarc=off\n")
    proc = start_listener(home, "--listen", "127.0.0.1:0")
    try:
        port = wait_listening(proc)[0]
        idle = Raw(port)
        assert idle.reply()[0] == 220
        busy = Raw(port)
        assert busy.reply()[0] == 220
        assert busy.cmd(b"HELO busy.example")[0] == 250
        assert busy.cmd(b"MAIL FROM:<joe@a.example>")[0] == 250
        assert busy.cmd(b"RCPT TO:<x@test.example>")[0] == 250
        assert busy.cmd(b"DATA")[0] == 354
        busy.send(b"Subject: mid-data\r\n\r\nfirst half\r\n")
        proc.send_signal(signal.SIGTERM)
        assert idle.reply() == (421, b"421 shutting down, try again later (#4.3.2)\r\n")
        assert idle.closed()
        with pytest.raises(ConnectionRefusedError):  # the listening socket is closed
            socket.create_connection(("127.0.0.1", port), 5).close()
        busy.send(b"second half\r\n.\r\n")
        code, text = busy.reply()
        assert code == 250 and text.startswith(b"250 ok "), text  # acknowledged
        assert busy.reply() == (421, b"421 shutting down, try again later (#4.3.2)\r\n")
        assert busy.closed()
        idle.close()
        busy.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    (todo,) = os.listdir(home.queue / "todo")
    mess = next(f for f in (home.queue / "mess").rglob(todo)).read_bytes()
    assert mess.endswith(b"Subject: mid-data\n\nfirst half\nsecond half\n")
