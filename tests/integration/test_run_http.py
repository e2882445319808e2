"""``pyqmail run --http`` and the session log, on the real daemon with real queued mail.

Mail is sent over SMTP to a running ``pyqmail run``: some to a local Maildir, some to a
destination whose smtproutes relay refuses connections (so it stays queued, deferred).
/metrics is scraped over HTTP and parsed with prometheus-client's parser; the status page
is read by Debian's headless chromium (``--dump-dom``); the log is read as written.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyqmail.home import Home
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.reader import count
from tests.conftest import free_port, is_root, require_tools, write_control
from tests.integration.test_run_daemon import BIN, Mta, files, listening, wait_for
from tests.integration.test_run_daemon import mta as mta  # the fixture
from tests.integration.test_run_root import root_home as root_home  # the fixture

N_LOCAL, N_DEFER = 3, 4


def get(
    url: str, auth: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def busy(mta: Mta) -> Iterator[tuple[Mta, int]]:
    """The daemon with --http, N_LOCAL messages delivered and N_DEFER deferred in the queue."""
    dead = free_port()  # nothing listens here: connections are refused, deliveries deferred
    write_control(mta.home, "smtproutes", f"defer.example:127.0.0.1:{dead}\n")
    hp = free_port()
    mta.start("--http", f"127.0.0.1:{hp}")
    wait_for(lambda: listening(hp), what="http listener")
    for i in range(N_LOCAL):
        mta.send("sender@test.example", ["alice@test.example"], subject=f"l{i}")
    for i in range(N_DEFER):
        mta.send("sender@test.example", [f"r{i}@defer.example"], subject=f"d{i}")
    wait_for(lambda: len(files(mta.maildir("alice"))) == N_LOCAL, what="local deliveries")
    wait_for(lambda: mta.log().count("deferral:") >= N_DEFER, what="deferrals")
    yield mta, hp


def test_metrics_count_real_mail(busy: tuple[Mta, int]) -> None:
    mta, hp = busy
    n = N_LOCAL + N_DEFER
    # the SMTP counters come from the listener process, at most STATS_INTERVAL late
    key = ("pyqmail_smtp_messages_total", (("result", "accepted"),))
    wait_for(lambda: samples(get(f"http://127.0.0.1:{hp}/metrics")[2].decode()).get(key) == n,
             what="the listener process's counters")  # fmt: skip
    status, headers, body = get(f"http://127.0.0.1:{hp}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    s = samples(body.decode())
    assert s[("pyqmail_smtp_messages_total", (("result", "accepted"),))] == n
    assert s[("pyqmail_smtp_recipients_total", (("result", "accepted"),))] == n
    # one connection per message, and the start-up probe that waited for the listener
    assert s[("pyqmail_smtp_connections_total", (("decision", "allow"),))] == n + 1
    q = count(QueuePaths(mta.home.queue))
    assert q.messages == N_DEFER
    assert s[("pyqmail_queue_messages", (("state", "queued"),))] == q.messages
    assert s[("pyqmail_deliveries_total", (("channel", "local"), ("result", "success")))] == N_LOCAL
    assert (
        s[("pyqmail_deliveries_total", (("channel", "remote"), ("result", "deferral")))] >= N_DEFER
    )
    assert s[("pyqmail_deferrals_total", (("destination", "defer.example"),))] >= N_DEFER
    assert s[("pyqmail_delivery_delay_seconds_count", ())] == N_LOCAL
    assert s[("pyqmail_smtp_tls_sessions_total", ())] == 0


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self._stack: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._stack.append(dict(attrs).get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        for i in self._stack:
            if i is not None:
                self.by_id[i] = self.by_id.get(i, "") + data


def test_status_page_in_chromium(busy: tuple[Mta, int], tmp_path: Path) -> None:
    require_tools("chromium")
    mta, hp = busy
    status, headers, _ = get(f"http://127.0.0.1:{hp}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'none'" in headers["Content-Security-Policy"]
    chrome = shutil.which("chromium")
    assert chrome is not None
    r = subprocess.run(
        [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
         "--virtual-time-budget=2000", "--dump-dom", f"http://127.0.0.1:{hp}/"],
        capture_output=True, timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-500:]
    p = _Text()
    p.feed(r.stdout.decode())
    q = count(QueuePaths(mta.home.queue))
    assert p.by_id["queue-messages"].strip() == str(q.messages) == str(N_DEFER)
    assert "defer.example" in p.by_id["deferred"]
    assert "alice@test.example" in p.by_id["recent"]


def test_read_only_and_no_paths(busy: tuple[Mta, int]) -> None:
    _, hp = busy
    assert get(f"http://127.0.0.1:{hp}/", method="POST")[0] == 405
    for path in ("/../../etc/passwd", "/metrics/../x", "/index.html", "/?file=/etc/passwd"):
        status, _, body = get(f"http://127.0.0.1:{hp}{path}")
        assert b"root:" not in body
        assert status == (200 if path.startswith("/?") else 404)
    with socket.create_connection(("127.0.0.1", hp), 10) as c:  # a head beyond 8 KiB
        c.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 400 ")


def test_non_loopback_without_httpauth_refuses_to_start(mta: Mta) -> None:
    proc = mta.start("--http", f"0.0.0.0:{free_port()}", wait=False)
    assert proc.wait(60) == 111
    assert "httpauth" in mta.log()


def test_httpauth_needs_the_credentials(mta: Mta) -> None:
    argon2 = pytest.importorskip("argon2")
    digest = argon2.PasswordHasher().hash("s3cret")
    write_control(mta.home, "httpauth", f"ops:{digest}\n")
    hp = free_port()
    mta.start("--http", f"0.0.0.0:{hp}")
    wait_for(lambda: listening(hp), what="http listener")
    assert get(f"http://127.0.0.1:{hp}/metrics")[0] == 401
    assert get(f"http://127.0.0.1:{hp}/metrics", auth="ops:wrong")[0] == 401
    assert get(f"http://127.0.0.1:{hp}/metrics", auth="ops:s3cret")[0] == 200


def _outsider_session(mta: Mta, *opts: str, deliver: bool) -> None:
    """Start the daemon with ``opts``; from 127.0.0.1, made an outsider by a rules file
    (with no tcp.smtp.cdb the daemon lets loopback relay), refuse one RCPT outside
    rcpthosts and, with ``deliver``, send a message to alice in the same session."""
    write_control(mta.home, "rcpthosts", "test.example\n")
    subprocess.run([str(BIN / "tcprules"), str(mta.home.control / "tcp.smtp.cdb"),
                    str(mta.home.control / "tcp.tmp")], input=b":allow\n", check=True)  # fmt: skip
    mta.start(*opts)
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        s.ehlo()
        s.mail("someone@else.example")
        assert s.rcpt("victim@notours.example")[0] == 553
        if deliver:
            assert s.rcpt("alice@test.example")[0] == 250
            s.data(b"Subject: x\r\n\r\nhello\r\n")


def test_json_log_links_session_to_delivery(mta: Mta) -> None:
    _outsider_session(mta, "--log-format", "json", deliver=True)
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1, what="delivery")
    wait_for(lambda: "end msg" in mta.log(), what="end msg")
    assert mta.stop() == 0
    lines = [json.loads(line) for line in mta.log().splitlines() if line.strip()]
    refused = [x for x in lines if x.get("event") == "rcpt" and x.get("result") == "refused"]
    assert refused and refused[0]["rcpt"] == "victim@notours.example"
    assert refused[0]["reason"] == "rcpthosts" and "5.7.1" in refused[0]["reply"]
    queued = next(x for x in lines if x.get("event") == "queued")
    assert queued["sid"] == refused[0]["sid"]
    ends = [x for x in lines if x.get("src") == "send" and x.get("msg") == queued["msg"]]
    assert ends[0]["line"] == f"new msg {queued['msg']}"
    assert ends[-1]["line"] == f"end msg {queued['msg']}"
    disc = next(x for x in lines if x.get("event") == "disconnect" and x["sid"] == queued["sid"])
    assert (disc["msgs"], disc["rcpts"], disc["refused"]) == (1, 1, 1)


def test_qmail_log_lines_with_tai64n(mta: Mta) -> None:
    _outsider_session(mta, "--log-stamps", "tai64n", deliver=False)
    wait_for(lambda: "disconnect" in mta.log(), what="disconnect line")
    lines = mta.log().splitlines()
    rcpt = next(line for line in lines if "victim@notours.example" in line)
    stamp, text = rcpt.split(" ", 1)
    assert stamp.startswith("@4000") and len(stamp) == 25
    assert text.endswith(
        "refused rcpthosts: 553_sorry,_that_domain_isn't_in_my_list_of_allowed_rcpthosts_(#5.7.1)"
    )
    assert all(line.startswith("@4000") for line in lines if line)


@pytest.mark.root
def test_root_mode_send_part_serves_the_smtpd_counts(root_home: tuple[Home, Path]) -> None:
    """As root: the HTTP server is the send part's (qmails), never root; the smtpd part's
    counters reach it over the socket pair; the queue is counted as qmail-qstat does."""
    if not is_root():
        pytest.skip("needs root")
    home, user = root_home
    port, hp = free_port(), free_port()
    log = home.root.parent / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYQMAIL_SINGLE_USER"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(home.root), "--smtp",
             f"127.0.0.1:{port}", "--http", f"127.0.0.1:{hp}", "--log-format", "json"],
            stdout=out, stderr=out, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: (listening(port) and listening(hp)) or proc.poll() is not None,
                 what="listeners")  # fmt: skip
        assert proc.poll() is None, log.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for i in range(3):
                s.sendmail("joe@test.example", ["joe@test.example"], f"Subject: {i}\r\n\r\nx\r\n")
        wait_for(lambda: len(files(user / "Maildir" / "new")) == 3, what="deliveries")

        def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            return samples(get(f"http://127.0.0.1:{hp}/metrics")[2].decode())

        wait_for(lambda: scraped().get(("pyqmail_smtp_messages_total",
                                        (("result", "accepted"),))) == 3,
                 what="smtpd counts at the send part")  # fmt: skip
        s2 = scraped()
        assert s2[("pyqmail_deliveries_total", (("channel", "local"), ("result", "success")))] == 3
        assert s2[("pyqmail_queue_messages", (("state", "queued"),))] == 0
        ss = subprocess.run(["ss", "-Hltnp", f"sport = :{hp}"], capture_output=True, text=True)
        owner = re.search(r"pid=(\d+)", ss.stdout)
        assert owner is not None, ss.stdout
        owner = owner.group(1)
        uid = int(Path(f"/proc/{owner}/status").read_text().split("Uid:")[1].split()[0])
        assert uid == home.ids().uid("send")
        for line in log.read_text().splitlines():
            json.loads(line)  # every line of every part is JSON
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_no_session_log_still_counts(mta: Mta) -> None:
    hp = free_port()
    write_control(mta.home, "rcpthosts", "test.example\n")
    subprocess.run([str(BIN / "tcprules"), str(mta.home.control / "tcp.smtp.cdb"),
                    str(mta.home.control / "tcp.tmp")], input=b":allow\n", check=True)  # fmt: skip
    mta.start("--no-session-log", "--http", str(hp))  # PORT alone: loopback
    wait_for(lambda: listening(hp), what="http listener")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        s.ehlo()
        s.mail("someone@else.example")
        assert s.rcpt("victim@notours.example")[0] == 553
    wait_for(
        lambda: (
            samples(get(f"http://127.0.0.1:{hp}/metrics")[2].decode()).get(
                ("pyqmail_smtp_recipients_total", (("result", "rcpthosts"),))
            )
            == 1
        ),
        what="the refusal counted",
    )
    assert "victim@notours.example" not in mta.log()
    assert "smtp " not in mta.log()
