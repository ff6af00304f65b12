"""Values devices write that the center acts on, checked before use: a device's last inventory
(its trust version, largest chunk, running image and delta window) and the integers of a chunk
request."""
from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def trust_version(inventory: dict | None) -> int | None:
    """The key-set version the device trusts (its inventory's ``keys``), if it reports one."""
    version = (inventory or {}).get("keys")
    return version if is_int(version) else None
