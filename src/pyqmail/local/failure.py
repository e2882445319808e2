"""How one delivery step fails inside qmail-local: an exit code (100 or 111) and text.

qmail-local stops at the first failing instruction and exits with its code; the spawner
turns the code into D or Z (send.md 7). Steps raise :class:`DeliveryFailure`; only
:mod:`pyqmail.local.qlocal` catches it.
"""

from __future__ import annotations

import os

PERM = 100
TEMP = 111


class DeliveryFailure(Exception):
    """Stop qmail-local with ``code`` (100 permanent, 111 temporary) and ``text``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def temp(text: str) -> DeliveryFailure:
    return DeliveryFailure(TEMP, text)


def perm(text: str) -> DeliveryFailure:
    return DeliveryFailure(PERM, text)


def strerror(err: OSError) -> str:
    """qmail's error_str: the system's text for the errno."""
    return os.strerror(err.errno) if err.errno else str(err)
