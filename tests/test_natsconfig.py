"""fota broker nats-config: a NATS cluster's node configs and its users file from the registry.

Three real nats-server processes started from the configs the command wrote; the devices' users
come from the registry as bcrypt hashes, rewritten and reloaded by fota device add / rekey /
revoke and by fota serve as it starts; devices are MQTT clients (fota.server.natscluster.mqtt_ping,
paho)."""
from __future__ import annotations

import os
import re
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import update

from fota.server.broker import SERVER_USER, free_port
from fota.server.home import Home
from fota.server.natscluster import USERS_FILE, NatsNode, NodePorts
from fota.server.store import Device, Store
from fota.testkit.broker import accepted
from fota.tools.waiting import wait_until
from inproc import run_fota
from test_cli import FOTA, stop

SERVER_PASSWORD = "server-secret"


def _ports(count: int) -> list[int]:
    taken: list[int] = []
    while len(taken) < count:
        if (p := free_port()) not in taken:
            taken.append(p)
    return taken


def _fota(home, *args) -> tuple[str, str]:
    done = run_fota(args, {"FOTA_HOME": str(home), "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, done.stderr


def _add(home, device_id: str) -> str:
    out, _ = _fota(home, "device", "add", device_id, "--hardware", "unix")
    assert "nodes reloaded here: 3 of 3" in out
    return re.search(r"password (\S+)", out).group(1)


def _subscribe(port: int, device_id: str, password: str, topics) -> list[int]:
    """The SUBACK codes a device gets for topics (128: refused)."""
    granted, done = [], threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(device_id, password)
    client.on_subscribe = lambda c, u, mid, codes, props: (granted.extend(x.value for x in codes), done.set())
    client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topics)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), "no SUBACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return granted


class Cluster:
    """A home whose broker_url lists three NATS nodes on this machine (their ports free ones)."""

    def __init__(self, tmp_path, database_url: str):
        self.home = Home(tmp_path / "home")
        self.out_dir = tmp_path / "nats"
        self.client, self.cluster, self.mqtt_ports, self.monitor = (
            lambda p: (p[0:3], p[3:6], p[6:9], p[9:12]))(_ports(12))
        cfg = self.home.config()
        cfg.update(database_url=database_url, broker_url=",".join(
            f"nats://{SERVER_USER}:{SERVER_PASSWORD}@127.0.0.1:{p}" for p in self.client))
        self.home.save_config(cfg)
        self.nodes = [NatsNode(f"n{i + 1}", self.out_dir, NodePorts(self.client[i], self.cluster[i],
                                                                   self.mqtt_ports[i], self.monitor[i]))
                      for i in range(3)]

    def configure(self) -> tuple[str, str]:
        """`fota broker nats-config` for the three nodes: (stdout, stderr)."""
        args = ["broker", "nats-config", "--out", str(self.out_dir)]
        for flag, ports in (("--cluster-port", self.cluster), ("--mqtt-port", self.mqtt_ports),
                            ("--monitor-port", self.monitor)):
            args += [a for p in ports for a in (flag, str(p))]
        return _fota(self.home.path, *args)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:  # up, routed, JetStream (MQTT sessions) ready: the server user connects
            wait_until(lambda: node.running and _try(node.ports.mqtt, SERVER_USER, SERVER_PASSWORD),
                       timeout=30, interval=0.3, what=f"{node.name} accepting MQTT")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def test_nodes_from_the_generated_configs_take_the_registrys_devices(tmp_path, sqlite_url):
    nats = Cluster(tmp_path, sqlite_url)
    home, out_dir, mqtt_ports = nats.home, nats.out_dir, nats.mqtt_ports
    # A device provisioned before bcrypt hashes were kept (migration 0018): no NATS user.
    _, err = _fota(home.path, "device", "add", "old-dev", "--hardware", "unix")
    assert "fota broker nats-config" in err  # no users file written yet: the operator is told
    store = Store(sqlite_url)
    with store.session() as s:
        s.execute(update(Device).where(Device.id == "old-dev").values(password_bcrypt=None))
    store.dispose()

    out, err = nats.configure()
    assert "old-dev" in err and "fota device rekey" in err  # told, and how to fix it
    users = (out_dir / USERS_FILE).read_text()
    assert SERVER_PASSWORD not in users and "$2b$" in users  # hashes only
    assert home.config()["broker_mqtt_port"] == mqtt_ports[0]  # what devices are given

    try:
        nats.start()
        pw1, pw2 = _add(home.path, "dev1"), _add(home.path, "dev2")
        wait_until(lambda: accepted(mqtt_ports[1], "dev1", pw1), timeout=5, what="dev1 accepted after the reload")
        assert accepted(mqtt_ports[2], "dev2", pw2)
        assert not accepted(mqtt_ports[0], "dev1", pw2)  # a wrong password
        assert not accepted(mqtt_ports[0], "dev1", "")
        # its own topics only (the Mosquitto ACL)
        assert _subscribe(mqtt_ports[0], "dev1", pw1, [("fota/v1/dev1/cmd", 1), ("fota/v1/dev2/cmd", 1),
                                                       ("fota/v1/+/cmd", 1)]) == [1, 128, 128]

        # rotation: the old device gets a user; dev2's old password stops working
        out, err = _fota(home.path, "device", "rekey", "old-dev")
        old_pw = re.search(r"new password (\S+)", out).group(1)
        assert "old-dev" not in err
        wait_until(lambda: accepted(mqtt_ports[0], "old-dev", old_pw), timeout=5, what="old-dev re-keyed")
        out, _ = _fota(home.path, "device", "rekey", "dev2")
        new_pw2 = re.search(r"new password (\S+)", out).group(1)
        wait_until(lambda: not accepted(mqtt_ports[1], "dev2", pw2), timeout=5, what="dev2's old password refused")
        assert accepted(mqtt_ports[1], "dev2", new_pw2)

        # removal: refused from the reload on, the others unaffected
        _fota(home.path, "device", "revoke", "dev1")
        wait_until(lambda: not accepted(mqtt_ports[2], "dev1", pw1), timeout=5, what="dev1 refused after revoke")
        assert accepted(mqtt_ports[2], "dev2", new_pw2)
        assert "dev1" not in (out_dir / USERS_FILE).read_text()
        assert "Plaintext passwords" not in (out_dir / "n1.log").read_text()  # nats-server's warning
    finally:
        nats.stop()


def _try(port: int, user: str, password: str) -> bool:
    try:
        return accepted(port, user, password)
    except OSError:
        return False


@pytest.mark.parametrize("broker_url, args, message", [
    ("nats://fota-server:pw@10.0.0.1:4222,nats://fota-server:pw@10.0.0.2:4222", [],
     "beyond loopback need TLS"),
    ("nats://fota-server:pw@127.0.0.1:4222,nats://fota-server:other@127.0.0.1:4223", [],
     "2 different passwords"),
    ("nats://fota-server:pw@127.0.0.1:4222,nats://fota-server:pw@127.0.0.1:4223",
     ["--mqtt-port", "1", "--mqtt-port", "2", "--mqtt-port", "3"], "one per node (2)"),
    ("mqtt://fota-server:pw@127.0.0.1:1883", [], "is not a NATS cluster"),
])
def test_nats_config_refuses(tmp_path, broker_url, args, message):
    """Plain listeners beyond loopback (devices send passwords), nodes disagreeing on the server's
    password, ports that do not match the nodes, a broker that is not NATS."""
    home = Home(tmp_path / "home")
    cfg = home.config()
    cfg["broker_url"] = broker_url
    home.save_config(cfg)
    done = run_fota(["broker", "nats-config", "--out", str(tmp_path / "nats"), *args],
                    {"FOTA_HOME": str(home.path), "COLUMNS": "200"})
    assert done.returncode != 0 and message in done.stdout + done.stderr
    assert "nats_config" not in home.config()


def test_tls_nodes_get_the_tls_blocks_and_may_listen_beyond_loopback(tmp_path):
    """After `fota broker nats-tls-init` (tls:// URLs), the configs carry the nodes' certificate on
    the client port, the MQTT listener and the routes (natscluster.tls_blocks, what
    tests/test_natscluster_tls.py runs), so nodes on other machines may listen there; monitoring
    stays on loopback; the routes go to the other nodes' hosts."""
    import json
    home = Home(tmp_path / "home")
    cfg = home.config()
    cfg["broker_url"] = ",".join(f"nats://{SERVER_USER}:pw@nats{i}.example:4222" for i in (1, 2, 3))
    home.save_config(cfg)
    env = {"FOTA_HOME": str(home.path), "COLUMNS": "200"}
    for args in (["broker", "nats-tls-init", *[a for i in (1, 2, 3) for a in ("--hostname", f"nats{i}.example")]],
                 ["broker", "nats-config", "--out", str(tmp_path / "nats"), "--listen", "0.0.0.0"]):
        done = run_fota(args, env)
        assert done.returncode == 0, done.stdout + done.stderr
    conf = dict(line.split(": ", 1) for line in (tmp_path / "nats" / "n2.conf").read_text().splitlines()
                if ": " in line)
    certfile = str(home.tls_dir / "nats.pem")
    assert json.loads(conf["tls"])["cert_file"] == certfile and json.loads(conf["tls"])["handshake_first"]
    assert json.loads(conf["mqtt"])["tls"]["cert_file"] == certfile
    cluster = json.loads(conf["cluster"])
    assert cluster["tls"]["ca_file"] == str(home.tls_dir / "ca.pem")
    assert cluster["routes"] == ["nats-route://nats1.example:6222", "nats-route://nats3.example:6222"]
    assert json.loads(conf["mqtt"])["listen"] == "0.0.0.0:1883"
    assert json.loads(conf["http"]) == "127.0.0.1:8222"


def test_serve_rewrites_the_users_file_from_the_registry_at_start(tmp_path, sqlite_url):
    """Accounts changed while no control center ran (by an API process on another machine, a restored
    database: here straight in the registry) reach the nodes when `fota serve` starts: it rewrites the
    users file and reloads the nodes on this machine before it connects, as it rewrites the managed
    Mosquitto's password file (tests/test_app.py)."""
    from fota.server.fleet import rekey_device, revoke_device
    nats = Cluster(tmp_path, sqlite_url)
    home, ports = nats.home, nats.mqtt_ports
    _fota(home.path, "keys", "init")
    nats.configure()
    serve = None
    try:
        nats.start()
        pw1, pw2 = _add(home.path, "dev1"), _add(home.path, "dev2")
        wait_until(lambda: accepted(ports[0], "dev1", pw1), timeout=5, what="dev1 accepted after the reload")
        store = Store(sqlite_url)
        try:  # the registry changes, the users file does not
            revoke_device(store, "dev1")
            _, new_pw2 = rekey_device(store, "dev2")
        finally:
            store.dispose()
        assert accepted(ports[1], "dev1", pw1) and accepted(ports[1], "dev2", pw2)  # stale until a rewrite

        serve = subprocess.Popen(FOTA + ["serve"], env={**os.environ, "FOTA_HOME": str(home.path)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        wait_until(lambda: serve.poll() is not None or not accepted(ports[2], "dev1", pw1), timeout=30,
                   interval=0.3, what="dev1 refused once serve started")
        assert serve.poll() is None, stop(serve)  # the center runs on the cluster
        wait_until(lambda: not accepted(ports[0], "dev2", pw2), timeout=5, what="dev2's old password refused")
        assert accepted(ports[0], "dev2", new_pw2) and accepted(ports[1], "dev2", new_pw2)
        users = (nats.out_dir / USERS_FILE).read_text()
        assert "dev1" not in users and "dev2" in users
        assert serve.poll() is None, stop(serve)
    finally:
        if serve is not None:
            stop(serve)
        nats.stop()


def test_serve_refuses_to_start_when_it_cannot_rewrite_the_users_file(tmp_path, sqlite_url):
    """A users file serve cannot rewrite might still let a revoked device in: it says so and exits 1
    before it connects (here its directory is a file)."""
    home = Home(tmp_path / "home")
    cfg = home.config()
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    cfg.update(database_url=sqlite_url, nats_config={"dir": str(blocked), "pid_files": []},
               broker_url=",".join(f"nats://{SERVER_USER}:{SERVER_PASSWORD}@127.0.0.1:{p}" for p in _ports(3)))
    home.save_config(cfg)
    _fota(home.path, "keys", "init")
    # a process: a serve that went on would run until the timeout, not for ever
    done = subprocess.run(FOTA + ["serve"], env={**os.environ, "FOTA_HOME": str(home.path), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot rewrite the NATS users file from the registry" in done.stderr and "Traceback" not in done.stderr


def test_home_assistant_gets_a_nats_user_with_its_acl_and_the_bridge_the_mqtt_listeners(tmp_path, sqlite_url):
    """fota ha enable on a NATS home: the users file gets Home Assistant's user (bcrypt), which
    reads its discovery and fota/ha topics but no device's; fota ha account rotates it; the
    center's Home Assistant settings name every node's MQTT listener."""
    nats = Cluster(tmp_path, sqlite_url)
    home, mqtt_ports = nats.home, nats.mqtt_ports
    out, _ = _fota(home.path, "ha", "enable", "--installs")
    password = re.search(r"password (\S+)", out).group(1)
    assert "fota broker nats-config" in out  # its user is written by nats-config
    nats.configure()
    users = (nats.out_dir / USERS_FILE).read_text()
    assert '"homeassistant"' in users and password not in users
    settings = home.homeassistant_settings()
    assert settings.mqtt_url == ",".join(f"mqtt://{SERVER_USER}:{SERVER_PASSWORD}@127.0.0.1:{p}" for p in mqtt_ports)
    try:
        nats.start()
        assert accepted(mqtt_ports[2], "homeassistant", password)
        assert _subscribe(mqtt_ports[0], "homeassistant", password,
                          [("homeassistant/#", 1), ("homeassistant/+/+/config", 1), ("fota/ha/+/state", 1),
                           ("fota/v1/+/status", 1), ("fota/#", 1)]) == [1, 1, 1, 128, 128]
        out, _ = _fota(home.path, "ha", "account")
        new_password = re.search(r"password (\S+)", out).group(1)
        wait_until(lambda: accepted(mqtt_ports[1], "homeassistant", new_password), timeout=5,
                   what="the new password accepted after the reload")
        assert not accepted(mqtt_ports[1], "homeassistant", password)
        assert "fota broker nats-config" not in out
        _fota(home.path, "ha", "disable")  # the user leaves the users file
        wait_until(lambda: not accepted(mqtt_ports[0], "homeassistant", new_password), timeout=5,
                   what="the account refused after disable")
        assert '"homeassistant"' not in (nats.out_dir / USERS_FILE).read_text()
    finally:
        nats.stop()
