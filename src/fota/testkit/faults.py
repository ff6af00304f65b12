"""What every fault benchmark counts the same way: lost statuses and bricked devices.

Lost statuses. A device numbers its statuses (epoch, boot, seq): `boot` is its persisted boot
counter, `seq` counts 1, 2, 3, ... within a boot (fota.device.core), and `epoch` is chosen at
random when its agent state is created (0: a device that sends none), so a device whose counters
start over (state erased, simulator restarted) numbers its boots again in a new epoch. The
control center stores each status once by (device, epoch, boot, seq) (`StatusEvent`). So within
one boot of one epoch of one device, every seq below the highest one stored must be stored too: each one missing is a status the device published (or
generated) that never reached the table, a **lost status**, with one exception the device
itself documents: a health report still unsent when its connection died (or when the device
rebooted into an update) is dropped, since the next connection sends a fresh one
(fota.device.runner), and the device logs each such drop with its
JSON (`DROPPED_HEALTH`). A gap the device log names that way is counted apart ("superseded health
reports"), not as lost; every other gap is lost. What a device generated after its last stored
status of a boot (the tail cut by a crash) leaves no gap and is not counted here; a bench that
watches the broker (bench/restarts.py) adds what it saw there and the table lacks.

Bricked. A device is **bricked** when, at the end, it does not run a verified image (the version
its boot record names for the active slot is not one the bench knows, or the slot's content is
not exactly that version's files), is still on trial, or is not back on the broker (online, on
that version) within `online_timeout` seconds.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select

from fota.device.runner import DROPPED_HEALTH
from fota.server.store import StatusEvent
from fota.testkit.devices import read_boot_record, verify_slot
from fota.tools.waiting import TimedOut, wait_until

Key = tuple[str, int, int, int]   # (device, epoch, boot, seq)


def status_key(device_id: str, status: dict) -> Key:
    """A status message's key, as the control center de-duplicates it (epoch 0 when it has none)."""
    return device_id, status.get("epoch") or 0, status.get("boot"), status.get("seq")


def seq_gaps(keys: Iterable[Key]) -> list[Key]:
    """The (device, epoch, boot, seq) missing below the highest seq stored for each boot of each
    epoch of each device."""
    by_boot: dict[tuple[str, int, int], set[int]] = {}
    for device, epoch, boot, seq in keys:
        by_boot.setdefault((device, epoch, boot), set()).add(seq)
    return sorted((device, epoch, boot, seq) for (device, epoch, boot), seqs in by_boot.items()
                  for seq in range(1, max(seqs)) if seq not in seqs)


def stored_keys(store, device_ids: Iterable[str]) -> set[Key]:
    """Every (device, epoch, boot, seq) the control center stored for these devices."""
    ids = list(device_ids)
    with store.session() as s:
        return {tuple(row) for row in s.execute(
            select(StatusEvent.device_id, StatusEvent.epoch, StatusEvent.boot, StatusEvent.seq)
            .where(StatusEvent.device_id.in_(ids)))}


def dropped_health_reports(fleet, device_ids: Iterable[str]) -> set[Key]:
    """(device, epoch, boot, seq) of every health report the devices' logs say was dropped unsent."""
    dropped = set()
    for device_id in device_ids:
        for line in fleet.devices[device_id].log_text().splitlines():
            if DROPPED_HEALTH in line:
                try:
                    body = json.loads(line.split(DROPPED_HEALTH, 1)[1])
                    dropped.add(status_key(device_id, body))
                except (ValueError, AttributeError):
                    pass  # a line cut short by a kill: its gap stays counted as lost
    return dropped


def status_gaps(fleet, device_ids: Iterable[str], seen_on_broker: Iterable[Key] = ()) -> dict[str, list[Key]]:
    """{"lost": [...], "superseded": [...]}: the (epoch, boot, seq) gaps in what the control center stored
    for these devices, plus the statuses seen on the broker (a spy's keys) but not stored, split
    into lost statuses and the health reports the devices logged as dropped unsent."""
    ids = list(device_ids)
    stored = stored_keys(fleet.store, ids)
    missing = set(seq_gaps(stored)) | {k for k in seen_on_broker if k[0] in ids and k not in stored}
    dropped = dropped_health_reports(fleet, ids) & missing
    return {"lost": sorted(missing - dropped), "superseded": sorted(dropped)}


def files_manifest(files: dict[str, bytes]) -> dict:
    """The `files` list a release manifest would have for an app (name -> bytes): what
    verify_slot needs to check a provisioned version that was not released."""
    return {"files": [[name, len(data), hashlib.sha256(data).hexdigest()] for name, data in sorted(files.items())]}


def device_outcome(fleet, device_id: str, manifests: dict[str, dict], online_timeout: float = 30) -> dict:
    """What the bench can observe of one device once it settled (off trial and online on the
    version its boot record names; waited for up to `online_timeout` s, since a device may still
    be rebooting or on trial when a case ends): the version it runs, whether that slot holds
    exactly the version's files (`manifests`: version -> manifest), and `bricked` if it did not
    settle or its slot is not verified."""
    root = Path(fleet.devices[device_id].root)
    seen = {}

    def settled() -> bool:
        try:
            record = read_boot_record(root)
        except (OSError, ValueError):
            record = None   # being replaced right now, or gone
        running = record.get("versions", {}).get(record.get("active")) if record else None
        seen.update(record=record, running=running, on_trial=bool(record) and record.get("trial") is not None,
                    online=record is not None and fleet.online([device_id], version=running))
        return seen["online"] and not seen["on_trial"]

    try:
        wait_until(settled, timeout=online_timeout, interval=0.1, what=f"{device_id} settled")
    except TimedOut:
        settled()  # what it is at the deadline
    record, running, on_trial, online = seen["record"], seen["running"], seen["on_trial"], seen["online"]
    if record is None:
        problems = ["boot record unreadable"]
    elif running in manifests:
        problems = verify_slot(root, record["active"], manifests[running])
    else:
        problems = [f"runs {running!r}, not a version this bench knows"]
    return {"running": running, "verified": not problems, "problems": problems, "on_trial": on_trial,
            "online": online, "bricked": bool(problems) or on_trial or not online}
