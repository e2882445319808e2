"""Password checks for SMTP AUTH: control/authusers (argon2id) and checkpassword programs.

Two sources, asked in this order for a user name and password:

1. ``control/authusers``: ``user:$argon2id$...`` lines (argon2-cffi; ``#`` comments and
   blank lines ignored), written by ``pyqmail passwd USER`` (:func:`set_password`). A user
   listed there gets that file's answer, final. An unknown user costs one verification
   against a dummy hash all the same, so timing does not tell who exists.
2. A checkpassword program (the interface qmail's AUTH patches use, and vchkpw or
   checkpassword-pam implement): ``control/checkpassword`` names it and its arguments
   (one line, shell-style words; ``pyqmail run``), or qmail-smtpd's own arguments
   (``qmail-smtpd HOSTNAME CHECKPROG SUBPROG...``) name it, and win. It is run with
   ``user NUL password NUL timestamp NUL`` on fd 3 (the timestamp empty: no challenge
   for PLAIN and LOGIN), stdin from /dev/null, stdout thrown away (under tcpserver fd 1
   is the client), stderr kept; exit 0 (its SUBPROG's, usually /bin/true) accepts, 111,
   2 (misuse), a signal, a failure to start or ``PROGRAM_TIMEOUT`` is a temporary
   failure, any other exit refuses.

No source configured: :meth:`PasswordCheck.available` is False and AUTH is not offered.
Everything here blocks (argon2 is CPU and 64 MiB per verification, the program is a
process): the asyncio listener runs :meth:`PasswordCheck.check` in a worker thread, at
most ``VERIFY_THREADS`` argon2 verifications at a time; in root mode it runs in the
password process (daemon/authproc.py), as qmailp, the one account besides root that may
read control/authusers (mode 0600, owner qmailp; ``pyqmail passwd`` sets that).

A password never reaches a log, an exception text or a ``repr``.
"""

from __future__ import annotations

import enum
import logging
import os
import shlex
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

from pyqmail.home import Home, HomeError

log = logging.getLogger("pyqmail.smtpd")

AUTHUSERS = "authusers"
CHECKPASSWORD = "checkpassword"
MAX_USER = 255  # bytes of a user name (after base64 decoding)
MAX_PASSWORD = 1024  # bytes of a password
PROGRAM_TIMEOUT = 30.0
VERIFY_THREADS = 2  # concurrent argon2 verifications (each takes 64 MiB)
_BAD_USER = frozenset(b":\x7f" + bytes(range(33)))


class Verdict(enum.Enum):
    OK = "ok"
    BAD = "bad"  # wrong password or unknown user: 535
    TEMP = "temp"  # the check could not be made: 454


class PasswordError(Exception):
    """control/authusers cannot be read or written; the text says why (no password)."""


def valid_user(user: bytes) -> bool:
    """A name that fits an authusers line and the fd-3 protocol: 1..255 bytes, no white
    space, no control characters, no ``:``."""
    return 0 < len(user) <= MAX_USER and not any(b in _BAD_USER for b in user)


def valid_password(password: bytes) -> bool:
    """1..1024 bytes and no NUL (fd 3 separates with NUL)."""
    return 0 < len(password) <= MAX_PASSWORD and b"\0" not in password


def _hasher() -> object:
    from argon2 import PasswordHasher  # argon2-cffi

    return PasswordHasher()


class AuthUsers:
    """control/authusers, parsed again whenever the file changes (size, mtime, inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self._dummy: str | None = None
        self._sem = threading.BoundedSemaphore(VERIFY_THREADS)

    def exists(self) -> bool:
        return self.path.exists()

    def users(self) -> dict[bytes, str] | None:
        """user -> hash; None when the file is missing; PasswordError if unreadable."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise PasswordError(f"unable to read {self.path}: {e.strerror}") from e
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                try:
                    raw = self.path.read_bytes()
                except FileNotFoundError:
                    return None
                except OSError as e:
                    raise PasswordError(f"unable to read {self.path}: {e.strerror}") from e
                self._users = parse_authusers(raw)
                self._stamp = stamp
            return self._users

    def verify(self, user: bytes, password: bytes) -> Verdict | None:
        """The file's answer; None when the user is not in it (or there is no file)."""
        users = self.users()
        if users is None:
            return None
        digest = users.get(user)
        with self._sem:
            ph = _hasher()
            if digest is None:
                self._burn(ph, password)
                return None
            try:
                ok = bool(ph.verify(digest, password))  # type: ignore[attr-defined]
            except Exception:  # VerifyMismatchError, InvalidHash...: never the text
                ok = False
        return Verdict.OK if ok else Verdict.BAD

    def _burn(self, ph: object, password: bytes) -> None:
        """One verification that cannot succeed, so an unknown user costs as much."""
        if self._dummy is None:
            self._dummy = ph.hash(os.urandom(16))  # type: ignore[attr-defined]
        try:
            ph.verify(self._dummy, password)  # type: ignore[attr-defined]
        except Exception:
            pass


def parse_authusers(raw: bytes) -> dict[bytes, str]:
    """``user:hash`` lines; a line without ``:`` or with a bad name is skipped."""
    out: dict[bytes, str] = {}
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, digest = line.partition(b":")
        if sep and valid_user(user) and digest.startswith(b"$argon2"):
            out[user] = digest.decode("ascii", "replace")
    return out


def run_checkpassword(
    argv: list[str],
    user: bytes,
    password: bytes,
    env: Mapping[str, str] | None = None,
    timeout: float = PROGRAM_TIMEOUT,
) -> Verdict:
    """Ask a checkpassword program (module docstring); never raises."""
    if not argv:
        return Verdict.TEMP
    r, w = os.pipe()
    try:
        # fd 3 by the shell, not a preexec_fn (this runs in worker threads)
        cmd = ["/bin/sh", "-c", 'exec "$@" 3<&0 </dev/null', "checkpassword", *argv]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=r,
                stdout=subprocess.DEVNULL,
                close_fds=True,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        except OSError:
            return Verdict.TEMP
        os.close(r)
        r = -1
        try:
            os.write(w, user + b"\0" + password + b"\0\0")
        except OSError:
            pass  # it did not read: its exit code says the rest
        os.close(w)
        w = -1
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                proc.kill()
            proc.wait()
            return Verdict.TEMP
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    if rc == 0:
        return Verdict.OK
    if rc < 0 or rc in (2, 111, 126, 127):
        return Verdict.TEMP
    return Verdict.BAD


def program_of(home: Home) -> list[str] | None:
    """control/checkpassword as argv (None: missing or empty)."""
    try:
        raw = (home.control / CHECKPASSWORD).read_bytes()
    except OSError:
        return None
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                words = shlex.split(line)
            except ValueError:
                return None
            return words or None
    return None


class PasswordCheck:
    """The password sources of one home (module docstring). ``program`` (qmail-smtpd's
    arguments) replaces control/checkpassword when given."""

    def __init__(self, home: Home, program: list[str] | None = None) -> None:
        self.home = home
        self.program = program or None
        self.authusers = AuthUsers(home.control / AUTHUSERS)

    def available(self) -> bool:
        """Is any source configured (is AUTH offered)? A few stats."""
        if self.program is not None or self.authusers.exists():
            return True
        return (self.home.control / CHECKPASSWORD).exists()

    def check(self, user: bytes, password: bytes, remote_ip: str = "") -> Verdict:
        """Blocking: the verdict for ``user``/``password``; never raises."""
        if not valid_user(user) or not valid_password(password):
            return Verdict.BAD
        try:
            got = self.authusers.verify(user, password)
        except PasswordError as e:  # its text names the file and the error, nothing else
            log.warning("%s", e)
            got = Verdict.TEMP if self.program is None else None
        except Exception as e:  # argon2-cffi missing or broken: not the client's fault
            log.warning("control/authusers: cannot verify: %s", type(e).__name__)
            got = Verdict.TEMP
        if got is not None:
            return got
        program = self.program or program_of(self.home)
        if program is None:
            return Verdict.BAD
        env = dict(os.environ)
        if remote_ip:
            env["TCPREMOTEIP"] = remote_ip
        return run_checkpassword(program, user, password, env)


# -- pyqmail passwd: writing the file ------------------------------------------------------


def set_password(home: Home, user: bytes, password: bytes | None) -> bool:
    """Set ``user``'s password (a new argon2id hash), or remove the user (``password``
    None); False if there was no such user to remove. The file is replaced atomically
    (written, fsynced, renamed); mode 0600; in root mode owned by qmailp (the account of
    the password process), so that the network-facing qmaild cannot read it."""
    if not valid_user(user):
        raise PasswordError("a user name is 1 to 255 bytes without white space, control "
                            "characters or ':'")  # fmt: skip
    path = home.control / AUTHUSERS
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    except OSError as e:
        raise PasswordError(f"unable to read {path}: {e.strerror}") from e
    line = b""
    if password is not None:
        if not valid_password(password):
            raise PasswordError(f"a password is 1 to {MAX_PASSWORD} bytes without NUL")
        digest = _hasher().hash(password)  # type: ignore[attr-defined]
        line = user + b":" + digest.encode("ascii") + b"\n"
    out: list[bytes] = []
    found = False
    for raw in old.splitlines(keepends=True):
        name, sep, _ = raw.strip().partition(b":")
        if sep and name == user:
            if not found and line:
                out.append(line)
            found = True
            continue
        out.append(raw if raw.endswith(b"\n") else raw + b"\n")
    if not found:
        if password is None:
            return False
        out.append(line)
    _replace(home, path, b"".join(out))
    return True


def _owner(home: Home) -> tuple[int, int] | None:
    """(uid, gid) the file belongs to in root mode: qmailp and root's group."""
    if home.single_user or os.geteuid() != 0:
        return None
    try:
        return home.ids().uid("passwd"), 0
    except (HomeError, KeyError):
        return None


def _replace(home: Home, path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            owner = _owner(home)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PasswordError(f"unable to write {path}: {e.strerror}") from e
