"""A RabbitMQ cluster with its MQTT plugin on loopback, for tests and benches: `size` nodes, each
its own Erlang VM, ports, data and log directories under one directory, a shared Erlang cookie.

Debian's rabbitmq-server 3.10 (/usr/lib/rabbitmq/bin). Every node gets (the keys are those of the
3.10 schemas: rabbit's, and rabbitmq_mqtt's priv/schema/rabbitmq_mqtt.schema):

    listeners.tcp.default       = 127.0.0.1:<amqp port>
    mqtt.listeners.tcp.default  = 127.0.0.1:<mqtt port>
    mqtt.allow_anonymous        = false
    mqtt.durable_queue_type     = quorum   (a persistent session's queue is a quorum queue:
                                            ../shared/FIELD-NOTES.md, only then does a node kill
                                            lose nothing)
    mqtt.vhost = /, mqtt.exchange = amq.topic

and the environment RABBITMQ_NODENAME, RABBITMQ_NODE_PORT, RABBITMQ_DIST_PORT,
RABBITMQ_MNESIA_BASE, RABBITMQ_LOG_BASE, RABBITMQ_CONFIG_FILE, RABBITMQ_ENABLED_PLUGINS_FILE
(written as `rabbitmq-plugins enable --offline rabbitmq_mqtt` writes it), HOME (the cookie),
RABBITMQ_CONF_ENV_FILE (not the system's /etc/rabbitmq/rabbitmq-env.conf). Nodes 2.. join
node 1 (`rabbitmqctl stop_app`, `join_cluster`, `start_app`).

Accounts (import_definitions, one call per batch): a device is a user with permissions on its own
session queues only (`mqtt-subscription-<id>qos0|qos1`, configure/write/read) and `amq.topic`
(write: publish; read: bind), and topic permissions on `amq.topic` (MQTT `/` is `.` in the
routing key): read `fota.v1.<id>.(cmd|data)`, write `fota.v1.<id>.(status|inventory|online|req)`
-- the Mosquitto ACL of fota.server.broker.DEVICE_ACL. The server account may use every topic.
RabbitMQ 3.10 does not force client id = username (Mosquitto's use_username_as_clientid): another
account using a device's client id is refused (CONNACK 3), yet was seen to close that device's
live connection (docs/operations.md §4a).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fota.server.broker import LOOPBACK, SERVER_USER, BrokerError, free_port

RABBIT_BIN = Path(os.environ.get("FOTA_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
DEVICE_PUBLISHES = ("status", "inventory", "online", "req")
DEVICE_SUBSCRIBES = ("cmd", "data")


def available() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() and (RABBIT_BIN / "rabbitmqctl").exists()


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt(4) + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def device_definitions(device_id: str, password: str, vhost: str = "/") -> tuple[dict, dict, dict]:
    """(user, permissions, topic permissions) of one device, as import_definitions reads them."""
    d = re.escape(device_id)
    queues = f"mqtt-subscription-{d}qos[01]"
    user = {"name": device_id, "password_hash": password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ""}
    perms = {"user": device_id, "vhost": vhost, "configure": f"^{queues}$",
             "write": f"^({queues}|amq\\.topic)$", "read": f"^({queues}|amq\\.topic)$"}
    topics = {"user": device_id, "vhost": vhost, "exchange": "amq.topic",
              "write": f"^fota\\.v1\\.{d}\\.({'|'.join(DEVICE_PUBLISHES)})$",
              "read": f"^fota\\.v1\\.{d}\\.({'|'.join(DEVICE_SUBSCRIBES)})$"}
    return user, perms, topics


def server_definitions(password: str, vhost: str = "/") -> tuple[dict, dict]:
    user = {"name": SERVER_USER, "password_hash": password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": "administrator"}
    perms = {"user": SERVER_USER, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    return user, perms


@dataclass(frozen=True)
class NodePorts:
    amqp: int
    dist: int
    mqtt: int


class RabbitNode:
    def __init__(self, name: str, directory: Path, ports: NodePorts, cookie_home: Path, host: str = LOOPBACK,
                 queue_type: str = "quorum"):
        self.name = name                     # short name; the Erlang node is name@localhost
        self.queue_type = queue_type
        self.node = f"{name}@localhost"
        self.directory = Path(directory)
        self.ports = ports
        self.home = cookie_home
        self.host = host
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        d = self.directory
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.ports.amqp),
            "RABBITMQ_DIST_PORT": str(self.ports.dist),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # exec the VM from the script (no shell in between): the pid is beam's, a SIGKILL kills the node
            "RUNNING_UNDER_SYSTEMD": "1",
        })
        return env

    def write(self) -> None:
        d = self.directory
        (d / "mnesia").mkdir(parents=True, exist_ok=True)
        (d / "log").mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (d / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = {self.host}:{self.ports.amqp}",
            f"mqtt.listeners.tcp.default = {self.host}:{self.ports.mqtt}",
            "mqtt.allow_anonymous = false",
            f"mqtt.durable_queue_type = {self.queue_type}",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "loopback_users = none",
            "disk_free_limit.absolute = 50MB",
            "log.console = false",
            "log.file.level = warning",
        ]) + "\n")

    def start(self) -> None:
        log = open(self.directory / "stdout.log", "ab")
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, *args: str, timeout: float = 120.0) -> str:
        r = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env(),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise BrokerError(f"rabbitmqctl -n {self.node} {' '.join(args)}: exit {r.returncode}: "
                              f"{(r.stderr or r.stdout).strip()[-600:]}")
        return r.stdout

    def mqtt_listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.ports.mqtt), timeout=0.2):
                return True
        except OSError:
            return False

    def wait_booted(self, timeout: float) -> None:
        """Until the node's MQTT listener accepts (rabbitmqctl await_startup would cost a VM)."""
        deadline = time.monotonic() + timeout
        while not self.mqtt_listening():
            if not self.running:
                raise BrokerError(f"rabbitmq node {self.node} exited with {self.proc.returncode}: "
                                  f"see {self.directory / 'log'}")
            if time.monotonic() > deadline:
                raise BrokerError(f"rabbitmq node {self.node} not up within {timeout}s")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """The VM and its helper processes (erl_child_setup, inet_gethost, ...)."""
        if not self.running:
            return []
        return [self.proc.pid] + _descendants(self.proc.pid)

    def kill(self) -> None:
        if self.running:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.running:
            self.proc.terminate()  # the VM stops on SIGTERM (Erlang/OTP >= 23)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its process group is left (helpers), also after a SIGKILL
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait()


EPMD_PORT = 4369


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


class RabbitCluster:
    """`size` RabbitMQ nodes on loopback under `directory`; start() boots node 1, then the others,
    and joins them to node 1. add_devices / the server account via import_definitions."""

    def __init__(self, directory: Path, size: int = 3, *, server_password: str | None = None,
                 host: str = LOOPBACK, queue_type: str = "quorum"):
        """queue_type: mqtt.durable_queue_type, the persistent sessions' queues (`classic`: one
        node's, lost with it; only for comparing costs)."""
        if queue_type not in ("quorum", "classic"):
            raise ValueError(f"queue_type: quorum or classic, not {queue_type!r}")
        self.directory = Path(directory)
        self.host = host
        self.server_password = server_password or secrets.token_urlsafe(12)
        self.devices: dict[str, str] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            os.chmod(cookie, 0o400)
        tag = secrets.token_hex(3)
        taken: set[int] = set()

        def port() -> int:
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        self.nodes = [RabbitNode(f"fota{tag}n{i + 1}", self.directory / f"n{i + 1}",
                                 NodePorts(port(), port(), port()), home, host, queue_type)
                      for i in range(size)]

    def start(self, timeout: float = 120.0) -> "RabbitCluster":
        if not available():
            raise BrokerError(f"rabbitmq-server not found in {RABBIT_BIN} (Debian: apt-get install rabbitmq-server)")
        # the nodes register with epmd on 127.0.0.1:4369 and start it if none runs: then stop()
        # ends it again (epmd -kill, which refuses while other nodes are registered)
        self._own_epmd = not _listening(LOOPBACK, EPMD_PORT)
        try:
            for node in self.nodes:
                node.write()
                node.start()
            for node in self.nodes:
                node.wait_booted(timeout)
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.node)
                node.ctl("start_app")
            for node in self.nodes:
                node.wait_booted(timeout)
            self._import(*self._server_defs())
        except BaseException:
            self.stop()
            raise
        return self

    def _server_defs(self) -> tuple[list, list, list]:
        user, perms = server_definitions(self.server_password)
        return [user], [perms], []

    def _import(self, users: list, perms: list, topics: list) -> None:
        defs = {"users": users, "vhosts": [{"name": "/"}], "permissions": perms, "topic_permissions": topics}
        path = self.directory / f"defs-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps(defs))
        os.chmod(path, 0o600)
        try:
            node = next(n for n in self.nodes if n.running)
            node.ctl("import_definitions", str(path), timeout=600)
        finally:
            path.unlink(missing_ok=True)

    def add_devices(self, passwords: dict[str, str]) -> None:
        """Device accounts (id -> password) with their permissions, in one import."""
        users, perms, topics = [], [], []
        for device_id, password in passwords.items():
            u, p, t = device_definitions(device_id, password)
            users.append(u)
            perms.append(p)
            topics.append(t)
        self._import(users, perms, topics)
        self.devices.update(passwords)

    def cluster_nodes(self) -> list[str]:
        """The running nodes as node 1 (or the first running node) reports them."""
        node = next(n for n in self.nodes if n.running)
        out = node.ctl("cluster_status", "--formatter", "json")
        return sorted(json.loads(out).get("running_nodes", []))

    def kill_node(self, index: int) -> None:
        self.nodes[index].kill()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if getattr(self, "_own_epmd", False):
            self._own_epmd = False
            epmd = shutil.which("epmd") or "/usr/bin/epmd"
            try:
                subprocess.run([epmd, "-kill"], capture_output=True, timeout=10,
                               env={**os.environ, "ERL_EPMD_ADDRESS": LOOPBACK})
            except (OSError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> "RabbitCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def mqtt_ports(self) -> list[int]:
        return [n.ports.mqtt for n in self.nodes]

    def pids(self) -> list[int]:
        return [p for n in self.nodes for p in n.pids()]
