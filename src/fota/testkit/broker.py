"""A running authenticated Mosquitto as the tests and benchmarks use it: where it listens, its
accounts, and the control center's URL; and one started in a directory of its own (the benches').

Devices connect to host:port (the device listener: client id = username); the server account
exists only on host:service_port (fota.server.broker)."""
from __future__ import annotations

import secrets
from pathlib import Path

from fota.server.broker import SERVER_USER, Mosquitto
from fota.server.credentials import mosquitto_hash

HOST = "127.0.0.1"


class BrokerAccounts:
    """`users` (name -> password) and `hashes` (what the password files hold) of `mosquitto`,
    which listens on host:port (devices) and host:service_port (the server account)."""

    def __init__(self, mosquitto: Mosquitto, host: str = HOST):
        self.mosquitto = mosquitto
        self.host = host
        self.port = mosquitto.port
        self.service_port = mosquitto.service_port
        self.users: dict[str, str] = {}
        self.hashes: dict[str, str] = {}

    def add_users(self, users: dict[str, str]) -> None:
        """Add accounts (name -> password): the password files are rewritten, Mosquitto reloaded once."""
        for name, password in users.items():
            self.users[name] = password
            self.hashes[name] = mosquitto_hash(password)
        self.mosquitto.write_passwords(self.hashes)
        self.mosquitto.reload()

    def add_user(self, name: str, password: str) -> None:
        self.add_users({name: password})

    @property
    def server_url(self) -> str:
        scheme = "mqtts" if getattr(self.mosquitto, "tls", None) else "mqtt"
        return f"{scheme}://{SERVER_USER}:{self.users[SERVER_USER]}@{self.host}:{self.service_port}"


class ManagedBroker(BrokerAccounts):
    """An authenticated Mosquitto (password file + per-device ACL) started in `directory` with
    fota's generated config (which turns Nagle off: `set_tcp_nodelay true`) and a server account
    of its own; stop() ends it. tls: both listeners speak only TLS (fota.server.tls files)."""

    def __init__(self, directory: Path, *, persistence: bool = False, max_packet_size: int = 65536,
                 tls=None):
        super().__init__(Mosquitto(Path(directory), auth=True, persistence=persistence,
                                   max_packet_size=max_packet_size, tls=tls).start(), HOST)
        self.add_users({SERVER_USER: secrets.token_urlsafe(12)})

    def stop(self) -> None:
        self.mosquitto.stop()


def accepted(port: int, user: str, password: str, host: str = "127.0.0.1") -> bool:
    """Whether the broker listening on host:port accepts these credentials: an MQTT CONNECT
    (fota.server.natscluster.mqtt_ping) answered by a CONNACK "accepted", not "not authorized"."""
    from fota.server.broker import BrokerError
    from fota.server.natscluster import mqtt_ping
    try:
        mqtt_ping(host, port, user, password, 5)
        return True
    except BrokerError:
        return False
