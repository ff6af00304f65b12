"""Create the directory of a unix-port device (what provisioning writes onto a board)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from fota.device import boot as bootrec
from fota.tools.private import private_dir, private_tree, write_private


def create_device_dir(root: Path, *, device_id: str, hardware: str, root_key: bytes, trust: dict, host: str,
                      port: int, password: str, app_files: dict[str, bytes], version: str,
                      backend: str = "files", capacity: int = 1 << 20, cadata: bytes | None = None,
                      enc_key: str | None = None,
                      server_hostname: str | None = None, **settings) -> Path:
    """Write config.json, the boot record and slot a with the factory app.

    root_key: the 65-byte root public key the device pins; trust: the trust document (root-
    certified signing keys) it starts with; the provisioning time is its first trusted time.
    enc_key: the device's payload-encryption key (hex; the store keeps it wrapped: Kek.device_key).

    The directory is private to its owner (0700; files 0600).

    cadata: the broker's CA certificate (DER): the device connects over TLS and accepts only a
    broker certificate issued by it for server_hostname (default: host).
    """
    root = private_dir(root)  # config.json holds the broker password and the payload key
    private_dir(root / "slots" / "a" / "app")
    private_dir(root / "slots" / "b")
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
    write_private(root / "config.json", json.dumps(config, indent=1))
    for name, data in app_files.items():
        target = root / "slots" / "a" / "app" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "boot.json").write_text(json.dumps(bootrec.new_record(version)))
    private_tree(root)  # whatever the umask gave the app files and the boot record
    return root
