"""A campaign's specification: target filter, waves, pacing. Plain data, validated once.

Stored as JSON in ``campaigns.spec`` (``CampaignSpec.to_json``); every worker rebuilds the
same object from it, so a campaign's rules never live in one process's memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from fota.server import names

__all__ = ["CampaignError", "CampaignNotFound", "CampaignSpec", "CampaignStateError", "TargetFilter", "Wave", "Window", "version_key"]

ON_FAILURE = ("pause", "abort")
DEFAULT_WAVES = (1.0, 10.0, 50.0, 100.0)


class CampaignError(ValueError):
    """A campaign cannot be created, found or changed as asked."""


class CampaignNotFound(CampaignError):
    """No campaign of that name or id."""


class CampaignStateError(CampaignError):
    """The campaign's state table does not allow this action now (e.g. resume a running campaign)."""


def version_key(version: str) -> tuple:
    """Order of dotted versions: numeric parts numerically ("1.10.0" > "1.9.2"), others as text."""
    parts = []
    for part in version.replace("-", ".").replace("+", ".").split("."):
        # isascii: '²'.isdigit() is True and int('²') fails
        parts.append((0, int(part), "") if part.isascii() and part.isdigit() else (1, 0, part))
    return tuple(parts)


def _strings(value: Any, name: str, pattern: str) -> list[str]:
    """A string or a list of strings, each of the form ``pattern`` (fota.server.names)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CampaignError(f"{name} must be a string or a list of strings")
    for v in value:
        names.check(v, pattern, name, CampaignError)
    return value


MAX_INVENTORY_TEXT = 256


def _inventory_value(value: Any) -> bool:
    """A JSON scalar a device's inventory can hold (finite numbers; text without NUL)."""
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_INVENTORY_TEXT and "\x00" not in value


def _inventory(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CampaignError("filter inventory must be an object of field: value")
    for key, want in value.items():
        names.check(key, names.NAME, "filter inventory field", CampaignError)
        if not all(_inventory_value(v) for v in (want if isinstance(want, list) else [want])):
            raise CampaignError(f"filter inventory {key}: a value is null, true/false, a finite number or a "
                                f"text of at most {MAX_INVENTORY_TEXT} characters without NUL (or a list of them)")
    return value


def _number(spec: dict, name: str, default: float | None, low: float, high: float | None = None,
            integer: bool = False) -> Any:
    value = spec.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CampaignError(f"{name} must be a number")
    if high is None and integer:
        high = names.MAX_DB_INT  # counts and seconds go into integer columns and timedelta
    if value < low or (high is not None and value > high):
        raise CampaignError(f"{name} must be {low}..{high if high is not None else 'any'}, not {value}")
    if integer:
        if int(value) != value:
            raise CampaignError(f"{name} must be an integer")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class TargetFilter:
    """Which devices a campaign targets. Every given criterion must hold (AND); a list means any of."""

    hardware: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)      # the device has all of these tags
    versions: list[str] = field(default_factory=list)  # running version is one of these
    online: bool | None = None
    inventory: dict[str, Any] = field(default_factory=dict)  # inventory[key] == value (or in a list)
    devices: list[str] = field(default_factory=list)   # explicit device ids

    @classmethod
    def parse(cls, data: dict | None) -> TargetFilter:
        data = dict(data or {})
        unknown = set(data) - {"hardware", "tags", "versions", "online", "inventory", "devices"}
        if unknown:
            raise CampaignError(f"unknown filter field(s): {', '.join(sorted(unknown))}")
        online = data.get("online")
        if online is not None and not isinstance(online, bool):
            raise CampaignError("filter online must be true, false or null")
        inventory = _inventory(data.get("inventory") or {})
        return cls(_strings(data.get("hardware"), "filter hardware", names.NAME),
                   _strings(data.get("tags"), "filter tags", names.NAME),
                   _strings(data.get("versions"), "filter versions", names.VERSION), online, inventory,
                   _strings(data.get("devices"), "filter devices", names.DEVICE_ID))

    @cached_property
    def device_set(self) -> frozenset[str]:
        """``devices`` as a set: a list may hold tens of thousands of ids."""
        return frozenset(self.devices)

    def matches(self, device) -> bool:
        """True if ``device`` (a Device row) passes this filter (hardware compatibility is separate)."""
        if self.devices and device.id not in self.device_set:
            return False
        if self.hardware and device.hardware not in self.hardware:
            return False
        if self.versions and device.version not in self.versions:
            return False
        if self.online is not None and bool(device.online) != self.online:
            return False
        tags = device.tags or []
        if any(t not in tags for t in self.tags):
            return False
        inventory = device.inventory or {}
        for key, want in self.inventory.items():
            have = inventory.get(key)
            if not (have in want if isinstance(want, list) else have == want):
                return False
        return True


@dataclass(frozen=True)
class Wave:
    """A stage: a cumulative share of the targets (``percent``) or an explicit group."""

    percent: float | None = None
    devices: list[str] = field(default_factory=list)
    tag: str | None = None
    success: float = 100.0   # % of the wave's devices succeeded (confirmed + probation) to advance
    failure: float = 0.0     # more than this % of the wave failed: on_failure
    approval: bool = False   # after this wave succeeded, wait for an operator's resume

    @cached_property
    def device_set(self) -> frozenset[str]:
        """``devices`` as a set: a group may hold tens of thousands of ids."""
        return frozenset(self.devices)

    @classmethod
    def parse(cls, data: Any, success: float | None, failure: float) -> Wave:
        """success None: not given for the campaign, so 100 - the wave's failure threshold (a
        wave that tolerates 5 % failures goes on with 95 % succeeded)."""
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            data = {"percent": data}
        if not isinstance(data, dict):
            raise CampaignError("a wave is a percentage or an object {percent | devices | tag, ...}")
        unknown = set(data) - {"percent", "devices", "tag", "success", "failure", "approval"}
        if unknown:
            raise CampaignError(f"unknown wave field(s): {', '.join(sorted(unknown))}")
        kinds = [k for k in ("percent", "devices", "tag") if data.get(k) is not None]
        if len(kinds) != 1:
            raise CampaignError("a wave needs exactly one of percent, devices, tag")
        percent = _number(data, "percent", None, 0.0001, 100.0)
        tag = data.get("tag")
        if tag is not None:
            names.check(tag, names.NAME, "wave tag", CampaignError)
        approval = data.get("approval", False)
        if not isinstance(approval, bool):
            raise CampaignError("wave approval must be true or false")
        wave_failure = _number(data, "failure", failure, 0.0, 100.0)
        wave_success = _number(data, "success", 100.0 - wave_failure if success is None else success, 0.0, 100.0)
        return cls(percent, _strings(data.get("devices"), "wave devices", names.DEVICE_ID), tag,
                   wave_success, wave_failure, approval)


CRON_FIELDS = "minute hour day-of-month month day-of-week"


def _five_fields(cron: str) -> None:
    """Refuse a cron of other than five fields. croniter would read a sixth field as seconds
    *after* the minute, while Quartz (hawkBit) puts seconds *first*: "0 0 2 * * ?" means 02:00
    there and something else here, so it is refused with the five-field form to use."""
    fields = cron.split()
    if cron.strip().startswith("@") or len(fields) == 5:
        return
    hint = ""
    if len(fields) in (6, 7) and fields[0] == "0" and fields[5] in ("?", "*") and "?" in fields[3:6]:
        hint = f"; for a Quartz expression (seconds first) drop the seconds and the year: " \
               f"{' '.join(f.replace('?', '*') for f in fields[1:6])!r}"
    raise CampaignError(f"window cron {cron!r} has {len(fields)} field(s); it needs 5 ({CRON_FIELDS})" + hint)


@dataclass(frozen=True)
class Window:
    """Maintenance window: starts at each cron time (in ``tz``), open for ``minutes``."""

    cron: str
    minutes: int
    tz: str = "UTC"

    @classmethod
    def parse(cls, data: Any) -> Window | None:
        if data is None:
            return None
        if not isinstance(data, dict) or set(data) - {"cron", "minutes", "tz"}:
            raise CampaignError("window must be {cron, minutes, tz}")
        cron = data.get("cron")
        if not isinstance(cron, str):
            raise CampaignError("window cron must be a text like '0 2 * * *'")
        _five_fields(cron)
        if not croniter.is_valid(cron):
            raise CampaignError(f"window cron {cron!r} is not a valid cron expression")
        minutes = _number(data, "minutes", None, 1, 7 * 24 * 60, integer=True)
        if minutes is None:
            raise CampaignError("window needs minutes (how long it stays open)")
        tz = data.get("tz", "UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):  # OSError: a name too long
            raise CampaignError(f"unknown time zone {tz!r}") from None
        return cls(cron, minutes, tz)


@dataclass(frozen=True)
class CampaignSpec:
    filter: TargetFilter = field(default_factory=TargetFilter)
    waves: list[Wave] = field(default_factory=lambda: [Wave(p) for p in DEFAULT_WAVES])
    on_failure: str = "pause"
    max_in_flight: int = 10
    rate: float | None = None        # starts per minute; None: no limit
    rate_growth: float = 1.0         # x per minute while no device fails
    max_rate: float | None = None
    window: Window | None = None
    timeouts: dict[str, int] = field(default_factory=lambda: {"download": 900, "install": 300, "confirm": 300})
    retries: int = 2                 # extra attempts after a failed or timed-out one
    backoff: int = 60                # seconds before the first retry; doubles per attempt
    probation: int = 300             # seconds a confirmed device must stay healthy
    dynamic: bool = False            # devices matching later join while the campaign runs
    transport: str = "mqtt"          # payload transport of its deployment (docs/http-transport.md)

    @classmethod
    def parse(cls, data: dict | None) -> CampaignSpec:
        data = dict(data or {})
        known = {"filter", "waves", "success", "failure", "on_failure", "max_in_flight", "rate", "rate_growth",
                 "max_rate", "window", "timeouts", "retries", "backoff", "probation", "dynamic", "transport"}
        unknown = set(data) - known
        if unknown:
            raise CampaignError(f"unknown campaign field(s): {', '.join(sorted(unknown))}")
        success = _number(data, "success", None, 0.0, 100.0)  # None: 100 - failure, per wave
        failure = _number(data, "failure", 0.0, 0.0, 100.0)
        raw_waves = data.get("waves", list(DEFAULT_WAVES))
        if not isinstance(raw_waves, list) or not raw_waves:
            raise CampaignError("waves must be a non-empty list")
        waves = [Wave.parse(w, success, failure) for w in raw_waves]
        last = None
        for w in waves:
            if w.percent is not None:
                if last is not None and w.percent < last:
                    raise CampaignError("wave percentages are cumulative: they must not decrease")
                last = w.percent
        on_failure = data.get("on_failure", "pause")
        if on_failure not in ON_FAILURE:
            raise CampaignError(f"on_failure must be one of {', '.join(ON_FAILURE)}")
        timeouts = dict(cls().timeouts)
        raw_timeouts = data.get("timeouts") or {}
        if not isinstance(raw_timeouts, dict) or set(raw_timeouts) - set(timeouts):
            raise CampaignError("timeouts must be {download, install, confirm} in seconds")
        for step in timeouts:
            timeouts[step] = _number(raw_timeouts, step, timeouts[step], 1, None, integer=True)
        dynamic = data.get("dynamic", False)
        if not isinstance(dynamic, bool):
            raise CampaignError("dynamic must be true or false")
        transport = data.get("transport", "mqtt")
        if transport not in ("mqtt", "http"):
            raise CampaignError("transport must be mqtt or http")
        rate = _number(data, "rate", None, 0.01)
        max_rate = _number(data, "max_rate", None, 0.01)
        return cls(TargetFilter.parse(data.get("filter")), waves, on_failure,
                   _number(data, "max_in_flight", 10, 1, None, integer=True), rate,
                   _number(data, "rate_growth", 1.0, 1.0, 100.0), max_rate, Window.parse(data.get("window")),
                   timeouts, _number(data, "retries", 2, 0, 100, integer=True),
                   _number(data, "backoff", 60, 0, None, integer=True),
                   _number(data, "probation", 300, 0, None, integer=True), dynamic, transport)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["filter"] = {k: v for k, v in data["filter"].items() if v not in (None, [], {})}
        data["waves"] = [{k: v for k, v in w.items() if v not in (None, [])} for w in data["waves"]]
        return data
