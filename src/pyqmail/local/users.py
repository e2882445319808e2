"""Who owns a local address: users/assign, users/cdb and qmail-getpw's rules.

This module owns local.md sections 1.1, 1.2 and 2:

* :func:`compile_assign` turns users/assign into qmail-newu's exact cdb records
  (``!local\\0`` for ``=`` lines, ``!prefix`` for ``+`` lines, the wildchars string under
  the empty key); :func:`newu` writes them to users/cdb atomically, leaving the old cdb on
  any error.
* :func:`lookup_cdb` is qmail-lspawn's users/cdb probe (exact key, then the longest
  wildcard prefix ending in a wildchar); :func:`getpw` is qmail-getpw (longest user name
  before a ``-``, uid != 0, home owned by the uid, else the alias user).
* :func:`resolve` chains them. Temporary trouble is raised as :class:`UserError` carrying
  qmail-lspawn's exit code and text, never a traceback.

Local parts are ``str`` decoded with surrogateescape so any byte survives the round trip.
"""

from __future__ import annotations

import errno
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyqmail import cdb
from pyqmail.home import BREAK, Home

# qmail's qlx.h exit codes, used between the spawner's child and the spawner.
QLX_USAGE = 112
QLX_ROOT = 113
QLX_NFS = 115
QLX_NOALIAS = 116
QLX_CDB = 117
QLX_SYS = 118
QLX_NOMEM = 119

GETPW_USERLEN = 32  # qmail-getpw skips candidate user names of 32 bytes or more

_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def lower_ascii(data: bytes) -> bytes:
    """qmail's case_lowerb: only A-Z are folded."""
    return data.translate(_ASCII_LOWER)


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class UserInfo:
    """The six fields qmail-lspawn hands qmail-local: user uid gid home dash ext."""

    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


class UserError(Exception):
    """A lookup that must be retried later; ``code`` is qmail's QLX exit code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class AssignError(Exception):
    """users/assign cannot be compiled; the message is qmail-newu's text."""


# --- users/assign -> users/cdb (qmail-newu) ---------------------------------------------


def compile_assign(data: bytes) -> list[tuple[bytes, bytes]]:
    """The cdb records qmail-newu writes for ``data``, in qmail-newu's order.

    Raises AssignError("bad format in users/assign") as qmail-newu dies: a missing ``.``
    terminator, a line without ``:`` or starting with ``:``, a NUL, or fewer than six
    colons after the first field.
    """
    records: list[tuple[bytes, bytes]] = []
    wildchars = bytearray()
    pos = 0
    while True:
        if pos >= len(data):
            raise AssignError("bad format in users/assign")
        nl = data.find(b"\n", pos)
        if nl < 0:
            line, matched, pos = data[pos:], False, len(data)
        else:
            line, matched, pos = data[pos:nl], True, nl + 1
        if line.startswith(b"."):
            break
        if not matched or b"\0" in line:
            raise AssignError("bad format in users/assign")
        i = line.find(b":")
        if i <= 0:
            raise AssignError("bad format in users/assign")
        if line[0:1] == b"+":
            key = lower_ascii(b"!" + line[1:i])
            if i >= 2 and line[i - 1] not in wildchars:
                wildchars.append(line[i - 1])
        else:
            key = lower_ascii(b"!" + line[1:i] + b"\0")
        fields = line[i + 1 :].split(b":")
        if len(fields) < 7:
            raise AssignError("bad format in users/assign")
        records.append((key, b"\0".join(fields[:6])))
    records.append((b"", bytes(wildchars)))
    return records


def newu(home: Home) -> None:
    """qmail-newu: compile users/assign into users/cdb (cdb.tmp, fsync, rename).

    Raises AssignError with qmail-newu's message; the old users/cdb is then untouched.
    """
    users = home.users
    try:
        data = (users / "assign").read_bytes()
    except FileNotFoundError as e:
        raise AssignError("unable to open users/assign") from e
    except OSError as e:
        raise AssignError("unable to read users/assign") from e
    records = compile_assign(data)
    old = os.umask(0o033)
    try:
        writer = cdb.Writer(users / "cdb", users / "cdb.tmp")
    except OSError as e:
        raise AssignError("unable to open users/cdb.tmp") from e
    finally:
        os.umask(old)
    try:
        for key, value in records:
            writer.add(key, value)
        writer.commit()
    except OSError as e:
        writer.abort()
        raise AssignError("unable to write users/cdb.tmp") from e


# --- users/cdb lookup (qmail-lspawn) ----------------------------------------------------


def _scan_uint(field: bytes) -> int:
    """qmail's scan_ulong: the leading digits, 0 if none."""
    n = 0
    for ch in field:
        if not 48 <= ch <= 57:
            break
        n = n * 10 + ch - 48
    return n


def _parse_record(value: bytes, remainder: bytes) -> UserInfo:
    fields = (value + remainder).split(b"\0")
    if len(fields) < 6:
        raise UserError(QLX_USAGE, "Internal qmail-lspawn bug.")
    user, uid, gid, home, dash = fields[:5]
    ext = b"\0".join(fields[5:])  # a NUL inside the remainder stays in ext
    return UserInfo(dec(user), _scan_uint(uid), _scan_uint(gid), dec(home), dec(dash), dec(ext))


def lookup_cdb(path: Path, local: str) -> UserInfo | None:
    """qmail-lspawn's users/cdb probe; None when the file is absent or nothing matches."""
    try:
        reader = cdb.Reader.open(path)
    except FileNotFoundError:
        return None
    except (OSError, cdb.CdbError) as e:
        raise UserError(QLX_CDB, "Trouble reading users/cdb in qmail-lspawn.") from e
    with reader:
        return lookup_reader(reader, local)


def lookup_reader(reader: cdb.Reader, local: str) -> UserInfo | None:
    """The users/cdb probe against an open reader (exact key, then wildcards)."""
    raw = enc(local)
    low = lower_ascii(raw)
    try:
        wild = reader.get(b"")
        if wild is None:
            raise UserError(QLX_CDB, "Trouble reading users/cdb in qmail-lspawn.")
        value = reader.get(b"!" + low + b"\0")
        if value is not None:
            return _parse_record(value, b"")
        for i in range(len(low), -1, -1):
            if i == 0 or low[i - 1] in wild:
                value = reader.get(b"!" + low[:i])
                if value is not None:
                    return _parse_record(value, raw[i:])
    except (OSError, cdb.CdbError) as e:
        raise UserError(QLX_CDB, "Trouble reading users/cdb in qmail-lspawn.") from e
    return None


class CdbCache:
    """Keeps users/cdb open between lookups while the file is unchanged.

    A long-lived process (the spawner, its workers) re-stats the file per lookup and
    reopens it only after qmail-newu replaced it, instead of mapping it per delivery.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._reader: cdb.Reader | None = None

    def reader(self) -> cdb.Reader | None:
        """The current reader, None if users/cdb does not exist. Raises UserError."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._drop()
            return None
        except OSError as e:
            raise UserError(QLX_CDB, "Trouble reading users/cdb in qmail-lspawn.") from e
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._reader is None or key != self._key:
            self._drop()
            try:
                self._reader = cdb.Reader.open(self.path)
            except FileNotFoundError:
                return None
            except (OSError, cdb.CdbError) as e:
                raise UserError(QLX_CDB, "Trouble reading users/cdb in qmail-lspawn.") from e
            self._key = key
        return self._reader

    def _drop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None
        self._key = None


# --- qmail-getpw ------------------------------------------------------------------------

PasswdLookup = Callable[[str], "pwd.struct_passwd | None"]


def _getpwnam(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None
    except OSError as e:  # an NSS back end in trouble
        raise UserError(QLX_SYS, "Temporary failure in qmail-lspawn.") from e


_TEMP_ERRNOS = frozenset(
    {errno.EINTR, errno.ENOMEM, errno.ETIMEDOUT, errno.EIO, errno.EAGAIN, errno.ESTALE,
     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED, errno.ETXTBSY, errno.ENFILE,
     errno.EMFILE, errno.EDEADLK, errno.ENOLCK, errno.EBUSY}
)  # fmt: skip


def is_temp_errno(code: int | None) -> bool:
    """qmail's error_temp(): errors worth retrying."""
    return code in _TEMP_ERRNOS


def getpw(local: str, home: Home, lookup: PasswdLookup = _getpwnam) -> UserInfo:
    """qmail-getpw: the system account owning ``local``, else the alias user.

    In single-user mode only the invoking user's own account can match: every delivery
    runs with the caller's ids, and writing into another account's home as someone else
    (root, in a container) would leave files its owner cannot read. Everything else goes
    to the home's alias/ directory.
    """
    only_uid = os.getuid() if home.single_user else None
    raw = enc(local)
    brk = enc(BREAK)[0]
    for end in range(len(raw), -1, -1):
        if end >= GETPW_USERLEN or (end < len(raw) and raw[end] != brk):
            continue
        name = dec(lower_ascii(raw[:end]))
        if not name:
            continue
        pw = lookup(name)
        if pw is None or pw.pw_uid == 0 or (only_uid is not None and pw.pw_uid != only_uid):
            continue
        try:
            st = os.stat(pw.pw_dir)
        except OSError as e:
            if is_temp_errno(e.errno):
                raise UserError(QLX_NFS, "NFS failure in qmail-local.") from e
            continue
        if st.st_uid != pw.pw_uid:
            continue
        if end < len(raw):
            return UserInfo(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "-", dec(raw[end + 1 :]))
        return UserInfo(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "", "")
    return alias_user(local, home, lookup)


def alias_user(local: str, home: Home, lookup: PasswdLookup = _getpwnam) -> UserInfo:
    """The catch-all: ~alias with dash ``-`` and ext = the whole local part.

    In single-user mode the alias user is the home's alias/ directory under the caller's ids.
    """
    if home.single_user:
        return UserInfo("alias", os.getuid(), os.getgid(), str(home.alias), "-", local)
    pw = lookup("alias")
    if pw is None:
        raise UserError(QLX_NOALIAS, "Unable to find alias user!")
    return UserInfo(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "-", local)


def resolve(home: Home, local: str, lookup: PasswdLookup = _getpwnam) -> UserInfo:
    """users/cdb first, then qmail-getpw (local.md 1.1-1.2). Raises UserError."""
    found = lookup_cdb(home.users / "cdb", local)
    if found is not None:
        return found
    return getpw(local, home, lookup)


def resolve_with(
    home: Home, local: str, reader: cdb.Reader | None, lookup: PasswdLookup = _getpwnam
) -> UserInfo:
    """:func:`resolve` with users/cdb already open (None: there is no users/cdb)."""
    found = lookup_reader(reader, local) if reader is not None else None
    if found is not None:
        return found
    return getpw(local, home, lookup)
