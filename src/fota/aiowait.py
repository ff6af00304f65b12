"""A bounded wait that never swallows a cancellation.

Python 3.11's ``asyncio.wait_for`` returns the awaited result when the task is cancelled in the
same loop turn as that result arrives (CPython gh-86296, fixed in 3.12): the cancellation is
lost. A loop that waits on an event with ``wait_for`` (the Home Assistant bridge, the status
flusher) then runs on, and ``ControlCenter.stop``, which cancels it and awaits it, waits forever.
``asyncio.timeout`` (3.11+) does not have that race. Libraries can still lose one (nats-py's
pull ``fetch`` waits with ``wait_for``), so a stop cancels with ``cancel_and_wait``, which cancels
again until the task ends.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, TypeVar

T = TypeVar("T")

__all__ = ["within", "cancel_and_wait"]

log = logging.getLogger(__name__)


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """``await awaitable``, raising TimeoutError after ``timeout`` seconds (like wait_for)."""
    async with asyncio.timeout(timeout):
        return await awaitable


async def cancel_and_wait(task: asyncio.Task, recancel_every: float = 1.0) -> None:
    """Cancel ``task`` and wait for it to end, cancelling it again every ``recancel_every``
    seconds: a task that lost its cancellation must not hold a stop for ever. Whatever the task
    raised is left to whoever looks at it (``task.exception()``)."""
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=recancel_every)
        if not task.done():
            log.warning("task %s still runs after its cancellation; cancelled again", task.get_name())
            task.cancel()
