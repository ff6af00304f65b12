"""Device statuses at the door: parsing with field limits, and a rate limit per device.

A status (docs/protocol.md §6; its limits: §11) is checked here before it is queued for the
database, so one device cannot fill the disk, the memory or the batch writer with what it sends:

* ``parse_status`` refuses (``StatusRefused``) a payload over ``protocol.MAX_STATUS_BYTES``
  before decoding it, anything that is not a JSON object, NaN/Infinity, a NUL character or a
  lone surrogate anywhere (PostgreSQL cannot store them; one such status failed every batch
  it was in), and fields out of their range (``FIELDS``). Every status the device code sends
  fits with room to spare: its reason is cut to ``protocol.MAX_REASON`` characters.
* ``stored_payload`` is what goes into ``status_events.payload``: the fields that have no
  column of their own (``ok``, ``uptime``, ``current``, ``battery`` ...), so a reason is
  stored once.
* ``StatusLimiter`` is a token bucket per device; see its docstring for the rule.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from fota.device import protocol

__all__ = ["COLUMNS", "DropLog", "MAX_ID", "STATUS_STATES", "StatusLimiter", "StatusRefused", "parse_status",
           "stored_payload"]

STATUS_STATES = frozenset(protocol.STATES) | {protocol.REJECTED, protocol.KEYS_UPDATED, protocol.HEALTH}
MAX_ID = protocol.MAX_ID    # job ids, boot, seq, bytes and total are 32-bit integer columns
MAX_UPTIME = 2**53 - 1      # milliseconds; the largest integer every JSON reader keeps exact
MAX_VERSION = 64            # devices.version, status_events.version
CODE = re.compile(r"E_[A-Z0-9_]{1,30}\Z")  # error codes (§8): 32 characters at most
MAX_INT = 2**63 - 1         # any other integer field (an unknown one included)

# Fields with a column of their own in status_events (not repeated in its payload).
COLUMNS = ("job", "state", "code", "reason", "progress", "version", "epoch", "boot", "seq")

OVERSIZE = "oversize"       # StatusRefused.kind: over MAX_STATUS_BYTES
INVALID = "invalid"         # StatusRefused.kind: anything else


class StatusRefused(ValueError):
    """A status the center does not store; ``kind`` is OVERSIZE or INVALID."""

    def __init__(self, message: str, kind: str = INVALID):
        super().__init__(message)
        self.kind = kind


def _int(lo: int, hi: int):
    def check(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    check.what = f"an integer {lo}..{hi}"
    return check


def _text(limit: int):
    def check(value: Any) -> bool:
        return isinstance(value, str) and len(value) <= limit
    check.what = f"a string of at most {limit} characters"
    return check


def _progress(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


_progress.what = "a number 0..1"


def _code(value: Any) -> bool:
    return isinstance(value, str) and CODE.match(value) is not None


_code.what = "an error code E_[A-Z0-9_] of at most 32 characters"


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


_bool.what = "true or false"


def _state(value: Any) -> bool:
    return value in protocol.STATES


_state.what = "a state"

# Optional fields (null or absent allowed): name -> check. `state`, `boot` and `seq` are required.
FIELDS = {
    "job": _int(0, MAX_ID),
    "epoch": _int(0, protocol.MAX_EPOCH),
    "code": _code,
    "reason": _text(protocol.MAX_REASON),
    "version": _text(MAX_VERSION),
    "progress": _progress,
    "bytes": _int(0, MAX_ID),
    "total": _int(0, MAX_ID),
    "uptime": _int(0, MAX_UPTIME),
    "battery": _int(0, 100),
    "min_battery": _int(0, 100),
    "ok": _bool,
    "current": _state,
}
_SEQ = _int(0, MAX_ID)


def _refuse_constant(name: str) -> Any:
    raise StatusRefused(f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StatusRefused(f"{text[:20]} is not a finite number")
    return value


def _check_values(msg: dict) -> None:
    """No NUL, no lone surrogate (neither can be stored as text), no integer beyond 64 bits."""
    stack: list[Any] = [msg]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise StatusRefused("a NUL character (\\u0000)")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise StatusRefused("a lone surrogate (not UTF-8)") from None
        elif isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT - 1 <= value <= MAX_INT:
            raise StatusRefused("an integer beyond 64 bits")


def parse_status(payload: bytes) -> dict[str, Any]:
    """A status message (§6) as a dict; StatusRefused (a ValueError) with the reason if refused."""
    if len(payload) > protocol.MAX_STATUS_BYTES:
        raise StatusRefused(f"{len(payload)} bytes, over {protocol.MAX_STATUS_BYTES}", OVERSIZE)
    try:
        msg = json.loads(payload, parse_constant=_refuse_constant, parse_float=_finite)
    except StatusRefused:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError included
        raise StatusRefused(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise StatusRefused("not a JSON object")
    _check_values(msg)
    if msg.get("state") not in STATUS_STATES:
        raise StatusRefused(f"unknown state {str(msg.get('state'))[:32]!r}")
    for name in ("boot", "seq"):
        if not _SEQ(msg.get(name)):
            raise StatusRefused(f"{name} must be {_SEQ.what}")
    for name, check in FIELDS.items():
        value = msg.get(name)
        if value is not None and not check(value):
            raise StatusRefused(f"{name} must be {check.what} or null")
    return msg


def stored_payload(msg: dict[str, Any]) -> dict[str, Any]:
    """The status's fields that have no column of their own (kept in status_events.payload)."""
    return {name: value for name, value in msg.items() if name not in COLUMNS}


class StatusLimiter:
    """A token bucket per device: ``rate`` statuses a second, bursts of ``burst``.

    The rule: a status passes while its device's bucket has a token. A device whose bucket is
    empty still gets through a status that would move one of its jobs to another state (a job
    id, a state of §8, and not the state it last reported for that job), from a second, smaller
    bucket (``transitions`` tokens, one back every ``1 / transition_rate`` s): a burst of
    progress or health reports never costs an update its `installing` or `confirmed`, while a
    device that makes up transitions to get around the limit is held to that second bucket.

    A legitimate device stays far below both: progress at most every 10 % and once a second
    (§6), about ten transitions per update, a health report per connect. Refused statuses
    take no token.
    """

    def __init__(self, rate: float = 5.0, burst: int = 200, transitions: int = 32,
                 transition_rate: float = 0.2, last_jobs: int = 8):
        if rate <= 0 or burst < 1 or transitions < 0 or transition_rate < 0:
            raise ValueError("status rate limit: rate > 0, burst >= 1, transitions and transition_rate >= 0")
        self.rate, self.burst = rate, burst
        self.transitions, self.transition_rate = transitions, transition_rate
        self.last_jobs = last_jobs
        # device -> [tokens, transition tokens, time of last refill, {job: last state}]
        self._devices: dict[str, list] = {}

    def allow(self, device_id: str, msg: dict[str, Any], now: float) -> bool:
        entry = self._devices.get(device_id)
        if entry is None:
            entry = self._devices[device_id] = [float(self.burst), float(self.transitions), now, {}]
        elapsed = max(0.0, now - entry[2])
        entry[0] = min(float(self.burst), entry[0] + elapsed * self.rate)
        entry[1] = min(float(self.transitions), entry[1] + elapsed * self.transition_rate)
        entry[2] = now
        job, state, states = msg.get("job"), msg["state"], entry[3]
        transition = job is not None and state in protocol.STATES and states.get(job) != state
        if entry[0] >= 1:
            entry[0] -= 1
        elif transition and entry[1] >= 1:
            entry[1] -= 1
        else:
            return False
        if job is not None and state in protocol.STATES:
            states.pop(job, None)
            states[job] = state
            if len(states) > self.last_jobs:
                del states[next(iter(states))]  # the oldest job
        return True

    def forget_idle(self, now: float) -> int:
        """Drop the buckets that are full again (a new one is the same); how many were dropped."""
        full = [device_id for device_id, (tokens, spare, at, _) in self._devices.items()
                if tokens + (now - at) * self.rate >= self.burst
                and spare + (now - at) * self.transition_rate >= self.transitions]
        for device_id in full:
            del self._devices[device_id]
        return len(full)

    def __len__(self) -> int:
        return len(self._devices)


class DropLog:
    """At most one log line per device every ``interval`` seconds about the statuses it had
    dropped (a flood must not turn into a flood of log lines); the line says how many."""

    def __init__(self, log, interval: float = 60.0):
        self.log, self.interval = log, interval
        self._devices: dict[str, list] = {}   # device -> [time of last line, dropped since]

    def dropped(self, device_id: str, why: str, now: float) -> None:
        entry = self._devices.setdefault(device_id, [None, 0])
        entry[1] += 1
        if entry[0] is None or now - entry[0] >= self.interval:
            self.log.warning("status from %s dropped: %s (%d dropped since the last such line; "
                             "at most one line a device every %.0fs)", device_id, why, entry[1], self.interval)
            entry[0], entry[1] = now, 0

    def forget_idle(self, now: float) -> None:
        for device_id in [d for d, (at, n) in self._devices.items() if not n and now - at >= self.interval]:
            del self._devices[device_id]
