"""Home Assistant update entities (fota.server.homeassistant): read as Home Assistant reads them,
on a real Mosquitto with the managed broker's ACL, from a control center driving real MicroPython
devices.

The schema checks below are written from Home Assistant's documentation of the MQTT update
platform and of MQTT discovery (https://www.home-assistant.io/integrations/update.mqtt/,
https://www.home-assistant.io/integrations/mqtt/): the configuration variables an update
entity's discovery config may hold, the keys of a JSON state and their types.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import select

from fota.examples import hello_files
from fota.server.audit import list_events
from fota.server.broker import HOMEASSISTANT_USER, SERVER_USER, Mosquitto
from fota.server.homeassistant import (DEFAULT_TAG, PAYLOAD_INSTALL, DeviceView, HomeAssistantBridge,
                                       HomeAssistantSettings, broker_acl, discovery_topic, set_opt_in)
from fota.server.releases import create_release
from fota.server.store import Deployment, Device
from fota.testkit.broker import BrokerAccounts
from fota.testkit.fleet import Fleet
from fota.tools.bundle import pack_files
from fota.tools.waiting import wait_until

PREFIX = "homeassistant"
RELEASE_URL = "https://fota.example/releases/{version}"

# Configuration variables of an MQTT update entity (discovery uses the same names).
DISCOVERY_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "command_topic",
    "device", "device_class", "display_precision", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "json_attributes_template", "json_attributes_topic", "latest_version_template",
    "latest_version_topic", "name", "object_id", "default_entity_id", "optional", "origin", "payload_available",
    "payload_install", "payload_not_available", "platform", "qos", "release_summary", "release_url", "retain",
    "state_topic", "title", "unique_id", "value_template"}
DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
               "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
# The keys a JSON state may carry.
STATE_KEYS = {"installed_version", "latest_version", "title", "release_summary", "release_url", "entity_picture",
              "in_progress", "update_percentage"}


def check_discovery(config: dict) -> None:
    assert set(config) <= DISCOVERY_KEYS, set(config) - DISCOVERY_KEYS
    assert config["device_class"] == "firmware"
    assert config["entity_category"] in ("config", "diagnostic")
    for key in ("state_topic", "availability_topic", "unique_id", "name", "payload_available",
                "payload_not_available"):
        assert isinstance(config[key], str) and config[key], key
    for key in ("state_topic", "availability_topic", "command_topic"):
        if key in config:
            assert "+" not in config[key] and "#" not in config[key]
    assert config["qos"] in (0, 1, 2)
    assert set(config["device"]) <= DEVICE_KEYS and config["device"]["identifiers"]
    assert set(config["origin"]) <= ORIGIN_KEYS and config["origin"]["name"]
    if "command_topic" in config:
        assert isinstance(config["payload_install"], str)


def check_state(state: dict) -> None:
    assert set(state) <= STATE_KEYS, set(state) - STATE_KEYS
    for key in ("installed_version", "latest_version", "title", "release_summary"):
        if key in state:
            assert isinstance(state[key], str), key
    assert len(state.get("release_summary", "")) <= 255
    if "release_url" in state:
        url = urlsplit(state["release_url"])
        assert url.scheme in ("http", "https") and url.netloc
    assert isinstance(state["in_progress"], bool)
    pct = state["update_percentage"]
    assert pct is None or (isinstance(pct, (int, float)) and not isinstance(pct, bool) and 0 <= pct <= 100)
    if pct is not None:
        assert state["in_progress"]


class HomeAssistant:
    """A paho client as Home Assistant's MQTT integration connects: the account `fota ha enable`
    creates, on the device listener, a last will and a birth message on <prefix>/status,
    subscribed to <prefix>/# and then to the topics each discovered entity names."""

    def __init__(self, broker, user=HOMEASSISTANT_USER, password=None):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ha-{secrets.token_hex(3)}")
        self.client.username_pw_set(user, password or broker.users[user])
        self.client.will_set(f"{PREFIX}/status", "offline", qos=1, retain=True)
        self.connected = threading.Event()
        self.refused = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refused = reason_code
            return
        client.subscribe([(f"{PREFIX}/#", 1)])
        client.publish(f"{PREFIX}/status", "online", qos=1, retain=True)
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
        if msg.topic.endswith("/config") and msg.payload:  # discovery: subscribe as the entity would
            config = json.loads(msg.payload)
            client.subscribe([(config["state_topic"], 1), (config["availability_topic"], 1)])

    def of(self, topic: str) -> list[bytes]:
        with self.lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def last(self, topic: str):
        got = self.of(topic)
        return got[-1] if got else None

    def last_json(self, topic: str):
        payload = self.last(topic)
        return json.loads(payload) if payload else None

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def ha_broker(tmp_path_factory):
    """A Mosquitto with the managed broker's ACL for Home Assistant (fota ha enable)."""
    with Mosquitto(tmp_path_factory.mktemp("mosquitto-ha"), auth=True, acl_extra=broker_acl(HOMEASSISTANT_USER)) as m:
        accounts = BrokerAccounts(m)
        accounts.add_users({SERVER_USER: secrets.token_urlsafe(12), HOMEASSISTANT_USER: secrets.token_urlsafe(12)})
        yield accounts


@pytest.fixture
def installs():
    return {"allowed": False}


@pytest.fixture
def ha_fleet(tmp_path, ha_broker, sqlite_url, installs, request):
    """A fleet whose center publishes Home Assistant entities; installs["allowed"] says whether
    Home Assistant may install. Parametrized indirectly, the parameter is more center settings."""
    settings = HomeAssistantSettings(installs=lambda: installs["allowed"], release_url=RELEASE_URL, interval=0.5)
    fleet = Fleet(tmp_path, ha_broker, sqlite_url, homeassistant=settings, **getattr(request, "param", {}))
    yield fleet
    fleet.close()


def _release(fleet, version, padding=0):
    files = hello_files(version)
    if padding:
        files["blob.bin"] = secrets.token_bytes(padding)
    return create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), version, ["unix"])


def _deployments(fleet):
    with fleet.store.session() as s:
        return list(s.scalars(select(Deployment)))


def _server_listener(broker, topics):
    """A subscriber on the server account that records what reaches `topics`."""
    got = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{secrets.token_hex(3)}")
    client.username_pw_set(SERVER_USER, broker.users[SERVER_USER])
    client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
    client.on_message = lambda c, u, msg: got.append((msg.topic, msg.payload))
    client.connect(broker.host, broker.service_port)
    client.loop_start()
    wait_until(client.is_connected, timeout=10, what="watcher connected")
    time.sleep(0.3)
    return client, got


def test_discovery_state_and_availability_follow_the_opted_in_device(ha_fleet, ha_broker, installs):
    fleet = ha_fleet
    fleet.add_device("ha-dev")
    fleet.add_device("plain-dev")
    fleet.wait_online("ha-dev", "plain-dev")
    _release(fleet, "1.1.0")
    assert set_opt_in(fleet.store, ["ha-dev"], DEFAULT_TAG, True) == ["ha-dev"]
    ha = HomeAssistant(ha_broker)
    try:
        assert ha.connected.wait(10), ha.refused
        config_topic = discovery_topic(PREFIX, "ha-dev")
        config = wait_until(lambda: ha.last_json(config_topic), timeout=15, what="discovery config")
        check_discovery(config)
        assert "command_topic" not in config and "payload_install" not in config  # installs are off
        state = wait_until(lambda: (s := ha.last_json(config["state_topic"])) and s.get("installed_version") and s,
                           timeout=15, what="state")
        check_state(state)
        assert state["installed_version"] == "1.0.0" and state["latest_version"] == "1.1.0"
        assert state["release_url"] == "https://fota.example/releases/1.1.0"
        assert state["in_progress"] is False and state["update_percentage"] is None
        wait_until(lambda: ha.last(config["availability_topic"]) == config["payload_available"].encode(),
                   timeout=15, what="available")
        assert not ha.of(discovery_topic(PREFIX, "plain-dev"))  # not opted in: no entity

        # Retained: Home Assistant started later finds the entity.
        late = HomeAssistant(ha_broker)
        try:
            assert late.connected.wait(10)
            wait_until(lambda: late.last_json(config_topic) == config, timeout=10, what="retained config")
        finally:
            late.close()

        # Installs are off: a publish to the would-be command topic starts nothing and is audited.
        ha.client.publish("fota/ha/ha-dev/install", PAYLOAD_INSTALL, qos=1)
        wait_until(lambda: list_events(fleet.store, action="ha.install.refused"), timeout=10, what="audited refusal")
        assert _deployments(fleet) == []
        assert fleet.center.center.homeassistant.installs_refused == 1

        # Allowing installs adds the install button (command topic) without a restart.
        installs["allowed"] = True
        config = wait_until(lambda: (c := ha.last_json(config_topic)) and "command_topic" in c and c,
                            timeout=10, what="command topic")
        check_discovery(config)
        assert config["command_topic"] == "fota/ha/ha-dev/install" and config["payload_install"] == PAYLOAD_INSTALL

        # The device goes offline: unavailable.
        fleet.devices["ha-dev"].stop()
        wait_until(lambda: ha.last(config["availability_topic"]) == config["payload_not_available"].encode(),
                   timeout=30, what="unavailable")

        # Opting out removes the entity: an empty retained config, and nothing retained for later.
        set_opt_in(fleet.store, ["ha-dev"], DEFAULT_TAG, False)
        wait_until(lambda: ha.last(config_topic) == b"", timeout=10, what="entity removed")
        late = HomeAssistant(ha_broker)
        try:
            assert late.connected.wait(10)
            time.sleep(1.0)
            assert not late.of(config_topic) and not late.of(config["state_topic"])
        finally:
            late.close()
    finally:
        ha.close()


def test_entity_removed_after_an_opt_out_while_the_center_was_down_and_after_a_deletion(ha_fleet, ha_broker):
    fleet = ha_fleet
    fleet.add_device("gone-dev", start=False)
    set_opt_in(fleet.store, ["gone-dev"], DEFAULT_TAG, True)
    ha = HomeAssistant(ha_broker)
    try:
        assert ha.connected.wait(10)
        topic = discovery_topic(PREFIX, "gone-dev")
        wait_until(lambda: ha.last(topic), timeout=15, what="discovery config")
        fleet.center.stop()
        set_opt_in(fleet.store, ["gone-dev"], DEFAULT_TAG, False)  # while no center runs
        from fota.testkit.center import CenterThread
        fleet.center = CenterThread(fleet.store, ha_broker.server_url, fleet.blobs, signer=fleet.signer,
                                    keys_update=fleet.keyring.keys_update(), kek=fleet.kek,
                                    homeassistant=HomeAssistantSettings(interval=0.5)).start()
        wait_until(lambda: ha.last(topic) == b"", timeout=15, what="stale entity removed")
        # A device deleted from the registry loses its entity too.
        fleet.add_device("deleted-dev", start=False)
        set_opt_in(fleet.store, ["deleted-dev"], DEFAULT_TAG, True)
        deleted = discovery_topic(PREFIX, "deleted-dev")
        wait_until(lambda: ha.last(deleted), timeout=15, what="discovery config")
        with fleet.store.session() as s:
            s.delete(s.get(Device, "deleted-dev"))
        wait_until(lambda: ha.last(deleted) == b"", timeout=15, what="deleted device's entity removed")
    finally:
        ha.close()


# Small chunks, one at a time: the download lasts long enough to be seen in progress.
@pytest.mark.parametrize("ha_fleet", [{"chunk": 256, "window": 1}], indirect=True)
def test_install_from_home_assistant_updates_a_micropython_device(ha_fleet, ha_broker, installs):
    fleet = ha_fleet
    installs["allowed"] = True
    fleet.add_device("ha-inst")
    fleet.wait_online("ha-inst")
    set_opt_in(fleet.store, ["ha-inst"], DEFAULT_TAG, True)
    _release(fleet, "1.1.0", padding=100_000)
    ha = HomeAssistant(ha_broker)
    try:
        assert ha.connected.wait(10)
        config = wait_until(lambda: ha.last_json(discovery_topic(PREFIX, "ha-inst")), timeout=15, what="config")
        state_topic = config["state_topic"]
        wait_until(lambda: (s := ha.last_json(state_topic)) and s.get("latest_version") == "1.1.0",
                   timeout=15, what="1.1.0 offered")
        # A retained command would start an install at every new subscription: ignored.
        bridge = fleet.center.center.homeassistant
        ha.client.publish(config["command_topic"], config["payload_install"], qos=1, retain=True)
        wait_until(lambda: bridge.commands_ignored == 1, timeout=10, what="retained command ignored")
        ha.client.publish(config["command_topic"], b"", qos=1, retain=True)  # cleared
        assert _deployments(fleet) == []
        ha.client.publish(config["command_topic"], config["payload_install"], qos=1)
        wait_until(lambda: (s := ha.last_json(state_topic)) and s["installed_version"] == "1.1.0",
                   timeout=90, what="installed 1.1.0")
        states = [json.loads(p) for p in ha.of(state_topic) if p]
        for state in states:
            check_state(state)
        running = [s for s in states if s["in_progress"]]
        assert running and any(isinstance(s["update_percentage"], (int, float)) for s in running), states
        # installed_version moves only at confirmation: never 1.1.0 while the job still runs
        assert all(s["installed_version"] == "1.0.0" for s in running), running
        final = states[-1]
        assert final["installed_version"] == final["latest_version"] == "1.1.0"
        assert final["in_progress"] is False and final["update_percentage"] is None
        assert fleet.running_version("ha-inst") == "1.1.0"
        [dep] = _deployments(fleet)
        assert dep.target == {"devices": ["ha-inst"]}
        [event] = list_events(fleet.store, action="deployment.create")
        assert event.actor == "homeassistant" and event.detail["release"] == "1.1.0"
        # Nothing newer: a second INSTALL is refused (and audited), no second deployment.
        ha.client.publish(config["command_topic"], config["payload_install"], qos=1)
        wait_until(lambda: list_events(fleet.store, action="ha.install.refused"), timeout=10, what="refusal")
        assert len(_deployments(fleet)) == 1
    finally:
        ha.close()


def test_home_assistant_account_reads_its_topics_and_writes_only_install_commands(ha_fleet, ha_broker):
    fleet = ha_fleet
    fleet.add_device("acl-dev")
    fleet.wait_online("acl-dev")
    set_opt_in(fleet.store, ["acl-dev"], DEFAULT_TAG, True)
    watcher, got = _server_listener(ha_broker, ["fota/v1/#", f"{PREFIX}/#", "fota/ha/#"])
    ha = HomeAssistant(ha_broker)
    try:
        assert ha.connected.wait(10)
        config_topic = discovery_topic(PREFIX, "acl-dev")
        config = wait_until(lambda: ha.last_json(config_topic), timeout=15, what="config")
        # Reading device topics: refused (their retained inventory and online flag never arrive).
        ha.client.subscribe([("fota/v1/#", 1), ("fota/v1/acl-dev/inventory", 1), ("$SYS/#", 0)])
        forged = b'{"installed_version":"6.6.6","in_progress":false,"update_percentage":null}'
        # Writing anything but the install commands (and its own status): dropped by the broker.
        denied = [("fota/v1/acl-dev/cmd", b"{}"), ("fota/v1/acl-dev/status", b"{}"), ("fota/v1/acl-dev/online", b"0"),
                  (config_topic, b""), (config["state_topic"], forged), (config["availability_topic"], b"offline"),
                  (f"{PREFIX}/update/fota/other/config", b"{}"), ("fota/ha/acl-dev/other", b"x")]
        for topic, payload in denied:
            ha.client.publish(topic, payload, qos=1)
        ha.client.publish("fota/ha/acl-dev/install", b"not-the-payload", qos=1)  # allowed topic
        wait_until(lambda: ("fota/ha/acl-dev/install", b"not-the-payload") in got, timeout=10,
                   what="install command reached the broker's other clients")
        time.sleep(0.5)
        assert [t for t, _, _ in ha.messages if t.startswith("fota/v1/") or t.startswith("$SYS")] == []
        assert [m for m in denied if m in got] == []
        assert [t for t, _ in got if t == f"{PREFIX}/status"] == []  # its birth message: dropped too
        assert any(t.startswith("fota/v1/acl-dev/") for t, _ in got)  # the watcher does see the device
        assert json.loads(ha.last(config["state_topic"]))["installed_version"] == "1.0.0"
        bridge = fleet.center.center.homeassistant
        wait_until(lambda: bridge.commands_ignored == 1, timeout=10, what="wrong payload ignored")
        assert _deployments(fleet) == []  # a wrong payload starts nothing
    finally:
        ha.close()
        watcher.disconnect()
        watcher.loop_stop()


def test_home_assistant_account_with_a_wrong_password_is_refused(ha_broker):
    ha = HomeAssistant(ha_broker, password="wrong")
    try:
        wait_until(lambda: ha.refused is not None, timeout=10, what="refused")
    finally:
        ha.close()


def test_installed_version_waits_for_the_confirmation():
    """On its trial boot a device already reports the new version: the entity keeps showing
    the confirmed one until the job ends confirmed (and shows a failed or reverted job)."""
    bridge = HomeAssistantBridge(None, None, lambda *a: True, HomeAssistantSettings())
    release = (1, "1.1.0", ["unix"], None, "bundle", 1000, 0)
    before = DeviceView("d", "unix", "1.0.0", True, release, None)
    assert bridge.state(before)["installed_version"] == "1.0.0"
    trial = DeviceView("d", "unix", "1.1.0", True, release, (7, "trial", 1.0, None, None, "1.1.0"))
    state = bridge.state(trial)
    assert (state["installed_version"], state["in_progress"], state["update_percentage"]) == ("1.0.0", True, 100)
    done = DeviceView("d", "unix", "1.1.0", True, release, (7, "confirmed", 1.0, None, None, "1.1.0"))
    state = bridge.state(done)
    assert (state["installed_version"], state["latest_version"], state["in_progress"]) == ("1.1.0", "1.1.0", False)
    assert state["update_percentage"] is None
    reverted = DeviceView("d", "unix", "1.0.0", True, release, (8, "reverted", 1.0, "E_HEALTH", "x", "1.1.0"))
    state = bridge.state(reverted)
    assert state["installed_version"] == "1.0.0" and state["latest_version"] == "1.1.0"
    assert "E_HEALTH" in state["release_summary"]
    check_state(state)
    downloading = DeviceView("d", "unix", "1.0.0", True, release, (9, "downloading", 0.426, None, None, "1.1.0"))
    assert bridge.state(downloading)["update_percentage"] == 43


def test_fota_ha_commands_with_the_managed_broker(tmp_path):
    """`fota ha enable` creates the account, `fota serve` publishes the entity on its own
    Mosquitto, `fota ha installs` adds the install button live, `fota ha remove` removes it."""
    import re

    from test_cli import assert_clean_error, background, fota, fota_in_process, stop

    home = tmp_path / "home"
    assert fota_in_process(home, "keys", "init").returncode == 0  # setup: in the test's process
    assert fota_in_process(home, "device", "add", "cli-ha", "--hardware", "unix").returncode == 0
    assert_clean_error(fota(home, "ha", "add", "cli-ha"), "not enabled")
    r = fota(home, "ha", "enable")
    assert r.returncode == 0, r.stdout + r.stderr
    password = re.search(r"user homeassistant, password (\S+)", r.stdout).group(1)
    assert password not in (home / "config.json").read_text()  # only its hash is kept
    r = fota(home, "ha", "add", "cli-ha")
    assert r.returncode == 0 and "1 device(s) opted in" in r.stdout, r.stdout + r.stderr
    assert_clean_error(fota(home, "ha", "add", "nobody"), "nobody")
    assert_clean_error(fota(home, "device", "add", "homeassistant", "--hardware", "unix"), "reserved")
    port = json.loads((home / "config.json").read_text())["broker_port"]

    class Broker:  # where Home Assistant connects: the managed broker's device listener
        host, users = "127.0.0.1", {HOMEASSISTANT_USER: password}
    Broker.port = port

    serve = background(home, "serve")
    ha = None
    try:
        ha = wait_until(lambda: _connected(Broker), timeout=30, what="Home Assistant connected to the managed broker")
        topic = discovery_topic(PREFIX, "cli-ha")
        config = wait_until(lambda: ha.last_json(topic), timeout=30, what="discovery config")
        check_discovery(config)
        assert "command_topic" not in config
        state = wait_until(lambda: ha.last_json(config["state_topic"]), timeout=10, what="state")
        check_state(state)
        assert ha.last(config["availability_topic"]) == b"offline"  # never connected
        assert fota(home, "ha", "installs", "--allow").returncode == 0
        wait_until(lambda: "command_topic" in ha.last_json(topic), timeout=15, what="install button")
        assert "installs allowed" in fota(home, "ha", "status").stdout
        assert fota(home, "ha", "remove", "cli-ha").returncode == 0
        wait_until(lambda: ha.last(topic) == b"", timeout=15, what="entity removed")
        audit_log = [e.action for e in list_events(_store(home))]
        assert {"ha.enable", "ha.installs", "device.tag", "device.untag"} <= set(audit_log)
    finally:
        if ha is not None:
            ha.close()
        out = stop(serve)
    assert "Traceback" not in out, out


def _connected(broker):
    """A HomeAssistant client once the broker listens and lets it in; None before."""
    try:
        client = HomeAssistant(broker)
    except OSError:
        return None
    if client.connected.wait(2):
        return client
    client.close()
    return None


def _store(home):
    from fota.server.home import Home
    return Home.locate(home).store()


def test_opted_in_devices_newest_release_and_job_read_alike_on_both_databases(db_url, tmp_path):
    """What a pass reads (tags are JSON: matched as text, then exactly), on SQLite and PostgreSQL."""
    from fota.server.deployments import create_deployment
    from fota.server.fleet import provision_device
    from fota.server.store import Job, Store
    from fota.tools.signing import generate_private_key

    store = Store(db_url)
    try:
        key = generate_private_key()
        provision_device(store, "in-a", "unix", tags=["lab", DEFAULT_TAG])
        provision_device(store, "in-b", "esp32", tags=[DEFAULT_TAG])
        provision_device(store, "out-c", "unix", tags=[DEFAULT_TAG + "-not", "x" + DEFAULT_TAG])
        provision_device(store, "out-d", "unix")
        with store.session() as s:
            for device_id in ("in-a", "in-b"):
                s.get(Device, device_id).version = "1.0.0"
        for version, hw, min_version in [("1.2.0", ["unix"], None), ("1.10.0", ["unix"], None),
                                         ("1.9.0", ["esp32"], None), ("2.0.0", ["esp32"], "1.5.0")]:
            create_release(store, tmp_path / "blobs", key, pack_files(hello_files(version)), version, hw,
                           min_version=min_version)
        first = create_deployment(store, "1.2.0", device_ids=["in-a"])
        second = create_deployment(store, "1.10.0", device_ids=["in-a"])
        with store.session() as s:
            s.get(Job, first.jobs[0].id).state = "failed"
            job = s.get(Job, second.jobs[0].id)
            job.state, job.progress = "downloading", 0.5
        bridge = HomeAssistantBridge(store, None, lambda *a: True, HomeAssistantSettings())
        views = bridge.read_views()
        assert sorted(views) == ["in-a", "in-b"]
        assert views["in-a"].release[1] == "1.10.0"       # version order, not text order
        assert views["in-a"].job[:3] == (second.jobs[0].id, "downloading", 0.5)
        assert views["in-b"].release[1] == "1.9.0"        # 2.0.0 needs at least 1.5.0
        assert views["in-b"].job is None
        assert bridge.state(views["in-a"])["update_percentage"] == 50
    finally:
        store.dispose()


def test_entities_are_published_again_after_a_broker_restart_lost_them(tmp_path, sqlite_url):
    """A broker without persistence forgets retained messages when it restarts: the center
    publishes every entity again once reconnected."""
    with Mosquitto(tmp_path / "mosquitto", auth=True, acl_extra=broker_acl(HOMEASSISTANT_USER)) as m:
        broker = BrokerAccounts(m)
        broker.add_users({SERVER_USER: secrets.token_urlsafe(12), HOMEASSISTANT_USER: secrets.token_urlsafe(12)})
        fleet = Fleet(tmp_path, broker, sqlite_url, spy=False, homeassistant=HomeAssistantSettings(interval=30))
        try:
            fleet.add_device("rs-dev", start=False)
            set_opt_in(fleet.store, ["rs-dev"], DEFAULT_TAG, True)
            fleet.center.center.homeassistant.republish()  # a pass now, not in 30 s
            topic = discovery_topic(PREFIX, "rs-dev")
            ha = HomeAssistant(broker)
            try:
                wait_until(lambda: ha.last(topic), timeout=15, what="discovery config")
            finally:
                ha.close()
            m.stop()
            m.start()
            ha = wait_until(lambda: _connected(broker), timeout=30, what="broker back")
            try:
                # well within the 30 s between passes: the reconnect triggered it
                wait_until(lambda: ha.last(topic), timeout=15, what="discovery config published again")
                check_discovery(ha.last_json(topic))
            finally:
                ha.close()
        finally:
            fleet.close()
