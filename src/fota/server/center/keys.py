"""Key pushes: the signing key the center signs commands with, and the root-signed key update
(fota.tools.keyring) every device whose trust version is older gets, on its command topic
(QoS 1, so a sleeping or offline device finds it queued ahead of any command signed with the
new key).

A rotation or revocation (``fota keys rotate|revoke`` rewrites the keyring's files) is picked up
within ``keys_interval`` seconds; a device's inventory that reports an older trust version gets
the update at once; the sender pushes it ahead of a command to a device still behind.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

from sqlalchemy import select

from fota.device import protocol
from fota.server.center.inventory import trust_version
from fota.server.store import Device, Store
from fota.tools.keyring import Keyring, Signer
from fota.tools.signing import SigningError

log = logging.getLogger(__name__)

KEYS_INTERVAL = 1.0              # s between looks at the keyring's files (rotation, revocation)


def _version(keys_update: bytes) -> int:
    """The trust version a root-signed key update brings."""
    return json.loads(json.loads(keys_update)["body"])["version"]


class KeyPusher:
    def __init__(self, store: Store, db: Callable[..., Awaitable], publish: Callable[[str, bytes, int], bool],
                 signer: Signer, keys_update: bytes | None, *, keyring: Keyring | None = None,
                 keys_interval: float = KEYS_INTERVAL, pushes: Callable[[], bool] = lambda: True):
        self.store = store
        self.db = db                     # runs a function on the database thread
        self.publish = publish           # (topic, payload, qos) -> False if not connected yet
        self.signer = signer             # signs every command
        self.keys_update = keys_update
        self.keys_version = _version(keys_update) if keys_update else 0
        # keyring: watched for rotations and revocations (None: keys change only by set_keys).
        self.keyring = keyring
        self.keys_interval = keys_interval
        self.pushes = pushes             # of several workers, only one pushes a rotation to the fleet
        self.key_updates = 0             # key updates published
        self._pushed: dict[str, int] = {}  # device -> trust version last pushed to it by us
        self._seen = keyring.fingerprint() if keyring is not None else None
        self._lock = asyncio.Lock()

    def behind(self, inventory: dict | None) -> bool:
        """Whether a device's inventory reports a trust version older than ours."""
        version = trust_version(inventory)
        return bool(self.keys_update) and version is not None and version < self.keys_version

    def sync(self, device_id: str, inventory: dict) -> None:
        """Send the current key update to a device whose inventory reports an older trust version."""
        if self.behind(inventory) and self.publish(protocol.topic(device_id, protocol.CMD), self.keys_update, 1):
            self._pushed[device_id] = self.keys_version
            self.key_updates += 1
            log.info("key update v%d sent to %s (has v%d)", self.keys_version, device_id, inventory["keys"])

    def push_ahead_of_command(self, device_id: str) -> None:
        """The key update for a device behind, unless we pushed it already: published before its
        command on the same session (QoS 1 keeps the order), since the device must trust the new
        key before it checks the command. (Another worker may not have pushed it yet.)"""
        if self._pushed.get(device_id) != self.keys_version:
            self.publish(protocol.topic(device_id, protocol.CMD), self.keys_update, 1)
            self._pushed[device_id] = self.keys_version
            self.key_updates += 1

    async def set_keys(self, signer: Signer, keys_update: bytes) -> int:
        """Switch to a rotated signing key and push the root-signed key update to every device
        whose trust version is older; returns how many it was pushed to.

        Offline and sleeping devices get it queued on their persistent sessions (QoS 1), ahead
        of any command signed with the new key. A device that never connected has no session:
        it gets the update when it publishes its inventory. Of several workers only one pushes
        (the first live one by id), so a device gets it once.
        """
        self.signer = signer
        self.keys_update = keys_update
        self.keys_version = _version(keys_update)
        if not self.pushes():
            return 0
        devices = await self.db(self._devices_behind, self.keys_version)
        for device_id, inventory in devices:
            self.sync(device_id, inventory)
        log.info("keys v%d (signing key %s): key update queued for %d device(s)", self.keys_version,
                 signer.kid, len(devices))
        return len(devices)

    def _devices_behind(self, version: int) -> list[tuple[str, dict]]:
        """(DB thread) devices whose last inventory reports a trust version below ``version``."""
        with self.store.session() as s:
            rows = s.execute(select(Device.id, Device.inventory)).all()
        return [(device_id, inventory) for device_id, inventory in rows
                if trust_version(inventory) is not None and inventory["keys"] < version]

    async def run(self) -> None:
        """Pick up a rotation or revocation written to the keyring while we run."""
        if self.keyring is None:
            return
        await asyncio.sleep(self.keys_interval)  # workers: the live ones are known after a heartbeat
        try:  # a rotation made while no center ran: queue its key update for sleeping devices too
            await self.set_keys(self.signer, self.keys_update)
        except Exception:
            log.exception("pushing the key update failed")
        while True:
            await asyncio.sleep(self.keys_interval)
            try:
                await self.reload_keys()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reloading the keys failed")

    async def reload_keys(self) -> bool:
        """Switch to the keyring's keys if its files changed; True if they did."""
        async with self._lock:  # the sender and the keys loop both look: one switch, one push
            return await self._reload_keys()

    async def _reload_keys(self) -> bool:
        seen = self.keyring.fingerprint()
        if seen == self._seen:
            return False
        try:
            signer, keys_update = self.keyring.current()
        except SigningError as exc:  # a rotation still writing its files: look again shortly
            log.info("keys changed but not usable yet: %s", exc)
            return False
        self._seen = seen
        if signer.kid == self.signer.kid and keys_update == self.keys_update:
            return False
        log.warning("keys changed: signing key %s (was %s), trust version %s", signer.kid, self.signer.kid,
                     _version(keys_update))
        await self.set_keys(signer, keys_update)
        return True
