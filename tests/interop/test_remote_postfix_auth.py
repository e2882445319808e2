"""A real smarthost: a private Debian Postfix that relays only for SASL-authenticated
clients (Cyrus SASL, sasldb, PLAIN and LOGIN), offers AUTH only under TLS
(smtpd_tls_auth_only), and listens on a second port with implicit TLS (RFC 8314, Postfix's
smtpd_tls_wrappermode). Postfix needs root; ``make deps`` installs postfix and sasl2-bin."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote.deliver import RemoteAgent
from tests.conftest import free_port, require_tools, write_control
from tests.interop.test_remote_postfix import wait_files, wait_port
from tests.peers import PrivatePostfix

pytestmark = [
    pytest.mark.interop,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="postfix needs root"),
]

USER = "relayuser@pfx.test.example"
PASSWORD = "pfx:secret word"
MSG = b"Subject: smarthost\n\nthrough Postfix with AUTH\n"


@pytest.fixture(scope="module")
def smarthost() -> Iterator[tuple[Path, int, int]]:
    require_tools("postfix", "saslpasswd2")
    d = Path(tempfile.mkdtemp(prefix="pyqmail-pfxauth-"))
    d.chmod(0o755)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "pfx.test.example")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    (d / "server.pem").chmod(0o600)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    (d / "sasl").mkdir()
    (d / "sasl" / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
        f"sasldb_path: {d}/sasldb2\n"
    )
    subprocess.run(
        ["saslpasswd2", "-f", str(d / "sasldb2"), "-c", "-p", USER],
        input=PASSWORD.encode(), check=True, capture_output=True,
    )  # fmt: skip
    shutil.chown(d / "sasldb2", "postfix")
    (d / "mail").mkdir()
    shutil.chown(d / "mail", "nobody", "nogroup")
    port, wrapped = free_port(), free_port()
    pfx = PrivatePostfix(
        d,
        port,
        hostname="pfx.test.example",
        settings=f"""virtual_mailbox_domains = far.test
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = static:Maildir/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
default_transport = error
relay_transport = error
smtpd_tls_security_level = may
smtpd_tls_chain_files = {d}/server.pem
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {d}/sasl
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
""",
    )
    with open(d / "master.cf", "a") as f:
        f.write(f"127.0.0.1:{wrapped} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes\n")
    started = pfx.postfix("start", check=False)
    if started.returncode:
        log = (d / "maillog").read_text() if (d / "maillog").exists() else ""
        shutil.rmtree(d, ignore_errors=True)
        pytest.fail(f"postfix did not start: {started.stderr!r} {log[-2000:]}")
    try:
        wait_port(port)
        wait_port(wrapped)
        yield d, port, wrapped
    finally:
        pfx.stop()
        shutil.rmtree(d, ignore_errors=True)


def deliver(home: Home, d: Path, port: int, implicit: int = 465) -> Outcome:
    mess = home.root / "mess"
    mess.write_bytes(MSG)
    write_control(home, "smtproutes", f"far.test:[127.0.0.1]:{port}\n")
    agent = RemoteAgent(
        home, ControlCache(home), tls_cafile=str(d / "ca.pem"), idle_timeout=0,
        implicit_tls_port=implicit,
    )  # fmt: skip
    (o,) = asyncio.run(agent.deliver(mess, "a@test.example", ["u@far.test"]))
    return o


def delivered(d: Path, n: int) -> list[bytes]:
    return [f.read_bytes() for f in wait_files(d / "mail" / "Maildir" / "new", n)]


def test_starttls_auth_and_delivery(home: Home, smarthost: tuple[Path, int, int]) -> None:
    d, port, _ = smarthost
    before = len(list((d / "mail").rglob("new/*")))
    write_control(home, "smtproutesauth", f"127.0.0.1:{USER}:{PASSWORD}\n")
    o = deliver(home, d, port)
    assert o.status is Status.OK, o.text
    assert "Remote host said: 250 2.0.0 Ok: queued as " in o.text
    bodies = delivered(d, before + 1)
    assert any(b.endswith(b"through Postfix with AUTH\n") for b in bodies)
    # Postfix's Received line says the client authenticated over TLS
    assert any(b"with ESMTPSA" in b for b in bodies)


def test_without_credentials_postfix_refuses_the_recipient(
    home: Home, smarthost: tuple[Path, int, int]
) -> None:
    d, port, _ = smarthost
    o = deliver(home, d, port)
    assert o.status is Status.PERM and "554 5.7.1" in o.text  # a route as before: no AUTH


def test_wrong_password_is_deferred_and_never_quoted(
    home: Home, smarthost: tuple[Path, int, int]
) -> None:
    d, port, _ = smarthost
    write_control(home, "smtproutesauth", f"[127.0.0.1]:{USER}:not the password\n")
    o = deliver(home, d, port)
    assert o.status is Status.TEMP
    assert "authentication as relayuser@pfx.test.example failed" in o.text
    assert "535 5.7.8 Error: authentication failed" in o.text
    assert "not the password" not in o.text


def test_implicit_tls_port(home: Home, smarthost: tuple[Path, int, int]) -> None:
    d, _, wrapped = smarthost
    before = len(list((d / "mail").rglob("new/*")))
    write_control(home, "smtproutesauth", f"127.0.0.1:{USER}:{PASSWORD}\n")
    o = deliver(home, d, wrapped, implicit=wrapped)
    assert o.status is Status.OK, o.text
    assert len(delivered(d, before + 1)) == before + 1
