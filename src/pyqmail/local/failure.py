"""How one delivery step fails inside qmail-local: an exit code (100 or 111) and text.

qmail-local stops at the first failing instruction and exits with its code; the spawner
turns the code into D or Z (send.md 7). Steps raise :class:`DeliveryFailure`; only
:mod:`pyqmail.local.qlocal` catches it.
"""

from __future__ import annotations

import errno
import os

PERM = 100
TEMP = 111


class DeliveryFailure(Exception):
    """Stop qmail-local with ``code`` (100 permanent, 111 temporary) and ``text``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def temp(text: str) -> DeliveryFailure:
    return DeliveryFailure(TEMP, text)


def perm(text: str) -> DeliveryFailure:
    return DeliveryFailure(PERM, text)


# qmail's error_str texts (they appear in delivery reports and bounces), by errno name.
_QMAIL_TEXT: dict[str, str] = {
    "EINTR": "interrupted system call",
    "ENOMEM": "out of memory",
    "ENOENT": "file does not exist",
    "ETXTBSY": "text busy",
    "EIO": "input/output error",
    "EEXIST": "file already exists",
    "ETIMEDOUT": "timed out",
    "EINPROGRESS": "operation in progress",
    "EAGAIN": "temporary failure",
    "EPIPE": "broken pipe",
    "EPERM": "permission denied",
    "EACCES": "access denied",
    "ESRCH": "no such process",
    "ENXIO": "device not configured",
    "E2BIG": "argument list too long",
    "ENOEXEC": "exec format error",
    "EBADF": "file descriptor not open",
    "ECHILD": "no child processes",
    "EDEADLK": "operation would cause deadlock",
    "EFAULT": "bad address",
    "ENOTBLK": "not a block device",
    "EBUSY": "device busy",
    "EXDEV": "cross-device link",
    "ENODEV": "device does not support operation",
    "ENOTDIR": "not a directory",
    "EISDIR": "is a directory",
    "EINVAL": "invalid argument",
    "ENFILE": "system cannot open more files",
    "EMFILE": "process cannot open more files",
    "ENOTTY": "not a tty",
    "EFBIG": "file too big",
    "ENOSPC": "out of disk space",
    "ESPIPE": "unseekable descriptor",
    "EROFS": "read-only file system",
    "EMLINK": "too many links",
    "EDOM": "input out of range",
    "ERANGE": "output out of range",
    "EALREADY": "operation already in progress",
    "ENOTSOCK": "not a socket",
    "EDESTADDRREQ": "destination address required",
    "EMSGSIZE": "message too long",
    "EPROTOTYPE": "incorrect protocol type",
    "ENOPROTOOPT": "protocol not available",
    "EPROTONOSUPPORT": "protocol not supported",
    "ESOCKTNOSUPPORT": "socket type not supported",
    "EOPNOTSUPP": "operation not supported",
    "EPFNOSUPPORT": "protocol family not supported",
    "EAFNOSUPPORT": "address family not supported",
    "EADDRINUSE": "address already used",
    "EADDRNOTAVAIL": "address not available",
    "ENETDOWN": "network down",
    "ENETUNREACH": "network unreachable",
    "ENETRESET": "network reset",
    "ECONNABORTED": "connection aborted",
    "ECONNRESET": "connection reset",
    "ENOBUFS": "out of buffer space",
    "EISCONN": "already connected",
    "ENOTCONN": "not connected",
    "ESHUTDOWN": "socket shut down",
    "ETOOMANYREFS": "too many references",
    "ECONNREFUSED": "connection refused",
    "ELOOP": "symbolic link loop",
    "ENAMETOOLONG": "file name too long",
    "EHOSTDOWN": "host down",
    "EHOSTUNREACH": "host unreachable",
    "ENOTEMPTY": "directory not empty",
    "EUSERS": "too many users",
    "EDQUOT": "disk quota exceeded",
    "ESTALE": "stale NFS file handle",
    "EREMOTE": "too many levels of remote in path",
    "ENOLCK": "no locks available",
    "ENOSYS": "system call not available",
    "ENOSTR": "not a stream device",
    "ETIME": "timer expired",
    "ENOSR": "out of stream resources",
    "ENOMSG": "no message of desired type",
    "EBADMSG": "bad message type",
    "EIDRM": "identifier removed",
    "ENONET": "machine not on network",
    "ENOLINK": "link severed",
    "EADV": "advertise error",
    "ESRMNT": "srmount error",
    "ECOMM": "communication error",
    "EPROTO": "protocol error",
    "EMULTIHOP": "multihop attempted",
    "EREMCHG": "remote address changed",
}
_BY_NUMBER: dict[int, str] = {
    getattr(errno, name): text for name, text in _QMAIL_TEXT.items() if hasattr(errno, name)
}


def strerror(err: OSError) -> str:
    """qmail's error_str: its own short text for the errno, else the system's."""
    if not err.errno:
        return str(err)
    return _BY_NUMBER.get(err.errno) or os.strerror(err.errno)
