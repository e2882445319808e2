"""``pyqmail run`` as root: the certificate is loaded before the listener drops to qmaild,
and reloaded as qmaild, so a key qmaild may not read is never read after the drop."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from tests.conftest import free_port, is_root
from tests.integration.test_run_daemon import listening, wait_for
from tests.integration.test_run_root import root_home, start_root_run  # noqa: F401
from tests.integration.test_smtpd_tls import der, install_cert, served

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]


def test_root_loads_before_the_drop_and_qmaild_reloads(
    root_home: tuple[Home, Path],  # noqa: F811 - the imported fixture
) -> None:
    home, _user = root_home
    ids = home.ids()
    ca = trustme.CA()
    first = install_cert(home, ca, "mx.test.example")  # root's, mode 0600
    port = free_port()
    proc, log = start_root_run(home, port)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="listener")
        assert proc.poll() is None, log.read_text()
        assert served(port, ca) == der(first)  # read as root, before the drop
        second = install_cert(home, ca, "mx.test.example")  # root's again: qmaild cannot read it
        wait_for(  # each connection may look at the file (at most once a second)
            lambda: (
                served(port, ca) == der(first)
                and "keeping the previous certificate" in log.read_text()
            ),
            timeout=15,
            what="the warning that qmaild cannot read the new file",
        )
        assert "Permission denied" in log.read_text()
        os.chown(home.control / "servercert.pem", ids.uid("daemon"), ids.gid("nofiles"))
        wait_for(lambda: served(port, ca) == der(second), timeout=15, what="the reload as qmaild")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0
    assert "Traceback" not in log.read_text()
