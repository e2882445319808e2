"""Every reply the SMTP server sends, in one table.

The texts are qmail-smtpd's (smtpd.md sections 3 and 5) byte for byte wherever qmail has
the reply; the replies for pyqmail's stricter rules (smtpd.md, last section) follow qmail's
style: a short lower-case sentence and an enhanced status code in ``(#x.y.z)``. Each
constant is a whole reply line including CRLF, so the protocol core only concatenates.
Replies that carry a variable part are built by the small functions at the end.
"""

from __future__ import annotations

from pyqmail.mailbox import Refusal

CRLF = b"\r\n"

# qmail-smtpd's own replies (smtpd.md section 3).
OK = b"250 ok\r\n"
FLUSHED = b"250 flushed\r\n"
MAIL_FIRST = b"503 MAIL first (#5.5.1)\r\n"
RCPT_FIRST = b"503 RCPT first (#5.5.1)\r\n"
SYNTAX = b"555 syntax error (#5.5.4)\r\n"
BMF = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
NOT_RCPTHOSTS = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
GO_AHEAD = b"354 go ahead\r\n"
QQT_FAILURE = b"451 qqt failure (#4.3.0)\r\n"
VRFY = b"252 send some mail, i'll try my best\r\n"
HELP = b"214 notqmail home page: https://notqmail.org\r\n"
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
BARE_LF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
TOO_MANY_HOPS = b"554 too many hops, this message is looping (#5.4.6)\r\n"
TOO_BIG = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"

# pyqmail's stricter rules (smtpd.md, "Where pyqmail is stricter than qmail").
BARE_CR = b"451 See https://cr.yp.to/docs/smtplf.html. (bare CR in data) (#5.6.2)\r\n"
LINE_TOO_LONG = b"500 sorry, that command line is too long (#5.5.2)\r\n"
TEXT_TOO_LONG = b"554 sorry, a line in your message is longer than 1000 octets (#5.6.0)\r\n"
LONG_LINE_CLOSE = b"421 sorry, that line is far too long, closing connection (#4.7.0)\r\n"
BAD_BYTES = b"501 sorry, control characters are not allowed in commands (#5.5.2)\r\n"
EIGHTBIT_ADDRESS = b"553 sorry, 8-bit addresses need the SMTPUTF8 parameter of MAIL (#5.6.7)\r\n"
EMPTY_RCPT = b"553 sorry, an empty recipient address is not allowed (#5.1.3)\r\n"
BAD_PARAM = b"555 sorry, unsupported MAIL/RCPT parameter (#5.5.4)\r\n"
BAD_SIZE = b"501 sorry, the SIZE parameter is not a number (#5.5.4)\r\n"
BINARYMIME = b"555 sorry, BODY=BINARYMIME needs CHUNKING, which is not offered (#5.6.1)\r\n"
SIZE_TOO_BIG = TOO_BIG
TOO_MANY_RCPTS = b"452 sorry, too many recipients (#4.5.3)\r\n"
TOO_MANY_ERRORS = b"421 sorry, too many errors, closing connection (#4.7.0)\r\n"
EARLY_TALKER = b"554 sorry, you talked before my greeting (#5.5.1)\r\n"
NOT_SMTP = b"554 sorry, this is an SMTP server, not HTTP (#5.5.1)\r\n"
TLS_HELLO = b"554 sorry, TLS without STARTTLS is not offered here (#5.5.1)\r\n"
NO_CHUNKING = b"554 sorry, BDAT is not offered here, closing connection (#5.5.1)\r\n"
NO_AUTH = b"503 sorry, AUTH is not offered here (#5.7.0)\r\n"
# AUTH (RFC 4954 section 6 for the codes; RFC 3463/5248 enhanced codes)
AUTH_NEEDS_TLS = b"538 5.7.11 sorry, AUTH needs TLS: STARTTLS first (#5.7.11)\r\n"
AUTH_AGAIN = b"503 5.5.1 sorry, you are already authenticated (#5.5.1)\r\n"
AUTH_EHLO_FIRST = b"503 5.5.1 sorry, EHLO first (#5.5.1)\r\n"
AUTH_IN_MAIL = b"503 5.5.1 sorry, AUTH is not allowed inside a mail transaction (#5.5.1)\r\n"
AUTH_SYNTAX = b"501 5.5.4 sorry, that is not AUTH MECHANISM [RESPONSE] (#5.5.4)\r\n"
AUTH_MECHANISM = b"504 5.5.4 sorry, only AUTH PLAIN and LOGIN are offered (#5.5.4)\r\n"
AUTH_PLAIN_GO = b"334 \r\n"
AUTH_USER = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
AUTH_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
AUTH_CANCELLED = b"501 5.0.0 AUTH cancelled (#5.0.0)\r\n"
AUTH_BASE64 = b"501 5.5.2 sorry, that AUTH response is not valid base64 or SASL (#5.5.2)\r\n"
AUTH_AUTHZ = b"535 5.7.8 sorry, you may only authorize as yourself (#5.7.8)\r\n"
AUTH_OK = b"235 2.7.0 authentication successful (#2.7.0)\r\n"
AUTH_FAILED = b"535 5.7.8 sorry, authentication credentials invalid (#5.7.8)\r\n"
AUTH_TEMP = b"454 4.7.0 sorry, temporary authentication failure (#4.7.0)\r\n"
AUTH_BLOCKED = b"421 4.7.0 sorry, too many failed AUTH attempts, closing connection (#4.7.0)\r\n"
AUTH_SENDER = b"553 5.7.1 sorry, you may not send as that address (#5.7.1)\r\n"
AUTH_REQUIRED = b"530 5.7.0 sorry, authentication required: AUTH first (#5.7.0)\r\n"
# STARTTLS (RFC 3207 section 4; the codes Postfix uses): 220 then the handshake; 501 for an
# argument; 503 inside TLS or inside a mail transaction; 454 when a certificate is
# configured but cannot be used; 502 (qmail's "unimplemented") when none is configured.
TLS_GO = b"220 ready to start TLS (#2.0.0)\r\n"
TLS_SYNTAX = b"501 sorry, STARTTLS takes no argument (#5.5.4)\r\n"
TLS_ACTIVE = b"503 sorry, TLS is already active (#5.5.1)\r\n"
TLS_IN_MAIL = b"503 sorry, STARTTLS is not allowed inside a mail transaction (#5.5.1)\r\n"
TLS_UNAVAILABLE = b"454 TLS not available due to temporary reason (#4.7.0)\r\n"
TEMP_ERROR = b"451 sorry, an unexpected local error occurred, closing connection (#4.3.0)\r\n"
TOO_MANY_CONNS = b"421 sorry, too many connections, try again later (#4.3.2)\r\n"
# SIGTERM: the server stops (RFC 5321 section 3.8: 421 to what comes next, then close)
SHUTTING_DOWN = b"421 shutting down, try again later (#4.3.2)\r\n"
# the front door: rblsmtpd's conversation with a listed client (smtp/rbl.py), greylisting
RBL_GREETING = b"220 rblsmtpd.local\r\n"
RBL_OK = b"250 rblsmtpd.local\r\n"
RBL_QUIT = b"221 rblsmtpd.local\r\n"
GREYLISTED = b"451 4.7.1 greylisted, please try again later (#4.7.1)\r\n"

# An address that is not an RFC 5321 mailbox (pyqmail.mailbox): 553, RFC 5321's code for
# "mailbox syntax incorrect", except a bad source route (501, a syntax error); the
# enhanced code is 5.1.7 for the sender and 5.1.3 for a recipient (RFC 3463).
_MAILBOX: dict[Refusal, bytes] = {
    Refusal.SYNTAX: b"553 sorry, that address is not an RFC 5321 mailbox",
    Refusal.ROUTE: b"501 sorry, that source route is not valid",
    Refusal.NO_DOMAIN: b"553 sorry, an address needs a domain (only postmaster may go without)",
    Refusal.EMPTY_LOCAL: b"553 sorry, an address needs a local part",
    Refusal.DOMAIN_TOO_LONG: b"553 sorry, that domain is longer than the DNS allows",
}
FUNCTION_DEFINITION = b"553 sorry, that address looks like a shell function definition (#5.7.1)\r\n"


def greeting(smtpgreeting: str) -> bytes:
    """``220 <smtpgreeting> ESMTP``."""
    return b"220 " + _text(smtpgreeting) + b" ESMTP\r\n"


def helo(smtpgreeting: str) -> bytes:
    """``250 <smtpgreeting>``."""
    return b"250 " + _text(smtpgreeting) + CRLF


def ehlo(smtpgreeting: str, databytes: int, *, starttls: bool = False, auth: bool = False) -> bytes:
    """qmail's EHLO lines plus SMTPUTF8 (RFC 6531), STARTTLS when it is offered (never
    inside TLS: RFC 3207 section 4.2), AUTH when offered (inside TLS), and SIZE (``SIZE``
    alone when there is no limit)."""
    size = b"250 SIZE " + str(databytes).encode() if databytes > 0 else b"250 SIZE"
    tls = b"250-STARTTLS\r\n" if starttls else b""
    if auth:
        tls += b"250-AUTH PLAIN LOGIN\r\n"
    return (
        b"250-" + _text(smtpgreeting) + b"\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n" + tls + size + CRLF
    )


def quit_(smtpgreeting: str) -> bytes:
    """``221 <smtpgreeting>``."""
    return b"221 " + _text(smtpgreeting) + CRLF


def accepted(when: int, qp: int) -> bytes:
    """``250 ok <unixtime> qp <qp>``: log analysers parse this exact shape."""
    return b"250 ok %d qp %d\r\n" % (when, qp)


def bad_mailbox(why: Refusal, *, sender: bool) -> bytes:
    """The reply refusing a MAIL or RCPT address for ``why``."""
    if why is Refusal.EIGHT_BIT:
        return EIGHTBIT_ADDRESS
    if why is Refusal.FUNCTION:
        return FUNCTION_DEFINITION
    return _MAILBOX[why] + (b" (#5.1.7)\r\n" if sender else b" (#5.1.3)\r\n")


def _text(s: str) -> bytes:
    # Control files are decoded with surrogateescape; put their bytes back as they were,
    # but never let a CR or LF from a control file split a reply.
    return s.encode("utf-8", "surrogateescape").replace(b"\r", b" ").replace(b"\n", b" ")
