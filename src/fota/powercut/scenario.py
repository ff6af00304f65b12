"""Prepare power-cut scenarios (CPython): keys, signed releases, the signed update command, and a
provisioned device on one slot backend with the first release in slot a.

fota.powercut.harness runs them (on CPython or MicroPython). The releases, the commands and the
delta patches are made by the project's own tools (Keyring, build_manifest, update_command,
fota.server.delta.encode), as the control center makes them.

Backends:
  sim    a simulated NOR flash (flash.bin); images are raw bytes;
  esp32  the board's OTA partitions through its `esp32` module (the emulation of
         fota.testkit.boards on a development machine: the caller puts its directory on the
         import path); images are ESP app images
         (header, segments, checksum, appended SHA-256) that the bootloader accepts;
  files  slot directories on the board's filesystem; images are app bundles (app.py, data.bin).
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
from fota.tools import bundle, espimage
from fota.tools.devicedir import create_device_dir
from fota.tools.keyring import Keyring

DEVICE = "cut-1"
HARDWARE = "sim-board"
FIRST, SECOND, THIRD = "1.0.0", "2.0.0", "3.0.0"
SCENARIOS = ("update", "revert", "second", "delta")
BACKENDS = ("sim", "esp32", "files")
FILE_MODELS = {"sim": "replace", "esp32": "littlefs", "files": "littlefs"}
ESP_BLOCK = 4096
ESP_CHIP_ID = 0  # esp32


def esp_app_image(payload: bytes, chip_id: int = ESP_CHIP_ID) -> bytes:
    """`payload` as an ESP app image of two segments (fota.tools.espimage)."""
    half = len(payload) // 2
    return espimage.app_image([(espimage.DROM, payload[:half]), (espimage.IRAM, payload[half:])], chip_id)


def app_bundle(version: str, payload: bytes) -> bytes:
    return bundle.pack_files({"app.py": f"VERSION = {version!r}\n".encode(), "data.bin": payload})


def _edited(rng: random.Random, base: bytes) -> bytes:
    """A new release that shares most of its bytes with `base` (what a delta is for): a few
    patched runs and an insertion."""
    data = bytearray(base)
    for _ in range(6):
        at = rng.randrange(len(data) - 64)
        data[at:at + 40] = rng.randbytes(40)
    at = rng.randrange(len(data))
    data[at:at] = rng.randbytes(200)
    return bytes(data[:len(base) + 150])


def _release(signer, version: str, image: bytes, counter: int, kind: str):
    manifest = build_manifest(version, [HARDWARE], kind, image, counter)
    return SimpleNamespace(manifest=manifest, key_id=signer.kid, signature=signer.sign(manifest.encode()))


class _Slots:
    """Writes the factory state of one backend's template (the provisioning, or a past update)."""

    def __init__(self, backend: str, template: Path, slot_size: int, flash: dict):
        self.backend = backend
        self.template = template
        if backend == "sim":
            self.flash = SimFlash(2 * slot_size, sector=flash["sector"], align=flash["align"],
                                  erased=flash["erased"], path=str(template / "flash.bin"))
            self.be = SimBackend(self.flash, slot_size)
        elif backend == "esp32":
            import esp32  # the board module: the emulation (fota.testkit.boards), put on the path by the caller
            self.esp32 = esp32
            esp32.power = None
            esp32.setup(str(template / "flash.bin"), app_size=slot_size, chip_id=ESP_CHIP_ID)
        else:
            from fota.device.slots.files import FilesBackend
            self.be = FilesBackend(str(template / "slots"), 1 << 20)

    def install(self, slot: str, image: bytes, files=None):
        if self.backend == "esp32":
            # esptool's job (ota_0), or an update that was confirmed (ota_1)
            part = self.esp32.Partition("ota_0" if slot == "a" else "ota_1")
            part.writeblocks(0, image + b"\xff" * (-len(image) % ESP_BLOCK))
            if slot == "b":
                part.set_boot()
                self.esp32.reset()
                self.esp32.Partition.mark_app_valid_cancel_rollback()
            return
        self.be.begin(slot, len(image))
        self.be.write(slot, 0, image)
        self.be.finalize(slot, len(image), files)

    def close(self):
        if self.backend == "sim":
            self.flash.close()
        elif self.backend == "esp32":
            self.esp32.board().f.close()


def build(out: Path, *, backend: str = "sim", image_size: int = 24 * 1024, sector: int = 4096,
          erased: int = 0xFF, align: int = 4, chunk: int = 1024, window: int = 4, seed: int = 1,
          max_trial_boots: int = 3, keys: Path | None = None, scenarios=SCENARIOS,
          fs: str | None = None) -> dict[str, Path]:
    """Write one directory per scenario under `out`; returns {name: directory}.

    update  1.0.0 (slot a) -> 2.0.0 (healthy): download, install, trial boot, confirm.
    revert  1.0.0 -> 2.0.0 whose health check fails: trial boots fail, the device reverts.
    second  2.0.0 confirmed in slot b, 1.0.0 still in slot a -> 3.0.0 into slot a: the slot
            written over still holds a version the boot record names.
    delta   1.0.0 -> 2.0.0 sent as a delta patch against the running image (2.0.0 shares most
            of its bytes with 1.0.0 here), applied while it streams in.

    fs: the file model of the run (harness): "replace" or "littlefs"; default per backend
    (FILE_MODELS). sector/align/erased describe the `sim` flash only (esp32 blocks are 4096).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    out = Path(out)
    rng = random.Random(seed)
    v1 = rng.randbytes(image_size - 333)          # images of different sizes, neither sector-aligned
    v2 = rng.randbytes(image_size)
    v3 = rng.randbytes(image_size - 1000)
    v2d = _edited(rng, v1)                         # 2.0.0 of the delta scenario
    if backend == "esp32":
        sector = ESP_BLOCK
        v1, v2, v3, v2d = (esp_app_image(p) for p in (v1, v2, v3, v2d))
    elif backend == "files":
        v1, v2, v3, v2d = (app_bundle(v, p) for v, p in ((FIRST, v1), (SECOND, v2), (THIRD, v3), (SECOND, v2d)))
    slot_size = -(-(max(map(len, (v1, v2, v3, v2d))) + 1) // sector) * sector
    keyring = Keyring(Path(keys) if keys else out / "keys")
    if not keyring.exists():
        keyring.init()
    signer = keyring.signer()
    kind = "bundle" if backend == "files" else "image"
    flash = {"sector": sector, "align": align, "erased": erased}
    dirs = {}
    for name in scenarios:
        images = {FIRST: v1, SECOND: v2d if name == "delta" else v2, THIRD: v3}
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        template = d / "template"
        extra = {"flash": flash} if backend == "sim" else {"chip": "esp32"} if backend == "esp32" else {}
        create_device_dir(template, device_id=DEVICE, hardware=HARDWARE, root_key=keyring.root_public(),
                          trust=keyring.trust(), host="127.0.0.1", port=1, password="unused", app_files={},
                          version=FIRST, backend=backend, capacity=slot_size,
                          max_trial_boots=max_trial_boots, trial_timeout_ms=60000, chunk_timeout_ms=3000, **extra)
        shutil.rmtree(template / "slots")  # made again below by the files backend itself
        slots = _Slots(backend, template, slot_size, flash)
        factory = ((("a", FIRST), ("b", SECOND)) if name == "second" else (("a", FIRST),))
        for slot, version in factory:
            files = json.loads(build_manifest(version, [HARDWARE], kind, images[version])).get("files")
            slots.install(slot, images[version], files)
        slots.close()
        record = {"active": "a", "versions": {"a": FIRST, "b": None}, "trial": None, "report": None, "counter": 0,
                  "images": {"a": {"sha256": hashlib.sha256(v1).hexdigest(), "size": len(v1)}}}
        job, first, slot, counter, new = 7, FIRST, "a", 0, SECOND
        if name == "second":  # as left by a confirmed update to 2.0.0
            job, first, slot, counter, new = 8, SECOND, "b", 1, THIRD
            record = {"active": "b", "versions": {"a": FIRST, "b": SECOND}, "trial": None, "report": None,
                      "counter": 1, "images": {"a": record["images"]["a"],
                                               "b": {"sha256": hashlib.sha256(v2).hexdigest(), "size": len(v2)}}}
            (template / "agent.json").write_text(json.dumps({"last_job": 7, "boot": 2, "time": 0}))
        (template / "boot.json").write_text(json.dumps(record))
        image = images[new]
        delta = None
        served = image
        if name == "delta":
            from fota.device.delta import RC_FORMAT
            from fota.server.delta import DEFAULT_WBITS, encode
            # the newest format, which the center sends to an agent that decodes it (this one)
            served = encode(images[first], image, DEFAULT_WBITS, fmt=RC_FORMAT)
            delta = {"base_sha256": hashlib.sha256(images[first]).hexdigest(), "base_size": len(images[first]),
                     "size": len(served), "sha256": hashlib.sha256(served).hexdigest(), "wbits": DEFAULT_WBITS,
                     "format": RC_FORMAT}
        command = update_command(job, DEVICE, _release(signer, new, image, counter + 1, kind), signer, chunk, window,
                                 delta=delta)
        (d / "image.bin").write_bytes(served)
        meta = {
            "name": name, "backend": backend, "fs": fs or FILE_MODELS[backend], "delta": bool(delta),
            "device": DEVICE, "job": job, "command": command.decode(), "chunk": chunk,
            "window": window, "images": {v: [len(data), hashlib.sha256(data).hexdigest()] for v, data in images.items()},
            "first": first, "first_slot": slot,
            "counter_before": counter, "unhealthy": [SECOND] if name == "revert" else [],
            "expect": ({"version": first, "state": P.REVERTED, "counter": counter} if name == "revert"
                       else {"version": new, "state": P.CONFIRMED, "counter": counter + 1}),
            "max_trial_boots": max_trial_boots, "trial_timeout": 60000, "chunk_timeout": 3000,
            "slot_size": slot_size, "image_size": len(image),
            "flash": {"sector": sector, "align": align, "erased": erased, "image_size": image_size},
        }
        if backend == "esp32":
            meta["board"] = {"app_size": slot_size, "chip_id": ESP_CHIP_ID}
        if backend == "files":
            meta["files"] = {v: {n: hashlib.sha256(c).hexdigest() for n, c in bundle.unpack(data).items()}
                             for v, data in images.items()}
        (d / "scenario.json").write_text(json.dumps(meta))
        dirs[name] = d
    return dirs
