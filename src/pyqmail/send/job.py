"""A delivery job: one message on one channel, for one pass through its recipients.

Owns the two records the scheduler (manager.py) and direct delivery (direct.py) share:
:class:`Job` (what a pass needs: sender, retry time, whether it is dying, the open channel
file, its recipients) and :class:`Record` (one ``T`` recipient and whether it has a result
yet). A remote pass may hold some recipients back at their destination's limit
(manager.py parks the message until the destination has room, then continues the same
pass). Invariant: ``fd`` is the channel file opened for marking, or -1 for a direct
delivery, whose marks are kept in memory (``Record.done``) and ``offset`` is then -1.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(slots=True)
class Record:
    offset: int  # of the T byte in the channel file; -1 for a direct delivery
    recipient: str
    done: bool = False


@dataclass
class Job:
    """One message on one channel, for one pass through its file."""

    channel: int
    num: int
    sender: str
    retry: int
    dying: bool
    fd: int
    records: list[Record]
    left: int = 0  # T records still T after this pass
    birth: float = 0.0  # when the message was accepted (info's mtime; 0 = not known)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # remote only (send/limits.py): the domains whose deliveries this pass held back at
    # their destination's limit, the offsets of the records it tried and left ``T``, and
    # when the schedule had the message due
    held: set[str] = field(default_factory=set)
    tried: set[int] = field(default_factory=set)
    due: float = 0.0
