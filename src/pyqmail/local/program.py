"""Program delivery (local.md 3.8): ``|command`` run by /bin/sh in the home directory.

The program gets the message (rewound) on fd 0, the delivery report on fd 1 and 2, and
qmail's environment (built by :mod:`pyqmail.local.qlocal`; every value arrives through
the environment, never spliced into the command, so a hostile address is never
interpreted by a shell). That environment starts from :func:`daemon_environment` in the
daemon (qmail's rc starts qmail-start under ``env -`` with only PATH) or, for the
``qmail-local`` command, from :func:`exec_environment` (what the command was started
with, without what Python's start-up added). It runs in its own process group; if it is
still running after ``timeout`` seconds the whole group is killed and the delivery is
deferred. qmail has no such limit; a program that never ends would otherwise hold its
delivery slot forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping

from pyqmail.local.failure import PERM, TEMP, DeliveryFailure, strerror, temp

DEFAULT_TIMEOUT = 86400.0  # qmail's 24-hour limit for a maildir write, used for programs too

PERMANENT_EXITS = frozenset({100, 64, 65, 70, 76, 77, 78, 112})

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # after HOME/bin, as rc's PATH="/var/qmail/bin:$PATH"
# pyqmail's own settings that a program's pyqmail commands (forward, condredirect,
# sendmail...) need to reach the same queue the daemon uses; passed on when set.
PASSED_ON = (b"QMAILQUEUE", b"PYQMAIL_QUEUE_SOCKET")


def daemon_environment(home_root: str, single_user: bool) -> dict[bytes, bytes]:
    """What a program delivered by the daemon starts from, before qmail-local's own
    variables: PATH = HOME/bin + SYSTEM_PATH, PYQMAIL_HOME (qmail's compiled-in home),
    PYQMAIL_SINGLE_USER=1 in single-user mode, and PASSED_ON from the daemon's own
    environment. Nothing else of whoever started the daemon (qmail: ``env - PATH=...``)."""
    root = os.fsencode(home_root)
    env = {b"PATH": root + b"/bin:" + SYSTEM_PATH.encode(), b"PYQMAIL_HOME": root}
    if single_user:
        env[b"PYQMAIL_SINGLE_USER"] = b"1"
    for key in PASSED_ON:
        value = os.environb.get(key)
        if value is not None:
            env[key] = value
    return env


def exec_environment() -> dict[bytes, bytes]:
    """The environment this process was exec'd with (/proc/self/environ), which is what
    real qmail-local passes on: Python's start-up may have added ``LC_CTYPE`` (PEP 538
    locale coercion) to os.environ, and that must not reach a program."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        env = dict(os.environb)
        if env.get(b"LC_CTYPE") in (b"C.UTF-8", b"C.utf8", b"UTF-8"):
            env.pop(b"LC_CTYPE")  # probably the coercion's; qmail-local would not add it
        return env
    env = {}
    for item in raw.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq and key and key not in env:
            env[key] = value
    return env


def run(
    command: str,
    msg_fd: int,
    env: Mapping[bytes, bytes],
    *,
    cwd: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    stdout: int = 1,
    stderr: int = 2,
) -> bool:
    """Run ``command``; True when it exited 99 (ignore the following lines).

    ``timeout`` None: no limit here, and the program stays in this process's group, so
    that the caller (the spawner, which sets a limit on the whole delivery) can kill
    this process and the program together with one killpg.

    Raises DeliveryFailure: 100 for qmail's permanent exit codes, 111 otherwise; the text
    is empty (the program's own output is the report) except for a crash or a timeout.
    """
    try:
        os.lseek(msg_fd, 0, os.SEEK_SET)
    except OSError as e:
        raise temp("Unable to rewind message. (#4.3.0)") from e
    try:
        proc = subprocess.Popen(
            [b"/bin/sh", b"-c", command.encode("utf-8", "surrogateescape")],
            stdin=msg_fd,
            stdout=stdout,
            stderr=stderr,
            env=dict(env),
            cwd=None if cwd is None else cwd.encode("utf-8", "surrogateescape"),
            close_fds=True,
            process_group=None if timeout is None else 0,
        )
    except OSError as e:
        raise temp(f"Unable to run /bin/sh: {strerror(e)}. (#4.3.0)") from e
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()
        raise temp(f"Timeout on program delivery after {timeout:g} seconds. (#4.3.0)") from None
    except BaseException:
        if timeout is None:
            proc.kill()
        else:
            kill_group(proc.pid)
        proc.wait()
        raise
    if code < 0:
        raise temp("Aack, child crashed. (#4.3.0)")
    if code == 0:
        return False
    if code == 99:
        return True
    if code in PERMANENT_EXITS:
        raise DeliveryFailure(PERM, "")
    raise DeliveryFailure(TEMP, "")


def kill_group(pgid: int) -> None:
    """SIGKILL every process in the group (the program and anything it started)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
