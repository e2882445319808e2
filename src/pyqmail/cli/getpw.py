"""qmail-getpw LOCAL: print ``user\\0uid\\0gid\\0home\\0dash\\0ext\\0`` (local.md 1.2).

Exit 0, or qmail's QLX codes: 112 usage, 115 temporary stat failure, 116 no alias user,
118 system trouble.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyqmail.cli.common import split_home_args
from pyqmail.local.users import QLX_USAGE, UserError, enc, getpw


def main(argv: Sequence[str] | None = None) -> int:
    home, args = split_home_args(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        return QLX_USAGE
    try:
        info = getpw(args[0], home)
    except UserError as e:
        return e.code
    fields = [info.user, str(info.uid), str(info.gid), info.home, info.dash, info.ext]
    sys.stdout.buffer.write(b"".join(enc(f) + b"\0" for f in fields))
    sys.stdout.buffer.flush()
    return 0
