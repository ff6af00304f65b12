"""A fleet of simulated devices in one asyncio process, provisioned like real devices.

    plan = FailurePlan(unhealthy=0.1, slow=0.05, chunk_delay=0.05, sleepy=0.02, sleep_at=5, sleep_for=20)
    creds = provision(store, ["sim-00001", ...])           # broker accounts, as `fota device add`
    fleet = SimFleet.build(creds, host=..., port=..., root_key=..., trust=..., plan=plan)
    await fleet.start(); ...; await fleet.stop()

The caller makes the broker take the new accounts (the tests' BrokerInfo, the bench's Broker,
or Home.sync_broker_passwords for a managed broker).
"""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterable

from fota.server.fleet import provision_device
from fota.server.store import Store
from fota.sim.device import Profile, SimDevice
from fota.sim.verify import VERIFIERS

__all__ = ["FailurePlan", "SimFleet", "device_ids", "provision"]

HARDWARE = "sim"


def device_ids(n: int, prefix: str = "sim") -> list[str]:
    width = max(5, len(str(n)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, n + 1)]


class FailurePlan:
    """Failure rates (fractions of the fleet, exact counts: round(rate * n) devices, chosen by seed).

    unhealthy: a new image fails its health check at every trial boot, so the device reverts;
    slow: `chunk_delay` seconds before each chunk is handled;
    sleepy: napping `sleep_for` seconds, starting at a random time in [0, sleep_at] s; a nap
            publishes the retained `online 0` first, as a board before its deep sleep, so the
            control center holds the sleeper's jobs until it is back (fota.sim.device.Profile);
    announce_nap=False: the sleepers leave without saying so (a firmware bug, or a dropped link
            whose will has not fired yet): the center takes them for online and sends, and the
            broker queues their commands in the session. Only for tests of that queue.
    """

    def __init__(self, unhealthy: float = 0.0, slow: float = 0.0, chunk_delay: float = 0.05,
                 sleepy: float = 0.0, sleep_at: float = 5.0, sleep_for: float = 10.0, seed: int = 1,
                 announce_nap: bool = True):
        for name, rate in (("unhealthy", unhealthy), ("slow", slow), ("sleepy", sleepy)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} rate must be within 0..1")
        self.unhealthy, self.slow, self.sleepy = unhealthy, slow, sleepy
        self.chunk_delay, self.sleep_at, self.sleep_for = chunk_delay, sleep_at, sleep_for
        self.seed = seed
        self.announce_nap = announce_nap

    def profiles(self, ids: list[str]) -> dict[str, Profile]:
        rng = random.Random(self.seed)
        n = len(ids)
        pick = lambda rate: set(rng.sample(ids, round(rate * n)))  # noqa: E731
        unhealthy, slow, sleepy = pick(self.unhealthy), pick(self.slow), pick(self.sleepy)
        return {i: Profile(unhealthy=i in unhealthy,
                           chunk_delay=self.chunk_delay if i in slow else 0.0,
                           sleep_at=rng.uniform(0, self.sleep_at) if i in sleepy else None,
                           sleep_for=self.sleep_for if i in sleepy else 0.0,
                           announce_nap=self.announce_nap)
                for i in ids}


def provision(store: Store, ids: Iterable[str], hardware: str = HARDWARE,
              tags: Iterable[str] = ("sim",)) -> dict[str, str]:
    """Provision devices in the store (fota.server.fleet); returns id -> broker password."""
    return {i: provision_device(store, i, hardware, tags=tuple(tags))[1] for i in ids}


class SimFleet:
    def __init__(self, devices: list[SimDevice]):
        self.devices = {d.id: d for d in devices}

    @classmethod
    def build(cls, passwords: dict[str, str], *, host: str, port: int | list[int], root_key: bytes, trust: dict,
              plan: FailurePlan | None = None, verify: str = "cryptography", **device_settings) -> "SimFleet":
        ids = list(passwords)
        profiles = (plan or FailurePlan()).profiles(ids)
        check = VERIFIERS[verify]
        return cls([SimDevice(i, passwords[i], host=host, port=port, root_key=root_key, trust=trust,
                              verify=check, profile=profiles[i], **device_settings) for i in ids])

    async def start(self, connect_batch: int = 500, pause: float = 0.05) -> None:
        """Start every device; `connect_batch` at a time get a head start of `pause` seconds
        (CONNECT storms of thousands are fine for Mosquitto, but spreading them keeps CONNACK
        latency low; a NATS cluster creates a replicated JetStream consumer per session and
        times out under a storm: pace it)."""
        for n, device in enumerate(self.devices.values(), 1):
            device.start()
            if n % connect_batch == 0:
                await asyncio.sleep(pause)

    async def wait_connected(self, timeout: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(d.connects for d in self.devices.values()):
                return
            await asyncio.sleep(0.1)
        missing = [d.id for d in self.devices.values() if not d.connects]
        raise TimeoutError(f"{len(missing)} simulated device(s) never connected, e.g. {missing[:3]}")

    async def stop(self) -> None:
        await asyncio.gather(*(d.stop() for d in self.devices.values()), return_exceptions=True)

    def versions(self) -> Counter:
        """running version -> number of devices"""
        return Counter(d.running_version() for d in self.devices.values())

    def summary(self) -> dict:
        devs = self.devices.values()
        return {
            "devices": len(self.devices),
            "connected": sum(1 for d in devs if d.client is not None and not d._lost),
            "versions": dict(self.versions()),
            "states": dict(Counter(d.core.state if d.core else "booting" for d in devs)),
            "confirmed": sum(1 for d in devs if d.confirmed_at is not None),
            "reverted": sum(1 for d in devs if d.reverted_at is not None),
            "reboots": sum(d.boots - 1 for d in devs),
            "chunks": sum(d.chunks for d in devs),
            "stale_chunks": sum(d.stale_chunks for d in devs),
            "timeouts": sum(d.timeouts for d in devs),
            # transport http: chunks fetched, bytes read from blob servers (headers included),
            # GETs, connections, fetch (re)starts, failed attempts resumed, refusals that ended a job
            "http_chunks": sum(d.fetched for d in devs),
            **{"http_" + k: sum(d.http_counts()[k] for d in devs)
               for k in ("bytes_received", "requests", "connections")},
            "http_fetch_starts": sum(d.fetch_starts for d in devs),
            "http_failures": sum(d.http_failures for d in devs),
            "http_failure_kinds": dict(sum((Counter(d.http_failure_kinds) for d in devs), Counter())),
            "http_errors": [f"{d.id}: {e}" for d in devs for e in d.http_errors][:10],
            # s from a fetch's (re)start to its first chunk (the server's queue): median, 95th, max
            "http_first_chunk_s": _quantiles([w for d in devs for w in d.fetch_waits]),
            "refused_subscriptions": sum(d.refused_subscriptions for d in devs),
            "errors": [f"{d.id}: {d.error}" for d in devs if d.error][:10],
        }


def _quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    v = sorted(values)
    return {"n": len(v), "p50": v[len(v) // 2], "p95": v[min(len(v) - 1, int(len(v) * 0.95))], "max": v[-1]}
