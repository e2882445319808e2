"""qmail-pw2u: a passwd file -> users/assign lines, with qmail-getpw's rules (local.md 2).

For each account (uid != 0, no upper case unless allowed, listed in users/include if it
exists, not in users/exclude, home checked per the home strategy) it writes
``=NAME:user:uid:gid:home:::`` and ``+NAME-:user:uid:gid:home:-::`` for the account's
name or its users/mailnames; the ``alias`` account also gets the ``+:`` catch-all. Then
users/subusers, users/append and the terminating ``.``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class Pw2uError(Exception):
    """Fatal: the message is qmail-pw2u's text after ``fatal: ``."""


@dataclass(frozen=True)
class Options:
    dashcolon: bytes = b"-:"  # ``-/``: b"-/:"
    noupper: bool = True
    home_strategy: int = 2  # 2 skip missing homes, 1 die on them, 0 no checks
    brk: bytes = b"-"  # empty: no extension lines (-C)


def _read_lines(path: Path) -> list[bytes] | None:
    """control_readfile: lines with trailing white space removed; None if absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Pw2uError("unable to read controls") from e
    return [ln.rstrip(b" \t\r") for ln in data.split(b"\n") if ln.rstrip(b" \t\r")]


def _colon_map(lines: list[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for ln in lines:
        key, _, value = ln.partition(b":")
        out.setdefault(key, value)
    return out


def convert(passwd: Iterable[bytes], users_dir: Path, opts: Options, alias: str = "alias") -> bytes:
    """The assign text for the passwd lines (each with or without its newline)."""
    incl = _read_lines(users_dir / "include")
    excl = _read_lines(users_dir / "exclude")
    mana_lines = _read_lines(users_dir / "mailnames")
    mana = _colon_map(mana_lines) if mana_lines is not None else None
    incl_set = set(incl) if incl is not None else None
    excl_set = set(excl or [])
    out = bytearray()
    allusers: dict[bytes, bytes] = {}
    flagalias = False
    for line in passwd:
        if b"\0" in line:
            continue
        f = line.rstrip(b"\n").split(b":")
        if len(f) < 7:
            continue
        user, uidstr, gidstr, home = f[0], f[2], f[3], f[5]
        uid = int(uidstr) if uidstr.isdigit() else 0
        if not uid:
            continue
        if opts.noupper and any(65 <= c <= 90 for c in user):
            continue
        if incl_set is not None and user not in incl_set:
            continue
        if user in excl_set:
            continue
        if opts.home_strategy:
            try:
                st = os.stat(home)
            except OSError as e:
                if e.errno != errno.ENOENT or opts.home_strategy == 1:
                    raise Pw2uError("unable to stat " + home.decode("utf-8", "replace")) from e
                continue
            if st.st_uid != uid:
                continue
        uugh = b":" + user + b":" + uidstr + b":" + gidstr + b":" + home + b":"
        allusers.setdefault(user, uugh)
        if user == alias.encode():
            out += b"+" + uugh + opts.dashcolon + b":\n"
            flagalias = True
        names = mana.get(user) if mana is not None else None
        for name in (names if names is not None else user).split(b":"):
            if not name:
                continue
            out += b"=" + name + uugh + b"::\n"
            if opts.brk:
                out += b"+" + name + opts.brk + uugh + opts.dashcolon + b":\n"
    if not flagalias:
        raise Pw2uError("unable to find alias user")
    out += _subusers(users_dir / "subusers", allusers, opts)
    try:
        out += (users_dir / "append").read_bytes()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise Pw2uError("unable to read controls") from e
    out += b".\n"
    return bytes(out)


def _subusers(path: Path, allusers: dict[bytes, bytes], opts: Options) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise Pw2uError("unable to read controls") from e
    out = bytearray()
    for line in data.split(b"\n"):
        f = line.split(b":")
        if len(f) < 4:
            continue
        sub, owner, pre = f[0], f[1], f[2]
        u = allusers.get(owner)
        if u is None:
            raise Pw2uError(
                "unable to find " + owner.decode("utf-8", "replace") + " user for subuser"
            )
        out += b"=" + sub + u + opts.dashcolon + pre + b":\n"
        if opts.brk:
            out += b"+" + sub + opts.brk + u + opts.dashcolon + pre + b"-:\n"
    return bytes(out)
