"""Real peers for tests and benches: a private Debian Postfix instance.

The interop tests and the benches in bench/ start Postfix as a peer (a relay, a sink, an
MTA to compare with). Each gets an instance of its own: config, queue and data
directories under one directory, smtpd on a loopback port of its own, no chroot; the
system Postfix is never touched. Needs root and the Debian package (``make deps``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def _master_cf() -> Path:
    """Debian's master.cf (the package's copy if postinst did not install one)."""
    etc = Path("/etc/postfix/master.cf")
    return etc if etc.exists() else Path("/usr/share/postfix/master.cf.dist")


class PrivatePostfix:
    """Postfix configured in ``d`` (``d`` must be reachable by the postfix user).

    ``settings`` are main.cf lines added after the common ones (queue and data
    directories, loopback only, IPv4, mynetworks 127.0.0.0/8, no DNS, a maillog in
    ``d``); later lines win in main.cf, so they may override those too.
    """

    def __init__(self, d: Path, port: int, *, hostname: str, settings: str = "") -> None:
        self.dir = d
        self.port = port
        self.queue = d / "queue"
        for sub in ("queue", "data"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "data", "postfix")
        lines = []
        for line in _master_cf().read_text().splitlines():
            f = line.split()
            if line[:1] in ("#", " ", "\t") or len(f) < 8:
                lines.append(line)
                continue
            if f[0] == "smtp" and f[1] == "inet":
                f[0] = f"127.0.0.1:{port}"
            f[4] = "n"  # no chroot: the private queue is not under /var/spool/postfix
            lines.append(" ".join(f))
        (d / "master.cf").write_text("\n".join(lines) + "\n")
        (d / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
myhostname = {hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
disable_dns_lookups = yes
smtp_dns_support_level = disabled
maillog_file_prefixes = /var, /dev/stdout, /tmp, {d}
maillog_file = {d}/maillog
"""
            + settings
        )

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``postfix -c DIR ARGS`` (start, stop, flush, ...)."""
        return subprocess.run(
            ["postfix", "-c", str(self.dir), *args], check=check, capture_output=True
        )

    def start(self) -> None:
        self.postfix("start")

    @property
    def pid(self) -> int:
        """The master process (its tree is the whole instance)."""
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def stop(self, wait: float = 10.0) -> None:
        try:
            pid = self.pid
        except (OSError, ValueError):
            pid = 0
        self.postfix("stop", check=False)
        deadline = time.monotonic() + wait
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
