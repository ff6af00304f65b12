"""A fota home directory: where the control center keeps its database, keys, blobs and broker.

    <home>/config.json      database_url, broker_url (None: managed Mosquitto), broker_port (the
                            managed broker's device listener), broker_service_port (its service
                            listener: the control center), server_password, broker_tls,
                            broker_cafile/certfile/keyfile, broker_listen ("ADDR[:PORT]" of the
                            device listener; beyond loopback it implies broker_tls), broker_hostname
                            (the name or IP boards connect to: in the server certificate),
                            homeassistant (fota ha: enabled, installs, tag, discovery_prefix,
                            release_url, password_hash of its broker account), nats_config (where
                            fota broker nats-config wrote a NATS cluster's configs: dir, pid_files,
                            mqtt_ports) (0600)
    <home>/fota.db          SQLite database (default)
    <home>/keys/            root.pem (pinned on devices; offline in production), signing.pem
                            (signs manifests and commands), trust.json, keys-update.json
    <home>/blobs/           release images by sha256
    <home>/broker/          managed Mosquitto: mosquitto.conf, passwords + acl (device listener),
                            service-passwords + service-acl (service listener), pid
    <home>/tls/             managed Mosquitto's TLS (broker_tls): ca.pem, ca.key, server.pem, server.key
    <home>/devices/<id>/    unix-port device directories (demo, simulation)
    <home>/keys/kek         the key-encryption key of the database's secret keys, unless
                            $FOTA_KEK gives it (fota.server.kek; back it up: docs/operations.md)

Everything in a home is private to its owner: the home and its directories 0700, files 0600
(``Home.secure``, run by every fota command that opens the home's database).
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from fota.server.broker import (DEVICE_PASSWORDS, HOMEASSISTANT_USER, LOOPBACK, NOT_PERMITTED, SERVER_USER, SIGNALLED,
                                TLS_PORT, connect_host, free_port, hup_pid_file, is_loopback, parse_listen,
                                write_broker_acl, write_broker_passwords)
from fota.server.credentials import mosquitto_hash, new_password
from fota.tools.private import private_dir, private_tree, write_private

DEFAULT_HOME = ".fota"


class HomeError(RuntimeError):
    pass


@dataclass(frozen=True)
class NatsUsers:
    """What Home.sync_nats_users did: the users file's directory, the devices left out for want of
    a bcrypt hash, the nodes' pid files and what telling each to reload came to (SIGHUP, on this
    machine: fota.server.broker.hup_pid_file)."""
    directory: Path
    missing: list[str]
    reloads: dict[Path, str]

    @property
    def pid_files(self) -> list[Path]:
        return list(self.reloads)

    @property
    def reloaded(self) -> list[Path]:
        return [p for p, outcome in self.reloads.items() if outcome == SIGNALLED]

    @property
    def refused(self) -> list[Path]:
        """Nodes that run as another OS user: this process may not signal them."""
        return [p for p, outcome in self.reloads.items() if outcome == NOT_PERMITTED]


@dataclass(frozen=True)
class MosquittoPasswords:
    """What Home.sync_broker_passwords did on the managed Mosquitto: the password file written, the
    broker's pid file and what telling it to reload came to (SIGHUP: hup_pid_file)."""
    file: Path
    pid_file: Path
    reload: str

    @property
    def reloaded(self) -> bool:
        return self.reload == SIGNALLED


@dataclass
class Home:
    path: Path

    @classmethod
    def locate(cls, path: str | Path | None = None) -> "Home":
        return cls(Path(path or os.environ.get("FOTA_HOME") or DEFAULT_HOME).resolve())

    # ---- layout ------------------------------------------------------------------------------
    @property
    def keys(self) -> Path:
        return self.path / "keys"

    @property
    def private_key(self) -> Path:
        return self.keys / "signing.pem"

    @property
    def keyring(self):
        from fota.tools.keyring import Keyring
        return Keyring(self.keys)

    @property
    def kek_path(self) -> Path:
        return self.keys / "kek"

    def kek(self):
        """The key-encryption key ($FOTA_KEK, else keys/kek: created on first need). KekError
        when keys/kek is gone but the database holds keys it wrapped: a new one would not open
        them (restore it from a backup, docs/operations.md)."""
        from fota.server.kek import ENV, Kek, KekError, count_wrapped
        from fota.server.store import Store
        if not os.environ.get(ENV) and not self.kek_path.exists():
            store = Store(self.database_url)
            try:
                wrapped = count_wrapped(store)
            finally:
                store.dispose()
            if wrapped:
                raise KekError(f"{self.kek_path} is missing and {wrapped} key(s) in the database are wrapped by it: "
                               f"restore it from your backup or set ${ENV} (docs/operations.md)")
        return Kek.load(self.kek_path)

    # What fota keeps in a home (see the module docstring): only these are tightened, so that a
    # home pointed at a directory holding other files (--home .) leaves those alone.
    OWN_ENTRIES = ("config.json", "fota.db", "fota.db-wal", "fota.db-shm", "fota.db-journal", "keys", "blobs",
                   "broker", "tls", "devices", "sim", "serve.lock", "config.lock")

    def secure(self) -> None:
        """Make the home private to its owner: 0700 directories, 0600 files, also what an older
        version or another umask created wider."""
        private_dir(self.path)
        for name in self.OWN_ENTRIES:
            private_tree(self.path / name)

    def store(self):
        """The home's database (migrated), with the home made private and any key an older
        version stored in clear wrapped by the KEK (fota.server.kek.wrap_plain_keys)."""
        from fota.server.kek import wrap_plain_keys
        from fota.server.store import Store
        self.secure()
        store = Store(self.database_url)
        try:
            wrapped = wrap_plain_keys(store, self.kek)
        except BaseException:
            store.dispose()
            raise
        if wrapped:
            import logging
            logging.getLogger(__name__).warning("wrapped %d plain key(s) with the key-encryption key", wrapped)
        return store

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    @property
    def broker_dir(self) -> Path:
        return self.path / "broker"

    @property
    def devices_dir(self) -> Path:
        return self.path / "devices"

    @property
    def tls_dir(self) -> Path:
        return self.path / "tls"

    # ---- config ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def config(self) -> dict:
        """Read config.json, creating it with defaults the first time (and adding what a home
        made by an older fota lacks)."""
        if self.config_path.exists():
            cfg = json.loads(self.config_path.read_text())
            if "broker_service_port" in cfg:
                return cfg
        with open(self._config_lock(), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer: every process sees the same new port
            cfg = json.loads(self.config_path.read_text()) if self.config_path.exists() else {
                "database_url": f"sqlite:///{self.path / 'fota.db'}",
                "broker_url": None,
                "broker_port": free_port(),
                "server_password": new_password(),
            }
            if "broker_service_port" not in cfg:
                # The managed broker's second listener (fota.server.broker): homes made before
                # it existed get one on their first load.
                cfg["broker_service_port"] = free_port(besides=cfg.get("broker_port"))
                self.save_config(cfg)
        return cfg

    def _config_lock(self) -> Path:
        private_dir(self.path)
        lock = self.path / "config.lock"
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600))  # private whatever the umask
        return lock

    def retention(self, keep: int | None = None, days: float | None = None):
        """The status history retention (fota.server.retention) from config.json's history_keep
        and history_days (absent: the defaults; 0 or null: no such limit), keep/days overriding."""
        from fota.server.retention import DEFAULT_DAYS, DEFAULT_KEEP, retention_policy
        cfg = self.config()
        keep = keep if keep is not None else cfg.get("history_keep", DEFAULT_KEEP)
        days = days if days is not None else cfg.get("history_days", DEFAULT_DAYS)
        if (keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0)) or \
                (days is not None and (not isinstance(days, (int, float)) or isinstance(days, bool) or days < 0)):
            raise HomeError(f"{self.config_path}: history_keep must be an integer >= 0 and history_days "
                            "a number >= 0 (0 or null: no limit)")
        return retention_policy(keep, days)

    def save_config(self, cfg: dict) -> None:
        private_dir(self.path)
        write_private(self.config_path, json.dumps(cfg, indent=1))

    @property
    def database_url(self) -> str:
        return os.environ.get("FOTA_DATABASE_URL") or self.config()["database_url"]

    @property
    def broker_url(self) -> str:
        cfg = self.config()
        if os.environ.get("FOTA_BROKER_URL"):
            return os.environ["FOTA_BROKER_URL"]
        if cfg.get("broker_url"):
            return cfg["broker_url"]
        scheme = "mqtts" if self._managed_tls(cfg) else "mqtt"
        return f"{scheme}://{SERVER_USER}:{cfg['server_password']}@127.0.0.1:{cfg['broker_service_port']}"

    @property
    def device_broker(self) -> tuple[str, int]:
        """(host, port) the devices connect to: the managed broker's device listener, or the
        configured broker's address. A NATS cluster (broker_url ``nats://…,nats://…``, §4a of
        docs/operations.md): devices reach a node's MQTT listener, not its NATS port: the host is
        ``broker_hostname`` (a DNS name or load balancer in front of every node) or the first
        node's, the port ``broker_mqtt_port`` (default 1883)."""
        cfg = self.config()
        if self.managed_broker:
            host, port = self.broker_listen
            return cfg.get("broker_hostname") or connect_host(host), port
        if self.nats_broker:
            first = urlsplit(self.broker_url.split(",")[0].strip())
            port = cfg.get("broker_mqtt_port", 1883)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise HomeError(f"{self.config_path}: broker_mqtt_port must be a TCP port (the NATS nodes' MQTT listener)")
            return cfg.get("broker_hostname") or first.hostname or "127.0.0.1", port
        url = urlsplit(self.broker_url)
        return url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)

    @property
    def managed_broker(self) -> bool:
        return not (os.environ.get("FOTA_BROKER_URL") or self.config().get("broker_url"))

    @property
    def broker_listen(self) -> tuple[str, int]:
        """(address, port) of the managed broker's device listener: config.json's broker_listen
        (its port defaults to 8883 beyond loopback, else broker_port), else 127.0.0.1:broker_port."""
        return self.broker_listen_in(self.config())

    def broker_listen_in(self, cfg: dict) -> tuple[str, int]:
        """broker_listen as these settings (config.json's, saved or not) make it."""
        if not cfg.get("broker_listen"):
            return LOOPBACK, cfg["broker_port"]
        try:
            host, port = parse_listen(cfg["broker_listen"])
        except ValueError as e:
            raise HomeError(f"{self.config_path}: broker_listen: {e}") from None
        return host, port or (cfg["broker_port"] if is_loopback(host) else TLS_PORT)

    @property
    def broker_autosave(self) -> int:
        """Seconds between the managed broker's saves of its sessions (config.json's
        broker_autosave; default fota.server.broker.AUTOSAVE_INTERVAL, 1). A save rewrites every
        session and stalls Mosquitto's one thread: ~1.9 ms of CPU a second per 1,000 sessions at
        the default (docs/operations.md §4b); a longer interval costs less and loses more of the
        broker's state when it is killed (the center re-sends unanswered commands, devices their
        unacknowledged statuses: docs/reliability.md)."""
        from fota.server.broker import AUTOSAVE_INTERVAL
        value = self.config().get("broker_autosave", AUTOSAVE_INTERVAL)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 86400:
            raise HomeError(f"{self.config_path}: broker_autosave must be a whole number of seconds "
                            f"from 1 to 86400, not {value!r}")
        return value

    def _managed_tls(self, cfg: dict) -> bool:
        """The managed broker speaks TLS: broker_tls, or a device listener beyond loopback (boards
        on the network send their passwords over it: never in clear)."""
        return bool(cfg.get("broker_tls")) or (bool(cfg.get("broker_listen")) and not is_loopback(self.broker_listen[0]))

    def tls_names(self) -> tuple[list[str], list[str]]:
        """(host names, IP addresses) the managed broker's certificate names: localhost and
        127.0.0.1 (the control center, local devices), the listen address unless a wildcard,
        and broker_hostname (what boards connect to)."""
        import ipaddress

        from fota.server.broker import WILDCARDS
        names, ips = ["localhost"], [LOOPBACK]
        for name in (self.broker_listen[0], self.config().get("broker_hostname")):
            if not name or name in WILDCARDS:
                continue
            try:
                ip = str(ipaddress.ip_address(name))
            except ValueError:
                names += [name] if name not in names else []
            else:
                ips += [ip] if ip not in ips else []
        return names, ips

    # ---- TLS ---------------------------------------------------------------------------------
    @property
    def broker_tls(self) -> bool:
        """Clients reach the broker over TLS: an mqtts:// URL (the managed one with broker_tls),
        or a NATS cluster's tls:// URLs (its nodes' MQTT listeners speak TLS too: §4a of
        docs/operations.md)."""
        url = self.broker_url.lstrip()
        return url.startswith(("mqtts://", "tls://"))

    @property
    def nats_broker(self) -> bool:
        """broker_url lists the nodes of a NATS cluster (nats://… or tls://…)."""
        return self.broker_url.lstrip().startswith(("nats://", "tls://"))

    def nats_tls_files(self, hostnames=(), ips=()):
        """The NATS nodes' certificate (tls/nats.pem, nats.key; serverAuth and clientAuth, for the
        routes) issued by the home's CA (tls/ca.pem, created if missing, the one the managed
        Mosquitto uses), naming localhost, 127.0.0.1 and hostnames/ips; made once, then reused
        (re-issued when a name is missing or it nears expiry)."""
        from fota.server.tls import ensure_tls
        names = ["localhost"] + [h for h in hostnames if h != "localhost"]
        addresses = [LOOPBACK] + [i for i in ips if i != LOOPBACK]
        return ensure_tls(self.tls_dir, names, addresses, stem="nats", client_auth=True)

    def tls_files(self):
        """The managed broker's listener files (fota.server.tls.TlsFiles), None without TLS: the
        operator's own (broker_cafile, broker_certfile, broker_keyfile) or the home's CA and
        server certificate, created on first use and then reused."""
        from fota.server.tls import TlsFiles, ensure_tls
        cfg = self.config()
        if not (self.managed_broker and self._managed_tls(cfg)):
            return None
        own = ("broker_cafile", "broker_certfile", "broker_keyfile")
        if cfg.get("broker_certfile") or cfg.get("broker_keyfile"):
            missing = [k for k in own if not cfg.get(k)]
            if missing:
                raise HomeError(f"{self.config_path}: your own broker certificate also needs {', '.join(missing)}")
            return TlsFiles(*(cfg[k] for k in own))
        return ensure_tls(self.tls_dir, *self.tls_names())

    @property
    def broker_cafile(self) -> Path | None:
        """The CA that clients verify the broker against (None: the system's CAs, or no TLS)."""
        if not self.broker_tls:
            return None
        files = self.tls_files()
        if files is not None:
            return files.cafile
        cafile = self.config().get("broker_cafile")
        if cafile:
            return Path(cafile)
        if self.nats_broker and (self.tls_dir / "ca.pem").is_file():  # `fota broker nats-tls-init`
            return self.tls_dir / "ca.pem"
        return None

    def broker_ssl_context(self):
        """The control center's TLS context for an mqtts:// broker or tls:// NATS nodes (None: plain, or system CAs)."""
        from fota.server.tls import client_context
        cafile = self.broker_cafile
        return client_context(cafile) if cafile else None

    def broker_cadata(self) -> bytes | None:
        """What a device pins to verify the broker (the CA certificate, DER); None: plain MQTT."""
        from fota.server.tls import ca_der
        cafile = self.broker_cafile
        return ca_der(cafile) if cafile else None

    # ---- transport http and object storage ---------------------------------------------------
    def object_store(self):
        """The blobs' object storage from config.json (`s3_bucket`, `s3_endpoint_url`, `s3_region`,
        `s3_prefix`; fota.server.objectstore.S3Payloads, extra `s3`), None without `s3_bucket`.
        When set it is the blobs' source of truth: releases and patches are written there when
        made, and a process whose blobs/ lacks one reads it from there (docs/http-transport.md)."""
        cfg = self.config()
        if not cfg.get("s3_bucket"):
            return None
        from fota.server.objectstore import S3Payloads
        from fota.server.payloadurls import URL_TTL
        return S3Payloads(cfg["s3_bucket"], blobs_dir=self.blobs, endpoint_url=cfg.get("s3_endpoint_url"),
                          region=cfg.get("s3_region"), prefix=cfg.get("s3_prefix", ""),
                          url_ttl=int(cfg.get("http_url_ttl", URL_TTL)), hosts=tuple(cfg.get("http_hosts", ())))

    def http_payloads(self):
        """Transport http's URL setting from config.json (docs/http-transport.md): presigned URLs
        of S3-compatible storage with `s3_bucket` (fota.server.objectstore.S3Payloads; not with
        `"s3_presign": false`, where the bucket only stores the blobs), else the blob route of
        `fota api` at `http_url` (payloadurls.HttpPayloads, its URL key from the KEK, as in every
        process of the home), or plain URLs of a static server or CDN with `http_static_url`
        (payloadurls.StaticPayloads); `http_url_ttl`, `http_hosts`. None: none."""
        cfg = self.config()
        from fota.server.payloadurls import URL_TTL, HttpPayloads
        ttl, hosts = int(cfg.get("http_url_ttl", URL_TTL)), tuple(cfg.get("http_hosts", ()))
        if cfg.get("s3_bucket") and cfg.get("s3_presign", True):  # presigned URLs of the bucket
            return self.object_store()
        if cfg.get("http_static_url"):  # a static server or CDN in front of a copy of blobs/
            from fota.server.payloadurls import StaticPayloads
            return StaticPayloads(cfg["http_static_url"], ttl, hosts)
        if not cfg.get("http_url"):
            return None
        return HttpPayloads(cfg["http_url"], self.kek().url_key, ttl, hosts)

    # ---- Home Assistant ----------------------------------------------------------------------
    def homeassistant(self) -> dict:
        """config.json's "homeassistant" block ({} when never enabled)."""
        return dict(self.config().get("homeassistant") or {})

    def save_homeassistant(self, block: dict) -> None:
        cfg = self.config()
        cfg["homeassistant"] = block
        self.save_config(cfg)

    def homeassistant_settings(self):
        """The center's fota.server.homeassistant.HomeAssistantSettings, None when not enabled.
        Whether installs are allowed is read from config.json at each use (fota ha installs)."""
        from fota.server.homeassistant import DEFAULT_PREFIX, DEFAULT_TAG, HomeAssistantSettings
        block = self.homeassistant()
        if not block.get("enabled"):
            return None
        return HomeAssistantSettings(tag=block.get("tag") or DEFAULT_TAG,
                                     discovery_prefix=block.get("discovery_prefix") or DEFAULT_PREFIX,
                                     installs=lambda: bool(self.homeassistant().get("installs")),
                                     release_url=block.get("release_url"),
                                     mqtt_url=self.nats_mqtt_url() if self.nats_broker else None)

    def nats_mqtt_url(self) -> str:
        """The NATS nodes' MQTT listeners as the server user sees them (mqtt[s]://fota-server:…@
        host:port, comma-separated, broker_url's order): each node's host in broker_url, its port
        from `fota broker nats-config` (nats_config.mqtt_ports), else broker_mqtt_port (1883)."""
        from fota.server.natsconfig import cluster_nodes
        nodes, password = cluster_nodes(self.broker_url)
        ports = (self.nats_config() or {}).get("mqtt_ports") or [self.config().get("broker_mqtt_port", 1883)]
        if len(ports) == 1:
            ports = ports * len(nodes)
        scheme = "mqtts" if self.broker_tls else "mqtt"
        return ",".join(f"{scheme}://{SERVER_USER}:{quote(password, safe='')}@{node.host}:{port}"
                        for node, port in zip(nodes, ports))

    def broker_acl_extra(self) -> tuple[str, str]:
        """The managed broker's ACL lines beyond the devices' and the server's: Home Assistant's."""
        from fota.server.homeassistant import DEFAULT_PREFIX, broker_acl
        block = self.homeassistant()
        if not block.get("enabled"):
            return "", ""
        return broker_acl(HOMEASSISTANT_USER, block.get("discovery_prefix") or DEFAULT_PREFIX)

    def sync_broker_acl(self) -> None:
        """Rewrite the managed broker's ACL files (Home Assistant enabled or not) and reload it."""
        if not self.managed_broker:
            return
        private_dir(self.broker_dir)
        write_broker_acl(self.broker_dir, self.broker_acl_extra())
        self._reload_broker()

    # ---- managed broker credentials ---------------------------------------------------------
    def sync_broker_passwords(self, store) -> "MosquittoPasswords | NatsUsers | None":
        """Write the managed broker's password file from the database and make a running
        broker reload it (MosquittoPasswords); on a NATS cluster whose configs `fota broker
        nats-config` wrote, its users file instead (sync_nats_users, returned); None: a broker
        whose accounts fota does not write (another broker URL, a NATS cluster without configs).

        Several processes do this: `fota serve` before and after starting its broker, every
        command that provisions devices (`fota device add`, `fota simulate`), and `fota device
        rekey|revoke` or the `fota api` process that runs them (fota.server.accounts). Reading the devices
        and writing the file happen under one lock, so a process that read the list earlier never
        replaces a newer file with it (`fota simulate` started with `fota serve` lost its devices'
        passwords that way, and the broker refused them)."""
        if self.nats_broker:
            return self.sync_nats_users(store)
        if not self.managed_broker:
            return None
        from fota.server.fleet import broker_password_hashes
        private_dir(self.broker_dir)
        server_hash = mosquitto_hash(self.config()["server_password"])
        with open(self.broker_dir / "passwords.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
            hashes = broker_password_hashes(store, server_hash)
            ha = self.homeassistant()
            if ha.get("enabled") and ha.get("password_hash"):
                hashes[HOMEASSISTANT_USER] = ha["password_hash"]
            write_broker_passwords(self.broker_dir, hashes)
            reload = self._reload_broker()
        return MosquittoPasswords(self.broker_dir / DEVICE_PASSWORDS, self.broker_dir / "mosquitto.pid", reload)

    def nats_config(self) -> dict | None:
        """Where `fota broker nats-config` wrote the nodes' configs ({"dir", "pid_files", "mqtt_ports"}),
        None: never."""
        block = self.config().get("nats_config")
        return block if block and block.get("dir") else None

    def sync_nats_users(self, store) -> "NatsUsers | None":
        """Rewrite the NATS users file from the registry (fota.server.natsconfig) and reload the
        nodes running on this machine; None when no configs were written for this home."""
        from fota.server.natsconfig import cluster_nodes, reload_nodes, write_registry_users
        block = self.nats_config()
        if block is None:
            return None
        from fota.server.homeassistant import DEFAULT_PREFIX, nats_user
        directory = Path(block["dir"])
        ha, others = self.homeassistant(), []
        if ha.get("enabled") and ha.get("password_bcrypt"):  # none: an account from before; fota ha account
            others.append(nats_user(HOMEASSISTANT_USER, ha["password_bcrypt"],
                                    ha.get("discovery_prefix") or DEFAULT_PREFIX))
        missing = write_registry_users(directory, store, cluster_nodes(self.broker_url)[1], others)
        return NatsUsers(directory, missing, reload_nodes([Path(p) for p in block.get("pid_files", [])]))

    def _reload_broker(self) -> str:
        """SIGHUP the managed Mosquitto if it runs (its pid file is written once it listens):
        fota.server.broker.hup_pid_file's outcome."""
        return hup_pid_file(self.broker_dir / "mosquitto.pid")
