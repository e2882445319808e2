# ruff: noqa: E501  (expected outputs are kept as the reference wrote them)
"""qmail-inject's header rewriting and envelope, table-checked against notqmail 1.09.

Each case was run through the reference qmail-inject (``-n`` for the message, and with a
QMAILQUEUE that records the envelope) with USER=robot, QMAILDEFAULTHOST=dh,
QMAILDEFAULTDOMAIN=dd.example, QMAILPLUSDOMAIN=pd.example, QMAILIDHOST=id.example; the
expected texts below are its output with the date, timestamp and pid made placeholders.
The few inputs where pyqmail knowingly differs are in KNOWN_DIFFERENCES (docs/inject.md).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.inject.inject import InjectError, Settings, inject, parse_args
from pyqmail.qdate import date822
from pyqmail.queue.contract import Reply

NOW = 1_700_000_000.0
PID = 4242
BASE_ENV = {
    "USER": "robot",
    "QMAILDEFAULTHOST": "dh",
    "QMAILDEFAULTDOMAIN": "dd.example",
    "QMAILPLUSDOMAIN": "pd.example",
    "QMAILIDHOST": "id.example",
}

# (input, extra env, args, exit code, -n output, envelope as qmail-queue reads it)
CASES = [
    (
        "To: a.b.c\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a.b.c@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta.b.c@dh.dd.example\x00\x00",
    ),
    (
        "To: a . b @ c . d\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a.b@c.d\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta.b@c.d\x00\x00",
    ),
    (
        "To: <@r1,@r2:u@h>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <u@h.dd.example>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@h.dd.example\x00\x00",
    ),
    (
        "To: @r1:u@h\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: @r1:u@h\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@h.dd.example\x00\x00",
    ),
    (
        "To: .u@h\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: .u@h.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00T.u@h.dd.example\x00\x00",
    ),
    (
        "To: g: a, b;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: g: a@dh.dd.example, b@dh.dd.example;\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: g: ;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: g: ;\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "To: u@[1.2.3.4]\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@[1.2.3.4]\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@[1.2.3.4]\x00\x00",
    ),
    (
        "To: u@h.\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@h.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@h.dd.example\x00\x00",
    ),
    (
        "To: <>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <>\n"
        "\n",
        "Frobot@dh.dd.example\x00T\x00\x00",
    ),
    (
        "To: <u@[]>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <u@[]>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@[]\x00\x00",
    ),
    (
        'To: "q" <>\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: "q" <>\n'
        "\n",
        "Frobot@dh.dd.example\x00T\x00\x00",
    ),
    (
        "To: u@h(c1)(c2) , (c3) v\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@h.dd.example (c1) (c2), v@dh.dd.example (c3)\n"
        "\n",
        "Frobot@dh.dd.example\x00Tv@dh.dd.example\x00Tu@h.dd.example\x00\x00",
    ),
    (
        'To: A "B" C <u> (x)\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: A "B" C <u@dh.dd.example>(x)\n'
        "\n",
        "Frobot@dh.dd.example\x00Tu@dh.dd.example\x00\x00",
    ),
    (
        "To: u@@h\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@@h.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@@h.dd.example\x00\x00",
    ),
    (
        "To: <u\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <u@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00T<u@dh.dd.example\x00\x00",
    ),
    (
        'To: "unterminated\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: "unterminated\n'
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "To: u@h+\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@h.pd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@h.pd.example\x00\x00",
    ),
    (
        "To: u@+\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@.pd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@.pd.example\x00\x00",
    ),
    (
        "To: u@\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@dh.dd.example\x00\x00",
    ),
    (
        "To: @\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To:\n"
        "\n",
        "Frobot@dh.dd.example\x00T\x00\x00",
    ),
    (
        "To: ,,a,,\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: , , a@dh.dd.example, ,\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a\n\tb\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example, b@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To:a\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To:\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To:\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "TO :  a\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "TO: a@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: aaaaaaaaaa, bbbbbbbbbbbbbbb, cccccccccccccccccc, dddddddddddddddd, eeeeeeeeeeeeeeeeee, "
        "ffffffffffffffff, gggggggggggggggggggggggg, "
        "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh, i\n"
        "Subject: x\n"
        "\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: aaaaaaaaaa@dh.dd.example, bbbbbbbbbbbbbbb@dh.dd.example,\n"
        "  cccccccccccccccccc@dh.dd.example, dddddddddddddddd@dh.dd.example,\n"
        "  eeeeeeeeeeeeeeeeee@dh.dd.example, ffffffffffffffff@dh.dd.example,\n"
        "  gggggggggggggggggggggggg@dh.dd.example,\n"
        "  hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh@dh.dd.example,\n"
        "  i@dh.dd.example\n"
        "Subject: x\n"
        "\n",
        "Frobot@dh.dd.example\x00Ti@dh.dd.example\x00Thhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh@dh.dd.example\x00Tgggggggggggggggggggggggg@dh.dd.example\x00Tffffffffffffffff@dh.dd.example\x00Teeeeeeeeeeeeeeeeee@dh.dd.example\x00Tdddddddddddddddd@dh.dd.example\x00Tcccccccccccccccccc@dh.dd.example\x00Tbbbbbbbbbbbbbbb@dh.dd.example\x00Taaaaaaaaaa@dh.dd.example\x00\x00",
    ),
    (
        'To: "Very Long Name Here That Goes On" '
        '<aaaaaaaaaaaaaaaaaaaaaa@bbbbbbbbbbbbbbbbbbbbbbbbbb.example>, "Another" <x@y.z>\n'
        "\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: "Very Long Name Here That Goes On" '
        "<aaaaaaaaaaaaaaaaaaaaaa@bbbbbbbbbbbbbbbbbbbbbbbbbb.example>,\n"
        '  "Another" <x@y.z>\n'
        "\n",
        "Frobot@dh.dd.example\x00Tx@y.z\x00Taaaaaaaaaaaaaaaaaaaaaa@bbbbbbbbbbbbbbbbbbbbbbbbbb.example\x00\x00",
    ),
    (
        "Reply-To: u\n"
        "Sender: s\n"
        "Errors-To: e\n"
        "Return-Receipt-To: r\n"
        "Resent-Reply-To: rr\n"
        "X-To: y\n"
        "Apparently-To: ap\n"
        "\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "Resent-Cc: recipient list not shown: ;\n"
        "Reply-To: u@dh.dd.example\n"
        "Sender: s@dh.dd.example\n"
        "Errors-To: e@dh.dd.example\n"
        "Return-Receipt-To: r@dh.dd.example\n"
        "Resent-Reply-To: rr@dh.dd.example\n"
        "X-To: y\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        'Cc: "A B" <a@b.c> (x y)  ,c(d)\nFrom: Joe (the man) <joe@x>\nSender: <@a:b@c>\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'Cc: "A B" <a@b.c>(x y), c@dh.dd.example (d)\n'
        "From: Joe (the man) <joe@x.dd.example>\n"
        "Sender: <b@c.dd.example>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@dh.dd.example\x00Ta@b.c\x00\x00",
    ),
    ('From: "unterm\n\n', {}, [], 100, "", ""),
    ("From: @a:b@c\n\n", {}, [], 100, "", ""),
    (
        "To: J. Smith <x>, a.(c)b @ c\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: J.Smith <x@dh.dd.example>, a.b@c.dd.example (c)\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta.b@c.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "Subject: x\nbad line\nTo: y\n\nbody\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "Subject: x\n"
        "\n"
        "bad line\n"
        "To: y\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "From somebody Mon\nSubject: x\n\nbody\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "MBOX-Line: From somebody Mon\n"
        "Subject: x\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "Subject: x\n\tcont\n: empty\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "Subject: x\n"
        "\tcont\n"
        "\n"
        ": empty\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "Subject: x\nTo: a\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Subject: x\n"
        "To: a@dh.dd.example\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: x\nFrom: keep\n\nx\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "To: x@dh.dd.example\n"
        "From: keep@dh.dd.example\n"
        "\n"
        "x\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: a\nReturn-Path: <rp@x>\n\nx\n",
        {},
        [],
        0,
        "Return-Path: <rp@x.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example\n"
        "\n"
        "x\n",
        "Frp@x.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a\nReturn-Path: <>\n\nx\n",
        {},
        [],
        0,
        "Return-Path: <>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example\n"
        "\n"
        "x\n",
        "F\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a\nResent-To: r1\nResent-Bcc: r2\n\nx\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: a@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "\n"
        "x\n",
        "Frobot@dh.dd.example\x00Tr1@dh.dd.example\x00Tr2@dh.dd.example\x00\x00",
    ),
    (
        "Resent-From: me\nTo: a\n\nx\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-Cc: recipient list not shown: ;\n"
        "Resent-From: me@dh.dd.example\n"
        "To: a@dh.dd.example\n"
        "\n"
        "x\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "Resent-Date: x\nResent-Message-ID: <y>\nResent-Cc: z\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "Resent-Date: x\n"
        "Resent-Message-ID: <y>\n"
        "Resent-Cc: z@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "Date: x\nMessage-ID: <y>\nFrom: z\nTo: w\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: x\n"
        "Message-ID: <y>\n"
        "From: z@dh.dd.example\n"
        "To: w@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tw@dh.dd.example\x00\x00",
    ),
    (
        "To: =?utf-8?q?J=C3=B6rg?= <j@x.y>\nSubject: =?utf-8?b?w6TDtg==?=\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: =?utf-8?q?J=C3=B6rg?= <j@x.y>\n"
        "Subject: =?utf-8?b?w6TDtg==?=\n"
        "\n",
        "Frobot@dh.dd.example\x00Tj@x.y\x00\x00",
    ),
    (
        "To: Jörg <j@x.y>\nSubject: äö\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: "Jörg" <j@x.y>\n'
        "Subject: äö\n"
        "\n",
        "Frobot@dh.dd.example\x00Tj@x.y\x00\x00",
    ),
    (
        "To: a; b\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example;, b@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a <b> c\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a <b@dh.dd.example>, c@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@dh.dd.example\x00Tb@dh.dd.example\x00\x00",
    ),
    (
        "To: <a> <b>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <a@dh.dd.example> <b@dh.dd.example>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a,\n b,\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example, b@dh.dd.example,\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        'To: "x\\"y" <z>\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: "x\\"y" <z@dh.dd.example>\n'
        "\n",
        "Frobot@dh.dd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: (only comment)\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: (only comment)\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "From: a\nFrom: b\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Cc: recipient list not shown: ;\n"
        "From: a@dh.dd.example\n"
        "From: b@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "Return-Path: <a@b.c>\nReturn-Path: <d@e.f>\n\n",
        {},
        [],
        0,
        "Return-Path: <a@b.c>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "\n",
        "Fa@b.c\x00\x00",
    ),
    (
        "To: u@h.x.\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@h.x\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@h.x\x00\x00",
    ),
    (
        "To: u@[]\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: u@[]\n"
        "\n",
        "Frobot@dh.dd.example\x00Tu@[]\x00\x00",
    ),
    (
        "To: joe@silverton\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: joe@silverton.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tjoe@silverton.dd.example\x00\x00",
    ),
    (
        "To: a@b (c) (d), e\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@b.dd.example (c) (d), e@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Te@dh.dd.example\x00Ta@b.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILNAME": "Joe Q Public"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILNAME": "Joe Q Public"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'From: "Joe Q Public" <robot@dh.dd.example>\n'
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILNAME": 'Joe "Q" \\ Public'},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILNAME": 'Joe "Q" \\ Public'},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'From: "Joe \\"Q\\" \\\\ Public" <robot@dh.dd.example>\n'
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILINJECT": "c", "QMAILNAME": "J (Q) P"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILINJECT": "c", "QMAILNAME": "J (Q) P"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example (J \\(Q\\) P)\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"MAILNAME": "M", "NAME": "N"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"MAILNAME": "M", "NAME": "N"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'From: "M" <robot@dh.dd.example>\n'
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"NAME": "N"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"NAME": "N"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'From: "N" <robot@dh.dd.example>\n'
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILHOST": "hh", "QMAILUSER": "a.b"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILHOST": "hh", "QMAILUSER": "a.b"},
        [],
        0,
        "Return-Path: <a.b@hh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: a.b@hh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Fa.b@hh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILUSER": "a b"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILUSER": "a b"},
        [],
        0,
        'Return-Path: <"a b"@dh.dd.example>\n'
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'From: "a b"@dh.dd.example\n'
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Fa b@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILUSER": "a(b"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILUSER": "a(b"},
        [],
        0,
        'Return-Path: <"a(b"@dh.dd.example>\n'
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'From: "a\\(b"@dh.dd.example\n'
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Fa(b@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"MAILHOST": "mh.x", "MAILUSER": "mu"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"MAILHOST": "mh.x", "MAILUSER": "mu"},
        [],
        0,
        "Return-Path: <mu@mh.x>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: mu@mh.x\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Fmu@mh.x\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"LOGNAME": "ln"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"LOGNAME": "ln"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILSHOST": "sh", "QMAILSUSER": "su"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILSHOST": "sh", "QMAILSUSER": "su"},
        [],
        0,
        "Return-Path: <su@sh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Fsu@sh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILINJECT": "f"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILINJECT": "f"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILINJECT": "i"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILINJECT": "i"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILINJECT": "s"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILINJECT": "s"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILINJECT": "r"},
        [],
        0,
        'Return-Path: <"rp@q.dd.example-"@[]>\n'
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example-@[]\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILINJECT": "r"},
        [],
        0,
        'Return-Path: <"robot-@dh.dd.example-"@[]>\n'
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot-@dh.dd.example-@[]\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILINJECT": "m"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILINJECT": "m"},
        [],
        0,
        "Return-Path: <robot-{TIME}.{PID}@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot-{TIME}.{PID}@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILINJECT": "rm"},
        [],
        0,
        'Return-Path: <"rp@q.dd.example-"@[]>\n'
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example-@[]\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILINJECT": "rm"},
        [],
        0,
        'Return-Path: <"robot-{TIME}.{PID}-@dh.dd.example-"@[]>\n'
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot-{TIME}.{PID}-@dh.dd.example-@[]\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"USER": ""},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"USER": ""},
        [],
        0,
        'Return-Path: <""@dh.dd.example>\n'
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        'From: ""@dh.dd.example\n'
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "F@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: x, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep\n"
        "Message-ID: <m@x>\n"
        "Return-Path: <rp@q>\n"
        "Content-Length: 5\n"
        "\n"
        "body\n",
        {"QMAILMFTFILE": "{MFT}"},
        [],
        0,
        "Return-Path: <rp@q.dd.example>\n"
        "Date: {DATE}\n"
        "Mail-Followup-To: c@d.e,\n"
        "  x@dh.dd.example,\n"
        "  LIST@lists.example\n"
        "To: x@dh.dd.example, LIST@lists.example\n"
        "Cc: c@d.e\n"
        "From: keep@dh.dd.example\n"
        "Message-ID: <m@x>\n"
        "\n"
        "body\n",
        "Frp@q.dd.example\x00TLIST@lists.example\x00Tx@dh.dd.example\x00Tc@d.e\x00\x00",
    ),
    (
        "To: x\n\nbody\n",
        {"QMAILMFTFILE": "{MFT}"},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-a", "u@h", "u@h+", "<u@h>", "u@[]", "a b", "", "u@h."],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tu@h.dd.example\x00Tu@h.pd.example\x00T<u@h>.dd.example\x00Tu@[]\x00Ta "
        "b@dh.dd.example\x00T\x00Tu@h.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-a", "u@h", "u@h+", "<u@h>", "u@[]", "a b", "", "u@h."],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tu@h.dd.example\x00Tu@h.pd.example\x00T<u@h>.dd.example\x00Tu@[]\x00Ta "
        "b@dh.dd.example\x00T\x00Tu@h.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-h", "x", "y"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tt@dh.dd.example\x00Tc2@dh.dd.example\x00Tc1@dh.dd.example\x00Tb@dh.dd.example\x00Tap@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-h", "x", "y"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tr1@dh.dd.example\x00Tr2@dh.dd.example\x00Tr3@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-H", "x", "y"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00Ty@dh.dd.example\x00Tt@dh.dd.example\x00Tc2@dh.dd.example\x00Tc1@dh.dd.example\x00Tb@dh.dd.example\x00Tap@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-H", "x", "y"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00Ty@dh.dd.example\x00Tr1@dh.dd.example\x00Tr2@dh.dd.example\x00Tr3@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["x", "y"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00Ty@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["x", "y"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00Ty@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-fa@b", "-a", "z"],
        0,
        "Return-Path: <a@b.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Fa@b.dd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-fa@b", "-a", "z"],
        0,
        "Return-Path: <a@b.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Fa@b.dd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-f<>", "z"],
        0,
        'Return-Path: <"<>"@dh.dd.example>\n'
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "F<>@dh.dd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-f<>", "z"],
        0,
        'Return-Path: <"<>"@dh.dd.example>\n'
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "F<>@dh.dd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-fu@h+", "z"],
        0,
        "Return-Path: <u@h.pd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Fu@h.pd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-fu@h+", "z"],
        0,
        "Return-Path: <u@h.pd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Fu@h.pd.example\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-f", "", "z"],
        0,
        "Return-Path: <>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "F\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-f", "", "z"],
        0,
        "Return-Path: <>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "F\x00Tz@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["--", "-x"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00T-x@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["--", "-x"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00T-x@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-f", "Bob <bob>"],
        0,
        'Return-Path: <"Bob <bob>"@dh.dd.example>\n'
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "FBob "
        "<bob>@dh.dd.example\x00Tt@dh.dd.example\x00Tc2@dh.dd.example\x00Tc1@dh.dd.example\x00Tb@dh.dd.example\x00Tap@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-f", "Bob <bob>"],
        0,
        'Return-Path: <"Bob <bob>"@dh.dd.example>\n'
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "FBob "
        "<bob>@dh.dd.example\x00Tr1@dh.dd.example\x00Tr2@dh.dd.example\x00Tr3@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-A"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Cc: c1@dh.dd.example, c2@dh.dd.example\n"
        "Apparently-To: ap@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tt@dh.dd.example\x00Tc2@dh.dd.example\x00Tc1@dh.dd.example\x00Tb@dh.dd.example\x00Tap@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-A"],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Resent-Date: {DATE}\n"
        "Resent-Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Resent-From: robot@dh.dd.example\n"
        "To: t@dh.dd.example\n"
        "Resent-To: r1@dh.dd.example\n"
        "Resent-Cc: r2@dh.dd.example\n"
        "\n"
        "b\n",
        "Frobot@dh.dd.example\x00Tr1@dh.dd.example\x00Tr2@dh.dd.example\x00Tr3@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nCc: c1, c2\nBcc: b\nApparently-To: ap\n\nb\n",
        {},
        ["-N", "q"],
        0,
        "",
        "Frobot@dh.dd.example\x00Tq@dh.dd.example\x00\x00",
    ),
    (
        "To: t\nResent-To: r1\nResent-Cc: r2\nResent-Bcc: r3\n\nb\n",
        {},
        ["-N", "q"],
        0,
        "",
        "Frobot@dh.dd.example\x00Tq@dh.dd.example\x00\x00",
    ),
    (
        "To: a\n\nbody",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example\n"
        "\n"
        "body\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "Subject: x",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "Subject: x\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "Subject: x\nnot header",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "Subject: x\n"
        "\n"
        "not header\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "Subject: x\n cont",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "Subject: x\n"
        " cont\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "To: a\n\nb\nc",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example\n"
        "\n"
        "b\n"
        "c\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: undisclosed-recipients:;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: undisclosed-recipients: ;\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        'To: "Doe, John" <jd@x.example>, other@y.example\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: "Doe, John" <jd@x.example>, other@y.example\n'
        "\n",
        "Frobot@dh.dd.example\x00Tother@y.example\x00Tjd@x.example\x00\x00",
    ),
    (
        "To: user@example.com (User Name)\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: user@example.com (User Name)\n"
        "\n",
        "Frobot@dh.dd.example\x00Tuser@example.com\x00\x00",
    ),
    (
        "To: a@[IPv6:::1]\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@[IPv6:::1]\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@[IPv6:::1]\x00\x00",
    ),
    (
        "TO: a\ncc: b\nbCC: c\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "TO: a@dh.dd.example\n"
        "cc: b@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00Tb@dh.dd.example\x00Tc@dh.dd.example\x00\x00",
    ),
    (
        "Cc:\n  a@b.example\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: a@b.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@b.example\x00\x00",
    ),
    (
        "From: =?UTF-8?B?w6Rh?= <a@b.example>\nTo: x@y.example\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: =?UTF-8?B?w6Rh?= <a@b.example>\n"
        "To: x@y.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tx@y.example\x00\x00",
    ),
    (
        "To: <a> c\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <a@dh.dd.example>, c@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a <b> <c>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a <b@dh.dd.example> <c@dh.dd.example>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@dh.dd.example\x00Tb@dh.dd.example\x00\x00",
    ),
    (
        "To: <a> <b> c\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <a@dh.dd.example> <b@dh.dd.example>, c@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: <a>(x) <b>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <a@dh.dd.example>(x) <b@dh.dd.example>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        'To: <a> "q" <b>\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: <a@dh.dd.example>"q" <b@dh.dd.example>\n'
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: x: a; b\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x: a@dh.dd.example;, b@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example;\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: g: a, b; (c)\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: g: a@dh.dd.example, b@dh.dd.example;(c)\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: g: a, ;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: g: a@dh.dd.example, ;\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: ;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: ;\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "To: a;;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a;;\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "To: a; b; c\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a; b; c\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@dh.dd.example\x00Tb@dh.dd.example\x00\x00",
    ),
    (
        "To: a(c) b\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example, b@dh.dd.example (c)\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: a b(c) d\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example, b@dh.dd.example, d@dh.dd.example (c)\n"
        "\n",
        "Frobot@dh.dd.example\x00Td@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: (x)a b\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@dh.dd.example (x), b@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: @h x\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: , x@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Tx@dh.dd.example\x00T\x00\x00",
    ),
    (
        "To: @h\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To:\n"
        "\n",
        "Frobot@dh.dd.example\x00T\x00\x00",
    ),
    (
        "To: a@b@c d\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: a@b@c.dd.example, d@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Td@dh.dd.example\x00Ta@b@c.dd.example\x00\x00",
    ),
    (
        "To: h+h+.\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: h+h+@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00Th+h+@dh.dd.example\x00\x00",
    ),
    (
        "To: x.y(c).\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x.y@dh.dd.example (c)\n"
        "\n",
        "Frobot@dh.dd.example\x00Tx.y@dh.dd.example\x00\x00",
    ),
    (
        "Reply-To: <\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: recipient list not shown: ;\n"
        "Reply-To: <@dh.dd.example\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "To: g: a, b\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: g: a, b\n"
        "\n",
        "Frobot@dh.dd.example\x00Tb@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    ("From: g: a\n\n", {}, [], 100, "", ""),
    (
        "To: : a;\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: : a@dh.dd.example;\n"
        "\n",
        "Frobot@dh.dd.example\x00Ta@dh.dd.example\x00\x00",
    ),
    (
        "To: x.y;<c@d.example>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: x.y@dh.dd.example; <c@d.example>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@d.example\x00Tx.y@dh.dd.example\x00\x00",
    ),
    (
        "To: <c@d.example>(Comment)bob@x.example\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "To: <c@d.example>, bob@x.example (Comment)\n"
        "\n",
        "Frobot@dh.dd.example\x00Tbob@x.example\x00Tc@d.example\x00\x00",
    ),
    (
        'From: bob@x.example;"Doe, J" <c@d.example>\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Cc: recipient list not shown: ;\n"
        'From: bob@x.example;"Doe, J" <c@d.example>\n'
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        "Cc: u@[10.0.0.1];\n  u@[10.0.0.1]<c@d.example>\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        "Cc: u@[10.0.0.1];, u@[10.0.0.1] <c@d.example>\n"
        "\n",
        "Frobot@dh.dd.example\x00Tc@d.example\x00Tu@[10.0.0.1]\x00Tu@[10.0.0.1]\x00\x00",
    ),
    (
        "From: <c@d.example>Jörg , Jörg  bob@x.example\n\n",
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "Cc: recipient list not shown: ;\n"
        'From: <c@d.example>, "Jörg"@dh.dd.example, "Jörg"@dh.dd.example,\n'
        "  bob@x.example\n"
        "\n",
        "Frobot@dh.dd.example\x00\x00",
    ),
    (
        'To: "Jörg Müller" <jm@x.example>, "Zoë Ätherton" <za@y.example>, "Ōkubo" <o@z.example>\n\n',
        {},
        [],
        0,
        "Return-Path: <robot@dh.dd.example>\n"
        "Date: {DATE}\n"
        "Message-ID: <{STAMP}.{PID}.qmail@id.example>\n"
        "From: robot@dh.dd.example\n"
        'To: "Jörg Müller" <jm@x.example>, "Zoë Ätherton" <za@y.example>,\n'
        '  "Ōkubo" <o@z.example>\n'
        "\n",
        "Frobot@dh.dd.example\x00To@z.example\x00Tza@y.example\x00Tjm@x.example\x00\x00",
    ),
]

# inputs on which pyqmail's output knowingly differs from notqmail's (docs/inject.md)
KNOWN_DIFFERENCES = {
    "To: @r1:u@h\n\n",  # field left as is; notqmail still collects u@h from it
    "To: a; b; c\n\n",  # field left as is; notqmail still collects b and c from it
    "Cc: u@[10.0.0.1];\n  u@[10.0.0.1]<c@d.example>\n\n",  # notqmail: phrase is a recipient too
}


def _expand(text: str) -> str:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(NOW))
    return (
        text.replace("{DATE}", date822(NOW))
        .replace("{STAMP}", stamp)
        .replace("{TIME}", str(int(NOW)))
        .replace("{PID}", str(PID))
    )


class _Capture:
    def __init__(self) -> None:
        self.data = b""
        self.envelope = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def commit_blocking(self, sender: bytes, recipients: list[bytes]) -> Reply:
        self.envelope = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients)
        self.envelope += b"\0"
        return Reply(0)

    def abort(self) -> None:
        pass


def _run(home: Home, tmp_path: Path, inp: str, env: dict[str, str], args: list[str]):
    env = {**BASE_ENV, **env}
    if env.get("QMAILMFTFILE") == "{MFT}":
        mft = tmp_path / "mft"
        mft.write_text("list@lists.example\n# c\nOther@X.example\n")
        env["QMAILMFTFILE"] = str(mft)
    opts = parse_args(["-n", *args])  # the reference ran with -n first
    settings = Settings.from_env(load(home), env)
    stream = io.BytesIO(inp.encode("utf-8", "surrogateescape"))
    sink = _Capture()
    inject(stream, opts, settings, sink, now=NOW, pid=PID)
    out = sink.data if opts.print_only else b""  # -N after -n: queued, nothing printed
    return out.decode("utf-8", "surrogateescape"), sink.envelope.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("inp", "env", "args", "rc", "out", "envelope"),
    [c for c in CASES if c[0] not in KNOWN_DIFFERENCES],
    ids=lambda v: repr(v)[:40] if isinstance(v, str) else None,
)
def test_matches_notqmail(
    home: Home,
    tmp_path: Path,
    inp: str,
    env: dict[str, str],
    args: list[str],
    rc: int,
    out: str,
    envelope: str,
) -> None:
    if rc != 0:
        with pytest.raises(InjectError) as e:
            _run(home, tmp_path, inp, env, args)
        assert e.value.code == rc
        return
    got_out, got_env = _run(home, tmp_path, inp, env, args)
    assert got_out == _expand(out)
    assert got_env == _expand(envelope)
