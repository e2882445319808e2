"""Shared fixtures: a fresh single-user home in a temporary directory, free ports, and what a
root run of ``make test`` must have (qmail's accounts, the Debian peers)."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home, HomeError, Ids
from pyqmail.layout import create_home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A complete home as ``pyqmail init --me mx.test.example`` makes it, single-user."""
    h = Home(tmp_path / "qmail", single_user=True)
    create_home(h, "mx.test.example", None)
    monkeypatch.setenv("PYQMAIL_HOME", str(h.root))
    monkeypatch.setenv("PYQMAIL_SINGLE_USER", "1")
    yield h


def write_control(home: Home, name: str, text: str) -> None:
    """Write control/NAME (tests' helper)."""
    (home.control / name).write_text(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` has exited (a zombie waiting for its reaper counts), or the
    timeout; whether it has. The event is its pidfd becoming readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def group_gone(pgid: int, timeout: float = 10.0) -> bool:
    """Wait until no live process is left in process group ``pgid`` (a zombie has closed
    its descriptors and counts as gone), or the timeout; whether none is. After a SIGKILL
    to a group, its leader's exit says nothing of the others': a child still exiting may
    hold a listening socket for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        alive = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                alive = True
                break
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def is_root() -> bool:
    return os.geteuid() == 0


def require(ok: bool, what: str, fix: str) -> None:
    """A precondition of a test. Every one holds on CI (root, Debian 12: ``make test`` runs
    ``make deps`` and ``make accounts`` first), so under root a missing one is a test error
    saying how to fix it; for an ordinary user the test is skipped."""
    if ok:
        return
    if is_root():
        pytest.fail(f"{what}; fix: {fix}", pytrace=False)
    pytest.skip(what)


def require_tools(*names: str) -> None:
    """The Debian programs a test runs as peers (``make deps`` installs them)."""
    missing = [n for n in names if shutil.which(n) is None]
    require(
        not missing,
        f"not installed: {', '.join(missing)}",
        "run `make deps` as root (`make test` does)",
    )


def require_ipv6_loopback() -> None:
    """::1 is there on Debian unless IPv6 was turned off (sysctl disable_ipv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        require(
            False, f"no IPv6 loopback (::1): {e}", "`sysctl -w net.ipv6.conf.lo.disable_ipv6=0`"
        )


def qmail_ids() -> Ids:
    """qmail's accounts (every multi-user home uses the same); missing ones are an error
    under root."""
    try:
        return Home(Path("/"), single_user=False).ids()
    except HomeError as e:
        require(False, str(e), "run `make accounts` as root (`make test` does)")
        raise  # not reached: require() failed or skipped


class LoAddresses:
    """Addresses added to lo for one test (root only) and removed after it: the way to
    have clients that are not loopback, or several IPv6 clients of one /64."""

    def __init__(self) -> None:
        self.added: list[str] = []
        # a /48 of the ULA space of our own, so parallel test runs do not collide
        r = int.from_bytes(os.urandom(4), "big")
        self.prefix48 = f"fd{(r >> 24) & 0xFF:02x}:{(r >> 8) & 0xFFFF:x}:{r & 0xFF:x}"

    def add(self, addr: str) -> str:
        plen = "128" if ":" in addr else "32"
        subprocess.run(["ip", "addr", "add", f"{addr}/{plen}", "dev", "lo", *(["nodad"] if
                        ":" in addr else [])], check=True, capture_output=True)  # fmt: skip
        self.added.append(f"{addr}/{plen}")
        return addr

    def v6(self, subnet: int, host: int) -> str:
        """An address in /64 number ``subnet`` of this test's /48."""
        return self.add(f"{self.prefix48}:{subnet:x}::{host:x}")

    def remove_all(self) -> None:
        for a in self.added:
            subprocess.run(["ip", "addr", "del", a, "dev", "lo"], capture_output=True)
        self.added.clear()


@pytest.fixture
def lo_addresses() -> Iterator[LoAddresses]:
    if not is_root():
        pytest.fail("adding addresses to lo needs root (CAP_NET_ADMIN)")
    lo = LoAddresses()
    try:
        yield lo
    finally:
        lo.remove_all()


@contextlib.contextmanager
def dnsmasq_server(workdir: Path, args: list[str], probe: str, qtype: str = "A") -> Iterator[str]:
    """Debian's dnsmasq on 127.0.0.1 and a free port, answering for ``.test`` from ``args``
    (its record options); yields ``127.0.0.1:PORT`` once it answers a ``qtype`` query for
    ``probe``."""
    import dns.exception
    import dns.resolver

    port = free_port()
    proc = subprocess.Popen(
        ["dnsmasq", "-k", "--no-resolv", "--no-hosts", f"--port={port}",
         "--listen-address=127.0.0.1", "--bind-interfaces", f"--pid-file={workdir / 'pid'}",
         *(["--user=root"] if os.geteuid() == 0 else []), "--local=/test/", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port, res.lifetime = ["127.0.0.1"], port, 0.2
    deadline = time.monotonic() + 10
    while True:  # ready when it answers
        try:
            res.resolve(probe, qtype)
            break
        except dns.exception.DNSException:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                assert proc.stderr is not None
                raise RuntimeError(f"dnsmasq did not start: {proc.stderr.read()!r}") from None
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)
