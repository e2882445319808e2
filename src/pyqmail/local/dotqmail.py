"""Which .qmail file controls a delivery, and what its lines say (local.md 3.2-3.3).

Owns the lookup order (``.qmail-ext``, then ``…-default`` walking up to
``.qmail-default``), the "exists" rule (a regular file that opens), the writable and
x-bit rules, and the line syntax of dot-qmail(5). It opens files only relative to the
current directory (the user's home), and never a name containing ``/`` or NUL: the
extension comes from the network, and every ``.`` in it has become ``:``, so no name it
produces can leave the home.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass

from pyqmail.local.failure import strerror
from pyqmail.local.users import is_temp_errno


class DotQmailError(Exception):
    """A temporary failure reading the .qmail file (qmail-local exits 111)."""


class Kind(enum.Enum):
    PROGRAM = "program"
    FORWARD = "forward"
    MBOX = "mbox"
    MAILDIR = "maildir"
    LIST = "+list"  # the undocumented ``+list`` line: later lines are forward-only


@dataclass(frozen=True)
class Instruction:
    kind: Kind
    arg: str


@dataclass(frozen=True)
class Chosen:
    """The outcome of the lookup: the file's name (None: none applies), its bytes,
    whether it is forward-only (x bit), and DEFAULT when a ``…default`` file matched."""

    name: str | None
    content: bytes
    forward_only: bool
    default: str | None


def safe_ext(ext: str) -> str:
    """ext lowercased (ASCII only) with every ``.`` turned into ``:``."""
    out = []
    for ch in ext:
        if "A" <= ch <= "Z":
            ch = chr(ord(ch) + 32)
        out.append(":" if ch == "." else ch)
    return "".join(out)


def _open_regular(name: str, dir_fd: int | None) -> tuple[bytes, int] | None:
    """(content, mode) if ``name`` is a regular file; None if it "does not exist".

    Raises DotQmailError for temporary errors, EACCES and EPERM, or a world-writable file.
    """
    if "/" in name or "\0" in name:
        return None
    try:
        fd = os.open(
            name.encode("utf-8", "surrogateescape"), os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except OSError as e:
        if is_temp_errno(e.errno) or e.errno in (errno.EACCES, errno.EPERM):
            raise DotQmailError(f"Unable to open {name}: {strerror(e)}. (#4.3.0)") from e
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_mode & 0o002:
            raise DotQmailError("Uh-oh: .qmail file is writable. (#4.7.0)")
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), st.st_mode
    except OSError as e:
        raise DotQmailError(f"Unable to read {name}: {strerror(e)}. (#4.3.0)") from e
    finally:
        os.close(fd)


def exists(name: str, dir_fd: int | None = None) -> bool:
    """qmail-local's test for the ``-owner`` files: ``stat`` succeeds (any type).

    Raises DotQmailError only for a temporary error, as qmail-local defers then.
    """
    if "/" in name or "\0" in name:
        return False
    try:
        os.stat(name.encode("utf-8", "surrogateescape"), dir_fd=dir_fd)
    except OSError as e:
        if is_temp_errno(e.errno):
            raise DotQmailError(f"Unable to open {name}: {strerror(e)}. (#4.3.0)") from e
        return False
    return True


def choose(dash: str, ext: str, dir_fd: int | None = None) -> Chosen:
    """Find the .qmail file for ``dash``/``ext`` in the home ``dir_fd`` (default: cwd)."""
    sext = safe_ext(ext)
    base = ".qmail" + dash + sext
    got = _open_regular(base, dir_fd)
    if got is not None:
        default: str | None = None
        if base.endswith("default"):
            default = ext[len(ext) - len("default") :] if len(ext) >= 7 else ""
        return Chosen(base, got[0], bool(got[1] & 0o100), default)
    for i in range(len(sext), -1, -1):
        if i != 0 and sext[i - 1] != "-":
            continue
        name = ".qmail" + dash + sext[:i] + "default"
        got = _open_regular(name, dir_fd)
        if got is not None:
            return Chosen(name, got[0], bool(got[1] & 0o100), ext[i:])
    return Chosen(None, b"", False, None)


def no_mailbox(chosen: Chosen, dash: str) -> bool:
    """qmail-local's one "no such address" rule (local.md 3.2 step 3): no file applies
    and the address is not the user's base address (dash non-empty). A base address
    without a .qmail uses defaultdelivery. The RCPT check (local/verdict.py) and the
    delivery (qlocal.py) both decide with this function."""
    return chosen.name is None and bool(dash)


def parse(content: bytes) -> list[Instruction]:
    """The instructions of a .qmail file, in order.

    Raises DotQmailError("Uh-oh: first line of .qmail file is blank.") like qmail-local.
    Comments and ``+`` lines other than ``+list`` are dropped.
    """
    if not content.endswith(b"\n"):
        content += b"\n"  # also makes an empty text one blank line, as qmail-local does
    out: list[Instruction] = []
    for n, raw in enumerate(content.split(b"\n")[:-1]):
        line = raw.rstrip(b" \t")
        if not line:
            if n == 0:
                raise DotQmailError("Uh-oh: first line of .qmail file is blank. (#4.2.1)")
            continue
        # qmail-local decides the kind from the first and last bytes of the line but uses
        # the rest as a C string: a NUL ends the argument (nothing after it is run,
        # written to or forwarded to).
        first, last = line[:1], line[-1:]
        text = line.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if first == b"#":
            continue
        if first == b"+":
            if text == "+list":
                out.append(Instruction(Kind.LIST, ""))
            continue
        if first == b"|":
            out.append(Instruction(Kind.PROGRAM, text[1:]))
        elif first in (b".", b"/"):
            out.append(Instruction(Kind.MAILDIR if last == b"/" else Kind.MBOX, text))
        elif first == b"&":
            out.append(Instruction(Kind.FORWARD, text[1:]))
        else:
            out.append(Instruction(Kind.FORWARD, text))
    return out
