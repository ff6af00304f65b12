"""Run and configure Mosquitto: generated config, password file and per-device ACL.

The control center supervises its own Mosquitto by default (zero configuration), and the
tests start one per session on a free port with the same generator.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fota.tools.private import private_dir

if TYPE_CHECKING:
    from fota.server.tls import TlsFiles

SERVER_USER = "fota-server"
# The control center's client id before the service listener existed. Valid as a device id, so
# reserved (as SERVER_USER is): a home upgraded from then may still hold that persistent session
# with statuses in it, which the center drains once (fota.server.center.workgroup).
LEGACY_CENTER_ID = "fota-center"
# Home Assistant's broker account (fota ha enable; device listener, its own ACL section:
# fota.server.homeassistant.broker_acl). A ':' would break the password file's user:hash lines,
# so the name is a valid device id and reserved as such.
HOMEASSISTANT_USER = "homeassistant"
RESERVED_DEVICE_IDS = frozenset({SERVER_USER, LEGACY_CENTER_ID, HOMEASSISTANT_USER})

# The managed broker has two listeners (per_listener_settings: each its own accounts and ACL):
#   device listener   every device account and nothing else; use_username_as_clientid, so a
#                     device's client id is its username = its device id, whatever it asks for.
#                     No device account can take another device's client id or its session.
#   service listener  127.0.0.1 only, the server account only: the control center and its
#                     workers, with client ids of their own (fota.server.center.connection.CLIENT_ID,
#                     fota.server.workers.new_worker_id) that contain ':', which no device id
#                     can (fota.device.protocol.valid_device_id): no device can take them either.
DEVICE_PASSWORDS = "passwords"
DEVICE_ACL_FILE = "acl"
SERVICE_PASSWORDS = "service-passwords"
SERVICE_ACL_FILE = "service-acl"

# A device may only read its own command and data topics and write its own status,
# inventory, online flag and chunk requests. %u is the MQTT username = the device id.
DEVICE_ACL = """\
pattern read fota/v1/%u/cmd
pattern read fota/v1/%u/data
pattern write fota/v1/%u/status
pattern write fota/v1/%u/inventory
pattern write fota/v1/%u/online
pattern write fota/v1/%u/req
"""


class BrokerError(RuntimeError):
    pass


LOOPBACK = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::")  # every address of the machine
TLS_PORT = 8883                  # MQTT over TLS (IANA): the default of a listener beyond loopback


def parse_listen(text: str) -> tuple[str, int | None]:
    """'ADDR[:PORT]' (an IPv6 address in brackets: '[::]:8883') -> (ADDR, PORT or None)."""
    text = text.strip()
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (None if not rest else "bad")
    elif text.count(":") == 1:
        addr, port = text.split(":")
    else:
        addr, port = text, None
    if not addr or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"not an ADDR[:PORT] to listen on: {text!r}")
    return addr, int(port) if port is not None else None


SIGNALLED, NOT_RUNNING, NOT_PERMITTED = "signalled", "not running", "not permitted"


def hup_pid_file(pid_file: Path) -> str:
    """SIGHUP the broker process a pid file names (Mosquitto and nats-server re-read their
    accounts on it): SIGNALLED; NOT_RUNNING (no file, no such process, a file that names none);
    NOT_PERMITTED (it runs as another OS user, EPERM: a reload its user or root has to do)."""
    try:
        os.kill(int(Path(pid_file).read_text().strip()), signal.SIGHUP)
    except PermissionError:
        return NOT_PERMITTED
    except (OSError, ValueError):
        return NOT_RUNNING
    return SIGNALLED


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach host (a wildcard reaches every interface)."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, boards use it over the network


def connect_host(listen_host: str) -> str:
    """Where a client on this machine reaches a listener bound to listen_host."""
    return LOOPBACK if listen_host in WILDCARDS else listen_host


def free_port(besides: int | None = None) -> int:
    """A port free now on 127.0.0.1 (not `besides`: the other listener's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != besides:
            return port


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not path:
        raise BrokerError("mosquitto is not installed: run 'apt-get install mosquitto' (as root)")
    return path


def write_acl(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def write_broker_acl(directory: Path, acl_extra: tuple[str, str] = ("", "")) -> None:
    """Both listeners' ACL files: the devices' patterns (and any extra account's lines after
    them: a `user` line starts its own section), the server account's rights."""
    write_acl(directory / DEVICE_ACL_FILE, DEVICE_ACL + acl_extra[0])
    write_acl(directory / SERVICE_ACL_FILE, f"user {SERVER_USER}\ntopic readwrite fota/#\n" + acl_extra[1])


def write_passwords(path: Path, hashes: dict[str, str]) -> None:
    """hashes: username -> Mosquitto hash line part (see fota.server.credentials)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{u}:{h}\n" for u, h in sorted(hashes.items())))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def write_broker_passwords(directory: Path, hashes: dict[str, str]) -> None:
    """Both listeners' password files from one username -> hash map: the server account on the
    service listener, every other account (the devices) on the device listener."""
    write_passwords(directory / DEVICE_PASSWORDS, {u: h for u, h in hashes.items() if u != SERVER_USER})
    write_passwords(directory / SERVICE_PASSWORDS, {u: h for u, h in hashes.items() if u == SERVER_USER})


# With persistence, Mosquitto writes its state (sessions, subscriptions, queued QoS 1 messages)
# on a clean exit, and otherwise only every autosave_interval seconds (default 1800). A broker
# killed before its first save comes back without the control center's session: statuses
# published before the center re-subscribes are dropped. Saving every second bounds that (Mosquitto
# saves once more than the interval has passed: every 2 s). The managed broker is also told to
# save as soon as the control center subscribed (Mosquitto.save), so its session is on disk at once.
AUTOSAVE_INTERVAL = 1

# The largest MQTT packet the managed broker (`fota serve`) takes from any client; a client that
# sends a larger one is disconnected. The largest legitimate packets are the center's chunks
# (8192 + 8 bytes of payload plus topic and header) and commands (at most 8192 bytes, key
# updates included); a device's status is at most protocol.MAX_STATUS_BYTES (4096), its inventory
# a few hundred bytes. Defence in depth only: the control center enforces its own limits on any
# broker. Mosquitto's class default stays 65536 (tests send oversize commands to devices).
MANAGED_MAX_PACKET = 16384


def write_config(directory: Path, port: int, *, service_port: int | None = None, auth: bool = True,
                 persistence: bool = False, max_packet_size: int = 65536, tls: TlsFiles | None = None,
                 autosave_interval: int = AUTOSAVE_INTERVAL, host: str = LOOPBACK,
                 acl_extra: tuple[str, str] = ("", "")) -> Path:
    """auth: a device listener on host:port and a service listener on 127.0.0.1:service_port
    (see the top of this module); without auth one anonymous listener on host:port.

    host: the device listener's address; beyond loopback only with tls (boards on the network
    send their passwords over it).

    tls: both listeners speak only TLS (1.2 or later; 1.3 when the client has it).
    autosave_interval: seconds between saves of the persistent state (persistence only).
    acl_extra: ACL lines added to the (device listener, service listener) ACL files: Home
    Assistant's account and the center's rights on its topics (fota.server.homeassistant.broker_acl)."""
    if tls is None and not is_loopback(host):
        raise BrokerError(f"a listener on {host} (beyond loopback) needs TLS")
    private_dir(directory)  # passwords, ACL and the persistent sessions (queued messages)
    tls_lines = [] if tls is None else [
        f"cafile {tls.cafile}",
        f"certfile {tls.certfile}",
        f"keyfile {tls.keyfile}",
        "tls_version tlsv1.2",  # the minimum: boards whose mbedTLS lacks 1.3 still connect
    ]
    lines = [
        "max_inflight_messages 0",
        "max_queued_messages 100000",
        f"max_packet_size {max_packet_size}",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {directory}/",
        f"autosave_interval {autosave_interval}",
        "log_dest none",
        # Chunks are small request/response messages: Nagle's algorithm would hold each reply
        # back until the previous one is acknowledged (tens of ms per chunk).
        "set_tcp_nodelay true",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root Mosquitto drops to the "mosquitto" user, which cannot read our 0600 files.
        lines.append("user root")
    if auth:
        if service_port is None or service_port == port:
            raise ValueError("an authenticated broker needs a service port of its own")
        lines += [
            "per_listener_settings true",
            f"listener {port} {host}", *tls_lines,
            "use_username_as_clientid true",
            "allow_anonymous false",
            f"password_file {directory / DEVICE_PASSWORDS}",
            f"acl_file {directory / DEVICE_ACL_FILE}",
            f"listener {service_port} {LOOPBACK}", *tls_lines,
            "allow_anonymous false",
            f"password_file {directory / SERVICE_PASSWORDS}",
            f"acl_file {directory / SERVICE_ACL_FILE}",
        ]
        for name in (DEVICE_PASSWORDS, SERVICE_PASSWORDS):
            if not (directory / name).exists():
                write_passwords(directory / name, {})
        write_broker_acl(directory, acl_extra)
    else:
        lines += [f"listener {port} {host}", *tls_lines, "allow_anonymous true"]
    conf = directory / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


# An MQTT 3.1.1 CONNECT without credentials (client id "", clean session): any Mosquitto answers
# it with a CONNACK (refused where accounts are required).
_PROBE_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"


def _answers_connect(port: int, timeout: float = 5.0) -> bool:
    """Whether Mosquitto on 127.0.0.1:port answered a CONNECT on a new connection (a CONNACK, or
    closing the connection). Mosquitto runs a SIGHUP's reload at the end of the loop turn in
    which the signal arrived, and takes a new connection's first packet in a later turn than its
    accept: two of these in a row, started after the signal, end after the reload."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(_PROBE_CONNECT)
            sock.recv(4)
        return True
    except OSError:
        return False


class Mosquitto:
    """A supervised Mosquitto process: devices on host:port (127.0.0.1 unless given), the
    control center on 127.0.0.1:service_port (the same port without auth); TLS only if tls is
    given."""

    def __init__(self, directory: Path, port: int | None = None, *, service_port: int | None = None,
                 auth: bool = True, persistence: bool = False, tls: TlsFiles | None = None,
                 max_packet_size: int = 65536, host: str = LOOPBACK, acl_extra: tuple[str, str] = ("", ""),
                 autosave_interval: int = AUTOSAVE_INTERVAL):
        self.directory = Path(directory)
        self.autosave_interval = autosave_interval
        self.acl_extra = acl_extra
        self.host = host
        self.max_packet_size = max_packet_size
        self.port = port or free_port()
        self.service_port = (service_port or free_port(besides=self.port)) if auth else self.port
        self.auth = auth
        self.persistence = persistence
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    def write_passwords(self, hashes: dict[str, str]) -> None:
        """Both listeners' accounts (write_broker_passwords); reload() makes them count."""
        write_broker_passwords(self.directory, hashes)

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        conf = write_config(self.directory, self.port, service_port=self.service_port, auth=self.auth,
                            persistence=self.persistence, tls=self.tls, max_packet_size=self.max_packet_size,
                            host=self.host, acl_extra=self.acl_extra, autosave_interval=self.autosave_interval)
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()}")
            try:
                with socket.create_connection((connect_host(self.host), self.port), timeout=0.2), \
                        socket.create_connection((LOOPBACK, self.service_port), timeout=0.2):
                    # Mosquitto writes pid_file only as a daemon: keep our own, for reloads.
                    (self.directory / "mosquitto.pid").write_text(str(self.proc.pid))
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def reload(self) -> None:
        """Re-read the password and ACL files (Mosquitto reloads them on SIGHUP); returns once
        the new accounts count."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            if self.tls is not None or not (_answers_connect(self.service_port) and _answers_connect(self.service_port)):
                time.sleep(0.2)  # no plain probe possible (TLS), or it went unanswered: a while

    def save(self) -> None:
        """Write the persistent state now (Mosquitto saves it on SIGUSR1)."""
        if self.persistence and self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        (self.directory / "mosquitto.pid").unlink(missing_ok=True)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
