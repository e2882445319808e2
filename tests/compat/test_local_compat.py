"""qmail-local against notqmail 1.09's, byte for byte (reports, exit codes, files written).

Runs only with PYQMAIL_COMPAT=1 and the reference built (/var/qmail-ref, see
../shared/reference); qmail-local takes its home as an argument, so no control files or
mount namespaces are involved. Dates, maildir names and qp numbers are normalised.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REF = Path(os.environ.get("PYQMAIL_REF_HOME", "/var/qmail-ref")) / "bin" / "qmail-local"
OURS = Path(sys.executable).parent / "qmail-local"

pytestmark = pytest.mark.skipif(
    os.environ.get("PYQMAIL_COMPAT") != "1" or not REF.exists(),
    reason="compat tests run only with PYQMAIL_COMPAT=1 and the reference qmail built",
)

MSG = b"Received: x\nDelivered-To: other@x\nSubject: t\n\nFrom x\n>From y\nbody\nlast"

_DUMP = '|tr "\\0" "\\n" < /proc/$$/environ | grep -v -e ^UFLINE= -e ^HOME= | sort > env\n'

CASES: list[tuple[str, str, dict[str, str], dict[str, object]]] = [
    ("ext", "-", {".qmail-ext": "./Maildir/\n./mbox\n"}, {}),
    ("ext", "-", {".qmail-default": '|echo "$LOCAL|$EXT|$EXT2|$DEFAULT|$HOST2|$HOST3"\n'}, {}),
    ("ext", "-", {".qmail-default": '|echo "$NEWSENDER|$RECIPIENT|$USER|$HOME|$HOST4"\n'}, {}),
    ("a-b-c", "-", {".qmail-a-default": '|echo "$DEFAULT"; env | grep -c ^DEFAULT\n'}, {}),
    ("ext", "-", {".qmail-ext": "|exit 99\n./Maildir/\n"}, {}),
    ("ext", "-", {".qmail-ext": "|echo x; exit 64\n"}, {}),
    ("ext", "-", {".qmail-ext": "|exit 3\n"}, {}),
    ("ext", "-", {".qmail-ext": "./Maildir/\n+list\n./mbox\n"}, {}),
    ("ext", "-", {".qmail-ext": "\n./Maildir/\n"}, {}),
    ("ext", "-", {".qmail-ext": "#c\n\n./Maildir/   \n"}, {}),
    ("ext", "-", {".qmail-ext": "./nope/\n"}, {}),
    ("ext", "-", {".qmail-ext": "./nodir/mb\n"}, {}),
    ("Ext.X", "-", {".qmail-ext:x": "|echo $EXT\n"}, {}),
    ("ext", "-", {".qmail-ext": "|echo $NEWSENDER\n", ".qmail-ext-owner": "x\n"}, {}),
    ("ext", "-", {".qmail-ext": "|echo $NEWSENDER\n", ".qmail-ext-owner": "x\n",
                  ".qmail-ext-owner-default": "x\n"}, {}),
    ("", "", {}, {}),
    ("", "", {".qmail": ""}, {}),
    ("nomatch", "-", {}, {}),
    ("ext", "-", {".qmail-ext": "./Maildir/\n"}, {"xbit": True}),
    ("ext", "-", {".qmail-ext": "|true\n"}, {"xbit": True}),
    ("ext", "-", {".qmail-ext": "./Maildir/\n"}, {"sticky": True}),
    ("ext", "-", {".qmail-ext": "./Maildir/\n"}, {"homemode": 0o757}),
    ("ext", "-", {".qmail-ext": "./Maildir/\n"}, {"qmode": 0o666}),
    ("ext", "-", {".qmail-ext": "./Maildir/\n"}, {"loop": True}),
    ("ext", "-", {".qmail-ext": "|cat; echo; echo $UFLINE$RPLINE$DTLINE\n"}, {"sender": "a b@x"}),
    ("ext", "-", {".qmail-ext": "./mbox\n"}, {"sender": ""}),
    ("ext", "-", {".qmail-ext": "|echo $SENDER $NEWSENDER\n", ".qmail-ext-owner": "x\n"},
     {"sender": "#@[]"}),
    ("ext", "-", {".qmail-ext": "./Maildir/\n"}, {"dry": True}),
    ("ext", "-", {".qmail-ext": "|cat\n&a@b\nc\n./mb\n"}, {"dry": True, "sticky": True}),
    ("", "", {}, {"dd": ""}),
    # the exact environment a program gets: what qmail-local was given (DEFAULT too,
    # when no default file matched) plus its own variables; no LC_CTYPE from Python
    ("ext", "-", {".qmail-ext": _DUMP}, {"env": {"DEFAULT": "given", "FOO": "a=b"}}),
    ("d-Y", "-", {".qmail-d-default": _DUMP}, {"env": {"DEFAULT": "given"}}),
]  # fmt: skip

_DATE = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d \d{4}")


def _norm(data: bytes) -> bytes:
    return _DATE.sub(b"DATE", re.sub(rb"qp \d+", b"qp N", data))


def _snapshot(home: Path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for root, _dirs, files in os.walk(home):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, home)
            if rel.startswith(".qmail"):
                continue
            key = re.sub(r"/(new|tmp)/.*", r"/\1/*", rel)
            out.setdefault(key, []).append(_norm(Path(p).read_bytes()))
    return {k: sorted(v) for k, v in out.items()}


def _run(prog: Path, base: Path, case: tuple[str, str, dict[str, str], dict[str, object]]):  # type: ignore[no-untyped-def]
    ext, dash, files, opt = case
    home = base / "home"
    for sub in ("new", "cur", "tmp"):
        (home / "Maildir" / sub).mkdir(parents=True)
    mode = int(opt.get("homemode", 0o755))  # type: ignore[call-overload]
    home.chmod(mode | (0o1000 if opt.get("sticky") else 0))
    for name, text in files.items():
        (home / name).write_text(text)
        (home / name).chmod(int(opt.get("qmode", 0o744 if opt.get("xbit") else 0o644)))  # type: ignore[call-overload]
    local = "u" + (dash + ext if dash else "")
    msg = MSG
    if opt.get("loop"):
        msg = b"Delivered-To: " + local.encode() + b"@mx.sub.ex.com\n" + MSG
    (base / "m").write_bytes(msg)
    argv = [str(prog)] + (["-n"] if opt.get("dry") else []) + ["--", "u", str(home), local, dash]
    argv += [
        ext,
        "mx.sub.ex.com",
        str(opt.get("sender", "s@x.com")),
        str(opt.get("dd", "./Maildir/\n")),
    ]
    with open(base / "m", "rb") as m:
        r = subprocess.run(
            argv, stdin=m, capture_output=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "QMAILQUEUE": "/bin/true", **opt.get("env", {})},  # type: ignore[dict-item]
        )  # fmt: skip
    here = str(base).encode()
    out, err = (_norm(x).replace(here, b"BASE") for x in (r.stdout, r.stderr))
    return r.returncode, out, err, _snapshot(home)


def test_usage_errors_exit_100() -> None:
    for args in (["a", "b"], ["-x", "u", "/h", "l", "", "", "d", "s", "x"],
                 ["u", "relative", "l", "", "", "d", "s", "x"]):  # fmt: skip
        ours, ref = (
            subprocess.run([str(p), *args], capture_output=True, timeout=60, env={})
            for p in (OURS, REF)
        )
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            ref.returncode,
            ref.stdout,
            ref.stderr,
        )
        assert ours.returncode == 100


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_same_as_notqmail(
    tmp_path: Path, case: tuple[str, str, dict[str, str], dict[str, object]]
) -> None:
    (tmp_path / "ref").mkdir()
    (tmp_path / "ours").mkdir()
    assert _run(OURS, tmp_path / "ours", case) == _run(REF, tmp_path / "ref", case)
