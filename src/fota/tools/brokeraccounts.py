"""A running authenticated Mosquitto as the tests and benchmarks use it: where it listens, its
accounts, and the control center's URL.

Devices connect to host:port (the device listener: client id = username); the server account
exists only on host:service_port (fota.server.broker)."""
from __future__ import annotations

from fota.server.broker import SERVER_USER, Mosquitto
from fota.server.credentials import mosquitto_hash


class BrokerAccounts:
    """`users` (name -> password) and `hashes` (what the password files hold) of `mosquitto`,
    which listens on host:port (devices) and host:service_port (the server account)."""

    def __init__(self, mosquitto: Mosquitto, host: str = "127.0.0.1"):
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
        return f"mqtt://{SERVER_USER}:{self.users[SERVER_USER]}@{self.host}:{self.service_port}"
