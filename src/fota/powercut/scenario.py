"""Prepare power-cut scenarios (CPython): keys, two signed image releases, the signed update
command, and a provisioned `sim`-backend device with the first release in slot a.

fota.powercut.harness runs them (on CPython or MicroPython). The releases and the command are made
by the project's own tools (Keyring, build_manifest, update_command), as the control center
makes them.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

from fota.device import protocol as P
from fota.device.slots.sim import SimBackend, SimFlash
from fota.server.releases import build_manifest, update_command
from fota.tools.devicedir import create_device_dir
from fota.tools.keyring import Keyring

DEVICE = "cut-1"
HARDWARE = "sim-board"
FIRST, SECOND, THIRD = "1.0.0", "2.0.0", "3.0.0"
SCENARIOS = ("update", "revert", "second")


def _release(signer, version: str, image: bytes, counter: int):
    manifest = build_manifest(version, [HARDWARE], "image", image, counter)
    return SimpleNamespace(manifest=manifest, key_id=signer.kid, signature=signer.sign(manifest.encode()))


def build(out: Path, *, image_size: int = 24 * 1024, sector: int = 4096, erased: int = 0xFF,
          align: int = 4, chunk: int = 1024, window: int = 4, seed: int = 1, max_trial_boots: int = 3,
          keys: Path | None = None) -> dict[str, Path]:
    """Write one directory per scenario under `out`; returns {name: directory}.

    update  1.0.0 (slot a) -> 2.0.0 (healthy): download, install, trial boot, confirm.
    revert  1.0.0 -> 2.0.0 whose health check fails: trial boots fail, the device reverts.
    second  2.0.0 confirmed in slot b, 1.0.0 still in slot a -> 3.0.0 into slot a: the slot
            written over still holds a version the boot record names.
    """
    out = Path(out)
    rng = random.Random(seed)
    slot_size = -(-(image_size + 1) // sector) * sector
    v1 = rng.randbytes(image_size - 333)          # images of different sizes, neither sector-aligned
    v2 = rng.randbytes(image_size)
    v3 = rng.randbytes(image_size - 1000)
    keyring = Keyring(Path(keys) if keys else out / "keys")
    if not keyring.exists():
        keyring.init()
    signer = keyring.signer()
    images = {v: [len(data), hashlib.sha256(data).hexdigest()] for v, data in ((FIRST, v1), (SECOND, v2), (THIRD, v3))}
    dirs = {}
    for name in SCENARIOS:
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        template = d / "template"
        create_device_dir(template, device_id=DEVICE, hardware=HARDWARE, root_key=keyring.root_public(),
                          trust=keyring.trust(), host="127.0.0.1", port=1, password="unused", app_files={},
                          version=FIRST, backend="sim", capacity=slot_size,
                          flash={"sector": sector, "align": align, "erased": erased},
                          max_trial_boots=max_trial_boots, trial_timeout_ms=60000, chunk_timeout_ms=3000)
        shutil.rmtree(template / "slots")  # the files backend's directories: not used by `sim`
        flash = SimFlash(2 * slot_size, sector=sector, align=align, erased=erased, path=str(template / "flash.bin"))
        factory = SimBackend(flash, slot_size)  # the factory image in slot a
        for slot, data in (("a", v1), ("b", v2)) if name == "second" else (("a", v1),):
            factory.begin(slot, len(data))
            factory.write(slot, 0, data)
            factory.finalize(slot, len(data))
        flash.close()
        job, first, slot, counter, new, image = 7, FIRST, "a", 0, SECOND, v2
        if name == "second":  # as left by a confirmed update to 2.0.0
            job, first, slot, counter, new, image = 8, SECOND, "b", 1, THIRD, v3
            (template / "boot.json").write_text(json.dumps(
                {"active": "b", "versions": {"a": FIRST, "b": SECOND}, "trial": None, "report": None, "counter": 1}))
            (template / "agent.json").write_text(json.dumps({"last_job": 7, "boot": 2, "time": 0}))
        command = update_command(job, DEVICE, _release(signer, new, image, counter + 1), signer, chunk, window)
        (d / "image.bin").write_bytes(image)
        meta = {
            "name": name, "device": DEVICE, "job": job, "command": command.decode(), "chunk": chunk,
            "window": window, "images": images, "first": first, "first_slot": slot,
            "counter_before": counter, "unhealthy": [SECOND] if name == "revert" else [],
            "expect": ({"version": first, "state": P.REVERTED, "counter": counter} if name == "revert"
                       else {"version": new, "state": P.CONFIRMED, "counter": counter + 1}),
            "max_trial_boots": max_trial_boots, "trial_timeout": 60000, "chunk_timeout": 3000,
            "slot_size": slot_size,
            "flash": {"sector": sector, "align": align, "erased": erased, "image_size": image_size},
        }
        (d / "scenario.json").write_text(json.dumps(meta))
        dirs[name] = d
    return dirs
