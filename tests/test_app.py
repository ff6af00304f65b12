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
from fota.testkit.broker import accepted as broker_accepts
from fota.testkit.checked_mqtt import acknowledged


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
            # (acknowledged: a publish that never reached the broker would pass for a refused one)
            acknowledged(b.publish("fota/v1/acl-a/cmd", b"from b", qos=1))
            acknowledged(a.publish("fota/v1/acl-a/cmd", b"from a itself", qos=1))
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
                cl.disconnect()
                cl.loop_stop()

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
        c.disconnect()
        c.loop_stop()
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


def _server_session(port, password, client_id, clean_start, expiry):
    """An MQTT 5 client on the server account; returns (client, session_present)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set("fota-server", password)
    flags = []
    c.on_connect = lambda cl, ud, f, rc, props: flags.append((f.session_present, rc))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    c.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not flags and time.monotonic() < deadline:
        time.sleep(0.02)
    assert flags and not flags[0][1].is_failure, flags
    return c, flags[0][0]


def _old_managed_broker(home, users):
    """The managed Mosquitto as fota ran it before the service listener: one listener on
    broker_port, every account (server included) in one password file, any client id."""
    import os
    import socket
    import subprocess
    from fota.server.broker import DEVICE_ACL, mosquitto_binary, write_acl, write_passwords
    from fota.server.credentials import mosquitto_hash
    d = home.broker_dir
    d.mkdir(parents=True, exist_ok=True)
    write_passwords(d / "passwords", {u: mosquitto_hash(p) for u, p in users.items()})
    write_acl(d / "acl", "user fota-server\ntopic readwrite fota/#\n\n" + DEVICE_ACL)
    port = home.config()["broker_port"]
    lines = [f"listener {port} 127.0.0.1", "persistence true", f"persistence_location {d}/", "log_dest none",
             "allow_anonymous false", f"password_file {d / 'passwords'}", f"acl_file {d / 'acl'}"]
    if os.geteuid() == 0:
        lines.append("user root")
    (d / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(d / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "the old broker did not start"
            time.sleep(0.05)


def test_home_from_before_the_service_listener_keeps_working(tmp_path):
    """A home made by a fota whose center connected to the one listener as 'fota-center': its
    config gets a service port on load, devices keep their port, and the statuses still queued
    in the old center session are ingested, then that session is deleted."""
    import json
    from sqlalchemy import select
    from fota.device import protocol as P
    from fota.server.broker import LEGACY_CENTER_ID, free_port
    from fota.server.center.workgroup import DRAIN_QUIET
    from fota.server.store import StatusEvent
    home = Home(tmp_path / "home")
    home.keyring.init()
    home.path.mkdir(parents=True, exist_ok=True)
    old = {"database_url": f"sqlite:///{home.path / 'fota.db'}", "broker_url": None, "broker_port": free_port(),
           "server_password": "old-secret"}
    home.config_path.write_text(json.dumps(old))
    cfg = home.config()
    assert cfg["broker_port"] == old["broker_port"] and cfg["broker_service_port"] not in (None, old["broker_port"])
    assert json.loads(home.config_path.read_text()) == cfg  # saved: every process sees the same port
    assert home.device_broker == ("127.0.0.1", old["broker_port"])
    store = Store(home.database_url)
    _, pw = provision_device(store, "old-dev", "unix")
    # What the old center left in the old broker: its persistent session, subscribed, and
    # statuses queued in it.
    broker = _old_managed_broker(home, {"fota-server": "old-secret", "old-dev": pw})
    try:
        # As the old center connected (clean start false: Mosquitto saves only such sessions to disk).
        legacy, _ = _server_session(cfg["broker_port"], "old-secret", LEGACY_CENTER_ID, False, 0xFFFFFFFF)
        legacy.subscribe([("fota/v1/+/status", 1)])
        time.sleep(0.3)
        legacy.disconnect()
        legacy.loop_stop()
        dev, _ = _connect(cfg["broker_port"], "old-dev", pw)
        time.sleep(0.3)
        for seq in range(1, 6):
            msg = {"job": None, "state": "idle", "code": None, "reason": None, "boot": 1, "seq": seq}
            info = dev.publish(P.topic("old-dev", P.STATUS), json.dumps(msg), qos=1)
            info.wait_for_publish(5)
            assert info.is_published()
        dev.disconnect()
        dev.loop_stop()
    finally:
        broker.terminate()  # Mosquitto saves the sessions on the way out (persistence)
        broker.wait(10)

    def stored():
        with store.session() as s:
            return set(s.scalars(select(StatusEvent.seq).where(StatusEvent.device_id == "old-dev")))

    async def scenario():
        async with control_center(home) as center:
            assert center.client_id == "fota:center"
            deadline = time.monotonic() + 15
            while stored() != {1, 2, 3, 4, 5} and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert stored() == {1, 2, 3, 4, 5}
            await asyncio.sleep(DRAIN_QUIET + 1.5)  # the drain deletes the session once quiet
            probe, present = _server_session(cfg["broker_service_port"], "old-secret", LEGACY_CENTER_ID, False, 0)
            probe.disconnect()
            probe.loop_stop()
            assert not present  # the old session is gone

    asyncio.run(scenario())
    store.dispose()


def test_rekey_and_revoke_reach_the_managed_broker(tmp_path):
    """`fota device rekey` and `fota device revoke` rewrite the password file and reload the managed
    Mosquitto: the old password, then the device, are refused; another device is untouched."""
    from fota.server.broker import Mosquitto
    from inproc import run_fota
    home = Home(tmp_path / "home")
    cfg = home.config()
    env = {"FOTA_HOME": str(home.path), "COLUMNS": "200"}

    def fota(*args) -> str:
        done = run_fota(args, env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def accepted(user, password) -> bool:
        return broker_accepts(cfg["broker_port"], user, password)

    def settled(user, password, want: bool) -> bool:  # a reload is asynchronous
        deadline = time.monotonic() + 5
        while accepted(user, password) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        return accepted(user, password) == want

    pw_a = fota("device", "add", "mq-a", "--hardware", "unix").rsplit("password ", 1)[1].split()[0]
    pw_b = fota("device", "add", "mq-b", "--hardware", "unix").rsplit("password ", 1)[1].split()[0]
    broker = Mosquitto(home.broker_dir, port=cfg["broker_port"], service_port=cfg["broker_service_port"],
                       auth=True).start()
    try:
        assert accepted("mq-a", pw_a) and accepted("mq-b", pw_b)
        new_a = fota("device", "rekey", "mq-a").rsplit("new password ", 1)[1].split()[0]
        assert settled("mq-a", pw_a, False) and accepted("mq-a", new_a)
        fota("device", "revoke", "mq-a")
        assert settled("mq-a", new_a, False) and accepted("mq-b", pw_b)
    finally:
        broker.stop()


def test_managed_broker_saves_its_sessions_every_broker_autosave_seconds(tmp_path):
    """config.json's broker_autosave sets how often the managed Mosquitto saves its sessions (a
    large fleet's saves stall its one thread: docs/operations.md §4b); a bad value is refused
    before anything starts, naming the setting."""
    from fota.server.app import managed_broker
    from fota.server.home import HomeError
    home = Home(tmp_path / "home")
    home.keyring.init()
    store = home.store()
    conf = home.broker_dir / "mosquitto.conf"
    try:
        for setting, expected in ((None, "autosave_interval 1"), (120, "autosave_interval 120")):
            cfg = home.config()
            if setting is not None:
                cfg["broker_autosave"] = setting
                home.save_config(cfg)
            broker = managed_broker(home, store)
            try:
                assert expected in conf.read_text().splitlines()
                assert "persistence true" in conf.read_text().splitlines()
                assert broker.proc.poll() is None  # Mosquitto took the setting and runs
            finally:
                broker.stop()
        for bad in (0, -5, 1.5, "60", True, 86401):
            cfg = home.config()
            cfg["broker_autosave"] = bad
            home.save_config(cfg)
            conf.unlink(missing_ok=True)
            with pytest.raises(HomeError, match="broker_autosave must be a whole number of seconds"):
                managed_broker(home, store)
            assert not conf.exists()  # refused before the broker was configured
    finally:
        store.dispose()


def test_serve_rewrites_the_password_file_from_the_registry_at_start(tmp_path):
    """An account changed while no control center ran (through an API on another home, a restored
    database: here straight in the registry, the password file left as it was) is in force once the
    control center starts: it writes the managed Mosquitto's password file from the registry first."""
    from fota.server.fleet import rekey_device, revoke_device
    home = Home(tmp_path / "home")
    home.keyring.init()
    port = home.config()["broker_port"]
    store = Store(home.database_url)
    _, pw_a = provision_device(store, "st-a", "unix")
    _, pw_b = provision_device(store, "st-b", "unix")
    home.sync_broker_passwords(store)
    revoke_device(store, "st-a")
    _, new_b = rekey_device(store, "st-b")
    stale = (home.broker_dir / "passwords").read_text()
    assert "st-a:" in stale  # what a broker started on this file would take

    def accepted(user, password) -> bool:
        return broker_accepts(port, user, password)

    async def scenario():
        async with control_center(home):
            assert not accepted("st-a", pw_a) and not accepted("st-b", pw_b)
            assert accepted("st-b", new_b)

    asyncio.run(scenario())
    store.dispose()


def test_the_homes_api_app_rekeys_at_the_homes_broker(tmp_path):
    """The API app `fota api` and `fota demo` serve (home_api_app) rewrites the home's broker
    accounts after a rekey through it: a rekey in the demo's dashboard reaches the managed
    Mosquitto's password file (the demo's app used to be made without it: "knows no home")."""
    from starlette.testclient import TestClient

    from fota.server.app import home_api_app
    from fota.server.auth import create_token
    home = Home(tmp_path / "home")
    home.keyring.init()
    store = home.store()
    try:
        provision_device(store, "api-a", "unix")
        home.sync_broker_passwords(store)
        before = (home.broker_dir / "passwords").read_text()
        _, secret = create_token(store, "ops", "admin")
        with TestClient(home_api_app(home, store)) as client:
            r = client.post("/api/v1/devices/api-a/rekey", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        broker = r.json()["broker"]
        assert (broker["kind"], broker["file"], broker["error"]) == \
            ("mosquitto", str(home.broker_dir / "passwords"), None), broker
        after = (home.broker_dir / "passwords").read_text()
        assert after != before and "api-a:" in after
    finally:
        store.dispose()
