"""The names an operator gives, and the ids of rows: one safe form each, checked wherever they enter.

Release versions, campaign names, hardware types and tags end up in URLs and HTTP headers
(``Location``), in the signed manifest, in log lines and in the database. So they are short
ASCII words: no '/', no leading '.', no whitespace, no control or escape characters (a version
``../../..`` or one with a newline is refused, not stored). The patterns are written so that
Python's ``re``, pydantic (the HTTP API's schema) and JSON-Schema generators all read them alike.

    check(version, VERSION, "version", ReleaseError)     # -> version, or ReleaseError

Row ids are integers of the smallest integer column the stores use (PostgreSQL INTEGER):
``as_id("12")`` -> 12, ``as_id("99999999999999999999")`` -> None (no such row, rather than an
OverflowError from the driver).
"""
from __future__ import annotations

import re

__all__ = ["CAMPAIGN_NAME", "DEVICE_ID", "MAX_DB_INT", "MAX_NAME", "NAME", "VERSION", "as_id", "check",
           "describe", "matches", "may_be_stored"]

MAX_NAME = 64
MAX_DB_INT = 2**31 - 1  # PostgreSQL INTEGER, the narrowest integer column (ids, sizes, seconds)

# Semantic versions with pre-release and build metadata fit: 1.2.0, 1.2.0-rc.1+build.5, 2026.12.04
VERSION = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
# Hardware types and tags: esp32, rp2040, floor-2, eu.west
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# A NAME that is not all digits (a campaign reference of digits is its id); length checked apart
CAMPAIGN_NAME = r"^(?:[A-Za-z][A-Za-z0-9._-]*|[0-9]+[A-Za-z._-][A-Za-z0-9._-]*)$"
# Device ids: the broker's user name and client id, topic levels (fota.device.protocol)
DEVICE_ID = r"^[A-Za-z0-9_-]{1,64}$"

_RULES = {
    VERSION: "1-64 characters of [A-Za-z0-9._+-], starting with a letter or digit",
    NAME: "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit",
    CAMPAIGN_NAME: "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit, not all digits",
    DEVICE_ID: "1-64 characters of [A-Za-z0-9_-]",
}
_COMPILED = {pattern: re.compile(pattern) for pattern in _RULES}


def describe(pattern: str) -> str:
    """The rule of a pattern in words, for error messages and the API's schema."""
    return _RULES[pattern]


def matches(value: object, pattern: str) -> bool:
    """True if ``value`` is a string of this form."""
    # fullmatch: '$' alone would accept a trailing newline
    return isinstance(value, str) and len(value) <= MAX_NAME and _COMPILED[pattern].fullmatch(value) is not None


def check(value: object, pattern: str, what: str, error: type[Exception]) -> str:
    """``value`` if it is a string of this form; ``error`` naming ``what`` and the rule otherwise."""
    if matches(value, pattern):
        return value
    shown = repr(value) if not isinstance(value, str) or len(value) <= MAX_NAME else repr(value[:MAX_NAME]) + "…"
    raise error(f"invalid {what} {shown}: {describe(pattern)}")


def may_be_stored(value: object) -> bool:
    """True if ``value`` is a string a stored name can equal: also names stored before these
    rules (found, not refused); never one PostgreSQL cannot take (NUL, a lone surrogate from
    undecodable argv bytes) or longer than any."""
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isprintable()


def as_id(ref: object) -> int | None:
    """A row id from an int or a string of ASCII digits, if it is in the stores' range; else None."""
    if isinstance(ref, bool):
        return None
    if isinstance(ref, str):
        # str.isdigit() is True for '²' and other digits int() refuses; 10 digits hold MAX_DB_INT
        if not (ref.isascii() and ref.isdigit() and len(ref) <= 10):
            return None
        ref = int(ref)
    if isinstance(ref, int) and 1 <= ref <= MAX_DB_INT:
        return ref
    return None
