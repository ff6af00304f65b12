"""Home Assistant: an MQTT ``update`` entity for each device that opted in (docs/home-assistant.md).

Follows Home Assistant's documentation of the MQTT update platform
(https://www.home-assistant.io/integrations/update.mqtt/, read 2026-12) and of MQTT discovery
(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery): a retained discovery config
per device, a JSON state (installed and latest version, title, summary, release URL, whether an
update runs and how far), an availability topic and, only when the operator allows installs
from Home Assistant, a command topic whose ``payload_install`` starts a deployment.

A device opts in with a tag (``HomeAssistantSettings.tag``, default ``home-assistant``): the
existing tag machinery, no schema change; ``fota ha add`` / ``fota ha remove`` set it.

What the bridge publishes (retained, QoS 1, through the center's connection: gmqtt's own publish,
which queues and retransmits QoS 1 messages; fota.gmqtt_adapter's raw path is for QoS 0 chunks;
on a NATS cluster through an MQTT 3.1.1 connection to a node, fota.server.center.hamqtt):

    <prefix>/update/fota/<device>/config   discovery (empty: the entity is removed)
    fota/ha/<device>/state                 JSON state
    fota/ha/<device>/availability          "online" / "offline" (the device's online flag)

and what it accepts (QoS 1): ``fota/ha/<device>/install`` with the payload ``INSTALL``.

The bridge exists only when Home Assistant is enabled: a fleet that does not use it pays
nothing. When enabled, it recomputes the opted-in devices' entities from the database every
``interval`` seconds (tags, releases and deployments change in other processes: the CLI, the
API), and sooner for a device whose status or online flag the intake just wrote; it publishes
only what changed. It learns which discovery configs the broker retains (a subscription with
no_local), so a device that opted out or was deleted while the center was down is removed too.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from sqlalchemy import String, cast, func, select

from fota.aiowait import within
from fota import __version__
from fota.device import protocol
from fota.server import audit
from fota.server.campaigns.spec import version_key
from fota.server.deployments import TERMINAL_STATES, UPDATE, DeploymentError, create_deployment
from fota.server.releases import ReleaseError
from fota.server.store import Deployment, Device, Job, Release, Store
from fota.server.store.inlists import chunks

log = logging.getLogger(__name__)

DEFAULT_TAG = "home-assistant"
DEFAULT_PREFIX = "homeassistant"     # Home Assistant's default discovery prefix
NODE_ID = "fota"                     # <prefix>/update/<node_id>/<object_id>/config; object_id = device id
TOPIC_ROOT = "fota/ha/"              # state, availability and command topics: fota/ha/<device>/<leaf>
STATE, AVAILABILITY, INSTALL = "state", "availability", "install"
PAYLOAD_INSTALL = "INSTALL"          # Home Assistant's default payload_install
ONLINE, OFFLINE = "online", "offline"
ACTOR = "homeassistant"              # who Home Assistant's installs are audited as
MAX_SUMMARY = 255                    # release_summary: Home Assistant shows at most 255 characters
DEFAULT_INTERVAL = 5.0               # s between full passes
MIN_GAP = 0.2                        # s: statuses arriving together make one pass
REMOVAL_REPEATS = 10                 # refreshes (HomeAssistantBridge.refresh) a removal is published again at
# The live job states, and how far each is: download progress while downloading, all of it after.
PAST_DOWNLOAD = (protocol.VERIFYING, protocol.INSTALLING, protocol.REBOOTING, protocol.TRIAL)


@dataclass
class HomeAssistantSettings:
    """How the center talks to Home Assistant (config.json "homeassistant", fota ha ...)."""
    tag: str = DEFAULT_TAG
    discovery_prefix: str = DEFAULT_PREFIX
    # Whether Home Assistant may start installs; asked at each pass and each command, so the
    # operator's `fota ha installs` takes effect without a restart.
    installs: Callable[[], bool] = field(default=lambda: False)
    # release_url template, "{version}" replaced (e.g. a dashboard's release page); None: no URL
    release_url: str | None = None
    interval: float = DEFAULT_INTERVAL
    # On a NATS cluster (which has no retained messages of its own): the nodes' MQTT listeners,
    # mqtt[s]://user:password@host:port comma-separated, that the bridge publishes through
    # (fota.server.center.hamqtt); unused with an MQTT broker.
    mqtt_url: str | None = None


def discovery_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/update/{NODE_ID}/{device_id}/config"


def device_topic(device_id: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}{device_id}/{leaf}"


def command_filter() -> str:
    return f"{TOPIC_ROOT}+/{INSTALL}"


def broker_acl(user: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """(device listener, service listener) Mosquitto ACL lines for Home Assistant's account
    `user` and for the center (fota.server.broker.write_config): Home Assistant reads the
    discovery configs and the fota/ha topics and writes only the install commands (its birth
    and last-will messages on <prefix>/status are dropped: nothing here needs them, the
    discovery configs are retained); the center writes and reads the discovery configs."""
    device = (f"user {user}\n"
              # Home Assistant subscribes to <prefix>/#: Mosquitto grants that subscription and
              # delivers only what this line allows
              f"topic read {prefix}/update/{NODE_ID}/#\n"
              f"topic read {TOPIC_ROOT}#\n"
              f"topic write {command_filter()}\n")
    service = f"topic readwrite {prefix}/update/{NODE_ID}/#\n"
    return device, service


def nats_user(user: str, password: str, prefix: str = DEFAULT_PREFIX) -> dict:
    """Home Assistant's user in a NATS cluster's users file (fota.server.natscluster; password
    plain or a bcrypt hash): MQTT connections only, broker_acl's rights. It may subscribe to the
    whole discovery prefix: nats-server refuses a subscription wider than the permissions (where
    Mosquitto grants it and filters the deliveries), and Home Assistant subscribes to
    <prefix>/+/+/config and the like; in the FOTA account only the center publishes there (Home
    Assistant's own birth message is refused, as on Mosquitto). It publishes only install commands."""
    if "." in prefix:  # an MQTT topic's '.' is not a NATS subject's separator
        raise ValueError(f"discovery prefix {prefix!r}: no '.' on a NATS cluster")
    root = TOPIC_ROOT.rstrip("/").replace("/", ".")
    return {"user": user, "password": password, "allowed_connection_types": ["MQTT"],
            "permissions": {"publish": {"allow": [f"{root}.*.{INSTALL}"]},
                            "subscribe": {"allow": [prefix, f"{prefix}.>", f"{root}.>"]}}}


def set_opt_in(store: Store, device_ids: list[str], tag: str, opted: bool) -> list[str]:
    """Add (opted) or remove the opt-in tag of devices; the ids whose tags changed. LookupError
    for an unknown device (nothing changed then)."""
    changed = []
    with store.session() as s:
        devices = [s.get(Device, device_id) for device_id in device_ids]
        missing = [i for i, d in zip(device_ids, devices) if d is None]
        if missing:
            raise LookupError(f"unknown device(s): {', '.join(missing)}")
        for device in devices:
            tags = list(device.tags or [])
            if opted and tag not in tags:
                device.tags = tags + [tag]
            elif not opted and tag in tags:
                device.tags = [t for t in tags if t != tag]
            else:
                continue
            changed.append(device.id)
    return changed


def newest_release(releases: list[tuple], hardware: str | None, version: str | None) -> tuple | None:
    """The newest release (by version order, then id) for `hardware` that a device on `version`
    may take (min_version); rows are (id, version, hardware list, min_version, kind, size, counter)."""
    best = None
    for row in releases:
        _, rel_version, rel_hardware, min_version, *_ = row
        if hardware not in (rel_hardware or []):
            continue
        if min_version and (version is None or version_key(version) < version_key(min_version)):
            continue
        if best is None or (version_key(rel_version), row[0]) > (version_key(best[1]), best[0]):
            best = row
    return best


@dataclass
class DeviceView:
    """What the entity of one device is made of (read from the database in one pass)."""
    device_id: str
    hardware: str | None
    version: str | None
    online: bool
    release: tuple | None = None          # newest_release row
    job: tuple | None = None              # its newest update job: (id, state, progress, code, reason,
    #                                       release version)


class HomeAssistantBridge:
    def __init__(self, store: Store, db: Callable[..., Awaitable], publish: Callable[..., bool],
                 settings: HomeAssistantSettings, refresh: float | None = None):
        self.store = store
        self.db = db                        # runs a function on the database thread
        self.publish = publish              # (topic, payload, qos, retain) -> bool
        self.settings = settings
        self.prefix = settings.discovery_prefix
        self.opted: set[str] = set()        # devices with an entity now
        self.retained: set[str] = set()     # devices whose discovery config the broker holds
        self._sent: dict[str, tuple[bytes, bytes, bytes]] = {}   # device -> (config, state, availability)
        self._installed: dict[str, str] = {}  # device -> installed_version last published
        self._wake = asyncio.Event()
        # Publish every entity again each `refresh` seconds (None: only after a reconnect). On a
        # NATS cluster: a retained message published while JetStream re-elects a dead node's
        # stream leaders may not be stored, and the publisher is not told (measured, 2.15.1).
        self.refresh = refresh
        self._refreshed = 0.0
        # called at each refresh: ask the broker again which discovery configs it retains (an
        # empty retained message lost there leaves an entity that must be removed again)
        self.on_refresh: Callable[[], None] | None = None
        # device -> refreshes left: a removal is published again at the next REMOVAL_REPEATS
        # refreshes (a node that missed the first empty message may take a later one)
        self._removed: dict[str, int] = {}
        # counters (tests, diagnostics)
        self.passes = 0
        self.installs_started = 0
        self.installs_refused = 0
        self.commands_ignored = 0       # not an install command, or retained

    # ------------------------------------------------------------ topics in

    def handles(self, topic: str) -> bool:
        return topic.startswith(TOPIC_ROOT) or topic.startswith(f"{self.prefix}/update/{NODE_ID}/")

    def retained_filter(self) -> str:
        return f"{self.prefix}/update/{NODE_ID}/+/config"

    async def receive(self, topic: str, payload: bytes, retained: bool = False) -> None:
        parts = topic.split("/")
        if topic.startswith(TOPIC_ROOT):
            if len(parts) != 4 or parts[3] != INSTALL or not protocol.valid_device_id(parts[2]):
                self.commands_ignored += 1
                log.warning("Home Assistant message on %r ignored: not fota/ha/<device>/install", topic[:200])
            elif retained:
                # The broker would hand a retained command to every new subscription: an
                # install at each reconnect. Home Assistant never retains its commands.
                self.commands_ignored += 1
                if payload:
                    log.warning("retained Home Assistant command for %s ignored (clear it: publish an empty "
                                "retained message on %s)", parts[2], topic)
            else:
                await self.install(parts[2], payload)
            return
        # a discovery config the broker retains (from an earlier run): removed at the next
        # pass unless the device still opts in
        if len(parts) == 5 and payload and protocol.valid_device_id(parts[3]):
            self.retained.add(parts[3])
            self._wake.set()

    def republish(self) -> None:
        """Publish every entity again at the next pass (after a reconnect: a broker restarted
        without persistence lost the retained messages)."""
        self._sent.clear()
        self._wake.set()

    def touched(self, device_ids) -> None:
        """The intake wrote statuses or online flags of these devices (after commit)."""
        if not self.opted.isdisjoint(device_ids):
            self._wake.set()

    # ------------------------------------------------------------ the passes

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Home Assistant pass failed")
            try:
                await within(self._wake.wait(), self.settings.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(MIN_GAP)

    async def sync(self) -> None:
        """One pass: read the opted-in devices, publish what changed, remove what opted out."""
        now = asyncio.get_running_loop().time()
        refreshing = self.refresh is not None and now - self._refreshed >= self.refresh
        if refreshing:
            self._sent.clear()
            self._refreshed = now
            if self.on_refresh is not None:
                self.on_refresh()
        views = await self.db(self.read_views)
        self._repeat_removals(views, refreshing)
        installs = bool(self.settings.installs())
        self.passes += 1
        for device_id in sorted((self.opted | self.retained) - set(views)):
            self._remove(device_id)
        self.opted = set(views)
        for device_id, view in views.items():
            messages = self.messages(view, installs)
            sent = self._sent.get(device_id)
            for i, (topic, payload) in enumerate(zip(self._topics(device_id), messages)):
                if sent is None or sent[i] != payload:
                    self.publish(topic, payload, 1, True)
            self._sent[device_id] = messages
            self.retained.add(device_id)

    def _repeat_removals(self, views: dict, refreshing: bool) -> None:
        """At a refresh, publish the recent removals' empty messages again (a device that opted
        in again is no longer removed)."""
        for device_id in list(self._removed):
            if device_id in views:
                del self._removed[device_id]
            elif refreshing:
                for topic in self._topics(device_id):
                    self.publish(topic, b"", 1, True)
                self._removed[device_id] -= 1
                if not self._removed[device_id]:
                    del self._removed[device_id]

    def _topics(self, device_id: str) -> tuple[str, str, str]:
        return (discovery_topic(self.prefix, device_id), device_topic(device_id, STATE),
                device_topic(device_id, AVAILABILITY))

    def _remove(self, device_id: str) -> None:
        """Empty retained messages: Home Assistant removes the entity, the broker forgets them."""
        for topic in self._topics(device_id):
            self.publish(topic, b"", 1, True)
        self._sent.pop(device_id, None)
        self._installed.pop(device_id, None)
        self.retained.discard(device_id)
        if self.refresh is not None:
            self._removed[device_id] = REMOVAL_REPEATS
        log.info("Home Assistant entity of %s removed", device_id)

    def read_views(self) -> dict[str, DeviceView]:
        """(DB thread) the opted-in devices with their newest compatible release and newest job."""
        tag = self.settings.tag
        with self.store.session() as s:
            # A text match narrows the scan on both backends (JSON membership differs); the
            # Python test below decides.
            rows = s.execute(select(Device.id, Device.hardware, Device.version, Device.online, Device.tags)
                             .where(cast(Device.tags, String).like(f'%"{tag}"%'))).all()
            views = {r.id: DeviceView(r.id, r.hardware, r.version, bool(r.online))
                     for r in rows if tag in (r.tags or [])}
            if not views:
                return views
            releases = s.execute(select(Release.id, Release.version, Release.hardware, Release.min_version,
                                        Release.kind, Release.size, Release.security_counter)
                                 .where(Release.live)).all()  # never offer a deleted one
            for part in chunks(sorted(views)):
                newest = (select(func.max(Job.id)).where(Job.device_id.in_(part), Job.kind == UPDATE)
                          .group_by(Job.device_id))
                for job_id, device_id, state, progress, code, reason, version in s.execute(
                        select(Job.id, Job.device_id, Job.state, Job.progress, Job.code, Job.reason, Release.version)
                        .join(Deployment, Deployment.id == Job.deployment_id)
                        .join(Release, Release.id == Deployment.release_id)
                        .where(Job.id.in_(newest))):
                    views[device_id].job = (job_id, state, progress, code, reason, version)
        for view in views.values():
            view.release = newest_release(releases, view.hardware, view.version)
        return views

    # ------------------------------------------------------------ what is published

    def messages(self, view: DeviceView, installs: bool) -> tuple[bytes, bytes, bytes]:
        """(discovery config, state, availability) payloads of one device."""
        state = self.state(view)
        config: dict[str, Any] = {
            "name": "Firmware",
            "unique_id": f"fota_{view.device_id}_firmware",
            "device_class": "firmware",
            "entity_category": "config",
            "state_topic": device_topic(view.device_id, STATE),
            "availability_topic": device_topic(view.device_id, AVAILABILITY),
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
            "qos": 1,
            "device": {"identifiers": [f"fota_{view.device_id}"], "name": view.device_id,
                       "manufacturer": "fota", "model": view.hardware or "unknown",
                       **({"sw_version": state["installed_version"]} if "installed_version" in state else {})},
            "origin": {"name": "fota", "sw_version": __version__},
        }
        if installs:  # without a command topic Home Assistant shows no install button
            config["command_topic"] = device_topic(view.device_id, INSTALL)
            config["payload_install"] = PAYLOAD_INSTALL
        return (_json(config), _json(state), (ONLINE if view.online else OFFLINE).encode())

    def state(self, view: DeviceView) -> dict[str, Any]:
        """The JSON state: installed_version changes once the device confirmed the new version
        (during its trial boot it may already report it); in_progress and update_percentage
        follow the device's open job."""
        job = view.job
        running = job is not None and job[1] not in TERMINAL_STATES
        installed = view.version
        if running and installed == job[5] and view.device_id in self._installed:
            # on trial: not confirmed yet (a center started during the trial knows no older one)
            installed = self._installed[view.device_id]
        if installed is not None:
            self._installed[view.device_id] = installed
        release = view.release
        latest = release[1] if release is not None else installed
        if release is not None and installed is not None and version_key(installed) > version_key(latest):
            latest = installed  # running something newer than any release here: nothing to offer
        state: dict[str, Any] = {"title": f"{view.hardware or 'device'} firmware"}
        if installed is not None:
            state["installed_version"] = installed
        if latest is not None:
            state["latest_version"] = latest
        state["release_summary"] = self._summary(view, release, running)[:MAX_SUMMARY]
        if release is not None and self.settings.release_url:
            state["release_url"] = self.settings.release_url.replace("{version}", release[1])
        state["in_progress"] = running
        state["update_percentage"] = self._percentage(job) if running else None
        return state

    @staticmethod
    def _percentage(job: tuple) -> int | None:
        state, progress = job[1], job[2]
        if state == protocol.DOWNLOADING:
            return max(0, min(100, int(round((progress or 0.0) * 100))))
        if state in PAST_DOWNLOAD:
            return 100
        return None  # pending, sent, postponed: not started (Home Assistant shows no bar yet)

    @staticmethod
    def _summary(view: DeviceView, release: tuple | None, running: bool) -> str:
        job = view.job
        if running:
            return f"Updating to {job[5]}: {job[1]}"
        parts = []
        if release is not None:
            parts.append(f"Release {release[1]} for {view.hardware} ({release[4]}, {release[5]} bytes).")
        else:
            parts.append(f"No release for {view.hardware or 'this hardware'}.")
        if job is not None and job[1] != protocol.CONFIRMED:
            parts.append(f"Last update to {job[5]}: {job[1]}" + (f" ({job[3]})" if job[3] else "") + ".")
        return " ".join(parts)

    # ------------------------------------------------------------ installs

    async def install(self, device_id: str, payload: bytes) -> None:
        """An install command from Home Assistant: a deployment of the newest compatible
        release to the device, if allowed; refused ones are logged and audited."""
        if payload != PAYLOAD_INSTALL.encode():
            self.commands_ignored += 1
            log.warning("Home Assistant command for %s ignored: payload %r is not %s",
                        device_id, payload[:32], PAYLOAD_INSTALL)
            return
        started = await self.db(self._install, device_id, bool(self.settings.installs()))
        if started:
            self.installs_started += 1
        else:
            self.installs_refused += 1
        self._wake.set()

    def _install(self, device_id: str, allowed: bool) -> bool:
        """(DB thread) create the deployment, or audit why not; True if created."""
        why = None
        views = self.read_views() if allowed else {}
        view = views.get(device_id)
        if not allowed:
            why = "installs from Home Assistant are off (fota ha installs --allow)"
        elif view is None:
            why = f"device has no Home Assistant entity (tag {self.settings.tag!r} missing or no such device)"
        elif view.release is None:
            why = f"no release for hardware {view.hardware}"
        elif view.release[1] == view.version:
            why = f"already runs {view.version}"
        elif view.job is not None and view.job[1] not in TERMINAL_STATES:
            why = f"job {view.job[0]} is still {view.job[1]}"
        if why is None:
            try:
                with audit.transaction(self.store) as tx:
                    dep = create_deployment(tx, view.release[0], device_ids=[device_id])
                    tx.record(ACTOR, "deployment.create", f"deployment:{dep.id}",
                              {"release": view.release[1], "target": dep.target, "devices": [device_id],
                               "via": "home-assistant"})
            except (DeploymentError, ReleaseError) as exc:
                why = str(exc)
            else:
                log.info("Home Assistant started deployment %s: %s to %s", dep.id, view.release[1], device_id)
                return True
        log.warning("Home Assistant install for %s refused: %s", device_id, why)
        audit.record(self.store, ACTOR, "ha.install.refused", f"device:{device_id}", {"reason": why})
        return False


def _json(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
