"""Create the directory of a unix-port device (what provisioning writes onto a board)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from fota.device import boot as bootrec


def create_device_dir(root: Path, *, device_id: str, hardware: str, root_key: bytes, trust: dict, host: str,
                      port: int, password: str, app_files: dict[str, bytes], version: str,
                      backend: str = "files", capacity: int = 1 << 20, cadata: bytes | None = None,
                      enc_key: str | None = None,
                      server_hostname: str | None = None, **settings) -> Path:
    """Write config.json, the boot record and slot a with the factory app.

    root_key: the 65-byte root public key the device pins; trust: the trust document (root-
    certified signing keys) it starts with; the provisioning time is its first trusted time.
    enc_key: the device's payload-encryption key (hex), from the store's Device.enc_key.

    cadata: the broker's CA certificate (DER): the device connects over TLS and accepts only a
    broker certificate issued by it for server_hostname (default: host).
    """
    root = Path(root)
    (root / "slots" / "a" / "app").mkdir(parents=True, exist_ok=True)
    (root / "slots" / "b").mkdir(parents=True, exist_ok=True)
    config = {
        "id": device_id, "hardware": hardware, "root": root_key.hex(), "trust": trust, "backend": backend,
        "capacity": capacity, "version": version, "time": int(time.time()), "enc_key": enc_key,
        "broker": {"host": host, "port": port, "user": device_id, "password": password, "keepalive": 30},
    }
    if cadata is not None:
        config["broker"].update(tls=True, cadata=cadata.hex())
        if server_hostname:
            config["broker"]["server_hostname"] = server_hostname
    config.update(settings)
    (root / "config.json").write_text(json.dumps(config, indent=1))
    for name, data in app_files.items():
        target = root / "slots" / "a" / "app" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "boot.json").write_text(json.dumps(bootrec.new_record(version)))
    return root


def read_boot_record(root: Path) -> dict:
    return json.loads((Path(root) / "boot.json").read_text())


def running_version(root: Path) -> str | None:
    rec = read_boot_record(root)
    return rec["versions"].get(rec["active"])
