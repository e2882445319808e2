"""The files qmail-send writes per message: info/S/N, local/S/N, remote/S/N, bounce/N
(queue.md 1, 4, 6; send.md 4).

- ``info/S/N``: ``F<sender>\\0``; its mtime is the message's birth time.
- ``local/S/N`` and ``remote/S/N``: ``T<addr>\\0`` records; a finished recipient has its
  ``T`` overwritten in place by ``D`` (no fsync, as qmail: a crash before the mark
  means a second delivery, never a lost one). mtime = next retry time at shutdown.
- ``bounce/N``: the failure paragraphs of message N, appended one at a time and fsynced
  (a failure once recorded must not be lost); removed by queue/clean.py.

Shared by send/ (which writes and marks them), qmail-qread and the cleaners. Writers
create the file with O_EXCL and fsync it, and by default also fsync the split directory
(pyqmail's improvement over qmail, which relied on BSD directory semantics); the
scheduler passes ``sync_dir=False`` and fsyncs each directory once per batch. Paths may
be ``str`` (the scheduler builds them as strings, cheaper on its hot path) or Path; the
fd-based helpers (``open_channel``, ``mark_done_fd``) let a delivery job read its file and
mark every recipient through one descriptor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyqmail.durable import fsync_dir, write_all

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class Recipient:
    """One record of a channel file: its byte offset (of the T/D byte), state, address."""

    offset: int
    done: bool
    address: bytes


def _create(path: StrPath, data: bytes, *, sync_dir: bool = True, sync: bool = True) -> int:
    """Create ``path`` O_EXCL with ``data``; fsynced and closed (returns -1), or with
    ``sync=False`` left open, not synced, for the caller to fsync and close (its fd)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    if not sync:
        return fd
    os.close(fd)
    if sync_dir:
        fsync_dir(os.path.dirname(path))
    return -1


def format_info(sender: bytes) -> bytes:
    """The bytes of info/S/N."""
    return b"F" + sender + b"\0"


def write_info(path: StrPath, sender: bytes, *, sync_dir: bool = True) -> None:
    """Create info/S/N (O_EXCL) with ``F<sender>\\0``, fsynced."""
    _create(path, format_info(sender), sync_dir=sync_dir)


def create_unsynced(path: StrPath, data: bytes) -> int:
    """Create info/S/N or a channel file (O_EXCL) with ``data`` (``format_info``,
    ``format_channel``) and return its open descriptor, not yet fsynced: the caller
    fsyncs a batch of them together (send/preprocess.py), then closes them, and fsyncs
    the directories. OSError if it cannot be created or written (nothing left)."""
    return _create(path, data, sync=False)


def parse_info(data: bytes, *, strict: bool = False) -> bytes:
    """The sender in the bytes of info/S/N: those after the first, up to a NUL.

    Lenient by default, as qmail-qread is (it shows ``Fx`` and even ``Zx\\0`` as sender
    ``x``); ``strict`` (the scheduler) gives the empty sender unless the record is ``F``.
    """
    if strict and not data.startswith(b"F"):
        return b""
    end = data.find(b"\0")
    return data[1:] if end < 0 else data[1:end]


def read_info(path: StrPath, *, strict: bool = False) -> bytes:
    """The sender recorded in info/S/N (lenient unless ``strict``, see ``parse_info``)."""
    with open(path, "rb") as f:
        return parse_info(f.read(), strict=strict)


def read_info_birth(path: StrPath) -> tuple[bytes, int]:
    """(sender, birth) for the scheduler: the strict sender and the file's mtime, whole
    seconds (the birth of the message that qmail-send's retry schedule counts from)."""
    with open(path, "rb") as f:
        birth = int(os.fstat(f.fileno()).st_mtime)
        return parse_info(f.read(), strict=True), birth


def format_channel(recipients: Sequence[bytes], done: Sequence[bool] | None = None) -> bytes:
    """``T<addr>\\0`` per recipient; ``D`` instead for those whose ``done`` is true."""
    if done is None:
        return b"".join(b"T" + r + b"\0" for r in recipients)
    return b"".join(
        (b"D" if d else b"T") + r + b"\0" for r, d in zip(recipients, done, strict=True)
    )


def write_channel(
    path: StrPath,
    recipients: Sequence[bytes],
    *,
    done: Sequence[bool] | None = None,
    sync_dir: bool = True,
) -> None:
    """Create local/S/N or remote/S/N (O_EXCL) with ``T<addr>\\0`` records, fsynced
    (``D`` for recipients already done, see ``format_channel``)."""
    _create(path, format_channel(recipients, done), sync_dir=sync_dir)


def iter_channel(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(offset, record type byte, address) of every whole record, of any type.

    A torn last record (no NUL) is not a record.
    """
    pos = 0
    n = len(data)
    find = data.find
    while pos < n:
        end = find(b"\0", pos)
        if end < 0:
            return
        yield pos, data[pos : pos + 1], data[pos + 1 : end]
        pos = end + 1


def parse_channel(data: bytes) -> list[Recipient]:
    """Records of a channel file; other record types are skipped (as qmail-send does)."""
    return [
        Recipient(pos, kind == b"D", addr)
        for pos, kind, addr in iter_channel(data)
        if kind in (b"T", b"D")
    ]


def read_channel(path: StrPath) -> list[Recipient]:
    with open(path, "rb") as f:
        return parse_channel(f.read())


def read_fd(fd: int) -> bytes:
    """Everything from ``fd``'s offset to its end."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_path(path: StrPath) -> bytes:
    """A whole queue file with plain read(2)s (a buffered open() adds an fstat, an ioctl
    and lseeks: this is every message's todo/N)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)


def open_channel(path: StrPath) -> tuple[int, bytes]:
    """Open a channel file read-write and read it: (fd for ``mark_done_fd``, its bytes).

    The caller closes the fd. OSError if it cannot be opened or read (fd then closed).
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fd, read_fd(fd)
    except BaseException:
        os.close(fd)
        raise


def mark_done_fd(fd: int, offset: int) -> None:
    """Overwrite the ``T`` at ``offset`` with ``D`` (qmail-send's markdone) through an open
    fd; no fsync, as qmail. OSError on failure: the caller logs qmail's "message will be
    delivered twice!" warning."""
    if os.pwrite(fd, b"D", offset) != 1:
        raise OSError("short write marking a recipient done")


def mark_done(path: StrPath, offset: int) -> None:
    """``mark_done_fd`` on a file opened for just this mark."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        mark_done_fd(fd, offset)
    finally:
        os.close(fd)


def append_bounce(path: StrPath, paragraph: bytes) -> None:
    """Append one failure paragraph to bounce/N (created 0600 if needed), fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, paragraph)
        os.fsync(fd)
    finally:
        os.close(fd)


def set_next_try(path: StrPath, when: float) -> None:
    """Set atime and mtime of a channel file to its next retry time (qmail-send at exit)."""
    os.utime(path, (when, when))
