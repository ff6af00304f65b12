"""A NATS cluster's configs from the home: each node's config, and the users file from the registry.

`fota broker nats-config --out DIR` writes, for the nodes that broker_url lists (n1, n2, … in its
order), DIR/<node>.conf (natscluster.node_config) and DIR/fota-users.conf, which every node's
config includes: the FOTA account with the server user and one user per device (the Mosquitto ACL
of fota.server.broker, natscluster.device_user), every password a bcrypt hash: the devices' from
the store (devices.password_bcrypt, set with each broker password: fota.server.fleet), the
server's made from broker_url's password. config.json keeps where (`nats_config`: dir, pid
files); from then on every command that changes broker accounts rewrites the users file
(Home.sync_broker_passwords: fota device add / provision / rekey / revoke, the same through the
API's process, fota simulate, fota serve as it starts) and reloads the nodes whose pid file is on
this machine (SIGHUP); a node elsewhere needs the file copied to it and `nats-server --signal
reload=PID_FILE` (or SIGHUP).

Devices with a broker account but no bcrypt hash (provisioned before migration 0018, or on an
install without bcrypt) are left out of the users file, so the nodes refuse them: their plain
password is not known. The writer returns them; rotating their credentials gives them a user.
"""
from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fota.server.broker import LOOPBACK, SERVER_USER, BrokerError, hup_pid_file, is_loopback
from fota.server.credentials import bcrypt_hash
from fota.server.natscluster import USERS_FILE, NodePorts, node_config, write_users
from fota.server.tls import TlsFiles
from fota.tools.private import private_dir, write_private

NATS_PORT = 4222     # nats-server's defaults
CLUSTER_PORT = 6222
MONITOR_PORT = 8222


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    client_port: int


def cluster_nodes(broker_url: str) -> tuple[list[Node], str]:
    """(the nodes broker_url lists, named n1, n2, … in its order; the server user's password).
    BrokerError unless every URL gives the server user one same password."""
    nodes, passwords = [], set()
    for i, url in enumerate(u.strip() for u in broker_url.split(",") if u.strip()):
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise BrokerError(f"not a NATS node URL: {parts.scheme}://{parts.hostname or ''}")
        if unquote(parts.username or "") != SERVER_USER or not parts.password:
            raise BrokerError(f"{parts.hostname}: broker_url must give the user {SERVER_USER} and its password")
        passwords.add(unquote(parts.password))
        nodes.append(Node(f"n{i + 1}", parts.hostname, parts.port or NATS_PORT))
    if len(passwords) != 1:
        raise BrokerError(f"broker_url gives {SERVER_USER} {len(passwords)} different passwords: the nodes share one")
    return nodes, passwords.pop()


def per_node(values: list[int], default: int, count: int, what: str) -> list[int]:
    """One port per node: none given (the default on every node), one (on every node: nodes on
    machines of their own) or one per node (nodes sharing a machine)."""
    values = values or [default]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise BrokerError(f"{what}: give one port for every node or one per node ({count})")
    return list(values)


def write_node_configs(out: Path, nodes: list[Node], *, cluster_ports: list[int], mqtt_ports: list[int],
                       monitor_ports: list[int], state_dir: Path, listen: str | None = None,
                       tls: TlsFiles | None = None) -> list[Path]:
    """out/<node>.conf for every node (0600): it listens on listen (default: its host in
    broker_url), routes to the other nodes' hosts, keeps JetStream in state_dir/<node>-js and its
    pid in state_dir/<node>.pid, monitoring on 127.0.0.1, and includes out/fota-users.conf.
    BrokerError for a listener beyond loopback without TLS (devices send their passwords to it)."""
    if tls is None and not all(is_loopback(listen or n.host) for n in nodes):
        raise BrokerError("nodes listening beyond loopback need TLS: run 'fota broker nats-tls-init' first "
                          "(devices send their passwords to the MQTT listener)")
    private_dir(out)
    paths = []
    for i, node in enumerate(nodes):
        routes = [f"{other.host}:{cluster_ports[j]}" for j, other in enumerate(nodes) if j != i]
        ports = NodePorts(node.client_port, cluster_ports[i], mqtt_ports[i], monitor_ports[i])
        text = node_config(node.name, ports, routes, state_dir / f"{node.name}-js", listen or node.host, tls=tls,
                           monitor_host=LOOPBACK, pid_file=str(pid_file(state_dir, node.name)))
        path = out / f"{node.name}.conf"
        write_private(path, text)
        paths.append(path)
    return paths


def pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.pid"


def write_registry_users(directory: Path, store, server_password: str, others: list[dict] = ()) -> list[str]:
    """directory/fota-users.conf from the store (every device with a bcrypt hash) and `others`
    (Home Assistant's user: Home.sync_nats_users), under a lock so that a process that read the
    devices earlier never replaces a newer file; returns the devices left out for want of a
    bcrypt hash."""
    from fota.server.fleet import nats_password_hashes
    server_hash = bcrypt_hash(server_password)
    if server_hash is None:
        raise ModuleNotFoundError("the NATS users file needs bcrypt", name="bcrypt")
    private_dir(directory)
    with open(directory / "users.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        hashes, missing = nats_password_hashes(store)
        write_users(directory / USERS_FILE, server_hash, hashes, others)
    return missing


def reload_nodes(pid_files: list[Path]) -> dict[Path, str]:
    """SIGHUP each node whose pid file is on this machine (nats-server re-reads its config and the
    users file); pid file -> what came of it (fota.server.broker.hup_pid_file)."""
    return {Path(path): hup_pid_file(Path(path)) for path in pid_files}
