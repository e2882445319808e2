"""qmail-showctl: qmail's layout, order and texts (compared with notqmail 1.09's output
captured in tests/data), the ``(Default.)`` source marks, me fall-backs, unreadable and
unknown files, the morercpthosts.cdb freshness check, and pyqmail's own section."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.showctl import report, safe
from tests.conftest import write_control

DATA = Path(__file__).resolve().parent.parent / "data"

# The control files behind tests/data/showctl-notqmail-1.09.txt (notqmail's output for them).
GOLDEN_FILES: dict[str, bytes] = {
    "badmailfrom": b"a@b.c\n@evil.example\n# c\n",
    "bouncefrom": b"X",
    "bouncehost": b"bh\n",
    "concurrencylocal": b"33\n",
    "concurrencyremote": b"abc\n",
    "databytes": b"5000\n",
    "defaultdomain": b"test.example\n",
    "defaulthost": b"dh\n",
    "doublebouncehost": b"dbh\n",
    "doublebounceto": b"dbt\n",
    "envnoathost": b"en\n",
    "helohost": b"hh\n",
    "idhost": b"ih\n",
    "localiphost": b"lh\n",
    "locals": b"mx.test.example\n",
    "me": b"mx.test.example\n",
    "morercpthosts": b"m1.example\nm2.example\n",
    "percenthack": b"p.example\nq.example\n",
    "plusdomain": b"test.example\n",
    "qmqpservers": b"1.2.3.4\n5.6.7.8\n",
    "queuelifetime": b"-5\n",
    "rcpthosts": b"mx.test.example\n",
    "smtpgreeting": b"Hello\tthere\x01x\n",
    "smtproutes": b":relay.example\n.af.mil:\nx.example:[1.2.3.4]:26\n",
    "timeoutconnect": b"7\n",
    "timeoutremote": b"8\n",
    "timeoutsmtpd": b"0\n",
    "unknownfile": b"x\n",
    "virtualdomains": b"v.example:joe\n:catch\nu@w.example:bob\n",
}


def fill(home: Home, files: dict[str, bytes]) -> None:
    for p in home.control.iterdir():
        p.unlink()
    for name, data in files.items():
        (home.control / name).write_bytes(data)


def qmail_part(text: str) -> list[str]:
    """The lines after the 7-line header, up to pyqmail's own section."""
    lines = text.splitlines()[7:]
    end = lines.index("pyqmail additions (qmail does not read these files):")
    return lines[: end - 2]


def entry(text: str, name: str) -> list[str]:
    """The lines of one entry: from ``name: `` to the next blank line."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(f"{name}: "))
    j = lines.index("", i)
    return lines[i:j]


def test_matches_notqmail_byte_for_byte(home: Home) -> None:
    fill(home, GOLDEN_FILES)
    golden = (DATA / "showctl-notqmail-1.09.txt").read_text().splitlines()
    assert qmail_part(report(home)) == golden


def test_header(home: Home) -> None:
    lines = report(home).splitlines()
    uid, gid = os.getuid(), os.getgid()
    assert lines[:7] == [
        f"qmail home directory: {home.root}.",
        "user-ext delimiter: -.",
        "paternalism (in decimal): 2.",
        "silent concurrency limit: 1000.",
        "subdirectory split: 23.",
        "user ids: " + ", ".join([str(uid)] * 8) + ".",
        f"group ids: {gid}, {gid}.",
    ]
    write_control(home, "spawnlimit", "250\n")
    assert "silent concurrency limit: 250." in report(home).splitlines()


def test_fresh_home_defaults_and_order(home: Home) -> None:
    text = report(home)
    assert entry(text, "queuelifetime") == [
        "queuelifetime: (Default.) Message lifetime in the queue is 604800 seconds."
    ]
    assert entry(text, "concurrencyremote") == [
        "concurrencyremote: (Default.) Remote concurrency is 20."
    ]
    assert entry(text, "bouncehost") == [
        "bouncehost: (Default.) Bounce host name is mx.test.example."
    ]
    assert entry(text, "smtpgreeting") == [
        "smtpgreeting: (Default.) SMTP greeting: 220 mx.test.example."
    ]
    assert entry(text, "rcpthosts") == [
        "rcpthosts: ",
        "SMTP clients may send messages to recipients at mx.test.example.",
    ]
    names = [line.split(":")[0] for line in qmail_part(text) if line and ": " in line]
    names = [n for n in names if not n.startswith(("SMTP", "Messages"))]
    assert names[:5] == ["badmailfrom", "bouncefrom", "bouncehost", "concurrencylocal",
                         "concurrencyremote"]  # fmt: skip
    assert names.index("rcpthosts") < names.index("morercpthosts") < names.index("smtpgreeting")


def test_without_me_shows_literal_defaults(home: Home) -> None:
    fill(home, {})
    text = report(home)
    assert entry(text, "me") == ["me: (Default.) My name is undefined! Uh-oh."]
    assert entry(text, "helohost") == [
        "helohost: (Default.) SMTP client HELO host name is helohost."
    ]
    assert entry(text, "locals") == ["locals: (Default.) Messages for me are delivered locally."]
    assert entry(text, "rcpthosts") == [
        "rcpthosts: (Default.) SMTP clients may send messages to any recipient."
    ]
    assert entry(text, "morercpthosts") == [
        "morercpthosts: (Default.) No rcpthosts; morercpthosts is irrelevant."
    ]


def test_unreadable_and_unknown_files(home: Home) -> None:
    (home.control / "badmailfrom").mkdir()
    (home.control / "rcpthosts").unlink()
    (home.control / "rcpthosts").mkdir()
    write_control(home, "rbllist", "x\n")
    write_control(home, "spawnlimit", "10\n")
    text = report(home)
    assert entry(text, "badmailfrom") == ["badmailfrom: Oops! Trouble reading this file."]
    assert entry(text, "rcpthosts") == ["rcpthosts: Oops! Trouble reading this file."]
    assert entry(text, "rbllist") == ["rbllist: I have no idea what this file does."]
    assert "spawnlimit: I have no idea" not in text
    assert entry(text, "spawnlimit") == [
        "spawnlimit: Upper bound for concurrencylocal and concurrencyremote is 10."
    ]


@pytest.mark.parametrize(
    ("src", "cdb", "text"),
    [
        (False, False, "(Default.) No effect."),
        (True, False, "Oops! morercpthosts exists but morercpthosts.cdb doesn't."),
        (False, True, "Oops! morercpthosts.cdb exists but morercpthosts doesn't."),
        ("newer", True, "Oops! morercpthosts.cdb is older than morercpthosts."),
        ("older", True, "Modified recently enough; hopefully up to date."),
    ],
)
def test_morercpthosts_cdb_freshness(home: Home, src: object, cdb: bool, text: str) -> None:
    c = home.control
    if cdb:
        (c / "morercpthosts.cdb").write_bytes(b"\0" * 2048)
        os.utime(c / "morercpthosts.cdb", (1_600_000_000, 1_600_000_000))
    if src:
        write_control(home, "morercpthosts", "m.example\n")
        t = 1_700_000_000 if src == "newer" else 1_500_000_000
        os.utime(c / "morercpthosts", (t, t))
    assert entry(report(home), "morercpthosts.cdb") == [f"morercpthosts.cdb: {text}"]


def test_morercpthosts_without_rcpthosts(home: Home) -> None:
    (home.control / "rcpthosts").unlink()
    write_control(home, "morercpthosts", "m.example\n")
    assert entry(report(home), "morercpthosts") == [
        "morercpthosts: ",
        "No rcpthosts; doesn't matter that morercpthosts has m.example.",
    ]


def test_pyqmail_section(home: Home) -> None:
    write_control(home, "tcp.smtp", ":allow\n")
    text = report(home)
    assert entry(text, "defaultdelivery") == [
        "defaultdelivery: ",
        "Delivery instruction for users without .qmail: ./Maildir/",
    ]
    assert entry(text, "tcp.smtp")[0].endswith(
        "Oops! tcp.smtp exists but tcp.smtp.cdb doesn't: run tcprules."
    )
    assert entry(text, "tlsdestinations")[0].startswith("tlsdestinations: (Default.) ")
    assert "tcp.smtp: I have no idea" not in text
    assert entry(text, "tcp.qmqp")[0].endswith("(and may relay: QMQP has no recipient check).")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [(b"plain", "plain"), (b"a\tb", "a?b"), (b"\x01\x7f", "??"), ("é".encode(), "??"),
     (b"%~ !", "%~ !")],
)  # fmt: skip
def test_safe(raw: bytes, shown: str) -> None:
    assert safe(raw) == shown


def test_command(home: Home, tmp_path: Path) -> None:
    code = "import sys; from pyqmail.cli.showctl import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "--home", str(home.root)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0
    assert p.stdout == report(home)
    p = subprocess.run([sys.executable, "-c", code, "--home", str(tmp_path / "none")],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 111 and p.stderr.startswith("qmail-showctl: fatal: ")


def test_empty_me_counts_as_present(home: Home) -> None:
    fill(home, {"me": b""})
    text = report(home)
    assert entry(text, "bouncehost") == ["bouncehost: (Default.) Bounce host name is ."]
    assert entry(text, "me") == ["me: My name is ."]


def test_smarthost_files_show_hosts_and_users_never_passwords(home: Home) -> None:
    assert "smtproutesauth" not in report(home)  # shown only when present
    write_control(home, "smtproutesauth", "[10.0.0.1]:u@example.org:pass:word\n")
    write_control(home, "smtproutestls", f"10.0.0.1:sha256:{'ab' * 32}\n")
    text = report(home)
    assert "smtproutesauth: \nAUTH to 10.0.0.1 as u@example.org (password not shown)." in text
    assert "smtproutestls: \nTLS to 10.0.0.1 verified by 1 pinned key(s)." in text
    assert "pass:word" not in text and "I have no idea" not in text
    write_control(home, "smtproutesauth", "10.0.0.1:pass:word-no\n")
    assert "pass:word" not in report(home)
    write_control(home, "smtproutesauth", "broken-secret\n")
    text = report(home)
    assert "Unusable: line 1: not host:user:password" in text and "broken-secret" not in text


def test_srs_shows_the_domain_never_the_secret(home: Home) -> None:
    assert "srs: (Default.) Forwards keep the original envelope sender (no SRS)." in report(home)
    write_control(home, "srs", "very-secret-value-123456\nsrs.test.example\n")
    text = report(home)
    assert "SRS addresses at srs.test.example (the secret is not shown)." in text
    assert "very-secret-value" not in text and "I have no idea" not in text
