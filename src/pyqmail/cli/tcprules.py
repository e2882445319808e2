"""``tcprules rules.cdb rules.tmp < rules``: compile tcpserver rules, as ucspi-tcp does.

The compiling is :func:`pyqmail.tcprules.compile_cdb`; this module prints its errors.
The cdb is byte-identical to ucspi-tcp 0.88's. Exit codes are the ones Debian's
``/usr/bin/tcprules`` really uses: 100 for usage and for a line it cannot parse
(``tcprules: fatal: unable to parse this line: LINE``), 111 for I/O errors. The old
rules.cdb is never touched on failure; unlike ucspi-tcp we also remove rules.tmp then,
so nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence

from pyqmail.tcprules import CompileError, RulesError, compile_cdb

PROG = "tcprules"

# djb's error_str texts for the errors an operator meets, so messages read like ucspi-tcp's.
_DJB_ERRORS = {
    errno.ENOENT: "file does not exist",
    errno.EACCES: "access denied",
    errno.EPERM: "permission denied",
    errno.EEXIST: "file already exists",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "out of disk space",
    errno.EIO: "input/output error",
    errno.EINVAL: "invalid argument",
    errno.ENOMEM: "out of memory",
    errno.EPROTO: "protocol error",
    errno.EXDEV: "cross-device link",
    errno.EDQUOT: "disk quota exceeded",
}


def errtext(err: OSError) -> str:
    """An OSError in djb's words (``file does not exist``), else its strerror."""
    if err.errno in _DJB_ERRORS:
        return _DJB_ERRORS[err.errno]
    return (err.strerror or str(err)).lower()


def _fatal(message: bytes, code: int) -> int:
    sys.stdout.flush()
    sys.stderr.buffer.write(PROG.encode() + b": fatal: " + message + b"\n")
    sys.stderr.flush()
    return code


def _message(e: CompileError) -> bytes:
    if isinstance(e.cause, RulesError):
        return e.what.encode() + b": " + e.cause.line
    detail = errtext(e.cause) if isinstance(e.cause, OSError) else str(e.cause)
    return f"{e.what}: {detail}".encode()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(f"{PROG}: usage: tcprules rules.cdb rules.tmp", file=sys.stderr)
        return 100
    try:
        compile_cdb(sys.stdin.buffer, args[0], args[1])
    except CompileError as e:
        return _fatal(_message(e), e.code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
