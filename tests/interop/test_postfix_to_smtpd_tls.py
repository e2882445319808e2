"""Postfix sends to pyqmail over STARTTLS (issue 16): a private Debian Postfix whose relayhost
is ``pyqmail run``'s SMTP port, with ``smtp_tls_security_level = encrypt`` (no clear-text
fallback), relays a message that lands in a local Maildir with a top Received line saying
``with ESMTPS`` and the TLS version; Postfix's own log says it used TLS. Needs root (Postfix)."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.conftest import free_port, require_tools
from tests.integration.test_run_daemon import listening, wait_for
from tests.integration.test_smtpd_tls import TlsMta, received_line
from tests.peers import PrivatePostfix

pytestmark = [pytest.mark.interop, pytest.mark.root]


@pytest.fixture
def mta(tmp_path: Path) -> Iterator[TlsMta]:
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    m = TlsMta(home, tmp_path, trustme.CA())
    m.start()
    yield m
    m.stop()
    assert "Traceback" not in m.log()


@pytest.fixture
def postfix(mta: TlsMta) -> Iterator[PrivatePostfix]:
    require_tools("postfix")
    if os.geteuid() != 0:
        pytest.fail("this test needs root: Postfix's master runs as root")
    # Postfix's own users must reach the directory: not under pytest's 0700 tmp_path.
    d = Path(tempfile.mkdtemp(prefix="pyqmail-pfx-tls-"))
    d.chmod(0o755)
    pfx = PrivatePostfix(
        d,
        free_port(),
        hostname="pfx.test.example",
        settings=f"""relayhost = [127.0.0.1]:{mta.port}
smtp_tls_security_level = encrypt
smtp_tls_loglevel = 1
smtpd_relay_restrictions = permit_mynetworks, reject
""",
    )
    started = pfx.postfix("start", check=False)
    if started.returncode:
        log = (d / "maillog").read_text() if (d / "maillog").exists() else ""
        shutil.rmtree(d, ignore_errors=True)
        pytest.fail(f"postfix did not start: {started.stderr!r} {log[-2000:]}")
    try:
        yield pfx
    finally:
        pfx.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_postfix_with_tls_encrypt_delivers_to_pyqmail(mta: TlsMta, postfix: PrivatePostfix) -> None:
    wait_for(lambda: listening(postfix.port), what="Postfix's smtpd")
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as s:
        s.sendmail(
            "sender@pfx.test.example",
            ["alice@test.example"],
            "Subject: postfix encrypt\r\n\r\nrelayed by postfix over TLS\r\n",
        )
    postfix.postfix("flush", check=False)
    message = mta.delivered("postfix encrypt")
    line = received_line(message)
    # the top trace line is ours, naming TLS; Postfix's own lines are below it
    assert message.index(b"\nReceived: ") == message.index(b"\nReceived: from ")
    assert re.search(rb" by mx\.test\.example with ESMTPS \(TLSv1\.[23] [A-Z0-9_-]+\); ", line), (
        line
    )
    assert b"(HELO pfx.test.example)" in line
    assert message.endswith(b"\n\nrelayed by postfix over TLS\n")
    maillog = (postfix.dir / "maillog").read_text(errors="replace")
    assert re.search(
        r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: TLSv1\.[23]", maillog
    ), maillog[-2000:]
    assert re.search(r"relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.*status=sent", maillog), maillog[
        -2000:
    ]
