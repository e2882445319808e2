"""preline [-frdFRD] PROG [ARGS]: feed PROG $UFLINE $RPLINE $DTLINE + stdin (tools.md)."""

from __future__ import annotations

import getopt
import os
import subprocess
import sys
from collections.abc import Sequence

from pyqmail.durable import write_all
from pyqmail.local.failure import strerror
from pyqmail.local.users import is_temp_errno

USAGE = "preline: usage: preline cmd [ arg ... ]"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environb
    lines = {k: env.get(k) for k in (b"UFLINE", b"RPLINE", b"DTLINE")}
    if any(v is None for v in lines.values()):
        print(USAGE, file=sys.stderr)
        return 100
    want = {b"UFLINE": True, b"RPLINE": True, b"DTLINE": True}
    try:
        opts, rest = getopt.getopt(args, "frdFRD")
    except getopt.GetoptError:
        print(USAGE, file=sys.stderr)
        return 100
    names = {"f": b"UFLINE", "r": b"RPLINE", "d": b"DTLINE"}
    for opt, _ in opts:
        ch = opt[1]
        want[names[ch.lower()]] = ch.isupper()
    if not rest:
        print(USAGE, file=sys.stderr)
        return 100
    head = b"".join(v or b"" for k, v in lines.items() if want[k])
    try:
        proc = subprocess.Popen(rest, stdin=subprocess.PIPE)
    except OSError as e:
        print(f"preline: fatal: unable to run {rest[0]}: {strerror(e)}", file=sys.stderr)
        return 111 if is_temp_errno(e.errno) else 100
    assert proc.stdin is not None
    pipe = proc.stdin.fileno()
    try:
        write_all(pipe, head)
        while chunk := os.read(0, 65536):
            write_all(pipe, chunk)
    except OSError as e:
        proc.stdin.close()
        proc.wait()
        print(f"preline: fatal: unable to copy input: {strerror(e)}", file=sys.stderr)
        return 111
    proc.stdin.close()
    rc = proc.wait()
    if rc < 0:
        print("preline: fatal: child crashed", file=sys.stderr)
        return 111
    return rc
