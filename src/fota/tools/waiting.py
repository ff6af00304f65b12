"""Polling for a condition with a deadline: the one wait of the demo, the tests and the
benchmarks, in a thread (wait_until) or on an event loop (wait_until_async)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator


class TimedOut(AssertionError):
    """The condition did not hold in time (an AssertionError, so a test reports it as a failure)."""


def _tries(timeout: float, what: str) -> Iterator[None]:
    """One step per try until the deadline, then TimedOut."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        yield
    raise TimedOut(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Call `predicate` every `interval` s until it returns a truthy value (returned)."""
    for _ in _tries(timeout, what):
        value = predicate()
        if value:
            return value
        time.sleep(interval)


async def wait_until_async(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """wait_until on an event loop: the loop runs other tasks between tries."""
    for _ in _tries(timeout, what):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
