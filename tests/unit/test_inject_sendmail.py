"""sendmail's options -> the qmail-inject call (inject.md section 2)."""

from __future__ import annotations

import pytest

from pyqmail.inject.sendmail import SMTP_ENV, UsageError, plan

NAMES = ["QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"]


@pytest.mark.parametrize(
    ("argv", "args"),
    [
        (["a@b.c"], ["-a", "--", "a@b.c"]),
        (["-t"], ["-H", "--"]),
        (["-t", "-i"], ["-H", "--"]),  # PHP's mail()
        (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], ["-a", "--", "root"]),  # cron
        (["-i", "-odb", "-oi", "-v", "-x", "-m", "-E", "-J", "-ep", "-p", "x", "u"],
         ["-a", "--", "u"]),
        (["-bm", "u"], ["-a", "--", "u"]),
        (["-i", "--", "-weird"], ["-a", "--", "-weird"]),
        (["-f", "bob@x.y", "-t"], ["-H", "-f", "bob@x.y", "--"]),
        (["-fbob@x.y", "u", "-t"], ["-a", "-f", "bob@x.y", "--", "u", "-t"]),
        ([], ["-a", "--"]),
    ],
)  # fmt: skip
def test_inject_plans(argv: list[str], args: list[str]) -> None:
    p = plan(argv, {})
    assert p.action == "inject"
    assert p.args == args


def test_f_sets_the_from_user_and_host() -> None:
    p = plan(["-F", "Bob B", "-f", "bob@x.y", "u"], {})
    assert p.setenv == {"QMAILUSER": "bob", "QMAILHOST": "x.y"}
    assert p.unsetenv == NAMES


def test_f_without_host_and_F_alone() -> None:
    assert plan(["-fbob", "u"], {}).setenv == {"QMAILUSER": "bob"}
    p = plan(["-FAlice A", "u"], {})
    assert p.setenv == {"MAILNAME": "Alice A"} and p.unsetenv == []


def test_bs_sets_the_local_client_environment_unless_proto_set() -> None:
    assert plan(["-bs"], {}).action == "smtp"
    assert plan(["-bs"], {}).setenv == SMTP_ENV
    assert plan(["-bs"], {"PROTO": "TCP"}).setenv == {}


def test_bp_and_mailq() -> None:
    assert plan(["-bp"], {}).action == "qread"
    assert plan([], {}, "/usr/bin/mailq").action == "qread"


@pytest.mark.parametrize("argv", [["-q"], ["-bq"], ["-bd"], ["-N", "x"], ["-f"], ["-o"]])
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        plan(argv, {})


def test_newaliases() -> None:
    with pytest.raises(UsageError, match="fastforward"):
        plan([], {}, "newaliases")
