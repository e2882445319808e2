"""Re-queue a message for forwarding (local.md 3.10; tools.md forward, condredirect).

The copy is ``Delivered-To:`` + the message as received (no Return-Path), queued in one
submission for all the recipients, through the same :func:`submitter` every other part
uses (QMAILQUEUE, the in-process writer, or the queue service). Queue refusals become
qmail's ``Unable to forward message: TEXT.`` with exit 100 (D) or 111 (Z).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pyqmail.home import Home
from pyqmail.local.failure import PERM, TEMP, DeliveryFailure, strerror, temp
from pyqmail.queue.contract import BlockingSubmitter, QueueError
from pyqmail.queue.submit import submitter


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def forward(
    home: Home,
    msg_fd: int,
    dtline: bytes,
    sender: str,
    recipients: Sequence[str],
    *,
    queue: BlockingSubmitter | None = None,
) -> int:
    """Queue DTLINE + the message on ``msg_fd`` to ``recipients``; returns the qp."""
    sub = queue if queue is not None else submitter(home)
    try:
        pending = sub.begin(origin="uid")
    except QueueError as e:
        raise _failure(e) from e
    except OSError as e:
        raise temp(f"Unable to forward message: {strerror(e)}.") from e
    try:
        pending.write(dtline)
        offset = 0
        while True:
            chunk = os.pread(msg_fd, 65536, offset)
            if not chunk:
                break
            pending.write(chunk)
            offset += len(chunk)
    except QueueError as e:
        pending.abort()
        raise _failure(e) from e
    except OSError as e:
        pending.abort()
        raise temp(f"Unable to forward message: {strerror(e)}.") from e
    reply = pending.commit_blocking(_bytes(sender), [_bytes(r) for r in recipients])
    if not reply.ok:
        raise _failure(reply.error())
    return reply.qp


def _failure(e: QueueError) -> DeliveryFailure:
    letter, text = e.result()
    return DeliveryFailure(PERM if letter == "D" else TEMP, f"Unable to forward message: {text}.")
