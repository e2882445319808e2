"""Root mode: the remote agent reads control/smtproutesauth as qmailr, in its own process
(remote/agentproc.py); ``pyqmail init`` makes the file qmailr's and ``pyqmail check``
reports it when it is not. Needs root (the agent drops to qmailr)."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
import trustme

from pyqmail.check import check, errors
from pyqmail.cli import init
from pyqmail.outcome import Outcome, Status
from pyqmail.remote.agentproc import RemoteProcess
from tests.conftest import is_root, qmail_ids, write_control
from tests.integration.test_remote_smarthost import AUTHLINE, USER, AuthRelay, server_ctx
from tests.security._support import root_home

pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]


def test_the_agent_reads_credentials_as_qmailr(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = qmail_ids()
    home = root_home("smarthost-root-")
    try:
        ca = trustme.CA()
        cafile = home.root.parent / "ca.pem"
        ca.cert_pem.write_to_path(str(cafile))
        os.chmod(cafile, 0o644)
        monkeypatch.setenv("PYQMAIL_TLS_CAFILE", str(cafile))  # the forked agent's too
        mess = home.root.parent / "mess"
        mess.write_bytes(b"Subject: root\n\nbody\n")
        os.chmod(mess, 0o644)
        auth = home.control / "smtproutesauth"
        auth.write_text(AUTHLINE)
        os.chmod(auth, 0o600)  # root's: qmailr cannot read it
        problems = [p for p in errors(check(home)) if p.file == "control/smtproutesauth"]
        assert [p.fix for p in problems] == [f"chown qmailr {auth}"]
        relay = AuthRelay(server_ctx(ca))

        async def one() -> Outcome:
            agent = RemoteProcess(home)
            agent.start((ids.uid("remote"), ids.gid("qmail")))
            try:
                (o,) = await agent.deliver(mess, "a@test.example", ["b@far.example"])
            finally:
                await agent.close()
            return o

        async def go() -> list[Outcome]:
            async with relay:
                write_control(home, "smtproutes", f":[127.0.0.1]:{relay.port}\n")
                first = await one()
                assert init.main([str(home.root), "--me", "mx.test.example", "-q"]) == 0
                return [first, await one()]

        first, second = asyncio.run(go())
        assert first.status is Status.TEMP and "Unable to read control files" in first.text
        st = os.stat(auth)
        assert (st.st_uid, st.st_mode & 0o777) == (ids.uid("remote"), 0o600)
        assert second.status is Status.OK, second.text
        assert relay.authed == [USER] and len(relay.messages) == 1
        assert [p for p in errors(check(home)) if p.file == "control/smtproutesauth"] == []
    finally:
        shutil.rmtree(home.root.parent)
