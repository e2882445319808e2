"""qmail's date formats.

``date822``: ``26 Sep 1995 04:46:54 -0000`` (UTC, no weekday, day not zero-padded), used
in Received lines, bounces and qmail-inject's Date. ``mbox_date``: the From_ line's
``Sat Jan 03 01:05:34 1996`` with the day zero-padded (local.md section 3.6).
"""

from __future__ import annotations

import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def date822(when: float | None = None) -> str:
    """``D Mon YYYY HH:MM:SS -0000`` in UTC."""
    t = time.gmtime(time.time() if when is None else when)
    return (
        f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000"
    )


def date822_gmt(when: float) -> str:
    """qmail-qread's header date: date822 without the zone, as ``... GMT``."""
    return date822(when)[: -len(" -0000")] + " GMT"


def mbox_date(when: float | None = None) -> str:
    """``Www Mmm DD HH:MM:SS YYYY`` in UTC, day zero-padded."""
    t = time.gmtime(time.time() if when is None else when)
    return (
        f"{_DAYS[t.tm_wday]} {_MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {t.tm_year}"
    )
