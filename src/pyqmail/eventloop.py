"""The event loop a long-lived pyqmail process runs: uvloop's when it is installed.

A foundation module so that every process that runs its own loop (the daemon's parts in
daemon/, the remote agent's process in remote/agentproc.py) makes it the same way without
importing upward.
"""

from __future__ import annotations

import asyncio


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if it is installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
