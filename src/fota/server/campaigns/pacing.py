"""Pacing rules as pure functions of time: maintenance window, rate, retry back-off."""
from __future__ import annotations

import math
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from fota.server.campaigns.spec import Window

__all__ = ["backoff_delay", "last_opening", "starts_allowed", "window_open", "window_opens_at"]


def window_open(window: Window | None, now: datetime) -> bool:
    """True if ``now`` (aware) is inside the window: at most ``minutes`` after a cron time."""
    if window is None:
        return True
    local = now.astimezone(ZoneInfo(window.tz))
    return local < last_opening(window, local) + timedelta(minutes=window.minutes)


def last_opening(window: Window, local: datetime) -> datetime:
    """The latest cron time at or before ``local`` (a start exactly at ``local`` counts).

    croniter's get_prev is strictly before its base, hence the base a second later; but from
    01:59:59.5 that finds 02:00:00, which is still ahead: then the one before ``local`` itself
    (else devices started up to a second before the window opened)."""
    start = croniter(window.cron, local + timedelta(seconds=1)).get_prev(datetime)
    if start > local:
        start = croniter(window.cron, local).get_prev(datetime)
    return start


def window_opens_at(window: Window, now: datetime) -> datetime:
    """The next time the window opens after ``now`` (for views)."""
    local = now.astimezone(ZoneInfo(window.tz))
    return croniter(window.cron, local).get_next(datetime)


def starts_allowed(rate: float | None, started_last_minute: int) -> int | None:
    """How many devices may start now under ``rate`` per minute (None: no limit).

    The count is a sliding minute: at most floor(rate) starts in any 60 seconds (at least 1
    for rates below one per minute, paced by the caller's window of 60/rate seconds).
    """
    if rate is None:
        return None
    return max(0, max(1, math.floor(rate)) - started_last_minute)


def backoff_delay(backoff: int, attempts: int) -> timedelta:
    """Wait before attempt ``attempts + 1``: backoff, then doubling (capped at a day)."""
    return timedelta(seconds=min(backoff * 2 ** max(0, attempts - 1), 86400))
