"""Polling for a condition with a deadline: shared by the tests, the benchmarks and the demo."""
from __future__ import annotations

import time


class TimedOut(AssertionError):
    """The condition did not hold in time (an AssertionError, so a test reports it as a failure)."""


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Call `predicate` every `interval` s until it returns a truthy value (returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimedOut(f"timed out after {timeout:.0f}s waiting for {what}")
