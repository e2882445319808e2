"""cdb and tcprules speed against the C tools that do the same job, measured together.

- build: N records into a cdb, ours (``cdb.Writer``, in process) vs tinycdb ``cdb -c``
  (its process start included, a few ms, small next to N=200000);
- compile: a rules file of R lines, our ``tcprules`` command vs Debian's ``tcprules``
  (both as processes, so ours pays the Python start, which is what an operator sees);
- lookup: tcpserver's whole rule search for one client (``tcprules.lookup``: up to 11
  probes) in process, against a single ``Reader.get`` as the floor; this is what the
  SMTP listener pays per connection.

Prints medians over ROUNDS rounds and ours/theirs. Usage:
    python bench/cdb.py [--records N] [--rules R] [--rounds K]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/fsinfo.py

from bench.fsinfo import add_dir_arg, describe

from pyqmail import cdb, tcprules


def _time(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def bench_build(tmp: Path, n: int, rounds: int) -> tuple[float, float | None]:
    items = [(b"key-%d" % i, b"value-%d" % (i * 7)) for i in range(n)]
    text = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v) for k, v in items) + b"\n"
    (tmp / "in.txt").write_bytes(text)

    def ours() -> None:
        with cdb.Writer(tmp / "ours.cdb") as w:
            for k, v in items:
                w.add(k, v)

    tiny = shutil.which("cdb")

    def theirs() -> None:
        with open(tmp / "in.txt", "rb") as f:
            subprocess.run([tiny or "cdb", "-c", str(tmp / "theirs.cdb")], stdin=f, check=True)

    a, b = [], []
    for _ in range(rounds):
        a.append(_time(ours))
        if tiny:
            b.append(_time(theirs))
    if tiny:
        same = (tmp / "ours.cdb").read_bytes() == (tmp / "theirs.cdb").read_bytes()
        print(f"  (build outputs byte-identical: {same})")
    return statistics.median(a), statistics.median(b) if b else None


def bench_compile(tmp: Path, r: int, rounds: int) -> tuple[float, float | None]:
    lines = [f'10.{i // 250 % 256}.{i % 250}.:allow,RELAYCLIENT="",N="{i}"' for i in range(r)]
    (tmp / "rules").write_text("\n".join([*lines, ":allow"]) + "\n")
    ours_cmd = [sys.executable, "-c", "import sys; from pyqmail.cli.tcprules import main; "
                "sys.exit(main(sys.argv[1:]))"]  # fmt: skip
    ref = "/usr/bin/tcprules" if os.access("/usr/bin/tcprules", os.X_OK) else None

    def run(cmd: list[str], name: str) -> None:
        with open(tmp / "rules", "rb") as f:
            subprocess.run([*cmd, str(tmp / f"{name}.cdb"), str(tmp / f"{name}.tmp")], stdin=f,
                           check=True)  # fmt: skip

    a, b = [], []
    for _ in range(rounds):
        a.append(_time(lambda: run(ours_cmd, "ours")))
        if ref:
            b.append(_time(lambda: run([ref], "theirs")))
    if ref:
        same = (tmp / "ours.cdb").read_bytes() == (tmp / "theirs.cdb").read_bytes()
        print(f"  (compile outputs byte-identical: {same})")
    return statistics.median(a), statistics.median(b) if b else None


def bench_lookup(tmp: Path, rounds: int, n: int = 20000) -> tuple[float, float]:
    path = tmp / "ours.cdb"  # the rules cdb compiled above
    a, b = [], []
    with cdb.Reader.open(path) as reader:
        clients = [(f"192.0.2.{i % 250}", f"h{i}.example.net", None) for i in range(n)]
        for _ in range(rounds):
            t = time.perf_counter()
            for ip, host, info in clients:
                tcprules.lookup(reader, ip, host, info)
            a.append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            for ip, _, _ in clients:
                reader.get(ip.encode())
            b.append((time.perf_counter() - t) / n)
    return statistics.median(a), statistics.median(b)


def _cmp(ours: float, theirs: float | None, peer: str) -> str:
    if theirs is None:
        return f"ours {ours * 1000:.0f} ms ({peer} not installed)"
    ratio = ours / theirs
    return f"ours {ours * 1000:.0f} ms, {peer} {theirs * 1000:.0f} ms, ours/theirs {ratio:.1f}x"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200000)
    ap.add_argument("--rules", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    add_dir_arg(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        print(describe(tmp))
        print(f"cpu count {os.cpu_count()}, rounds {args.rounds}, medians")
        ours, theirs = bench_build(tmp, args.records, args.rounds)
        print(f"build {args.records} records: {_cmp(ours, theirs, 'tinycdb')}")
        ours, theirs = bench_compile(tmp, args.rules, args.rounds)
        print(f"tcprules {args.rules} lines: {_cmp(ours, theirs, 'ucspi-tcp')}")
        full, floor = bench_lookup(tmp, args.rounds)
        print(f"lookup (11 probes, miss to default): {full * 1e6:.1f} us/client; one get "
              f"{floor * 1e6:.1f} us; ratio {full / floor:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
