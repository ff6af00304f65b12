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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not path:
        raise BrokerError("mosquitto is not installed: run 'apt-get install mosquitto' (as root)")
    return path


def write_acl(path: Path, server_user: str = SERVER_USER) -> None:
    text = f"user {server_user}\ntopic readwrite fota/#\n\n" + DEVICE_ACL
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def write_passwords(path: Path, hashes: dict[str, str]) -> None:
    """hashes: username -> Mosquitto hash line part (see fota.server.credentials)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{u}:{h}\n" for u, h in sorted(hashes.items())))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


# With persistence, Mosquitto writes its state (sessions, subscriptions, queued QoS 1 messages)
# on a clean exit, and otherwise only every autosave_interval seconds (default 1800). A broker
# killed before its first save comes back without the control center's session: statuses
# published before the center re-subscribes are dropped. Saving every second bounds that (Mosquitto
# saves once more than the interval has passed: every 2 s). The managed broker is also told to
# save as soon as the control center subscribed (Mosquitto.save), so its session is on disk at once.
AUTOSAVE_INTERVAL = 1


def write_config(directory: Path, port: int, *, auth: bool = True, persistence: bool = False,
                 max_packet_size: int = 65536, tls: TlsFiles | None = None,
                 autosave_interval: int = AUTOSAVE_INTERVAL) -> Path:
    """tls: the listener speaks only TLS (1.2 or later; 1.3 when the client has it).

    autosave_interval: seconds between saves of the persistent state (persistence only)."""
    private_dir(directory)  # passwords, ACL and the persistent sessions (queued messages)
    lines = [f"listener {port} 127.0.0.1"]
    if tls is not None:
        lines += [
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            "tls_version tlsv1.2",  # the minimum: boards whose mbedTLS lacks 1.3 still connect
        ]
    lines += [
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
        lines += [
            "allow_anonymous false",
            f"password_file {directory / 'passwords'}",
            f"acl_file {directory / 'acl'}",
        ]
        if not (directory / "passwords").exists():
            write_passwords(directory / "passwords", {})
        write_acl(directory / "acl")
    else:
        lines.append("allow_anonymous true")
    conf = directory / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


class Mosquitto:
    """A supervised Mosquitto process bound to 127.0.0.1:port (TLS only if tls is given)."""

    def __init__(self, directory: Path, port: int | None = None, *, auth: bool = True,
                 persistence: bool = False, tls: TlsFiles | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.auth = auth
        self.persistence = persistence
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def passwords(self) -> Path:
        return self.directory / "passwords"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        conf = write_config(self.directory, self.port, auth=self.auth, persistence=self.persistence,
                            tls=self.tls)
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    # Mosquitto writes pid_file only as a daemon: keep our own, for reloads.
                    (self.directory / "mosquitto.pid").write_text(str(self.proc.pid))
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def reload(self) -> None:
        """Re-read the password and ACL files (Mosquitto reloads them on SIGHUP)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)

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
