"""Bounces in QSBMF (qmail-send Bounce Message Format), byte for byte (send.md 4 and 6).

Owns: the paragraph appended to ``bounce/N`` for each permanent failure, the final
"too long in the queue" sentence of a dying deferral, RFC 822 quoting of the From/To
addresses as qmail's ``quote``/``quote2`` do, who a bounce goes to (sender; for a bounce
that bounced, doublebounceto@doublebouncehost with sender ``#@[]``; for a double bounce,
nobody: triple bounce), and the bounce message itself, produced as chunks so the original
message is streamed, never held. The fixed sentences are qmail-send's own, since bounce
parsers key on them.

Also the bounce's file work, for the scheduler: ``record_failure`` appends a paragraph to
bounce/N (queue/records.py, fsynced: a recorded failure is never lost, and one that
cannot be recorded is not marked done), and ``queue_bounce`` (a worker thread's job)
queues the bounce through the submitter with origin "bounce" and only then removes
bounce/N (queue/clean.py), so a failure anywhere leaves bounce/N to be tried again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyqmail.qdate import date822
from pyqmail.queue import clean, records
from pyqmail.queue.layout import QueuePaths
from pyqmail.send.log import SendLog
from pyqmail.send.todo import bounce_address, decode, encode

if TYPE_CHECKING:
    from pyqmail.queue.contract import BlockingSubmitter

TOO_LONG = "I'm not going to try again; this message has been in the queue too long.\n"
DOUBLE_BOUNCE_SENDER = "#@[]"
_INTRO = (
    ".\nI'm afraid I wasn't able to deliver your message to the following addresses.\n"
    "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
)
_INTRO_DOUBLE = (
    ".\nI tried to deliver a bounce message to this address, but the bounce bounced!\n\n"
)
_BELOW = b"--- Below this line is a copy of the message.\n\n"
_BELOW_DOUBLE = b"--- Below this line is the original bounce.\n\n"
_CHUNK = 65536

# RFC 821/822 characters that need no quoting in a local part (qmail's quote.c table).
_OK = frozenset(
    b"!#$%&'*+-/0123456789=?ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~."
)


def dying_text(text: str) -> str:
    """A deferral's text turned into the final failure's (qmail-send ``del_dochan``)."""
    if text and not text.endswith("\n"):
        text += "\n"
    return text + TOO_LONG


def paragraph(shown_recipient: str, text: str) -> bytes:
    """One ``<rcpt>:`` paragraph for bounce/N: no empty line inside, one after.

    qmail-send's rule, each \\n that directly follows another becomes '/', taken one step
    further so the paragraph also stays whole when the bounce travels by SMTP, where a CR
    alone or a CR LF is a line break too: any line break that directly follows another
    starts with '/' instead (for LF-only texts this is exactly qmail's result, except that
    a text ending in an empty line loses it too).
    """
    head = encode("<" + shown_recipient.replace("\n", "_") + ">:\n")
    body = bytearray(encode(text))
    if body and not body.endswith(b"\n"):
        body += b"\n"
    prev_break = True  # the head line ends with one
    i = 0
    while i < len(body):
        if body[i] in (0x0A, 0x0D):
            if prev_break:
                body[i] = 0x2F  # '/'
                prev_break = False
                i += 1
                continue
            i += 2 if body[i : i + 2] == b"\r\n" else 1
            prev_break = True
        else:
            prev_break = False
            i += 1
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return head + bytes(body) + b"\n"


def _quote_needed(local: bytes) -> bool:
    if not local:
        return True
    if any(b >= 128 or b not in _OK for b in local):
        return True
    return local.startswith(b".") or local.endswith(b".") or b".." in local


def quote(local: bytes) -> bytes:
    """qmail's ``quote``: a local part, in double quotes only if RFC 822 needs it."""
    if not _quote_needed(local):
        return local
    out = bytearray(b'"')
    for b in local:
        if b in b'\r\n"\\':
            out.append(0x5C)
        out.append(b)
    return bytes(out + b'"')


def _one_line(address: str) -> bytes:
    """An address for a header line: CR and LF become '_' (as in the recipient line of a
    paragraph), so a sender holding a newline cannot start a header field of its own."""
    return encode(address).replace(b"\r", b"_").replace(b"\n", b"_")


def quote2(address: bytes) -> bytes:
    """qmail's ``quote2``: quote the part before the last ``@``; empty stays empty."""
    if not address:
        return b""
    at = address.rfind(b"@")
    if at < 0:
        return quote(address)
    return quote(address[:at]) + address[at:]


@dataclass(frozen=True, slots=True)
class BounceEnvelope:
    """Who gets a bounce: ``sender`` (the bounce's own envelope sender) and ``recipient``."""

    sender: str
    recipient: str
    double: bool


def bounce_envelope(original_sender: str, doublebounce_address: str) -> BounceEnvelope | None:
    """The bounce's envelope for a message from ``original_sender``; None = triple bounce."""
    s = bounce_address(original_sender)
    if s == DOUBLE_BOUNCE_SENDER:
        return None
    if s:
        return BounceEnvelope("", s, False)
    return BounceEnvelope(DOUBLE_BOUNCE_SENDER, doublebounce_address, True)


def bounce_head(
    env: BounceEnvelope, bouncefrom: str, bouncehost: str, date: str | None = None
) -> bytes:
    """Date, From, To, Subject, the blank line and the ``Hi. This is ...`` paragraph."""
    return b"".join(
        (
            b"Date: ",
            (date if date is not None else date822()).encode(),
            b"\nFrom: ",
            quote(encode(bouncefrom)),
            b"@",
            encode(bouncehost),
            b"\nTo: ",
            quote2(_one_line(env.recipient)),
            b"\nSubject: failure notice\n\nHi. This is the qmail-send program at ",
            encode(bouncehost),
            (_INTRO_DOUBLE if env.double else _INTRO).encode(),
        )
    )


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def bounce_chunks(
    env: BounceEnvelope,
    original_sender: str,
    bounce_file: Path,
    mess_file: Path,
    *,
    bouncefrom: str,
    bouncehost: str,
    date: str | None = None,
) -> Iterator[bytes]:
    """The whole bounce message as chunks: head, bounce/N's paragraphs, the copy."""
    yield bounce_head(env, bouncefrom, bouncehost, date)
    yield from _file_chunks(bounce_file)
    yield _BELOW_DOUBLE if env.double else _BELOW
    yield b"Return-Path: <" + quote2(_one_line(bounce_address(original_sender))) + b">\n"
    yield from _file_chunks(mess_file)


def record_failure(
    paths: QueuePaths, num: int, shown_recipient: str, text: str, log: SendLog
) -> bool:
    """Append the failure paragraph to bounce/N durably; False (and qmail's alert) if not."""
    try:
        records.append_bounce(paths.name("bounce", num), paragraph(shown_recipient, text))
    except OSError:
        log.alert("unable to append to bounce message; HELP! sleeping...")
        return False
    return True


def queue_bounce(
    paths: QueuePaths,
    num: int,
    submitter: BlockingSubmitter | None,
    log: SendLog,
    *,
    bouncefrom: str,
    bouncehost: str,
    doublebounce: str,
) -> tuple[bool, int | None]:
    """Worker thread: queue the bounce of ``num`` (or drop a triple bounce); unlink bounce/N.

    Returns (done, qp): qp of the queued bounce, None for a triple bounce, -1 if none
    was queued. Warnings are written from here; the caller logs the bounce itself.
    """
    info = paths.name("info", num)
    try:
        sender = decode(records.read_info(info, strict=True))
    except OSError as e:
        log.warning(f"unable to read {info}: {e.strerror}")
        return False, -1
    env = bounce_envelope(sender, doublebounce)
    qp: int | None = None
    if env is not None:
        if submitter is None:
            log.warning("unable to start qmail-queue, will try later")
            return False, -1
        try:
            pending = submitter.begin(origin="bounce")
        except Exception:
            log.warning("unable to start qmail-queue, will try later")
            return False, -1
        try:
            for chunk in bounce_chunks(
                env,
                sender,
                Path(paths.name("bounce", num)),
                Path(paths.name("mess", num)),
                bouncefrom=bouncefrom,
                bouncehost=bouncehost,
            ):
                pending.write(chunk)
        except Exception:
            with contextlib.suppress(Exception):
                pending.abort()
            log.warning("trouble injecting bounce message, will try later")
            return False, -1
        reply = pending.commit_blocking(encode(env.sender), [encode(env.recipient)])
        if not reply.ok:
            log.warning("trouble injecting bounce message, will try later")
            return False, -1
        qp = reply.qp
    try:
        clean.remove_bounce(paths, num)
    except OSError as e:
        log.unlink_warning(e)
        return False, qp
    return True, qp
