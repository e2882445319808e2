"""send/explain.py: each answer on a real single-user home with real files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.local.users import newu
from pyqmail.send import explain
from tests.conftest import write_control

BIN = Path(sys.executable).parent


@pytest.fixture
def site(home: Home, tmp_path: Path) -> Path:
    write_control(home, "locals", "mx.test.example\ntest.example\n")
    write_control(home, "rcpthosts", "mx.test.example\ntest.example\n.virt.example\n")
    write_control(home, "virtualdomains", "virt.example:vu\nexcept.virt.example:\n")
    write_control(
        home, "smtproutes", "remote.example:127.0.0.1:2626\nnamed.example:relay.invalid\n"
    )
    write_control(home, "tlsdestinations", "remote.example\n")
    a = tmp_path / "alice"
    a.mkdir()
    (a / ".qmail").write_text("./Maildir/\n")
    (a / ".qmail-lists").write_text("# the lists\n./Lists/\n|preline cat\n&bob@else.example\n")
    (a / ".qmail-shop-default").write_text("/var/mail/shop\n")
    u, g = os.getuid(), os.getgid()
    (home.users / "assign").write_text(
        f"=alice:alicebox:{u}:{g}:{a}:::\n+alice-:alicebox:{u}:{g}:{a}:-::\n"
        f"=nofile:nofilebox:{u}:{g}:{tmp_path}:::\n.\n"
    )
    newu(home)
    return a


def test_local_user_and_its_dot_qmail(home: Home, site: Path) -> None:
    ex = explain.explain_address(home, "alice@test.example")
    text = ex.text()
    assert not ex.refused
    assert "RCPT TO: accepted from any client" in text
    assert "delivery: local: control/locals lists test.example" in text
    assert "user: alicebox" in text and "users/assign" in text
    assert f"home: {site}" in text and f".qmail: {site}/.qmail\n" in text
    assert f"-> deliver into the Maildir {site}/./Maildir/" in text


def test_extension_lines_each_explained(home: Home, site: Path) -> None:
    text = explain.explain_address(home, "alice-lists@test.example").text()
    assert f".qmail: {site}/.qmail-lists" in text and "line: # the lists" in text
    assert "-> deliver into the Maildir" in text and "Lists/" in text
    assert "-> run the program `preline cat`" in text
    assert "-> forward to <bob@else.example>" in text
    text = explain.explain_address(home, "alice-shop-socks@test.example").text()
    assert f".qmail: {site}/.qmail-shop-default" in text and "DEFAULT='socks'" in text
    assert "-> append to the mbox file /var/mail/shop" in text


def test_unknown_extension_and_unknown_user_bounce(home: Home, site: Path) -> None:
    ex = explain.explain_address(home, "alice-nothing@test.example")
    assert ex.refused and "Sorry, no mailbox here by that name. (#5.1.1)" in ex.text()
    ex = explain.explain_address(home, "nosuchuser@test.example")
    assert ex.refused
    assert "the alias user" in ex.text() and f"home: {home.alias}" in ex.text()
    assert "no mailbox here" in ex.text()


def test_no_dot_qmail_uses_defaultdelivery(home: Home, site: Path) -> None:
    write_control(home, "defaultdelivery", "./Mailbox\n")
    text = explain.explain_address(home, "nofile@test.example").text()
    assert "there is no .qmail: control/defaultdelivery applies" in text
    assert "-> append to the mbox file" in text and "Mailbox" in text


def test_virtual_domain(home: Home, site: Path) -> None:
    text = explain.explain_address(home, "x@virt.example").text()
    assert "delivery: virtual: control/virtualdomains gives the prefix 'vu'" in text
    assert "<vu-x@virt.example>" in text
    # an empty virtualdomains value is an exception: remote
    text = explain.explain_address(home, "x@except.virt.example").text()
    assert "delivery: remote" in text


def test_remote_by_smtproutes_asks_no_dns(home: Home, site: Path) -> None:
    ex = explain.explain_address(home, "someone@remote.example")
    text = ex.text()
    assert "RCPT TO: refused to clients without RELAYCLIENT: 553 sorry, that domain" in text
    assert "route: control/smtproutes: SMTP to the relay 127.0.0.1:2626" in text
    assert "DNS: not asked (the relay is an IP address)" in text
    assert "TLS: required and verified (control/tlsdestinations" in text
    text = explain.explain_address(home, "x@named.example", dns=False).text()
    assert "relay relay.invalid" in text and "DNS: not asked (--no-dns)" in text
    assert "TLS: opportunistic STARTTLS" in text


def test_remote_dns_that_does_not_answer_is_bounded(home: Home, site: Path) -> None:
    import socket

    from pyqmail.remote.mx import make_resolver

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bound, never answers
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        res = make_resolver(f"127.0.0.1:{port}", lifetime=30)
        t0 = time.monotonic()
        ex = explain.explain_address(home, "x@elsewhere.example", resolver=res, timeout=0.5)
        assert time.monotonic() - t0 < 10
    assert "DNS: no answer within 0.5 s" in ex.text() and "the MX records of" in ex.text()
    assert not ex.refused  # a DNS timeout defers


def _rules(home: Home, text: str) -> None:
    subprocess.run(
        [str(BIN / "tcprules"), str(home.control / "tcp.smtp.cdb"), str(home.control / "t.tmp")],
        input=text.encode(),
        check=True,
    )


def test_client_rules(home: Home) -> None:
    _rules(home, '127.0.0.1:allow,RELAYCLIENT="",DATABYTES="1000"\n10.9.8.7:deny\n:allow\n')
    ex = explain.explain_client(home, "127.0.0.1", "client.example")
    text = ex.text()
    assert not ex.refused and "decision: allow" in text
    assert "rule 127.0.0.1:" in text and "RELAYCLIENT: may relay" in text
    assert "message size 1000 bytes" in text and "connections per client address" in text
    assert "HELO client.example" in text
    ex = explain.explain_client(home, "10.9.8.7")
    assert ex.refused and "decision: deny" in ex.text()
    ex = explain.explain_client(home, "192.0.2.1")
    assert "decision: allow" in ex.text() and "no RELAYCLIENT" in ex.text()


def test_client_without_rules_file(home: Home) -> None:
    assert "loopback client relay" in explain.explain_client(home, "127.0.0.1").text()
    text = explain.explain_client(home, "192.0.2.1").text()
    assert "every client is allowed" in text and "no RELAYCLIENT" in text


def test_command(home: Home, site: Path) -> None:
    r = subprocess.run([str(BIN / "pyqmail"), "explain", "alice@test.example"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "alicebox" in r.stdout
    r = subprocess.run([str(BIN / "pyqmail"), "explain", "alice-nope@test.example"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "no mailbox" in r.stdout
    r = subprocess.run([str(BIN / "pyqmail"), "explain"], capture_output=True, text=True)
    assert r.returncode == 100


def test_root_reads_dot_qmail_as_the_user(tmp_path: Path) -> None:
    """As root (multi-user), the .qmail files are read by a child running as the user: a
    .qmail that is a symlink to a file only root may read is not shown."""
    import pwd
    import shutil
    import tempfile

    from pyqmail.layout import create_home

    if os.geteuid() != 0:
        pytest.skip("needs root")  # pragma: no cover
    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="pyqmail-explain-"))
    try:
        d.chmod(0o755)
        home = Home(d / "q", single_user=False)
        create_home(home, "mx.test.example", None)
        write_control(home, "locals", "test.example\n")
        user = d / "nobodyhome"
        user.mkdir()
        secret = d / "secret"
        secret.write_text("./root-only-secret/\n")
        secret.chmod(0o600)
        (user / ".qmail-open").write_text("./Maildir/\n")
        (user / ".qmail-peek").symlink_to(secret)
        for p in (user, user / ".qmail-open"):
            os.chown(p, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
        (home.users / "assign").write_text(
            f"+nb-:nobody:{nobody.pw_uid}:{nobody.pw_gid}:{user}:-::\n.\n"
        )
        newu(home)
        text = explain.explain_address(home, "nb-open@test.example").text()
        assert f".qmail: {user}/.qmail-open" in text and "-> deliver into the Maildir" in text
        text = explain.explain_address(home, "nb-peek@test.example").text()
        assert "root-only-secret" not in text
        assert "Unable to open .qmail-peek" in text and "deferred" in text
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_command_prints_no_control_bytes_from_a_users_file(home: Home, site: Path) -> None:
    (site / ".qmail-esc").write_bytes(b"./Box\x1b[2J/\n")
    r = subprocess.run([str(BIN / "pyqmail"), "explain", "alice-esc@test.example"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "\x1b" not in r.stdout and "line: ./Box?[2J/" in r.stdout


def test_smarthost_auth_and_trust(home: Home, site: Path) -> None:
    write_control(home, "smtproutesauth", "127.0.0.1:me@test.example:pass:word\n")
    text = explain.explain_address(home, "someone@remote.example").text()
    assert "AUTH: as me@test.example (control/smtproutesauth), only after TLS" in text
    assert "TLS: required, the certificate verified by the system's CAs" in text
    assert "pass:word" not in text
    write_control(home, "smtproutestls", f"127.0.0.1:sha256:{'ab' * 32}\n")
    text = explain.explain_address(home, "someone@remote.example").text()
    assert "verified by a pinned key" in text
    write_control(home, "smtproutesauth", "127.0.0.1-pass-word\n")
    text = explain.explain_address(home, "someone@remote.example").text()
    assert "cannot be used (control/smtproutesauth:1:" in text and "pass-word" not in text
    text = explain.explain_address(home, "x@named.example", dns=False).text()
    assert "cannot be used" in text  # a broken file defers every route


def test_srs_addresses(home: Home, site: Path) -> None:
    from pyqmail import srs

    secret = "explain-secret-0123456789"
    write_control(home, "srs", f"{secret}\ntest.example\n")
    good = srs.Srs((secret.encode(),), "test.example").forward("bob@example.org")
    ex = explain.explain_address(home, good)
    assert not ex.refused
    assert "SRS: a valid SRS address of ours" in ex.text()
    assert "forwards it to <bob@example.org>" in ex.text()
    ex = explain.explain_address(home, good.replace("=bob@", "=eve@"))
    assert ex.refused
    assert "550 sorry, that SRS address is forged" in ex.text()
    assert "Sorry, this SRS address is forged. (#5.7.1)" in ex.text()
    (home.control / "srs").unlink()  # SRS off: an ordinary local part (the alias user's)
    ex = explain.explain_address(home, good)
    assert "SRS:" not in ex.text() and "the alias user" in ex.text()


def test_remote_names_its_destination_limit(home: Home, site: Path) -> None:
    text = explain.explain_address(home, "x@named.example", dns=False).text()
    assert "limits: no control/destinationlimits line for named.example" in text
    assert "421 or 4.7.x reply holds every delivery to it for 1 min" in text
    write_control(home, "destinationlimits", "named.example:2:30\n.remote.example::5\n*:8:\n")
    text = explain.explain_address(home, "x@named.example", dns=False).text()
    assert (
        "limits: control/destinationlimits line 1 (named.example): at most 2 deliveries at "
        "once, at most 30 started per minute"
    ) in text
    text = explain.explain_address(home, "x@a.remote.example", dns=False).text()
    assert "line 2 (.remote.example): at most 5 started per minute (shared by every" in text
    text = explain.explain_address(home, "x@other.example", dns=False).text()
    assert "line 3 (*): at most 8 deliveries at once (each domain counted on its own)" in text
