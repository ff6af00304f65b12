"""The control center's own Mosquitto: generated config, per-device ACL, restarted if it dies."""
from __future__ import annotations

import asyncio
import time

import paho.mqtt.client as mqtt
import pytest

from fota.server.app import control_center
from fota.server.fleet import provision_device
from fota.server.home import Home
from fota.server.store import Store


def _connect(port, user, password):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}")
    c.username_pw_set(user, password)
    got = []
    c.on_message = lambda cl, ud, m: got.append((m.topic, m.payload))
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c, got


def test_managed_broker_enforces_accounts_and_acl_and_is_restarted(tmp_path):
    home = Home(tmp_path / "home")
    home.keyring.init()
    cfg = home.config()
    store = Store(home.database_url)
    _, pw_a = provision_device(store, "acl-a", "unix")
    _, pw_b = provision_device(store, "acl-b", "unix")

    async def scenario():
        async with control_center(home) as center:
            port = cfg["broker_port"]
            a, got_a = _connect(port, "acl-a", pw_a)
            b, got_b = _connect(port, "acl-b", pw_b)
            time.sleep(0.3)
            assert a.is_connected() and b.is_connected()
            # A device may not read another device's commands...
            b.subscribe("fota/v1/acl-a/cmd", 1)
            a.subscribe("fota/v1/acl-a/cmd", 1)
            time.sleep(0.3)
            # ...nor publish commands (to anyone).
            b.publish("fota/v1/acl-a/cmd", b"from b", qos=1).wait_for_publish(5)
            a.publish("fota/v1/acl-a/cmd", b"from a itself", qos=1).wait_for_publish(5)
            time.sleep(0.5)
            assert got_a == [] and got_b == []
            # A wrong password is refused.
            bad, _ = _connect(port, "acl-a", "wrong")
            time.sleep(0.5)
            assert not bad.is_connected()
            bad.loop_stop()
            # The broker is supervised: killed, it comes back on the same port.
            broker_pid = int((home.broker_dir / "mosquitto.pid").read_text())
            import os, signal
            os.kill(broker_pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                pid_file = home.broker_dir / "mosquitto.pid"
                if pid_file.exists() and int(pid_file.read_text()) != broker_pid:
                    break
            else:
                pytest.fail("managed Mosquitto was not restarted")
            c, _ = _connect(port, "acl-a", pw_a)
            time.sleep(0.3)
            assert c.is_connected()
            for cl in (a, b, c):
                cl.loop_stop()
                cl.disconnect()

    asyncio.run(scenario())
    store.dispose()


def test_device_provisioned_while_the_managed_broker_starts_is_accepted(tmp_path):
    """A device provisioned after the broker read its password file but before its pid file
    existed (so nobody could tell it to reload) used to be refused until the next provisioning:
    `fota simulate` started together with `fota serve` lost some of its devices that way."""
    from fota.server.app import start_broker
    from fota.server.broker import Mosquitto
    home = Home(tmp_path / "home")
    home.keyring.init()
    store = Store(home.database_url)
    home.sync_broker_passwords(store)  # as `fota serve` does before starting the broker
    _, password = provision_device(store, "late-dev", "unix")  # its own sync found no broker to reload
    cfg = home.config()
    broker = start_broker(Mosquitto(home.broker_dir, port=cfg["broker_port"], service_port=cfg["broker_service_port"],
                                    auth=True), home, store)
    try:
        c, _ = _connect(broker.port, "late-dev", password)
        deadline = time.monotonic() + 5
        while not c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.is_connected()
        c.loop_stop()
        c.disconnect()
    finally:
        broker.stop()
        store.dispose()


def test_password_sync_reads_the_devices_under_the_lock(tmp_path):
    """Two processes syncing the password file at once: the one that waited for the lock
    writes what the database holds then, never the list it could have read before waiting."""
    import fcntl
    import threading
    home = Home(tmp_path / "home")
    home.keyring.init()
    store = Store(home.database_url)
    home.broker_dir.mkdir(parents=True)
    with open(home.broker_dir / "passwords.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is syncing
        waiting = threading.Thread(target=home.sync_broker_passwords, args=(store,))
        waiting.start()
        time.sleep(0.3)
        provision_device(store, "meanwhile", "unix")
    waiting.join(10)
    users = [line.split(":")[0] for line in (home.broker_dir / "passwords").read_text().splitlines()]
    assert "meanwhile" in users
    store.dispose()
