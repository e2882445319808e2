"""The result of one delivery attempt, as qmail's spawn protocol carries it.

qmail reports every delivery as one letter and a text: ``K`` (delivered), ``Z`` (temporary
failure, try again later) and ``D`` (permanent failure, bounce). This is the value that
crosses from the local and remote agents to the scheduler; exceptions never do.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    """qmail's three delivery results, valued by their report letter."""

    OK = "K"
    TEMP = "Z"
    PERM = "D"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One delivery result: a status and the human-readable text qmail would report."""

    status: Status
    text: str

    @classmethod
    def ok(cls, text: str) -> Outcome:
        return cls(Status.OK, text)

    @classmethod
    def temp(cls, text: str) -> Outcome:
        return cls(Status.TEMP, text)

    @classmethod
    def perm(cls, text: str) -> Outcome:
        return cls(Status.PERM, text)

    def report(self) -> bytes:
        """The spawn-protocol form: letter, text, NUL (send.md section 7)."""
        return self.status.value.encode() + self.text.encode("utf-8", "replace") + b"\0"
