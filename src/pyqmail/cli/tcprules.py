"""``tcprules rules.cdb rules.tmp < rules``: compile tcpserver rules, as ucspi-tcp does.

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

from pyqmail import cdb
from pyqmail.tcprules import RulesError, parse_line

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


def compile_stream(stream: object, path: str, tmp: str) -> int:
    """Read rules from the binary ``stream``, write ``path`` via ``tmp``; an exit code."""
    try:
        writer = cdb.Writer(path, tmp)
    except OSError as e:
        return _fatal(f"unable to create {tmp}: {errtext(e)}".encode(), 111)
    lineno = 0
    try:
        for raw in stream:  # type: ignore[attr-defined]
            lineno += 1
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if not line:
                continue
            rule = parse_line(line, lineno)
            if rule is None:
                continue
            for key in rule.cdb_keys():
                writer.add(key, rule.value)
    except RulesError as e:
        writer.abort()
        return _fatal(b"unable to parse this line: " + e.line, 100)
    except cdb.CdbError as e:
        writer.abort()
        return _fatal(f"unable to write to {tmp}: {e}".encode(), 111)
    except OSError as e:
        writer.abort()
        what = f"unable to write to {tmp}" if e.filename == tmp else "unable to read input"
        return _fatal(f"{what}: {errtext(e)}".encode(), 111)
    try:
        writer.commit()
    except OSError as e:
        if e.filename2 is not None:
            return _fatal(f"unable to move {tmp} to {path}: {errtext(e)}".encode(), 111)
        return _fatal(f"unable to write to {tmp}: {errtext(e)}".encode(), 111)
    except cdb.CdbError as e:
        return _fatal(f"unable to write to {tmp}: {e}".encode(), 111)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(f"{PROG}: usage: tcprules rules.cdb rules.tmp", file=sys.stderr)
        return 100
    return compile_stream(sys.stdin.buffer, args[0], args[1])


if __name__ == "__main__":
    sys.exit(main())
