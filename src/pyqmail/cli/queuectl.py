"""``pyqmail queue``: the queue manager (send/admin.py); ``qmail-queue`` keeps cli/queue.py.

    pyqmail queue list [FILTERS] [--json]
    pyqmail queue show ID [--json]
    pyqmail queue hold|release|retry ID...|FILTERS [--yes]
    pyqmail queue delete [--bounce REASON] ID...|FILTERS [--yes]

FILTERS: --sender ADDR, --rcpt ADDR, --domain DOMAIN, --older-than AGE (s, m, h, d),
--state queued|deferred|held|done. An action on more than one message asks for a 'y'
on stdin first, unless --yes. Exit 0 when every action was done, 1 otherwise, 111 when
the queue cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from pyqmail.cli.common import printable, split_home_args
from pyqmail.qdate import date822_gmt
from pyqmail.send import admin
from pyqmail.send.admin import AdminError, Filter, MessageState

PROG = "pyqmail queue"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _age(text: str) -> float:
    unit = _UNITS.get(text[-1:].lower())
    try:
        return float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (e.g. 90s, 30m, 2h, 3d)") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="list and change queued messages")
    sub = p.add_subparsers(dest="cmd", required=True)

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--sender", help="envelope sender (exact, any case)")
        sp.add_argument("--rcpt", help="a recipient (exact, any case)")
        sp.add_argument("--domain", help="a pending recipient's domain")
        sp.add_argument("--older-than", type=_age, metavar="AGE", help="e.g. 90s, 30m, 2h, 3d")
        sp.add_argument("--state", choices=admin.STATES)

    ls = sub.add_parser("list", help="list queued messages")
    filters(ls)
    ls.add_argument("--json", action="store_true", help="a JSON list of messages")
    sh = sub.add_parser("show", help="one message: envelope, header, each recipient's state")
    sh.add_argument("id", type=int)
    sh.add_argument("--json", action="store_true")
    for op in admin.ACTIONS:
        sp = sub.add_parser(op, help=f"{op} messages by ID or by filter")
        sp.add_argument("ids", nargs="*", type=int, metavar="ID")
        filters(sp)
        sp.add_argument("--yes", action="store_true", help="no confirmation for many messages")
        if op == "delete":
            sp.add_argument("--bounce", metavar="REASON", help="bounce to the sender first")
    return p


def _when(t: float | None) -> str:
    return "unknown" if t is None else date822_gmt(t)


def _table(msgs: Sequence[MessageState]) -> str:
    lines = [f"{'ID':>10}  {'AGE':>6}  {'SIZE':>8}  SENDER / RECIPIENTS"]
    now = time.time()
    for m in msgs:
        age = int(now - m.birth)
        shown = (
            f"{age // 86400}d"
            if age >= 86400
            else f"{age // 3600}h"
            if age >= 3600
            else f"{age // 60}m"
        )
        flag = "  (held)" if m.held else "  (bouncing)" if m.bouncing else ""
        lines.append(f"{m.id:>10}  {shown:>6}  {m.size:>8}  <{m.sender}>{flag}")
        for r in m.recipients:
            lines.append(f"{'':>30}{r.state:9s}{r.channel:7s}<{r.address}>")
    return printable("\n".join(lines)) + "\n"


def _show(m: MessageState) -> str:
    out = [
        f"message {m.id}",
        f"  queued: {date822_gmt(m.birth)}",
        f"  size: {m.size}",
        f"  sender: <{m.sender}>",
        f"  held: {'yes' if m.held else 'no'}",
        f"  bouncing: {'yes' if m.bouncing else 'no'}",
        "recipients:",
    ]
    for r in m.recipients:
        out.append(f"  <{r.address}> {r.channel} {r.state}")
        out.append(f"    tries: {'unknown' if r.tries is None else r.tries}")
        err = (
            r.last_error if r.last_error is not None else ("unknown" if r.tries is None else "none")
        )
        out.append("    last error: " + "\n      ".join(err.splitlines()))
        if r.state != "done":
            out.append(f"    next retry: {_when(r.next_retry)}")
    out.append("header:")
    out += ["  " + line for line in (m.headers or "").splitlines()]
    return "\n".join(printable(line) for line in out) + "\n"


def _filter(a: argparse.Namespace) -> Filter:
    return Filter(a.sender, a.rcpt, a.domain, a.older_than, a.state)


def _confirm(msgs: Sequence[MessageState], op: str) -> bool:
    print(f"{op} {len(msgs)} messages: {' '.join(str(m.id) for m in msgs)}", file=sys.stderr)
    print("proceed? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def _run(backend: admin.Backend, a: argparse.Namespace) -> int:
    if a.cmd == "list":
        f = _filter(a)
        now = time.time()
        msgs = [m for m in backend.states(None) if f.matches(m, now)]
        if a.json:
            print(json.dumps([m.to_json() for m in msgs], indent=1))
        else:
            sys.stdout.write(_table(msgs))
        return 0
    if a.cmd == "show":
        m = backend.show(a.id)
        print(json.dumps(m.to_json(), indent=1) if a.json else _show(m), end="\n" if a.json else "")
        return 0
    f = _filter(a)
    if a.ids and not f.empty():
        raise AdminError("give IDs or filters, not both")
    if not a.ids and f.empty():
        raise AdminError(f"{a.cmd}: give message IDs or a filter")
    if a.ids:
        ids = list(dict.fromkeys(a.ids))
        targets = ids
        if len(ids) > 1 and not a.yes and not _confirm(backend.states(ids), a.cmd):
            print(f"{PROG}: not confirmed; nothing done", file=sys.stderr)
            return 1
    else:
        now = time.time()
        msgs = [m for m in backend.states(None) if f.matches(m, now)]
        if a.cmd == "retry":  # a held message stays held: a bulk retry passes it by
            for m in msgs:
                if m.held:
                    print(f"{m.id}: skipped: held")
            msgs = [m for m in msgs if not m.held]
        if not msgs:
            print("no message matches")
            return 0
        if len(msgs) > 1 and not a.yes and not _confirm(msgs, a.cmd):
            print(f"{PROG}: not confirmed; nothing done", file=sys.stderr)
            return 1
        targets = [m.id for m in msgs]
    reason = getattr(a, "bounce", None)
    rc = 0
    for r in backend.act(a.cmd, targets, reason):
        print(f"{r.id}: {r.text}" if r.ok else f"{r.id}: not done: {r.text}")
        rc = rc if r.ok else 1
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    home, rest = split_home_args(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(rest)
    try:
        backend = admin.connect(home)
    except (AdminError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 111
    try:
        return _run(backend, a)
    except AdminError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 111
    finally:
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
