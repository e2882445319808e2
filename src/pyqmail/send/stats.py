"""What the scheduler tells the metrics and the status page about its deliveries.

Plain data, no metrics library: the scheduler calls :meth:`SendStats.delivery` once per
delivery result (a few dict updates); the HTTP server (daemon/http.py) turns a
:meth:`SendStats.snapshot` into Prometheus families and the page at scrape time, so the
cost of a scrape is paid by the scrape.

Kept: deliveries by channel and result (``success``/``deferral``/``failure``), a histogram
of the time from a message's acceptance (its info file's birth) to each successful or
failed delivery, deferrals by destination (the recipient's domain) with the last error,
the last ``RECENT`` deliveries, and per-minute delivery counts for the last hour.
Destination limits (limits.py): how many messages wait for room at a destination now,
how often a delivery was held back, and the back-offs after rate-limit replies by
destination.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

# seconds from acceptance to delivery: a local delivery takes ms, a retried remote one days
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
           14400.0, 86400.0, 604800.0)  # fmt: skip
RECENT = 20
MAX_DESTINATIONS = 1000  # deferral rows kept (the oldest is forgotten beyond)
_WORDS = {"K": "success", "Z": "deferral", "D": "failure"}


@dataclass(frozen=True)
class Delivered:
    """One delivery result, for the page's recent list."""

    when: float
    msg: int
    channel: str
    recipient: str
    result: str
    text: str


@dataclass
class Deferred:
    """A destination whose deliveries were deferred: how often, when, and the last error."""

    count: int
    last: float
    error: str


class SendStats:
    """See the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.deliveries: Counter[tuple[str, str]] = Counter()  # (channel, result)
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.delay_sum = 0.0
        self.deferred: dict[str, Deferred] = {}
        self.recent: deque[Delivered] = deque(maxlen=RECENT)
        self.minutes: deque[tuple[int, int]] = deque(maxlen=60)  # (minute, deliveries)
        self.held_back = 0  # messages parked now, waiting for room at a destination
        self.held_total = 0  # deliveries held back at a destination's limit, ever
        self.backoffs: dict[str, int] = {}  # destination -> back-offs begun or lengthened

    def held(self) -> None:
        """One delivery (a host's group of recipients) held back at its destination."""
        self.held_total += 1

    def backoff(self, dest: str) -> None:
        """A rate-limit reply began or lengthened ``dest``'s back-off."""
        if dest not in self.backoffs and len(self.backoffs) >= MAX_DESTINATIONS:
            del self.backoffs[next(iter(self.backoffs))]
        self.backoffs[dest] = self.backoffs.get(dest, 0) + 1

    def delivery(
        self, channel: str, msg: int, recipient: str, letter: str, text: str, birth: float
    ) -> None:
        """One delivery's result (``letter`` K/Z/D); ``birth`` 0 when unknown."""
        now = self._clock()
        result = _WORDS.get(letter, "mangled")
        self.deliveries[(channel, result)] += 1
        self.recent.append(Delivered(now, msg, channel, recipient, result, text))
        if result == "deferral":
            dest = recipient[recipient.rfind("@") + 1 :].lower() or recipient
            d = self.deferred.get(dest)
            if d is None:
                if len(self.deferred) >= MAX_DESTINATIONS:
                    del self.deferred[next(iter(self.deferred))]
                self.deferred[dest] = Deferred(1, now, text)
            else:
                d.count, d.last, d.error = d.count + 1, now, text
            return
        if birth > 0:
            delay = max(0.0, now - birth)
            self.buckets[bisect.bisect_left(BUCKETS, delay)] += 1
            self.delay_sum += delay
        minute = int(now // 60)
        if self.minutes and self.minutes[-1][0] == minute:
            self.minutes[-1] = (minute, self.minutes[-1][1] + 1)
        else:
            self.minutes.append((minute, 1))

    def per_minute(self, window: int = 60) -> float:
        """Deliveries (success or failure) per minute over the last ``window`` minutes."""
        now = int(self._clock() // 60)
        n = sum(c for m, c in self.minutes if now - m < window)
        return n / window

    def top_deferred(self, n: int = 10) -> list[tuple[str, Deferred]]:
        return sorted(self.deferred.items(), key=lambda kv: (-kv[1].count, kv[0]))[:n]
