"""What a unix-port device's directory says: its boot record, the version it runs, and whether a
slot holds exactly a release (the directory fota.tools.devicedir.create_device_dir writes)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def read_boot_record(root: Path) -> dict:
    return json.loads((Path(root) / "boot.json").read_text())


def running_version(root: Path) -> str | None:
    rec = read_boot_record(root)
    return rec["versions"].get(rec["active"])


def verify_slot(root: Path, slot: str, manifest: dict, capacity: int | None = None) -> list[str]:
    """Check that `slot` of a unix-port device holds exactly the release `manifest` describes.

    files backend: the slot's app/ has every file of the manifest's `files` list with its size
    and SHA-256, and nothing else. sim backend: the slot's region of flash.bin starts with
    `size` bytes whose SHA-256 is the manifest's. Returns the problems found (empty: verified).
    """
    root = Path(root)
    config = json.loads((root / "config.json").read_text())
    problems = []
    if config.get("backend", "files") == "sim":
        slot_size = capacity or config.get("capacity", 256 * 1024)
        with open(root / "flash.bin", "rb") as f:
            f.seek(0 if slot == "a" else slot_size)
            data = f.read(manifest["size"])
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            problems.append(f"slot {slot}: image sha256 differs from the manifest's")
        return problems
    app = root / "slots" / slot / "app"
    want = {name: (size, digest) for name, size, digest in manifest.get("files") or []}
    have = {p.relative_to(app).as_posix(): p for p in app.rglob("*") if p.is_file()} if app.is_dir() else {}
    for name in sorted(set(want) - set(have)):
        problems.append(f"slot {slot}: {name} missing")
    for name in sorted(set(have) - set(want)):
        problems.append(f"slot {slot}: {name} not in the release")
    for name in sorted(set(want) & set(have)):
        data = have[name].read_bytes()
        if (len(data), hashlib.sha256(data).hexdigest()) != want[name]:
            problems.append(f"slot {slot}: {name} differs from the release")
    return problems
