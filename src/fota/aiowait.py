"""A bounded wait that never swallows a cancellation.

Python 3.11's ``asyncio.wait_for`` returns the awaited result when the task is cancelled in the
same loop turn as that result arrives (CPython gh-86296, fixed in 3.12): the cancellation is
lost. A loop that waits on an event with ``wait_for`` (the Home Assistant bridge, the status
flusher) then runs on, and ``ControlCenter.stop``, which cancels it and awaits it, waits forever.
``asyncio.timeout`` (3.11+) does not have that race.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")

__all__ = ["within"]


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """``await awaitable``, raising TimeoutError after ``timeout`` seconds (like wait_for)."""
    async with asyncio.timeout(timeout):
        return await awaitable
