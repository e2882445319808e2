"""Per-destination limits for remote deliveries: the bookkeeping, with no I/O and no clock.

Owns, per destination (a :class:`~pyqmail.destlimits.Limit`'s ``key``, from
``control/destinationlimits``):

- how many deliveries (SMTP transactions) are in flight, against ``concurrency``;
- when the deliveries of the last minute started (a sliding window, at most ``rate``
  stamps kept), against ``rate``: never more than ``rate`` starts in any 60 seconds;
- the back-off after a rate-limit reply: a deferral whose remote reply is 421 or has an
  enhanced status code 4.7.x (RFC 3463: security or policy status, e.g. ``421 4.7.0 Try
  again later``, ``450 4.7.1 rate limited``; not greylisting, which names itself) holds
  the whole destination for an interval
  that starts at ``backoff_first`` (60 s), doubles with each further such reply, is capped
  at ``backoff_max`` (1 h), and is reset by a success. Only a delivery *started after* the
  last back-off decision changes it, so five deliveries in flight that all get 421 double
  the interval once, not five times. An interval not renewed for ``backoff_max`` after it
  ended is forgotten.

The scheduler (manager.py) asks :meth:`DestinationLimiter.blocked` before it starts a
delivery, calls :meth:`start` when it does and :meth:`finish` with the result; what waits
and when it is woken is the scheduler's business. Every method takes ``now``, so tests
drive it with a fake clock. Memory: one small record per destination with something in
flight, in its window or backing off; the others are swept away.
"""

from __future__ import annotations

import enum
import math
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyqmail.destlimits import Limit
from pyqmail.outcome import Outcome, Status

WINDOW = 60.0  # seconds: the rate is "messages per minute"
BACKOFF_FIRST = 60.0
BACKOFF_MAX = 3600.0
_SWEEP_EVERY = 1000  # finishes between sweeps of forgotten destinations

# "Remote host said: 421 4.7.0 ..." (smtp/client.py's ``said``; also "421-4.7.0" lines),
# up to the end of that reply's line
_SAID = re.compile(r"Remote host said: (\d{3})(?![0-9])(?:[ -](\d)\.(\d{1,3})\.(\d{1,3}))?([^\n]*)")
_GREYLIST = re.compile(r"gr[ae]y-?list", re.IGNORECASE)


class Verdict(enum.Enum):
    """What a delivery's result says about its destination."""

    OK = "ok"  # it accepted mail: a back-off is over
    RATE_LIMITED = "rate-limited"  # it asked us to slow down
    OTHER = "other"  # says nothing about the destination's rate


def rate_limit_reply(text: str) -> bool:
    """True if ``text`` carries a remote reply 421 or with an enhanced code 4.7.x. Only the
    remote's words count (our own texts such as ``(#4.7.5)`` for TLS are not replies).
    Greylisting is not a rate limit, though it is often ``451 4.7.1``: a reply whose text
    says greylist (or graylist) asks for this message's own retry, not for a slower pace."""
    for m in _SAID.finditer(text):
        limited = m.group(1) == "421" or (m.group(2) == "4" and m.group(3) == "7")
        if limited and not _GREYLIST.search(m.group(5)):
            return True
    return False


def verdict(outcomes: Iterable[Outcome]) -> Verdict:
    """One SMTP transaction's verdict: OK if any recipient was accepted, else RATE_LIMITED
    if any deferral carries a rate-limit reply, else OTHER."""
    limited = False
    for out in outcomes:
        if out.status is Status.OK:
            return Verdict.OK
        if out.status is Status.TEMP and rate_limit_reply(out.text):
            limited = True
    return Verdict.RATE_LIMITED if limited else Verdict.OTHER


@dataclass(slots=True)
class _Dest:
    in_flight: int = 0
    starts: deque[float] = field(default_factory=deque)
    interval: float = 0.0  # the current back-off interval; 0: none
    until: float = 0.0  # no start before this
    since: float = -math.inf  # when the back-off was last decided (set, grown or reset)


@dataclass(frozen=True, slots=True)
class DestState:
    """One destination as the metrics and the status page show it."""

    in_flight: int
    backoff_until: float
    backoff_interval: float


class DestinationLimiter:
    """See the module docstring."""

    def __init__(
        self,
        *,
        window: float = WINDOW,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.window = window
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self._dests: dict[str, _Dest] = {}
        self._finishes = 0

    def __len__(self) -> int:
        return len(self._dests)

    def _trim(self, d: _Dest, now: float) -> None:
        cut = now - self.window
        while d.starts and d.starts[0] <= cut:
            d.starts.popleft()

    def blocked(self, limit: Limit, now: float) -> float | None:
        """None if a delivery to ``limit``'s destination may start at ``now``; else when to
        look again: a time, or ``math.inf`` for "when one of its deliveries ends" (or never,
        for a destination on hold)."""
        if limit.held:
            return math.inf
        d = self._dests.get(limit.key)
        if d is None:
            return None
        if now < d.until:
            return d.until
        if limit.concurrency is not None and d.in_flight >= limit.concurrency:
            return math.inf
        if limit.rate is not None:
            self._trim(d, now)
            if len(d.starts) >= limit.rate:
                return d.starts[0] + self.window
        return None

    def room(self, limit: Limit, now: float) -> int | None:
        """How many deliveries may start at ``now`` (None: any number)."""
        if self.blocked(limit, now) is not None:
            return 0
        d = self._dests.get(limit.key)
        n: int | None = None
        if limit.concurrency is not None:
            n = limit.concurrency - (d.in_flight if d else 0)
        if limit.rate is not None:
            r = limit.rate - (len(d.starts) if d else 0)
            n = r if n is None else min(n, r)
        return n

    def start(self, limit: Limit, now: float) -> None:
        """A delivery to ``limit``'s destination starts at ``now`` (``blocked`` said None)."""
        d = self._dests.get(limit.key)
        if d is None:
            d = self._dests[limit.key] = _Dest()
        d.in_flight += 1
        if limit.rate is not None:
            d.starts.append(now)
            while len(d.starts) > limit.rate:
                d.starts.popleft()

    def cancel(self, key: str, started: float) -> None:
        """A delivery counted by ``start`` never ran (the scheduler is stopping)."""
        d = self._dests.get(key)
        if d is None:
            return
        d.in_flight = max(0, d.in_flight - 1)
        if started in d.starts:
            d.starts.remove(started)

    def finish(self, key: str, started: float, now: float, result: Verdict) -> float | None:
        """A delivery started at ``started`` ended at ``now`` with ``result``. Returns the new
        back-off interval when this result began or lengthened one, else None."""
        d = self._dests.get(key)
        if d is None:
            d = self._dests[key] = _Dest()
        else:
            d.in_flight = max(0, d.in_flight - 1)
        self._finishes += 1
        if self._finishes % _SWEEP_EVERY == 0:
            self.sweep(now)
        if started < d.since:
            return None  # started before the last decision: that one already counted it
        if result is Verdict.OK:
            if d.interval:
                d.interval, d.until, d.since = 0.0, 0.0, now
            return None
        if result is not Verdict.RATE_LIMITED:
            return None
        if d.interval and now > d.until + self.backoff_max:
            d.interval = 0.0  # an old back-off, long over: start again from the first
        d.interval = min(self.backoff_max, d.interval * 2 if d.interval else self.backoff_first)
        d.until = now + d.interval
        d.since = now
        return d.interval

    def backing_off(self, key: str, now: float) -> float | None:
        """The end of ``key``'s back-off if it is backing off at ``now``."""
        d = self._dests.get(key)
        return d.until if d is not None and now < d.until else None

    def sweep(self, now: float) -> None:
        """Forget destinations with nothing in flight, in the window or to remember."""
        for key in [k for k, d in self._dests.items() if self._idle(d, now)]:
            del self._dests[key]

    def _idle(self, d: _Dest, now: float) -> bool:
        self._trim(d, now)
        return (
            not d.in_flight
            and not d.starts
            and (not d.interval or now > d.until + self.backoff_max)
        )

    def states(self, now: float) -> dict[str, DestState]:
        """The destinations with something in flight or backing off (for metrics)."""
        return {
            k: DestState(d.in_flight, d.until if now < d.until else 0.0, d.interval)
            for k, d in self._dests.items()
            if d.in_flight or now < d.until
        }
