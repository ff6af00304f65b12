"""Scripted devices: many devices played by one MQTT client through the real broker.

For campaign tests with more devices than MicroPython processes are cheap for (until the
fleet simulator is on main). The client uses the server account, which may publish on every
device's topics: it reads each device's `cmd` topic and answers with the statuses a device
following docs/protocol.md would publish, per a behaviour:

  ok         downloading ... confirmed, then a health report (ok)
  fail       failed with E_HASH_MISMATCH (retryable)
  hw         failed with E_HW_MISMATCH (permanent)
  revert     ... trial, then reverted with E_HEALTH
  unhealthy  ... confirmed, then a health report with ok false
  nohealth   ... confirmed, and no health report
  stall      downloading, then nothing (until cancelled)
  silent     no answer at all (an unreachable device with its online flag still set)
  install    ... installing, then nothing (stuck past the download: cannot be cancelled)

Signatures are not checked here (the real devices' tests do that); job ids and the
cancel rule are followed. Statuses go through Mosquitto into the control center's ingestion.
"""
from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt

from fota.device import protocol as P
from fota.server.broker import SERVER_USER
from fota.server.store import Device

FLOWS = {
    "ok": ["downloading", "verifying", "installing", "rebooting", "trial", "confirmed", "health"],
    "fail": ["downloading", ("failed", P.E_HASH_MISMATCH)],
    "hw": [("failed", P.E_HW_MISMATCH)],
    "revert": ["downloading", "verifying", "installing", "rebooting", "trial", ("reverted", P.E_HEALTH)],
    "unhealthy": ["downloading", "verifying", "installing", "rebooting", "trial", "confirmed", "unhealthy"],
    "nohealth": ["downloading", "verifying", "installing", "rebooting", "trial", "confirmed"],
    "stall": ["downloading"],
    "silent": [],
    "install": ["downloading", "verifying", "installing"],
}


class ScriptedDevices:
    def __init__(self, broker, store, prefix: str):
        self.store = store
        self.prefix = prefix
        self.behaviour: dict[str, str] = {}
        self.version: dict[str, str] = {}
        self.seq: dict[str, int] = {}
        self.epoch: dict[str, int] = {}  # device -> its epoch once it started over (none sent before)
        self.current: dict[str, tuple[int, str]] = {}  # device -> (job, last state)
        self.commands: list[tuple[str, dict]] = []
        self.held: dict[str, list[dict]] = {}  # device -> update commands not answered yet
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"scripted-{time.monotonic_ns()}")
        self.client.username_pw_set(SERVER_USER, broker.users[SERVER_USER])
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.service_port)
        self.client.subscribe(f"{P.PREFIX}+/{P.CMD}", qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK for the scripted devices' commands"

    def add(self, name: str, behaviour: str = "ok", hardware: str = "unix", version: str = "1.0.0",
            tags=(), online: bool = True, inventory: dict | None = None) -> str:
        device_id = f"{self.prefix}-{name}"
        with self.store.session() as s:
            s.add(Device(id=device_id, hardware=hardware, version=version, tags=list(tags), online=online,
                         inventory=dict(inventory or {}, hardware=hardware, version=version)))
        self.behaviour[device_id] = behaviour
        self.version[device_id] = version
        self.seq[device_id] = 0
        return device_id

    def set_online(self, device_id: str, online: bool) -> None:
        """Through the broker, like the device's connect / will."""
        self._publish(device_id, P.ONLINE, b"1" if online else b"0")

    def hold(self, device_id: str) -> None:
        """Do not answer this device's update commands until release()."""
        self.held.setdefault(device_id, [])

    def release(self, device_id: str) -> None:
        with self.lock:
            for body in self.held.pop(device_id, []):
                self._run(device_id, body)

    def start_over(self, device_id: str, epoch: int) -> None:
        """The device's counters start over (flash erased, re-provisioned): a new epoch, seq from 1."""
        with self.lock:
            self.epoch[device_id] = epoch
            self.seq[device_id] = 0

    def report_health(self, device_id: str, ok: bool, **extra) -> None:
        """A health report (protocol §6) of the version it runs, next in its (epoch, boot, seq)."""
        with self.lock:
            self._status(device_id, None, "health", ok=ok, reason=None if ok else "app failed to start", **extra)

    def jobs_of(self, device_id: str, kind: str = "update") -> list[int]:
        with self.lock:
            return [c["job"] for d, c in self.commands if d == device_id and c["type"] == kind]

    def _publish(self, device_id: str, suffix: str, payload: bytes) -> None:
        self.client.publish(P.topic(device_id, suffix), payload, qos=1)

    def _status(self, device_id: str, job: int | None, state: str, code: str | None = None, **extra) -> None:
        self.seq[device_id] += 1
        msg = {"job": job, "state": state, "code": code, "reason": None, "progress": 0.0,
               "version": self.version[device_id], "boot": 1, "seq": self.seq[device_id]}
        if device_id in self.epoch:
            msg["epoch"] = self.epoch[device_id]
        msg.update(extra)
        self._publish(device_id, P.STATUS, json.dumps(msg).encode())

    def _on_message(self, client, userdata, msg):
        device_id = msg.topic.split("/")[2]
        if device_id not in self.behaviour:
            return
        body = json.loads(json.loads(msg.payload)["body"])
        with self.lock:
            self.commands.append((device_id, body))
            if body["type"] == "update" and device_id in self.held:
                self.held[device_id].append(body)
            elif body["type"] == "update":
                self._run(device_id, body)
            elif body["type"] == "cancel":
                job, state = self.current.get(device_id, (None, None))
                if job == body["target"] and state == "downloading":
                    self.current[device_id] = (job, "cancelled")
                    self._status(device_id, job, "cancelled", reason=f"cancelled by job {body['job']}")
                else:
                    self._status(device_id, body["target"], "rejected", P.E_NOT_RUNNING, current="idle")

    def _run(self, device_id: str, body: dict) -> None:
        job = body["job"]
        manifest = json.loads(body["manifest"])
        for step in FLOWS[self.behaviour[device_id]]:
            state, code = step if isinstance(step, tuple) else (step, None)
            if state == "confirmed":
                self.version[device_id] = manifest["version"]
            if state in ("health", "unhealthy"):
                ok = state == "health"
                self._status(device_id, None, "health", ok=ok, reason=None if ok else "app failed to start")
            else:
                self._status(device_id, job, state, code)
            self.current[device_id] = (job, state)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
