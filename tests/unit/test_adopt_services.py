"""Reading qmail run scripts: tcpserver's flags, rblsmtpd, envdir, softlimit, qmail-start."""

from __future__ import annotations

import pwd
from pathlib import Path

from pyqmail.adopt.services import Service, read_service


def _svc(tmp_path: Path, text: str, name: str = "run") -> Service:
    p = tmp_path / name
    p.write_text(text)
    return read_service(p)


def test_acceptance_style_smtpd(tmp_path: Path) -> None:
    svc = _svc(
        tmp_path,
        "#!/bin/sh\nexec /usr/bin/softlimit -m 20000000 \\\n"
        "  /usr/bin/tcpserver -v -R -l old.example -c 30 -x /etc/tcp.smtp.cdb -u 994 "
        "-g 995 0 25 \\\n  /usr/bin/rblsmtpd -r bl.test /var/qmail/bin/qmail-smtpd 2>&1\n",
    )
    assert svc.error is None and svc.kind == "smtpd"
    assert svc.softlimit == {"m": "20000000"}
    assert svc.tcp is not None
    assert (svc.tcp.host, svc.tcp.port, svc.tcp.rules) == ("0", "25", "/etc/tcp.smtp.cdb")
    assert svc.tcp.options == {
        "l": "old.example",
        "c": "30",
        "x": "/etc/tcp.smtp.cdb",
        "u": "994",
        "g": "995",
    }
    assert svc.tcp.flags == {"v", "R"}
    assert svc.rbl == ["-r", "bl.test"]
    assert svc.program == "/var/qmail/bin/qmail-smtpd" and svc.args == []
    assert svc.chain == ["exec", "softlimit", "tcpserver", "rblsmtpd", "qmail-smtpd"]


def test_lwq_script_resolves_read_only_substitutions(tmp_path: Path) -> None:
    ctl = tmp_path / "control"
    ctl.mkdir()
    (ctl / "concurrencyincoming").write_text("42\n")
    (ctl / "me").write_text("mx.example\nignored\n")
    svc = _svc(
        tmp_path,
        f"""#!/bin/sh
QMAILDUID=`id -u root`
NOFILESGID=`id -g root`
MAXSMTPD=`cat {ctl}/concurrencyincoming`
LOCAL=`head -1 {ctl}/me`
if [ -z "$QMAILDUID" ]; then exit 1; fi
exec /usr/local/bin/softlimit -m 2000000 \\
    /usr/local/bin/tcpserver -v -R -l "$LOCAL" -x /etc/tcp.smtp.cdb -c "$MAXSMTPD" \\
        -u "$QMAILDUID" -g "$NOFILESGID" 0 smtp /var/qmail/bin/qmail-smtpd \\
        mx.example /bin/checkpassword /bin/true 2>&1
""",
    )
    assert svc.tcp is not None
    root = pwd.getpwnam("root")
    assert svc.tcp.options["c"] == "42" and svc.tcp.options["l"] == "mx.example"
    assert svc.tcp.options["u"] == str(root.pw_uid) and svc.tcp.options["g"] == str(root.pw_gid)
    assert svc.tcp.port == "smtp"
    assert svc.checkpassword == "/bin/checkpassword"
    assert svc.unresolved == []


def test_unknown_substitution_is_named_not_run(tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    svc = _svc(tmp_path, f"X=`touch {flag}; echo 5`\nexec tcpserver -c $X 0 25 qmail-smtpd\n")
    assert not flag.exists()
    assert any("touch" in u for u in svc.unresolved)
    assert svc.tcp is not None and svc.tcp.options["c"] == "${X}"


def test_envdir_and_env_set_qmailqueue(tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.mkdir()
    (env / "QMAILQUEUE").write_text("/usr/local/bin/qmail-scanner-queue\nignored\n")
    (env / "GONE").write_text("")
    svc = _svc(
        tmp_path,
        "exec envdir ./env env DATABYTES=100 setuidgid qmaild "
        "tcpserver -H 127.0.0.1 2525 qmail-smtpd\n",
    )
    assert svc.env == {"QMAILQUEUE": "/usr/local/bin/qmail-scanner-queue", "DATABYTES": "100"}
    assert svc.user == "qmaild"
    assert svc.tcp is not None and svc.tcp.flags == {"H"}


def test_rc_gives_the_default_delivery_and_logger(tmp_path: Path) -> None:
    svc = _svc(
        tmp_path,
        '#!/bin/sh\nexec env - PATH="/var/qmail/bin:$PATH" \\\n'
        "qmail-start ./Maildir/ splogger qmail\n",
        "rc",
    )
    assert svc.kind == "send"
    assert svc.defaultdelivery == "./Maildir/" and svc.logger == ["splogger", "qmail"]
    assert svc.env_cleared


def test_rc_reading_control_defaultdelivery(tmp_path: Path) -> None:
    svc = _svc(
        tmp_path,
        'exec env - PATH="/var/qmail/bin:$PATH" qmail-start '
        '"`cat /nonexistent/control/defaultdelivery`" multilog t ./log\n',
        "rc",
    )
    assert svc.kind == "send" and svc.defaultdelivery is None
    assert svc.defaultdelivery_text == "`cat /nonexistent/control/defaultdelivery`"


def test_qmail_start_without_argument_is_mailbox(tmp_path: Path) -> None:
    assert _svc(tmp_path, "exec qmail-start\n", "rc").defaultdelivery == "./Mailbox"


def test_send_run_that_execs_rc_and_a_logger(tmp_path: Path) -> None:
    assert _svc(tmp_path, "#!/bin/sh\nexec /var/qmail/rc\n").kind == "send"
    log = _svc(tmp_path, "exec setuidgid qmaill multilog t /var/log/qmail\n")
    assert log.kind == "log" and log.user == "qmaill"


def test_qmqpd_and_unknown_and_broken(tmp_path: Path) -> None:
    q = _svc(tmp_path, "exec tcpserver -x /etc/tcp.qmqp.cdb 0 628 /var/qmail/bin/qmail-qmqpd\n")
    assert q.kind == "qmqpd" and q.tcp is not None and q.tcp.port == "628"
    assert _svc(tmp_path, "exec /usr/sbin/dovecot -F\n").kind == "unknown"
    assert _svc(tmp_path, "exec tcpserver 'oops\n").error is not None
    assert _svc(tmp_path, "# nothing\n").error == "no command found"


def test_runit_chpst_and_tcpsvd(tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.mkdir()
    (env / "QMAILQUEUE").write_text("/usr/bin/filter\n")
    svc = _svc(
        tmp_path,
        "#!/bin/sh\nexec 2>&1\nexec chpst -e ./env -m 30000000 -U qmaild "
        "tcpsvd -vllocalhost -x /etc/tcp.smtp.cdb -c 20 -u qmaild:nofiles 0 25 "
        "qmail-smtpd\n",
    )
    assert svc.kind == "smtpd" and svc.env == {"QMAILQUEUE": "/usr/bin/filter"}
    assert svc.softlimit == {"m": "30000000"} and svc.user == "qmaild"
    assert svc.tcp is not None and svc.tcp.rules == "/etc/tcp.smtp.cdb"
    assert svc.tcp.options["c"] == "20" and svc.tcp.options["l"] == "localhost"
    assert (svc.tcp.host, svc.tcp.port) == ("0", "25")
