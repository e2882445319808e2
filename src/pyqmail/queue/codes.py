"""qmail-queue's exit codes and what a caller says for each (queue.md section 2.1).

The table is qmail.c's ``qmail_close`` translation: a code becomes a class letter
(``D`` permanent, ``Z`` temporary) and the text qmail-smtpd puts after 554/451.
"""

from __future__ import annotations

OK = 0
ADDRESS_TOO_LONG = 11
PERM_REFUSED = 31
NO_MEMORY = 51
TIMEOUT = 52
WRITE_ERROR = 53
READ_ERROR = 54
CONFIG_ERROR = 55
NETWORK_ERROR = 56
HOME_TROUBLE = 61
QUEUE_TROUBLE = 62
PID_TROUBLE = 63
MESS_TROUBLE = 64
INTD_TROUBLE = 65
TODO_TROUBLE = 66
TEMP_REFUSED = 71
CONN_TIMEOUT = 72
CONN_REJECTED = 73
COMM_FAILED = 74
INTERNAL_BUG = 81
CUSTOM_ERROR = 82
FORMAT_ERROR = 91
ADDRESS_TOO_LONG_ALIAS = 115
EXEC_FAILED = 120
CRASHED = -1  # not an exit code: the queue program was killed by a signal

_TEXT: dict[int, tuple[str, str]] = {
    ADDRESS_TOO_LONG: ("D", "envelope address too long for qq (#5.1.3)"),
    ADDRESS_TOO_LONG_ALIAS: ("D", "envelope address too long for qq (#5.1.3)"),
    PERM_REFUSED: ("D", "mail server permanently rejected message (#5.3.0)"),
    NO_MEMORY: ("Z", "qq out of memory (#4.3.0)"),
    TIMEOUT: ("Z", "qq timeout (#4.3.0)"),
    WRITE_ERROR: ("Z", "qq write error or disk full (#4.3.0)"),
    READ_ERROR: ("Z", "qq read error (#4.3.0)"),
    CONFIG_ERROR: ("Z", "qq unable to read configuration (#4.3.0)"),
    NETWORK_ERROR: ("Z", "qq trouble making network connection (#4.3.0)"),
    HOME_TROUBLE: ("Z", "qq trouble in home directory (#4.3.0)"),
    QUEUE_TROUBLE: ("Z", "qq trouble creating files in queue (#4.3.0)"),
    PID_TROUBLE: ("Z", "qq trouble creating files in queue (#4.3.0)"),
    MESS_TROUBLE: ("Z", "qq trouble creating files in queue (#4.3.0)"),
    INTD_TROUBLE: ("Z", "qq trouble creating files in queue (#4.3.0)"),
    TODO_TROUBLE: ("Z", "qq trouble creating files in queue (#4.3.0)"),
    TEMP_REFUSED: ("Z", "mail server temporarily rejected message (#4.3.0)"),
    CONN_TIMEOUT: ("Z", "connection to mail server timed out (#4.4.1)"),
    CONN_REJECTED: ("Z", "connection to mail server rejected (#4.4.1)"),
    COMM_FAILED: ("Z", "communication with mail server failed (#4.4.2)"),
    INTERNAL_BUG: ("Z", "qq internal bug (#4.3.0)"),
    FORMAT_ERROR: ("Z", "qq internal bug (#4.3.0)"),
    EXEC_FAILED: ("Z", "unable to exec qq (#4.3.0)"),
    CRASHED: ("Z", "qq crashed (#4.3.0)"),
}


def qq_result(code: int, custom: str | None = None) -> tuple[str, str]:
    """Exit code -> (``"D"`` or ``"Z"``, qmail's text); ``("K", "ok")`` for 0.

    ``custom`` is the text a replacement program gave on fd 6 with exit 82
    (notqmail): used when it is longer than 2 characters; as qmail.c, a first character
    ``D`` makes it permanent and any other temporary, and the rest is the text.
    """
    if code == OK:
        return ("K", "ok")
    if code == CUSTOM_ERROR and custom is not None and len(custom) > 2:
        return ("D" if custom[0] == "D" else "Z", custom[1:])
    if code in _TEXT:
        return _TEXT[code]
    if 11 <= code <= 40:
        return ("D", "qq permanent problem (#5.3.0)")
    return ("Z", "qq temporary problem (#4.3.0)")


def smtp_reply(code: int, custom: str | None = None) -> bytes:
    """The reply qmail-smtpd gives for a failed queue: ``554 text`` or ``451 text``."""
    cls, text = qq_result(code, custom)
    return (b"554 " if cls == "D" else b"451 ") + text.encode() + b"\r\n"
