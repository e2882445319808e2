"""qmail-send's retry arithmetic and its per-channel priority queues (pure; no I/O).

Owns: the exact ``nextretry`` formula (send.md 3.3: ``birth + (isqrt(recent - birth) +
chanskip)^2`` with chanskip 10 for local and 20 for remote), the ``dying`` test
(queuelifetime, send.md 5), and :class:`PrioQueue`, a binary heap of (time, message number)
with O(log n) push/pop, used for each channel's schedule as qmail's prioq is.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

LOCAL = 0
REMOTE = 1
CHANNELS = (LOCAL, REMOTE)
CHANNEL_NAMES = ("local", "remote")
CHANSKIP = (10, 20)  # qmail-send.c: seconds per sqrt step, per channel


def nextretry(birth: int, recent: int, channel: int) -> int:
    """When channel ``channel`` next tries a message born at ``birth``, for a pass at ``recent``.

    Attempts therefore fall at birth + (k * chanskip)^2 while every pass runs on time; a late
    pass recomputes from its own start, so there is no catch-up burst.
    """
    skip = CHANSKIP[channel]
    if birth > recent:  # clock skew: the file's birth lies in the future
        return birth + skip * skip
    n = math.isqrt(recent - birth) + skip
    return birth + n * n


def dying(birth: int, recent: int, lifetime: int) -> bool:
    """True if a pass starting at ``recent`` is the final one (queuelifetime exceeded)."""
    return recent > birth + lifetime


@dataclass(order=True, frozen=True, slots=True)
class Entry:
    """One scheduled item: due at ``when`` (seconds), message number ``num``."""

    when: float
    num: int


@dataclass
class PrioQueue:
    """A min-heap of :class:`Entry` by time (qmail's prioq): O(log n) per insert and removal."""

    _heap: list[Entry] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._heap)

    def push(self, when: float, num: int) -> None:
        heapq.heappush(self._heap, Entry(when, num))

    def peek(self) -> Entry | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> Entry:
        return heapq.heappop(self._heap)

    def remove(self, num: int) -> list[Entry]:
        """Take every entry of message ``num`` out (O(n): the queue manager's, not per event)."""
        gone = [e for e in self._heap if e.num == num]
        if gone:
            self._heap = [e for e in self._heap if e.num != num]
            heapq.heapify(self._heap)
        return gone

    def reschedule_all(self, when: float) -> None:
        """Every entry due at ``when`` (qmail's SIGALRM): O(n), once per signal."""
        self._heap = [Entry(min(e.when, when), e.num) for e in self._heap]
        heapq.heapify(self._heap)

    @classmethod
    def from_entries(cls, entries: list[Entry]) -> PrioQueue:
        """Build from many entries at once in O(n) (start-up scan)."""
        heap = list(entries)
        heapq.heapify(heap)
        return cls(heap)
